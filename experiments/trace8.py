"""The TRACE-8 experiment of RESULTS.md: seq, replay and ilora on TRACE's eight tasks, in TRACE's order.

Two phases, each a set of `ilora.py` runs started side by side on one GPU (a 135M model leaves it mostly idle):
  sweep: hyper-parameters chosen on the eval splits (OP of the answering learner; R scored only before and after);
  final: each method's best setting, several seeds, scored on the test splits, every row of R.
`all` runs both and starts a method's final runs as soon as its sweep is complete. A run that already finished
with the same settings is skipped and one stopped at --deadline is continued (--resume), so the same command can
be repeated until everything is done:

    python trace8.py all --data-dir /root/ilora-data/trace_500 --model /root/ilora-model/smollm2-135m-instruct
    python trace8.py table                   # the summary again, from the results under --root
RESULTS.md gives the exact commands of the reported runs.
"""
import argparse, itertools, json, os, pathlib, statistics, subprocess, sys, time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # ilora.py is one folder up
import ilora

TASKS = "C-STANCE,FOMC,MeetingBank,Py150,ScienceQA,NumGLUE-cm,NumGLUE-ds,20Minuten"
# Fixed for every run. max_len 768 keeps most of the long prompts (MeetingBank, 20Minuten) and the memory of
# several runs at once in bounds; 64 new tokens cover every short answer and most of a summary's first sentences.
COMMON = ["--tasks", TASKS, "--epochs", "1", "--batch-size", "8", "--max-len", "768", "--max-new-tokens", "64",
          "--r", "8", "--alpha", "16", "--dropout", "0.05", "--buffer-size", "500", "--eval-batch-size", "100",
          "--eval-learner", "both", "--log-every", "50"]
SWEEP = {"seq": [{"lr": lr} for lr in (1e-3, 3e-3)],
         "replay": [{"lr": lr} for lr in (1e-3, 3e-3)],
         "ilora": [{"lr": lr, "lam": lam, "gamma": g}
                   for lr, lam, g in itertools.product((1e-3, 3e-3), (0.9, 0.99), (0.1, 1.0))]}

def name_of(method, setting, seed):
    return "-".join([method, *(f"{k}{v:g}" for k, v in setting.items()), f"s{seed}"])

def flags(setting):
    return list(itertools.chain.from_iterable((f"--{k}", str(v)) for k, v in setting.items()))

def sweep_jobs(root, base, method):
    return [(root / "sweep" / name_of(method, s, 0),
             [*base, "--method", method, "--eval-split", "eval", "--no-eval-every-task", "--kv-cache", "static",
              *flags(s)])  # the static KV cache, as the sweep ran (--kv-cache auto would leave it for its 16 batches)
            for s in SWEEP[method]]

def final_jobs(root, base, method, setting, seeds):
    return [(root / "final" / name_of(method, setting, seed),
             [*base, "--method", method, "--eval-split", "test", "--seed", str(seed), *flags(setting)])
            for seed in seeds]

def finished(out, argv):
    """True if out holds the results of a run with exactly these settings (paths and RESUMABLE ones aside)."""
    if not (out / "results.json").is_file():
        return False
    saved = json.loads((out / "config.json").read_text())
    changed = ilora.result_changing(saved, ilora.parse_args(argv))
    if "kv_cache_used" not in saved:  # written before --kv-cache, whose "kv_cache" is the cache taken: the study's
        # commands take the same one (--kv-cache static for the screen; auto takes static for the finals)
        changed = [k for k in changed if k != "kv_cache"]
    return not changed

def run_jobs(jobs, parallel, deadline, more=lambda: [], gpus=1):
    """Run (out, argv) jobs, at most `parallel` at once; after each exit `more()` may add jobs. Runs still going
    after `deadline` seconds are stopped: their finished tasks stay in checkpoint.pt and the next call resumes them.
    With gpus > 1 each job starts on the GPU that runs the fewest jobs (CUDA_VISIBLE_DEVICES)."""
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TQDM_MININTERVAL": "30", "PYTHONUNBUFFERED": "1",
           "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    pending, running, t0 = list(jobs), {}, time.time()
    say = lambda msg: print(f"[{time.time() - t0:5.0f}s] {msg}", flush=True)
    while pending or running:
        while pending and len(running) < parallel and not (deadline and time.time() - t0 > deadline):
            out, argv = pending.pop(0)
            if finished(out, argv):
                say(f"{out.name}: finished before, skipped")
                pending += more()
                continue
            go_on = (out / "checkpoint.pt").is_file()
            out.mkdir(parents=True, exist_ok=True)
            log = open(out / "log.txt", "a")
            cmd = [sys.executable, str(HERE.parent / "ilora.py"), *argv, "--out", str(out),
                   "--resume" if go_on else "--overwrite"]
            gpu = min(range(gpus), key=lambda g: sum(job[2] == g for job in running.values()))
            job_env = {**env, "CUDA_VISIBLE_DEVICES": str(gpu)} if gpus > 1 else env
            running[out] = (subprocess.Popen(cmd, stdout=log, stderr=log, env=job_env), log, gpu)
            on_gpu = f" on GPU {gpu}" if gpus > 1 else ""
            say(f"{out.name}: {'resumed' if go_on else 'started'}{on_gpu}")
        if deadline and time.time() - t0 > deadline:
            for out, (proc, log, _) in running.items():
                proc.terminate()
                proc.wait()
                say(f"{out.name}: stopped at the deadline")
            return
        for out, (proc, log, _) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                del running[out]
                say(f"{out.name}: exit {proc.returncode}")
                pending += more()
        time.sleep(1)

def load(root, phase):
    out = {}
    for path in sorted((root / phase).glob("*/results.json")):
        res = json.loads(path.read_text())
        res["config"] = json.loads((path.parent / "config.json").read_text())
        out[path.parent.name] = res
    return out

def best_settings(root):
    """Per method whose sweep is complete, the setting with the highest OP of the answering learner (the slow
    one for ilora) on the eval splits; ties go to the first in SWEEP's order."""
    runs = load(root, "sweep")
    best = {}
    for method, settings in SWEEP.items():
        ops = [runs[n]["metrics"][runs[n]["learners"][0]]["OP"] if n in runs else None
               for n in (name_of(method, s, 0) for s in settings)]
        if None not in ops:
            i = max(range(len(ops)), key=lambda i: (ops[i], -i))
            best[method] = (settings[i], ops[i])
    return best

def mean_sd(xs):
    xs = [100 * x for x in xs if x is not None]
    if not xs:
        return "-"
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"

def final_groups(root):
    """Final runs grouped by (method, setting, learner), methods in SWEEP's order."""
    groups = {}
    for name, res in load(root, "final").items():
        for learner in res["learners"]:
            groups.setdefault((res["method"], name.rsplit("-s", 1)[0].split("-", 1)[1], learner), []).append(res)
    return sorted(groups.items(), key=lambda kv: list(SWEEP).index(kv[0][0]))

def matrices(root):
    """The mean R (in %) of every final group, one markdown table each: rows after each task, base model first."""
    lines = []
    for (method, setting, learner), runs in final_groups(root):
        tasks = runs[0]["tasks"]
        R = [[statistics.mean(100 * r["R"][learner][t][i] for r in runs) for i in range(len(tasks))]
             for t in range(len(tasks) + 1)]
        lines += [f"**{method} {setting} ({learner} learner)**, mean of {len(runs)} seeds", "",
                  "| after | " + " | ".join(tasks) + " | AP |", "|---" * (len(tasks) + 2) + "|"]
        lines += [f"| {t or 'base'} | " + " | ".join(f"{x:.1f}" for x in row) + " | " +
                  (f"{statistics.mean(row[:t]):.1f}" if t else "") + " |" for t, row in enumerate(R)]
        lines.append("")
    return "\n".join(lines)

def table(root):
    lines = []
    sweep = load(root, "sweep")
    if sweep:
        lines += ["## Sweep (eval splits, seed 0, OP %)", "", "| run | OP (answering learner) | OP (fast) |",
                  "|---|---|---|"]
        lines += [f"| {n} | {100 * r['metrics'][r['learners'][0]]['OP']:.2f} ({r['learners'][0]}) | "
                  f"{100 * r['metrics']['fast']['OP']:.2f} |" for n, r in sweep.items()]
        lines += ["", "Chosen: " + "; ".join(f"{m}: {s} (OP {100 * op:.2f})"
                                            for m, (s, op) in best_settings(root).items()), ""]
    groups = final_groups(root)
    if groups:
        lines += ["## Final (test splits; mean ± sd over seeds, %)", "",
                  "| method | setting | learner | seeds | OP | BWT | FWT | F | train tok/s | train s | eval s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for (method, setting, learner), runs in groups:
            m = [r["metrics"][learner] for r in runs]
            tim = [r["timing"] for r in runs]
            lines.append(f"| {method} | {setting} | {learner} | {len(runs)} | " + " | ".join(
                mean_sd([x[k] for x in m]) for k in ("OP", "BWT", "FWT", "F")) +
                f" | {statistics.mean(t['train_tokens_per_s'] for t in tim):.0f}"
                f" | {statistics.mean(t['train_seconds'] for t in tim):.0f}"
                f" | {statistics.mean(t['eval_seconds'] for t in tim):.0f} |")
    return "\n".join(lines)

def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("phase", choices=["sweep", "final", "all", "table"])
    p.add_argument("--data-dir", default=str(HERE.parent.parent / "shared/data/trace_500"))
    p.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    p.add_argument("--root", default=str(HERE / "results/trace8"), help="where the runs are written")
    p.add_argument("--seeds", default="0,1", help="final phase")
    p.add_argument("-j", "--parallel", type=int, default=6, help="runs at once")
    p.add_argument("--deadline", type=float, default=0, help="stop every run after this many seconds, 0 = never")
    p.add_argument("--matrices", action="store_true", help="also print the mean R matrix of every final group")
    p.add_argument("--extra", default="", help="more ilora.py arguments for every run (e.g. caps for a smoke test)")
    args = p.parse_args()
    root, seeds = pathlib.Path(args.root), [int(s) for s in args.seeds.split(",")]
    base = ["--model", args.model, "--data-dir", args.data_dir, *COMMON, *args.extra.split()]
    queued = set()

    def finals_ready():  # final runs of every method whose sweep is complete and whose finals are not queued yet
        jobs = []
        for method, (setting, _) in best_settings(root).items():
            if method not in queued:
                queued.add(method)
                jobs += final_jobs(root, base, method, setting, seeds)
        return jobs

    if args.phase in ("sweep", "all"):
        jobs = [job for method in SWEEP for job in sweep_jobs(root, base, method)]
        run_jobs(jobs, args.parallel, args.deadline, finals_ready if args.phase == "all" else lambda: [])
    elif args.phase == "final":
        missing = [m for m in SWEEP if m not in best_settings(root)]
        if missing:
            sys.exit(f"error: the sweep of {', '.join(missing)} under {root / 'sweep'} is not complete")
        run_jobs(finals_ready(), args.parallel, args.deadline)
    if args.matrices:
        print(matrices(root))
    print(table(root))

if __name__ == "__main__":
    main()
