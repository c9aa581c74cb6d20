"""Tests for compiled_run.py: training through compiled blocks captures a few graphs for every row shape, scoring
captures none, and the run gives the plain run's bits."""
import functools, pathlib, sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # ilora.py is one folder up
import compiled_run, ilora
from test_ilora import adapters, assert_same_tensors, base_args, model_dir, write_task  # noqa: F401

def test_compiled_training_traces_the_blocks_once_for_all_lengths_and_row_counts_and_scoring_not(model_dir, tmp_path,
                                                                                                 monkeypatch):
    # backend "eager": dynamo captures the blocks' graphs as inductor would receive them, in seconds, and runs their
    # ops unchanged, so the compiled run must give the plain run's bits
    from torch._dynamo.utils import counters
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    long = [{"prompt": "what colour is the " + "sky " * k + "cat", "answer": "red"} for k in range(8)]
    tasks = f"{write_task(tmp_path / 't1', records=long)},{write_task(tmp_path / 't2', shift=1)}"
    args = base_args(model_dir, tmp_path, "--tasks", tasks, "--eval-learner", "both", "--dropout", "0.1",
                     "--batch-size", "3")  # rows of 8 lengths, batches of 3, 3 and 2 rows
    plain = ilora.main(args + ["--out", str(tmp_path / "plain")])
    torch._dynamo.reset()
    counters.clear()
    compiled = compiled_run.main(args + ["--out", str(tmp_path / "compiled")])
    assert max(plain["R"]["slow"][2]) > 0 and compiled["R"] == plain["R"]
    assert_same_tensors(adapters(tmp_path / "plain"), adapters(tmp_path / "compiled"))
    # three graphs: the first block (its input needs no gradient), the later blocks, and the slow learner's no-grad
    # forward; no length, row count (above one: dynamo specializes a size of 1) or task recompiled, and scoring
    # compiled nothing
    assert counters["stats"]["unique_graphs"] == 3
    assert ilora.train_task is compiled_run.plain_train_task  # ilora is itself again
