"""Test for cudagraphs_run.py: the model it loads asks generate() for the cudagraphs backend, and on a CPU, where
nothing compiles, the run gives the plain run's R."""
import pathlib, sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # ilora.py is one folder up
import cudagraphs_run, ilora
from test_ilora import base_args, model_dir, write_task  # noqa: F401

def test_the_loaded_model_compiles_with_cudagraphs_and_a_cpu_run_is_the_plain_one(model_dir, tmp_path, monkeypatch):
    loaded = []
    graphs_load_model = cudagraphs_run.load_model
    def keep(name, device):
        model, tok = graphs_load_model(name, device)
        loaded.append(model)
        return model, tok
    monkeypatch.setattr(cudagraphs_run, "load_model", keep)
    tasks = f"{write_task(tmp_path / 't1')},{write_task(tmp_path / 't2', shift=1)}"
    args = base_args(model_dir, tmp_path, "--tasks", tasks)
    plain = ilora.main(args + ["--out", str(tmp_path / "plain")])
    graphs = cudagraphs_run.main(args + ["--out", str(tmp_path / "graphs")])
    assert max(plain["R"]["slow"][2]) > 0 and graphs["R"] == plain["R"]
    config = loaded[0].generation_config.compile_config
    assert (config.backend, config.mode) == ("cudagraphs", None)
    assert ilora.load_model is cudagraphs_run.plain_load_model  # ilora is itself again
