#!/usr/bin/env bash
# One wave of a phase of the study (RESULTS.md, issue 22) on the GPU machine, after ../shared/tools/gpu_stage.sh,
# from the repository root. Unpacks the runs carried in .study/FOLDER-*.tgz (once per machine), runs the phase for
# at most DEADLINE seconds (12 runs at a time), then packs every run of the phase into $OUT/FOLDER-*.tgz; bring
# those back into .study/ (git-ignored) and carry .study with the next wave, on this machine or a new one. FOLDER is
# the phase's folder (screen for lr and grid). Later phases read the decisions of earlier ones from the committed
# results under experiments/results/study/.
#   bash experiments/gpu_study.sh pilot
set -euo pipefail
PHASE=$1; OUT=${OUT:-/tmp/out}; ROOT=${ROOT:-/root/study}
case $PHASE in lr|grid) FOLDER=screen;; *) FOLDER=$PHASE;; esac
DATA=/root/ilora-data/trace_500
mkdir -p "$ROOT/$FOLDER" "$OUT"
if [ ! -e "$ROOT/$FOLDER/.unpacked" ]; then
  for pack in .study/"$FOLDER"-*.tgz; do [ -f "$pack" ] && tar xzf "$pack" -C "$ROOT/$FOLDER"; done
  touch "$ROOT/$FOLDER/.unpacked"
fi
python3 experiments/study.py "$PHASE" --root "$ROOT" --data-dir "$DATA" \
  --model /root/ilora-model/smollm2-135m-instruct -j "${JOBS:-12}" --deadline "${DEADLINE:-540}" > "$OUT/$PHASE.log" 2>&1 || true
python3 experiments/study.py pack "$PHASE" "$OUT" --root "$ROOT" --data-dir "$DATA"
tail -n 40 "$OUT/$PHASE.log"
