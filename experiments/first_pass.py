"""Where the first static-cache scoring pass spends its time: the pass ilora.predict makes on a GPU, timed alone.

    python first_pass.py --model llama2-7b               # random weights of the Llama-2-7B shape (bench.py's)
    python first_pass.py --model /root/ilora-model/smollm2-135m-instruct
    python first_pass.py --model llama2-7b --compile-config '{"mode": "default"}'  # another compile config

A model with LoRA injected (its factors random, so the merge changes the weights) scores 100 prompts of 448 tokens
with up to 64 new tokens, through ilora.merged and ilora.generate at batch 100, as a run scores one batch. The pass
runs `--passes` times; the first includes compiling the decoding step. Printed as JSON: each pass's seconds,
torch's compile counters and its own breakdown of compile time (torch._dynamo.utils.compile_times). Since commit
3153502 the prompts are tokenized before the passes, as a run tokenizes them once; the results of commit f3f69b0
(BENCHMARKS.md) timed the tokenizing inside each pass.
"""
import argparse, json, pathlib, sys, time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import ilora
from bench import ARCHS, build_model

def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama2-7b", help="a bench.py shape (random weights) or a model folder")
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--rows", type=int, default=100)
    p.add_argument("--compile-config", default=None, type=json.loads,
                   help='CompileConfig fields as JSON, e.g. \'{"mode": "default"}\' (unset: transformers\' own)')
    p.add_argument("--dynamic-cache", action="store_true", help="no static cache and so no compiling, as on a CPU")
    p.add_argument("--device", default="cuda", help="cpu: a smoke test of this script (dynamic cache)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    if args.model in ARCHS:
        model, tok = build_model(args.model, argparse.Namespace(), device)
    else:
        model, tok = ilora.load_model(args.model, device)
    for layer in ilora.inject_lora(model):  # the targets ilora.py uses for this model type
        layer.slow_B.normal_(0, 1e-3)  # B = 0 would merge to W itself
    if args.compile_config:
        from transformers import CompileConfig
        model.generation_config.compile_config = CompileConfig(**args.compile_config)
    load_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, model.config.vocab_size, (448,), generator=gen).tolist() for _ in range(args.rows)]
    if type(tok).__name__ != "IdTokenizer":  # a real tokenizer: text, as TRACE's prompts are, tokenized again
        prompts = [tok(tok.decode(q))["input_ids"] for q in prompts]
    model.eval()
    static_rows = 0 if args.dynamic_cache else ilora.static_cache_rows(
        model, {}, ilora.Config(eval_batch_size=args.rows, kv_cache="static"), 1)  # GPU and a model it suits
    seconds = []
    with ilora.merged(model, "slow"):
        for _ in range(args.passes):
            sync(); t0 = time.perf_counter()
            ilora.generate(model, tok, prompts, 64, 512, static_rows)
            sync(); seconds.append(round(time.perf_counter() - t0, 3))
            print("pass", len(seconds), seconds[-1], "s", flush=True)
    counters = {k: dict(v) for k, v in torch._dynamo.utils.counters.items() if v}
    result = {"model": args.model, "compile_config": args.compile_config, "rows": args.rows,
              "static_cache": bool(static_rows), "load_seconds": round(load_s, 1),
              "seconds": seconds, "torch": torch.__version__,
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "counters": counters, "compile_times": torch._dynamo.utils.compile_times(repr="str")}
    print(json.dumps({k: v for k, v in result.items() if k != "compile_times"}, indent=1, default=str))
    print(result["compile_times"])
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(result, indent=1, default=str))

if __name__ == "__main__":
    main()
