#!/usr/bin/env bash
# A phase of the study (RESULTS.md, issue 22) on the GPU machine, after ../shared/tools/gpu_stage.sh, from the
# repository root; the same command again and again until the phase is done. Each run of it unpacks the runs sent in
# .study/FOLDER-*.tgz (each pack once per machine, known by its checksum); starts the phase, unless it is still
# running from an earlier command on this machine, detached from the command and from the working tree (a copy of
# ilora.py and experiments/ under $ROOT/code), JOBS runs at a time (12 a GPU), for at most RUN_FOR seconds; waits
# WAIT seconds or until the phase ends; then packs every run of the phase (study.py pack: finished runs, and the
# last task-boundary checkpoint of unfinished ones) into $ROOT/packs and moves into $OUT as many packs as one command
# brings back (8 files, 64 MiB, with the log); the rest wait there for `more`. So runs go on between commands while
# the machine is held; a machine given back loses only what its runs did since their last finished task, and the
# packs resume them on the next machine (send them in .study; packs over what one command takes go in commands of
# their own first, `unpack`). FOLDER is the phase's folder (screen for lr and grid). Later phases read the
# decisions of earlier ones from the committed results under experiments/results/study/. On a machine of several
# GPUs the phase's start also runs the built-in demo once on GPU 0 and once on GPU 1 and compares the bits
# ($OUT/gpu-check.txt): a run stopped on one GPU may resume on the other.
#   WAIT=500 bash experiments/gpu_study.sh lr   # start or follow the phase, pack after 500 s
#   bash experiments/gpu_study.sh lr more       # the packs the last command could not bring back
#   bash experiments/gpu_study.sh lr unpack     # unpack the .study sent along, only
#   bash experiments/gpu_study.sh lr stop       # stop the phase's runs now (their checkpoints stay)
#   MPS=0 WAIT=500 bash experiments/gpu_study.sh lr   # start no MPS server (the default runs a phase through one:
#                                                     gpu_speed.sh mps, BENCHMARKS.md); one already running still
#                                                     serves the runs: echo quit | nvidia-cuda-mps-control
set -euo pipefail
PHASE=$1; STEP=${2:-wave}; OUT=${OUT:-/tmp/out}; ROOT=${ROOT:-/root/study}
case $PHASE in lr|grid) FOLDER=screen;; *) FOLDER=$PHASE;; esac
DATA=/root/ilora-data/trace_500
PACKS=$ROOT/packs
mkdir -p "$ROOT/$FOLDER" "$OUT"

unpack() {
  for pack in .study/"$FOLDER"-*.tgz; do
    [ -f "$pack" ] || continue
    local sum; sum=$(sha1sum < "$pack" | cut -c1-40)
    if [ ! -e "$ROOT/$FOLDER/.unpacked-$sum" ]; then
      tar xzf "$pack" -C "$ROOT/$FOLDER"
      touch "$ROOT/$FOLDER/.unpacked-$sum"
      echo "unpacked $pack"
    fi
  done
}

send() {  # move packs from $PACKS into $OUT while $OUT stays within 8 files and 63 MiB
  local files bytes size pack
  files=$(find "$OUT" -type f | wc -l)
  bytes=$(du -cb "$OUT" | tail -n 1 | cut -f1)
  for pack in $(ls "$PACKS" | sort -V); do
    size=$(stat -c %s "$PACKS/$pack")
    if [ $((files + 1)) -le 8 ] && [ $((bytes + size)) -le $((63 << 20)) ]; then
      mv "$PACKS/$pack" "$OUT/"
      files=$((files + 1)); bytes=$((bytes + size))
    fi
  done
  local left; left=$(ls "$PACKS" | wc -l)
  if [ "$left" -gt 0 ]; then
    echo "$left packs left on this machine: bash experiments/gpu_study.sh $PHASE more"
  else
    echo "every pack is in \$OUT"
  fi
}

case $STEP in
  unpack) unpack; exit ;;
  more) send; exit ;;
  stop) [ -e "$ROOT/$PHASE.pid" ] && kill -TERM -- -"$(cat "$ROOT/$PHASE.pid")" 2>/dev/null; exit 0 ;;
  wave) ;;
  *) echo "gpu_study.sh: unknown step '$STEP' (more, unpack or stop; none for a wave)" >&2; exit 2 ;;
esac

unpack
GPUS=$(nvidia-smi -L | wc -l)
MODEL=/root/ilora-model/smollm2-135m-instruct
PID=$ROOT/$PHASE.pid
pid=$(cat "$PID" 2>/dev/null || true)  # the phase's process group, started by an earlier call on this machine
if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
  echo "following the $PHASE runs started by an earlier call"
else
  rm -rf "$ROOT/code" && mkdir -p "$ROOT/code" && cp -r ilora.py experiments "$ROOT/code/"
  CHECK=$ROOT/gpu-check
  if [ "$GPUS" -gt 1 ] && [ ! -e "$CHECK" ]; then
    ( cd "$ROOT/code"
      for g in 0 1; do CUDA_VISIBLE_DEVICES=$g python3 ilora.py --model $MODEL --out "$CHECK/$g" > "$CHECK-$g.log" 2>&1 & done
      wait
      python3 - "$CHECK" > "$ROOT/gpu-check.txt" 2>&1 <<'PY' || true
import json, pathlib, sys
check = pathlib.Path(sys.argv[1])
R = [json.loads((check / g / "results.json").read_text())["R"] for g in "01"]
adapters = [(check / g / "task_8/slow/adapter_model.safetensors").read_bytes() for g in "01"]
print(f"R on GPU 0 and GPU 1 identical: {R[0] == R[1]}; slow adapters after task 8 identical: {adapters[0] == adapters[1]}")
print(json.dumps(R[0]))
PY
    ) < /dev/null > /dev/null 2>&1 &
  fi
  # Through an MPS server the kernels of the card's runs share it at once: 12 short ilora runs on one H200 trained
  # 1.37x as fast, with the same R (gpu_speed.sh mps). A phase started after another on this machine finds the
  # server running. (pgrep -x would compare only the first 15 characters of the name.)
  if [ "${MPS:-1}" = 1 ] && ! pgrep -f '^nvidia-cuda-mps-control' > /dev/null; then
    nvidia-cuda-mps-control -d && echo "MPS server started" || echo "MPS server not started"
  fi
  setsid python3 "$ROOT/code/experiments/study.py" "$PHASE" --root "$ROOT" --data-dir "$DATA" --model $MODEL \
    -j "${JOBS:-$((12 * GPUS))}" --gpus "$GPUS" --deadline "${RUN_FOR:-3000}" < /dev/null >> "$ROOT/$PHASE.log" 2>&1 &
  pid=$!
  echo $pid > "$PID"
  echo "started the $PHASE runs"
fi
end=$((SECONDS + ${WAIT:-500}))
while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $end ]; do sleep 5; done
kill -0 "$pid" 2>/dev/null && echo "the $PHASE runs go on" || echo "the $PHASE runs have ended"
cp "$ROOT/$PHASE.log" "$OUT/"
if [ -e "$ROOT/gpu-check.txt" ]; then cp "$ROOT/gpu-check.txt" "$OUT/"; fi
rm -rf "$PACKS"
python3 experiments/study.py pack "$PHASE" "$PACKS" --root "$ROOT" --data-dir "$DATA"
grep -v "resumed\|started\|stopped" "$OUT/$PHASE.log" | tail -n 30 || true
python3 experiments/study.py table "$PHASE" --root "$ROOT" --data-dir "$DATA" | sed -n 1p
send
