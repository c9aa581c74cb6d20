"""Test for cublas_env_run.py: on a CPU, which makes no cuBLAS call, the run is ilora.py's and the environment is
left as it was. What it does on a GPU, only a GPU run shows (BENCHMARKS.md)."""
import os, pathlib, sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # ilora.py is one folder up
import cublas_env_run, ilora
from test_ilora import base_args, model_dir, write_task  # noqa: F401

def test_a_cpu_run_is_the_plain_one_and_keeps_the_environment(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # as ilora.make_deterministic leaves it
    tasks = f"{write_task(tmp_path / 't1')},{write_task(tmp_path / 't2', shift=1)}"
    args = base_args(model_dir, tmp_path, "--tasks", tasks, "--device", "cpu")  # a GPU run would remove the variable
    plain = ilora.main(args + ["--out", str(tmp_path / "plain")])
    env = cublas_env_run.main(args + ["--out", str(tmp_path / "env")])
    assert max(plain["R"]["slow"][2]) > 0 and env["R"] == plain["R"]
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"  # only a GPU run in strict mode removes it
    assert ilora.load_model is cublas_env_run.plain_load_model  # ilora is itself again
