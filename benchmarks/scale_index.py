#!/usr/bin/env python3
"""Scale benchmark of the index: N synthetic instances (metadata only), then QIDO latencies.

    .venv/bin/python benchmarks/scale_index.py --instances 1000000 --db both \
        [--pg-url postgresql://postgres@127.0.0.1:5432/postgres] [--out FILE] \
        [--runs 20] [--batch 1000] [--seed 1] [--try-indexes] [--profile-batches 30] [--keep]

What it does, per backend (SQLite in a temp folder, PostgreSQL in a fresh database
``medlake_scale_<random>`` created on the server of ``--pg-url`` and dropped at the end):

1. opens a real :class:`medlake.ingest.archive.Archive` on it (``open_index`` runs the
   migrations, as the server does);
2. writes N deterministic synthetic instances (no files: ``blob_key`` and ``sha256`` are
   fake) through :func:`medlake.index.writes.write_instances`, ``--batch`` rows per
   transaction (``engine.begin()``), the way ``ingest.store`` writes; only the time
   inside those transactions counts for ``insert_inst_per_s``;
3. times QIDO queries through :func:`medlake.dicomweb.search.run_search` (the whole
   QIDO path minus HTTP: partition check, extended tags, parse, count + page SQL,
   DICOM JSON) plus ``orjson.dumps`` of the result (what the route sends): median and
   p90 of ``--runs`` after one warm-up; the SQL alone (``index.qido.search``) is timed
   the same way and given in the details;
4. prints the plan (SQLite ``EXPLAIN QUERY PLAN`` / PostgreSQL ``EXPLAIN (COSTS OFF)``,
   literal values) of the count and the page statement of each query, and flags reads
   of a whole table or partition (``plan=SCANS [...]``); also times
   ``dicomweb.locate.find_instances`` (first step of every WADO request) as ``locate.*``;
5. with ``--try-indexes``: applies the prototypes of ``PROTOTYPES`` one after the other
   (statistics, indexes, a connection pragma, a monkeypatched query variant; in the
   benchmark database / process only, never in the repository) and times everything
   again under ``<prototype>.*`` figures, with a before -> after line.

PostgreSQL servers with ``autovacuum = off`` (like the one this was written on) never
gather planner statistics; ``--pg-analyze auto`` (default) runs ANALYZE between batches
as autovacuum would (not counted in the rate), ``--pg-analyze none`` does not (figures
then named ``scale.postgresql_noanalyze.*``).

Output lines follow the shared bench format ``<figure> <value> <unit>  # details``;
comment lines (``#``) carry the header, the plans and the profile.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime as dt
import io
import os
import platform
import pstats
import random
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from sqlalchemy import Select, event, func, select, text
from sqlalchemy.engine import make_url

from medlake.config import Settings
from medlake.dicom.attributes import Level
from medlake.dicomweb.locate import find_instances
from medlake.dicomweb.search import parse_query, run_search
from medlake.index import qido as qido_mod
from medlake.index.qido import MAX_LIMIT, QidoQuery, search
from medlake.index.schema import instances, partitions, series, studies
from medlake.index.writes import InstanceRow, write_instances
from medlake.ingest.archive import Archive
from medlake.storage import LakeLayout
from medlake.types import DEFAULT_PARTITION

ROOT = Path(__file__).resolve().parent.parent
BASE_URL = "http://127.0.0.1:8042/dicomweb"  # what the route passes (RetrieveURL built)
DATE_RANGE = ("20180101", "20201231")  # 3 years, as the shared bench
NAME_WILDCARD = "SMI*"
FUZZY_NAME = "smi"
DEEP_OFFSET, DEEP_LIMIT = 5000, 100
err = Console(stderr=True)

# ----------------------------------------------------------------------------- dataset

# Family names with a Zipf-like weight (rank r -> 1/(r+1)); SMITH is the most common
# and SMITHSON/SMIRNOV/SMILEY share its prefix so SMI* matches several families.
FAMILY = str.split(
    "SMITH JOHNSON WILLIAMS BROWN JONES GARCIA MILLER DAVIS RODRIGUEZ MARTINEZ "
    "HERNANDEZ LOPEZ GONZALEZ WILSON ANDERSON THOMAS TAYLOR MOORE JACKSON MARTIN "
    "LEE PEREZ THOMPSON WHITE HARRIS SANCHEZ CLARK RAMIREZ LEWIS ROBINSON WALKER "
    "YOUNG ALLEN KING WRIGHT SCOTT TORRES NGUYEN HILL FLORES MULLER SCHMIDT "
    "SCHNEIDER FISCHER WEBER DUBOIS MOREAU LAURENT ROSSI RUSSO FERRARI TANAKA "
    "SUZUKI KOWALSKI NOWAK SILVA SANTOS OBRIEN MURPHY PETERS SMITHSON SMIRNOV "
    "SMILEY IVANOV PETROV KIM PARK CHEN WANG LI ZHANG"
)
FAMILY_MULTI = ["VAN DER BERG", "DE LA CRUZ", "O NEILL", "MAC SMITH"]  # spaces inside
GIVEN = str.split(
    "JAMES MARY JOHN PATRICIA ROBERT JENNIFER MICHAEL LINDA WILLIAM ELIZABETH DAVID "
    "BARBARA RICHARD SUSAN JOSEPH JESSICA THOMAS SARAH CHARLES KAREN ANNA PETER LUCA "
    "SOFIA HIRO EMMA OMAR LENA PAUL IRIS MARC NINA TOM ZOE SMILLA"
)
STUDY_MODALITY_WEIGHTS = {"CT": 0.35, "MR": 0.25, "US": 0.15, "CR": 0.15, "DX": 0.10}
SERIES_RANGE = {"CT": (3, 6), "MR": (3, 6), "US": (1, 4), "CR": (1, 3), "DX": (1, 3)}
INSTANCE_RANGE = {"CT": (20, 60), "MR": (15, 40), "US": (1, 30), "CR": (1, 2), "DX": (1, 2)}
SOP_CLASS = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "US": "1.2.840.10008.5.1.4.1.1.6.1",
    "CR": "1.2.840.10008.5.1.4.1.1.1",
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",
}
PIXELS = {"CT": (512, 512, 16), "MR": (256, 256, 16), "US": (600, 800, 8),
          "CR": (2048, 2500, 16), "DX": (3000, 2500, 16)}  # fmt: skip
TSYNTAX = {
    "CT": "1.2.840.10008.1.2.1",
    "MR": "1.2.840.10008.1.2.1",
    "US": "1.2.840.10008.1.2.4.50",
    "CR": "1.2.840.10008.1.2.4.90",
    "DX": "1.2.840.10008.1.2.4.90",
}
BODY = {"CT": ["CHEST", "ABDOMEN", "HEAD", "PELVIS"], "MR": ["HEAD", "KNEE", "LSPINE", "ABDOMEN"],
        "US": ["ABDOMEN", "NECK", "PELVIS"], "CR": ["CHEST", "HAND", "KNEE"],
        "DX": ["CHEST", "FOOT", "SPINE"]}  # fmt: skip
DESCS = {
    "CT": ["AX 5mm", "AX 1.25mm BONE", "COR MPR", "SAG MPR", "ARTERIAL", "VENOUS"],
    "MR": ["T1 AX", "T2 AX", "FLAIR AX", "DWI", "T1 POST GD", "T2 COR"],
    "US": ["B-MODE", "DOPPLER", "CINE CLIPS", "MEASUREMENTS"],
    "CR": ["PA", "LAT", "AP"],
    "DX": ["PA", "LAT", "OBLIQUE"],
}
INSTITUTIONS = ["GENERAL HOSPITAL", "CITY CLINIC", "UNIVERSITY MEDICAL CENTER"]
REFERRING = ["HOUSE^GREGORY", "GREY^MEREDITH", "ROSS^DOUG", "CARTER^JOHN", None]
MANUFACTURERS = ["SIEMENS", "GE MEDICAL SYSTEMS", "Philips", "CANON_MEC", "FUJIFILM"]


@dataclass
class SeriesPlan:
    uid: str
    number: int
    modality: str
    description: str
    body_part: str
    instances: int


@dataclass
class StudyPlan:
    uid: str
    patient: int
    date: str
    modality: str
    series: list[SeriesPlan] = field(default_factory=list)

    @property
    def instances(self) -> int:
        return sum(s.instances for s in self.series)


@dataclass
class Patient:
    id: str
    name: str
    sex: str
    birth: str


@dataclass
class Dataset:
    instances: int
    seed: int
    patients: list[Patient]
    studies: list[StudyPlan]

    def describe(self) -> str:
        n_series = sum(len(s.series) for s in self.studies)
        mods = Counter(se.modality for st in self.studies for se in st.series)
        return (
            f"{self.instances} instances = {len(self.studies)} studies x "
            f"{n_series / len(self.studies):.2f} series x "
            f"{self.instances / max(n_series, 1):.1f} instances (avg), "
            f"{n_series} series, {len({s.patient for s in self.studies})} patients, "
            f"series modalities {dict(mods.most_common())}, seed={self.seed}, metadata only"
        )


def uid128(rng: random.Random) -> str:
    """A 2.25.<128-bit> UID (43-44 characters, like generate_uid())."""
    return f"2.25.{rng.getrandbits(128)}"


def make_dataset(n_instances: int, seed: int) -> Dataset:
    """Plan studies/series (deterministic for ``seed``) until ``n_instances`` are reached."""
    rng = random.Random(seed)
    n_studies_guess = max(1, round(n_instances / 100))
    n_pat = max(1, round(n_studies_guess * 0.3))
    fam_w = [1 / (r + 1) for r in range(len(FAMILY))]
    patients = []
    for p in range(n_pat):
        multi = rng.random() < 0.01
        family = rng.choice(FAMILY_MULTI) if multi else rng.choices(FAMILY, fam_w)[0]
        name = f"{family}^{rng.choice(GIVEN)}"
        if rng.random() < 0.3:
            name += f"^{rng.choice('ABCDEFGHJKLMNPRSTW')}"
        if rng.random() < 0.1:  # some senders write mixed case
            name = "^".join(part.title() for part in name.split("^"))
        birth = dt.date(1930, 1, 1) + dt.timedelta(days=rng.randrange(0, 90 * 365))
        patients.append(
            Patient(f"MRN{p + 1:07d}", name, rng.choice("MF"), birth.strftime("%Y%m%d"))
        )
    # After one study each, patients are drawn with weight 1/(rank+50): a few patients
    # with dozens of studies, most with one to three.
    ranks = list(range(n_pat))
    rng.shuffle(ranks)
    pat_w = [1 / (ranks[p] + 50) for p in range(n_pat)]
    mods, mod_w = list(STUDY_MODALITY_WEIGHTS), list(STUDY_MODALITY_WEIGHTS.values())
    day0, days = dt.date(2010, 1, 1), (dt.date(2025, 12, 31) - dt.date(2010, 1, 1)).days + 1
    studies: list[StudyPlan] = []
    total = 0
    while total < n_instances:
        s = len(studies)
        pat = s if s < n_pat else rng.choices(range(n_pat), pat_w)[0]
        mod = rng.choices(mods, mod_w)[0]
        date = (day0 + dt.timedelta(days=rng.randrange(days))).strftime("%Y%m%d")
        study = StudyPlan(uid128(rng), pat, date, mod)
        n_series = rng.randint(*SERIES_RANGE[mod])
        for r in range(n_series):
            # 5 % of CT/MR studies end with a CR/DX series (ModalitiesInStudy has two values)
            se_mod = mod
            if r == n_series - 1 and r > 0 and mod in ("CT", "MR") and rng.random() < 0.05:
                se_mod = rng.choice(["CR", "DX"])
            n_inst = min(rng.randint(*INSTANCE_RANGE[se_mod]), n_instances - total)
            study.series.append(
                SeriesPlan(
                    uid128(rng),
                    r + 1,
                    se_mod,
                    rng.choice(DESCS[se_mod]),
                    rng.choice(BODY[se_mod]),
                    n_inst,
                )
            )
            total += n_inst
            if total >= n_instances:
                break
        studies.append(study)
    return Dataset(n_instances, seed, patients, studies)


def instance_rows(ds: Dataset, partition: str) -> Iterator[InstanceRow]:
    """Every instance of ``ds``, study by study (the order an archive receives them)."""
    rng = random.Random(ds.seed + 1)
    layout = LakeLayout()
    for s_idx, st in enumerate(ds.studies):
        pat = ds.patients[st.patient]
        stime = f"{rng.randrange(7, 19):02d}{rng.randrange(60):02d}{rng.randrange(60):02d}"
        study_vals = {
            "specific_character_set": "ISO_IR 100" if rng.random() < 0.5 else None,
            "study_date": st.date,
            "study_time": stime,
            "accession_number": f"ACC{s_idx + 1:09d}",
            "referring_physician_name": rng.choice(REFERRING),
            "timezone_offset_from_utc": None,
            "study_description": f"{st.modality} {rng.choice(BODY[st.modality])}",
            "patient_name": pat.name,
            "patient_id": pat.id,
            "issuer_of_patient_id": "HOSP",
            "patient_birth_date": pat.birth,
            "patient_sex": pat.sex,
            "study_uid": st.uid,
            "study_id": str(s_idx + 1),
        }
        age = (int(st.date[:4]) - int(pat.birth[:4])) or 1
        study_extra = {
            "00101010": {"vr": "AS", "Value": [f"{age:03d}Y"]},
            "00080080": {"vr": "LO", "Value": [rng.choice(INSTITUTIONS)]},
        }
        for se in st.series:
            rows_, cols, bits = PIXELS[se.modality]
            series_vals = {
                "modality": se.modality,
                "series_description": se.description,
                "body_part_examined": se.body_part,
                "series_number": se.number,
                "pps_start_date": st.date,
                "pps_start_time": stime,
                "series_uid": se.uid,
            }
            series_extra = {
                "00080070": {"vr": "LO", "Value": [rng.choice(MANUFACTURERS)]},
                "00181030": {"vr": "LO", "Value": [se.description]},
                "00080021": {"vr": "DA", "Value": [st.date]},
            }
            frames_n = rng.randint(20, 120) if se.modality == "US" and rng.random() < 0.3 else 1
            encapsulated = TSYNTAX[se.modality] != "1.2.840.10008.1.2.1"
            for i in range(se.instances):
                sop = uid128(rng)
                size = rows_ * cols * bits // 8 * frames_n
                if encapsulated:
                    size //= 3
                    frames = [[[2100 + k * 1000, size // frames_n]] for k in range(frames_n)]
                else:
                    frames = [[[2100, size]]]
                values = {
                    **study_vals,
                    **series_vals,
                    "sop_uid": sop,
                    "sop_class_uid": SOP_CLASS[se.modality],
                    "instance_number": i + 1,
                    "rows": rows_,
                    "columns": cols,
                    "bits_allocated": bits,
                    "number_of_frames": frames_n if frames_n > 1 else None,
                    "transfer_syntax_uid": TSYNTAX[se.modality],
                }
                yield InstanceRow(
                    study_uid=st.uid,
                    series_uid=se.uid,
                    sop_uid=sop,
                    values=values,
                    blob_key=layout.instance_key(partition, st.uid, se.uid, sop),
                    size=size + 2100,
                    sha256=f"{rng.getrandbits(256):064x}",
                    encapsulated=encapsulated,
                    frames=frames,
                    study_extra=study_extra,
                    series_extra=series_extra,
                )


# ----------------------------------------------------------------------------- queries


@dataclass
class Query:
    name: str
    level: Level
    params: list[tuple[str, str]]
    expected_n: int
    expected_total: int
    study_uid: str | None = None
    series_uid: str | None = None

    @property
    def unfiltered(self) -> bool:
        """No matching key: its count reads the whole partition whatever the indexes."""
        return not self.study_uid and all(
            k in ("limit", "offset", "fuzzymatching", "includefield") for k, _ in self.params
        )

    def shown(self) -> str:
        path = {"study": "/studies", "series": "/series", "instance": "/instances"}[self.level]
        if self.series_uid:
            path = "/studies/{uid}/series/{uid}/instances"
        q = "&".join(f"{k}={v}" for k, v in self.params)
        return path + (f"?{q}" if q else "")


def _fuzzy_hit(name: str, word: str) -> bool:
    spaced = " " + name.upper().replace("^", " ").replace("=", " ")
    return f" {word.upper()}" in spaced


def make_queries(ds: Dataset) -> list[Query]:
    """The shared bench's six QIDO queries plus three, with answers computed from ``ds``."""
    default = 1000
    by_pat = Counter(st.patient for st in ds.studies)
    top = max(by_pat, key=lambda p: (by_pat[p], -p))
    pid = ds.patients[top].id
    studies_total = len(ds.studies)
    lo, hi = DATE_RANGE
    n_date = sum(lo <= st.date <= hi for st in ds.studies)
    prefix = NAME_WILDCARD.rstrip("*")
    n_name = sum(ds.patients[st.patient].name.upper().startswith(prefix) for st in ds.studies)
    n_fuzzy = sum(_fuzzy_hit(ds.patients[st.patient].name, FUZZY_NAME) for st in ds.studies)
    n_ct = sum(se.modality == "CT" for st in ds.studies for se in st.series)
    n_pat_series = sum(len(st.series) for st in ds.studies if st.patient == top)
    big = max(ds.studies, key=lambda st: (st.instances, st.uid))
    ser = big.series[0]
    S, SE, IN = Level.STUDY, Level.SERIES, Level.INSTANCE
    return [
        Query("studies_by_patientid", S, [("PatientID", pid)], by_pat[top], by_pat[top]),
        Query("studies_by_date_range", S, [("StudyDate", f"{lo}-{hi}")],
              min(n_date, default), n_date),
        Query("studies_by_name_wildcard", S, [("PatientName", NAME_WILDCARD)],
              min(n_name, default), n_name),
        Query("series_by_modality", SE, [("Modality", "CT")], min(n_ct, default), n_ct),
        Query("instances_of_series", IN, [], ser.instances, ser.instances,
              study_uid=big.uid, series_uid=ser.uid),
        Query("studies_ohif_worklist", S,
              [("limit", "101"), ("offset", "0"), ("fuzzymatching", "false"),
               ("includefield", "00081030,00080060")], min(101, studies_total), studies_total),
        Query("studies_fuzzy_name", S, [("PatientName", FUZZY_NAME), ("fuzzymatching", "true")],
              min(n_fuzzy, default), n_fuzzy),
        Query("studies_deep_page", S, [("offset", str(DEEP_OFFSET)), ("limit", str(DEEP_LIMIT))],
              max(0, min(DEEP_LIMIT, studies_total - DEEP_OFFSET)), studies_total),
        Query("series_by_patientid", SE, [("PatientID", pid)], min(n_pat_series, default),
              n_pat_series),
    ]  # fmt: skip


def pctl(xs: list[float], p: float) -> float:
    s = sorted(xs)
    k = (len(s) - 1) * p / 100
    f = int(k)
    return s[f] if f + 1 >= len(s) else s[f] + (s[f + 1] - s[f]) * (k - f)


SLOW_BUDGET_S = 15.0  # a query whose warm-up is slow gets fewer runs (at least 3)


def timed(fn: Callable[[], Any], runs: int) -> tuple[list[float], Any]:
    t0 = time.perf_counter()
    out = fn()  # warm-up, not counted
    warm = time.perf_counter() - t0
    if warm * runs > SLOW_BUDGET_S:
        runs = max(3, min(runs, int(SLOW_BUDGET_S / warm)))
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        ts.append((time.perf_counter() - t0) * 1000)
    return ts, out


def qido_statements(q: Query) -> tuple[Any, Any]:
    """The count and page statements ``index.qido.search`` runs for ``q``."""
    query, _ = parse_query(q.level, DEFAULT_PARTITION, q.params, study_uid=q.study_uid,
                           series_uid=q.series_uid, extended={})  # fmt: skip
    stmt = qido_mod.build_select(query)
    order = {Level.STUDY: studies, Level.SERIES: series, Level.INSTANCE: instances}[q.level].c.id
    count = select(func.count()).select_from(stmt.subquery())
    page = stmt.order_by(order).limit(min(query.limit, MAX_LIMIT)).offset(query.offset)
    return count, page


def explain(engine: sqlalchemy.Engine, stmt: Any) -> list[str]:
    sql = str(stmt.compile(dialect=engine.dialect, compile_kwargs={"literal_binds": True}))
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql).all()
            return [r[3] for r in rows]
        return [r[0] for r in conn.exec_driver_sql("EXPLAIN (COSTS OFF) " + sql).all()]


BIG_TABLES = ("studies", "series", "instances")


def _table_of_index(index: str) -> str:
    """Table of an index named by the schema's convention (ix_/uq_/pk_<table>_...)."""
    for table in BIG_TABLES:
        if index.startswith((f"ix_{table}_", f"uq_{table}_", f"pk_{table}")):
            return table
    return ""


def scan_concerns(backend: str, plan: list[str]) -> list[str]:
    """Reads of a big table in ``plan`` that walk the whole table or the whole partition:
    a full scan, or an index search whose only condition is ``partition_id`` (there is
    one partition, so that walks every row as well)."""
    found = []
    lines = [line.strip().removeprefix("->").strip() for line in plan]
    for k, s in enumerate(lines):
        if backend == "sqlite":
            words = s.split()
            if len(words) > 1 and words[1] in BIG_TABLES:
                if words[0] == "SCAN":
                    found.append(s)
                elif words[0] == "SEARCH" and s.endswith("(partition_id=?)"):
                    found.append(s + " = whole partition")
            continue
        if s.startswith("Seq Scan on ") and s.split()[3] in BIG_TABLES:
            found.append(s)
        elif s.startswith(("Index Scan", "Index Only Scan", "Bitmap Index Scan")):
            index = s.split(" on ")[-1].split()[0] if " on " in s else ""
            index = s.split(" using ")[1].split()[0] if " using " in s else index
            cond = lines[k + 1] if k + 1 < len(lines) else ""
            if _table_of_index(index) and cond == "Index Cond: (partition_id = $0)":
                found.append(f"{s} [{cond}] = whole partition")
    return found


# ----------------------------------------------------------------------------- backends


@dataclass
class Backend:
    name: str  # sqlite | postgresql
    url: str
    data: Path
    cleanup: Callable[[], None]
    describe: str


def sqlite_backend(tmp_root: str | None) -> Backend:
    data = Path(tempfile.mkdtemp(prefix="medlake-scale-", dir=tmp_root))
    path = data / "index.sqlite"
    return Backend(
        "sqlite",
        f"sqlite:///{path}",
        data,
        lambda: shutil.rmtree(data, ignore_errors=True),
        f"SQLite {sqlite_version()} file {path} (WAL, synchronous=NORMAL)",
    )


def sqlite_version() -> str:
    import sqlite3

    return sqlite3.sqlite_version


def pg_backend(admin_url: str, tmp_root: str | None) -> Backend:
    import psycopg

    name = f"medlake_scale_{secrets.token_hex(4)}"
    admin = make_url(admin_url).set(drivername="postgresql")
    conninfo = admin.render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
        version = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
        settings = {
            k: conn.execute(f"SHOW {k}").fetchone()[0]  # type: ignore[index]
            for k in ("shared_buffers", "work_mem", "synchronous_commit", "lc_collate")
        }
    url = admin.set(drivername="postgresql+psycopg", database=name)
    data = Path(tempfile.mkdtemp(prefix="medlake-scale-pg-", dir=tmp_root))

    def drop() -> None:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        shutil.rmtree(data, ignore_errors=True)

    return Backend("postgresql", url.render_as_string(hide_password=False), data, drop,
                   f"PostgreSQL {version} database {name} on {admin.host}:{admin.port or 5432} "
                   + " ".join(f"{k}={v}" for k, v in settings.items()))  # fmt: skip


def db_size_mb(backend: Backend, engine: sqlalchemy.Engine) -> float:
    if backend.name == "sqlite":
        return sum(p.stat().st_size for p in backend.data.glob("index.sqlite*")) / 1e6
    with engine.connect() as conn:
        return (
            float(conn.execute(text("SELECT pg_database_size(current_database())")).scalar_one())
            / 1e6
        )


# ----------------------------------------------------------------------------- run


class Out:
    """Figure lines to stdout and, with --out, to a file."""

    def __init__(self, path: str | None, append: bool = False) -> None:
        self.fh = open(path, "a" if append else "w") if path else None  # noqa: SIM115

    def line(self, s: str = "") -> None:
        print(s, flush=True)
        if self.fh:
            self.fh.write(s + "\n")
            self.fh.flush()

    def fig(self, name: str, value: float, unit: str, details: str = "") -> None:
        shown = f"{value:.3f}" if value < 10 else f"{value:.1f}"
        self.line(f"{name:<50} {shown:>9} {unit:<7} # {details}")

    def comment(self, s: str) -> None:
        self.line(f"# {s}")


class StatementTimer:
    """Wall time per SQL statement (first 110 characters), through engine events."""

    def __init__(self, engine: sqlalchemy.Engine) -> None:
        self.engine = engine
        self.stats: dict[str, list[float]] = {}
        self.on = False
        event.listen(engine, "before_cursor_execute", self._before)
        event.listen(engine, "after_cursor_execute", self._after)

    def _before(self, conn: Any, *_: Any) -> None:
        conn.info["scale_t0"] = time.perf_counter()

    def _after(self, conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if self.on:
            key = " ".join(statement.split())[:110]
            entry = self.stats.setdefault(key, [0, 0.0])
            entry[0] += 1
            entry[1] += time.perf_counter() - conn.info["scale_t0"]

    def close(self) -> None:
        event.remove(self.engine, "before_cursor_execute", self._before)
        event.remove(self.engine, "after_cursor_execute", self._after)


class Analyzer:
    """Emulates autovacuum's ANALYZE on a PostgreSQL server that has it off: re-analyze
    when the rows written since the last ANALYZE exceed 50 + 10 % of the table
    (autovacuum_analyze_threshold / _scale_factor defaults)."""

    def __init__(self, engine: sqlalchemy.Engine, mode: str) -> None:
        self.engine, self.mode = engine, mode
        self.at_last = 0
        self.count = 0
        self.seconds = 0.0

    def after_batch(self, done: int) -> None:
        if self.mode == "auto" and done - self.at_last > 50 + 0.1 * self.at_last:
            self.run(done)

    def run(self, done: int) -> None:
        t0 = time.perf_counter()
        with self.engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE")
        self.seconds += time.perf_counter() - t0
        self.count += 1
        self.at_last = done


def insert_all(archive: Archive, ds: Dataset, args: argparse.Namespace, out: Out,
               prefix: str) -> None:  # fmt: skip
    n, batch = ds.instances, args.batch
    n_batches = (n + batch - 1) // batch
    # profile a run of consecutive batches from the middle of the load (excluded from the rate)
    prof_from = n_batches // 2
    prof_to = prof_from + args.profile_batches
    profiler = cProfile.Profile() if args.profile_batches else None
    stmt_timer = StatementTimer(archive.engine) if args.profile_batches else None
    pg = archive.engine.dialect.name == "postgresql"
    analyzer = Analyzer(archive.engine, args.pg_analyze if pg else "none")
    db_time = gen_time = prof_time = 0.0
    timeline: list[tuple[int, float]] = []  # (counted instances done, cumulative db seconds)
    done = prof_n = 0
    rows = instance_rows(ds, DEFAULT_PARTITION)
    t_wall = time.perf_counter()
    columns = (
        TextColumn(f"[bold]{prefix}[/] insert"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:>7} inst/s"), TimeElapsedColumn(), TimeRemainingColumn(),
    )  # fmt: skip
    with Progress(*columns, console=err, refresh_per_second=2) as progress:
        task = progress.add_task("insert", total=n, rate="-")
        for b in range(n_batches):
            t0 = time.perf_counter()
            chunk = [r for _, r in zip(range(batch), rows, strict=False)]
            t1 = time.perf_counter()
            gen_time += t1 - t0
            profiling = profiler is not None and prof_from <= b < prof_to
            if profiling:
                stmt_timer.on = True  # type: ignore[union-attr]
                profiler.enable()  # type: ignore[union-attr]
            with archive.engine.begin() as conn:
                write_instances(conn, DEFAULT_PARTITION, chunk, {})
            if profiling:
                profiler.disable()  # type: ignore[union-attr]
                stmt_timer.on = False  # type: ignore[union-attr]
            dt_ = time.perf_counter() - t1
            done += len(chunk)
            if profiling:
                prof_time += dt_
                prof_n += len(chunk)
            else:
                db_time += dt_
                timeline.append((done - prof_n, db_time))
            analyzer.after_batch(done)
            rate = f"{(done - prof_n) / db_time:,.0f}" if db_time else "-"
            progress.update(task, advance=len(chunk), rate=rate)
    if analyzer.mode == "auto":
        analyzer.run(done)  # what autovacuum does within a minute of the load's end
    wall = time.perf_counter() - t_wall
    counted = done - prof_n
    details = (
        f"{counted} instances via write_instances, {batch}/transaction, {db_time:.1f}s in "
        f"transactions (wall {wall:.1f}s incl. {gen_time:.1f}s generating rows"
    )
    if prof_n:
        details += f", {prof_n} profiled instances excluded"
    if pg:
        details += (
            f"; ANALYZE {analyzer.count}x, {analyzer.seconds:.1f}s, not counted"
            if analyzer.mode == "auto"
            else "; never ANALYZEd (server has autovacuum off)"
        )
    out.fig(f"{prefix}.insert_inst_per_s", counted / db_time, "inst/s", details + ")")
    # rate over the first and the last 10 % of the load: does it slow down as tables grow?
    tenth = max(1, len(timeline) // 10)
    first = timeline[tenth - 1]
    last_start, last_end = timeline[-tenth - 1], timeline[-1]
    out.fig(f"{prefix}.insert_inst_per_s_first10pct", first[0] / first[1], "inst/s",
            f"first {first[0]} instances")  # fmt: skip
    out.fig(f"{prefix}.insert_inst_per_s_last10pct",
            (last_end[0] - last_start[0]) / (last_end[1] - last_start[1]), "inst/s",
            f"last {last_end[0] - last_start[0]} instances (tables near full size)")  # fmt: skip
    if profiler is not None and stmt_timer is not None and prof_n:
        stmt_timer.close()
        total_sql = sum(v[1] for v in stmt_timer.stats.values())
        out.comment(
            f"where write_instances spends its time, {prof_n} instances ({args.profile_batches} "
            f"batches from the middle of the load, {prof_n / prof_time:,.0f} inst/s under "
            f"cProfile): {prof_time:.2f}s, of which {total_sql:.2f}s waiting on SQL statements:"
        )
        for key, (count, secs) in sorted(stmt_timer.stats.items(), key=lambda kv: -kv[1][1])[:8]:
            out.comment(f"  {secs * 1000 / args.profile_batches:8.1f} ms/batch {count:5d}x  {key}")
        buf = io.StringIO()
        pstats.Stats(profiler, stream=buf).sort_stats("tottime").print_stats(12)
        out.comment("cProfile, top functions by own time:")
        for line in buf.getvalue().splitlines():
            if line.strip() and "Ordered by" not in line and "List reduced" not in line:
                out.comment("  " + line.rstrip().replace(str(ROOT) + "/", "")[:150])


def time_queries(
    archive: Archive,
    queries: list[Query],
    runs: int,
    out: Out,
    prefix: str,
    label: str,
    shown_plans: dict[str, list[str]] | None,
) -> dict[str, float]:
    """Time every query; print its plan unless ``shown_plans`` already has the same one."""
    medians: dict[str, float] = {}
    backend = archive.engine.dialect.name
    for q in queries:

        def full(q: Query = q) -> tuple[int, int]:
            res = run_search(archive, q.level, DEFAULT_PARTITION, q.params, study_uid=q.study_uid,
                             series_uid=q.series_uid, base_url=BASE_URL)  # fmt: skip
            orjson.dumps(res.datasets)
            return len(res.datasets), res.total

        query, _ = parse_query(q.level, DEFAULT_PARTITION, q.params, study_uid=q.study_uid,
                               series_uid=q.series_uid, extended={})  # fmt: skip

        def sql_only(query: Any = query) -> int:
            with archive.engine.connect() as conn:
                return len(search(conn, query).rows)

        ts, (n, total) = timed(full, runs)
        ts_sql, _ = timed(sql_only, runs)
        ok = n == q.expected_n and total == q.expected_total
        scans: list[str] = []
        plan_lines: list[str] = []
        for kind, stmt in zip(("count", "page"), qido_statements(q), strict=True):
            plan = explain(archive.engine, stmt)
            for found in scan_concerns(backend, plan):
                if kind == "count" and q.unfiltered:
                    found += " (inherent: counts the whole partition)"
                elif kind == "page" and not any("TEMP B-TREE" in x or "Sort" in x for x in plan):
                    found += " (in id order, stops after offset+limit rows)"
                scans.append(f"{kind}: {found}")
            plan_lines += [f"{kind}: {line}" for line in plan]
        med = statistics.median(ts)
        medians[q.name] = med
        verdict = "SCANS [" + "; ".join(scans) + "]" if scans else "index"
        out.fig(f"{prefix}.{label}.{q.name}_ms", med, "ms",
                f"p90={pctl(ts, 90):.1f} min={min(ts):.1f} sql={statistics.median(ts_sql):.1f} "
                f"{'' if len(ts) == runs else f'runs={len(ts)} (slow) '}"
                f"n={n} total={total} expected={q.expected_n}/{q.expected_total}"
                f"{'' if ok else ' MISMATCH'} plan={verdict} {q.shown()}")  # fmt: skip
        if shown_plans is not None:
            if shown_plans.get(q.name) == plan_lines:
                out.comment(f"    plan {q.name}: unchanged")
            else:
                for line in plan_lines:
                    out.comment(f"    plan {q.name} {line}")
            shown_plans[q.name] = plan_lines
    return medians


def time_locate(archive: Archive, ds: Dataset, runs: int, out: Out, prefix: str,
                label: str) -> None:  # fmt: skip
    """dicomweb.locate.find_instances (first step of WADO retrieve, metadata and frames):
    not a QIDO figure, but it joins the same tables the same way."""
    big = max(ds.studies, key=lambda st: (st.instances, st.uid))
    cases = [("study", (big.uid,), big.instances),
             ("series", (big.uid, big.series[0].uid), big.series[0].instances)]  # fmt: skip
    for name, uids, expected in cases:

        def run(uids: tuple[str, ...] = uids) -> int:
            with archive.engine.connect() as conn:
                return len(find_instances(conn, DEFAULT_PARTITION, *uids))

        ts, n = timed(run, runs)
        out.fig(f"{prefix}.{label}.{name}_ms", statistics.median(ts), "ms",
                f"p90={pctl(ts, 90):.1f} runs={len(ts)} n={n} expected={expected}"
                f"{'' if n == expected else ' MISMATCH'} find_instances() of the largest study"
                f"{'' if name == 'study' else ', its first series'}")  # fmt: skip


_ORIGINAL_BUILD_SELECT = qido_mod.build_select


def _build_select_all_partitions(query: QidoQuery) -> Select[Any]:
    """Prototype of a qido.py change: when the URL scopes the search to a study / series,
    also constrain ``studies.partition_id`` / ``series.partition_id``, so the unique
    (partition_id, study_uid) / (partition_id, series_uid) indexes find them."""
    stmt = _ORIGINAL_BUILD_SELECT(query)
    part = select(partitions.c.id).where(partitions.c.name == query.partition).scalar_subquery()
    if query.study_uid and query.level is not Level.STUDY:
        stmt = stmt.where(studies.c.partition_id == part)
    if query.series_uid and query.level is Level.INSTANCE:
        stmt = stmt.where(series.c.partition_id == part)
    return stmt


def _set_query_variant(on: bool) -> None:
    qido_mod.build_select = _build_select_all_partitions if on else _ORIGINAL_BUILD_SELECT


@dataclass
class Prototype:
    label: str
    what: str
    apply: Callable[[sqlalchemy.Engine], None]


def _sql(*statements: str) -> Callable[[sqlalchemy.Engine], None]:
    def apply(engine: sqlalchemy.Engine) -> None:
        with engine.begin() as conn:
            for statement in statements:
                conn.exec_driver_sql(statement)

    return apply


def _steps(*steps: Callable[[sqlalchemy.Engine], None]) -> Callable[[sqlalchemy.Engine], None]:
    def apply(engine: sqlalchemy.Engine) -> None:
        for step in steps:
            step(engine)

    return apply


# Prototypes tried with --try-indexes, one after the other on the loaded database (each
# says what it adds to or removes from the previous one). Nothing here touches schema.py,
# qido.py or database.py: indexes and statistics live in the benchmark database only, the
# query variant is monkeypatched into this process.
PROTOTYPES: dict[str, list[Prototype]] = {
    "sqlite": [
        Prototype(
            "qido_partq",
            "query variant only (no statistics): a search scoped to a study / series also "
            "constrains studies.partition_id / series.partition_id",
            lambda _e: _set_query_variant(True),
        ),
        Prototype(
            "qido_analyze",
            "ANALYZE only (sqlite_stat1 written; query variant off)",
            _steps(lambda _e: _set_query_variant(False), _sql("ANALYZE")),
        ),
        Prototype(
            "qido_analyze_partq",
            "ANALYZE + query variant",
            lambda _e: _set_query_variant(True),
        ),
    ],
    "postgresql": [
        Prototype(
            "qido_partq",
            "query variant: a search scoped to a study / series also constrains "
            "studies.partition_id / series.partition_id",
            lambda _e: _set_query_variant(True),
        ),
        Prototype(
            "qido_pattern_idx",
            "query variant + CREATE INDEX ix_proto_studies_name_pattern ON studies "
            "(partition_id, patient_name_search varchar_pattern_ops); ANALYZE studies "
            "(LIKE 'SMI%' cannot use the plain index: collation C.UTF-8 is not C)",
            _sql(
                "CREATE INDEX ix_proto_studies_name_pattern ON studies "
                "(partition_id, patient_name_search varchar_pattern_ops)",
                "ANALYZE studies",
            ),
        ),
    ],
}


def run_backend(backend: Backend, ds: Dataset, queries: list[Query], args: argparse.Namespace,
                out: Out) -> None:  # fmt: skip
    prefix = f"scale.{backend.name}"
    if backend.name == "postgresql" and args.pg_analyze == "none":
        prefix += "_noanalyze"  # not comparable with the figures of a normal server
    out.line()
    out.line(f"## {backend.name}: {backend.describe}")
    settings = Settings(data=backend.data, database_url=backend.url, fsync=False)
    archive = Archive.open(settings)
    try:
        insert_all(archive, ds, args, out, prefix)
        size = db_size_mb(backend, archive.engine)
        where = " (main file + WAL)" if backend.name == "sqlite" else ""
        out.fig(f"{prefix}.db_mb", size, "MB", f"index database size after the load{where}")
        with archive.engine.connect() as conn:
            if backend.name == "postgresql":
                stats = conn.exec_driver_sql(
                    "SELECT relname, n_live_tup, last_analyze IS NOT NULL OR "
                    "last_autoanalyze IS NOT NULL FROM pg_stat_user_tables WHERE relname IN "
                    "('studies','series','instances') ORDER BY relname"
                ).all()
                out.comment(
                    "planner statistics at query time (table, live rows, analyzed): "
                    + ", ".join(f"{r[0]} {r[1]} {r[2]}" for r in stats)
                )
            else:
                has_stat = conn.exec_driver_sql(
                    "SELECT count(*) FROM sqlite_master WHERE name='sqlite_stat1'"
                ).scalar()
                out.comment(
                    f"planner statistics (sqlite_stat1, i.e. ANALYZE run): {bool(has_stat)}"
                )
        plans: dict[str, list[str]] = {}
        before = time_queries(archive, queries, args.runs, out, prefix, "qido", plans)
        time_locate(archive, ds, args.runs, out, prefix, "locate")
        if args.try_indexes:
            for proto in PROTOTYPES[backend.name]:
                out.line()
                t0 = time.perf_counter()
                proto.apply(archive.engine)
                out.comment(f"prototype {proto.label}: {proto.what} "
                            f"(applied in {time.perf_counter() - t0:.1f}s)")  # fmt: skip
                after = time_queries(archive, queries, args.runs, out, prefix, proto.label, plans)
                time_locate(archive, ds, args.runs, out, prefix, proto.label + ".locate")
                out.comment(
                    f"{proto.label} vs qido (median ms): "
                    + ", ".join(f"{k} {before[k]:.1f}->{after[k]:.1f}" for k in before)
                )
    finally:
        _set_query_variant(False)
        archive.close()
        if args.keep:
            out.comment(f"kept: {backend.url} (data folder {backend.data})")
        else:
            backend.cleanup()


def header(args: argparse.Namespace, ds: Dataset, out: Out) -> None:
    import psycopg

    try:
        git = ["git", "-C", str(ROOT)]
        run = {"capture_output": True, "text": True, "check": True}
        commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], **run).stdout.strip()  # type: ignore[call-overload]
        dirty = subprocess.run([*git, "status", "--porcelain", "src"], **run).stdout  # type: ignore[call-overload]
        changed = sorted({line[3:] for line in dirty.splitlines() if line.strip()})
        commit += f" + uncommitted changes in {', '.join(changed)}" if changed else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "?"
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    osname = platform.platform()
    with contextlib.suppress(OSError, KeyError), open("/etc/os-release") as fh:
        release = dict(line.strip().split("=", 1) for line in fh if "=" in line)
        osname = release["PRETTY_NAME"].strip('"')
    now = dt.datetime.now(dt.UTC)
    out.comment("medlake index scale benchmark (benchmarks/scale_index.py)")
    out.comment(
        f"date: {now:%Y-%m-%dT%H:%M:%SZ}  host: {os.cpu_count()} cores, {mem:.0f} GiB, "
        f"{osname}, {platform.machine()}"
    )
    out.comment(
        f"medlake commit {commit}; python {platform.python_version()} sqlalchemy "
        f"{sqlalchemy.__version__} psycopg {psycopg.__version__} sqlite {sqlite_version()} "
        f"orjson {orjson.__version__}"
    )
    out.comment(f"dataset: {ds.describe()}")
    out.comment(f"command: {' '.join(sys.argv)}")
    out.comment(
        f"insert: write_instances, {args.batch} rows per transaction (engine.begin()), one "
        "connection, fresh database; rate = instances / seconds inside the transactions"
    )
    out.comment(
        f"qido: run_search (QIDO path minus HTTP, base_url set) + orjson.dumps; median of "
        f"{args.runs} after 1 warm-up, same process, warm cache; sql= is index.qido.search "
        "alone (count + page); plan=SCANS lists reads of a whole table or partition"
    )
    out.comment("format: <figure> <value> <unit>  # details")


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--instances", type=int, default=1_000_000)
    ap.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="both")
    ap.add_argument(
        "--pg-url",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="a database on the PostgreSQL server (used for CREATE/DROP DATABASE)",
    )
    ap.add_argument(
        "--pg-analyze",
        choices=["auto", "none"],
        default="auto",
        help="auto: ANALYZE like autovacuum would (for servers with autovacuum off); none: never",
    )
    ap.add_argument("--out", help="also write the figure lines to this file")
    ap.add_argument("--append", action="store_true", help="append to --out instead")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--tmp", help="folder for the SQLite database (default: system temp)")
    ap.add_argument(
        "--try-indexes",
        action="store_true",
        help="then apply prototype indexes / statistics / query variants and time again",
    )
    ap.add_argument(
        "--profile-batches",
        type=int,
        default=0,
        help="profile this many batches from the middle of the load (excluded from the rate)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the databases")
    args = ap.parse_args()

    t0 = time.perf_counter()
    ds = make_dataset(args.instances, args.seed)
    err.print(f"planned {ds.describe()} in {time.perf_counter() - t0:.1f}s")
    queries = make_queries(ds)
    out = Out(args.out, args.append)
    header(args, ds, out)
    for name in ("sqlite", "postgresql") if args.db == "both" else (args.db,):
        if name == "sqlite":
            backend = sqlite_backend(args.tmp)
        else:
            backend = pg_backend(args.pg_url, args.tmp)
        run_backend(backend, ds, queries, args, out)


if __name__ == "__main__":
    main()
