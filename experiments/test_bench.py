"""Tests for bench.py: under torchrun it times the same global batch, and without dropout trains what one process
trains."""
import json, pathlib, subprocess, sys

HERE = pathlib.Path(__file__).resolve().parent

def test_two_processes_time_the_same_global_batch_and_move_the_learners_as_one_does(tmp_path):
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    tiny = ["--tiny", "--methods", "seq,replay,ilora", "--eval-prompts", "0", "--device", "cpu",
            "--dropout", "0"]  # each process draws the dropout of its own rows
    subprocess.run([sys.executable, str(HERE / "bench.py"), *tiny, "--out", str(one)], check=True,
                   capture_output=True, timeout=300)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(HERE / "bench.py"),
                    *tiny, "--out", str(two)], check=True, capture_output=True, timeout=300)
    one, two = json.loads(one.read_text()), json.loads(two.read_text())
    assert (one["world_size"], two["world_size"]) == (1, 2)
    for method in ("seq", "replay", "ilora"):
        a, b = one["results"]["tiny"][method], two["results"]["tiny"][method]
        for key in ("fast_moved", "slow_moved", "slow_fast_gap"):  # 4 steps of training, split or not
            assert abs(a[key] - b[key]) <= 1e-6 * max(abs(a[key]), 1e-12), (method, key, a[key], b[key])
        assert a["fast_moved"] > 0
