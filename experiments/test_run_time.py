"""Test for run_time.py: every part of a run is timed, on a CPU with a tiny model."""
import json

import run_time
from test_ilora import model_dir, write_task  # noqa: F401

def test_run_time_splits_scoring_passes_and_times_steps_on_the_shortest_and_longest_rows(tmp_path, model_dir):
    write_task(tmp_path / "data" / "short")
    write_task(tmp_path / "data" / "long", records=[{"prompt": "what colour is the sky " * 3, "answer": "red"}] * 4)
    out = tmp_path / "run_time.json"
    run_time.main(["--model", str(model_dir), "--data-dir", str(tmp_path / "data"), "--tasks", "short,long",
                   "--steps", "2", "--max-len", "96", "--profile-rows", "5", "--out", str(out)])
    result = json.loads(out.read_text())
    assert list(result["training"]) == ["short", "long"]  # the task of the shortest rows first
    assert all(len(row["ms_per_step_each_synced"]) == 2 for row in result["training"].values())
    passes = result["scoring"]["passes"]
    assert len(passes) == 4 and result["scoring"]["prompts"] == 8 + 4
    for one in passes:  # a pass is its generate() calls and the rest; no batch decodes past its generation length
        assert one["batches"] == len(one["new_tokens"]) >= 1 and max(one["new_tokens"]) <= result["gen_lens"]["long"]
        assert abs(one["in_generate"] + one["outside_generate"] - one["seconds"]) < 0.01
    assert set(result["other"]) == {"load_model_s", "fingerprint_s", "encode_tasks_s", "save_adapter_s",
                                    "save_checkpoint_s"}
