"""Tests for merge_check.py: the share of delta W that a bf16 merge rounds away, and the unmerged scoring path."""
import pathlib, sys

import torch
import torch.nn as nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # ilora.py is one folder up
import ilora, merge_check
from test_ilora import model_dir, tiny_tokenizer, write_task  # noqa: F401

def test_below_half_step_counts_the_entries_a_bf16_merge_rounds_away():
    layer = ilora.LoRALayer(nn.Linear(4, 2, bias=False), r=1, alpha=1.0, dropout=0.0)
    with torch.no_grad():
        layer.base_layer.weight.fill_(1.0)  # bf16 step at 1.0: 2**-7, half a step 2**-8 = 0.0039
        layer.lora_A.weight.copy_(torch.tensor([[0.001, 0.003, 0.005, 0.02]]))
        layer.lora_B.weight.fill_(1.0)
    assert merge_check.below_half_step([layer], "fast") == 0.5
    merged = layer.merged_layer("fast").weight.to(torch.bfloat16).float()
    assert (merged[:, :2] == 1.0).all() and (merged[:, 2:] > 1.0).all()  # what the count says is lost, is

def test_the_unmerged_path_scores_through_the_wrappers_and_restores_the_merge(tmp_path, model_dir):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = tiny_tokenizer()
    layers = ilora.inject_lora(model, None, 4, 8.0)
    cfg = ilora.Config(model=str(model_dir), tasks=str(write_task(tmp_path / "t")), max_len=64, max_new_tokens=4)
    tasks = ilora.load_tasks(cfg)
    calls = []
    real = ilora.merged
    ilora.merged = lambda model, learner: calls.append(learner) or real(model, learner)
    try:
        merge_check.predict(model, layers, tok, tasks, cfg, {"t": 4}, "slow", merge=False)
        assert calls == []  # the wrappers answered, not a merged copy
        merge_check.predict(model, layers, tok, tasks, cfg, {"t": 4}, "slow", merge=True)
        assert calls == ["slow"]
    finally:
        ilora.merged = real
