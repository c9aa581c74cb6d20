"""Speed and memory of ilora.py's training step (seq, replay, ilora) next to a peft-based I-LoRA comparator.

    python bench.py --models smollm2,qwen2-1.5b,llama2-7b --smollm2-path /root/ilora-model/smollm2-135m-instruct \
        --steps 20 --warmup 5 --out bench.json          # GPU (bf16); about 3 minutes on one H100
    python bench.py --tiny                               # CPU smoke test, a few seconds
    torchrun --nproc_per_node 2 bench.py --models llama2-7b --methods seq,replay,ilora --eval-prompts 0 \
        --out bench_2.json                               # the same global batch over 2 processes

Every method times the same rows: 8 current rows (+ 8 replay rows for all but seq) of 512 random tokens, the
last 64 of each the answer (the only labelled tokens, as in TRACE). A fresh model is built for every method.
Methods: seq / replay / ilora call ilora.train_step, the shipped code path. peft and peft-ans are I-LoRA as the
authors' code (which47/LLMCL, method/ILORA.py) runs it: two peft adapters switched with set_adapter, a no-grad
forward of the replay rows with the slow adapter, separate forwards of the current and the replay rows with the
fast one, and the slow update as a Python loop over named_parameters (here the correct EMA). peft computes its
CE through the model's `labels=` (full-vocab logits, as the authors' code); peft-ans uses ilora's answer-only
LM head, to separate that saving from the structural ones. The step time is the median of CUDA-event timings
after warm-up; the peak memory is over the timed steps. See BENCHMARKS.md for the FLOP count behind the MFU.
Under torchrun every process builds the same rows, and ilora.train_step gives each its share of them, as in a run:
the step time is rank 0's, tokens/s and the MFU are the global batch's (the MFU over all the processes' cards),
and the peak memory is one process's. The peft comparators and the evaluation pass are left out under torchrun.
"""
import argparse, gc, inspect, os, pathlib, statistics, sys, time, warnings

import torch
import torch.nn as nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # ilora.py is one folder up
if "--ilora" in sys.argv:  # another ilora.py (an earlier version, say), to time both on the same card
    import importlib.util
    _spec = importlib.util.spec_from_file_location("ilora", sys.argv[sys.argv.index("--ilora") + 1])
    ilora = importlib.util.module_from_spec(_spec)
    sys.modules["ilora"] = ilora
    _spec.loader.exec_module(ilora)
else:
    import ilora
WORLD = getattr(ilora, "WORLD", 1)  # processes under torchrun; an ilora.py older than its torchrun support has none

# Random-weight models from the configs of real architectures (no weights needed).
ARCHS = {
    "qwen2-1.5b": ("qwen2", dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                                 intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True,
                                 max_position_embeddings=32768, rms_norm_eps=1e-6)),
    "llama2-7b": ("llama", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                                intermediate_size=11008, vocab_size=32000, max_position_embeddings=4096,
                                rms_norm_eps=1e-5, tie_word_embeddings=False)),
    "tiny": ("llama", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=128, vocab_size=512, max_position_embeddings=256)),
}
RUN_ORDER = ["peft", "peft-ans", "ilora", "replay", "seq"]  # most memory first, so an OOM shows up at once
SHOW_ORDER = ["seq", "replay", "ilora", "peft", "peft-ans"]

def log(*a):
    print(*a, flush=True)

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()

def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

class IdTokenizer:
    """Stands in for a tokenizer on random-weight models: a prompt is already a list of token ids; no eos."""
    pad_token_id, eos_token_id = 0, None
    def __call__(self, ids, add_special_tokens=True):
        return {"input_ids": list(ids)}
    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
        return " ".join(map(str, ids.tolist()))

def build_model(name, args, device):
    """(model in train mode, tokenizer): bf16 on CUDA, fp32 on the CPU."""
    from transformers import AutoConfig, AutoModelForCausalLM
    if name == "smollm2":
        model, tok = ilora.load_model(args.smollm2_path, device)
    else:
        kind, kw = ARCHS[name]
        config = AutoConfig.for_model(kind, **kw, pad_token_id=0)
        with torch.device(device):  # random init directly on the device
            model = AutoModelForCausalLM.from_config(
                config, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
        model.generation_config.eos_token_id = None  # random weights: always generate max_new_tokens
        tok = IdTokenizer()
    model.train()
    return model, tok

def model_shape(model):
    """What the FLOP count needs, read before any LoRA is injected."""
    c, head = model.config, model.get_output_embeddings()
    n_mat = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear) and m is not head)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return {"n_params": sum(p.numel() for p in model.parameters()), "n_matmul": n_mat, "layers": c.num_hidden_layers,
            "attn_width": c.num_attention_heads * head_dim, "hidden": c.hidden_size, "vocab": c.vocab_size}

def step_flops(s, n_lora, rows, teacher_rows, T, n_ans):
    """Model FLOPs of one training step (activation recomputation is not counted). Per token of the fast rows:
    forward 2N + 4LTA; backward of the frozen base, input gradients only, 2N + 8LTA (matmuls as in the forward;
    attention needs dQ, dK, dV and dP, twice its forward); LoRA 6 N_lora. LM head on the n_ans labelled positions
    of each row: 2HV forward + 2HV backward. Teacher (ilora's slow learner) per replay token: 2N + 4LTA + 2 N_lora.
    N = matmul weights of the blocks, L layers, T tokens per row, A = heads x head_dim, H hidden, V vocab."""
    N, L, A, H, V = s["n_matmul"], s["layers"], s["attn_width"], s["hidden"], s["vocab"]
    attn = 4 * L * T * A
    fast = rows * T * (4 * N + 3 * attn + 6 * n_lora) + rows * n_ans * 4 * H * V
    return fast + teacher_rows * T * (2 * N + attn + 2 * n_lora)

def make_rows(n, T, n_ans, vocab, gen):
    """n rows of T random token ids (int32, CPU), the last n_ans the answer: (ids, n_prompt) like ilora.encode."""
    return [(torch.randint(3, vocab, (T,), generator=gen, dtype=torch.int32), T - n_ans) for _ in range(n)]

def peft_comparator(model, cfg, current, replay, head):
    """I-LoRA the way the authors' code runs it, on peft. Returns (step function, fast params, slow params)."""
    from peft import LoraConfig, get_peft_model
    lcfg = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, task_type="CAUSAL_LM",
                      target_modules=ilora.DEFAULT_TARGETS[model.config.model_type])
    pm = get_peft_model(model, lcfg, adapter_name="fast")
    pm.add_adapter("slow", lcfg)
    named = dict(pm.named_parameters())
    with torch.no_grad():  # the slow learner starts as a copy of the fast one, as in ilora
        for n, p in named.items():
            if ".slow." in n:
                p.copy_(named[n.replace(".slow.", ".fast.")])
    pm.set_adapter("fast")  # makes only the fast adapter trainable
    fast = [p for n, p in named.items() if ".fast." in n]
    slow = [p for n, p in named.items() if ".slow." in n]
    device, pad = model.device, model.config.pad_token_id
    opt = torch.optim.AdamW(fast, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup)))
    blocks = pm.get_base_model().base_model

    def forward(ids, mask, labels, pos, hidden):
        if head == "hf":  # full-vocab logits and HF's loss, as model(**batch, labels=labels) in the authors' code
            out = pm(input_ids=ids, attention_mask=mask, labels=labels, output_hidden_states=hidden, use_cache=False)
            return out.loss, out.hidden_states
        out = blocks(input_ids=ids, attention_mask=mask, output_hidden_states=hidden, use_cache=False)
        return ilora.lm_loss(pm.get_base_model(), out.last_hidden_state, labels, pos, len(pos)), out.hidden_states

    def step(k):
        ids_c, mask_c, lab_c, pos_c = ilora.collate(current, pad, device)
        ids_r, mask_r, lab_r, pos_r = ilora.collate(replay, pad, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            pm.set_adapter("slow")
            with torch.no_grad():
                run = pm if head == "hf" else blocks  # the authors' code runs the whole LM, logits included
                h_slow = run(input_ids=ids_r, attention_mask=mask_r, output_hidden_states=True,
                             use_cache=False).hidden_states[1:]
            pm.set_adapter("fast")
            ce_c, _ = forward(ids_c, mask_c, lab_c, pos_c, False)
            ce_r, h_fast = forward(ids_r, mask_r, lab_r, pos_r, True)
            loss = (ce_c + ce_r) / 2 + cfg.gamma * ilora.consistency_loss(h_fast[1:], h_slow, mask_r, mask_r.sum())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(fast, cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        lam = ilora.slow_lam(k, cfg.lam)
        params = dict(pm.named_parameters())
        for n, p in params.items():  # the slow update as a loop over every named parameter
            if ".slow." in n:
                p.data.mul_(lam).add_(params[n.replace(".slow.", ".fast.")].data, alpha=1 - lam)
        return loss.detach()
    return step, fast, slow

def compile_blocks(model, dynamic=None):
    """torch.compile the forward of each transformer block (they share their code: one compilation serves all);
    returns the blocks. With fixed shapes (dynamic=None) real runs' changing row lengths made it recompile until the
    limit and run slower (issue 13); compiled_run.py compiles with dynamic=True. Left out of ilora.py until measured."""
    blocks = ilora.transformer_blocks(model.base_model)
    for block in blocks:
        block.forward = torch.compile(block.forward, dynamic=dynamic)
    return blocks

def time_steps(step, warmup, steps, device):
    """Median ms per step over `steps` timed steps after `warmup`, every ms, and the peak GiB over the timed steps."""
    for k in range(1, warmup + 1):
        step(k)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    marks = []
    for k in range(warmup + 1, warmup + steps + 1):
        if device.type == "cuda":
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record(); step(k); e1.record()
            marks.append((e0, e1))
        else:
            t0 = time.perf_counter(); step(k)
            marks.append(1000 * (time.perf_counter() - t0))
    sync(device)
    ms = [m if isinstance(m, float) else m[0].elapsed_time(m[1]) for m in marks]
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return statistics.median(ms), ms, peak

def sync_check(step, k, device):
    """Run one step under CUDA's sync debug mode: where does the host wait for the GPU?"""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step(k)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    sync(device)
    where = [f"{w.filename.rsplit('/', 1)[-1]}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
    return {"syncs": len(where), "where": sorted(set(where))}

def time_eval(model, tok, layers, args, device, gen):
    """One task's evaluation pass: ilora.generate (the shipped path) with the slow learner switched in. Today's
    ilora.py gets the prompts' token ids made before the timing, as a run tokenizes them once; an earlier one (--ilora)
    tokenizes the text inside each pass, as it ran."""
    n, T = args.eval_prompts, args.row_len - args.gen_tokens
    prompts = [torch.randint(3, model.config.vocab_size, (T,), generator=gen).tolist() for _ in range(n)]
    if not isinstance(tok, IdTokenizer):
        prompts = [tok.decode(p) for p in prompts]
    if "prompt_ids" in inspect.signature(ilora.predict).parameters:  # today's: a run tokenizes its prompts once,
        prompts = [tok(p, add_special_tokens=True)["input_ids"] for p in prompts]  # generate() takes the ids
    model.eval()
    static = args.compile and device.type == "cuda"
    if hasattr(ilora, "STATIC_CACHE_WRONG"):  # today's: generate() decodes one batch, predict() cuts them
        scoring = lambda: ilora.merged(model, "slow")
        gen = lambda ps, n: [a for s in range(0, len(ps), args.eval_batch) for a in ilora.generate(
            model, tok, ps[s: s + args.eval_batch], n, args.row_len, args.eval_batch if static else 0)]
    elif hasattr(ilora, "merged"):  # the learner folded into the weights; static cache and compilation on a GPU
        scoring = lambda: ilora.merged(model, "slow")
        gen = lambda ps, n: ilora.generate(model, tok, ps, n, args.row_len, args.eval_batch, static=static)
    else:  # an earlier ilora.py: the LoRA wrappers run at every decoding step
        scoring = lambda: ilora.use_learner(layers, "slow")
        gen = lambda ps, n: ilora.generate(model, tok, ps, n, args.row_len, args.eval_batch)
    times = []
    with scoring():
        for _ in range(args.eval_repeats + 1):  # the first pass includes any compilation: reported apart
            sync(device); t0 = time.perf_counter()
            answers = gen(prompts, args.gen_tokens)
            sync(device); times.append(time.perf_counter() - t0)
    first, secs = times[0], statistics.median(times[1:])
    model.train()
    count = (lambda a: len(a.split())) if isinstance(tok, IdTokenizer) else \
        (lambda a: len(tok(a, add_special_tokens=False)["input_ids"]))
    n_gen = sum(count(a) for a in answers)
    return {"prompts": n, "prompt_tokens": T, "max_new_tokens": args.gen_tokens, "batch": args.eval_batch,
            "seconds": round(secs, 3), "seconds_all": [round(t, 3) for t in times[1:]], "first_seconds": round(first, 3),
            "static_compiled": static and hasattr(ilora, "merged"), "generated_tokens": n_gen,
            "generated_tokens_per_s": round(n_gen / secs, 1)}

def run_method(name, method, args, device, current, replay, ckpt, rate):
    torch.manual_seed(args.seed)
    model, tok = build_model(name, args, device)
    shape = model_shape(model)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    cfg = ilora.Config(method="ilora" if method.startswith("peft") else method, r=8, alpha=16.0,
                       dropout=args.dropout, batch_size=len(current), max_len=args.row_len, device=device.type)
    rep = [] if method == "seq" else replay
    compiled = []  # the blocks compile_blocks compiled for the step
    if method.startswith("peft"):
        step, fast, slow = peft_comparator(model, cfg, current, rep, "hf" if method == "peft" else "ans")
    else:
        layers = ilora.inject_lora(model, None, cfg.r, cfg.alpha, cfg.dropout)
        fast, slow = ilora.fast_tensors(layers), ilora.slow_tensors(layers)
        opt = torch.optim.AdamW(fast, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda")
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup)))
        if args.compile and device.type == "cuda" and hasattr(ilora, "merged"):
            compiled = compile_blocks(model)
        # under torchrun train_step takes this process's share of the rows and sums the gradients, as in a run
        step = lambda k: ilora.train_step(model, layers, opt, sched, current, rep, cfg, k)
    fast0, slow0 = [t.detach().clone() for t in fast], [t.detach().clone() for t in slow]
    big = shape["n_params"] > 3e9
    warmup, steps = (min(args.warmup, 3), min(args.steps, 10)) if big else (args.warmup, args.steps)
    ms, all_ms, peak = time_steps(step, warmup, steps, device)
    n_lora = sum(t.numel() for t in fast)
    flops = step_flops(shape, n_lora, len(current) + len(rep), len(rep) if method != "replay" else 0,
                       args.row_len, args.answer_len)
    tokens = (len(current) + len(rep)) * args.row_len
    row = {"ms_per_step": round(ms, 2), "ms_all": [round(x, 2) for x in all_ms], "warmup": warmup, "steps": steps,
           "tokens_per_step": tokens, "tokens_per_s": round(tokens / ms * 1000), "peak_gib": peak and round(peak, 3),
           "grad_ckpt": ckpt, "model_tflop_per_step": round(flops / 1e12, 3),
           "mfu": round(flops / (ms / 1000) / (rate * WORLD), 4) if rate and not method.startswith("peft") else None,
           "model_params": shape["n_params"], "lora_params": n_lora}
    moved_fast = max((a - b).abs().max().item() for a, b in zip(fast, fast0))
    moved_slow = max((a - b).abs().max().item() for a, b in zip(slow, slow0))
    gap = max((a - b).abs().max().item() for a, b in zip(fast, slow))
    row.update(fast_moved=moved_fast, slow_moved=moved_slow, slow_fast_gap=gap)
    if args.tiny:  # the comparator must really train fast and move slow, as ilora does
        assert all(t.requires_grad for t in fast) and moved_fast > 0, f"{method}: fast learner did not train"
        if method in ("ilora", "peft", "peft-ans"):
            assert moved_slow > 0 and gap > 0, f"{method}: slow learner did not move, or equals the fast one"
    if method == "ilora":  # extras, after the timing; a failure here is reported, not fatal
        try:
            if device.type == "cuda" and not args.no_sync_check:
                row["sync_check"] = sync_check(step, warmup + steps + 1, device)
            if args.eval_prompts > 0:
                # Scoring runs the plain blocks, as ilora.py does: a compiled block inside generate recompiled for
                # each layer's cache state until torch's limit, and that cost is not ilora.py's.
                for block in compiled:
                    del block.forward
                row["eval"] = time_eval(model, tok, layers, args, device, torch.Generator().manual_seed(args.seed + 1))
        except Exception as e:
            row["extras_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            log(f"[{name}] ilora sync check / eval FAILED: {row['extras_error']}")
    return row

def bench_model(name, args, device, rate):
    gen = torch.Generator().manual_seed(args.seed)
    if name in ARCHS:
        vocab = ARCHS[name][1]["vocab_size"]
    else:
        from transformers import AutoConfig
        vocab = AutoConfig.from_pretrained(args.smollm2_path).vocab_size
    current = make_rows(args.batch, args.row_len, args.answer_len, vocab, gen)
    replay = make_rows(args.batch, args.row_len, args.answer_len, vocab, gen)  # same rows for every method
    ckpt = args.grad_ckpt == "on"
    while True:
        res, retry = {}, False
        for method in [m for m in RUN_ORDER if m in args.methods]:
            log(f"[{name}] {method} (grad_ckpt={ckpt}) ...")
            err = None
            try:
                res[method] = run_method(name, method, args, device, current, replay, ckpt, rate)
                r = res[method]
                log(f"[{name}] {method}: {r['ms_per_step']:.1f} ms/step, {r['tokens_per_s']} tok/s, "
                    f"peak {r['peak_gib']} GiB" + (f", eval {r['eval']}" if "eval" in r else "")
                    + (f", syncs {r['sync_check']}" if "sync_check" in r else ""))
            except torch.cuda.OutOfMemoryError as e:
                err, retry = f"OOM: {str(e).splitlines()[0][:200]}", args.grad_ckpt == "auto" and not ckpt
            except Exception as e:
                err = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            if err:
                log(f"[{name}] {method} FAILED: {err}")
                res[method] = {"error": err, "grad_ckpt": ckpt}
            free(device)
            if retry:  # compare every method under the same setting: start the model again with checkpointing
                log(f"[{name}] out of memory without gradient checkpointing: all methods again with it")
                ckpt = True
                break
        if not retry:
            return res

def fmt(x, spec):
    return "-" if x is None else format(x, spec)

def report(results, meta):
    """Eval lines, then the markdown table, then one line per target of issue 5."""
    for name, res in results.items():
        if "eval" in res.get("ilora", {}):
            e = res["ilora"]["eval"]
            log(f"eval pass {name}: {e['prompts']} prompts x {e['prompt_tokens']} tokens, up to {e['max_new_tokens']} "
                f"new, batch {e['batch']}: {e['seconds']:.2f} s, {e['generated_tokens_per_s']} generated tokens/s")
    log(f"\ndevice: {meta['device']} x {meta['world_size']} processes | bf16 matmul {meta['matmul_n']}^3: {fmt(meta['matmul_tflops'], '.1f')} TFLOP/s\n")
    log("| model | method | ckpt | ms/step | tokens/s | peak GiB | time x replay | peak x replay | time x ilora | MFU % |")
    log("|---|---|---|---|---|---|---|---|---|---|")
    step, speedup, mem, mfu = {}, {}, {}, {}
    for name, res in results.items():
        def ratio(m, key, base):
            a, b = res.get(m, {}).get(key), res.get(base, {}).get(key)
            return a / b if a and b else None
        for m in [m for m in SHOW_ORDER if m in res]:
            r = res[m]
            if "error" in r:
                log(f"| {name} | {m} | {'on' if r['grad_ckpt'] else 'off'} | failed: {r['error'][:80]} | | | | | | |")
                continue
            log(f"| {name} | {m} | {'on' if r['grad_ckpt'] else 'off'} | {r['ms_per_step']:.1f} | {r['tokens_per_s']} | "
                f"{fmt(r['peak_gib'], '.2f')} | {fmt(ratio(m, 'ms_per_step', 'replay'), '.3f')} | "
                f"{fmt(ratio(m, 'peak_gib', 'replay'), '.3f')} | {fmt(ratio(m, 'ms_per_step', 'ilora'), '.2f')} | "
                f"{fmt(r['mfu'] and 100 * r['mfu'], '.1f')} |")
        step[name], mem[name] = ratio("ilora", "ms_per_step", "replay"), ratio("ilora", "peak_gib", "replay")
        speedup[name] = ratio("peft", "ms_per_step", "ilora")
        if name in ("llama2-7b", "tiny"):
            mfu[name] = res.get("ilora", {}).get("mfu")
    def target(label, vals, ok):
        shown = ", ".join(f"{k} {fmt(v, '.3f')}" for k, v in vals.items()) or "no numbers"
        met = bool(vals) and all(v is not None and ok(v) for v in vals.values())
        log(f"target {label}: {shown} -> {'met' if met else 'NOT met'}")
    target("ilora step / replay step <= 1.3", step, lambda v: v <= 1.3)
    target("peft comparator step / ilora step >= 1.5", speedup, lambda v: v >= 1.5)
    target("peak memory ilora / replay <= 1.05", mem, lambda v: v <= 1.05)
    target("MFU of the ilora step on llama2-7b >= 0.35", mfu, lambda v: v >= 0.35)

def matmul_rate(device, n):
    """Measured dense bf16 matmul FLOP/s on this card (median of 10 n^3 products after warm-up)."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    ms = []
    for _ in range(10):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record(); a @ b; e1.record()
        e1.synchronize()
        ms.append(e0.elapsed_time(e1))
    return 2 * n**3 / (statistics.median(ms) / 1000)

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="smollm2,qwen2-1.5b,llama2-7b", help=f"smollm2, {', '.join(ARCHS)}")
    p.add_argument("--methods", default="seq,replay,ilora,peft,peft-ans")
    p.add_argument("--smollm2-path", default="/root/ilora-model/smollm2-135m-instruct")
    p.add_argument("--steps", type=int, default=20, help="timed steps (at most 10 on models over 3B parameters)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (at most 3 over 3B parameters)")
    p.add_argument("--batch", type=int, default=8, help="current rows per step; the replay batch has as many")
    p.add_argument("--row-len", type=int, default=512)
    p.add_argument("--answer-len", type=int, default=64, help="labelled tokens at the end of every row")
    p.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout; under torchrun each process draws it for its own rows")
    p.add_argument("--grad-ckpt", choices=["auto", "on", "off"], default="auto",
                   help="auto: off, and on for all methods of a model as soon as one of them runs out of memory")
    p.add_argument("--eval-prompts", type=int, default=100)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--eval-batch", type=int, default=32)
    p.add_argument("--matmul-n", type=int, default=8192)
    p.add_argument("--no-sync-check", action="store_true", help="skip the extra ilora step in sync debug mode")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="compile_blocks for the step, static cache for the eval pass (GPU, new ilora.py only)")
    p.add_argument("--eval-repeats", type=int, default=3, help="timed eval passes after the first")
    p.add_argument("--ilora", help="path of another ilora.py to time instead of ../ilora.py")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", default="runs/bench.json")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny llama, rows of 64, 3 steps, asserts")
    args = p.parse_args(argv)
    if args.tiny:
        args.models, args.row_len, args.answer_len, args.steps, args.warmup = "tiny", 64, 8, 3, 1
        args.eval_prompts, args.gen_tokens, args.eval_batch = 8, 8, 4
    args.methods = args.methods.split(",")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if WORLD > 1:  # torchrun: this process's GPU; the comparators and the eval pass are one-process code
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        ilora.init_distributed(device)
        args.methods = [m for m in args.methods if not m.startswith("peft")]
        args.eval_prompts = 0
    import transformers, peft
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "world_size": WORLD, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "args": vars(args), "matmul_n": args.matmul_n}
    log(f"device: {meta['device']} x {WORLD} processes | torch {torch.__version__} | transformers "
        f"{transformers.__version__} | peft {peft.__version__}")
    rate = matmul_rate(device, args.matmul_n) if device.type == "cuda" else None
    meta["matmul_tflops"] = rate and rate / 1e12
    log(f"bf16 matmul {args.matmul_n}^3: {fmt(rate and rate / 1e12, '.1f')} TFLOP/s")
    results = {}
    for name in args.models.split(","):
        t0 = time.time()
        results[name] = bench_model(name, args, device, rate)
        log(f"[{name}] done in {time.time() - t0:.0f} s")
        ilora.write_json(args.out, {**meta, "results": results})  # after every model: a timeout keeps the rest
    report(results, meta)
    failed = [f"{n}/{m}" for n, res in results.items() for m, r in res.items() if "error" in r or "extras_error" in r]
    if failed:
        log(f"failed: {', '.join(failed)}")
    if WORLD > 1:
        ilora.end_distributed()
    return 1 if failed and args.tiny else 0  # the smoke test fails loudly; a GPU run keeps what it measured

if __name__ == "__main__":
    sys.exit(main())
