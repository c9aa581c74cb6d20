"""Where a GPU run stops being reproducible: the same training steps twice, and the same scoring passes several
times, on one GPU, with ilora.py's deterministic mode on; prints what differs.

    python experiments/determinism.py --model /root/ilora-model/smollm2-135m-instruct \\
        --data-dir /root/ilora-data/trace_500 --out determinism.json
1. training: 40 ilora steps (8 current + 8 replay rows of C-STANCE and FOMC) from the same seed, twice; the fast
   and slow factors compared bit for bit, and torch's strict deterministic mode asked which op has no
   deterministic kernel;
2. scoring: the static-cache path three times and the dynamic path twice over 300 test prompts.
"""
import argparse, json, pathlib, sys, time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # ilora.py is one folder up
import ilora

def train(model, tok, rows, replay, steps, cfg):
    """Fresh factors from the seed, then `steps` ilora steps; returns the fast and slow factors."""
    ilora.set_seed(cfg.seed)
    layers = ilora.inject_lora(model, r=8, alpha=16, dropout=cfg.dropout)
    opt = torch.optim.AdamW(ilora.fast_tensors(layers), lr=cfg.lr, fused=model.device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    model.train()
    ilora.set_seed(cfg.seed, 1)
    for step in range(1, steps + 1):
        batch = rows[(step * 8) % len(rows):][:8]
        ilora.train_step(model, layers, opt, sched, batch, replay[(step * 8) % len(replay):][:8], cfg, step)
    fast = [t.detach().clone() for t in ilora.fast_tensors(layers)]
    slow = [t.clone() for t in ilora.slow_tensors(layers)]
    for name, module in list(model.named_modules()):  # take the wrappers out again
        if isinstance(module, ilora.LoRALayer):
            model.set_submodule(name, module.base_layer)
    return fast, slow

def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--out", default="determinism.json")
    args = p.parse_args()
    cfg = ilora.Config(model=args.model, data_dir=args.data_dir, tasks="C-STANCE,FOMC,ScienceQA,NumGLUE-cm",
                       max_len=768, max_new_tokens=64, eval_batch_size=100, method="ilora", lam=0.9, gamma=0.1,
                       lr=3e-3, dropout=0.05)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ilora.make_deterministic(True, device)
    tasks = ilora.load_tasks(cfg)
    model, tok = ilora.load_model(cfg.model, device)
    encoded = ilora.encode_tasks(tok, tasks, cfg)[0]
    rows, replay = encoded["FOMC"], encoded["C-STANCE"]
    result = {"card": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__}
    runs = [train(model, tok, rows, replay, args.steps, cfg) for _ in range(2)]
    result["train_fast_equal"] = all(torch.equal(a, b) for a, b in zip(runs[0][0], runs[1][0]))
    result["train_slow_equal"] = all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    result["train_fast_max_diff"] = max((a - b).abs().max().item() for a, b in zip(runs[0][0], runs[1][0]))
    torch.use_deterministic_algorithms(True, warn_only=False)  # strict: the first op with no such kernel raises
    try:
        train(model, tok, rows, replay, 2, cfg)
        result["strict_mode"] = "no op raised"
    except RuntimeError as e:
        result["strict_mode"] = str(e).splitlines()[0][:300]
    torch.use_deterministic_algorithms(True)
    ilora.inject_lora(model, r=8, alpha=16)
    small = {name: {"train": splits["train"], "test": splits["test"][:75]} for name, splits in tasks.items()}
    cfg.eval_split = "test"
    _, prompt_ids, gen_lens = ilora.encode_tasks(tok, small, cfg)
    passes = {}
    for name, static in [("static1", True), ("static2", True), ("static3", True), ("dynamic1", False),
                         ("dynamic2", False)]:
        start = time.time()
        preds = ilora.predict(model, tok, prompt_ids, cfg, gen_lens, "fast", cfg.eval_batch_size if static else 0)
        result[f"{name}_s"] = round(time.time() - start, 2)
        passes[name] = [p for n in small for p in preds[n]]
    for a, b in [("static1", "static2"), ("static2", "static3"), ("dynamic1", "dynamic2"), ("static3", "dynamic2")]:
        result[f"differ_{a}_{b}"] = sum(x != y for x, y in zip(passes[a], passes[b]))
    result["prompts"] = len(passes["static1"])
    pathlib.Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))

if __name__ == "__main__":
    main()
