"""Tests for merge_check.py: the share of delta W that a bf16 merge rounds away, and the unmerged scoring path."""
import pathlib, sys

import torch
import torch.nn as nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # ilora.py is one folder up
import ilora, merge_check
from test_ilora import model_dir, tiny_tokenizer, write_task  # noqa: F401

def test_rounded_away_counts_the_entries_a_bf16_merge_loses():
    layer = ilora.LoRALayer(nn.Linear(6, 1, bias=False), r=1, alpha=1.0, dropout=0.0)
    with torch.no_grad():
        # bf16 steps: 2**-7 above 1.0, 2**-8 below it, much finer near 0
        layer.base_layer.weight.copy_(torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 0.0]]))
        layer.lora_A.weight.copy_(torch.tensor([[0.001, 0.003, 0.005, -0.003, 0.0, 0.001]]))
        layer.lora_B.weight.fill_(1.0)
    assert merge_check.rounded_away([layer], "fast") == 2 / 5  # 0.001 and 0.003 above 1.0; the zero not counted
    merged = layer.merged_layer("fast").weight.to(torch.bfloat16).float()[0]
    assert merged[:2].tolist() == [1.0, 1.0] and merged[2] > 1.0 and merged[3] < 1.0 and merged[5] > 0

def test_the_unmerged_path_scores_through_the_wrappers_and_restores_the_merge(tmp_path, model_dir):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = tiny_tokenizer()
    layers = ilora.inject_lora(model, None, 4, 8.0)
    cfg = ilora.Config(model=str(model_dir), tasks=str(write_task(tmp_path / "t")), max_len=64, max_new_tokens=4)
    _, prompt_ids, _ = ilora.encode_tasks(tok, ilora.load_tasks(cfg), cfg)
    calls = []
    real = ilora.merged
    ilora.merged = lambda model, learner: calls.append(learner) or real(model, learner)
    try:
        merge_check.predict(model, layers, tok, prompt_ids, cfg, {"t": 4}, "slow", merge=False)
        assert calls == []  # the wrappers answered, not a merged copy
        merge_check.predict(model, layers, tok, prompt_ids, cfg, {"t": 4}, "slow", merge=True)
        assert calls == ["slow"]
    finally:
        ilora.merged = real
