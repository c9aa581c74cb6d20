"""The seconds of ilora.encode_tasks over TRACE-8 (training rows, scored prompts, generation lengths), this
ilora.py beside another one (an earlier version, say), alternated, on the same tokenizer; and whether the two
give the same token ids, row for row.

    git show 5139dfe:ilora.py > /tmp/ilora_5139dfe.py
    python experiments/encode_time.py --data-dir ../shared/data/trace_500 --other /tmp/ilora_5139dfe.py
"""
import argparse, dataclasses, hashlib, importlib.util, json, os, pathlib, sys, time

import torch
import transformers

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # ilora.py is one folder up
import ilora
from run_time import TRACE8

def load_other(path):
    spec = importlib.util.spec_from_file_location("ilora_other", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

def same_output(a, b):
    """Both encode_tasks' (train, prompt_ids, gen_lens) hold the same ids, prompt lengths and lengths."""
    (train_a, prompts_a, lens_a), (train_b, prompts_b, lens_b) = a, b
    same_rows = all(len(train_a[name]) == len(train_b[name]) and
                    all(n_a == n_b and ids_a.dtype == ids_b.dtype and torch.equal(ids_a, ids_b)
                        for (ids_a, n_a), (ids_b, n_b) in zip(train_a[name], train_b[name])) for name in train_a)
    return same_rows and prompts_a == prompts_b and lens_a == lens_b

def compared(outputs):
    """Whether {"this": encode_tasks' output, "other": ...} agree, and how many rows and prompts they hold."""
    train, prompt_ids, _ = outputs["this"]
    return {"same_output": same_output(outputs["this"], outputs["other"]),
            "training_rows": sum(len(rows) for rows in train.values()),
            "scored_prompts": sum(len(ids) for ids in prompt_ids.values())}

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=ilora.DEFAULT_MODEL)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--other", required=True, help="another ilora.py to time beside this one")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    other = load_other(args.other)
    _, tok = ilora.load_model(args.model, torch.device("cpu"))
    sha1 = lambda path: hashlib.sha1(pathlib.Path(path).read_bytes()).hexdigest()
    result = {"torch": torch.__version__, "transformers": transformers.__version__, "cpu_count": os.cpu_count(),
              "tokenizer": type(tok).__name__, "this_sha1": sha1(ilora.__file__), "other_sha1": sha1(args.other),
              "max_len": {}, "seconds": {"this": [], "other": []}}
    cfg = ilora.Config(data_dir=args.data_dir, tasks=TRACE8, max_len=768)
    tasks = ilora.load_tasks(cfg)
    outputs = {}
    for _ in range(args.repeats):
        for label, module in (("other", other), ("this", ilora)):
            start = time.perf_counter()
            outputs[label] = module.encode_tasks(tok, tasks, cfg)
            result["seconds"][label].append(round(time.perf_counter() - start, 3))
    result["max_len"][768] = compared(outputs)
    cut = dataclasses.replace(cfg, max_len=40)  # cuts many prompts and answers
    result["max_len"][40] = compared({"other": other.encode_tasks(tok, tasks, cut),
                                      "this": ilora.encode_tasks(tok, tasks, cut)})
    print(json.dumps(result, indent=1))
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(result, indent=1))

if __name__ == "__main__":
    main()
