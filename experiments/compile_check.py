"""The ilora step with and without bench.compile_blocks, side by side: the first N steps' CE and consistency terms,
the time of the first steps (compilation) and the median step after them. Real TRACE rows of varying length, so
the compiled code meets several shapes.

    python compile_check.py --model /root/ilora-model/smollm2-135m-instruct --data-dir /root/ilora-data/trace_500
"""
import argparse, json, pathlib, statistics, sys, time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # ilora.py is one folder up
import ilora
from bench import compile_blocks

def run(args, compiled, tok, current, replay):
    torch.manual_seed(0)
    model, _ = ilora.load_model(args.model, torch.device("cuda"))
    layers = ilora.inject_lora(model, None, 8, 16.0, 0.0)  # LoRA dropout off: both runs draw no random numbers
    if compiled:
        compile_blocks(model)
    cfg = ilora.Config(method="ilora", lam=0.9, gamma=0.1, lr=1e-3, batch_size=args.batch)
    opt = torch.optim.AdamW(ilora.fast_tensors(layers), lr=cfg.lr, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    model.train()
    losses, secs = [], []
    for k in range(args.steps):
        b = slice(k * args.batch, (k + 1) * args.batch)
        torch.cuda.synchronize(); t0 = time.perf_counter()
        ce, cons = ilora.train_step(model, layers, opt, sched, current[b], replay[b], cfg, k + 1)
        losses.append((ce.item(), cons.item()))  # .item() waits for the GPU, so the time is the step's
        secs.append(time.perf_counter() - t0)
    return losses, secs

def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--out", default="compile_check.json")
    args = p.parse_args()
    _, tok = ilora.load_model(args.model, torch.device("cpu"))
    cfg = ilora.Config(data_dir=args.data_dir, tasks="FOMC,C-STANCE,ScienceQA", max_len=768)
    rows = ilora.encode_tasks(tok, ilora.load_tasks(cfg), cfg)[0]
    n = args.steps * args.batch
    current, replay = (rows["FOMC"] * 4)[:n], (rows["C-STANCE"] + rows["ScienceQA"])[:n]
    res = {mode: run(args, mode == "compiled", tok, current, replay) for mode in ("eager", "compiled")}
    print("| step | CE eager | CE compiled | consistency eager | consistency compiled | s eager | s compiled |")
    print("|---|---|---|---|---|---|---|")
    for k in range(args.steps):
        (ce0, c0), (ce1, c1) = res["eager"][0][k], res["compiled"][0][k]
        print(f"| {k + 1} | {ce0:.4f} | {ce1:.4f} | {c0:.5f} | {c1:.5f} | {res['eager'][1][k]:.3f} | "
              f"{res['compiled'][1][k]:.3f} |")
    summary = {mode: {"first_5_steps_s": round(sum(s[:5]), 2), "median_step_ms_after_10": round(
        1000 * statistics.median(s[10:]), 1), "max_ce": max(l[0] for l in losses)} for mode, (losses, s) in res.items()}
    summary["max_abs_ce_diff"] = max(abs(a[0] - b[0]) for a, b in zip(res["eager"][0], res["compiled"][0]))
    summary["max_abs_consistency_diff"] = max(abs(a[1] - b[1]) for a, b in zip(res["eager"][0], res["compiled"][0]))
    summary["device"] = torch.cuda.get_device_name()
    print(json.dumps(summary, indent=1))
    ilora.write_json(args.out, {"summary": summary, "steps": res})

if __name__ == "__main__":
    main()
