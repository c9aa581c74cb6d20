"""The host's time per matrix product in I-LoRA's training step: by BLAS library, strict mode and
CUBLAS_WORKSPACE_CONFIG.

    python experiments/mm_host.py --out mm_host.json        # one GPU: about two minutes
    python experiments/mm_host.py --rows 8 --calls 3 --rounds 1     # CPU smoke

Profiles of the step on an H200 (results/speed_h200/nan_fill/run_time_steps15.json) put 72 to 103 us of the host's own
time into each aten::mm, against 10 to 13 us for an aten::mul, over 1,107 products a step: about a third of the host's
time in a step that the host bounds (the profiler's own cost included: it made the step some 20 % longer). A suspect:
torch's source (CublasHandlePool.cpp at commit 26a3905) parses CUBLAS_WORKSPACE_CONFIG, which strict mode needs, with
a newly built regular expression on every cuBLAS call, twice for a cuBLASLt product (ilora.make_deterministic says
more: it now removes the variable on sm_90 GPUs once torch has checked it, after this measured its cost). This
times calls of the step's products at SmolLM2's widths, without the profiler: back to back with no synchronisation (the
host's time a call, while the GPU keeps up), and each followed by a synchronisation (host, GPU and the wait together),
under each BLAS library torch offers (`torch.backends.cuda.preferred_blas_library`), with strict deterministic kernels
off and on, and with the variable set to ilora.py's value and unset. torch checks the variable for strict mode at its
first cuBLAS call, which this makes with it set; a torch that checks it again fails the cases of strict mode without it,
and each failure is recorded as it is. An element-wise product is timed beside them for scale.
"""
import argparse, itertools, json, os, pathlib, statistics, sys, time

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # ilora.py is one folder up
import ilora
from bench import sync

HIDDEN, INTERMEDIATE, KV, RANK = 576, 1536, 192, 8  # SmolLM2-135M's widths and ilora.py's LoRA rank

def products(rows, device):
    """name -> a call of one of the step's products on `rows` token rows (bf16, as the model runs)."""
    def tensor(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, device=device, dtype=dtype)
    x, h = tensor(rows, HIDDEN), tensor(rows, INTERMEDIATE)
    w_q, w_kv = tensor(HIDDEN, HIDDEN), tensor(KV, HIDDEN)
    w_up, w_down = tensor(INTERMEDIATE, HIDDEN), tensor(HIDDEN, INTERMEDIATE)
    lora_A = tensor(RANK, HIDDEN, dtype=torch.float32)  # fp32 factors, cast under autocast as ilora.LoRALayer's are
    def lora():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return F.linear(x, lora_A)
    return {"mm q_proj (rows x 576 x 576)": lambda: torch.mm(x, w_q.T),
            "mm v_proj (rows x 576 x 192)": lambda: torch.mm(x, w_kv.T),
            "mm up_proj (rows x 576 x 1536)": lambda: torch.mm(x, w_up.T),
            "mm down_proj (rows x 1536 x 576)": lambda: torch.mm(h, w_down.T),
            "linear LoRA A under autocast (fp32 factor)": lora,
            "mul (rows x 576), for scale": lambda: x * x}

def per_call_us(call, device, calls, rounds, synced):
    """Median over rounds of the microseconds a call: `calls` calls back to back, or each followed by a sync."""
    times = []
    for _ in range(rounds):
        sync(device)
        start = time.perf_counter()
        for _ in range(calls):
            call()
            if synced:
                sync(device)
        times.append((time.perf_counter() - start) / calls * 1e6)
    sync(device)
    return round(statistics.median(times), 2)

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[640, 12288],
                   help="token rows: 16 rows of 40, and of 768 as the profiled steps padded to")
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    libraries = ["default", "cublas", "cublaslt"] if device.type == "cuda" else ["default"]
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "timings": []}
    config_before = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    fill_before = torch.utils.deterministic.fill_uninitialized_memory
    strict_before = torch.are_deterministic_algorithms_enabled()
    warn_only_before = torch.is_deterministic_algorithms_warn_only_enabled()
    library_before = torch.backends.cuda.preferred_blas_library() if device.type == "cuda" else None
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"  # ilora.py's value, set before the first cuBLAS call
    torch.utils.deterministic.fill_uninitialized_memory = False  # strict mode as ilora.make_deterministic leaves it
    try:
        for rows in args.rows:
            calls = products(rows, device)
            for library, strict, workspace_config in itertools.product(libraries, (False, True), (":4096:8", None)):
                if device.type == "cuda":
                    torch.backends.cuda.preferred_blas_library(library)
                torch.use_deterministic_algorithms(strict)
                if workspace_config:
                    os.environ["CUBLAS_WORKSPACE_CONFIG"] = workspace_config
                else:
                    os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
                for name, call in calls.items():
                    row = {"rows": rows, "blas": library, "strict": strict, "cublas_workspace_config": workspace_config,
                           "product": name}
                    try:
                        for _ in range(10):  # warm-up: cuBLAS's first calls of a shape choose its kernel
                            call()
                        row["host_us_a_call"] = per_call_us(call, device, args.calls, args.rounds, synced=False)
                        row["synced_us_a_call"] = per_call_us(call, device, args.calls, args.rounds, synced=True)
                    except RuntimeError as error:  # strict mode's check of the variable, if this torch repeats it
                        row["error"] = str(error).split("\n")[0]
                    result["timings"].append(row)
                    print(json.dumps(row), flush=True)
    finally:
        torch.use_deterministic_algorithms(strict_before, warn_only=warn_only_before)
        if library_before is not None:
            torch.backends.cuda.preferred_blas_library(library_before)
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        if config_before is not None:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = config_before
        torch.utils.deterministic.fill_uninitialized_memory = fill_before
    if args.out:
        ilora.write_json(args.out, result)
    return result

if __name__ == "__main__":
    main()
