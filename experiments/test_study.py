"""Tests for study.py's rules: the pilot's budget, the screen's selection with its tie rule, the finals' runs and
the paired intervals, on made-up results; and ilora.py's defaults against the committed screen."""
import json, pathlib, sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import study

def pilot_row(op, bwt, learned):
    return {"OP": op, "BWT": bwt, "learned": [f"task{i}" for i in range(learned)], "seeds": 2}

def pilot(rows):
    """rows: {epochs: (seq's two lrs as (OP, BWT, learned), replay's two lrs)}"""
    summary = {}
    for epochs, (seq, replay) in rows.items():
        for method, pair in (("seq", seq), ("replay", replay)):
            for lr, row in zip((1e-3, 3e-3), pair):
                summary[epochs, method, lr] = pilot_row(*row)
    return summary

def test_the_budget_is_the_fewest_epochs_where_seq_forgets_and_both_methods_learn_most_tasks():
    summary = pilot({1: (((0.25, -0.10, 7), (0.20, -0.20, 3)), ((0.30, -0.01, 5), (0.29, 0, 8))),
                     3: (((0.30, -0.12, 6), (0.20, -0.30, 8)), ((0.35, 0.0, 6), (0.33, 0, 2))),
                     5: (((0.31, -0.20, 7), (0.20, -0.30, 8)), ((0.36, 0.0, 7), (0.33, 0, 2)))})
    # 1 epoch: replay's better lr (OP 0.30) learns 5 tasks only; 3 and 5 qualify; the fewer epochs win
    epochs, qualified, checked = study.choose_budget(summary)
    assert (epochs, qualified) == (3, True) and not checked[1][0] and checked[5][0]

def test_without_a_qualifying_budget_the_one_where_replay_learns_most_wins_and_says_so():
    summary = pilot({1: (((0.25, -0.01, 7), (0.2, -0.01, 7)), ((0.30, 0, 5), (0.2, 0, 5))),
                     3: (((0.25, -0.01, 7), (0.2, -0.01, 7)), ((0.30, 0, 6), (0.2, 0, 8))),
                     5: (((0.25, -0.01, 7), (0.2, -0.01, 7)), ((0.30, 0, 6), (0.2, 0, 6)))})
    assert study.choose_budget(summary)[:2] == (3, False)  # seq never forgets; replay learns 5, 6, 6: the tie -> 3

def test_an_unfinished_pilot_decides_nothing():
    summary = pilot({1: (((0.25, -0.1, 7), (0.2, -0.1, 7)), ((0.3, 0, 7), (0.2, 0, 7)))})
    with pytest.raises(study.NotDecided):
        study.choose_budget(summary)
    summary = pilot({e: (((0.25, -0.1, 7), (0.2, -0.1, 7)), ((0.3, 0, 7), (0.2, 0, 7))) for e in (1, 3, 5)})
    summary[5, "seq", 1e-3]["seeds"] = 1
    with pytest.raises(study.NotDecided):
        study.choose_budget(summary)

def test_gaps_under_one_point_are_ties_and_the_simplest_tied_setting_wins():
    order = {"a": 2, "b": 3, "c": 1}.get  # c is the simplest
    assert study.best_of({"a": 0.300, "b": 0.309, "c": 0.2995}, order) == "c"  # all within 1 point of b
    assert study.best_of({"a": 0.300, "b": 0.309, "c": 0.2985}, order) == "a"  # c is 1.05 points behind
    assert study.best_of({"a": 0.300, "b": 0.311, "c": 0.2995}, order) == "b"  # b is 1.1 points ahead: alone
    assert study.best_of({"b": 0.31, "c": 0.30}, order) == "b"  # exactly 1 point (0.0100000000000000009 in floats)
    assert study.best_of({"b": 0.31, "c": 0.3000001}, order) == "c"

def write_screen(root, ops):
    for name, op in ops.items():
        folder = root / "screen" / name
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        learners = ["slow", "fast"] if name.startswith("ilora") else ["fast"]
        metrics = {learner: {"OP": op if learner == learners[0] else 0.0} for learner in learners}
        (folder / "results.json").write_text(json.dumps({"learners": learners, "metrics": metrics}))

def test_the_screen_picks_each_methods_lr_then_the_best_ilora_setting_with_the_tie_rule(tmp_path):
    ops = {}
    for setting in study.lr_settings():
        bump = {("seq", 1e-3): 0.05, ("replay", 2e-3): 0.05, ("ilora", 5e-4): 0.05}.get((setting["method"],
                                                                                           setting["lr"]), 0)
        for seed in study.SCREEN_SEEDS:
            ops[f"{study.setting_name(setting)}-s{seed}"] = 0.30 + bump
    write_screen(tmp_path, ops)
    assert study.best_lrs(tmp_path) == {"seq": 1e-3, "replay": 2e-3, "ilora": 5e-4}
    with pytest.raises(study.NotDecided):  # the grid has not run
        study.select(tmp_path)
    ops = {}
    for setting in study.grid_settings(5e-4):
        op = {(0.95, 0.3): 0.400, (0.98, 0.03): 0.395, (0.9, 0.0): 0.380, (0.95, 0.0): 0.392}.get(
            (setting["lam"], setting["gamma"]), 0.3)
        if setting["lam"] == 0.9 and setting["gamma"] == 0.1:
            continue  # run by the lr phase already (the same name)
        for seed in study.SCREEN_SEEDS:
            ops[f"{study.setting_name(setting)}-s{seed}"] = op
    write_screen(tmp_path, ops)
    chosen = study.select(tmp_path)
    # lam 0.95 gamma 0.3 leads; lam 0.95 gamma 0 ties it (0.8 point) and is simpler: it is the best ilora. Among
    # the settings with consistency, lam 0.98 gamma 0.03 ties the leader (0.5 point) but its lam is larger; lam 0.9
    # gamma 0 is 2 points behind: no tie
    assert chosen["ilora"] == {"method": "ilora", "lr": 5e-4, "lam": 0.95, "gamma": 0.0}
    assert chosen["ilora with consistency"] == {"method": "ilora", "lr": 5e-4, "lam": 0.95, "gamma": 0.3}
    assert chosen["seq"] == {"method": "seq", "lr": 1e-3} and chosen["replay"] == {"method": "replay", "lr": 2e-3}

def test_the_finals_pair_every_arm_by_seed_and_order_and_ablate_consistency_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(study, "budget", lambda root, data_dir=None: (3, True, {}))
    best = {"method": "ilora", "lr": 5e-4, "lam": 0.95, "gamma": 0.3}
    monkeypatch.setattr(study, "select", lambda root: {"seq": {"method": "seq", "lr": 1e-3},
                                                      "replay": {"method": "replay", "lr": 2e-3},
                                                      "ilora": best, "ilora with consistency": best})
    runs = study.phase_runs("finals", tmp_path)
    assert len(runs) == 5 * 2 * 4  # seq, replay, ilora, ilora-g0, ilora-old; two orders; four seeds
    old = runs["ilora-old-trace-s0"]
    assert [old[old.index(f) + 1] for f in ("--lam", "--gamma", "--lr", "--tasks")] == ["0.99", "1.0", "0.0005",
                                                                                      study.TRACE8]
    twin = runs["ilora-g0-reversed-s3"]
    assert twin[twin.index("--gamma") + 1] == "0.0" and twin[twin.index("--lam") + 1] == "0.95"
    assert twin[twin.index("--lr") + 1] == "0.0005" and twin[twin.index("--seed") + 1] == "3"
    assert twin[twin.index("--tasks") + 1] == study.REVERSED and study.REVERSED.split(",")[0] == "20Minuten"
    assert all(argv[argv.index("--eval-split") + 1] == "test" and argv[argv.index("--epochs") + 1] == "3"
               for argv in runs.values())

def test_the_paired_interval_is_students_t_over_the_common_pairs():
    mean, half, n = study.paired({1: 3.0, 2: 5.0, 3: 9.0}, {1: 1.0, 2: 1.0})
    assert (mean, n) == (3.0, 2) and half == pytest.approx(12.706 * 2 ** 0.5 / 2 ** 0.5)
    assert study.paired({1: 1.0}, {1: 0.0}) is None

def test_a_best_ilora_without_consistency_that_is_not_the_twin_gets_an_arm_of_its_own(tmp_path, monkeypatch):
    monkeypatch.setattr(study, "budget", lambda root, data_dir=None: (3, True, {}))
    cons = {"method": "ilora", "lr": 5e-4, "lam": 0.95, "gamma": 0.3}
    alone = {"method": "ilora", "lr": 5e-4, "lam": 0.8, "gamma": 0.0}
    monkeypatch.setattr(study, "select", lambda root: {"seq": {"method": "seq", "lr": 1e-3},
                                                      "replay": {"method": "replay", "lr": 2e-3},
                                                      "ilora": alone, "ilora with consistency": cons})
    runs = study.phase_runs("finals", tmp_path)
    assert len(runs) == 6 * 2 * 4
    best = runs["ilora-best-trace-s1"]
    assert [best[best.index(f) + 1] for f in ("--lam", "--gamma")] == ["0.8", "0.0"]

def write_run(folder, tasks, R, learners=("fast",), method="seq", bwt=-0.1):
    """A finished run's results; R is every learner's, or {learner: its R}; bwt is every learner's BWT."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    Rs = R if isinstance(R, dict) else {learner: R for learner in learners}
    metrics = {learner: {"OP": sum(Rs[learner][-1]) / len(Rs[learner][-1]), "BWT": bwt, "FWT": 0.0, "F": 0.1}
               for learner in learners}
    (folder / "results.json").write_text(json.dumps({"tasks": tasks, "learners": list(learners), "method": method,
                                                     "R": Rs, "metrics": metrics}))

def test_the_pilot_summary_reads_method_epochs_and_lr_from_the_names_and_gains_from_R(tmp_path, monkeypatch):
    monkeypatch.setattr(study, "majority_rows", lambda *args: [])  # no choice task among these
    tasks = ["a", "b"]
    R = [[0.1, 0.2], [0.5, 0.21], [0.3, 0.9]]  # a gains 40 points, b 70; b's 1 point before its training is no gain
    for seed in (0, 1):
        write_run(tmp_path / "pilot" / f"replay-e3-lr0.003-s{seed}", tasks, R)
    summary = study.pilot_summary(tmp_path)
    assert list(summary) == [(3, "replay", 0.003)]
    assert summary[3, "replay", 0.003]["learned"] == ["a", "b"] and summary[3, "replay", 0.003]["seeds"] == 2
    R[2][1] = 0.24  # b: 4 points over the base model, under the 5-point bar
    write_run(tmp_path / "pilot" / "seq-e5-lr0.001-s0", tasks, R)
    assert study.pilot_summary(tmp_path)[5, "seq", 0.001]["learned"] == ["a"]

def test_the_report_pairs_arms_by_seed_and_order(tmp_path, monkeypatch):
    monkeypatch.setattr(study, "majority_rows", lambda *args: [])
    tasks = ["a", "b"]
    runs = (("trace", 0, 0.40, 0.30, -0.08), ("reversed", 0, 0.36, 0.30, -0.1), ("trace", 1, 0.38, 0.31, -0.06),
            ("reversed", 3, 0.50, 0.10, 0))  # order, seed, ilora's OP, replay's OP, ilora's BWT (replay's: -0.1)
    for order, seed, ilora_op, replay_op, ilora_bwt in runs:
        write_run(tmp_path / "finals" / f"ilora-{order}-s{seed}", tasks, [[0, 0]] * 2 + [[ilora_op] * 2],
                  ("slow", "fast"), "ilora", ilora_bwt)
        if seed != 3:  # replay's seed-3 run is missing: its ilora run has no pair
            write_run(tmp_path / "finals" / f"replay-{order}-s{seed}", tasks, [[0, 0]] * 2 + [[replay_op] * 2])
    write_run(tmp_path / "finals" / "ilora-g0-reversed-s3", tasks, [[0, 0]] * 3, ("slow", "fast"), "ilora")
    write_run(tmp_path / "finals" / "ilora-trace-s0-old", tasks, [[0, 0]] * 3)  # not a finals name: left out
    text = study.report(tmp_path, "the data")
    assert "| arm | learner | runs | OP | BWT | FWT | F | LA | skill above the majority" in text
    # LA: the mean of R[1][0] = 0 and R[2][1] = ilora's OP, so 20, 18, 19 and 25 points
    assert ("| ilora | slow | 4 | 41.00 ± 6.22 | -6.00 ± 4.32 | 0.00 ± 0.00 | 10.00 ± 0.00 | 20.50 ± 3.11 | -, -, - |"
            in text)
    assert "skill" not in study.report(tmp_path)  # README.md's table: no gold answers needed
    assert "| ilora | slow | 4 |" in text and "| replay | fast | 3 |" in text and "| ilora-g0 | slow | 1 |" in text
    assert "ilora-trace" not in text and "| ilora | fast | 4 |" in text
    line = next(l for l in text.splitlines() if l.startswith("| I-LoRA (slow) - replay"))
    # OP: 10, 6 and 7 points, mean 7.67 +- 4.303 * 2.08 / sqrt(3); BWT: 2, 0 and 4 points, 2.00 +- 4.303 * 2 / sqrt(3)
    assert line == "| I-LoRA (slow) - replay | 3 | +7.67 | +2.50 to +12.84 | +2.00 | -2.97 to +6.97 |"
    by_order = text.split("in one task order")[1].splitlines()
    assert by_order[0] == ", paired by seed | TRACE's order | reversed order |"
    # TRACE's order: 10 and 7 points, mean 8.5, interval 8.5 +- 12.706 * 2.12 / sqrt(2); the reversed order has
    # one pair (6 points), no interval
    assert by_order[2] == "| I-LoRA (slow) - replay | +8.50 (-10.56 to +27.56), 2 pairs | - |"

def test_the_ablation_pairs_the_slow_learner_of_gamma_0_with_its_own_fast_one(tmp_path, monkeypatch):
    monkeypatch.setattr(study, "majority_rows", lambda *args: [])
    for order, seed, slow_op, fast_op in (("trace", 0, 0.40, 0.30), ("reversed", 0, 0.35, 0.33)):
        assert "paired by seed and order" not in study.report(tmp_path)  # no comparison has two pairs: no table
        write_run(tmp_path / "finals" / f"ilora-g0-{order}-s{seed}", ["a"],
                  {"slow": [[0], [slow_op]], "fast": [[0], [fast_op]]}, ("slow", "fast"), "ilora")
    text = study.report(tmp_path, None)
    line = next(l for l in text.splitlines() if l.startswith("| + the slow learner"))
    assert line.startswith("| + the slow learner: ilora gamma 0, slow - fast | 2 | +6.00 |")  # (10 + 2) / 2 points

def test_the_report_sets_each_run_beside_its_twin_on_the_former_seeding(tmp_path, monkeypatch):
    monkeypatch.setattr(study, "majority_rows", lambda *args: [])
    for name, now, before in (("seq-trace-s0", 0.30, 0.25), ("seq-reversed-s0", 0.28, 0.27),
                              ("seq-trace-s1", 0.20, None), ("replay-trace-s0", 0.40, 0.36)):
        write_run(tmp_path / "finals" / name, ["a"], [[0], [now]])
        if before is not None:
            write_run(tmp_path / "finals-old-seeding" / name, ["a"], [[0], [before]])
    write_run(tmp_path / "finals-old-seeding" / "seq-reversed-s3", ["a"], [[0], [0.1]])  # no twin yet: left out
    for folder in ("finals", "finals-old-seeding"):  # not a finals name: left out
        write_run(tmp_path / folder / "seq-trace-s0-copy", ["a"], [[0], [0.9]])
    text = study.report(tmp_path)
    # differences 5 and 1 points: mean 3, sd 2.83, interval 3 +- 12.706 * 2.83 / sqrt(2); replay's one pair gives
    # no interval, so no line
    assert text.split("former seeding")[1].splitlines()[2:] == ["| seq | fast | 2 | +3.00 | -22.41 to +28.41 | 2.83 |"]
    assert "former seeding" not in study.report(tmp_path, redraws=False)  # README.md's table

def test_runs_are_spread_over_the_gpus_each_on_the_one_running_fewest(tmp_path, monkeypatch):
    import trace8
    started = []  # (run, CUDA_VISIBLE_DEVICES)
    class FakeRun:  # a run that is still going until the test lets the first one end
        def __init__(self, cmd, stdout, stderr, env):
            self.name = pathlib.Path(cmd[cmd.index("--out") + 1]).name
            self.returncode = 0
            started.append((self.name, env.get("CUDA_VISIBLE_DEVICES")))
        def poll(self):
            return 0 if self.name == "a" else None
        def terminate(self):
            pass
        def wait(self):
            pass
    monkeypatch.setattr(trace8.subprocess, "Popen", FakeRun)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    jobs = [(tmp_path / name, []) for name in "abcd"]
    trace8.run_jobs(jobs, parallel=3, deadline=1.5, gpus=2)
    # a, b, c start on GPUs 0, 1, 0; a ends, and d takes its place on GPU 0, where one run is left beside b's one
    assert started == [("a", "0"), ("b", "1"), ("c", "0"), ("d", "0")]
    started.clear()
    trace8.run_jobs([(tmp_path / "e", [])], parallel=3, deadline=0.5)
    assert started == [("e", None)]  # one GPU: the environment is left as it is

def test_a_pack_holds_whole_runs_and_the_checkpoints_of_unfinished_ones_only(tmp_path):
    import tarfile
    root = tmp_path / "screen"
    for run, finished in (("a", True), ("b", False), ("c", False)):
        (root / run).mkdir(parents=True)
        (root / run / "config.json").write_text("{}")
        (root / run / "checkpoint.pt").write_bytes(b"x" * 600)
        if finished:
            (root / run / "results.json").write_text("{}")
    study.pack(root, ["a", "b", "c"], tmp_path / "out", "screen", limit=1000)
    packs = sorted((tmp_path / "out").glob("screen-*.tgz"))
    members = [sorted(tarfile.open(p).getnames()) for p in packs]
    assert members == [["a/config.json", "a/results.json", "b/checkpoint.pt", "b/config.json"],
                       ["c/checkpoint.pt", "c/config.json"]]

def test_collect_takes_the_finished_runs_of_the_phase_from_packs_and_keeps_runs_already_there(tmp_path):
    root = tmp_path / "screen"
    for run, finished in (("a", True), ("b", False), ("old", True), ("other", True)):
        (root / run).mkdir(parents=True)
        (root / run / "config.json").write_text(f'{{"run": "{run}"}}')
        (root / run / "checkpoint.pt").write_bytes(b"x" * 600)
        if finished:
            (root / run / "results.json").write_text(f'{{"R": "{run}"}}')
    study.pack(root, ["a", "b", "old", "other"], tmp_path / "packs", "screen", limit=1000)
    committed = tmp_path / "committed"
    (committed / "old").mkdir(parents=True)
    (committed / "old" / "results.json").write_text("kept")
    added = study.collect(tmp_path / "packs", ["a", "b", "old"], committed, "screen")
    assert added == ["a"]
    assert sorted(p.name for p in (committed / "a").iterdir()) == ["config.json", "results.json"]
    assert (committed / "a" / "results.json").read_text() == '{"R": "a"}'
    assert (committed / "old" / "results.json").read_text() == "kept"
    assert not (committed / "b").exists() and not (committed / "other").exists()

def test_progress_counts_the_unfinished_runs_by_the_task_their_checkpoint_ends(tmp_path):
    import torch
    for run, done in (("a", 5), ("b", 5), ("c", 0)):
        (tmp_path / run).mkdir()
        torch.save({"state": {"done": done}}, tmp_path / run / "checkpoint.pt")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "results.json").write_text("{}")  # finished: not counted
    assert study.progress(tmp_path, ["a", "b", "c", "d", "e"]) == {5: 2, 0: 1, -1: 1}

def test_ilora_py_ships_the_setting_the_committed_screen_chose():
    """Step 6 of the study: ilora.py's defaults are the best I-LoRA setting of the screen's committed runs (lr, lam,
    gamma by study.select; epochs from those runs' own config.json, the budget they ran at), and its other training
    settings are those the runs trained with."""
    import ilora
    root = study.HERE / "results" / "study"
    chosen = study.select(root)["ilora"]
    configs = [json.loads(path.read_text()) for path in
               sorted((root / "screen").glob(f"{study.setting_name(chosen)}-s*/config.json"))]
    assert len(configs) == len(study.SCREEN_SEEDS)
    defaults = ilora.Config()
    assert (defaults.lr, defaults.lam, defaults.gamma) == (chosen["lr"], chosen["lam"], chosen["gamma"])
    assert {config["epochs"] for config in configs} == {defaults.epochs}
    trained_with = ("r", "alpha", "dropout", "targets", "buffer_size", "batch_size", "warmup", "weight_decay",
                    "grad_clip")
    for name in trained_with:
        assert {config[name] for config in configs} == {getattr(defaults, name)}, name
