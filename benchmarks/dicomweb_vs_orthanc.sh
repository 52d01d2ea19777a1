#!/usr/bin/env bash
# medlake vs Orthanc, side by side, in one run (`make bench`):
#   1. the shared bench's Orthanc peer run           -> $OUT_DIR/orthanc.txt
#   2. the same STOW/QIDO/WADO/footprint phases
#      against a fresh, empty medlake                 -> $OUT_DIR/medlake.txt
#   3. dicomweb_bench.py compare + check_targets.py   -> $OUT_DIR/compare.txt, targets.txt
# Exit status: 0 only if every target of check_targets.py passes.
#
# The measuring code lives in the shared bench (../shared/bench) and is only
# *called* from here, so both servers are measured by exactly the same code.
#
# Environment [default]:
#   SHARED_BENCH        shared bench folder              [<repo>/../shared/bench]
#   DATASET             folder from make_dataset.py      [generated in BENCH_WORK]
#   OUT_DIR             where results go                 [<repo>/bench-results/<date-time>]
#   PYTHON              python with pydicom + requests   [<repo>/.venv/bin/python]
#   MEDLAKE_SERVE_ARGS  extra `medlake serve` args   [--insecure-no-auth: the peer is measured without auth too]
#   MEDLAKE_PORT        medlake HTTP port                [18142]
#   ORTHANC_RESULTS     reuse this Orthanc results file instead of running the peer
#                       (e.g. benchmarks/results/orthanc-<date>.txt; saves ~4 min)
#   BENCH_WORK          scratch (dataset, medlake data)  [mktemp -d; removed unless KEEP_WORK=1]
#   STUDIES SERIES INSTANCES PIXELS SEED: dataset shape, as orthanc_peer.sh takes them
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
SHARED_BENCH="${SHARED_BENCH:-$REPO/../shared/bench}"
[ -x "$SHARED_BENCH/measure.sh" ] || {
  echo "shared bench not found at $SHARED_BENCH (set SHARED_BENCH to the folder holding measure.sh)" >&2; exit 2; }
SHARED_BENCH="$(cd "$SHARED_BENCH" && pwd)"
export PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
PORT="${MEDLAKE_PORT:-18142}"
OUT_DIR="${OUT_DIR:-$REPO/bench-results/$(date +%F-%H%M)}"
mkdir -p "$OUT_DIR"

if [ -n "${BENCH_WORK:-}" ]; then mkdir -p "$BENCH_WORK"; OWN_WORK=0
else BENCH_WORK="$(mktemp -d -t medlake-bench.XXXXXX)"; OWN_WORK=1; fi
SERVER_PID=""
cleanup() {  # stop medlake on any exit (error, Ctrl-C), then drop scratch
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
  fi
  if [ "$OWN_WORK" = 1 ] && [ "${KEEP_WORK:-0}" != 1 ]; then rm -rf "$BENCH_WORK"; fi
}
trap cleanup EXIT

# One dataset for both servers: the figures are only comparable on identical data.
export DATASET="${DATASET:-$BENCH_WORK/dataset}"
if [ ! -f "$DATASET/manifest.json" ]; then
  echo "# generating dataset into $DATASET ..." >&2
  "$PYTHON" "$SHARED_BENCH/make_dataset.py" "$DATASET" --studies "${STUDIES:-20}" --series "${SERIES:-3}" \
    --instances "${INSTANCES:-50}" --pixels "${PIXELS:-realistic}" --seed "${SEED:-1}" >&2
fi

# 1. Orthanc peer. NAGLE_RUN=0: the Nagle-on C-STORE run costs ~2.5 min and is
#    no target here. Its own BENCH_WORK (mktemp) keeps its storage apart from ours.
if [ -n "${ORTHANC_RESULTS:-}" ]; then
  echo "# reusing Orthanc results $ORTHANC_RESULTS" >&2
  cp "$ORTHANC_RESULTS" "$OUT_DIR/orthanc.txt"
else
  echo "# running the Orthanc peer (~4 min) ..." >&2
  env -u BENCH_WORK NAGLE_RUN=0 "$SHARED_BENCH/orthanc_peer.sh" | tee "$OUT_DIR/orthanc.txt"
fi

# Let the disk settle first: the peer run ends by deleting its ~2 GB of storage, whose
# writeback and discards otherwise overlap medlake's STOW phase (measured 20 % slower).
sync; sleep "${SETTLE_SECONDS:-10}"

# 2. medlake on a fresh, empty data dir (the ingest phase needs an empty server).
if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then echo "port $PORT already in use" >&2; exit 1; fi
DATA="$BENCH_WORK/medlake-data"
rm -rf "$DATA"; mkdir -p "$DATA"
# shellcheck disable=SC2086  # MEDLAKE_SERVE_ARGS is a list of words on purpose
"$REPO/.venv/bin/medlake" serve --data "$DATA" --http-port "$PORT" --dimse-port 0 \
  ${MEDLAKE_SERVE_ARGS:---insecure-no-auth} >"$OUT_DIR/medlake-server.log" 2>&1 &
SERVER_PID=$!  # the console script is python itself, so this PID is the server (RSS, CPU)
for _ in $(seq 1 120); do
  [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/healthz")" = 200 ] && break
  kill -0 "$SERVER_PID" 2>/dev/null || { echo "medlake exited; log:" >&2; tail -20 "$OUT_DIR/medlake-server.log" >&2; exit 1; }
  sleep 0.5
done
[ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/healthz")" = 200 ] || {
  echo "medlake did not answer /healthz with 200 within 60 s" >&2; exit 1; }

echo "# running the same phases against medlake ..." >&2
{
  echo "# DICOM server side-by-side: medlake"
  echo "# date: $(date -u +%FT%TZ)  host: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo)  medlake: $(git -C "$REPO" describe --always --dirty 2>/dev/null || echo '?')  serve args: ${MEDLAKE_SERVE_ARGS:---insecure-no-auth}"
  echo "# dataset: $DATASET"
  echo
  echo "## medlake: fresh data dir, STOW-RS ingest, then reads"
} >"$OUT_DIR/medlake.txt"
# A failed phase (e.g. verify MISMATCH) stops measure.sh; keep going so the
# summary still shows which figures are missing, and fail at the end.
measure_rc=0
DICOMWEB_URL="http://127.0.0.1:$PORT/dicomweb" SERVER_PID="$SERVER_PID" STORAGE_DIRS="data=$DATA" \
  "$SHARED_BENCH/measure.sh" stow verify qido wado footprint | tee -a "$OUT_DIR/medlake.txt" || measure_rc=$?
kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=""

# 3. Side-by-side table, then the issue's targets.
echo
"$PYTHON" "$SHARED_BENCH/dicomweb_bench.py" compare "$OUT_DIR/orthanc.txt" "$OUT_DIR/medlake.txt" | tee "$OUT_DIR/compare.txt"
echo
echo "## targets (medlake vs Orthanc)"
targets_rc=0
"$PYTHON" "$REPO/benchmarks/check_targets.py" "$OUT_DIR/orthanc.txt" "$OUT_DIR/medlake.txt" | tee "$OUT_DIR/targets.txt" || targets_rc=$?
[ "$measure_rc" = 0 ] || echo "measure.sh against medlake failed (rc=$measure_rc): see $OUT_DIR/medlake.txt" >&2
echo "# results in $OUT_DIR"
[ "$measure_rc" = 0 ] && [ "$targets_rc" = 0 ]
