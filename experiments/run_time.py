"""Where a TRACE-8 run's time goes: its scoring pass and its training step, timed in ilora.py's own code paths.

    python experiments/run_time.py --model /root/ilora-model/smollm2-135m-instruct \\
        --data-dir /root/ilora-data/trace_500 --out run_time.json          # one GPU: about 4 minutes
    python experiments/run_time.py --data-dir ../shared/data/trace_500 --per-task 2 --steps 2 --max-len 128  # CPU smoke
    python experiments/run_time.py ... --steps 0 --no-deterministic   # scoring alone, deterministic kernels off
    python experiments/run_time.py ... --steps 0 --compile-backend cudagraphs --no-dynamic-pass
    python experiments/run_time.py ... --steps 0 --compile-backend inductor-kernels   # the decoding step's kernels
    python experiments/run_time.py ... --steps 0 --no-dynamic-pass --attention sdpa  # transformers' own

The settings are `gpu_torchrun.sh trace8`'s (max_len 768, up to 64 new tokens, batches of 100, batch 8 + 8 replay
rows, ilora lam 0.9 gamma 0.1, strict deterministic kernels).

- Scoring: the test prompts through ilora.predict as a run scores a learner (merged, sorted, batched by generation
  length), with the static KV cache three times (the first compiles) and with the dynamic cache once. Inside each
  pass, every call of the model's `generate` is timed alone (the device synchronised around it) with its new tokens
  counted, so that a pass splits into decoding and the rest (sorting, merging, text; `ilora.py` up to commit 2910886
  also tokenized every prompt twice a pass), and the sha256 of its answers: passes that answer alike, in one run or
  across runs (strict kernels or not), have the same. `--compile-backend cudagraphs` compiles the static cache's
  decoding step with torch's cudagraphs backend (the eager kernels replayed as CUDA graphs, no inductor) instead of
  transformers' default (inductor's fused kernels, mode reduce-overhead); `inductor-kernels` launches inductor's
  kernels one by one, so that the profile lists each. `--no-cudnn-attention` keeps torch from cuDNN's attention, the
  kernel that strict mode rules out; `--blas` picks the library of the matrix products (mm_host.py times their
  calls); `--attention sdpa` decodes with transformers' SDPA attention in place of the one `ilora.load_model`
  registers (`ilora.folded_gqa_attention`, which reads the KV cache without copying it to every query head).
  Tokenizing all prompts once is timed apart. One more static pass runs under torch.profiler: its busiest host
  operations are printed.
- Training: ilora steps (`ilora.train_step`, fresh AdamW as `train_task` makes it) on the task of the shortest rows
  and on that of the longest, the replay rows drawn from a buffer holding every task (so the steps' widths, which
  the longest row sets, differ less than the tasks' rows: both are recorded). Per task: the seconds of `--steps`
  steps with one synchronisation at the end (a run's throughput), then each step timed alone. Then a few steps
  under torch.profiler, and the same steps with deterministic kernels off (after one warm-up step); then, in strict
  mode, the same steps with its NaN fill of torch.empty's tensors on and off (`ilora.py` up to commit b66eb18 left
  it on), in the order on, off, off, on, with the fills a step launches.
- The rest of a run: loading the model, the fingerprint, one adapter saved, one checkpoint saved.
"""
import argparse, collections, dataclasses, hashlib, json, os, pathlib, statistics, sys, tempfile, time

import torch
import transformers
from transformers.integrations.sdpa_attention import sdpa_attention_forward

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # ilora.py is one folder up
import ilora
from bench import sync

TRACE8 = "C-STANCE,FOMC,MeetingBank,Py150,ScienceQA,NumGLUE-cm,NumGLUE-ds,20Minuten"
DECODE_COMPILE = {  # --compile-backend: transformers.CompileConfig's settings, None for transformers' own
    "inductor": None,  # inductor's fused kernels, replayed as CUDA graphs (mode reduce-overhead)
    "inductor-kernels": {"backend": "inductor", "mode": "default"},  # the same kernels, launched one by one
    # the eager kernels replayed as CUDA graphs, no inductor; this backend takes no mode
    "cudagraphs": {"backend": "cudagraphs", "mode": None},
}

def timed(device, work):
    """(seconds, result) of work(), the device synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    result = work()
    sync(device)
    return time.perf_counter() - start, result

def host_table(prof, rows):
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60)

def scoring(model, tok, tasks, prompt_ids, cfg, gen_lens, device, prof_rows, dynamic_pass=True):
    """Passes of ilora.predict, each split into generate() calls and the rest."""
    calls = []  # (seconds, rows, prompt width, new tokens) of each generate() call in the current pass
    plain_generate = model.generate

    def generate(*args, **kwargs):
        seconds, out = timed(device, lambda: plain_generate(*args, **kwargs))
        width = kwargs["input_ids"].shape[1]
        calls.append((seconds, kwargs["input_ids"].shape[0], width, out.shape[1] - width))
        return out

    model.generate = generate  # an instance attribute: ilora.generate calls it as model.generate(...)
    # ilora.py's own rule with the static cache forced: a batch of rows on a GPU, none on a CPU
    static_rows = ilora.static_cache_rows(model, tasks, dataclasses.replace(cfg, kv_cache="static"), 1)
    passes = []
    for cache, rows in [("static", static_rows)] * 3 + [("dynamic", 0)] * dynamic_pass:
        calls.clear()
        seconds, answers = timed(device, lambda: ilora.predict(model, tok, prompt_ids, cfg, gen_lens, "slow", rows))
        decoding = sum(c[0] for c in calls)
        answers_sha256 = hashlib.sha256(json.dumps(answers, sort_keys=True).encode()).hexdigest()
        passes.append({"cache": cache if device.type == "cuda" else "dynamic (CPU)", "seconds": round(seconds, 3),
                       "in_generate": round(decoding, 3), "outside_generate": round(seconds - decoding, 3),
                       "batches": len(calls), "new_tokens": [c[3] for c in calls],
                       "prompt_widths": [c[2] for c in calls], "batch_seconds": [round(c[0], 3) for c in calls],
                       "answers_sha256": answers_sha256})
        print("scoring pass", json.dumps({k: v for k, v in passes[-1].items() if not isinstance(v, list)}),
              "new tokens", passes[-1]["new_tokens"], flush=True)
    prompts = [record["prompt"] for name in tasks for record in tasks[name][cfg.eval_split]]
    tokenize_s, _ = timed(device, lambda: [tok(p, add_special_tokens=True)["input_ids"] for p in prompts])
    with torch.profiler.profile(activities=profiler_activities(device)) as prof:
        ilora.predict(model, tok, prompt_ids, cfg, gen_lens, "slow", static_rows)
        sync(device)
    del model.generate
    return {"passes": passes, "tokenize_all_prompts_once_s": round(tokenize_s, 6), "prompts": len(prompts),
            "profile": host_table(prof, prof_rows)}

def profiler_activities(device):
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return activities

def training(model, layers, tok, tasks, train, cfg, device, n_steps, prof_rows):
    """ilora steps on the tasks of the shortest and the longest rows, replaying from a buffer of every task (so a
    step's width, its longest row, is often near max_len on either task: recorded as step_width_median)."""
    buffer = ilora.ReplayBuffer(cfg.buffer_size, cfg.seed)
    for rows in train.values():
        buffer.add(rows)
    mean_len = {name: statistics.mean(len(ids) for ids, _ in rows) for name, rows in train.items()}
    picks = [min(mean_len, key=mean_len.get), max(mean_len, key=mean_len.get)]
    optimizer = torch.optim.AdamW(ilora.fast_tensors(layers), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup)))
    model.train()
    step = [100]  # past the slow learner's warm-up, as in a run's later tasks
    widths = []  # each step's padded length: its longest row, current or replayed

    def one_step(name, k):
        rows = train[name]
        current = [rows[(k * cfg.batch_size + i) % len(rows)] for i in range(cfg.batch_size)]
        replay = buffer.sample(cfg.batch_size)
        widths.append(max(len(ids) for ids, _ in current + replay))
        step[0] += 1
        return ilora.train_step(model, layers, optimizer, sched, current, replay, cfg, step[0])

    results = {}
    for name in picks:
        one_step(name, 0)  # warm-up: allocator, kernels' first launches
        widths.clear()
        together, _ = timed(device, lambda: [one_step(name, k) for k in range(n_steps)])
        width = statistics.median(widths)
        alone = [timed(device, lambda: one_step(name, k))[0] for k in range(n_steps)]
        with torch.profiler.profile(activities=profiler_activities(device)) as prof:
            for k in range(3):
                one_step(name, k)
            sync(device)
        torch.use_deterministic_algorithms(False)
        one_step(name, 0)  # warm-up: other kernels
        nondeterministic, _ = timed(device, lambda: [one_step(name, k) for k in range(n_steps)])
        torch.use_deterministic_algorithms(cfg.deterministic)
        nan_fill = nan_fill_cost(device, lambda k: one_step(name, k), n_steps) if cfg.deterministic else None
        results[name] = {"mean_row_tokens": round(mean_len[name], 1), "step_width_median": width, "steps": n_steps,
                         "ms_per_step_one_sync": round(1000 * together / n_steps, 1),
                         "ms_per_step_each_synced_median": round(1000 * statistics.median(alone), 1),
                         "ms_per_step_each_synced": [round(1000 * s, 1) for s in alone],
                         "ms_per_step_nondeterministic_one_sync": round(1000 * nondeterministic / n_steps, 1),
                         "nan_fill": nan_fill,
                         "profile": host_table(prof, prof_rows)}
        print("training", name, json.dumps({k: v for k, v in results[name].items()
                                            if k not in ("profile", "ms_per_step_each_synced")}), flush=True)
    return results

def caller_names(event, depth):
    """The names of the profiler events that an event ran inside, the nearest first."""
    names = []
    while event.cpu_parent is not None and len(names) < depth:
        event = event.cpu_parent
        names.append(event.name)
    return names

def nan_fill_cost(device, step, n_steps):
    """Strict mode's NaN in the tensors torch.empty and its kin make, which ilora.make_deterministic leaves off,
    against none: the fills a step launches, counted by the profiler with the operations they ran inside, and the
    seconds of n_steps steps with one sync, in the order on, off, off, on (each after a warm-up step), so that a
    steady drift of the machine falls on both alike."""
    keep = torch.utils.deterministic.fill_uninitialized_memory
    result = {}
    try:
        for fill in (True, False, False, True):
            torch.utils.deterministic.fill_uninitialized_memory = fill
            key = "with_nan_fill" if fill else "without"
            step(0)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                step(1)
                sync(device)
            fills = [event for event in prof.events() if event.name == "aten::fill_"]
            callers = collections.Counter(" < ".join(caller_names(event, 3)) for event in fills)
            seconds, _ = timed(device, lambda: [step(k) for k in range(n_steps)])
            result.setdefault(key, {"fill_calls_a_step": len(fills), "callers": dict(callers.most_common(5)),
                                    "ms_per_step_one_sync": []})
            result[key]["ms_per_step_one_sync"].append(round(1000 * seconds / n_steps, 1))
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = keep
    return result

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=ilora.DEFAULT_MODEL)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--tasks", default=TRACE8)
    p.add_argument("--per-task", type=int, default=0, help="test prompts and training rows per task, 0 = all")
    p.add_argument("--max-len", type=int, default=768, help="a run's --max-len (shorter for a CPU smoke test)")
    p.add_argument("--steps", type=int, default=30, help="training steps timed per task, 0 = scoring alone")
    p.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=True,
                   help="strict deterministic kernels, as ilora.py runs by default")
    p.add_argument("--compile-backend", choices=list(DECODE_COMPILE), default="inductor",
                   help="what compiles the static cache's decoding step: transformers' default (inductor's fused "
                        "kernels in CUDA graphs), the same kernels launched one by one (a profile names them), or "
                        "torch's cudagraphs backend (the eager kernels in CUDA graphs)")
    p.add_argument("--blas", choices=["default", "cublas", "cublaslt"], default=None,
                   help="torch.backends.cuda.preferred_blas_library (GPU): which library runs the matrix products; "
                        "left as torch has it if not given")
    p.add_argument("--cudnn-attention", action=argparse.BooleanOptionalAction, default=True,
                   help="let torch pick cuDNN's attention (it does on an H200 without strict mode)")
    p.add_argument("--attention", choices=["folded-gqa", "sdpa"], default="folded-gqa",
                   help="ilora.load_model's attention (ilora.folded_gqa_attention), or transformers' SDPA attention")
    p.add_argument("--dynamic-pass", action=argparse.BooleanOptionalAction, default=True,
                   help="a fourth scoring pass, with the dynamic cache")
    p.add_argument("--profile-rows", type=int, default=30, help="host operations printed per profile")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    cfg = ilora.Config(model=args.model, data_dir=args.data_dir, tasks=args.tasks, epochs=1, batch_size=8,
                       max_len=args.max_len, max_new_tokens=64, eval_batch_size=100, eval_learner="both",
                       lam=0.9, gamma=0.1, max_test=args.per_task, max_train=args.per_task,
                       deterministic=args.deterministic)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ilora.make_deterministic(cfg.deterministic, device)
    torch.use_deterministic_algorithms(cfg.deterministic)  # off as well, when an earlier caller in this process set it
    tasks = ilora.load_tasks(cfg)
    other = {}
    other["load_model_s"], (model, tok) = timed(device, lambda: ilora.load_model(cfg.model, device))
    if DECODE_COMPILE[args.compile_backend]:
        model.generation_config.compile_config = transformers.CompileConfig(**DECODE_COMPILE[args.compile_backend])
    torch.backends.cuda.enable_cudnn_sdp(args.cudnn_attention)
    if args.attention == "sdpa":  # for this process: the model's "sdpa" attention is looked up at every call
        transformers.AttentionInterface.register("sdpa", sdpa_attention_forward)
    if device.type == "cuda" and args.blas:
        torch.backends.cuda.preferred_blas_library(args.blas)
    other["fingerprint_s"], _ = timed(device, lambda: ilora.fingerprint(cfg, tasks))
    ilora.set_seed(cfg.seed)
    layers = ilora.inject_lora(model, ilora.lora_targets(cfg), cfg.r, cfg.alpha, cfg.dropout)
    other["encode_tasks_s"], (train, prompt_ids, gen_lens) = timed(device, lambda: ilora.encode_tasks(tok, tasks, cfg))
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "transformers": transformers.__version__, "cpu_count": os.cpu_count(),
              "ilora_sha1": hashlib.sha1(pathlib.Path(ilora.__file__).read_bytes()).hexdigest(),
              "deterministic": cfg.deterministic, "compile_backend": args.compile_backend,
              "cudnn_attention": args.cudnn_attention, "attention": args.attention,
              "blas": args.blas if device.type == "cuda" else None,
              "gen_lens": gen_lens}
    result["training"] = {}
    if args.steps:
        result["training"] = training(model, layers, tok, tasks, train, cfg, device, args.steps, args.profile_rows)
    result["scoring"] = scoring(model, tok, tasks, prompt_ids, cfg, gen_lens, device, args.profile_rows,
                                args.dynamic_pass)
    result["compile_config"] = str(getattr(model, "_last_compile_config", None))  # what generate() compiled with
    buffer = ilora.ReplayBuffer(cfg.buffer_size, cfg.seed)
    buffer.add([row for rows in train.values() for row in rows][: cfg.buffer_size])
    with tempfile.TemporaryDirectory() as folder:
        folder = pathlib.Path(folder)
        other["save_adapter_s"], _ = timed(device, lambda: ilora.save_peft_adapter(
            model, layers, folder / "adapter", "slow", cfg))
        other["save_checkpoint_s"], _ = timed(device, lambda: ilora.save_checkpoint(
            folder, layers, buffer, {"done": 1}, {}))
    result["other"] = {k: round(v, 3) for k, v in other.items()}
    print("other", json.dumps(result["other"]), flush=True)
    print(result["scoring"]["profile"])
    for name, row in result["training"].items():
        print(name, row["profile"], sep="\n")
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(result, indent=1) + "\n")

if __name__ == "__main__":
    main()
