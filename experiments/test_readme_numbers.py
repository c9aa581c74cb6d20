"""The README's numbers come from the committed results, and its demo table from runs of this very ilora.py."""
import pathlib, sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import readme_numbers

def test_every_number_block_of_the_readme_is_regenerated_from_runs_of_this_code():
    assert readme_numbers.problems() == []

def test_the_code_fingerprint_ignores_docstrings_and_comments_but_not_code(tmp_path):
    a, b, c = tmp_path / "a.py", tmp_path / "b.py", tmp_path / "c.py"
    a.write_text('def f(x):\n    """Doubles."""\n    return 2 * x\n')
    b.write_text('def f(x):  # a comment\n    """Twice x."""\n    return 2 * x\n')
    c.write_text('def f(x):\n    """Doubles."""\n    return 3 * x\n')
    fp = readme_numbers.code_fingerprint
    assert fp(a) == fp(b) != fp(c)
