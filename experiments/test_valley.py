"""Tests for valley.py: tiny random models, adapters saved by ilora, no network. One invariant each.

    python -m pytest -q test_valley.py
"""
import json, pathlib, sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # ilora.py is one folder up
import ilora, valley
from test_ilora import IDS, logits, model_dir, randomize_lora, tiny_model, write_task, base_args  # noqa: F401

def save_two_adapters(kind, folder):
    """Two random fast learners of one tiny model saved as PEFT adapters; returns the logits each one gives."""
    model = tiny_model(kind)
    layers = ilora.inject_lora(model, r=4, alpha=8)
    cfg = ilora.Config(model=kind, r=4, alpha=8, dropout=0.0)
    end_logits = []
    for seed, name in [(1, "a"), (2, "b")]:
        randomize_lora(layers, seed=seed)
        ilora.save_peft_adapter(model, layers, folder / name, "fast", cfg)
        end_logits.append(logits(model))
    return end_logits

def model_on_path(kind, folder, alpha, interp):
    (start, scaling, targets), end = valley.read_adapter(folder / "a"), valley.read_adapter(folder / "b")[0]
    model = tiny_model(kind)
    layers = valley.inject_path_lora(model, targets, 4, scaling, interp)
    valley.load_factors_(layers, valley.path_factors(start, end, alpha, interp))
    return model, layers

@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_merged_path_reproduces_end_points(kind, tmp_path):
    end_logits = save_two_adapters(kind, tmp_path)
    for alpha, expected in zip([0.0, 1.0], end_logits):
        model, _ = model_on_path(kind, tmp_path, alpha, "merged")
        torch.testing.assert_close(logits(model), expected, rtol=1e-5, atol=1e-5)

def test_factor_path_adds_the_cross_terms(tmp_path):
    save_two_adapters("gpt2", tmp_path)  # Conv1D: delta_weight is (in, out)
    (A0, B0), (A1, B1) = [next(iter(valley.read_adapter(tmp_path / n)[0].values())) for n in ("a", "b")]
    merged, lm = model_on_path("gpt2", tmp_path, 0.5, "merged")
    factors, lf = model_on_path("gpt2", tmp_path, 0.5, "factors")
    cross = 0.5 * 0.5 * 2.0 * ((B0 - B1) @ (A0 - A1))  # alpha (1 - alpha) scaling (B_0 - B_1)(A_0 - A_1)
    first = sorted(lm)[0]
    torch.testing.assert_close(lm[first].delta_weight() - lf[first].delta_weight(), cross.T)
    assert not torch.allclose(logits(merged), logits(factors), atol=1e-4)

def test_barrier_of_identical_end_points_is_zero(tmp_path):
    save_two_adapters("llama", tmp_path)
    start, scaling, targets = valley.read_adapter(tmp_path / "a")
    model = tiny_model("llama")
    model.config.pad_token_id = 0
    layers = valley.inject_path_lora(model, targets, 4, scaling, "merged")
    alphas = [i / 4 for i in range(5)]
    examples = [(IDS[0, :k].int(), 3) for k in (6, 8)] + [(IDS[1].int(), 4)]
    losses = valley.path_losses(model, layers, start, start, alphas, "merged", {"t": examples})["t"]
    assert valley.barrier(alphas, losses) == pytest.approx(0.0, abs=1e-6)
    assert valley.barrier([0, 0.5, 1], [1.0, 3.0, 2.0]) == pytest.approx(1.5)  # a bump of 1.5 above the chord

def test_connectivity_and_plot_of_a_tiny_run(model_dir, tmp_path):
    t1, t2 = write_task(tmp_path / "t1", colour="red"), write_task(tmp_path / "t2", colour="blue")
    ilora.main(base_args(model_dir, tmp_path, "--tasks", f"{t1},{t2}", "--method", "ilora", "--epochs", "1",
                         "--eval-learner", "both"))
    out = tmp_path / "out"
    con = valley.main(["connectivity", str(out), "--grid", "3", "--max-eval", "4"])
    saved = json.loads((out / "connectivity.json").read_text())
    assert [(p["from"], p["to"]) for p in saved["pairs"]] == [("task_1/slow", "task_2/slow"),
                                                              ("task_1/fast", "task_1/slow"),
                                                              ("task_2/fast", "task_2/slow")]
    assert saved["pairs"] == json.loads(json.dumps(con["pairs"])) and all(p["max_barrier"] >= 0 for p in saved["pairs"])
    pngs = valley.main(["plot", str(out)])
    assert {p.name for p in pngs} == {"R_slow.png", "R_fast.png", "valley_tasks_merged.png", "valley_fast_slow_merged.png",
                                     "ap_per_step.png"}
    import matplotlib.pyplot as plt
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert plt.imread(p).ndim == 3

def test_plot_without_matplotlib_says_how_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(SystemExit) as e:
        valley.main(["plot", str(tmp_path)])
    assert e.value.code == 2 and "pip install matplotlib" in capsys.readouterr().err
