"""Tests for long_prompts.py: it counts the rows whose prompt ilora.py cuts, in training and when scoring."""
import pathlib, sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # ilora.py is one folder up
import long_prompts
from test_ilora import model_dir, write_task  # noqa: F401

def test_rows_longer_than_max_len_are_counted_in_training_and_when_scored(tmp_path, model_dir):
    long = [{"prompt": " ".join(["the"] * 30) + f" {w}", "answer": "red"} for w in ["cat", "dog", "sky", "sea"]]
    task = write_task(tmp_path / "long", records=(long + [{"prompt": "the sky", "answer": "blue"}]) * 2)
    counts = long_prompts.main(["--model", str(model_dir), "--tasks", str(task), "--max-len", "16",
                                "--max-new-tokens", "4"])
    # a long row: 31 prompt + 1 answer + 1 end token > 16; scored, 31 prompt tokens > 16 - 4 new tokens = 12
    assert counts == {"long": (8, 10, 8, 10, 12)}
    short = long_prompts.main(["--model", str(model_dir), "--tasks", str(task), "--max-len", "40",
                               "--max-new-tokens", "4"])
    assert short == {"long": (0, 10, 0, 10, 36)}  # 33 tokens fit in 40, and 31 in 36
