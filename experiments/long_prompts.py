"""How many rows of each task lose the left end of their prompt at a run's --max-len, counted with ilora.py's own
encoding (training rows) and generation width (scored prompts). ilora.py cuts such prompts without a word.

    TASKS=C-STANCE,FOMC,MeetingBank,Py150,ScienceQA,NumGLUE-cm,NumGLUE-ds,20Minuten DATA=../shared/data/trace_500
    python experiments/long_prompts.py --data-dir $DATA --tasks $TASKS --max-len 768 --max-new-tokens 64

Takes ilora.py's options (those that matter here: --model, --data-dir, --tasks, --max-len, --max-new-tokens,
--eval-split and the caps); loads only the tokenizer. The prompt lengths are the same under transformers 5.17 and
5.24 (the end token each reads differs, and every training row ends with one, of either kind).
"""
import pathlib, sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # ilora.py is one folder up
import ilora

def prompt_length(tok, prompt):
    return len(tok(prompt, add_special_tokens=True)["input_ids"])

def cut_rows(tok, tasks, cfg):
    """{task: (training rows cut, training rows, scored prompts cut, scored prompts, room for a scored prompt)}."""
    train, _, gen_lens = ilora.encode_tasks(tok, tasks, cfg)
    counts = {}
    for name, splits in tasks.items():
        full = [prompt_length(tok, record["prompt"]) for record in splits["train"]]
        cut_train = sum(n_prompt < n_full for (_, n_prompt), n_full in zip(train[name], full))
        width = cfg.max_len - gen_lens[name]  # as ilora.generate cuts a prompt
        cut_scored = sum(prompt_length(tok, record["prompt"]) > width for record in splits[cfg.eval_split])
        counts[name] = (cut_train, len(splits["train"]), cut_scored, len(splits[cfg.eval_split]), width)
    return counts

def main(argv=None):
    cfg = ilora.parse_args(argv)
    from transformers import AutoTokenizer
    tasks = ilora.load_tasks(cfg)
    src, gguf = ilora.model_source(cfg.model)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    counts = cut_rows(tok, tasks, cfg)
    print(f"| task | training rows cut (of) | {cfg.eval_split} prompts cut (of) | room for a scored prompt |")
    print("|---|---|---|---|")
    for name, (cut_train, n_train, cut_scored, n_scored, width) in counts.items():
        print(f"| {name} | {cut_train} ({n_train}) | {cut_scored} ({n_scored}) | {width} tokens |")
    return counts

if __name__ == "__main__":
    main()
