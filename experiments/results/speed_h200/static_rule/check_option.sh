set -u
M=/root/ilora-model/smollm2-135m-instruct; D=/root/ilora-data/trace_500
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30
COMMON="--data-dir $D --model $M --epochs 1 --batch-size 8 --max-len 768 --max-new-tokens 64 --eval-batch-size 100 --method ilora --lr 1e-3 --tasks C-STANCE,FOMC --max-train 64 --max-test 20"
for v in auto static; do
  ( SECONDS=0; timeout 150 python3 ilora.py $COMMON --kv-cache $v --out /tmp/k_$v --overwrite > $OUT/k_$v.log 2>&1; echo "kv-cache $v: rc $? wall $SECONDS s" ) &
done
wait
for v in auto static; do
  cp /tmp/k_$v/config.json $OUT/k_${v}_config.json; cp /tmp/k_$v/results.json $OUT/k_${v}_results.json
  python3 -c "import json; c = json.load(open('/tmp/k_$v/config.json')); r = json.load(open('/tmp/k_$v/results.json')); print('$v', c['kv_cache'], c['kv_cache_used'], r['timing'])"
done
