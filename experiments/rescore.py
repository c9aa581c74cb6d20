"""Recompute R and the continual-learning metrics of a finished ilora.py run from its saved predictions, with any
scorer: no model, no GPU. The task data must be what the run read (checked against its fingerprint).

    python rescore.py RUN_DIR                                   # the run's own scorers: reproduces its R exactly
    python rescore.py RUN_DIR --metric FOMC=choice,NumGLUE-cm=number --data-dir ../../shared/data/trace_500
Writes RUN_DIR/rescored.json and prints R.
"""
import argparse, json, pathlib, sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # ilora.py is one folder up
import ilora

def rescore(folder, metric="", data_dir=""):
    """R and metrics of the run in `folder` from its predictions.parquet, scored with `metric`'s overrides (else
    the run's own); written to rescored.json there."""
    import pyarrow.parquet as pq
    folder = pathlib.Path(folder)
    try:
        saved = json.loads((folder / "config.json").read_text())
        preds = pq.read_table(folder / "predictions.parquet").to_pylist()
    except Exception as e:
        raise ilora.UsageError(f"{folder}: cannot read its config.json and predictions.parquet ({type(e).__name__})")
    cfg = ilora.Config(**{f.name: saved[f.name] for f in ilora.dataclasses.fields(ilora.Config) if f.name in saved})
    cfg.metric, cfg.data_dir = metric or cfg.metric, data_dir or cfg.data_dir
    tasks = ilora.load_tasks(cfg)
    if changed := [k for k, v in ilora.data_fingerprint(tasks).items() if saved.get("fingerprint", {}).get(k) != v]:
        raise ilora.UsageError(f"{folder}: the task data differs from what the run read ({', '.join(changed)})")
    metrics, by = ilora.task_metrics(cfg, list(tasks)), {}
    for p in preds:  # learner -> row of R -> task -> index -> prediction
        by.setdefault(p["learner"], {}).setdefault(p["row"], {}).setdefault(p["task"], {})[p["index"]] = p["prediction"]
    R = {k: [ilora.score(tasks, {n: [ps[n][i] for i in range(len(ps[n]))] for n in ps}, metrics, cfg.eval_split)
             if (ps := rows.get(t)) else None for t in range(len(tasks) + 1)] for k, rows in by.items()}
    results = {"tasks": list(tasks), "metrics_per_task": metrics, "R": R,
               "metrics": {k: ilora.cl_metrics(v) for k, v in R.items()}}
    ilora.write_json(folder / "rescored.json", results)
    return results

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", help="--out folder of a finished ilora.py run")
    p.add_argument("--metric", default="", help="per-task scorer overrides, as ilora.py --metric")
    p.add_argument("--data-dir", default="", help="where the run's task folders are now, if they moved")
    args = p.parse_args(argv)
    try:
        res = rescore(args.run, args.metric, args.data_dir)
    except ilora.UsageError as e:
        sys.exit(f"error: {e}")
    for k, R in res["R"].items():
        print(ilora.format_R(R, res["tasks"], k))
    return res

if __name__ == "__main__":
    main()
