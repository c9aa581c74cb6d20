import time, torch, ilora
from transformers import LlamaConfig, AutoModelForCausalLM
cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
with torch.device("cuda"):
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
ids = torch.randint(0, 49000, (32, 448), device="cuda"); mask = torch.ones_like(ids)
def t(label, **kw):
    for _ in range(2):
        torch.cuda.synchronize(); t0 = time.time()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            out = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=0, **kw)
        torch.cuda.synchronize()
    print(label, f"{(time.time()-t0)/64*1000:.1f} ms/token", out.shape, flush=True)
t("plain")
with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
    torch.cuda.synchronize(); t0=time.time()
    for _ in range(20): m(input_ids=ids[:, :1], use_cache=False)
    torch.cuda.synchronize(); print("bare forward 1 token", (time.time()-t0)/20*1000, "ms")
layers = ilora.inject_lora(m, None, 8, 16, 0.0)
t("lora")
with ilora.use_learner(layers, "slow"): t("lora slow")
