"""Recompute R and the continual-learning metrics of a finished ilora.py run from its saved predictions.

Any scorer, no model and no GPU; the task data must be what the run read (checked against its fingerprint):

    python experiments/rescore.py RUN_DIR                        # the run's own scorers: gives back its R exactly
    python experiments/rescore.py RUN_DIR --metric FOMC=choice,NumGLUE-cm=number --data-dir ../shared/data/trace_500
Writes RUN_DIR/rescored.json and prints R and OP, BWT, FWT and F. Besides ilora.py's scorers, two lenient ones
are here for re-scoring: `choice` (the first choice letter standing alone anywhere) and `number` (the first number
anywhere), which the project used before it had TRACE's exact scorers.
"""
import argparse, json, pathlib, re, sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # ilora.py is one folder up
import ilora

LETTER = r"\b[A-E]\b"                  # a choice letter standing alone: 'B' in 'Answer: B.'
NUMBER = r"-?\d+(?:,\d{3})*(?:\.\d+)?"  # a number: '1200' in 'It is 1,200'

def first(pattern, text):
    """The first match of pattern in text, thousands commas removed, or None."""
    match = re.search(pattern, text)
    return match.group(0).replace(",", "") if match else None

def same_choice(pred, answer):
    return first(LETTER, pred) is not None and first(LETTER, pred) == first(LETTER, answer)

def same_number(pred, answer):
    p, a = first(NUMBER, pred), first(NUMBER, answer)
    return p is not None and a is not None and float(p) == float(a)

ilora.METRICS["choice"] = lambda p, a, q: float(same_choice(p, a))
ilora.METRICS["number"] = lambda p, a, q: float(same_number(p, a))

def read_predictions(folder):
    """config.json and the predictions of the run in `folder`, as {learner: {row of R: {task: [answers]}}}."""
    import pyarrow.parquet as pq
    try:
        saved = json.loads((folder / "config.json").read_text())
        rows = pq.read_table(folder / "predictions.parquet").to_pylist()
    except Exception as e:
        raise ilora.UsageError(f"{folder}: cannot read its config.json and predictions.parquet ({type(e).__name__})")
    by = {}
    for p in rows:
        by.setdefault(p["learner"], {}).setdefault(p["row"], {}).setdefault(p["task"], {})[p["index"]] = p["prediction"]
    answers = {learner: {t: {task: [ps[i] for i in range(len(ps))] for task, ps in tasks.items()}
                         for t, tasks in rows_of.items()} for learner, rows_of in by.items()}
    return saved, answers

def task_metrics(metric, names):
    """Scorer name per task: the TASK=NAME overrides in `metric`, then TRACE's table, else the lenient exact match."""
    chosen = {name: ilora.TASK_METRICS.get(name, "em") for name in names}
    for item in filter(None, (s.strip() for s in metric.split(","))):
        task, _, name = item.partition("=")
        if name not in ilora.METRICS:
            raise ilora.UsageError(f"unknown metric {name!r} in --metric (one of {', '.join(ilora.METRICS)})")
        if task not in chosen:
            raise ilora.UsageError(f"--metric names task {task!r}, which the run does not have")
        chosen[task] = name
    return chosen

def rescore(folder, metric="", data_dir=""):
    """R and metrics of the run in `folder` from its predictions, scored with `metric`'s overrides (else the
    run's own); written to rescored.json there."""
    folder = pathlib.Path(folder)
    saved, answers = read_predictions(folder)
    cfg = ilora.Config(**{f.name: saved[f.name] for f in ilora.dataclasses.fields(ilora.Config) if f.name in saved})
    metric = metric or saved.get("metric", "")  # runs of former versions could set --metric
    cfg.data_dir = data_dir or cfg.data_dir
    tasks = ilora.load_tasks(cfg)
    changed = [k for k, v in ilora.data_fingerprint(tasks).items() if saved.get("fingerprint", {}).get(k) != v]
    if changed:
        raise ilora.UsageError(f"{folder}: the task data differs from what the run read ({', '.join(changed)})")
    metrics = task_metrics(metric, list(tasks))
    R = {}
    for learner, rows in answers.items():
        R[learner] = [None] * (len(tasks) + 1)
        for t, preds in rows.items():
            R[learner][t] = ilora.score(tasks, preds, metrics, cfg.eval_split)
    results = {"tasks": list(tasks), "metrics_per_task": metrics, "R": R,
               "metrics": {k: ilora.cl_metrics(v) for k, v in R.items()}}
    ilora.write_json(folder / "rescored.json", results)
    return results

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", help="--out folder of a finished ilora.py run")
    p.add_argument("--metric", default="", help="per-task scorer overrides, TASK=NAME,..., plus choice and "
                                                "number")
    p.add_argument("--data-dir", default="", help="where the run's task folders are now, if they moved")
    args = p.parse_args(argv)
    try:
        res = rescore(args.run, args.metric, args.data_dir)
    except ilora.UsageError as e:
        sys.exit(f"error: {e}")
    for k, R in res["R"].items():
        print(ilora.format_R(R, res["tasks"], k))
        m = res["metrics"][k]
        print(f"({k}): " + " | ".join(f"{key} {100 * m[key]:.2f}" if m[key] is not None else f"{key} -"
                                     for key in ("OP", "BWT", "FWT", "F")))
    return res

if __name__ == "__main__":
    main()
