#!/usr/bin/env bash
# medlake's DIMSE gateway vs Orthanc, in one run (`make bench-dimse`):
#   1. Orthanc's figures: the shared bench's Orthanc peer run      -> $OUT_DIR/orthanc.txt
#      (or ORTHANC_RESULTS, a results file of an earlier peer run)
#   2. a fresh, empty `medlake serve` with DIMSE on: measure.sh cstore verify (dcmtk
#      storescu, one association, TCP_NODELAY=1), the QIDO-RS set, and the same
#      queries as C-FIND (dimse_find_latency.py)                  -> $OUT_DIR/dimse.txt
#   3. the ceiling: pynetdicom storing nothing + one durable write  -> $OUT_DIR/dimse.txt
#      (benchmarks/dimse_floor.py)
#   4. the target: C-STORE instances/s >= 2 x Orthanc's            -> $OUT_DIR/targets.txt
# Exit status: 0 only if the target passes and every answer count was right.
#
# Environment [default]:
#   SHARED_BENCH     shared bench folder               [<repo>/../shared/bench]
#   DATASET          folder from make_dataset.py       [generated in BENCH_WORK]
#   OUT_DIR          results folder                    [<repo>/bench-results/dimse-<date-time>]
#   PYTHON           python with pydicom, pynetdicom, requests   [<repo>/.venv/bin/python]
#   MEDLAKE_PORT     medlake's HTTP port               [18143]
#   DIMSE_PORT       medlake's DIMSE port              [18112]
#   ORTHANC_RESULTS  reuse this Orthanc results file instead of running the peer (~4 min)
#   RUNS             repeats of each query (median)    [20]
#   PROFILE=1        record the server with py-spy during the C-STORE phase
#                    (-> $OUT_DIR/cstore-pyspy.txt, collapsed stacks; slows it a little)
#   MEDLAKE_SERVE_ARGS  extra `medlake serve` arguments   [--insecure-no-auth]
#   BENCH_WORK, KEEP_WORK=1   scratch (dataset, medlake data)   [mktemp -d, removed]
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
SHARED_BENCH="${SHARED_BENCH:-$REPO/../shared/bench}"
[ -x "$SHARED_BENCH/measure.sh" ] || {
  echo "shared bench not found at $SHARED_BENCH (set SHARED_BENCH)" >&2; exit 2; }
SHARED_BENCH="$(cd "$SHARED_BENCH" && pwd)"
export PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
PORT="${MEDLAKE_PORT:-18143}"
DPORT="${DIMSE_PORT:-18112}"
RUNS="${RUNS:-20}"
OUT_DIR="${OUT_DIR:-$REPO/bench-results/dimse-$(date +%F-%H%M)}"
mkdir -p "$OUT_DIR"
if [ -n "${BENCH_WORK:-}" ]; then mkdir -p "$BENCH_WORK"; OWN_WORK=0
else BENCH_WORK="$(mktemp -d -t medlake-dimse-bench.XXXXXX)"; OWN_WORK=1; fi
SERVER_PID=""
cleanup() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
  fi
  if [ "$OWN_WORK" = 1 ] && [ "${KEEP_WORK:-0}" != 1 ]; then rm -rf "$BENCH_WORK"; fi
}
trap cleanup EXIT

export DATASET="${DATASET:-$BENCH_WORK/dataset}"
if [ ! -f "$DATASET/manifest.json" ]; then
  echo "# generating dataset into $DATASET ..." >&2
  "$PYTHON" "$SHARED_BENCH/make_dataset.py" "$DATASET" >&2
fi

# 1. Orthanc. NAGLE_RUN=0: the Nagle-on run is no target here.
if [ -n "${ORTHANC_RESULTS:-}" ]; then
  echo "# reusing Orthanc results $ORTHANC_RESULTS" >&2
  cp "$ORTHANC_RESULTS" "$OUT_DIR/orthanc.txt"
else
  echo "# running the Orthanc peer (~4 min) ..." >&2
  env -u BENCH_WORK NAGLE_RUN=0 "$SHARED_BENCH/orthanc_peer.sh" >"$OUT_DIR/orthanc.txt"
fi

# 2. medlake, fresh and empty (C-STORE ingest needs an empty server).
for p in "$PORT" "$DPORT"; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "port $p already in use" >&2; exit 1; fi
done
DATA="$BENCH_WORK/medlake-data"
rm -rf "$DATA"; mkdir -p "$DATA"
# shellcheck disable=SC2086  # MEDLAKE_SERVE_ARGS is a list of words on purpose
"$REPO/.venv/bin/medlake" serve --data "$DATA" --http-port "$PORT" --dimse-port "$DPORT" \
  ${MEDLAKE_SERVE_ARGS:---insecure-no-auth} >"$OUT_DIR/medlake-server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 120); do
  if [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/healthz")" = 200 ] &&
     echoscu -aet BENCHSCU -aec MEDLAKE 127.0.0.1 "$DPORT" >/dev/null 2>&1; then break; fi
  kill -0 "$SERVER_PID" 2>/dev/null || { echo "medlake exited:" >&2; tail -20 "$OUT_DIR/medlake-server.log" >&2; exit 1; }
  sleep 0.5
done

RESULTS="$OUT_DIR/dimse.txt"
{
  echo "# DIMSE gateway: medlake vs Orthanc"
  echo "# date: $(date -u +%FT%TZ)  host: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo)  medlake: $(git -C "$REPO" describe --always --dirty 2>/dev/null || echo '?')  pynetdicom: $("$PYTHON" -c 'import pynetdicom; print(pynetdicom.__version__)')  dcmtk: $(dpkg-query -W -f '${Version}' dcmtk 2>/dev/null || echo '?')"
  echo "# dataset: $DATASET ($("$PYTHON" -c 'import json,sys; m=json.load(open(sys.argv[1])); print(m["n_instances"], "instances,", round(m["total_bytes"]/1e6), "MB")' "$DATASET/manifest.json"))"
  echo "# orthanc figures: $( [ -n "${ORTHANC_RESULTS:-}" ] && echo "from $ORTHANC_RESULTS" || echo "peer run of this run (orthanc.txt)")"
  echo "# format: <figure> <value> <unit>  # details"
  echo
  echo "## medlake: fresh data dir, C-STORE ingest (storescu, 1 association), then reads"
} >"$RESULTS"

PROFILER=""
if [ "${PROFILE:-0}" = 1 ]; then
  "$REPO/.venv/bin/py-spy" record -p "$SERVER_PID" -f raw -r 200 --subprocesses \
    -o "$OUT_DIR/cstore-pyspy.txt" >/dev/null 2>&1 &
  PROFILER=$!
  sleep 1
fi
rc=0
DICOMWEB_URL="http://127.0.0.1:$PORT/dicomweb" DIMSE_PORT="$DPORT" DIMSE_AET=MEDLAKE \
  SERVER_PID="$SERVER_PID" "$SHARED_BENCH/measure.sh" cstore | tee -a "$RESULTS" || rc=$?
if [ -n "$PROFILER" ]; then kill -INT "$PROFILER" 2>/dev/null || true; wait "$PROFILER" 2>/dev/null || true; fi
DICOMWEB_URL="http://127.0.0.1:$PORT/dicomweb" SERVER_PID="$SERVER_PID" RUNS="$RUNS" \
  "$SHARED_BENCH/measure.sh" verify qido | tee -a "$RESULTS" || rc=$?
"$PYTHON" "$REPO/benchmarks/dimse_find_latency.py" 127.0.0.1 "$DPORT" MEDLAKE "$DATASET" --runs "$RUNS" \
  | tee -a "$RESULTS" || rc=$?
kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=""
{ echo; echo "## the ceiling on this machine: pynetdicom storing nothing, and one durable write"; } >>"$RESULTS"
"$PYTHON" "$REPO/benchmarks/dimse_floor.py" "$DATASET" "$BENCH_WORK" | tee -a "$RESULTS" || rc=$?

# 4. The target, from both files.
fig_of() { awk -v f="$1" '$1 == f { print $2; exit }' "$2"; }
ours="$(fig_of cstore.inst_per_s "$RESULTS")"
theirs="$(fig_of cstore.inst_per_s "$OUT_DIR/orthanc.txt")"
{
  echo
  echo "## medlake vs Orthanc"
  ratio="$(awk -v a="$ours" -v b="$theirs" 'BEGIN { printf "%.2f", a / b }')"
  printf '%-34s %12s %-10s  # %s\n' compare.cstore_vs_orthanc "$ratio" ratio \
    "medlake $ours inst/s / Orthanc $theirs inst/s (storescu, TCP_NODELAY=1, 1 association)"
  ceiling="$(fig_of floor.ceiling.inst_per_s "$RESULTS")"
  printf '%-34s %12s %-10s  # %s\n' compare.ceiling_vs_orthanc \
    "$(awk -v a="$ceiling" -v b="$theirs" 'BEGIN { printf "%.2f", a / b }')" ratio \
    "the most a pynetdicom SCP storing durably could reach here / Orthanc"
  for q in studies_by_patientid studies_by_date_range studies_by_name_wildcard series_by_modality instances_of_series; do
    printf '%-34s %12s %-10s  # %s\n' "compare.cfind_vs_qido.$q" \
      "$(awk -v a="$(fig_of "cfind.${q}_ms" "$RESULTS")" -v b="$(fig_of "qido.${q}_ms" "$RESULTS")" 'BEGIN { printf "%.2f", a / b }')" \
      ratio "medlake C-FIND / medlake QIDO-RS, same query"
  done
} | tee -a "$RESULTS"
{
  if awk -v a="$ours" -v b="$theirs" 'BEGIN { exit !(a >= 2 * b) }'; then
    echo "PASS cstore.inst_per_s: medlake $ours >= 2 x Orthanc $theirs"
  else
    echo "FAIL cstore.inst_per_s: medlake $ours < 2 x Orthanc $theirs (= $(awk -v b="$theirs" 'BEGIN { printf "%.1f", 2 * b }'))"; rc=1
  fi
  if grep -q MISMATCH "$RESULTS"; then echo "FAIL answer counts: see MISMATCH in dimse.txt"; rc=1; fi
} | tee "$OUT_DIR/targets.txt"
grep -q '^FAIL' "$OUT_DIR/targets.txt" && rc=1
echo "# results in $OUT_DIR"
exit "$rc"
