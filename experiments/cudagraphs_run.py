"""ilora.py's command line with the static KV cache's decoding step compiled by torch's cudagraphs backend instead of
transformers' default: the eager kernels recorded once and replayed as CUDA graphs, with no inductor code generation,
whose first compile takes some 30 s of a TRACE-8 run on an H200. A candidate for ilora.py, measured here first
(BENCHMARKS.md). On a CPU nothing changes: ilora.py scores there with the dynamic cache, which nothing compiles.

    python experiments/cudagraphs_run.py --data-dir ../shared/data/trace_500 --tasks C-STANCE,FOMC --out runs/graphs
"""
import pathlib, sys

import transformers

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # ilora.py is one folder up
import ilora

plain_load_model = ilora.load_model

def load_model(name, device):
    """ilora.load_model, its generation settings told to compile with the cudagraphs backend (which takes no mode)."""
    model, tok = plain_load_model(name, device)
    model.generation_config.compile_config = transformers.CompileConfig(backend="cudagraphs", mode=None)
    return model, tok

def main(argv=None):
    ilora.load_model = load_model  # ilora.run looks the name up when it loads the model
    try:
        return ilora.main(argv)
    finally:
        ilora.load_model = plain_load_model

if __name__ == "__main__":
    main()
