"""Issue 14's comparison: the TRACE-8 finals under TRACE's exact scorers (results/trace8/final-exact, re-run) and
under the former lenient scorers (results/trace8/final), plus the same new predictions re-scored with the lenient
choice/number scorers on the five classification and arithmetic tasks (rescore.py; no GPU).

    python rescore_finals.py --data-dir ../../shared/data/trace_500
"""
import argparse, json, pathlib, shutil, statistics, subprocess, sys, tempfile

HERE = pathlib.Path(__file__).resolve().parent
LENIENT = "C-STANCE=choice,FOMC=choice,ScienceQA=choice,NumGLUE-cm=number,NumGLUE-ds=number"
GROUPS = [("seq", "seq-lr0.001", "fast"), ("replay", "replay-lr0.003", "fast"),
          ("ilora slow", "ilora-lr0.001-lam0.9-gamma0.1", "slow"), ("ilora fast", "ilora-lr0.001-lam0.9-gamma0.1", "fast")]

def op(folder, name, learner, seed, rescored=None):
    res = rescored or json.loads((folder / f"{name}-s{seed}" / "results.json").read_text())
    return 100 * res["metrics"][learner]["OP"]

def rescore(folder, name, seed, data_dir):
    with tempfile.TemporaryDirectory() as tmp:  # a copy: rescore.py writes rescored.json into the run folder
        run = pathlib.Path(shutil.copytree(folder / f"{name}-s{seed}", pathlib.Path(tmp) / "run"))
        subprocess.run([sys.executable, str(HERE / "rescore.py"), str(run), "--metric", LENIENT,
                        "--data-dir", data_dir], check=True, capture_output=True)
        return json.loads((run / "rescored.json").read_text())

def paired(a, b):
    """Mean of b - a over seeds and the half-width of its 95 % t interval (3 degrees of freedom for 4 seeds)."""
    d = [y - x for x, y in zip(a, b)]
    t = {1: 12.706, 2: 4.303, 3: 3.182}[len(d) - 1]
    return statistics.mean(d), t * statistics.stdev(d) / len(d) ** 0.5

def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=str(HERE.parent.parent / "shared/data/trace_500"))
    args = p.parse_args()
    old, new = HERE / "results/trace8/final", HERE / "results/trace8/final-exact"
    rows, ops = [], {}
    for label, name, learner in GROUPS:
        ops[label] = {"old": [op(old, name, learner, s) for s in range(4)],
                      "exact": [op(new, name, learner, s) for s in range(4)],
                      "lenient": [op(new, name, learner, s, rescore(new, name, s, args.data_dir)) for s in range(4)]}
        rows.append(f"| {label} | " + " | ".join(f"{statistics.mean(v):.2f} ± {statistics.stdev(v):.2f}"
                                                for v in ops[label].values()) + " |")
    print("| method | OP, former scorers (earlier runs) | OP, TRACE's scorers (re-run) | same re-run, lenient "
          "choice/number re-score |\n|---|---|---|---|\n" + "\n".join(rows))
    for key in ("old", "exact", "lenient"):
        m, h = paired(ops["replay"][key], ops["ilora slow"][key])
        print(f"ilora slow - replay, paired by seed ({key}): {m:+.2f} ± {h:.2f} (95 %); per seed "
              + ", ".join(f"{y - x:+.2f}" for x, y in zip(ops["replay"][key], ops["ilora slow"][key])))

if __name__ == "__main__":
    main()
