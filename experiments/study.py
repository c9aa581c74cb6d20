"""The study of issue 22 (RESULTS.md, "Does I-LoRA help?"): waves of ilora.py runs side by side on one GPU, from a
resumable queue. Each phase is a fixed list of named runs; a finished run (same settings) is skipped, a run stopped
at --deadline continues with --resume next time, so the same command is repeated until a phase is done. Phases, in
order (each later one needs the rule of the one before to have decided):

    python experiments/study.py repro  --root /root/study --data-dir /root/ilora-data/trace_500 \\
        --model /root/ilora-model/smollm2-135m-instruct -j 12 --deadline 520
    python experiments/study.py pilot ...    # seq, replay; epochs 1, 3, 5; lr 1e-3, 3e-3; seeds 0, 1 -> the budget
    python experiments/study.py lr ...       # screen 1: seq, replay, ilora (lam 0.9, gamma 0.1) over 4 lrs
    python experiments/study.py grid ...     # screen 2: ilora at its lr over lam x gamma, gamma 0, lam 0.25
    python experiments/study.py finals ...   # test splits, 4 seeds, TRACE's order and the reversed one

and the rules and reports, from the finished runs under --decided (default: the committed ones, results/study/;
no model, no GPU), then what a wave needs, from the runs under --root:

    python experiments/study.py budget       # the pilot's table and the epochs it chooses
    python experiments/study.py select       # the screen's tables, each method's lr and the best ilora setting
    python experiments/study.py report       # the finals: metrics, skill above the majority, paired intervals
    python experiments/study.py table PHASE  # one line a finished run
    python experiments/study.py pack PHASE OUT   # the phase's runs as OUT/FOLDER-*.tgz, unfinished ones resumable
                                                 # (FOLDER: the phase's, screen for lr and grid)
    python experiments/study.py collect PHASE .study   # the finished runs in .study/FOLDER-*.tgz into the
                                                       # committed results (--decided), to be committed

Every run uses --deterministic (the default of ilora.py) unless its phase says otherwise.
"""
import argparse, itertools, math, pathlib, re, statistics, sys, tarfile

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # ilora.py is one folder up
import ilora
from trace8 import load, mean_sd, run_jobs  # run_jobs: jobs side by side; finished ones skipped, stopped ones resumed
from majority import CHOICE_TASKS, DATA, majority_rows

TRACE8 = "C-STANCE,FOMC,MeetingBank,Py150,ScienceQA,NumGLUE-cm,NumGLUE-ds,20Minuten"
REVERSED = ",".join(reversed(TRACE8.split(",")))
FOUR = "C-STANCE,FOMC,ScienceQA,NumGLUE-cm"  # the four tasks of the reproducibility check in issue 22
# Fixed for every run: max_len 768 keeps most of the long prompts (MeetingBank, 20Minuten); 64 new tokens cover
# every short answer and the first sentences of a summary.
COMMON = ["--batch-size", "8", "--max-len", "768", "--max-new-tokens", "64", "--r", "8", "--alpha", "16",
          "--dropout", "0.05", "--buffer-size", "500", "--eval-batch-size", "100", "--log-every", "50"]
LRS = (5e-4, 1e-3, 2e-3, 3e-3)
LAMS = (0.8, 0.9, 0.95, 0.98)
GAMMAS = (0.03, 0.1, 0.3, 1.0)
SCREEN_SEEDS = (0, 1)
FINAL_SEEDS = (0, 1, 2, 3)
FOLDER = {"repro": "repro", "pilot": "pilot", "lr": "screen", "grid": "screen", "finals": "finals"}
TIE = 1.0  # OP gaps under 1 point are ties
RUN_FILES = ("config.json", "results.json", "predictions.parquet", "log.txt")  # what a run keeps; no adapters

def points(x):
    """A score or a gap in [0, 1] as points, rounded off below 1e-9: an exact 1-point gap stays exactly 1."""
    return round(100 * x, 9)

class NotDecided(Exception):
    """A phase needs the decision of an earlier phase that is not complete."""

def args_of(setting):
    return list(itertools.chain.from_iterable((f"--{k.replace('_', '-')}", str(v)) for k, v in setting.items()))

def setting_name(setting):
    """'seq-lr0.001', 'ilora-lr0.001-lam0.9-g0.1': a screen setting without its seed."""
    parts = [setting["method"], f"lr{setting['lr']:g}"]
    if setting["method"] == "ilora":
        parts += [f"lam{setting['lam']:g}", f"g{setting['gamma']:g}"]
    return "-".join(parts)

def screen_runs(settings, epochs):
    """The screen's runs of `settings`: eval splits, 2 seeds, R scored before and after only (OP decides)."""
    runs = {}
    for setting, seed in itertools.product(settings, SCREEN_SEEDS):
        learner = {"eval_learner": "both"} if setting["method"] == "ilora" else {}
        argv = args_of({"tasks": TRACE8, "epochs": epochs, "eval_split": "eval", "seed": seed, **setting, **learner})
        # the static KV cache, as every screen run decoded (--kv-cache auto would leave it for their 16 to 24 batches)
        runs[f"{setting_name(setting)}-s{seed}"] = [*argv, "--no-eval-every-task", "--kv-cache", "static"]
    return runs

def lr_settings():
    """Screen 1: each method over the learning rates; ilora at lam 0.9, gamma 0.1 (the 1-epoch study's best)."""
    settings = []
    for method, lr in itertools.product(("seq", "replay", "ilora"), LRS):
        setting = {"method": method, "lr": lr}
        if method == "ilora":
            setting.update(lam=0.9, gamma=0.1)
        settings.append(setting)
    return settings

def grid_settings(lr):
    """Screen 2: ilora at its screen-1 lr over lam x gamma, gamma 0 at every lam (the slow learner alone, no
    consistency), and the authors' lam 0.25 with gamma 1."""
    pairs = list(itertools.product(LAMS, GAMMAS)) + [(lam, 0.0) for lam in LAMS] + [(0.25, 1.0)]
    return [{"method": "ilora", "lr": lr, "lam": lam, "gamma": gamma} for lam, gamma in pairs]

def final_arms(root):
    """{arm: setting} of the finals: seq and replay at their lr; ilora's best setting with gamma > 0, its twin with
    gamma 0 (the consistency ablation), lam 0.99 with gamma 1 (the former defaults) at ilora's lr, and the best
    ilora setting overall if it is none of these."""
    chosen = select(root)
    cons = chosen["ilora with consistency"]
    # in the order the runs start: the study's question (ilora against replay) first, then the ablation
    arms = {"ilora": cons, "replay": chosen["replay"], "ilora-g0": {**cons, "gamma": 0.0}, "seq": chosen["seq"],
            "ilora-old": {**cons, "lam": 0.99, "gamma": 1.0}}
    if chosen["ilora"] not in arms.values():
        arms["ilora-best"] = chosen["ilora"]
    return arms

def phase_runs(phase, root=None, data_dir=DATA):
    """{run name: ilora.py arguments} of a phase; later phases read the decisions of earlier ones from the runs
    under root (the committed results, so that a GPU machine reads them from its copy of the repository)."""
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
    if phase == "lr":
        runs = screen_runs(lr_settings(), budget(root, data_dir)[0])
    if phase == "grid":
        runs = screen_runs(grid_settings(best_lrs(root)["ilora"]), budget(root, data_dir)[0])
    if phase == "finals":
        epochs = budget(root, data_dir)[0]
        for (arm, setting), order, seed in itertools.product(final_arms(root).items(), ("trace", "reversed"),
                                                             FINAL_SEEDS):
            learner = {"eval_learner": "both"} if setting["method"] == "ilora" else {}
            tasks = TRACE8 if order == "trace" else REVERSED
            runs[f"{arm}-{order}-s{seed}"] = args_of({"tasks": tasks, "epochs": epochs, "eval_split": "test",
                                                      "seed": seed, **setting, **learner})
    return runs

# ----------------------------------------------------------------------------------------------------------------
# The rules, written down before the runs they judge.

def answering(res):
    """The learner that answers: the slow one for ilora (the first scored), the fast one otherwise."""
    return res["learners"][0]

def gains_after_training(res, folder, data_dir):
    """{task: score just after its own training minus a reference}: the majority answer's score for a choice task,
    the base model's score for the others. In points of [0, 1]."""
    learner = answering(res)
    R = res["R"][learner]
    gains = {task: R[i + 1][i] - R[0][i] for i, task in enumerate(res["tasks"])}
    for run, who, task, score, base, skill, share in majority_rows(folder, CHOICE_TASKS, data_dir, "learned"):
        if who == learner:
            gains[task] = skill
    return gains

LEARNED = 0.05  # a task is learned when its mean gain is above 5 points (5 of 100 eval answers; NumGLUE-cm has 41)

def pilot_summary(root, data_dir=DATA):
    """{(epochs, method, lr): {"OP", "BWT": means over the seeds, "learned": tasks whose mean gain is above
    LEARNED, "seeds"}} of the finished pilot runs."""
    folder = pathlib.Path(root) / "pilot"
    groups = {}
    for name, res in load(pathlib.Path(root), "pilot").items():
        method, epochs, lr, _ = name.split("-")
        m = res["metrics"][answering(res)]
        gains = gains_after_training(res, folder / name, data_dir)
        groups.setdefault((int(epochs[1:]), method, float(lr[2:])), []).append((m["OP"], m["BWT"], gains))
    summary = {}
    for key, runs in sorted(groups.items()):
        tasks = runs[0][2]
        learned = [t for t in tasks if points(statistics.mean(g[t] for _, _, g in runs)) > points(LEARNED)]
        summary[key] = {"OP": statistics.mean(r[0] for r in runs), "BWT": statistics.mean(r[1] for r in runs),
                        "learned": learned, "seeds": len(runs)}
    return summary

def choose_budget(summary, n_seeds=2, forgets=-0.05, most=6):
    """The pilot's rule. At each epoch count, each method at its lr of higher mean eval OP. A budget qualifies
    when seq forgets clearly there (mean BWT at most -5 points) and seq and replay each learn at least 6 of the 8
    tasks (mean gain just after the task's training above 5 points: over the majority answer for a choice task,
    over the base model otherwise). The fewest qualifying epochs win; if none qualifies, the epochs at which
    replay learns the most tasks (fewer epochs on a tie). Returns (epochs, whether it qualified, reasons)."""
    by_epochs = {}
    for (epochs, method, lr), row in summary.items():
        by_epochs.setdefault(epochs, {}).setdefault(method, []).append(row)
    checked = {}
    for epochs, methods in sorted(by_epochs.items()):
        complete = len(methods) == 2 and all(len(rows) == 2 and all(r["seeds"] == n_seeds for r in rows)
                                             for rows in methods.values())
        if not complete:
            raise NotDecided(f"the pilot's {epochs}-epoch runs are not all finished")
        best = {method: max(rows, key=lambda r: r["OP"]) for method, rows in methods.items()}
        forgot = points(best["seq"]["BWT"]) <= points(forgets)
        ok = forgot and all(len(best[m]["learned"]) >= most for m in ("seq", "replay"))
        checked[epochs] = (ok, len(best["replay"]["learned"]), best)
    if len(checked) < 3:
        raise NotDecided(f"the pilot has finished runs at {sorted(checked)} epochs of 1, 3 and 5")
    qualifying = [epochs for epochs, (ok, _, _) in checked.items() if ok]
    if qualifying:
        return min(qualifying), True, checked
    return max(checked, key=lambda e: (checked[e][1], -e)), False, checked

def budget(root, data_dir=DATA):
    return choose_budget(pilot_summary(root, data_dir))

def seeded(name):
    """(setting, seed) of a run name 'SETTING-sSEED', or None for any other folder."""
    match = re.fullmatch(r"(.+)-s(\d+)", name)
    return (match[1], int(match[2])) if match else None

def screen_means(root):
    """{setting name: (mean eval OP of the answering learner over the seeds, seeds)} of the finished screen runs
    (folders of the screen's seeds only)."""
    groups = {}
    for name, res in load(pathlib.Path(root), "screen").items():
        if seeded(name) and seeded(name)[1] in SCREEN_SEEDS:
            groups.setdefault(seeded(name)[0], []).append(res["metrics"][answering(res)]["OP"])
    return {name: (statistics.mean(ops), len(ops)) for name, ops in groups.items()}

def best_of(means, simplicity):
    """The setting of highest mean; gaps under 1 point are ties, and the simplest tied setting wins."""
    top = max(means.values())
    tied = [name for name, mean in means.items() if points(top - mean) < TIE]
    return min(tied, key=simplicity)

def require_complete(means, settings):
    missing = [setting_name(s) for s in settings if means.get(setting_name(s), (0, 0))[1] < len(SCREEN_SEEDS)]
    if missing:
        raise NotDecided(f"{len(missing)} screen settings are not finished, e.g. {missing[0]}")

def best_lrs(root):
    """Screen 1's rule: each method at the lr of highest mean eval OP (lr has no simpler value: no tie rule)."""
    means = screen_means(root)
    require_complete(means, lr_settings())
    chosen = {}
    for method in ("seq", "replay", "ilora"):
        settings = [s for s in lr_settings() if s["method"] == method]
        chosen[method] = max(settings, key=lambda s: means[setting_name(s)][0])["lr"]
    return chosen

def ilora_simplicity(setting):
    """The tie order: without consistency (gamma 0) before with it, then the smaller lam, then the smaller gamma."""
    return (setting["gamma"] > 0, setting["lam"], setting["gamma"])

def select(root):
    """The screen's decisions: seq's and replay's settings, the best ilora setting (the defaults to be), and the
    best ilora setting with consistency (gamma > 0)."""
    lrs = best_lrs(root)
    means = screen_means(root)
    grid = grid_settings(lrs["ilora"])
    require_complete(means, grid)
    def best(settings):
        by_name = {setting_name(s): s for s in settings}
        return by_name[best_of({n: means[n][0] for n in by_name}, lambda n: ilora_simplicity(by_name[n]))]
    return {"seq": {"method": "seq", "lr": lrs["seq"]}, "replay": {"method": "replay", "lr": lrs["replay"]},
            "ilora": best(grid), "ilora with consistency": best([s for s in grid if s["gamma"] > 0])}

# ----------------------------------------------------------------------------------------------------------------
# Packing, tables and reports.

def pack(root, runs, out, name, limit=14 << 20):
    """The runs as out/NAME-0.tgz, NAME-1.tgz, ... of at most `limit` bytes of files each (what a GPU command
    brings back): config, results, predictions and log of every run, and the checkpoint of every unfinished one,
    so that a later wave on another machine resumes it. No adapters. A run's files stay in one pack, so a pack
    that does not come back loses whole runs, which then start again, and never half of one."""
    out.mkdir(parents=True, exist_ok=True)
    parts, size = [[]], 0
    for run in runs:
        keep = list(RUN_FILES)
        if not (root / run / "results.json").is_file():
            keep.append("checkpoint.pt")
        files = [(root / run / file, f"{run}/{file}") for file in keep if (root / run / file).is_file()]
        run_size = sum(path.stat().st_size for path, _ in files)
        if parts[-1] and size + run_size > limit:
            parts.append([])
            size = 0
        parts[-1] += files
        size += run_size
    for i, part in enumerate(parts):
        with tarfile.open(out / f"{name}-{i}.tgz", "w:gz") as tar:
            for path, arcname in part:
                tar.add(path, arcname=arcname)

def collect(packs, runs, folder, name):
    """The finished runs of the phase in packs/NAME-*.tgz (what the GPU commands brought back) into folder: config,
    results, predictions and log, no checkpoint. A run already there is left as it is. Returns the runs added."""
    added = []
    for path in sorted(packs.glob(f"{name}-*.tgz")):
        with tarfile.open(path) as tar:
            members = {member.name: member for member in tar.getmembers() if member.isfile()}
            for run in sorted({member.split("/")[0] for member in members}):
                if run not in runs or f"{run}/results.json" not in members or (folder / run).exists():
                    continue
                (folder / run).mkdir(parents=True)
                for file in RUN_FILES:
                    if f"{run}/{file}" in members:
                        (folder / run / file).write_bytes(tar.extractfile(members[f"{run}/{file}"]).read())
                added.append(run)
    return added

def progress(folder, runs):
    """How far the unfinished runs are: {tasks done: runs}, from each one's checkpoint (-1: none yet)."""
    import torch
    counts = {}
    for run in runs:
        if (folder / run / "results.json").is_file():
            continue
        checkpoint = folder / run / "checkpoint.pt"
        done = torch.load(checkpoint, weights_only=True)["state"]["done"] if checkpoint.is_file() else -1
        counts[done] = counts.get(done, 0) + 1
    return dict(sorted(counts.items(), reverse=True))

def table(folder, runs, phase):
    done = {name: res for name, res in load(folder.parent, folder.name).items() if name in runs}
    counts = progress(folder, runs)
    left = ", ".join(f"{n} after task {t}" if t >= 0 else f"{n} not started" for t, n in counts.items())
    lines = [f"{len(done)} of {len(runs)} runs of {phase} finished" + (f"; unfinished: {left}" if left else ""), "",
             "| run | learner | OP | BWT | FWT | F | R after task 1 | train s | eval s |", "|---" * 9 + "|"]
    for name, res in done.items():
        for learner in res["learners"]:
            m = res["metrics"][learner]
            cells = [f"{100 * m[k]:.2f}" if m[k] is not None else "-" for k in ("OP", "BWT", "FWT", "F")]
            first = " ".join(f"{100 * v:.1f}" for v in res["R"][learner][1]) if res["R"][learner][1] else "-"
            lines.append(f"| {name} | {learner} | " + " | ".join(cells) + f" | {first} | "
                         f"{res['timing']['train_seconds']:.0f} | {res['timing']['eval_seconds']:.0f} |")
    return "\n".join(lines)

def budget_table(root, data_dir):
    summary = pilot_summary(root, data_dir)
    lines = ["| epochs | method | lr | seeds | mean eval OP | mean BWT | tasks learned (mean gain > 5 points) |",
             "|---|---|---|---|---|---|---|"]
    for (epochs, method, lr), row in summary.items():
        lines.append(f"| {epochs} | {method} | {lr:g} | {row['seeds']} | {100 * row['OP']:.2f} | "
                     f"{100 * row['BWT']:.2f} | {len(row['learned'])}: {', '.join(row['learned'])} |")
    try:
        epochs, qualified, _ = choose_budget(summary)
        verdict = "qualifies" if qualified else "no budget qualifies; the one where replay learns the most tasks"
        lines += ["", f"Budget: {epochs} epochs ({verdict})."]
    except NotDecided as e:
        lines += ["", f"No budget yet: {e}."]
    return "\n".join(lines)

def select_table(root):
    means = screen_means(root)
    lines = ["| setting | seeds | mean eval OP |", "|---|---|---|"]
    lines += [f"| {name} | {n} | {100 * mean:.2f} |" for name, (mean, n) in sorted(means.items())]
    try:
        chosen = select(root)
        lines += [""] + [f"{what}: {setting_name(setting)}" for what, setting in chosen.items()]
    except NotDecided as e:
        lines += ["", f"Not decided yet: {e}."]
    return "\n".join(lines)

T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131}

def paired(a, b):
    """Mean of the differences a - b over the pairs both have, its 95 % interval (Student's t), and the count."""
    keys = sorted(set(a) & set(b))
    diffs = [a[k] - b[k] for k in keys]
    if len(diffs) < 2:
        return None
    half = T_975[len(diffs) - 1] * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return statistics.mean(diffs), half, len(diffs)

FINALS_NAME = re.compile(r"(.+)-(trace|reversed)-s(\d+)")  # arm, order, seed
ORDERS = {"trace": "TRACE's order", "reversed": "reversed order"}

def interval_cells(difference):
    """The mean and 95 % interval of a paired difference as two table cells."""
    mean, half, n = difference
    return f"{mean:+.2f} | {mean - half:+.2f} to {mean + half:+.2f}"

def difference_cells(difference):
    """The pairs, mean and 95 % interval of a paired difference as table cells."""
    return f"{difference[2]} | {interval_cells(difference)}"

def difference_row(title, a, b):
    """The table line of the paired differences a - b in OP and in BWT, or none while fewer than two pairs exist;
    a and b map each metric to its {(order, seed): value}."""
    op, bwt = (paired(a[metric], b[metric]) for metric in ("OP", "BWT"))
    if op is None:
        return []
    return [f"| {title} | {difference_cells(op)} | {interval_cells(bwt)} |"]

def order_cell(a, b, order):
    """The paired difference a - b over one task order's pairs as one table cell, or '-' under two pairs."""
    difference = paired(*({key: op for key, op in ops.items() if key[0] == order} for ops in (a, b)))
    if difference is None:
        return "-"
    mean, half, n = difference
    return f"{mean:+.2f} ({mean - half:+.2f} to {mean + half:+.2f}), {n} pairs"

def learning_accuracy(R):
    """LA: the mean score on each task right after its own training, task t's column in row t of R; with OP and BWT
    it says whether a method ends low by forgetting or by learning less in the first place."""
    return statistics.mean(R[t][t - 1] for t in range(1, len(R)))

def report(root, data_dir=None, redraws=True):
    """The finals: each arm and learner's metrics and LA (mean ± sd over seeds and orders), skill above the majority
    answer at the end, the seed-paired differences that answer the study's question and its ablation (in OP and BWT
    over both task orders, then in OP in each order on its own), and (redraws) each run against its twin on the former
    seeding. Without data_dir (the tasks' gold answers) the skill column is left out: README.md's table, written where
    the data is not."""
    folder = pathlib.Path(root) / "finals"
    runs = load(folder.parent, folder.name)
    scores = {}  # (arm, learner) -> {"OP" or "BWT": {(order, seed): value}}
    skill_header = " skill above the majority (C-STANCE, FOMC, ScienceQA) |" if data_dir else ""
    lines = ["| arm | learner | runs | OP | BWT | FWT | F | LA |" + skill_header,
             "|---|---|---|---|---|---|---|---|" + ("---|" if data_dir else "")]
    groups = {}
    majority = {}  # run -> its majority_rows, read once for both of its learners
    for name, res in runs.items():
        match = FINALS_NAME.fullmatch(name)
        if match is None:  # not a finals run
            continue
        arm, order, seed = match.groups()
        majority[name] = majority_rows(folder / name, CHOICE_TASKS, data_dir) if data_dir else []
        for learner in res["learners"]:
            groups.setdefault((arm, learner), []).append((order, seed, name, res))
    for (arm, learner), members in groups.items():
        cells = [mean_sd([res["metrics"][learner][key] for *_, res in members]) for key in ("OP", "BWT", "FWT", "F")]
        cells.append(mean_sd([learning_accuracy(res["R"][learner]) for *_, res in members]))
        line = f"| {arm} | {learner} | {len(members)} | " + " | ".join(cells) + " |"
        if data_dir:
            skills = {task: [] for task in CHOICE_TASKS}
            for order, seed, name, res in members:
                for run, who, task, *_, skill, share in majority[name]:
                    if who == learner:
                        skills[task].append(100 * skill)
            line += " " + ", ".join(f"{statistics.mean(v):+.1f}" if v else "-" for v in skills.values()) + " |"
        lines.append(line)
        scores[arm, learner] = {metric: {(order, seed): 100 * res["metrics"][learner][metric]
                                         for order, seed, _, res in members} for metric in ("OP", "BWT")}
    # The ablation steps pair learners of one setting: with gamma 0 ilora's fast learner is replay at ilora's lr,
    # bit for bit, so "+ the slow learner" is that run's slow learner against its own fast one.
    comparisons = [("I-LoRA (slow) - replay", ("ilora", "slow"), ("replay", "fast")),
                   ("I-LoRA (slow) - seq", ("ilora", "slow"), ("seq", "fast")),
                   ("replay at ilora's lr (ilora gamma 0, fast) - replay", ("ilora-g0", "fast"), ("replay", "fast")),
                   ("+ the slow learner: ilora gamma 0, slow - fast", ("ilora-g0", "slow"), ("ilora-g0", "fast")),
                   ("+ consistency: ilora (slow) - ilora gamma 0 (slow)", ("ilora", "slow"), ("ilora-g0", "slow")),
                   ("slow - fast learner, ilora", ("ilora", "slow"), ("ilora", "fast")),
                   ("former defaults lam 0.99, gamma 1 (slow) - ilora (slow)", ("ilora-old", "slow"),
                    ("ilora", "slow")),
                   ("best ilora overall (slow) - replay", ("ilora-best", "slow"), ("replay", "fast"))]
    differences, by_order = [], []
    for title, a, b in comparisons:
        if a not in scores or b not in scores:
            continue
        differences += difference_row(title, scores[a], scores[b])
        cells = [order_cell(scores[a]["OP"], scores[b]["OP"], order) for order in ORDERS]
        if cells != ["-"] * len(ORDERS):
            by_order.append(f"| {title} | " + " | ".join(cells) + " |")
    if differences:  # none until both arms of a comparison have two pairs
        lines += ["", "| difference, paired by seed and order | pairs | OP | 95 % interval | BWT | 95 % interval |",
                  "|---|---|---|---|---|---|"]
        lines += differences
    if by_order:  # the same differences in each task order on its own: mean (95 % interval), pairs
        lines += ["", "| OP difference in one task order, paired by seed | " + " | ".join(ORDERS.values()) + " |",
                  "|---" * (1 + len(ORDERS)) + "|", *by_order]
    return "\n".join(lines + (redrawn(folder, runs) if redraws else []))

def redrawn(folder, runs):
    """Table lines for the finals runs that also ran on the former seeding (the folder finals-old-seeding, where
    every task of a run drew the same data orders): each arm's OP on the seeding that ships minus its OP on the
    former one, run for run, and the spread of those differences. The two runs differ in their random draws only."""
    former = load(folder.parent, folder.name + "-old-seeding")
    ops = {}  # (arm, learner) -> ({run: OP now}, {run: OP on the former seeding})
    for name in sorted(set(runs) & set(former)):
        match = FINALS_NAME.fullmatch(name)
        if match is None:  # not a finals run
            continue
        for learner in runs[name]["learners"]:
            now, before = ops.setdefault((match.group(1), learner), ({}, {}))
            now[name] = 100 * runs[name]["metrics"][learner]["OP"]
            before[name] = 100 * former[name]["metrics"][learner]["OP"]
    lines = []
    for (arm, learner), (now, before) in ops.items():
        difference = paired(now, before)
        if difference:
            spread = statistics.stdev(now[name] - before[name] for name in now)
            lines.append(f"| {arm} | {learner} | {difference_cells(difference)} | {spread:.2f} |")
    if not lines:
        return []
    return ["", "| arm: OP now - OP on the former seeding, run for run | learner | runs | mean | 95 % interval | sd |",
            "|---|---|---|---|---|---|", *lines]

PHASES = ["repro", "pilot", "lr", "grid", "finals"]

def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("action", choices=[*PHASES, "budget", "select", "report", "table", "pack", "collect"])
    p.add_argument("phase", nargs="?", choices=PHASES, help="table, pack and collect: the phase")
    p.add_argument("dest", nargs="?", help="pack: the folder that receives FOLDER-*.tgz; collect: that holds them")
    p.add_argument("--data-dir", default=str(DATA))
    p.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    p.add_argument("--root", default=str(HERE / "results/study"), help="where the runs are written")
    p.add_argument("--decided", default=str(HERE / "results/study"),
                   help="the finished runs whose rules decide the later phases (the committed results)")
    p.add_argument("-j", "--parallel", type=int, default=12, help="runs at once")
    p.add_argument("--gpus", type=int, default=1, help="GPUs the runs are spread over (each run uses one)")
    p.add_argument("--deadline", type=float, default=0, help="stop every run after this many seconds, 0 = never")
    p.add_argument("--extra", default="", help="more ilora.py arguments for every run (caps for a smoke test)")
    args = p.parse_args()
    root = pathlib.Path(args.root)
    decided = pathlib.Path(args.decided)
    try:
        if args.action == "budget":
            print(budget_table(decided, args.data_dir))
        elif args.action == "select":
            print(select_table(decided))
        elif args.action == "report":
            print(report(decided, args.data_dir))
        elif args.action in ("table", "pack", "collect"):
            if args.phase is None or (args.action != "table" and args.dest is None):
                p.error(f"{args.action} needs a phase" + (" and a folder of packs" if args.action != "table" else ""))
            runs = phase_runs(args.phase, decided, args.data_dir)
            name = FOLDER[args.phase]
            if args.action == "table":
                print(table(root / name, runs, args.phase))
            elif args.action == "pack":
                pack(root / name, runs, pathlib.Path(args.dest), name)
            else:
                added = collect(pathlib.Path(args.dest), runs, decided / name, name)
                print(f"{len(added)} finished runs added to {decided / name}: {' '.join(added)}")
        else:
            base = ["--model", args.model, "--data-dir", args.data_dir, *COMMON, *args.extra.split()]
            runs = phase_runs(args.action, decided, args.data_dir)
            folder = root / FOLDER[args.action]
            run_jobs([(folder / name, [*base, *argv]) for name, argv in runs.items()], args.parallel, args.deadline,
                     gpus=args.gpus)
            print(table(folder, runs, args.action))
    except (NotDecided, ilora.UsageError) as e:  # a UsageError: the task data is not where --data-dir says
        sys.exit(f"error: {e}")

if __name__ == "__main__":
    main()
