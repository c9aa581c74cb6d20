"""ilora.py's command line with CUBLAS_WORKSPACE_CONFIG in the environment only until torch has checked it: a
candidate for ilora.py's strict mode, measured here first.

Strict mode needs CUBLAS_WORKSPACE_CONFIG=:4096:8 (ilora.make_deterministic sets it), and torch checks it once, at its
first cuBLAS call, keeping the answer. But torch, as its source reads (aten/src/ATen/cuda/CublasHandlePool.cpp at
commit 26a3905; that 2.11 does too is what mm_host.py checks), also works out cuBLAS's workspace size on every cuBLAS
call by parsing the variable with a newly built std::regex, which took 75 to 78 us a parse in `cublas_regex.cpp`
(2-core AMD EPYC, g++ 12 -O2); profiles of SmolLM2's step on an H200 put 72 to 103 us of the host's own time into each
aten::mm (about 1,100 a step). With the variable gone torch takes its default size, which on an sm_90 GPU (H100, H200)
is the same 32 MiB (4096 KiB x 8) and on others is not, so this removes it on sm_90 alone, where the products should
run the same kernels. cuBLAS reads the variable too, when a handle is created (the backward pass's thread creates its
own after the removal), but torch hands every handle its own workspace on every call. Whether the products do run the
same kernels (byte-identical predictions) and what it saves is what a run through this script measures against
ilora.py.

    python experiments/cublas_env_run.py --data-dir ../shared/data/trace_500 --tasks C-STANCE,FOMC --out runs/env
"""
import os, pathlib, sys, unittest.mock

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # ilora.py is one folder up
import ilora

plain_load_model = ilora.load_model
SET_BY_USER = "CUBLAS_WORKSPACE_CONFIG" in os.environ  # a value of the user's own stays

def load_model(name, device):
    """ilora.load_model; then, in strict mode on an sm_90 GPU, one cuBLAS call for torch's check, and the variable
    gone."""
    model, tok = plain_load_model(name, device)
    if (device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0)
            and torch.are_deterministic_algorithms_enabled() and not SET_BY_USER):
        probe = torch.ones(8, 8, device=device)
        torch.mm(probe, probe)  # torch reads CUBLAS_WORKSPACE_CONFIG for strict mode's check here, once a process
        del os.environ["CUBLAS_WORKSPACE_CONFIG"]
    return model, tok

def main(argv=None):
    with unittest.mock.patch.object(ilora, "load_model", load_model):  # ilora.run looks the name up when it loads
        return ilora.main(argv)

if __name__ == "__main__":
    main()
