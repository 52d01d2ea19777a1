"""C-FIND latency for the queries of the shared bench's QIDO set, against any C-FIND SCP.

    python benchmarks/dimse_find_latency.py HOST PORT CALLED_AET DATASET [--runs 20]

Same queries, same expected answer counts (from the dataset's manifest.json) as
``dicomweb_bench.py qido``, asked as Study Root C-FIND with the return keys a QIDO-RS
search returns by default. Each query runs once to warm up, then ``--runs`` times over
one association (pynetdicom as the SCU); the figure is the median round trip from the
C-FIND-RQ to the final response, in the shared bench's ``<figure> <value> <unit>  #
details`` format. A query whose answer count differs from the manifest says MISMATCH.
Association setup is measured separately (``cfind.association_ms``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE, evt

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_KEYS = (
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ModalitiesInStudy",
    "ReferringPhysicianName",
    "StudyDescription",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyID",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)
SERIES_KEYS = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "SeriesDescription",
    "SeriesNumber",
    "NumberOfSeriesRelatedInstances",
)
IMAGE_KEYS = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "SOPClassUID",
    "InstanceNumber",
    "Rows",
    "Columns",
)


def identifier(level: str, keys: tuple[str, ...], match: dict[str, str]) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword in keys:
        setattr(ds, keyword, None)  # a return key: present, empty
    for keyword, value in match.items():
        setattr(ds, keyword, value)
    return ds


def cases(manifest: dict) -> list[tuple[str, Dataset, int, str]]:
    q = manifest["queries"]
    si = q["series_instances"]
    return [
        (
            "cfind.studies_by_patientid_ms",
            identifier("STUDY", STUDY_KEYS, {"PatientID": q["patient_id"]["PatientID"]}),
            q["patient_id"]["expected_studies"],
            f"STUDY PatientID={q['patient_id']['PatientID']}",
        ),
        (
            "cfind.studies_by_date_range_ms",
            identifier("STUDY", STUDY_KEYS, {"StudyDate": q["date_range"]["StudyDate"]}),
            q["date_range"]["expected_studies"],
            f"STUDY StudyDate={q['date_range']['StudyDate']}",
        ),
        (
            "cfind.studies_by_name_wildcard_ms",
            identifier("STUDY", STUDY_KEYS, {"PatientName": q["name_wildcard"]["PatientName"]}),
            q["name_wildcard"]["expected_studies"],
            f"STUDY PatientName={q['name_wildcard']['PatientName']}",
        ),
        (
            "cfind.series_by_modality_ms",
            identifier("SERIES", SERIES_KEYS, {"Modality": q["modality_series"]["Modality"]}),
            q["modality_series"]["expected_series"],
            f"SERIES Modality={q['modality_series']['Modality']}",
        ),
        (
            "cfind.instances_of_series_ms",
            identifier(
                "IMAGE",
                IMAGE_KEYS,
                {
                    "StudyInstanceUID": si["StudyInstanceUID"],
                    "SeriesInstanceUID": si["SeriesInstanceUID"],
                },
            ),
            si["expected_instances"],
            "IMAGE of one series",
        ),
    ]


def fig(name: str, value: float, unit: str, details: str) -> None:
    print(f"{name:<34} {value:>12.3f} {unit:<10}  # {details}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("called_aet")
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--calling-aet", default="BENCHSCU")
    args = parser.parse_args()
    manifest = json.loads((args.dataset / "manifest.json").read_text())

    def nodelay(event: evt.Event) -> None:
        import socket

        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    ae = AE(ae_title=args.calling_aet)
    ae.add_requested_context(STUDY_ROOT_FIND)
    setups = []
    for _ in range(5):
        t0 = time.perf_counter()
        assoc = ae.associate(
            args.host,
            args.port,
            ae_title=args.called_aet,
            evt_handlers=[(evt.EVT_CONN_OPEN, nodelay)],
        )
        setups.append((time.perf_counter() - t0) * 1000)
        assoc.release()
    fig(
        "cfind.association_ms",
        statistics.median(setups),
        "ms",
        f"A-ASSOCIATE + A-RELEASE, median of {len(setups)} (pynetdicom SCU)",
    )

    assoc = ae.associate(
        args.host, args.port, ae_title=args.called_aet, evt_handlers=[(evt.EVT_CONN_OPEN, nodelay)]
    )
    if not assoc.is_established:
        raise SystemExit(f"cannot associate with {args.called_aet}@{args.host}:{args.port}")
    failed = False
    try:
        for name, query, expected, shown in cases(manifest):
            times, n = [], 0
            for run in range(args.runs + 1):
                t0 = time.perf_counter()
                matches, status = 0, None
                for rsp, found in assoc.send_c_find(query, STUDY_ROOT_FIND):
                    status = rsp.Status if "Status" in rsp else None
                    matches += found is not None and status in (0xFF00, 0xFF01)
                elapsed = (time.perf_counter() - t0) * 1000
                if status != 0x0000:
                    raise SystemExit(f"{name}: final status {status}")
                if run:  # the first run warms up
                    times.append(elapsed)
                n = matches
            times.sort()
            p90 = times[min(len(times) - 1, round(0.9 * (len(times) - 1)))]
            mismatch = "" if n == expected else " MISMATCH"
            failed |= bool(mismatch)
            fig(
                name,
                statistics.median(times),
                "ms",
                f"p90={p90:.1f} min={times[0]:.1f} n={n} expected={expected}{mismatch} "
                f"{shown}, one association, median of {len(times)}",
            )
    finally:
        assoc.release()
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
