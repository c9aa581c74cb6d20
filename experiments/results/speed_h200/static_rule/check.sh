set -u
M=/root/ilora-model/smollm2-135m-instruct; D=/root/ilora-data/trace_500
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30
T8=C-STANCE,FOMC,MeetingBank,Py150,ScienceQA,NumGLUE-cm,NumGLUE-ds,20Minuten
COMMON="--data-dir $D --model $M --epochs 1 --batch-size 8 --max-len 768 --max-new-tokens 64 --eval-batch-size 100 --method ilora --lr 1e-3"
for v in dyn static; do
  a=; [ $v = dyn ] && a=--dynamic-cache
  SECONDS=0
  (cd experiments && timeout 150 python3 first_pass.py --model $M $a --out $OUT/fp_smollm2_$v.json > $OUT/fp_smollm2_$v.log 2>&1)
  echo "first_pass smollm2 $v: rc $? $SECONDS s"; grep "^pass" $OUT/fp_smollm2_$v.log
done
for v in head new; do
  src=ilora.py; [ $v = head ] && src=.head/ilora.py
  SECONDS=0
  timeout 200 python3 $src $COMMON --tasks C-STANCE,FOMC --max-train 64 --max-test 20 --out /tmp/small_$v --overwrite > $OUT/small_$v.log 2>&1
  echo "small $v: rc $? wall $SECONDS s"; cp /tmp/small_$v/config.json $OUT/small_${v}_config.json; cp /tmp/small_$v/results.json $OUT/small_${v}_results.json
  python3 -c "import json; c = json.load(open('/tmp/small_$v/config.json')); r = json.load(open('/tmp/small_$v/results.json')); print(c['kv_cache'], r['timing'], r['R'])"
done
for v in head new; do
  src=ilora.py; [ $v = head ] && src=.head/ilora.py
  ( SECONDS=0; timeout 330 python3 $src $COMMON --tasks $T8 --max-train 16 --eval-learner slow --out /tmp/big_$v --overwrite > $OUT/big_$v.log 2>&1; echo "big $v: rc $? wall $SECONDS s" ) &
done
wait
for v in head new; do cp /tmp/big_$v/config.json $OUT/big_${v}_config.json; cp /tmp/big_$v/results.json $OUT/big_${v}_results.json; done
python3 - <<'PY'
import json, pathlib
r = {v: json.load(open(f"/tmp/big_{v}/results.json")) for v in ("head", "new")}
c = {v: json.load(open(f"/tmp/big_{v}/config.json"))["kv_cache"] for v in ("head", "new")}
p = {v: pathlib.Path(f"/tmp/big_{v}/predictions.parquet").read_bytes() for v in ("head", "new")}
print("big kv_cache", c, "| R identical", r["head"]["R"] == r["new"]["R"], "| predictions.parquet identical", p["head"] == p["new"])
print("big OP", {v: round(100 * r[v]["metrics"]["slow"]["OP"], 2) for v in r}, "timing", {v: r[v]["timing"] for v in r})
PY
