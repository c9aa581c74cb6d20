"""Tests for ilora.py: tiny random models built from configs, an in-memory tokenizer, no network. One invariant each.

    python -m pytest -q test_ilora.py
"""
import json, pathlib, subprocess, sys

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import ilora

WORDS = ["<pad>", "<s>", "</s>", "<unk>", "A", "B", "C", "yes", "no", "red", "blue", "green", "gold", "is", "the",
         "a", "of", "what", "colour", "answer", "question", "1", "2", "3", "cat", "dog", "sky", "sea", "grass", "sun"]

def tiny_tokenizer():
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()  # joins word tokens with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")

def tiny_model(kind, seed=0):
    torch.manual_seed(seed)
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                          bos_token_id=1, eos_token_id=2, pad_token_id=0)
        return LlamaForCausalLM(cfg).eval()
    cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=1,
                     eos_token_id=2, pad_token_id=0)
    return GPT2LMHeadModel(cfg).eval()

def randomize_lora(layers, seed=1, which="fast"):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers:
            A, B = (layer.lora_A.weight, layer.lora_B.weight) if which == "fast" else (layer.slow_A, layer.slow_B)
            A.copy_(torch.randn(A.shape, generator=g) * 0.3)
            B.copy_(torch.randn(B.shape, generator=g) * 0.3)

IDS = torch.tensor([[1, 5, 9, 13, 14, 20, 7, 2], [1, 4, 4, 10, 11, 12, 3, 2]])

def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits

def test_default_targets_cover_required_architectures():
    for model_type in ["llama", "qwen2", "mistral", "gpt2", "gpt_neox", "opt", "phi"]:
        assert ilora.DEFAULT_TARGETS[model_type]

# ---- LoRA layer ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_fresh_lora_leaves_logits_unchanged(kind):
    model = tiny_model(kind)
    before = logits(model)
    ilora.inject_lora(model, r=4, alpha=8)
    torch.testing.assert_close(logits(model), before, rtol=0, atol=0)

@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_merged_equals_unmerged(kind):
    model = tiny_model(kind)
    layers = ilora.inject_lora(model, r=4, alpha=8)
    randomize_lora(layers)
    unmerged = logits(model)
    assert not torch.allclose(unmerged, logits(tiny_model(kind)), atol=1e-3)  # the LoRA does change the output
    for layer in layers:
        layer.merge()
    torch.testing.assert_close(logits(model), unmerged, rtol=1e-5, atol=1e-5)

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

# ---- training invariants -------------------------------------------------------------------------------------

def make_cfg(**kw):
    return ilora.Config(**{"r": 4, "alpha": 8, "lr": 1e-2, "warmup": 1, "dropout": 0.0, **kw})

def rows(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(5, 12, (1,), generator=g))
        out.append((torch.randint(3, 64, (length,), generator=g, dtype=torch.int32), int(length // 2)))
    return out

def train_steps(model, layers, cfg, n_steps, replay=True):
    opt = torch.optim.AdamW(ilora.fast_tensors(layers), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    model.train()
    for step in range(1, n_steps + 1):
        ilora.train_step(model, layers, opt, sched, rows(4, step), rows(4, 100 + step) if replay else [], cfg, step)

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
    slow0 = [t.clone() for t in ilora.slow_tensors(layers)]
    train_steps(model, layers, make_cfg(method="ilora", lam=0.9), 5)
    slow, fast = ilora.slow_tensors(layers), ilora.fast_tensors(layers)
    b = [i for i in range(len(slow)) if i % 2 == 1]  # the B factors start at zero, so movement is unambiguous
    assert all(not torch.equal(slow[i], slow0[i]) for i in b)  # the published code's slow learner never moved
    assert all(not torch.allclose(slow[i], fast[i]) for i in b)

def test_seq_and_replay_never_touch_slow():
    for method in ("seq", "replay"):
        model = tiny_model("llama")
        layers = ilora.inject_lora(model, r=4, alpha=8)
        slow0 = [t.clone() for t in ilora.slow_tensors(layers)]
        train_steps(model, layers, make_cfg(method=method), 2)
        assert all(torch.equal(a, b) for a, b in zip(ilora.slow_tensors(layers), slow0))

# ---- replay buffer --------------------------------------------------------------------------------------------

def test_reservoir_keeps_capacity_and_is_deterministic():
    a, b = ilora.ReplayBuffer(10, seed=3), ilora.ReplayBuffer(10, seed=3)
    for buf in (a, b):
        for i in range(100):
            buf.add([(torch.tensor([i]), 0)], task=i // 50)
    assert len(a) == 10 and a.seen == 100
    assert [int(x[0]) for x, _, _ in a.items] == [int(x[0]) for x, _, _ in b.items]
    assert [int(x[0]) for x, _ in a.sample(5)] == [int(x[0]) for x, _ in b.sample(5)]

def test_reservoir_samples_uniformly_over_the_stream():
    capacity, stream, trials = 20, 200, 400
    counts = torch.zeros(10)
    for seed in range(trials):
        buf = ilora.ReplayBuffer(capacity, seed)
        buf.add([(torch.tensor([i]), 0) for i in range(stream)], task=0)
        for ids, _, _ in buf.items:
            counts[int(ids[0]) * 10 // stream] += 1
    expected = trials * capacity / 10  # 800 per tenth of the stream; std ~ 27
    assert ((counts - expected).abs() < 0.15 * expected).all(), counts

# ---- losses ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_padded_batch_loss_equals_unpadded_rows(kind):
    model = tiny_model(kind)
    batch = rows(5, seed=7)
    ids, mask, labels, pos = ilora.collate(batch, pad_id=0, device="cpu")
    with torch.no_grad():
        padded = ilora.lm_loss(model, model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state,
                               labels, pos)
        total, count = 0.0, 0
        for x, n_prompt in batch:  # each row alone, no padding, through HF's own loss
            y = x.long().clone().unsqueeze(0)
            y[:, :n_prompt] = -100
            total += model(input_ids=x.long().unsqueeze(0), labels=y).loss * (len(x) - n_prompt)
            count += len(x) - n_prompt
    torch.testing.assert_close(padded, total / count, rtol=1e-5, atol=1e-5)
    assert (labels[mask == 0] == -100).all()

def replay_hidden(model, layers, learner, ids, mask):
    with ilora.use_learner(layers, learner):
        return model.base_model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[1:]

def test_consistency_zero_when_equal_positive_otherwise():
    model = tiny_model("llama")
    layers = ilora.inject_lora(model, r=4, alpha=8)
    ids, mask, _, _ = ilora.collate(rows(4), 0, "cpu")
    randomize_lora(layers, seed=1, which="fast")
    randomize_lora(layers, seed=1, which="slow")  # slow == fast
    cons = ilora.consistency_loss(replay_hidden(model, layers, "fast", ids, mask),
                                  replay_hidden(model, layers, "slow", ids, mask), mask)
    assert cons.item() == 0.0
    randomize_lora(layers, seed=2, which="slow")
    cons = ilora.consistency_loss(replay_hidden(model, layers, "fast", ids, mask),
                                  replay_hidden(model, layers, "slow", ids, mask), mask)
    assert cons.item() > 0

def test_consistency_ignores_padding_and_averages_over_layers():
    h_fast = [torch.zeros(1, 3, 2), torch.zeros(1, 3, 2)]
    h_slow = [torch.tensor([[[1.0, 1.0], [1.0, 1.0], [9.0, 9.0]]]), torch.tensor([[[3.0, 3.0], [3.0, 3.0], [9.0, 9.0]]])]
    mask = torch.tensor([[1, 1, 0]])  # the third token is padding
    assert ilora.consistency_loss(h_fast, h_slow, mask).item() == pytest.approx((1 + 9) / 2)

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
                           replay_hidden(model, layers, "slow", ids, mask), mask).backward()
    assert all(layer.slow_A.grad is None and layer.slow_B.grad is None for layer in layers)
    assert all(layer.lora_B.weight.grad.abs().sum() > 0 for layer in layers)

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
    assert partial["AP"] == [0.5] and partial["OP"] is None

# ---- end to end ------------------------------------------------------------------------------------------------

def write_task(folder, n=8, suffix=".json", colour="red"):
    folder.mkdir(parents=True, exist_ok=True)
    recs = [{"prompt": f"what colour is the {w}", "answer": colour} for w in ["cat", "dog", "sky", "sea"][:n]] * 2
    for split in ("train", "eval", "test"):
        path = folder / f"{split}{suffix}"
        if suffix == ".json":
            path.write_text(json.dumps(recs))
        else:
            path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return folder

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_llama")
    tiny_model("llama").save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d

def base_args(model_dir, tmp_path, *extra):
    return ["--model", str(model_dir), "--out", str(tmp_path / "out"), "--r", "4", "--epochs", "2",
            "--batch-size", "4", "--max-new-tokens", "4", "--lr", "1e-2", "--log-every", "2", *extra]

@pytest.mark.parametrize("method", ["seq", "replay", "ilora"])
def test_main_end_to_end_writes_R_and_metrics(method, model_dir, tmp_path):
    t1, t2 = write_task(tmp_path / "t1", colour="red"), write_task(tmp_path / "t2", suffix=".jsonl", colour="blue")
    res = ilora.main(base_args(model_dir, tmp_path, "--tasks", f"{t1},{t2}", "--method", method,
                               "--eval-learner", "both"))
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["R"] == json.loads(json.dumps(res["R"]))
    learners = ["slow", "fast"] if method == "ilora" else ["fast"]
    assert saved["learners"] == learners
    for k in learners:
        R = saved["R"][k]
        assert len(R) == 3 and all(len(row) == 2 and all(0 <= v <= 1 for v in row) for row in R)
        assert saved["metrics"][k]["OP"] == pytest.approx(sum(R[2]) / 2)
    assert saved["train_tokens"] > 0
    adapters = sorted(p.parent.name for p in (tmp_path / "out").glob("task_2/*/adapter_model.safetensors"))
    assert adapters == sorted(learners)
