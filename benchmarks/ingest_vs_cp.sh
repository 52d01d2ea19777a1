#!/usr/bin/env bash
# Bulk ingest (`make bench-ingest`): `medlake ingest` vs `cp -r` + `sync` of the same files in
# the same run, vs Orthanc's STOW-RS rate, and 100,000 small files with memory sampled at
# 10k / 50k / 100k files. The measuring code is benchmarks/ingest_bench.py.
#
# Environment [default]:
#   DATASET         make_dataset.py folder (3000 files, ~1 GB)   [generated in BENCH_WORK]
#   SMALL_DATASET   make_dataset.py --pixels native folder        [generated in BENCH_WORK]
#   SMALL_STUDIES   studies of the small dataset (x 10 series x 100 instances)   [100]
#   SKIP_SMALL=1    skip the 100,000-file phase (~10 min with its generation)
#   ORTHANC_RESULTS Orthanc results file with stow.inst_per_s    [benchmarks/results/orthanc-2026-11-24.txt]
#   OUT             results file                                 [bench-results/ingest-<date-time>.txt]
#   SHARED_BENCH    shared bench folder (make_dataset.py)         [<repo>/../shared/bench]
#   PYTHON          python with pydicom                           [<repo>/.venv/bin/python]
#   BENCH_WORK      scratch: datasets, copies, medlake data dirs  [mktemp -d; removed unless KEEP_WORK=1]
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
SHARED_BENCH="${SHARED_BENCH:-$REPO/../shared/bench}"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
ORTHANC_RESULTS="${ORTHANC_RESULTS:-$REPO/benchmarks/results/orthanc-2026-11-24.txt}"
OUT="${OUT:-$REPO/bench-results/ingest-$(date +%F-%H%M).txt}"

if [ -n "${BENCH_WORK:-}" ]; then mkdir -p "$BENCH_WORK"; OWN_WORK=0
else BENCH_WORK="$(mktemp -d -t medlake-ingest-bench.XXXXXX)"; OWN_WORK=1; fi
cleanup() { if [ "$OWN_WORK" = 1 ] && [ "${KEEP_WORK:-0}" != 1 ]; then rm -rf "$BENCH_WORK"; fi; }
trap cleanup EXIT

DATASET="${DATASET:-$BENCH_WORK/dataset}"
if [ ! -f "$DATASET/manifest.json" ]; then
  echo "# generating the 3000-file dataset into $DATASET ..." >&2
  "$PYTHON" "$SHARED_BENCH/make_dataset.py" "$DATASET" >&2
fi
SMALL_ARGS=(--skip-small)
if [ "${SKIP_SMALL:-0}" != 1 ]; then
  SMALL_DATASET="${SMALL_DATASET:-$BENCH_WORK/small}"
  if [ ! -f "$SMALL_DATASET/manifest.json" ]; then
    echo "# generating $(( ${SMALL_STUDIES:-100} * 1000 )) small files into $SMALL_DATASET ..." >&2
    "$PYTHON" "$SHARED_BENCH/make_dataset.py" "$SMALL_DATASET" --studies "${SMALL_STUDIES:-100}" \
      --series 10 --instances 100 --pixels native >&2
  fi
  SMALL_ARGS=(--small-dataset "$SMALL_DATASET")
fi
"$PYTHON" "$REPO/benchmarks/ingest_bench.py" --dataset "$DATASET" --work "$BENCH_WORK/run" \
  --orthanc "$ORTHANC_RESULTS" "${SMALL_ARGS[@]}" --out "$OUT"
echo "# results: $OUT" >&2
