#!/usr/bin/env bash
# The torchrun measurements (issues 20 and 23) on one node of several H200s, after ../shared/tools/gpu_stage.sh,
# from the repository root. Each phase fits one 10-minute command; logs and JSON go to $OUT (default /tmp/out).
#   bash experiments/gpu_torchrun.sh bench       # bench.py: the step's global tokens/s at 1 and 2 processes, the
#                                                # same global batch (8 current + 8 replay rows of 512 tokens);
#                                                # Llama-2-7B and SmolLM2 shapes. PROCS="1 2 4 8" on 8 GPUs;
#                                                # COMPILE=--no-compile for the eager step that ilora.py runs
#   bash experiments/gpu_torchrun.sh trace8 1    # one TRACE-8 ilora run (1 epoch, both learners scored after every
#   bash experiments/gpu_torchrun.sh trace8 2    # task) at 1 process, then at 2: wall time and R;
#                                                # EVAL_BATCH=400 scores in batches of 400 instead of 100;
#                                                # ILORA=.head/ilora.py TAG=head runs another ilora.py;
#                                                # LAUNCH=python3 runs one process without torchrun
#   bash experiments/gpu_torchrun.sh evalbatch   # eval_batch.py: a TRACE-8 scoring pass at several batch sizes
set -euo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
M=/root/ilora-model/smollm2-135m-instruct; D=/root/ilora-data/trace_500
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30
case "$1" in
  bench)
    for n in ${PROCS:-1 2}; do
      name=bench_${n}proc${COMPILE:+_eager}
      torchrun --nproc_per_node $n experiments/bench.py --models llama2-7b,smollm2 --smollm2-path $M \
        --methods seq,replay,ilora --eval-prompts 0 --no-sync-check ${COMPILE:-} --out "$OUT/$name.json" \
        > "$OUT/$name.log" 2>&1 || true
      grep -E "^\| |device" "$OUT/$name.log" || tail -n 20 "$OUT/$name.log"
    done ;;
  trace8)
    n=$2
    T8="--data-dir $D --model $M --tasks C-STANCE,FOMC,MeetingBank,Py150,ScienceQA,NumGLUE-cm,NumGLUE-ds,20Minuten
        --epochs 1 --batch-size 8 --max-len 768 --max-new-tokens 64 --rank 8 --alpha 16 --dropout 0.05
        --buffer-size 500 --eval-batch-size ${EVAL_BATCH:-100} --eval-learner both --log-every 50 --method ilora --lr 1e-3
        --lam 0.9 --gamma 0.1"
    SECONDS=0
    name=trace8_${n}proc${EVAL_BATCH:+_eval$EVAL_BATCH}${TAG:+_$TAG}
    # inductor's cache empty, as on a fresh machine: every run pays the same compile (INDUCTOR_CACHE=dir keeps one)
    launch=${LAUNCH:-torchrun --nproc_per_node $n}
    TORCHINDUCTOR_CACHE_DIR=${INDUCTOR_CACHE:-$(mktemp -d)} $launch ${ILORA:-ilora.py} $T8 --out /tmp/$name \
      --overwrite > "$OUT/$name.log" 2>&1 || true
    echo "$n process(es): wall ${SECONDS} s" | tee -a "$OUT/$name.log"
    cp /tmp/$name/results.json "$OUT/$name.json" || true
    cp /tmp/$name/predictions.parquet "$OUT/$name.predictions.parquet" || true
    cp /tmp/$name/config.json "$OUT/$name.config.json" || true
    sha256sum "$OUT/$name.predictions.parquet" || true  # runs that give the same answers give the same file
    tail -n 4 "$OUT/$name.log" ;;
  evalbatch)
    python3 experiments/eval_batch.py --model $M --data-dir $D --sizes 8,16,32,64,100,128 \
      --out "$OUT/eval_batch_gpu.json" 2>&1 | tee "$OUT/eval_batch_gpu.log" ;;
esac
