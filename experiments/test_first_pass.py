import json

import first_pass

def test_first_pass_times_every_pass_and_scores_a_cpu_run_with_the_dynamic_cache(tmp_path):
    out = tmp_path / "pass.json"
    first_pass.main(["--model", "tiny", "--device", "cpu", "--passes", "2", "--rows", "3", "--out", str(out)])
    result = json.loads(out.read_text())
    assert len(result["seconds"]) == 2 and all(t > 0 for t in result["seconds"])
    assert result["static_cache"] is False and result["device"] == "cpu"
