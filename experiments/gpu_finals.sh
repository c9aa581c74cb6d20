#!/usr/bin/env bash
# Issue 14: the TRACE-8 finals of the three chosen settings (4 seeds each) again, now scored with TRACE's exact
# scorers and with every prediction kept. The sweep results are copied in so that trace8.py picks the same
# settings; repeat the command until every run is done (a run stopped at the deadline resumes). Leaves
# $OUT/finals.tgz (config.json, results.json, predictions.parquet and log.txt of every run) and prints the table.
set -euo pipefail
OUT=${OUT:-/tmp/out}; ROOT=${ROOT:-/root/t8x}; mkdir -p "$OUT" "$ROOT"
[ -d "$ROOT/sweep" ] || cp -r experiments/results/trace8/sweep "$ROOT/"
[ -d .t8x/final ] && cp -rn .t8x/final "$ROOT/"  # finished runs of an earlier command (in .t8x), skipped by trace8.py
python3 experiments/trace8.py final --seeds 0,1,2,3 --root "$ROOT" --data-dir /root/ilora-data/trace_500 \
  --model /root/ilora-model/smollm2-135m-instruct -j "${JOBS:-8}" --deadline "${DEADLINE:-520}" ${EXTRA:+--extra "$EXTRA"} \
  > "$OUT/finals.log" 2>&1 || true
tail -n 12 "$OUT/finals.log"
tar czf "$OUT/finals.tgz" -C "$ROOT" --exclude=checkpoint.pt --exclude='task_*' final
