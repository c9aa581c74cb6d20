"""ilora.py's command line with the transformer blocks run through torch.compile while training: a candidate for
ilora.py, measured here first (gpu_speed.sh compile and crowd). SmolLM2's step is bound by Python's launching of
many small kernels, and a compiled block launches a few fused ones. dynamic=True: one compilation serves every row
length and count (a batch of one row adds one). Scoring runs the plain blocks: the static KV cache compiles its own
decoding step.

    python experiments/compiled_run.py --data-dir ../shared/data/trace_500 --tasks C-STANCE,FOMC --out runs/compiled
"""
import pathlib, sys, unittest.mock

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # ilora.py is one folder up
import ilora
from bench import compile_blocks

plain_train_task = ilora.train_task

def compiled_train_task(model, *args):
    """ilora.train_task through compiled blocks; the class's forward again on the way out."""
    blocks = compile_blocks(model, dynamic=True)
    try:
        return plain_train_task(model, *args)
    finally:
        for block in blocks:
            del block.forward

def main(argv=None):
    with unittest.mock.patch.object(ilora, "train_task", compiled_train_task):  # ilora.run looks it up at each task
        return ilora.main(argv)

if __name__ == "__main__":
    main()
