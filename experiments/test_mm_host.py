"""Test for mm_host.py: every product is timed, back to back and synchronised, with strict mode off and on, with
CUBLAS_WORKSPACE_CONFIG set and not."""
import json, os

import torch

import mm_host

def test_mm_host_times_each_product_in_both_modes_with_and_without_the_variable_and_leaves_both_as_found(tmp_path,
                                                                                                        monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    out = tmp_path / "mm_host.json"
    strict_before = torch.are_deterministic_algorithms_enabled()  # a run earlier in this process may have set it
    mm_host.main(["--rows", "8", "--calls", "2", "--rounds", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    names = {row["product"] for row in result["timings"]}
    assert len(names) == 6 and len(result["timings"]) == 4 * len(names)  # CPU: torch's own BLAS choice alone
    assert {(row["strict"], row["cublas_workspace_config"]) for row in result["timings"]} == {
        (False, ":4096:8"), (False, None), (True, ":4096:8"), (True, None)}
    assert all(row["host_us_a_call"] > 0 and row["synced_us_a_call"] > 0 for row in result["timings"])
    assert torch.are_deterministic_algorithms_enabled() == strict_before  # it ran both modes, and left this one
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
