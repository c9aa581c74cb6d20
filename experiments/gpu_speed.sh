#!/usr/bin/env bash
# Issue 13's GPU measurements, one phase per device call (each fits in 10 minutes). Run from the repository root
# on the GPU machine after ../shared/tools/gpu_stage.sh; logs and JSON go to $OUT (default /tmp/out).
#   bash experiments/gpu_speed.sh new     # bench.py on this ilora.py: SmolLM2, Qwen2-1.5B and Llama-2-7B shapes
#   bash experiments/gpu_speed.sh old     # bench.py on the baseline ilora.py (.baseline/ilora.py), then --no-compile
#   bash experiments/gpu_speed.sh check   # compile_check.py: 50 steps eager and compiled, losses side by side
#   bash experiments/gpu_speed.sh e2e     # one TRACE-8 ilora run, baseline then this ilora.py, each alone
#                                         (VERSIONS=new or VERSIONS=baseline for one of them)
set -euo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
M=/root/ilora-model/smollm2-135m-instruct; D=/root/ilora-data/trace_500
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30
B="python3 experiments/bench.py --smollm2-path $M --steps 20 --warmup 5 --methods seq,replay,ilora,peft"
T8="--data-dir $D --model $M --tasks C-STANCE,FOMC,MeetingBank,Py150,ScienceQA,NumGLUE-cm,NumGLUE-ds,20Minuten
    --epochs 1 --batch-size 8 --max-len 768 --max-new-tokens 64 --r 8 --alpha 16 --dropout 0.05 --buffer-size 500
    --eval-batch-size 100 --eval-learner both --log-every 50 --method ilora --lr 1e-3 --lam 0.9 --gamma 0.1"
case "$1" in
  new)   $B --models smollm2,qwen2-1.5b,llama2-7b --eval-batch 100 --out "$OUT/bench_new.json" 2>&1 | tee "$OUT/bench_new.log" ;;
  old)   $B --models smollm2,qwen2-1.5b,llama2-7b --eval-batch 32 --ilora .baseline/ilora.py --out "$OUT/bench_old.json" \
           2>&1 | tee "$OUT/bench_old.log"
         $B --models smollm2 --eval-batch 100 --no-compile --out "$OUT/bench_nocompile.json" 2>&1 | tee "$OUT/bench_nocompile.log" ;;
  check) python3 experiments/compile_check.py --model $M --data-dir $D --out "$OUT/compile_check.json" \
           2>&1 | tee "$OUT/compile_check.log" ;;
  e2e)   for v in ${VERSIONS:-baseline new}; do
           src=ilora.py; [ $v = baseline ] && src=.baseline/ilora.py
           /usr/bin/time -f "$v wall %e s" python3 $src $T8 --out /tmp/e2e_$v --overwrite > "$OUT/e2e_$v.log" 2>&1 || true
           tail -n 3 "$OUT/e2e_$v.log"
         done ;;
esac
