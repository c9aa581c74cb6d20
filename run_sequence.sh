#!/usr/bin/env bash
# Runs seq, replay and ilora over one task sequence and ends with one table: method x OP, BWT, FWT, forgetting.
#   bash run_sequence.sh                                             # the 8 built-in tasks
#   DATA_DIR=../shared/data/trace_500 bash run_sequence.sh           # TRACE-8, in TRACE's order
#   DATA_DIR=../shared/data/trace_500 EPOCHS=2 bash run_sequence.sh --max-train 16 --max-test 5 --batch-size 4 \
#       --warmup 1 --max-len 64 --max-new-tokens 8                  # a quick look: 19 min on 2 CPU cores
# Overrides: MODEL, EPOCHS (unset: ilora.py's default), METHODS ("seq replay ilora"), OUT (runs/sequence);
# extra arguments go to ilora.py.
set -euo pipefail
cd "$(dirname "$0")"
MODEL=${MODEL:-HuggingFaceTB/SmolLM2-135M-Instruct}
epochs=(); [ -n "${EPOCHS:-}" ] && epochs=(--epochs "$EPOCHS")
METHODS=${METHODS:-seq replay ilora}
OUT=${OUT:-runs/sequence}
if [ -n "${DATA_DIR:-}" ]; then
  data=(--data-dir "$DATA_DIR" --tasks C-STANCE,FOMC,MeetingBank,Py150,ScienceQA,NumGLUE-cm,NumGLUE-ds,20Minuten)
else
  data=(--tasks builtin)
fi
for method in $METHODS; do
  python ilora.py --model "$MODEL" "${data[@]}" ${epochs[@]+"${epochs[@]}"} --method "$method" --out "$OUT/$method" \
    --overwrite "$@"
done
python - "$OUT" $METHODS <<'PY'
import json, pathlib, sys
out, methods = pathlib.Path(sys.argv[1]), sys.argv[2:]
print(f"\n| method | learner | OP | BWT | FWT | F |\n|---|---|---|---|---|---|")
for method in methods:
    res = json.loads((out / method / "results.json").read_text())
    for learner in res["learners"]:
        m = res["metrics"][learner]
        cells = [f"{100 * m[k]:.2f}" if m[k] is not None else "-" for k in ("OP", "BWT", "FWT", "F")]
        print(f"| {method} | {learner} | " + " | ".join(cells) + " |")
PY
