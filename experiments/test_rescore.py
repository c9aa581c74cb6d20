"""Tests for rescore.py: a run's saved predictions give back its own R exactly, and any other scorer."""
import json, pathlib, re, sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # ilora.py is one folder up
import ilora, rescore
from test_ilora import base_args, model_dir, write_task  # noqa: F401

def test_predictions_are_saved_and_rescoring_reproduces_R(tmp_path, model_dir):
    import pyarrow.parquet as pq
    t1, t2 = write_task(tmp_path / "t1"), write_task(tmp_path / "t2", colour="blue")
    res = ilora.main(base_args(model_dir, tmp_path, "--tasks", f"{t1},{t2}", "--eval-learner", "both"))
    preds = pq.read_table(tmp_path / "out" / "predictions.parquet").to_pylist()
    assert len(preds) == 2 * 3 * 2 * 8  # learners x rows of R x tasks x test records
    assert set(preds[0]) == {"task", "split", "row", "learner", "index", "prediction"}
    again = rescore.main([str(tmp_path / "out")])
    assert again["R"] == json.loads(json.dumps(res["R"])) and again["metrics"] == json.loads(json.dumps(res["metrics"]))
    other = rescore.main([str(tmp_path / "out"), "--metric", "t1=rouge_l,t2=exact"])
    assert other["metrics_per_task"] == {"t1": "rouge_l", "t2": "exact"}
    assert json.loads((tmp_path / "out" / "rescored.json").read_text())["R"] == other["R"]

def test_rescoring_refuses_changed_data(tmp_path, model_dir, capsys):
    t1 = write_task(tmp_path / "t1")
    ilora.main(base_args(model_dir, tmp_path, "--tasks", str(t1), "--epochs", "1"))
    (t1 / "test.json").write_text(json.dumps([{"prompt": "the sky", "answer": "blue"}]))
    try:
        rescore.main([str(tmp_path / "out")])
    except SystemExit as e:
        assert "t1/test" in str(e.code)
    else:
        raise AssertionError("a re-score on other data was accepted")

def test_the_lenient_rescoring_scorers_on_hand_computed_cases():
    M = ilora.METRICS
    assert M["choice"]("B. because", "B", "") == 1 and M["choice"]("The answer is C", "B", "") == 0
    assert M["choice"]("答案：A", "A", "") == 1
    assert M["number"]("It is 1,200 apples", "1200", "") == 1 and M["number"]("3.0", "3", "") == 1
    assert M["number"]("no idea", "3", "") == 0 and M["number"]("4 or 3", "3", "") == 0

def test_help_is_whole_and_the_metrics_are_printed(tmp_path, model_dir, capsys):
    import subprocess
    out = subprocess.run([sys.executable, str(pathlib.Path(rescore.__file__)), "--help"], capture_output=True,
                         text=True).stdout
    assert "Recompute R and the continual-learning metrics of a finished ilora.py run from its saved predictions." \
        in " ".join(out.split())
    ilora.main(base_args(model_dir, tmp_path, "--tasks", str(write_task(tmp_path / "t1")), "--epochs", "1"))
    capsys.readouterr()
    rescore.main([str(tmp_path / "out")])
    assert re.search(r"\(slow\): OP \d+\.\d\d \| BWT - \| FWT - \| F -", capsys.readouterr().out)

def test_majority_scores_the_final_row_or_the_row_just_after_each_task(tmp_path, model_dir):
    import majority
    a, b = write_task(tmp_path / "a"), write_task(tmp_path / "b", shift=1)  # b gives each word another colour
    res = ilora.main(base_args(model_dir, tmp_path, "--tasks", f"{a},{b}", "--method", "seq"))
    R = res["R"]["fast"]
    assert R[0][0] != R[1][0] != R[2][0]  # a is learned, then forgotten: a wrong row cannot pass
    for when, rows in (("final", {"a": 2, "b": 2}), ("learned", {"a": 1, "b": 2})):
        found = majority.majority_rows(tmp_path / "out", ["a", "b"], tmp_path, when)
        assert {task for _, _, task, *_ in found} == {"a", "b"}
        for run, learner, task, score, base, skill, share in found:
            column = ["a", "b"].index(task)
            assert abs(score - R[rows[task]][column]) < 1e-12 and abs(skill - (score - base)) < 1e-12
            assert base == 0.25  # four colours, each the answer of 2 of 8 records
