"""The TRACE-8 experiment of RESULTS.md: seq, replay and ilora on TRACE's eight tasks, in TRACE's order.

Two phases, each a set of `ilora.py` runs started side by side on one GPU (a 135M model leaves it mostly idle):
  sweep: hyper-parameters chosen on the eval splits (OP of the answering learner, R filled only at the end);
  final: each method's best setting, several seeds, scored on the test splits, every row of R.

    python trace8.py sweep --data-dir /root/ilora-data/trace_500 --model /root/ilora-model/smollm2-135m-instruct
    python trace8.py final --data-dir /root/ilora-data/trace_500 --model /root/ilora-model/smollm2-135m-instruct
    python trace8.py table                   # the summary again, from the results under --root
RESULTS.md gives the exact commands of the reported runs.
"""
import argparse, itertools, json, os, pathlib, statistics, subprocess, sys, time

TASKS = "C-STANCE,FOMC,MeetingBank,Py150,ScienceQA,NumGLUE-cm,NumGLUE-ds,20Minuten"
# Fixed for every run. max_len 768 keeps most of the long prompts (MeetingBank, 20Minuten) and the memory of
# several runs at once in bounds; 128 new tokens cover the median summary and every short answer.
COMMON = ["--tasks", TASKS, "--epochs", "2", "--batch-size", "8", "--max-len", "768", "--max-new-tokens", "128",
          "--r", "8", "--alpha", "16", "--dropout", "0.05", "--buffer-size", "500", "--eval-batch-size", "100",
          "--log-every", "20", "--overwrite"]
SWEEP = {"seq": [{"lr": lr} for lr in (3e-4, 1e-3)],
         "replay": [{"lr": lr} for lr in (3e-4, 1e-3)],
         "ilora": [{"lr": lr, "lam": lam, "gamma": g}
                   for lr, lam, g in itertools.product((3e-4, 1e-3), (0.99, 0.999), (0.1, 1.0))]}

def name_of(method, setting, seed):
    return "-".join([method, *(f"{k}{v:g}" for k, v in setting.items()), f"s{seed}"])

def run_jobs(jobs, parallel, deadline):
    """Run (name, argv, out) jobs, at most `parallel` at once, stopping all after `deadline` seconds (a run that
    is stopped keeps its checkpoint and can be continued with --resume); returns {name: exit code}."""
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TQDM_MININTERVAL": "30", "PYTHONUNBUFFERED": "1",
           "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    pending, running, codes, t0 = list(jobs), {}, {}, time.time()
    while pending or running:
        while pending and len(running) < parallel:
            name, argv, out = pending.pop(0)
            out.mkdir(parents=True, exist_ok=True)
            log = open(out / "log.txt", "w")
            running[name] = (subprocess.Popen([sys.executable, "ilora.py", *argv], stdout=log, stderr=log, env=env), log)
        if deadline and time.time() - t0 > deadline:
            for name, (proc, log) in running.items():
                proc.terminate()
                print(f"[{time.time() - t0:6.0f}s] {name}: stopped at the deadline", flush=True)
            pending = []
        for name, (proc, log) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                codes[name] = proc.returncode
                print(f"[{time.time() - t0:6.0f}s] {name}: exit {proc.returncode}", flush=True)
                del running[name]
        time.sleep(1)
    return codes

def load(root, phase):
    out = {}
    for path in sorted((root / phase).glob("*/results.json")):
        res = json.loads(path.read_text())
        res["config"] = json.loads((path.parent / "config.json").read_text())
        out[path.parent.name] = res
    return out

def best_settings(root):
    """Per method, the sweep setting with the highest OP on the eval splits (ties: the first)."""
    best = {}
    for name, res in load(root, "sweep").items():
        method, op = res["method"], res["metrics"][res["learners"][0]]["OP"]
        if method not in best or op > best[method][1]:
            setting = {k: res["config"][k] for k in ("lr", "lam", "gamma") if k != "lam" or method == "ilora"}
            best[method] = (setting if method == "ilora" else {"lr": setting["lr"]}, op, name)
    return best

def mean_sd(xs):
    xs = [100 * x for x in xs if x is not None]
    if not xs:
        return "-"
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"

def table(root):
    lines = []
    sweep = load(root, "sweep")
    if sweep:
        lines += ["## Sweep (eval splits, seed 0, OP of the answering learner)", "",
                  "| run | learner | OP (eval) |", "|---|---|---|"]
        lines += [f"| {n} | {r['learners'][0]} | {100 * r['metrics'][r['learners'][0]]['OP']:.2f} |"
                  for n, r in sweep.items()]
        lines += ["", "Chosen: " + "; ".join(f"{m}: {s} (OP {100 * op:.2f})"
                                            for m, (s, op, _) in best_settings(root).items()), ""]
    final = load(root, "final")
    if final:
        lines += ["## Final (test splits; mean ± sd over seeds, %)", "",
                  "| method | learner | seeds | OP | BWT | FWT | F | train tok/s | train s | eval s |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        groups = {}
        for res in final.values():
            for learner in res["learners"]:
                groups.setdefault((res["method"], learner), []).append(res)
        for (method, learner), runs in sorted(groups.items(), key=lambda kv: ["seq", "replay", "ilora"].index(kv[0][0])):
            m = [r["metrics"][learner] for r in runs]
            tim = [r["timing"] for r in runs]
            lines.append(f"| {method} | {learner} | {len(runs)} | " + " | ".join(
                mean_sd([x[k] for x in m]) for k in ("OP", "BWT", "FWT", "F")) +
                f" | {statistics.mean(t['train_tokens_per_s'] for t in tim):.0f}"
                f" | {statistics.mean(t['train_seconds'] for t in tim):.0f}"
                f" | {statistics.mean(t['eval_seconds'] for t in tim):.0f} |")
    return "\n".join(lines)

def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("phase", choices=["sweep", "final", "table"])
    p.add_argument("--data-dir", default="../shared/data/trace_500")
    p.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    p.add_argument("--root", default="runs/trace8", help="where the runs are written")
    p.add_argument("--seeds", default="0,1", help="final phase")
    p.add_argument("-j", "--parallel", type=int, default=6, help="runs at once")
    p.add_argument("--deadline", type=float, default=0, help="stop every run after this many seconds, 0 = never")
    p.add_argument("--extra", default="", help="more ilora.py arguments for every run (e.g. caps for a smoke test)")
    p.add_argument("--fixed", default="", help="final phase without the sweep: one setting for every method, "
                                               "e.g. 'lr=0.001' (ilora keeps its default lam and gamma)")
    args = p.parse_args()
    root = pathlib.Path(args.root)
    base = ["--model", args.model, "--data-dir", args.data_dir, *COMMON, *args.extra.split()]
    if args.phase == "sweep":
        jobs = [(name_of(m, s, 0), [*base, "--method", m, "--eval-split", "eval", "--no-eval-every-task",
                                    *itertools.chain.from_iterable((f"--{k}", str(v)) for k, v in s.items()),
                                    "--out", str(root / "sweep" / name_of(m, s, 0))], root / "sweep" / name_of(m, s, 0))
                for m, settings in SWEEP.items() for s in settings]
        run_jobs(jobs, args.parallel, args.deadline)
    elif args.phase == "final":
        fixed = {k: float(v) for k, v in (kv.split("=") for kv in args.fixed.split(",") if kv)}
        best = {m: (fixed, None, None) for m in SWEEP} if fixed else best_settings(root)
        missing = [m for m in SWEEP if m not in best]
        if missing:
            sys.exit(f"error: no finished sweep run for {', '.join(missing)} under {root / 'sweep'}")
        jobs = [(name_of(m, s, seed), [*base, "--method", m, "--eval-split", "test", "--eval-learner", "both",
                                       "--seed", str(seed),
                                       *itertools.chain.from_iterable((f"--{k}", str(v)) for k, v in s.items()),
                                       "--out", str(root / "final" / name_of(m, s, seed))],
                 root / "final" / name_of(m, s, seed))
                for seed in map(int, args.seeds.split(",")) for m, (s, _, _) in best.items()]
        run_jobs(jobs, args.parallel, args.deadline)
    print(table(root))

if __name__ == "__main__":
    main()
