#!/usr/bin/env python
"""Which rotation makes real gradients sparse? Top-1 % energy of G, P^T G Q^T (authors) and P^T G Q (textbook).

For every target layer (default MLP pair) of SmolLM2-135M-Instruct on FanOutQA batches and of MiniLM-L6
(BERT, new 5-class head) on BBC News batches (128 tokens):

1. Bases (one P, Q per layer type, HOSVD of the streamed Grams) from C calibration batches of the train
   split. On H held-out batches (other split) the per-batch weight gradient G = dY^T X of every layer is
   rotated and the fraction of its energy (sum of squares) held by its top 1 % entries is measured for
   identity / authors (R = Q^T) / textbook (R = Q); also with bases refitted on the held-out batches
   themselves (in-sample), and for a *fixed* support: the top 1 % entries of the calibration score
   sum |G~| (no row/col budget), i.e. what SparseGrad's fixed-support mode keeps of a new gradient.
   Table: mean +- std over the layers of a type (each layer: mean over the H batches).
2. Over training: SparseGrad (fixed support, density 1 %, max_rows = max_cols = 0.25, textbook bases)
   with AdamW; at steps 0, E, 2E, ... the gradient w.r.t. the effective weight W0 + P S R^T (tapped on
   the converted layers' ``.base_layer``: same dY and X) is measured on held-out batches with the ORIGINAL
   calibration bases, with bases refitted at that step on those batches ("fresh"), and on the layer's
   own training support Omega.

    .venv/bin/python benchmarks/bench_basis.py                        # both models, ~5-10 min on 2 cores
    .venv/bin/python benchmarks/bench_basis.py --models minilm --train-steps 0 --heldout-batches 4

Writes benchmarks/results/basis_energy.{md,json,png} and basis_energy_training.png.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

CONVENTIONS = ("identity", "authors", "textbook")
LABELS = {"identity": "G (identity)", "authors": "P^T G Q^T (authors)", "textbook": "P^T G Q (textbook)"}


# ------------------------------------------------------------------------------------------- data / models


def load_model_and_batches(name: str, args):
    """(model, batches) with batches = {"calib": [...], "train": [...], "heldout": [...]}, all distinct."""
    n_train = max(args.train_steps, 1)
    n_heldout = max(args.heldout_batches, args.train_heldout_batches)
    if name == "smollm2":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from sg_distributed.data.assets import smollm2_dir
        from sg_distributed.data.qa import QACollator, load_qa_pairs, split_by_group

        path = smollm2_dir()
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        train, heldout = split_by_group(load_qa_pairs(), heldout_fraction=0.2, seed=0)
        random.Random(0).shuffle(train)
        random.Random(1).shuffle(heldout)
        collate = QACollator(tokenizer, max_length=args.qa_max_length)
        bs = args.batch_size
    elif name == "minilm":
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        from transformers.utils import logging as hf_logging

        from sg_distributed.data.assets import minilm_dir
        from sg_distributed.data.classify import ClassificationCollator, load_bbc_news, split_articles

        path = minilm_dir()
        tokenizer = AutoTokenizer.from_pretrained(path)
        torch.manual_seed(0)  # the classifier head is new
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=5, dtype=torch.float32)
        hf_logging.set_verbosity(verbosity)
        train, heldout = split_articles(load_bbc_news(), heldout_fraction=0.2, seed=0)
        collate = ClassificationCollator(tokenizer, max_length=args.cls_max_length)
        bs = args.batch_size
    else:
        raise ValueError(name)
    chunks = lambda items, start, n: [collate(items[(start + i) * bs:(start + i + 1) * bs]) for i in range(n)]
    if (args.calib_batches + n_train) * bs > len(train) or n_heldout * bs > len(heldout):
        raise ValueError("not enough examples for the requested batches")
    batches = {"calib": chunks(train, 0, args.calib_batches), "train": chunks(train, args.calib_batches, n_train),
               "heldout": chunks(heldout, 0, n_heldout)}
    for param in model.parameters():  # measurement passes tap dY, X; no weight gradients needed
        param.requires_grad_(False)
    return model.eval(), batches


# --------------------------------------------------------------------------------------------- measuring


def topk_sum(values: torch.Tensor, k: int, stride: int = 16) -> torch.Tensor:
    """Sum of the k largest entries of a 1-D tensor; exact, ~4x faster than a plain topk for k ~ 1 %.

    A threshold from a strided sample (its top 2k/stride) keeps ~2 % candidates; if fewer than k pass,
    fall back to the full topk.
    """
    if values.numel() >= 64 * stride and k * stride * 4 < values.numel():
        sample = values[::stride]
        threshold = torch.topk(sample, max(1, 2 * k // stride), sorted=False).values.min()
        candidates = values[values >= threshold]
        if candidates.numel() >= k:
            return torch.topk(candidates, k, sorted=False).values.sum()
    return torch.topk(values, k, sorted=False).values.sum()


def topk_energy(mat: torch.Tensor, k: int, total: torch.Tensor) -> float:
    return float(topk_sum(mat.square().flatten(), k) / total)


def backward_over(model, batches, taps: dict, on_grad, trainable=()) -> list[float]:
    """Forward + backward of every batch with ``on_grad(name, dY, X)`` tapped; returns the losses."""
    from sg_distributed.sparsegrad.gradient_tap import gradient_tap, gradients_flowing

    losses = []
    with gradients_flowing(model, taps), gradient_tap(taps, on_grad):
        for batch in batches:
            loss = model(**batch).loss
            loss.backward()
            losses.append(float(loss.detach()))
    for p in trainable:
        p.grad = None
    return losses


def fit_bases(model, taps, batches, key_of, trainable=()) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{layer type: (P, Q)} in float32 from the streamed Grams of ``batches`` (textbook: G~ = P^T G Q)."""
    from sg_distributed.sparsegrad.basis import GramAccumulator

    acc = GramAccumulator()
    backward_over(model, batches, taps, lambda n, dy, x: acc.add_factors(key_of[n], dy, x), trainable)
    return {key: (b.P.float(), b.R.float()) for key, b in acc.bases("textbook").items()}


def rotations(G: torch.Tensor, P: torch.Tensor, Q: torch.Tensor, dy: torch.Tensor, x: torch.Tensor):
    """identity / authors / textbook rotated gradients, from G (P^T G shared) or from the factors
    ((dY P)^T (X R)), whichever costs fewer flops for this token count."""
    (m, n), T = G.shape, dy.shape[0]
    if T * (m * m + 2 * n * n + 2 * m * n) < m * m * n + 2 * m * n * n:
        A = dy @ P
        return {"identity": G, "authors": A.T @ (x @ Q.T), "textbook": A.T @ (x @ Q)}
    PtG = P.T @ G
    return {"identity": G, "authors": PtG @ Q.T, "textbook": PtG @ Q}


def calibration_supports(model, taps, batches, key_of, bases, density) -> dict[str, dict[str, torch.Tensor]]:
    """Per layer and convention: flat indices of the top ``density`` entries of sum_batches |G~|."""
    scores: dict[str, dict[str, torch.Tensor]] = {}

    def on_grad(name, dy, x):
        dy, x = dy.float(), x.float()
        G = dy.T @ x
        for conv, mat in rotations(G, *bases[key_of[name]], dy, x).items():
            layer = scores.setdefault(name, {})
            layer[conv] = mat.abs() if conv not in layer else layer[conv].add_(mat.abs())

    backward_over(model, batches, taps, on_grad)
    out = {}
    for name, per_conv in scores.items():
        out[name] = {conv: torch.topk(s.flatten(), max(1, round(density * s.numel())), sorted=False).indices
                     for conv, s in per_conv.items()}
    return out


def measure(model, taps, batches, key_of, basis_sets: dict, density: float, supports: dict | None = None,
            train_support: dict | None = None, trainable=()):
    """{layer: {variant: [fraction per batch]}} and the batch losses.

    Variants: ``<set>/<conv>`` for every basis set (identity once, as ``identity``), ``fixed/<conv>`` for
    the calibration supports, ``omega`` for the training support (textbook rotation of the first set).
    """
    records: dict[str, dict[str, list[float]]] = {}

    def on_grad(name, dy, x):
        dy, x = dy.float(), x.float()
        G = dy.T @ x
        total = G.square().sum()
        k = max(1, round(density * G.numel()))
        rec = records.setdefault(name, {})
        rec.setdefault("identity", []).append(topk_energy(G, k, total))
        for set_name, bases in basis_sets.items():
            rotated = rotations(G, *bases[key_of[name]], dy, x)
            for conv in ("authors", "textbook"):
                rec.setdefault(f"{set_name}/{conv}", []).append(topk_energy(rotated[conv], k, total))
            if supports is not None and set_name == "heldout":
                for conv, idx in supports[name].items():
                    rec.setdefault(f"fixed/{conv}", []).append(float(rotated[conv].flatten()[idx].square().sum() / total))
            if train_support is not None and set_name == "original":
                idx = train_support[name]
                rec.setdefault("omega", []).append(float(rotated["textbook"].flatten()[idx].square().sum() / total))

    losses = backward_over(model, batches, taps, on_grad, trainable)
    return records, losses


def summarize(records: dict, key_of: dict) -> dict[str, dict[str, tuple[float, float, int]]]:
    """{layer type: {variant: (mean over layers, std over layers, #layers)}}; each layer = mean over batches."""
    per_type: dict[str, dict[str, list[float]]] = {}
    for name, rec in records.items():
        for variant, values in rec.items():
            per_type.setdefault(key_of[name], {}).setdefault(variant, []).append(statistics.fmean(values))
    return {t: {v: (statistics.fmean(xs), statistics.pstdev(xs), len(xs)) for v, xs in d.items()}
            for t, d in per_type.items()}


# ------------------------------------------------------------------------------------------------- runs


def short_type(layer_type: str) -> str:
    return layer_type.replace("model.layers.*.mlp.", "").replace("bert.encoder.layer.*.", "")


def run_model(name: str, args, log) -> dict:
    from sg_distributed.sparsegrad.targets import find_target_linears, layer_type

    t0 = time.perf_counter()
    model, batches = load_model_and_batches(name, args)
    targets = find_target_linears(model, None)
    key_of = {n: layer_type(n) for n in targets}
    shapes = {key_of[n]: (m.out_features, m.in_features) for n, m in targets.items()}
    log(f"[{name}] {len(targets)} target layers, types {shapes}; loaded in {time.perf_counter() - t0:.1f}s")
    heldout = batches["heldout"][: args.heldout_batches]
    tokens = lambda bs: sum(int(b["attention_mask"].sum()) for b in bs)
    log(f"[{name}] calibration: {len(batches['calib'])} batches / {tokens(batches['calib'])} tokens; "
        f"held-out: {len(heldout)} batches / {tokens(heldout)} tokens")

    t = time.perf_counter()
    calib_bases = fit_bases(model, targets, batches["calib"], key_of)
    supports = calibration_supports(model, targets, batches["calib"], key_of, calib_bases, args.density)
    insample_bases = fit_bases(model, targets, heldout, key_of)
    records, losses = measure(model, targets, heldout, key_of, {"heldout": calib_bases, "insample": insample_bases},
                              args.density, supports=supports)
    static = summarize(records, key_of)
    log(f"[{name}] static measurement {time.perf_counter() - t:.1f}s (held-out loss {statistics.fmean(losses):.3f})")
    result = {"shapes": {k: list(v) for k, v in shapes.items()}, "static": static,
              "num_layers": {k: sum(1 for n in targets if key_of[n] == k) for k in shapes}}

    if args.train_steps > 0:
        result["training"] = train_and_track(name, model, batches, targets, key_of, calib_bases, args, log)
    result["seconds"] = time.perf_counter() - t0
    return result


def train_and_track(name, model, batches, targets, key_of, calib_bases, args, log) -> dict:
    from sg_distributed import SparseGradConfig
    from sg_distributed.sparsegrad.layer import SparseGradLinear
    from sg_distributed.training.methods import prepare

    t = time.perf_counter()
    config = SparseGradConfig(density=args.density, max_rows=args.max_rows, max_cols=args.max_cols)
    prepared = prepare("sparsegrad", model, config, calibration_batches=batches["calib"])
    wrapped = prepared.model
    layers = wrapped.converted_layers()
    assert all(isinstance(m, SparseGradLinear) for m in layers.values())
    for key, (P, Q) in calib_bases.items():  # the library's bases are the ones measured above
        b = wrapped.shared_bases[key]  # the fp32 masters the layers share
        assert torch.allclose(b.P.float(), P, atol=1e-5) and torch.allclose(b.R.float(), Q, atol=1e-5), key
    taps = {n: m.base_layer for n, m in layers.items()}  # dY, X of the whole layer: grad of W_eff = W0 + P S R^T
    train_support = {n: m.support.flat() for n, m in layers.items()}
    trainable = prepared.trainable_parameters()
    optimizer = prepared.make_optimizer(args.lr)
    measure_batches = batches["heldout"][: args.train_heldout_batches]
    log(f"[{name}] training: sparsegrad, k={sum(m.k for m in layers.values())} values, lr {args.lr}, "
        f"{args.train_steps} steps, measured every {args.measure_every} on {len(measure_batches)} held-out batches "
        f"(prepare {time.perf_counter() - t:.1f}s)")

    checkpoints = sorted({s for s in range(0, args.train_steps + 1, args.measure_every)} | {args.train_steps})
    history = []
    train_losses = []
    for step in range(args.train_steps + 1):
        if step in checkpoints:
            model.eval()
            refit_on = batches["calib"] if args.refit_on == "calib" else measure_batches
            fresh = fit_bases(model, taps, refit_on, key_of, trainable)
            records, losses = measure(model, taps, measure_batches, key_of, {"original": calib_bases, "fresh": fresh},
                                      args.density, train_support=train_support, trainable=trainable)
            with torch.no_grad():
                rel = [float(m.delta_weight(torch.float32).norm() / m.base_layer.weight.norm()) for m in layers.values()]
            history.append({"step": step, "heldout_loss": statistics.fmean(losses),
                            "rel_weight_change": statistics.fmean(rel), "summary": summarize(records, key_of)})
            log(f"[{name}]   step {step:3d}: held-out loss {history[-1]['heldout_loss']:.3f}, "
                f"mean |dW|/|W0| {history[-1]['rel_weight_change']:.2e}  ({time.perf_counter() - t:.0f}s)")
        if step == args.train_steps:
            break
        model.train()
        batch = batches["train"][step % len(batches["train"])]
        loss = wrapped(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        prepared.after_step()
        train_losses.append(float(loss.detach()))
    model.eval()
    return {"method": "sparsegrad", "config": config.to_dict(), "lr": args.lr, "history": history,
            "train_losses": train_losses, "seconds": time.perf_counter() - t}


# ---------------------------------------------------------------------------------------------- reports


def fmt(stat) -> str:
    mean, std, _ = stat
    return f"{mean:.3f} ± {std:.3f}"


def markdown(results: dict, args) -> str:
    lines = [f"Top-{args.density:.0%} energy fraction of per-batch weight gradients (mean ± std over the layers "
             "of a type; each layer averaged over the held-out batches).", "",
             "| model | layer type (m×n, layers) | G (identity) | P^T G Q^T (authors) | P^T G Q (textbook) "
             "| in-sample authors | in-sample textbook | fixed Ω identity | fixed Ω authors | fixed Ω textbook |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for model, res in results.items():
        for t, s in res["static"].items():
            m, n = res["shapes"][t]
            cells = [s["identity"], s["heldout/authors"], s["heldout/textbook"], s["insample/authors"],
                     s["insample/textbook"], s["fixed/identity"], s["fixed/authors"], s["fixed/textbook"]]
            lines.append(f"| {model} | {short_type(t)} ({m}×{n}, {res['num_layers'][t]}) | "
                         + " | ".join(fmt(c) for c in cells) + " |")
    lines += ["", "Bases: calibration batches of the train split (held-out columns) or the held-out batches "
              "themselves (in-sample). Fixed Ω: top entries of Σ|G̃| over the calibration batches, energy of "
              "each held-out gradient on them."]
    for model, res in results.items():
        if "training" not in res:
            continue
        tr = res["training"]
        lines += ["", f"Over training, {model}: SparseGrad fixed support (density {args.density}, max_rows/cols "
                  f"{args.max_rows}/{args.max_cols}), AdamW lr {tr['lr']}; held-out gradients of W0 + P S Rᵀ. "
                  f"orig = calibration bases of step 0; fresh = refitted at that step on the "
                  f"{'calibration' if args.refit_on == 'calib' else 'measured held-out'} batches.", "",
                  "| step | held-out loss | mean ‖ΔW‖/‖W0‖ | layer type | identity | authors (orig) | textbook (orig) "
                  "| textbook (fresh) | Ω (training support) |", "|---|---|---|---|---|---|---|---|---|"]
        for h in tr["history"]:
            for t, s in h["summary"].items():
                lines.append(f"| {h['step']} | {h['heldout_loss']:.3f} | {h['rel_weight_change']:.2e} | {short_type(t)} | "
                             + " | ".join(fmt(s[v]) for v in ("identity", "original/authors", "original/textbook",
                                                              "fresh/textbook", "omega")) + " |")
    return "\n".join(lines) + "\n"


def plot_static(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(model, t) for model, res in results.items() for t in res["static"]]
    fig, ax = plt.subplots(figsize=(2.6 * len(groups) + 2, 4.2))
    width = 0.13
    colors = {"identity": "tab:gray", "authors": "tab:orange", "textbook": "tab:blue"}
    bars = [("identity", "identity", ""), ("heldout/authors", "authors", ""), ("heldout/textbook", "textbook", ""),
            ("insample/authors", "authors", "//"), ("insample/textbook", "textbook", "//"),
            ("fixed/textbook", "textbook", "..")]
    names = {"identity": "G (identity)", "heldout/authors": "P^T G Q^T authors", "heldout/textbook": "P^T G Q textbook",
             "insample/authors": "authors, in-sample bases", "insample/textbook": "textbook, in-sample bases",
             "fixed/textbook": "textbook, fixed calib. support"}
    for i, (variant, conv, hatch) in enumerate(bars):
        xs = [g + (i - (len(bars) - 1) / 2) * width for g in range(len(groups))]
        means = [results[m]["static"][t][variant][0] for m, t in groups]
        stds = [results[m]["static"][t][variant][1] for m, t in groups]
        ax.bar(xs, means, width, yerr=stds, capsize=2, color=colors[conv], hatch=hatch, edgecolor="black",
               linewidth=0.5, alpha=0.55 if hatch else 0.9, label=names[variant])
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{m}\n{short_type(t)}" for m, t in groups])
    ax.set_ylabel("energy in top 1 % entries")
    ax.set_ylim(0, 1)
    ax.set_title("Top-1 % gradient energy on held-out batches (mean ± std over layers)")
    ax.legend(fontsize=7, loc="upper left", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_training(results: dict, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(m, t) for m, res in results.items() if "training" in res for t in res["static"]]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.6), squeeze=False)
    styles = [("identity", "G (identity)", "tab:gray", "-"), ("original/authors", "authors, calib. bases", "tab:orange", "-"),
              ("original/textbook", "textbook, calib. bases", "tab:blue", "-"),
              ("fresh/textbook", "textbook, refitted bases", "tab:blue", "--"),
              ("omega", "training support Ω", "tab:green", ":")]
    for ax, (model, t) in zip(axes[0], panels):
        hist = results[model]["training"]["history"]
        steps = [h["step"] for h in hist]
        for variant, label, color, ls in styles:
            means = [h["summary"][t][variant][0] for h in hist]
            stds = [h["summary"][t][variant][1] for h in hist]
            ax.plot(steps, means, color=color, linestyle=ls, marker="o", ms=3, label=label)
            ax.fill_between(steps, [a - b for a, b in zip(means, stds)], [a + b for a, b in zip(means, stds)],
                            color=color, alpha=0.08)
        ax.set_title(f"{model} {short_type(t)}", fontsize=9)
        ax.set_xlabel("training step")
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("energy: top 1 % / on Ω")
    fig.suptitle("held-out gradient energy during SparseGrad training (bands: ± std over layers)", fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="smollm2,minilm")
    p.add_argument("--calib-batches", type=int, default=8)
    p.add_argument("--heldout-batches", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--qa-max-length", type=int, default=64)
    p.add_argument("--cls-max-length", type=int, default=128)
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--train-steps", type=int, default=30, help="0 skips the training part")
    p.add_argument("--measure-every", type=int, default=10)
    p.add_argument("--train-heldout-batches", type=int, default=4, help="held-out batches per training checkpoint")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--refit-on", choices=["calib", "heldout"], default="calib",
                   help="batches the 'fresh' bases are refitted on at each checkpoint, at the current weights: the "
                        "calibration batches (out-of-sample for the measurement) or the measured ones (in-sample)")
    p.add_argument("--max-rows", type=float, default=0.25)
    p.add_argument("--max-cols", type=float, default=0.25)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--tag", default="basis_energy")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
    start = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - start:6.1f}s] {msg}", flush=True)
    log(f"command: {command}  (torch threads {args.threads})")

    results = {}
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        results[name] = run_model(name, args, log)
        (out / f"{args.tag}.partial.json").write_text(json.dumps(results, indent=1))

    table = markdown(results, args)
    wall = time.perf_counter() - start
    footer = f"\nCommand: `{command}` (torch threads {args.threads}); wall time {wall:.0f} s.\n"
    (out / f"{args.tag}.md").write_text(table + footer)
    (out / f"{args.tag}.json").write_text(json.dumps({"command": command, "args": vars(args), "wall_s": wall,
                                                      "results": results}, indent=1))
    (out / f"{args.tag}.partial.json").unlink(missing_ok=True)
    plot_static(results, out / f"{args.tag}.png")
    trained = plot_training(results, out / f"{args.tag}_training.png")
    print()
    print(table)
    print(f"plots: {out / (args.tag + '.png')}" + (f", {out / (args.tag + '_training.png')}" if trained else ""))
    print(f"command: {command}")
    print(f"wall time: {wall:.0f} s")


if __name__ == "__main__":
    main()
