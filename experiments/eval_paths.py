"""How much the evaluation path moves the answers, and what the static KV cache saves: one scoring pass of the base
model over the TRACE-8 test prompts, as ilora.predict runs it, in four ways on one GPU, side by side in one process:

    static cache, --eval-batch-size 100 (the default path on a GPU): first pass (with compilation) and second pass
    dynamic cache, batch 100, and dynamic cache, batch 32

    python experiments/eval_paths.py --model /root/ilora-model/smollm2-135m-instruct \\
        --data-dir /root/ilora-data/trace_500 --out eval_paths.json
Prints the seconds of each pass and how many of the answers differ between the paths.
"""
import argparse, json, pathlib, sys, time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # ilora.py is one folder up
import ilora

def timed_predict(model, tok, prompt_ids, cfg, gen_lens, static):
    torch.cuda.synchronize()
    start = time.time()
    preds = ilora.predict(model, tok, prompt_ids, cfg, gen_lens, "fast", cfg.eval_batch_size if static else 0)
    torch.cuda.synchronize()
    return time.time() - start, [p for name in prompt_ids for p in preds[name]]

def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out", default="eval_paths.json")
    args = p.parse_args()
    cfg = ilora.Config(model=args.model, data_dir=args.data_dir, tasks=",".join(ilora.TASK_METRICS),
                       max_len=768, max_new_tokens=64, eval_batch_size=100)
    device = torch.device("cuda")  # the static cache, this script's subject, is compiled on a GPU alone
    ilora.make_deterministic(True, device)
    tasks = ilora.load_tasks(cfg)
    model, tok = ilora.load_model(cfg.model, device)
    ilora.inject_lora(model, r=8, alpha=16)  # a fresh LoRA: the base model, through the same merged path
    _, prompt_ids, gen_lens = ilora.encode_tasks(tok, tasks, cfg)
    result = {"card": torch.cuda.get_device_name(), "prompts": sum(len(s["test"]) for s in tasks.values())}
    result["static_first_s"], static = timed_predict(model, tok, prompt_ids, cfg, gen_lens, True)
    result["static_second_s"], static_again = timed_predict(model, tok, prompt_ids, cfg, gen_lens, True)
    result["dynamic_s"], dynamic = timed_predict(model, tok, prompt_ids, cfg, gen_lens, False)
    cfg.eval_batch_size = 32
    result["dynamic_batch32_s"], dynamic32 = timed_predict(model, tok, prompt_ids, cfg, gen_lens, False)
    def differ(a, b):
        return sum(x != y for x, y in zip(a, b))
    result["differ_static_twice"] = differ(static, static_again)
    result["differ_static_dynamic"] = differ(static, dynamic)
    result["differ_dynamic_batch100_batch32"] = differ(dynamic, dynamic32)
    pathlib.Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))

if __name__ == "__main__":
    main()
