#!/usr/bin/env python3
"""Check medlake's benchmark figures against the Orthanc peer's (the issue's targets).

    check_targets.py ORTHANC_RESULTS MEDLAKE_RESULTS

Both files are output of the shared bench's measure.sh: figure lines are
"<name> <value> <unit>  # details". Prints one PASS/FAIL line per target with
both figures; exits 1 if any target fails or a figure is missing.
A figure whose answer was wrong (QIDO "MISMATCH", WADO "parts=149/150" or
"n=0/150") fails whatever its speed: a fast-but-wrong server must not pass.
"""

import contextlib
import re
import sys

# (figure, how medlake must compare, factor): medlake <op> factor * orthanc
TARGETS = [
    ("stow.inst_per_s", ">=", 2.0),
    ("qido.*", "<=", 1.0),  # expanded to every qido.*_ms figure of the Orthanc file
    ("wado.study_retrieve_mb_per_s", ">=", 1.0),
    ("wado.study_metadata_ms", "<=", 0.5),
    ("footprint.peak_rss_mb", "<=", 1.0),
]


def read_figures(path):
    """{name: (value, unit, details)}. A name seen twice keeps the LAST value: in the Orthanc
    file, footprint.* appears after run 1 (C-STORE only) and after run 2 (STOW +
    all reads); run 2 is the one comparable to medlake's stow+reads run."""
    out = {}
    with open(path) as f:
        for line in f:
            if line.startswith("#"):
                continue
            figure, _, details = line.partition("#")
            parts = figure.split()
            if len(parts) >= 3 and "." in parts[0]:
                with contextlib.suppress(ValueError):  # not a figure line
                    out[parts[0]] = (float(parts[1]), parts[2], details.strip())
    return out


def wrong_answer(figs, name):
    """Why the server's answer behind this figure was wrong, or None. The retrieve
    MB/s line has no counts: they are on its sibling wado.study_retrieve_ms line."""
    sibling = {"wado.study_retrieve_mb_per_s": "wado.study_retrieve_ms"}.get(name, name)
    details = figs.get(sibling, (0, "", ""))[2]
    if "MISMATCH" in details:
        return "answer count MISMATCH"
    for key, got, want in re.findall(r"\b(parts|n)=(\w+)/(\d+)", details):
        if got != want:
            return f"{key}={got}/{want}"
    return None


def main(argv):
    if len(argv) != 3:
        sys.exit(__doc__)
    orthanc, medlake = read_figures(argv[1]), read_figures(argv[2])
    checks = []
    for name, op, factor in TARGETS:
        if name == "qido.*":
            # only latency figures: qido.server_cpu_s is not a target
            checks += [
                (n, op, factor) for n in orthanc if n.startswith("qido.") and n.endswith("_ms")
            ]
        else:
            checks.append((name, op, factor))

    failed = 0
    for name, op, factor in checks:
        a, b = orthanc.get(name), medlake.get(name)
        if a is None or b is None:
            failed += 1
            print(f"FAIL  {name:<34} missing in {'orthanc' if a is None else 'medlake'} results")
            continue
        limit = factor * a[0]
        ok = b[0] >= limit if op == ">=" else b[0] <= limit
        wrong = wrong_answer(medlake, name)
        ok = ok and not wrong
        failed += not ok
        want = f"{op} {factor:g}x orthanc" if factor != 1 else f"{op} orthanc"
        print(
            f"{'PASS' if ok else 'FAIL'}  {name:<34} medlake {b[0]:>9.4g} {b[1]:<7}"
            f" orthanc {a[0]:>9.4g}  (want {want} = {limit:.4g})"
            + (f"  WRONG ANSWER: {wrong}" if wrong else "")
        )
    print(f"targets: {len(checks) - failed}/{len(checks)} pass")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
