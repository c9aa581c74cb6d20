"""What scoring a learner merged into the weights costs in bf16. ilora.predict folds each learner into a copy of the
target weights, W + delta W rounded once to W's dtype; in bf16 that rounding drops the part of delta W below half a
step of W's grid. This script trains the fast learner (and so the slow one) on the first task, as ilora.py does,
then scores both learners twice on the eval prompts of every task: merged (ilora.predict as it is) and unmerged (the
LoRA wrappers left in, delta W applied to the activations in the factors' fp32), both with the dynamic KV cache:

    python experiments/merge_check.py --model /root/ilora-model/smollm2-135m-instruct \\
        --data-dir /root/ilora-data/trace_500 --out merge_check.json

Prints, per learner, how many answers differ between the two paths and each task's score both ways, and the size
of delta W's entries that the merge loses whole.
"""
import argparse, json, pathlib, sys, time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # ilora.py is one folder up
import ilora

TRACE8 = "C-STANCE,FOMC,MeetingBank,Py150,ScienceQA,NumGLUE-cm,NumGLUE-ds,20Minuten"

def predict(model, layers, tok, prompt_ids, cfg, gen_lens, learner, merge):
    """ilora.predict through the merged path, or with its merge replaced by switching the wrappers' learner; both
    with ilora.predict's default dynamic cache, so that only the merge differs."""
    real = ilora.merged
    if not merge:
        ilora.merged = lambda model, learner: ilora.use_learner(layers, learner)
    try:
        return ilora.predict(model, tok, prompt_ids, cfg, gen_lens, learner)
    finally:
        ilora.merged = real

@torch.no_grad()
def rounded_away(layers, learner):
    """The share of delta W's nonzero entries that the merge loses whole: bf16(W + delta W) == bf16(W)."""
    lost = nonzero = 0
    for layer in layers:
        weight = layer.base_layer.weight.to(torch.bfloat16).float()
        delta = layer.delta_weight(learner)
        lost += int((((weight + delta).to(torch.bfloat16).float() == weight) & (delta != 0)).sum())
        nonzero += int((delta != 0).sum())
    return lost / max(nonzero, 1)

def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=ilora.DEFAULT_MODEL)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--tasks", default=TRACE8)
    p.add_argument("--epochs", type=int, default=5, help="of the first task (the study's budget)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-train", type=int, default=0)
    p.add_argument("--max-eval", type=int, default=0)
    p.add_argument("--max-len", type=int, default=768)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="merge_check.json")
    args = p.parse_args()
    cfg = ilora.Config(model=args.model, data_dir=args.data_dir, tasks=args.tasks, method="ilora", lam=0.9,
                       gamma=0.1, epochs=args.epochs, lr=args.lr, max_train=args.max_train, max_eval=args.max_eval,
                       max_len=args.max_len, max_new_tokens=args.max_new_tokens, eval_split="eval",
                       eval_batch_size=100, device=args.device, out="/tmp/merge_check", log_every=50)
    ilora.check_config(cfg)
    device = torch.device("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")
    tasks = ilora.load_tasks(cfg)
    metrics = {name: ilora.TASK_METRICS.get(name, "em") for name in tasks}
    ilora.make_deterministic(True, device)
    ilora.set_seed(0)
    model, tok = ilora.load_model(cfg.model, device)
    layers = ilora.inject_lora(model, None, cfg.r, cfg.alpha, cfg.dropout)
    train, prompt_ids, gen_lens = ilora.encode_tasks(tok, tasks, cfg)
    first = next(iter(tasks))
    state = {"step": 0, "tokens": 0}
    start = time.time()
    ilora.train_task(model, layers, train[first], 1, ilora.ReplayBuffer(cfg.buffer_size, 0), cfg, state)
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "dtype": str(model.dtype),
              "trained_on": first, "steps": state["step"], "train_s": round(time.time() - start, 1),
              "prompts": sum(len(s["eval"]) for s in tasks.values())}
    for learner in ("slow", "fast"):
        answers, rows = {}, {}
        for merge in (True, False):
            preds = predict(model, layers, tok, prompt_ids, cfg, gen_lens, learner, merge)
            answers[merge] = [a for name in tasks for a in preds[name]]
            rows[merge] = ilora.score(tasks, preds, metrics, "eval")
        result[learner] = {
            "answers_differ": sum(a != b for a, b in zip(answers[True], answers[False])),
            "delta_rounded_away": round(rounded_away(layers, learner), 4),
            "OP_merged": round(100 * sum(rows[True]) / len(rows[True]), 2),
            "OP_unmerged": round(100 * sum(rows[False]) / len(rows[False]), 2),
            "scores_merged": {name: round(100 * v, 1) for name, v in zip(tasks, rows[True])},
            "scores_unmerged": {name: round(100 * v, 1) for name, v in zip(tasks, rows[False])}}
    pathlib.Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))

if __name__ == "__main__":
    main()
