"""valley.py: the loss landscape between the LoRA solutions of a finished ilora.py run, and its figures.

I-LoRA's argument is geometric (METHOD.md section 5): the minima of consecutive tasks are joined by a low-loss
valley, so a slow learner that interpolates along it keeps old tasks while it learns new ones. From the PEFT
adapters an --out folder holds (no retraining), this evaluates the teacher-forced answer loss on the eval split
along the straight path  theta(alpha) = (1 - alpha) theta_0 + alpha theta_1  for
  - consecutive task solutions   task_t/<learner> -> task_{t+1}/<learner>, on tasks t and t+1;
  - fast -> slow at each task end (ilora runs)   task_t/fast -> task_t/slow, on tasks t-1 and t;
and reports the barrier  max_alpha [L(theta(alpha)) - ((1 - alpha) L(theta_0) + alpha L(theta_1))]  per eval task:
near 0 means a linear low-loss path. By default the merged update dW = (alpha_lora / r) B A is interpolated;
--interp factors interpolates A and B separately, which adds the cross terms (see path_factors).
Here `alpha` is the position on the path; LoRA's own alpha only enters as `scaling`.

    python valley.py connectivity runs/ilora                  # -> runs/ilora/connectivity.json, barrier table
    python valley.py connectivity runs/ilora --interp factors --max-eval 64 --grid 6   # -> connectivity-factors.json
    python valley.py plot runs/ilora runs/seq runs/replay     # PNGs in each run folder: R_<learner>.png,
                                        # valley_<tasks|fast_slow>_<interp>.png; AP of all runs: ap_per_step.png
"""
import argparse, dataclasses, json, pathlib, sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # ilora.py is one folder up
import ilora

# ----------------------------------------------------------------------------------------------------------------
# Adapters: the PEFT folders ilora.run saves, read back as {module name: (A (r, in), B (out, r))}.

PREFIX = "base_model.model."

def read_adapter(folder):
    """({module: (A, B)}, scaling, target leaf names) of one PEFT LoRA folder."""
    from safetensors.torch import load_file
    folder = pathlib.Path(folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    sd = load_file(str(folder / "adapter_model.safetensors"))
    modules = sorted(k[len(PREFIX): -len(".lora_A.weight")] for k in sd if k.endswith(".lora_A.weight"))
    factors = {m: (sd[f"{PREFIX}{m}.lora_A.weight"], sd[f"{PREFIX}{m}.lora_B.weight"]) for m in modules}
    return factors, cfg["lora_alpha"] / cfg["r"], cfg["target_modules"]

def path_factors(start, end, alpha, interp):
    """LoRA factors whose update is theta(alpha)'s, per module.
    merged:  one rank-2r pair, B = [(1-alpha) B_0, alpha B_1], A = [A_0; A_1], so that
             B A = (1-alpha) B_0 A_0 + alpha B_1 A_1: exactly the interpolated dW. Kept as fp32 factors, as in
             training; folding dW into bf16 base weights would round small updates away. Exact at alpha = 0 and 1.
    factors: A = lerp(A_0, A_1), B = lerp(B_0, B_1); B A then differs from merged by the cross terms
             alpha (1-alpha) (B_0 - B_1)(A_0 - A_1): a curved path in weight space, not the straight one."""
    out = {}
    for m in start:
        (A0, B0), (A1, B1) = start[m], end[m]
        if interp == "merged":
            out[m] = torch.cat([A0, A1]), torch.cat([(1 - alpha) * B0, alpha * B1], dim=1)
        else:
            out[m] = torch.lerp(A0, A1, alpha), torch.lerp(B0, B1, alpha)
    return out

def inject_path_lora(model, targets, r, scaling, interp):
    """ilora's LoRA layers sized for the path: rank 2r for merged. Returns {module name: LoRALayer}."""
    rank = 2 * r if interp == "merged" else r
    ilora.inject_lora(model, targets, r=rank, alpha=rank * scaling, dropout=0.0)
    return {n: m for n, m in model.named_modules() if isinstance(m, ilora.LoRALayer)}

@torch.no_grad()
def load_factors_(layers, factors):
    for name, (A, B) in factors.items():
        layers[name].lora_A.weight.copy_(A)
        layers[name].lora_B.weight.copy_(B)

# ----------------------------------------------------------------------------------------------------------------
# Loss along a path, and its barrier.

@torch.no_grad()
def eval_loss(model, examples, batch_size=16):
    """Teacher-forced mean next-token cross-entropy over all answer tokens of (ids, n_prompt) examples, computed
    as ilora.train_step computes it (token-weighted over batches, so equal to one big batch)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        ids, mask, labels, pos = ilora.collate(examples[i: i + batch_size], model.config.pad_token_id, model.device)
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=model.device.type == "cuda"):
            h = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state  # (B, T, H)
            total += ilora.lm_loss(model, h, labels, pos, len(pos)).item() * len(pos)
        count += len(pos)
    return total / count

def path_losses(model, layers, start, end, alphas, interp, eval_sets, batch_size=16):
    """{task: [loss at each alpha]} along the path from adapter `start` to `end`."""
    losses = {task: [] for task in eval_sets}
    for alpha in alphas:
        load_factors_(layers, path_factors(start, end, alpha, interp))
        for task, examples in eval_sets.items():
            losses[task].append(eval_loss(model, examples, batch_size))
    return losses

def barrier(alphas, losses):
    """max_alpha [L(alpha) - ((1 - alpha) L(0) + alpha L(1))]: the loss above the chord; >= 0, as the ends give 0."""
    return max(l - ((1 - a) * losses[0] + a * losses[-1]) for a, l in zip(alphas, losses))

# ----------------------------------------------------------------------------------------------------------------
# Connectivity of a run: every pair of saved solutions, written to connectivity[-factors].json.

def load_run(run_dir):
    run_dir = pathlib.Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise ilora.UsageError(f"{run_dir}: no config.json; pass an --out folder of a finished ilora.py run")
    saved = json.loads((run_dir / "config.json").read_text())
    known = {f.name for f in dataclasses.fields(ilora.Config)}
    return ilora.Config(**{k: v for k, v in saved.items() if k in known})

def run_pairs(run_dir, learner, n_tasks):
    """(kind, from, to, eval task indices 0-based) for every path worth walking in a run."""
    done = [t for t in range(1, n_tasks + 1) if (run_dir / f"task_{t}" / learner / "adapter_config.json").is_file()]
    pairs = [("tasks", f"task_{t}/{learner}", f"task_{t + 1}/{learner}", [t - 1, t]) for t in done if t + 1 in done]
    pairs += [("fast_slow", f"task_{t}/fast", f"task_{t}/slow", list(range(max(0, t - 2), t)))
              for t in range(1, n_tasks + 1) if (run_dir / f"task_{t}" / "slow" / "adapter_config.json").is_file()]
    return pairs

def connectivity(run_dir, grid=11, interp="merged", learner=None, max_eval=0, batch_size=16, device="auto"):
    """Walk every path of a finished run; returns the dict also written to run_dir/connectivity[-factors].json."""
    if grid < 2 or interp not in ("merged", "factors"):
        raise ilora.UsageError(f"need --grid >= 2 and --interp merged|factors, got {grid}, {interp!r}")
    run_dir = pathlib.Path(run_dir)
    cfg = dataclasses.replace(load_run(run_dir), eval_split="eval", max_eval=max_eval)
    learner = learner or ("slow" if (run_dir / "task_1" / "slow").is_dir() else "fast")
    tasks = ilora.load_tasks(cfg)
    names = list(tasks)
    pairs = run_pairs(run_dir, learner, len(names))
    if not pairs:
        raise ilora.UsageError(f"{run_dir}: fewer than two saved {learner} adapters and no fast/slow pair")
    device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                          "cpu" if device == "auto" else device)
    model, tok = ilora.load_model(cfg.model, device)
    as_training = {n: {**s, "train": s["eval"]} for n, s in tasks.items()}  # the eval records, encoded as rows
    eval_sets = ilora.encode_tasks(tok, as_training, cfg)[0]
    _, scaling, targets = read_adapter(run_dir / pairs[0][1])
    layers = inject_path_lora(model, targets, cfg.r, scaling, interp)
    alphas = [i / (grid - 1) for i in range(grid)]
    results = []
    for kind, a, b, on in pairs:
        start, end = read_adapter(run_dir / a)[0], read_adapter(run_dir / b)[0]
        losses = path_losses(model, layers, start, end, alphas, interp, {names[i]: eval_sets[names[i]] for i in on},
                             batch_size)
        results.append({"kind": kind, "from": a, "to": b, "loss": losses,
                        "barrier": {task: barrier(alphas, l) for task, l in losses.items()}})
        results[-1]["max_barrier"] = max(results[-1]["barrier"].values())
    out = {"run": str(run_dir), "interp": interp, "split": "eval", "max_eval": max_eval, "learner": learner,
           "tasks": names, "alphas": alphas, "pairs": results}
    ilora.write_json(run_dir / connectivity_file(interp), out)
    print(format_barriers(out))
    return out

def connectivity_file(interp):
    return "connectivity.json" if interp == "merged" else f"connectivity-{interp}.json"

def format_barriers(con):
    w = max(12, *(len(t) for t in con["tasks"]))
    lines = [f"loss along each path ({con['interp']} interpolation, {con['split']} split)",
             f"{'path':34s} {'eval on':{w}s} {'L(0)':>8s} {'min':>8s} {'max':>8s} {'L(1)':>8s} {'barrier':>8s}"]
    for p in con["pairs"]:
        for task, l in p["loss"].items():
            lines.append(f"{p['from'] + ' -> ' + p['to']:34s} {task[:w]:{w}s} {l[0]:8.4f} {min(l):8.4f} "
                         f"{max(l):8.4f} {l[-1]:8.4f} {p['barrier'][task]:8.4f}")
    return "\n".join(lines)

# ----------------------------------------------------------------------------------------------------------------
# Figures: R heatmaps, average performance per step, loss along the paths. matplotlib is imported only here.

def pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise ilora.UsageError("plotting needs matplotlib: pip install matplotlib") from None
    return plt

def plot_R(plt, R, names, title, path):
    """Heatmap of R (rows: base, after 1..T; columns: tasks), the score in % printed in each cell."""
    rows = [(("base" if t == 0 else f"after {t}"), row) for t, row in enumerate(R) if row is not None]
    M = [[100 * v for v in row] for _, row in rows]
    fig, ax = plt.subplots(figsize=(1.6 + 0.95 * len(names), 1.2 + 0.45 * len(rows)), layout="constrained")
    im = ax.imshow(M, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    for i, row in enumerate(M):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=9, color="white" if v < 60 else "black")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), [r for r, _ in rows])
    ax.set_xlabel("task scored")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="score (%)", shrink=0.9)
    fig.savefig(path, dpi=120)
    plt.close(fig)

def plot_ap(plt, runs, path):
    """AP_t (average score over the tasks seen so far) after each task, one line per run and learner."""
    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    for run_dir, res in runs:
        for learner in res["learners"]:
            ap = res["metrics"][learner]["AP"]  # None after a task whose row was not scored
            scored = [t for t, v in enumerate(ap, 1) if v is not None]
            label = f"{res['method']} ({learner}) - {run_dir.name}"
            ax.plot(scored, [100 * ap[t - 1] for t in scored], marker="o", label=label)
    names = runs[0][1]["tasks"]
    same = all(res["tasks"] == names for _, res in runs)
    ax.set_xticks(range(1, len(names) + 1), [f"{t}\n{n}" if same else str(t) for t, n in enumerate(names, 1)],
                  fontsize=8)
    ax.set_xlabel("after task")
    ax.set_ylabel("AP: mean score over tasks seen (%)")
    ax.set_ylim(-3, 103)  # markers at 0 and 100 stay visible
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)

KIND_TITLES = {"tasks": "consecutive task solutions", "fast_slow": "fast to slow learner at each task end"}
MODES = {"merged": r"merged update $\Delta W = (\mathrm{alpha}/r)\,BA$ interpolated",
         "factors": "LoRA factors A and B interpolated separately (cross terms)"}

def plot_valley(plt, con, kind, title, path):
    """One panel per path of one kind: the loss on each eval task against alpha, its chord dashed, the barrier of
    each task in the legend and the largest in the panel title."""
    pairs = [p for p in con["pairs"] if p["kind"] == kind]
    ncols = min(4, len(pairs))
    nrows = -(-len(pairs) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 0.6 + 2.9 * nrows), squeeze=False,
                             layout="constrained")
    for ax, p in zip(axes.flat, pairs):
        for task, l in p["loss"].items():
            line, = ax.plot(con["alphas"], l, marker=".", label=f"{task}: barrier {p['barrier'][task]:.3f}")
            ax.plot([0, 1], [l[0], l[-1]], ls="--", lw=0.8, color=line.get_color())  # the chord
        ax.set_title(f"{p['from']} \u2192 {p['to']}\nmax barrier {p['max_barrier']:.3f}", fontsize=9)
        ax.set_xlabel(r"$\alpha$", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=7, title="eval loss on", title_fontsize=7)
    axes[0, 0].set_ylabel("answer loss (CE)", fontsize=8)
    for ax in axes.flat[len(pairs):]:
        ax.set_visible(False)
    fig.suptitle(f"{title}: {KIND_TITLES[kind]}, loss along "
                 r"$\theta(\alpha) = (1-\alpha)\,\theta_0 + \alpha\,\theta_1$" f"\n{MODES[con['interp']]}",
                 fontsize=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)

def plot(run_dirs, out=None):
    """Write every figure the runs allow; returns the PNG paths. Per-run figures go into the run folder, or into
    `out` prefixed with the run's name; the AP figure goes into `out` or the first run folder."""
    plt = pyplot()
    runs = []
    for d in map(pathlib.Path, run_dirs):
        if not (d / "results.json").is_file():
            raise ilora.UsageError(f"{d}: no results.json; pass --out folders of finished ilora.py runs")
        runs.append((d, json.loads((d / "results.json").read_text())))
    if out:
        pathlib.Path(out).mkdir(parents=True, exist_ok=True)
    dest = (lambda d, name: pathlib.Path(out) / f"{d.name}_{name}") if out else (lambda d, name: d / name)
    written = []
    for d, res in runs:
        for learner in res["learners"]:
            written.append(dest(d, f"R_{learner}.png"))
            plot_R(plt, res["R"][learner], res["tasks"], f"{d.name}: R, {res['method']} ({learner} learner), "
                                                         f"score in %", written[-1])
        for interp in ("merged", "factors"):
            if not (d / connectivity_file(interp)).is_file():
                continue
            con = json.loads((d / connectivity_file(interp)).read_text())
            for kind in sorted({p["kind"] for p in con["pairs"]}):
                written.append(dest(d, f"valley_{kind}_{interp}.png"))
                plot_valley(plt, con, kind, d.name, written[-1])
    written.append(pathlib.Path(out or runs[0][0]) / "ap_per_step.png")
    plot_ap(plt, runs, written[-1])
    for p in written:
        print("wrote", p)
    return written

# ----------------------------------------------------------------------------------------------------------------
# CLI.

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("connectivity", help="loss and barrier along each path of a run (no retraining)")
    c.add_argument("run", help="--out folder of a finished ilora.py run")
    c.add_argument("--grid", type=int, default=11, help="points on each path, alpha = 0 .. 1 (default 11)")
    c.add_argument("--interp", default="merged", choices=["merged", "factors"],
                   help="interpolate the merged update dW (default) or A and B separately")
    c.add_argument("--learner", choices=["slow", "fast"], help="learner of the task-to-task paths "
                                                               "(default: slow if saved, else fast)")
    c.add_argument("--max-eval", type=int, default=0, help="cap on eval examples per task, 0 = all")
    c.add_argument("--batch-size", type=int, default=16, help="eval rows per forward")
    c.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    f = sub.add_parser("plot", help="PNG figures: R heatmaps, AP per step, loss along the paths")
    f.add_argument("runs", nargs="+", help="--out folders of finished runs (several: AP curves compared)")
    f.add_argument("--out", help="folder for the figures (default: each run's own folder)")
    args = p.parse_args(argv)
    try:
        if args.command == "connectivity":
            return connectivity(args.run, args.grid, args.interp, args.learner, args.max_eval, args.batch_size,
                                args.device)
        return plot(args.runs, args.out)
    except ilora.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

if __name__ == "__main__":
    main()
