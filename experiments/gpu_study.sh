#!/usr/bin/env bash
# One wave of the study (RESULTS.md, issue 22) on the GPU machine, after ../shared/tools/gpu_stage.sh, from the
# repository root. Unpacks the runs carried in .study/PHASE-*.tgz (once per machine), runs the phase for at most
# DEADLINE seconds (12 runs at a time), then packs every run into $OUT/PHASE-*.tgz; bring those back into .study/
# (git-ignored) and carry .study with the next wave, on this machine or a new one.
#   bash experiments/gpu_study.sh pilot
set -euo pipefail
PHASE=$1; OUT=${OUT:-/tmp/out}; ROOT=${ROOT:-/root/study}
mkdir -p "$ROOT/$PHASE" "$OUT"
if [ ! -e "$ROOT/$PHASE/.unpacked" ]; then
  for pack in .study/"$PHASE"-*.tgz; do [ -f "$pack" ] && tar xzf "$pack" -C "$ROOT/$PHASE"; done
  touch "$ROOT/$PHASE/.unpacked"
fi
python3 experiments/study.py "$PHASE" --root "$ROOT" --data-dir /root/ilora-data/trace_500 \
  --model /root/ilora-model/smollm2-135m-instruct -j "${JOBS:-12}" --deadline "${DEADLINE:-540}" > "$OUT/$PHASE.log" 2>&1 || true
python3 experiments/study.py pack "$PHASE" "$OUT" --root "$ROOT"
tail -n 40 "$OUT/$PHASE.log"
