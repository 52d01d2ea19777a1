#!/usr/bin/env python3
"""Bulk-ingest benchmark: ``medlake ingest`` against ``cp -r`` + ``sync`` of the same files in
the same run, against Orthanc's STOW-RS rate, and on 100,000 small files with memory sampled
as the count grows. Called by ``benchmarks/ingest_vs_cp.sh`` (``make bench-ingest``).

Phases (figures are ``<name> <value> <unit>  # details``, the shared bench's format):

1. ``baseline.cp_r_sync_*``: ``cp -r DATASET/dicom`` into a fresh folder of the scratch
   filesystem, then ``sync``; median of 3 (the source is in the page cache, as for ingest).
   ``floor.copy_hash_*``: the least a copy-mode ingest must do, copying and hashing the
   files in one started process per core (``ingest_floor.py``), and its ratio to Orthanc.
2. ``ingest.*``: ``medlake ingest DATASET/dicom --data <fresh>`` with the default workers;
   wall time of the whole command (process start included), MB/s, inst/s, peak RSS of the
   main process and of its worker processes (sampled VmHWM), the batch's own time.
   Targets: MB/s >= 50 % of cp -r + sync; inst/s >= 5 x Orthanc's ``stow.inst_per_s``.
3. ``small.*``: the same command on ``--small-instances`` files of ``make_dataset.py
   --pixels native``; RSS (main VmRSS/VmHWM, workers' VmRSS) recorded when the batch has
   seen 10 %, 50 % and 100 % of them (10k / 50k / 100k for 100,000 files).

Usage::

    ingest_bench.py --dataset /tmp/ds --work /tmp/ingest-bench --orthanc results/orthanc.txt \
        [--small-dataset DIR | --small-studies 100] [--skip-small] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ingest_floor import copy_floor

REPO = Path(__file__).resolve().parents[1]


def emit(lines: list[str], name: str, value: float | int | str, unit: str, detail: str) -> None:
    text = (
        value
        if isinstance(value, str)
        else (f"{value:.1f}" if isinstance(value, float) else str(value))
    )
    line = f"{name:<40} {text:>10} {unit:<8}  # {detail}"
    print(line, flush=True)
    lines.append(line)


def du_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def count_files(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file())


def warm(folder: Path) -> None:
    """Read every file once so that both contenders start from the page cache."""
    for path in folder.rglob("*"):
        if path.is_file():
            with path.open("rb") as fh:
                while fh.read(1 << 20):
                    pass


def settle(seconds: float) -> None:
    """Wait ``seconds`` after the last delete of whatever ran before (an earlier benchmark's
    scratch folder), then read the dataset into the page cache again.

    On a filesystem without a journal (ext4 as on the benchmark machines), creating a
    file scans past every inode freed in the last minute (ext4's ``recently_deleted``):
    measured here, a copy of 3,000 files right after 3,000 others were deleted spent a
    quarter of its CPU time in that scan. So no run of this benchmark follows a delete:
    each run writes into a folder of its own and all are removed at the end.
    """
    subprocess.run(["sync"], check=True)
    time.sleep(seconds)


def cp_sync(source: Path, work: Path, runs: int = 3) -> list[float]:
    times = []
    for i in range(runs):
        target = work / f"cp-{i}"
        subprocess.run(["sync"], check=True)
        start = time.perf_counter()
        subprocess.run(["cp", "-r", str(source), str(target)], check=True)
        subprocess.run(["sync"], check=True)
        times.append(time.perf_counter() - start)
    return times


def status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM of a process in kB (empty when it is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


@dataclass
class Sampler:
    """Samples the RSS of the ingest process and its workers, and the batch progress."""

    pid: int
    index: Path
    marks: list[int]
    peak_main: int = 0
    peak_workers: int = 0
    peak_workers_sum: int = 0
    at_marks: dict[int, tuple[int, int, int, int]] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)

    def seen(self) -> int:
        if not self.index.exists():
            return 0
        try:
            with sqlite3.connect(f"file:{self.index}?mode=ro", uri=True, timeout=1) as conn:
                row = conn.execute("SELECT max(seen) FROM batches WHERE kind='ingest'").fetchone()
                return int(row[0] or 0)
        except sqlite3.Error:
            return 0

    def run(self) -> None:
        while not self.stop.is_set():
            main = status(self.pid)
            kids = [status(c) for c in children(self.pid)]
            workers = [k.get("VmRSS", 0) for k in kids]
            self.peak_main = max(self.peak_main, main.get("VmHWM", 0))
            self.peak_workers = max([self.peak_workers, *(k.get("VmHWM", 0) for k in kids)])
            self.peak_workers_sum = max(self.peak_workers_sum, sum(workers))
            seen = self.seen()
            for mark in self.marks:
                if mark not in self.at_marks and seen >= mark:
                    self.at_marks[mark] = (
                        seen,
                        main.get("VmRSS", 0),
                        main.get("VmHWM", 0),
                        sum(workers),
                    )
            self.stop.wait(0.25)


@dataclass
class Run:
    seconds: float
    returncode: int
    sampler: Sampler
    batch: dict[str, object]
    output: str


def run_ingest(
    source: Path, data: Path, marks: list[int], settings: dict[str, str] | None = None
) -> Run:
    if data.exists():
        raise SystemExit(f"{data} exists: every run writes a folder of its own")
    medlake = REPO / ".venv" / "bin" / "medlake"
    env = {**os.environ, "COLUMNS": "120", "NO_COLOR": "1", **(settings or {})}
    env.pop("MEDLAKE_DATABASE_URL", None)  # the default: SQLite in the data folder
    subprocess.run(["sync"], check=True)
    start = time.perf_counter()
    process = subprocess.Popen(
        [str(medlake), "ingest", str(source), "--data", str(data)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    sampler = Sampler(process.pid, data / "index.sqlite", marks)
    thread = threading.Thread(target=sampler.run, daemon=True)
    thread.start()
    output, _ = process.communicate()
    seconds = time.perf_counter() - start
    sampler.stop.set()
    thread.join()
    sampler.seen()  # the final count
    listed = subprocess.run(
        [str(medlake), "batches", "--data", str(data), "--json"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    [batch] = json.loads(listed.stdout)
    for mark in marks:  # the end of the run is the last mark
        if mark not in sampler.at_marks and int(batch["seen"]) >= mark:
            sampler.at_marks[mark] = (int(batch["seen"]), 0, sampler.peak_main, 0)
    return Run(seconds, process.returncode, sampler, batch, output)


def orthanc_stow(path: Path) -> float:
    for line in path.read_text().splitlines():
        if line.startswith("stow.inst_per_s"):
            return float(line.split()[1])
    raise SystemExit(f"no stow.inst_per_s in {path}")


def git_state() -> str:
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "src"], capture_output=True, text=True
    ).stdout.strip()
    return head + (" + uncommitted changes in src/" if dirty else "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", type=Path, required=True, help="make_dataset.py folder")
    ap.add_argument("--work", type=Path, required=True, help="scratch folder")
    ap.add_argument("--orthanc", type=Path, required=True, help="Orthanc results file")
    ap.add_argument("--small-dataset", type=Path, help="make_dataset.py --pixels native folder")
    ap.add_argument("--small-instances", type=int, default=100_000)
    ap.add_argument("--skip-small", action="store_true")
    ap.add_argument("--out", type=Path, help="also write the figures here")
    ap.add_argument("--settle", type=float, default=65, help="seconds to wait first (see settle())")
    ap.add_argument("--ingest-runs", type=int, default=3)
    args = ap.parse_args()
    lines: list[str] = []
    source = args.dataset / "dicom"
    files, size = count_files(source), du_bytes(source)
    mb = size / 1e6
    cores = os.cpu_count()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    header = [
        "# medlake bulk-ingest benchmark (benchmarks/ingest_vs_cp.sh)",
        f"# date: {dt.datetime.now(dt.UTC):%Y-%m-%dT%H:%M:%SZ}  host: {cores} cores, "
        f"{mem:.0f} GiB, {platform.platform()}",
        f"# medlake {git_state()}; python {platform.python_version()}; index SQLite (default); "
        "lake local folder on the scratch filesystem; fsync on (default)",
        f"# dataset: {args.dataset} = {files} files, {mb:.0f} MB; scratch: {args.work}",
        "# format: <figure> <value> <unit>  # details",
    ]
    for line in header:
        print(line)
    lines += header
    args.work.mkdir(parents=True, exist_ok=True)
    settle(args.settle)
    warm(source)

    lines.append("")
    lines.append("## the same files, same run: cp -r + sync vs medlake ingest")
    cp_times = cp_sync(source, args.work)
    cp_median = statistics.median(cp_times)
    cp_rate = mb / cp_median
    emit(
        lines,
        "baseline.cp_r_sync_mb_per_s",
        cp_rate,
        "MB/s",
        f"cp -r then sync of {files} files, {mb:.0f} MB, median of 3: {cp_median:.3f}s; "
        f"runs {' '.join(f'{t:.3f}' for t in cp_times)}",
    )
    orthanc = orthanc_stow(args.orthanc)
    emit(
        lines,
        "ratio.cp_sync_vs_orthanc_stow",
        f"{files / cp_median / orthanc:.2f}",
        "ratio",
        f"cp -r + sync at {files / cp_median:.1f} inst/s vs Orthanc stow.inst_per_s {orthanc}",
    )
    floor_times = copy_floor(source, args.work, cores or 1)
    floor_median = statistics.median(floor_times)
    emit(
        lines,
        "floor.copy_hash_inst_per_s",
        files / floor_median,
        "inst/s",
        f"read + SHA-256 + write of every file in {cores} started processes, then syncfs "
        f"(ingest_floor.py: no parse, index or start-up), median of 3: {floor_median:.3f}s; "
        f"runs {' '.join(f'{t:.3f}' for t in floor_times)}",
    )
    emit(
        lines,
        "ratio.floor_vs_orthanc_stow",
        f"{files / floor_median / orthanc:.2f}",
        "ratio",
        "the most any copy-mode ingest could show against Orthanc here",
    )
    runs = []
    for i in range(args.ingest_runs):
        warm(source)
        runs.append(run_ingest(source, args.work / f"medlake-data-{i}", [files]))
    run = sorted(runs, key=lambda r: r.seconds)[len(runs) // 2]  # the median run
    batch = run.batch
    rate = mb / run.seconds
    inst = files / run.seconds
    batch_seconds = float(batch["seconds"])  # type: ignore[arg-type]
    emit(
        lines,
        "ingest.mb_per_s",
        rate,
        "MB/s",
        f"medlake ingest (default workers = {cores}), median of {len(runs)}: wall "
        f"{run.seconds:.2f}s incl. process start, rc={run.returncode}, batch "
        f"{batch['status']}/{batch['verdict']}, stored={batch['stored']} "
        f"rejected={batch['rejected']}; runs {' '.join(f'{r.seconds:.2f}' for r in runs)}",
    )
    emit(lines, "ingest.inst_per_s", inst, "inst/s", f"{files} instances / {run.seconds:.2f}s wall")
    emit(
        lines,
        "ingest.batch_inst_per_s",
        files / batch_seconds,
        "inst/s",
        f"the batch's own time {batch_seconds:.2f}s (discovery to reconciliation, no start-up)",
    )
    emit(
        lines,
        "ingest.peak_rss_main_mb",
        max(r.sampler.peak_main for r in runs) / 1024,
        "MB",
        "VmHWM of the medlake ingest process (largest of the runs)",
    )
    emit(
        lines,
        "ingest.peak_rss_worker_mb",
        max(r.sampler.peak_workers for r in runs) / 1024,
        "MB",
        "largest VmHWM of one worker process",
    )
    ratio_cp = rate / cp_rate
    ratio_orthanc = inst / orthanc
    emit(
        lines,
        "ratio.ingest_vs_cp_sync",
        f"{ratio_cp:.3f}",
        "ratio",
        f"target >= 0.5: {'PASS' if ratio_cp >= 0.5 else 'FAIL'}",
    )
    emit(
        lines,
        "ratio.ingest_vs_orthanc_stow",
        f"{ratio_orthanc:.2f}",
        "ratio",
        f"vs Orthanc stow.inst_per_s {orthanc} ({args.orthanc.name}); target >= 5: "
        f"{'PASS' if ratio_orthanc >= 5 else 'FAIL'}",
    )

    lines.append("")
    lines.append("## the same, with ingest_link_files = true (hard links: no copy)")
    warm(source)
    linked = run_ingest(
        source, args.work / "medlake-link", [files], {"MEDLAKE_INGEST_LINK_FILES": "true"}
    )
    link_inst = files / linked.seconds
    link_batch_seconds = float(linked.batch["seconds"])  # type: ignore[arg-type]
    emit(
        lines,
        "ingest_link.inst_per_s",
        link_inst,
        "inst/s",
        f"{files} instances / {linked.seconds:.2f}s wall incl. process start, "
        f"rc={linked.returncode}, batch {linked.batch['status']}/{linked.batch['verdict']}, "
        f"stored={linked.batch['stored']}",
    )
    emit(
        lines,
        "ingest_link.batch_inst_per_s",
        files / link_batch_seconds,
        "inst/s",
        f"the batch's own time {link_batch_seconds:.2f}s",
    )
    ratio_link = link_inst / orthanc
    emit(
        lines,
        "ratio.ingest_link_vs_orthanc_stow",
        f"{ratio_link:.2f}",
        "ratio",
        f"vs Orthanc stow.inst_per_s {orthanc}; target >= 5: "
        f"{'PASS' if ratio_link >= 5 else 'FAIL'}",
    )

    if not args.skip_small:
        lines.append("")
        lines.append(f"## {args.small_instances} small files (make_dataset.py --pixels native)")
        small = args.small_dataset or args.work / "small"
        if not (small / "manifest.json").exists():
            raise SystemExit(f"no small dataset at {small}")
        small_files, small_size = count_files(small / "dicom"), du_bytes(small / "dicom")
        marks = sorted({max(1, small_files // 10), small_files // 2, small_files})
        warm(small / "dicom")
        big = run_ingest(small / "dicom", args.work / "medlake-small", marks)
        emit(
            lines,
            "small.inst_per_s",
            small_files / big.seconds,
            "inst/s",
            f"{small_files} files, {small_size / 1e6:.0f} MB, wall {big.seconds:.1f}s, "
            f"rc={big.returncode}, batch {big.batch['status']}/{big.batch['verdict']}, "
            f"stored={big.batch['stored']}",
        )
        emit(lines, "small.mb_per_s", small_size / 1e6 / big.seconds, "MB/s", "")
        for mark in marks:
            seen, rss, hwm, workers = big.sampler.at_marks.get(mark, (0, 0, 0, 0))
            emit(
                lines,
                f"small.rss_main_mb@{mark}",
                rss / 1024,
                "MB",
                f"VmRSS of the ingest process when {seen} files were seen; VmHWM so far "
                f"{hwm / 1024:.1f} MB; workers' VmRSS together {workers / 1024:.1f} MB",
            )
        emit(
            lines,
            "small.peak_rss_main_mb",
            big.sampler.peak_main / 1024,
            "MB",
            "VmHWM of the ingest process over the whole run",
        )
        emit(
            lines,
            "small.peak_rss_workers_mb",
            big.sampler.peak_workers_sum / 1024,
            "MB",
            "largest sum of the workers' VmRSS",
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
