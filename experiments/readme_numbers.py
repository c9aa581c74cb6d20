"""Keep the numbers in README.md true. Every block of numbers there sits between `<!-- numbers: NAME -->` and
`<!-- /numbers -->` and is written by this script from results committed under experiments/results/:

    python experiments/readme_numbers.py           # rewrite README.md's blocks from the committed results
    python experiments/readme_numbers.py --check   # exit 1 if a block differs, or the demo ran on other code (CI)
    python experiments/readme_numbers.py --run     # run the README's default demo again (each method), rewrite

The demo's runs record the code they ran on (code.sha256: ilora.py's syntax tree without its docstrings), so a
change of ilora.py's code fails --check until the demo is run again: the README's demo table always comes from
the code it ships with. The TRACE-8 tables come from GPU runs; the README names the code and card they ran on.
"""
import argparse, ast, hashlib, json, pathlib, re, statistics, subprocess, sys

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
README = ROOT / "README.md"
DEMO = HERE / "results" / "default"
DEMO_METHODS = ("seq", "replay", "ilora")  # `python ilora.py --method METHOD`, ilora last: the default
TRACE8 = HERE / "results" / "trace8" / "final-exact"
STUDY = HERE / "results" / "study"
FINALS_RUNS = 40  # study.py finals: 5 arms, seeds 0 to 3, TRACE's order and the reversed one
sys.path.insert(0, str(ROOT))  # ilora.py is one folder up
import ilora
import study

def is_docstring(statement):
    is_constant = isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant)
    return is_constant and isinstance(statement.value.value, str)

def code_fingerprint(path=ROOT / "ilora.py"):
    """sha256 of a Python file's syntax tree without docstrings: comments and docstrings may change, code not."""
    tree = ast.parse(pathlib.Path(path).read_text())
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and is_docstring(body[0]):
            node.body = body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest()

def metrics_line(method, learner, m):
    cells = [f"{key} {100 * m[key]:.2f}" if m[key] is not None else f"{key} -" for key in ("OP", "BWT", "FWT", "F")]
    return f"{method} ({learner}): " + " | ".join(cells)

def demo_block():
    """The default run (`python ilora.py`), and seq's and replay's: R of the answering learner, metrics, wall time."""
    lines = ["```"]
    for method in DEMO_METHODS:
        res = json.loads((DEMO / method / "results.json").read_text())
        learner = res["learners"][0]
        timing = res["timing"]
        lines += [f"$ python ilora.py{'' if method == 'ilora' else f' --method {method}'}    # train "
                  f"{timing['train_seconds']:.0f} s, scoring {timing['eval_seconds']:.0f} s on {timing['device']}",
                  ilora.format_R(res["R"][learner], res["tasks"], learner),
                  metrics_line(method, learner, res["metrics"][learner]), ""]
    return "\n".join(lines[:-1] + ["```"])

def mean_sd(xs):
    xs = [100 * x for x in xs]
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}"

def trace8_block():
    """TRACE-8 finals (test splits, 4 seeds, TRACE's scorers): mean ± sd, and I-LoRA minus replay paired by seed."""
    groups = {}
    for path in sorted(TRACE8.glob("*/results.json")):
        res = json.loads(path.read_text())
        setting = path.parent.name.rsplit("-s", 1)[0]
        for learner in res["learners"]:
            groups.setdefault((setting, learner), []).append(res["metrics"][learner])
    lines = ["| method, setting | learner | seeds | OP | BWT | FWT | F |", "|---|---|---|---|---|---|---|"]
    for (setting, learner), ms in groups.items():
        lines.append(f"| {setting} | {learner} | {len(ms)} | " +
                     " | ".join(mean_sd([m[k] for m in ms]) for k in ("OP", "BWT", "FWT", "F")) + " |")
    slow = [m["OP"] for (setting, learner), ms in groups.items() if learner == "slow" for m in ms]
    replay = [m["OP"] for (setting, learner), ms in groups.items() if setting.startswith("replay") for m in ms]
    diffs = [100 * (a - b) for a, b in zip(slow, replay)]
    half = 3.182 * statistics.stdev(diffs) / len(diffs) ** 0.5  # 95 % t interval, 3 degrees of freedom
    lines += ["", f"I-LoRA's slow learner minus replay, paired by seed: {statistics.mean(diffs):+.2f} OP points, "
                  f"95 % interval ± {half:.2f} ({len(diffs)} pairs)."]
    return "\n".join(lines)

def finals_block():
    """The study's finals so far (study.py report, without the skill column, which needs the tasks' answers, and
    without the runs of the former seeding, which RESULTS.md reads)."""
    runs = len(list((STUDY / "finals").glob("*/results.json")))
    if runs == 0:
        return f"No run of the {FINALS_RUNS} has finished yet."
    return f"{study.report(STUDY, redraws=False)}\n\nFinished runs: {runs} of {FINALS_RUNS}."

BLOCKS = {"demo": demo_block, "trace8": trace8_block, "finals": finals_block}

def rewritten(text):
    """README text with every numbers block written anew."""
    def fill(match):
        return f"<!-- numbers: {match.group(1)} -->\n{BLOCKS[match.group(1)]()}\n<!-- /numbers -->"
    return re.sub(r"<!-- numbers: (\w+) -->\n.*?<!-- /numbers -->", fill, text, flags=re.S)

def problems():
    """What makes the README's numbers untrue now: a block that differs, a demo run of other code."""
    found = []
    text = README.read_text()
    if rewritten(text) != text:
        found.append("README.md's numbers differ from the committed results: run python experiments/readme_numbers.py")
    for method in DEMO_METHODS:
        recorded = (DEMO / method / "code.sha256").read_text().strip()
        if recorded != code_fingerprint():
            found.append(f"the demo's {method} run is of other code than ilora.py's: run "
                         f"python experiments/readme_numbers.py --run")
    return found

def run_demo():
    for method in DEMO_METHODS:
        out = DEMO / method
        subprocess.run([sys.executable, str(ROOT / "ilora.py"), "--method", method, "--out", str(out), "--overwrite"],
                       check=True)
        for extra in out.glob("task_*"):  # the adapters stay out of the repository
            subprocess.run(["rm", "-r", str(extra)], check=True)
        (out / "checkpoint.pt").unlink()
        (out / "code.sha256").write_text(code_fingerprint() + "\n")

def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 if the README's numbers are not true now")
    p.add_argument("--run", action="store_true", help="run the default demo again first")
    args = p.parse_args()
    if args.check:
        found = problems()
        for problem in found:
            print(f"error: {problem}", file=sys.stderr)
        sys.exit(1 if found else 0)
    if args.run:
        run_demo()
    README.write_text(rewritten(README.read_text()))

if __name__ == "__main__":
    main()
