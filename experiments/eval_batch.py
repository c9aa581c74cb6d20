"""What --eval-batch-size costs and saves: one scoring pass of SmolLM2 over TRACE-8 test prompts, as ilora.predict
runs it (merged weights; static KV cache on a GPU, dynamic on a CPU), at several batch sizes. Each size runs in a
process of its own, so that its peak memory is its own:

    python experiments/eval_batch.py --data-dir ../shared/data/trace_500 --sizes 4,8,16,32 --per-task 16 \\
        --out experiments/results/eval_batch/cpu.json                      # CPU (2 cores: about 15 minutes)
    python experiments/eval_batch.py --model /root/ilora-model/smollm2-135m-instruct \\
        --data-dir /root/ilora-data/trace_500 --sizes 8,16,32,64,100,128 --out eval_batch_gpu.json
Per size: seconds of the pass (on a GPU the first pass, which compiles, and the second), prompts per second, and
the peak memory above the loaded model (GPU: allocated by torch; CPU: the process's resident set).
"""
import argparse, dataclasses, json, pathlib, resource, subprocess, sys, time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # ilora.py is one folder up
import ilora

def resident_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux reports KiB

def one_size(args):
    """One batch size in this process: {seconds, prompts, peak_gib, ...}."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = ilora.Config(model=args.model, data_dir=args.data_dir, tasks=args.tasks, max_len=768, max_new_tokens=64,
                       eval_batch_size=args.one, max_test=args.per_task)
    ilora.make_deterministic(True, device)
    tasks = ilora.load_tasks(cfg)
    model, tok = ilora.load_model(cfg.model, device)
    ilora.inject_lora(model, r=8, alpha=16)  # a fresh LoRA: the base model, through the same merged path
    _, prompt_ids, gen_lens = ilora.encode_tasks(tok, tasks, cfg)
    loaded = torch.cuda.memory_allocated() / 2 ** 30 if device.type == "cuda" else resident_gib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    passes = []
    for _ in range(2 if device.type == "cuda" else 1):  # a GPU's first pass includes the static cache's compile
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.time()
        preds = ilora.predict(model, tok, prompt_ids, cfg, gen_lens, "fast",
                              ilora.static_cache_rows(model, tasks, dataclasses.replace(cfg, kv_cache="static"), 1))
        if device.type == "cuda":
            torch.cuda.synchronize()
        passes.append(time.time() - start)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else resident_gib()
    prompts = sum(len(p) for p in preds.values())
    return {"batch": args.one, "prompts": prompts, "seconds": round(passes[-1], 2),
            "first_pass_seconds": round(passes[0], 2), "prompts_per_s": round(prompts / passes[-1], 2),
            "loaded_gib": round(loaded, 3), "peak_above_loaded_gib": round(peak - loaded, 3),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"}

def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=ilora.DEFAULT_MODEL)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--tasks", default=",".join(ilora.TASK_METRICS))
    p.add_argument("--sizes", default="8,16,32,64,100")
    p.add_argument("--per-task", type=int, default=0, help="test prompts per task, 0 = all")
    p.add_argument("--out", default="eval_batch.json")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # the child process: one batch size
    args = p.parse_args()
    if args.one:
        print(json.dumps(one_size(args)))
        return
    rows = []
    for size in args.sizes.split(","):
        child = [sys.executable, __file__, "--one", size, "--model", args.model, "--data-dir", args.data_dir,
                 "--tasks", args.tasks, "--per-task", str(args.per_task)]
        done = subprocess.run(child, capture_output=True, text=True)
        if done.returncode:
            rows.append({"batch": int(size), "error": done.stderr.strip().splitlines()[-1][:300]})
        else:
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
        out = pathlib.Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1) + "\n")

if __name__ == "__main__":
    main()
