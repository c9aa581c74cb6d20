#!/usr/bin/env bash
# One wave of a phase of the study (RESULTS.md, issue 22) on the GPU machine, after ../shared/tools/gpu_stage.sh,
# from the repository root. Unpacks the runs carried in .study/FOLDER-*.tgz (once per machine), runs the phase for
# at most DEADLINE seconds (12 runs at a time on each GPU the machine has), then packs every run of the phase into
# $OUT/FOLDER-*.tgz; bring those back into .study/ (git-ignored) and carry .study with the next wave, on this machine
# or a new one. FOLDER is the phase's folder (screen for lr and grid). Later phases read the decisions of earlier
# ones from the committed results under experiments/results/study/. On a machine of several GPUs the first wave
# also runs the built-in demo once on GPU 0 and once on GPU 1 and compares the bits ($OUT/gpu-check.txt): a run
# stopped on one GPU may resume on the other.
#   bash experiments/gpu_study.sh pilot
set -euo pipefail
PHASE=$1; OUT=${OUT:-/tmp/out}; ROOT=${ROOT:-/root/study}
case $PHASE in lr|grid) FOLDER=screen;; *) FOLDER=$PHASE;; esac
DATA=/root/ilora-data/trace_500
GPUS=$(nvidia-smi -L | wc -l)
mkdir -p "$ROOT/$FOLDER" "$OUT"
if [ ! -e "$ROOT/$FOLDER/.unpacked" ]; then
  for pack in .study/"$FOLDER"-*.tgz; do [ -f "$pack" ] && tar xzf "$pack" -C "$ROOT/$FOLDER"; done
  touch "$ROOT/$FOLDER/.unpacked"
fi
MODEL=/root/ilora-model/smollm2-135m-instruct
CHECK=$ROOT/gpu-check
if [ "$GPUS" -gt 1 ] && [ ! -e "$CHECK" ]; then
  for g in 0 1; do
    CUDA_VISIBLE_DEVICES=$g python3 ilora.py --model $MODEL --out "$CHECK/$g" > "$CHECK-$g.log" 2>&1 &
  done
fi
python3 experiments/study.py "$PHASE" --root "$ROOT" --data-dir "$DATA" --model $MODEL \
  -j "${JOBS:-$((12 * GPUS))}" --gpus "$GPUS" --deadline "${DEADLINE:-540}" > "$OUT/$PHASE.log" 2>&1 || true
if [ "$GPUS" -gt 1 ] && [ ! -e "$OUT/gpu-check.txt" ] && [ -e "$CHECK/1" ]; then
  wait
  python3 - "$CHECK" > "$OUT/gpu-check.txt" 2>&1 <<'PY' || true
import json, pathlib, sys
check = pathlib.Path(sys.argv[1])
R = [json.loads((check / g / "results.json").read_text())["R"] for g in "01"]
adapters = [(check / g / "task_8/slow/adapter_model.safetensors").read_bytes() for g in "01"]
print(f"R on GPU 0 and GPU 1 identical: {R[0] == R[1]}; slow adapters after task 8 identical: {adapters[0] == adapters[1]}")
print(json.dumps(R[0]))
PY
  cp "$CHECK"-?.log "$OUT/" || true
fi
python3 experiments/study.py pack "$PHASE" "$OUT" --root "$ROOT" --data-dir "$DATA"
tail -n 40 "$OUT/$PHASE.log"
