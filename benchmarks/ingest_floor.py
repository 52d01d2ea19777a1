#!/usr/bin/env python3
"""The copy-mode ingest ceiling on this machine: copying and hashing the files, nothing else.

A bulk ingest in copy mode cannot do less than read every source file, hash it
(SHA-256, the lake's content digest) and write the copy, then make the copies
durable. This measures exactly that, in the same number of processes as
``medlake ingest`` uses by default (one per core), with the processes already
started and every file already in the page cache:

* each process reads a file into one reused buffer, hashes it, writes the copy
  and starts its writeback (``sync_file_range``), as ``medlake ingest`` does;
* one ``syncfs`` at the end, as ``cp -r`` + ``sync``.

No header parse, no index, no work queue, no Python start-up: ``medlake ingest`` in
copy mode can only be slower. Its instances/s, divided by Orthanc's STOW-RS rate, is
the largest ratio any copy-mode ingest could show here.

Usage: ingest_floor.py SOURCE_FOLDER SCRATCH_FOLDER [--workers N] [--runs 3]
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import mmap
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

_LIBC = ctypes.CDLL(None, use_errno=True)
_SYNC_FILE_RANGE_WRITE = 2


def _copy_share(paths: list[str], target: str) -> int:
    """Copy and hash ``paths`` into ``target``; returns the bytes copied."""
    buffer = mmap.mmap(-1, 1 << 20)
    view = memoryview(buffer)
    copied = 0
    for i, path in enumerate(paths):
        digest = hashlib.sha256()
        src = os.open(path, os.O_RDONLY)
        out = os.open(
            os.path.join(target, f"{os.getpid()}-{i}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        )
        try:
            while n := os.readv(src, [buffer]):
                digest.update(view[:n])
                written = 0
                while written < n:
                    written += os.write(out, view[written:n])
                copied += n
            _LIBC.sync_file_range(out, ctypes.c_int64(0), ctypes.c_int64(0), _SYNC_FILE_RANGE_WRITE)
        finally:
            os.close(out)
            os.close(src)
        digest.hexdigest()
    view.release()
    buffer.close()
    return copied


def _noop() -> None:
    return None


def copy_floor(source: Path, scratch: Path, workers: int, runs: int = 3) -> list[float]:
    """Seconds to copy and hash every file of ``source`` and sync them, ``runs`` times."""
    paths = sorted(str(p) for p in source.rglob("*") if p.is_file())
    times = []
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        for future in [pool.submit(_noop) for _ in range(workers)]:
            future.result()  # every process started before the clock starts
        for run in range(runs):
            target = scratch / f"floor-{run}"
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            subprocess.run(["sync"], check=True)
            start = time.perf_counter()
            shares = [
                pool.submit(_copy_share, paths[i::workers], str(target)) for i in range(workers)
            ]
            for share in shares:
                share.result()
            fd = os.open(target, os.O_RDONLY)
            try:
                if _LIBC.syncfs(fd) != 0:
                    raise OSError(ctypes.get_errno(), "syncfs failed")
            finally:
                os.close(fd)
            times.append(time.perf_counter() - start)
    return times  # the copies stay until the benchmark ends (see ingest_bench.settle)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", type=Path)
    ap.add_argument("scratch", type=Path)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    files = sum(1 for p in args.source.rglob("*") if p.is_file())
    times = copy_floor(args.source, args.scratch, args.workers, args.runs)
    median = statistics.median(times)
    print(
        f"floor.copy_hash_inst_per_s {files / median:.1f} inst/s  # {files} files, "
        f"{args.workers} processes, median of {' '.join(f'{t:.3f}' for t in times)} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
