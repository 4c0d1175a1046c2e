#!/usr/bin/env bash
# Run the whole test suite N times in a row while stress-ng keeps cores busy (all of them by default;
# STRESS_WORKERS=1 for one), as on a shared CI machine; print one line per run and keep each run's log.
# A flaky test shows up here before it stops a submission.
# Usage: [STRESS_WORKERS=N] tools/stress_suite.sh [RUNS=5] [LOG_DIR=stress_logs]
# (needs stress-ng: apt-get install stress-ng; run `make install` first)
set -uo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}
logs=${2:-stress_logs}
mkdir -p "$logs"
command -v stress-ng >/dev/null || { echo "stress-ng not installed (apt-get install stress-ng)" >&2; exit 2; }
workers=${STRESS_WORKERS:-$(nproc)}
echo "stress-ng --cpu $workers on $(nproc) cores; $runs runs of the suite"
stress-ng --cpu "$workers" --timeout 0 --quiet &
stress=$!
trap 'kill $stress 2>/dev/null; wait $stress 2>/dev/null' EXIT
failed=0
for i in $(seq 1 "$runs"); do
  start=$(date +%s)
  .venv/bin/python -m pytest -q -p no:cacheprovider >"$logs/run$i.log" 2>&1
  rc=$?
  echo "run $i/$runs: exit $rc in $(( $(date +%s) - start )) s: $(tail -n 1 "$logs/run$i.log")"
  grep -E "^(FAILED|ERROR) " "$logs/run$i.log" || true
  [ $rc -eq 0 ] || failed=$((failed + 1))
done
echo "$failed of $runs runs failed (logs in $logs/)"
[ $failed -eq 0 ]
