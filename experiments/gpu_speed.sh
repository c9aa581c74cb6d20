#!/usr/bin/env bash
# Speed measurements (issues 13 and 20), one phase per GPU command (each fits in 10 minutes). Run from the
# repository root on the GPU machine after ../shared/tools/gpu_stage.sh; logs and JSON go to $OUT (default /tmp/out).
#   bash experiments/gpu_speed.sh new     # bench.py on this ilora.py: SmolLM2, Qwen2-1.5B and Llama-2-7B shapes
#   bash experiments/gpu_speed.sh old     # bench.py on the baseline ilora.py (.baseline/ilora.py), then --no-compile
#   bash experiments/gpu_speed.sh check   # compile_check.py: 50 steps eager and compiled, losses side by side
#   bash experiments/gpu_speed.sh e2e     # one TRACE-8 ilora run, baseline then this ilora.py, each alone
#                                         (VERSIONS=new or VERSIONS=baseline for one of them)
#   bash experiments/gpu_speed.sh compile # two GPUs: the TRACE-8 ilora run eager on GPU 0, and beside it through
#                                         compiled_run.py on GPU 1, twice (the second finds inductor's cache filled)
#   bash experiments/gpu_speed.sh crowd   # two GPUs: 12 ilora runs (2 tasks, 240 steps) side by side on each,
#                                         eager on GPU 0, compiled_run.py on GPU 1: a study wave's throughput;
#                                         seeds 0 to 5 twice, so each seed's two runs must give the same R
#   bash experiments/gpu_speed.sh mps     # the same 12 runs a GPU, eager on both, GPU 1's through an MPS server;
#                                         on a machine of one GPU the two arms run one after the other on it
#                                         (N=4: 4 runs an arm; EPOCHS=2: 160 steps a run instead of 240)
#   bash experiments/gpu_speed.sh equal   # the evaluation pass at equal settings (batch 100): the baseline
#                                         ilora.py (send .baseline: git show b7808ed:ilora.py) and this one
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
  equal)
    for v in ${VERSIONS:-baseline new}; do
      src=(); [ $v = baseline ] && src=(--ilora .baseline/ilora.py)
      python3 experiments/bench.py --models smollm2,llama2-7b --smollm2-path $M --methods ilora --steps 5 --warmup 2 \
        --eval-batch 100 "${src[@]}" --out "$OUT/equal_$v.json" > "$OUT/equal_$v.log" 2>&1 || true
      grep -E "^\| |eval" "$OUT/equal_$v.log" || tail -n 20 "$OUT/equal_$v.log"
    done ;;
  compile)
    one() {  # GPU NAME SCRIPT
      local gpu=$1 name=$2 script=$3
      SECONDS=0
      CUDA_VISIBLE_DEVICES=$gpu python3 $script $T8 --out /tmp/$name --overwrite > "$OUT/$name.log" 2>&1 || true
      echo "$name: wall $SECONDS s" | tee -a "$OUT/$name.log"
      cp /tmp/$name/results.json "$OUT/$name.json" || true
    }
    one 0 eager ilora.py &
    (one 1 compiled_cold experiments/compiled_run.py; one 1 compiled_warm experiments/compiled_run.py) &
    wait
    for f in "$OUT"/eager.json "$OUT"/compiled_*.json; do
      python3 -c "import json, sys; r = json.load(open(sys.argv[1])); print(sys.argv[1], r['timing'],
                  {k: round(100 * m['OP'], 2) for k, m in r['metrics'].items()})" "$f" || true
    done
    python3 -c "import json, pathlib, sys; R = [json.load(open(f))['R'] for f in sys.argv[1:3]]
A = [[f.read_bytes() for f in sorted(pathlib.Path(d).glob('task_*/*/*.safetensors'))] for d in sys.argv[3:]]
print('compiled runs: R', 'identical' if R[0] == R[1] else 'differ', '| all', len(A[0]), 'adapters',
      'identical' if A[0] and A[0] == A[1] else 'differ')" "$OUT"/compiled_{cold,warm}.json /tmp/compiled_{cold,warm} || true ;;
  crowd|mps)
    # crowd: eager on GPU 0, compiled_run.py on GPU 1. mps: eager in both arms, the second's runs through an MPS
    # server (kernels of several processes at once); the same seeds in both arms must give the same R.
    if pgrep -f '^nvidia-cuda-mps-control' > /dev/null; then  # gpu_study.sh's, say: every run would go through it
      echo "gpu_speed.sh $1: an MPS server is running; stop it first (echo quit | nvidia-cuda-mps-control)" >&2
      exit 1
    fi
    SHORT="--data-dir $D --model $M --tasks MeetingBank,Py150 --epochs ${EPOCHS:-3} --max-train 320 --batch-size 8
           --max-len 768 --max-new-tokens 64 --eval-split eval --max-eval 20 --no-eval-every-task --eval-batch-size 100
           --kv-cache static --method ilora --lr 1e-3 --lam 0.9 --gamma 0.1"
    N=${N:-12}
    arm() {  # GPU NAME SCRIPT
      local gpu=$1 name=$2 script=$3
      SECONDS=0
      for k in $(seq 0 $((N - 1))); do
        CUDA_VISIBLE_DEVICES=$gpu OMP_NUM_THREADS=2 python3 $script $SHORT --seed $((k % 6)) --out /tmp/crowd_$name/$k \
          --overwrite > /tmp/crowd_${name}_$k.log 2>&1 &
      done
      # the host's load a minute in: whether its cores, rather than the GPU, are the limit
      { sleep 60; cat /proc/loadavg; top -bn1 | head -n 20; } > "$OUT/load_$name.txt" 2>&1 || true
      wait
      echo "$name: $N runs on GPU $gpu in $SECONDS s" | tee "$OUT/crowd_$name.txt"
      python3 -c "import glob, json, statistics; t = [json.load(open(f))['timing']['train_seconds']
                  for f in glob.glob('/tmp/crowd_$name/*/results.json')]
print('$name: runs finished', len(t), '| median training s', statistics.median(t) if t else None)
R = {k: json.load(open(f'/tmp/crowd_$name/{k}/results.json'))['R'] for k in range($N)
     if glob.glob(f'/tmp/crowd_$name/{k}/results.json')}
same = [R[k] == R[k + 6] for k in range(6) if k in R and k + 6 in R]
print('$name: runs of the same seed with identical R:', sum(same), 'of', len(same), 'pairs')" \
        | tee -a "$OUT/crowd_$name.txt"
      cp /tmp/crowd_${name}_0.log "$OUT/" || true
    }
    if [ "$1" = crowd ]; then
      arm 0 eager ilora.py &
      TORCHINDUCTOR_COMPILE_THREADS=1 arm 1 compiled experiments/compiled_run.py &  # each run compiles (cold cache, as in a wave)
      wait
    else
      export CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log; mkdir -p /tmp/mps-pipe /tmp/mps-log
      MPS_GPU=$(( $(nvidia-smi -L | wc -l) > 1 ? 1 : 0 ))  # one GPU: the two arms one after the other on it
      if [ $MPS_GPU = 1 ]; then arm 0 eager ilora.py & else arm 0 eager ilora.py; fi
      CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe nvidia-cuda-mps-control -d  # a server of its own: the eager runs skip it
      CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe arm $MPS_GPU mps ilora.py &
      sleep 90; nvidia-smi > "$OUT/nvidia-smi.txt"  # under MPS the card lists the mps runs as M+C and an mps-server
      wait
      echo quit | CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe nvidia-cuda-mps-control
      python3 -c "import json; R = [[json.load(open(f'/tmp/crowd_{a}/{k}/results.json'))['R'] for k in range($N)]
                  for a in ('eager', 'mps')]; print('eager and mps runs of the same seed: R identical', R[0] == R[1])" \
        | tee -a "$OUT/crowd_mps.txt" || true
    fi ;;
esac
