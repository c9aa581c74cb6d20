"""A choice task's score beside its majority-answer score: what a model gets by always giving one answer, the best
of the gold ones, and the skill above that. From finished runs' predictions, no model:

    python experiments/majority.py experiments/results/trace8/final-exact/*     # one row a run and choice task
    python experiments/majority.py --when learned RUN ...   # the score just after the task's own training
For every run, learner and choice task (C-STANCE, FOMC, ScienceQA, or --tasks): the final score (last row of R),
the majority-answer score on the same split under the same scorer, the skill (the difference), and how much of
the model's answers is its own most common answer (1.00: it always gives one letter).
"""
import argparse, pathlib, statistics, sys
from collections import Counter

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # ilora.py is one folder up
import ilora
from rescore import read_predictions, task_metrics

CHOICE_TASKS = ["C-STANCE", "FOMC", "ScienceQA"]

DATA = pathlib.Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "trace_500"

def majority_rows(folder, task_names=CHOICE_TASKS, data_dir=DATA, when="final"):
    """(run, learner, task, score, majority score, skill, share of the model's most common answer). when: "final"
    scores the last row of R (after the last task), "learned" the row just after the task's own training."""
    folder = pathlib.Path(folder)
    saved, answers = read_predictions(folder)
    cfg = ilora.Config(**{f.name: saved[f.name] for f in ilora.dataclasses.fields(ilora.Config) if f.name in saved})
    cfg.data_dir = str(data_dir)
    tasks = ilora.load_tasks(cfg)
    metrics = task_metrics(saved.get("metric", ""), list(tasks))
    rows = []
    for learner, by_row in answers.items():
        for name in task_names:
            if name not in tasks:
                continue
            row = max(by_row)  # the last row of R: after the last task
            if when == "learned":
                row = list(tasks).index(name) + 1
            if row not in by_row:  # a run scored with --no-eval-every-task has no such row
                continue
            preds = by_row[row]
            records = tasks[name][cfg.eval_split]
            scorer = ilora.METRICS[metrics[name]]
            score = statistics.mean(scorer(p, r["answer"], r["prompt"]) for p, r in zip(preds[name], records))
            # the best constant answer among the gold ones: under first_char, the most common first letter
            base = max(statistics.mean(scorer(a, r["answer"], r["prompt"]) for r in records)
                       for a in {r["answer"] for r in records})
            top_share = Counter(preds[name]).most_common(1)[0][1] / len(preds[name])
            rows.append((folder.name, learner, name, score, base, score - base, top_share))
    return rows

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="--out folders of finished ilora.py runs")
    p.add_argument("--tasks", default=",".join(CHOICE_TASKS), help="the choice tasks")
    p.add_argument("--data-dir", default=str(DATA), help="where the runs' task folders are")
    p.add_argument("--when", choices=["final", "learned"], default="final",
                   help="score after the last task, or just after the task's own training")
    args = p.parse_args(argv)
    print("| run | learner | task | score | majority answer's score | skill | model's most common answer |")
    print("|---|---|---|---|---|---|---|")
    all_rows = []
    for folder in args.runs:
        if not (pathlib.Path(folder) / "predictions.parquet").is_file():
            continue
        rows = majority_rows(folder, args.tasks.split(","), args.data_dir, args.when)
        for run, learner, task, score, base, skill, share in rows:
            all_rows.append((run, learner, task, score, base, skill, share))
            print(f"| {run} | {learner} | {task} | {100 * score:.1f} | {100 * base:.1f} | {100 * skill:+.1f} | "
                  f"{100 * share:.0f} % |")
    groups = {}  # the same setting over seeds: run names that differ only in their -s<seed> end
    for run, learner, task, score, base, skill, share in all_rows:
        groups.setdefault((run.rsplit("-s", 1)[0], learner, task), []).append((score, base, skill))
    print("\n| setting | learner | task | runs | score | majority answer's score | skill (mean ± sd) |")
    print("|---|---|---|---|---|---|---|")
    for (setting, learner, task), xs in groups.items():
        skills = [100 * skill for _, _, skill in xs]
        spread = f" ± {statistics.stdev(skills):.1f}" if len(skills) > 1 else ""
        print(f"| {setting} | {learner} | {task} | {len(xs)} | {100 * statistics.mean(x[0] for x in xs):.1f} | "
              f"{100 * statistics.mean(x[1] for x in xs):.1f} | {statistics.mean(skills):+.1f}{spread} |")
    return all_rows

if __name__ == "__main__":
    main()
