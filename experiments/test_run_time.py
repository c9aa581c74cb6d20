"""Test for run_time.py: every part of a run is timed, on a CPU with a tiny model."""
import json

import torch
import transformers

import run_time
from test_ilora import model_dir, write_task  # noqa: F401

def test_run_time_splits_scoring_passes_and_times_steps_on_the_shortest_and_longest_rows(tmp_path, model_dir):
    write_task(tmp_path / "data" / "short")
    longer = {"prompt": "what colour is the sky " * 3, "answer": "red red red"}  # longer rows and answers
    write_task(tmp_path / "data" / "long", records=[longer] * 4)
    out = tmp_path / "run_time.json"
    run_time.main(["--model", str(model_dir), "--data-dir", str(tmp_path / "data"), "--tasks", "short,long",
                   "--steps", "2", "--max-len", "96", "--profile-rows", "5", "--out", str(out)])
    result = json.loads(out.read_text())
    assert list(result["training"]) == ["short", "long"]  # the task of the shortest rows first
    for row in result["training"].values():
        assert len(row["ms_per_step_each_synced"]) == 2 and "Self CPU time total" in row["profile"]
        assert row["step_width_median"] >= row["mean_row_tokens"]  # a step pads to its longest row
        fill = row["nan_fill"]  # strict mode's NaN fill against none: on, off, off, on
        assert len(fill["with_nan_fill"]["ms_per_step_one_sync"]) == len(fill["without"]["ms_per_step_one_sync"]) == 2
        assert fill["with_nan_fill"]["fill_calls_a_step"] > fill["without"]["fill_calls_a_step"]
        assert sum(fill["with_nan_fill"]["callers"].values()) <= fill["with_nan_fill"]["fill_calls_a_step"]
    scoring = result["scoring"]
    assert len(scoring["passes"]) == 4 and scoring["prompts"] == 8 + 4 and scoring["tokenize_all_prompts_once_s"] > 0
    for one in scoring["passes"]:  # a pass is its generate() calls, each with the tokens it decoded, and the rest
        assert one["batches"] == len(one["new_tokens"]) == len(one["batch_seconds"]) >= 2  # two generation lengths
        assert 0 < max(one["new_tokens"]) <= max(result["gen_lens"].values())
        assert 0 < one["in_generate"] <= one["seconds"]
    assert "Self CPU time total" in scoring["profile"]
    assert len({one["answers_sha256"] for one in scoring["passes"]}) == 1  # a CPU answers alike in every pass
    assert set(result["other"]) == {"load_model_s", "fingerprint_s", "encode_tasks_s", "save_adapter_s",
                                    "save_checkpoint_s"}

def test_run_time_scores_alone_with_no_steps_and_records_the_kernels_mode(tmp_path, model_dir, monkeypatch):
    write_task(tmp_path / "data" / "t")
    out = tmp_path / "run_time.json"
    attention = transformers.AttentionInterface._global_mapping
    monkeypatch.setitem(attention, "sdpa", attention["sdpa"])  # whatever it is now, again after this test
    try:
        run_time.main(["--model", str(model_dir), "--data-dir", str(tmp_path / "data"), "--tasks", "t", "--steps", "0",
                       "--no-deterministic", "--no-dynamic-pass", "--compile-backend", "cudagraphs", "--blas", "cublas",
                       "--no-cudnn-attention", "--attention", "sdpa", "--max-len", "96", "--profile-rows", "5",
                       "--out", str(out)])
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert transformers.AttentionInterface()["sdpa"] is run_time.sdpa_attention_forward  # not ilora's
    finally:  # torch's default again, for the tests after this one
        torch.backends.cuda.enable_cudnn_sdp(True)
    result = json.loads(out.read_text())
    assert result["training"] == {} and result["deterministic"] is False and len(result["scoring"]["passes"]) == 3
    assert result["compile_backend"] == "cudagraphs" and result["blas"] is None  # a CPU has no BLAS library to pick
    assert result["cudnn_attention"] is False and result["attention"] == "sdpa"
