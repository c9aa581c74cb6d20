"""The study of issue 22 (RESULTS.md, "Does I-LoRA help?"): waves of ilora.py runs side by side on one GPU, from a
resumable queue. Each phase is a fixed list of named runs; a finished run (same settings) is skipped, a run stopped
at --deadline continues with --resume next time, so the same command is repeated until a phase is done:

    python experiments/study.py repro  --root /root/study --data-dir /root/ilora-data/trace_500 \\
        --model /root/ilora-model/smollm2-135m-instruct -j 12 --deadline 520
    python experiments/study.py pilot ...          # seq and replay; epochs 1, 3, 5; lr 1e-3, 3e-3; seeds 0, 1
    python experiments/study.py table repro        # the tables again, from the runs under --root
    python experiments/study.py pack pilot OUT     # the phase's runs as OUT/pilot-*.tgz, unfinished ones resumable

Every run uses --deterministic (the default of ilora.py) unless its phase says otherwise.
"""
import argparse, itertools, json, pathlib, sys, tarfile

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # ilora.py is one folder up
from trace8 import run_jobs  # runs (out, argv) jobs side by side; skips finished ones, resumes stopped ones

TRACE8 = "C-STANCE,FOMC,MeetingBank,Py150,ScienceQA,NumGLUE-cm,NumGLUE-ds,20Minuten"
FOUR = "C-STANCE,FOMC,ScienceQA,NumGLUE-cm"  # the four tasks of the reproducibility check in issue 22
# Fixed for every run: max_len 768 keeps most of the long prompts (MeetingBank, 20Minuten); 64 new tokens cover
# every short answer and the first sentences of a summary.
COMMON = ["--batch-size", "8", "--max-len", "768", "--max-new-tokens", "64", "--r", "8", "--alpha", "16",
          "--dropout", "0.05", "--buffer-size", "500", "--eval-batch-size", "100", "--log-every", "50"]

def args_of(setting):
    return list(itertools.chain.from_iterable((f"--{k.replace('_', '-')}", str(v)) for k, v in setting.items()))

def phase_runs(phase):
    """{run name: ilora.py arguments} of a phase."""
    runs = {}
    if phase == "repro":  # the same command twice, with and without deterministic kernels; seq and replay beside
        ilora_3e = {"tasks": FOUR, "epochs": 3, "eval_split": "test", "method": "ilora", "lr": 3e-3, "lam": 0.9,
                    "gamma": 0.1, "eval_learner": "both"}
        for kernels, copy in itertools.product(("det", "nondet"), ("a", "b")):
            flag = "--deterministic" if kernels == "det" else "--no-deterministic"
            runs[f"ilora-{kernels}-{copy}"] = [*args_of(ilora_3e), flag]
        for method in ("seq", "replay"):
            runs[f"{method}-det"] = args_of({**ilora_3e, "method": method, "eval_learner": "fast"})
    if phase == "pilot":  # the budget: where seq clearly forgets and most tasks are learned
        for epochs, method, lr, seed in itertools.product((1, 3, 5), ("seq", "replay"), (1e-3, 3e-3), (0, 1)):
            runs[f"{method}-e{epochs}-lr{lr:g}-s{seed}"] = args_of({"tasks": TRACE8, "epochs": epochs, "lr": lr,
                                                                    "seed": seed, "method": method,
                                                                    "eval_split": "eval"})
    return runs

def pack(root, runs, out, phase, limit=14 << 20):
    """The phase's runs as out/PHASE-0.tgz, PHASE-1.tgz, ... of at most `limit` bytes of files each (what a device
    call brings back): config, results, predictions and log of every run, and the checkpoint of every unfinished
    one, so that a later wave on another machine resumes it. No adapters."""
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for name in runs:
        keep = ["config.json", "results.json", "predictions.parquet", "log.txt"]
        if not (root / name / "results.json").is_file():
            keep.append("checkpoint.pt")
        files += [(root / name / file, f"{name}/{file}") for file in keep if (root / name / file).is_file()]
    parts, size = [[]], 0
    for path, arcname in files:
        if parts[-1] and size + path.stat().st_size > limit:
            parts.append([])
            size = 0
        parts[-1].append((path, arcname))
        size += path.stat().st_size
    for i, part in enumerate(parts):
        with tarfile.open(out / f"{phase}-{i}.tgz", "w:gz") as tar:
            for path, arcname in part:
                tar.add(path, arcname=arcname)

def load(root, runs):
    found = {}
    for name in runs:
        path = root / name / "results.json"
        if path.is_file():
            found[name] = json.loads(path.read_text())
    return found

def table(root, phase):
    runs = phase_runs(phase)
    done = load(root, runs)
    lines = [f"{len(done)} of {len(runs)} runs of {phase} finished", "",
             "| run | learner | OP | BWT | FWT | F | R after task 1 | train s | eval s |", "|---" * 9 + "|"]
    for name, res in done.items():
        for learner in res["learners"]:
            m = res["metrics"][learner]
            cells = [f"{100 * m[k]:.2f}" if m[k] is not None else "-" for k in ("OP", "BWT", "FWT", "F")]
            first = " ".join(f"{100 * v:.1f}" for v in res["R"][learner][1]) if res["R"][learner][1] else "-"
            lines.append(f"| {name} | {learner} | " + " | ".join(cells) + f" | {first} | "
                         f"{res['timing']['train_seconds']:.0f} | {res['timing']['eval_seconds']:.0f} |")
    return "\n".join(lines)

def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("action", choices=["repro", "pilot", "table", "pack"])
    p.add_argument("phase", nargs="?", help="table and pack: the phase")
    p.add_argument("dest", nargs="?", help="pack: the folder that receives PHASE-*.tgz")
    p.add_argument("--data-dir", default=str(HERE.parent.parent / "shared/data/trace_500"))
    p.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    p.add_argument("--root", default=str(HERE / "results/study"), help="where the runs are written")
    p.add_argument("-j", "--parallel", type=int, default=12, help="runs at once")
    p.add_argument("--deadline", type=float, default=0, help="stop every run after this many seconds, 0 = never")
    p.add_argument("--extra", default="", help="more ilora.py arguments for every run (caps for a smoke test)")
    args = p.parse_args()
    root = pathlib.Path(args.root)
    if args.action == "table":
        print(table(root / args.phase, args.phase))
        return
    if args.action == "pack":
        pack(root / args.phase, phase_runs(args.phase), pathlib.Path(args.dest), args.phase)
        return
    base = ["--model", args.model, "--data-dir", args.data_dir, *COMMON, *args.extra.split()]
    jobs = [(root / args.action / name, [*base, *argv]) for name, argv in phase_runs(args.action).items()]
    run_jobs(jobs, args.parallel, args.deadline)
    print(table(root / args.action, args.action))

if __name__ == "__main__":
    main()
