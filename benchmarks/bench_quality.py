#!/usr/bin/env python
"""Held-out quality of every fine-tuning method through one harness, over seeds (GitHub issue "Evidence").

Two tasks, same harness for every method (same data order per seed, same steps, target layers, optimizer
settings, seeds):

* ``qa``:  SmolLM2-135M-Instruct on FanOutQA sub-question/answer pairs (``load_qa_pairs``), split by
  top-level question (``split_by_group``, seed 0); held-out answer loss (teacher forced), exact match and
  token F1 of greedy answers (``evaluate_qa``) on the first ``--eval_size`` held-out pairs.
* ``bbc``: MiniLM-L6 (BERT) + a fresh sequence-classification head on BBC News (5 classes,
  ``load_bbc_news``/``split_articles``, seed 0), a training subset of ``--bbc_train`` articles, 128
  tokens; held-out accuracy on the first ``--eval_size`` held-out articles (default: all of them).

Target layers: ``SparseGradConfig`` defaults (the MLP pair of every block: up/down_proj for SmolLM2,
intermediate.dense/output.dense for BERT). Every method trains only those layers (plus, for ``bbc``, the
classification head, see below); AdamW/LazyAdam betas (0.9, 0.999), weight decay 0, no clipping, fp32.

Variants (``--methods``; names are this benchmark's, the ``prepare`` method is in brackets):

=====================  ================================================================================
none                   no training (the base model; ``bbc``: the untrained head, i.e. chance)
head_only              ``bbc`` only: the head trains, the body is frozen (linear probe)
full                   [full] dense AdamW on the target weights
lora                   [lora] peft LoRA on the target layers, rank matched to SparseGrad's sum of k
lora_r8                [lora] rank 8 (the paper's LoRA rank)
meprop                 [meprop] per-step top-k of |dL/dW| in the original basis (LazyAdam)
graddrop               [graddrop] element granularity, p = 0.5, mask resampled every step, no rescale
graddrop_row           [graddrop] row granularity, p = 0.5
unfreeze               [full] + ``GradualUnfreezing`` over the blocks' target weights, one more block
                       every ``max(1, round(steps / (2 * blocks)))`` steps (all unfrozen by mid-run)
sparsegrad             [sparsegrad] fixed support, textbook convention (R = Q), density 1 %,
                       max_rows = max_cols = 0.25 (launch/train_qa.py's defaults)
sparsegrad_refconv     the same with ``input_convention="reference"`` (the authors' R = Q^T)
sparsegrad_reselect    the same plus drop-and-grow re-selection: every ``--reselect_every`` steps (10) the
                       ``--reselect_fraction`` (0.2) of each support with the smallest |v| is swapped for
                       the largest accumulated |G~| of its rows x cols block (``reselect.py``)
sparsegrad_reference   [sparsegrad_reference] paper-exact: dense rotated weight, per-step top-k of
                       |G~| (k = 1 % per matrix, no row/col budget), LazyAdam, authors' input convention
=====================  ================================================================================

``meprop`` and ``sparsegrad_reference`` run with ``reference_freeze_layernorm=True`` so that, as for the
other methods, no norm parameter trains (the authors' code trains them); their target biases (BERT only)
do train, as in the authors' layer. Calibration (SparseGrad variants, MeProp's support): the first 8
training batches of the run's own data order. ``bbc`` head (``classifier`` and the pooler): ``none``
keeps the random head; every other variant trains the head with its own AdamW at ``--head_lr`` (1e-3,
the same for every method and never tuned), so the
head is identical across methods and the method's learning rate only drives the body.

Learning rates. Each variant has a base learning rate (``BASE_LR``); ``--lr_grid`` multiplies it. With
``--select`` (default on) the harness first trains seed 0 at every grid point and keeps the learning
rate with the best score on a *validation split carved from the training data* (``qa``: the pairs of
``--val_groups`` top-level questions of the training side, teacher-forced answer loss; ``bbc``:
``--val_size`` training articles that are not in the training subset, accuracy then loss). The held-out
split is never looked at during selection. The chosen learning rates are printed and recorded.

Output: per-variant mean ± std over seeds (std with ddof = 1), markdown tables on stdout and in
``benchmarks/results/quality_<task>.md``, raw runs in ``quality_<task>.jsonl`` (resumable: a run with
the same key is not repeated) and one bar plot ``quality_<task>.png``.

    .venv/bin/python benchmarks/bench_quality.py --task bbc --seeds 0,1,2 --steps 60
    .venv/bin/python benchmarks/bench_quality.py --task qa --seeds 0,1,2 --steps 40 --eval_size 64 \\
        --methods none,full,lora,sparsegrad,meprop,graddrop

Every run is its own subprocess (``OMP_NUM_THREADS`` = ``--threads``), ``--jobs`` at a time.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ALL_VARIANTS = ("none", "head_only", "full", "lora", "lora_r8", "meprop", "graddrop", "graddrop_row", "unfreeze",
                "sparsegrad", "sparsegrad_b125", "sparsegrad_balanced", "sparsegrad_scored", "sparsegrad_refconv",
                "sparsegrad_reselect", "sparsegrad_reference", "sparsegrad_peft", "sparsegrad_paper")
# sparsegrad_b125: row/column budget 0.125 instead of --max_rows/--max_cols (0.25): about half the
# rotated products per step (the step-time lever), fewer directions to choose the support from;
# sparsegrad_balanced: the same block area with fractions of the other side (SparseGradConfig.budget_axes);
# sparsegrad_scored: the top-scored rows x cols as the block instead of the leading eigen-directions
# (SparseGradConfig.budget_block);
# sparsegrad_peft: the same adapter through peft's get_peft_model, the bbc head trained as modules_to_save
# (one AdamW, the head's parameter group at --head_lr) instead of the harness's own head optimizer;
# sparsegrad_paper: the paper's regime through modules_to_save -- the MLP matrices SparseGrad, the rest dense at
# full fine-tuning's lr (--dense_lr). bbc (its GLUE runs): every attention block and the embeddings, the head at
# --head_lr. qa (its LLaMA script): every attention block and gate_proj; SmolLM2 ties its embeddings to the LM
# head, and a modules_to_save copy would untie them, so they stay frozen
# base learning rates (qa: launch/train_qa.py's per-method defaults; bbc: the same family, encoder-sized)
BASE_LR = {
    "qa": {"full": 2e-5, "graddrop": 2e-5, "graddrop_row": 2e-5, "unfreeze": 2e-5, "lora": 1e-3, "lora_r8": 1e-3,
           "meprop": 1e-4, "sparsegrad": 1e-2, "sparsegrad_b125": 1e-2, "sparsegrad_balanced": 1e-2, "sparsegrad_scored": 1e-2, "sparsegrad_peft": 1e-2, "sparsegrad_paper": 1e-2,
           "sparsegrad_refconv": 1e-2, "sparsegrad_reselect": 1e-2, "sparsegrad_reference": 1e-4},
    "bbc": {"full": 1e-4, "graddrop": 1e-4, "graddrop_row": 1e-4, "unfreeze": 1e-4, "lora": 1e-3, "lora_r8": 1e-3,
            "meprop": 1e-3, "sparsegrad": 1e-2, "sparsegrad_b125": 1e-2, "sparsegrad_balanced": 1e-2, "sparsegrad_scored": 1e-2, "sparsegrad_peft": 1e-2, "sparsegrad_paper": 1e-2,
            "sparsegrad_refconv": 1e-2, "sparsegrad_reselect": 1e-2, "sparsegrad_reference": 1e-3, "head_only": 0.0},
}
NO_LR = ("none", "head_only")


# ============================================================================================ worker


def _seed_all(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _order(n: int, seed: int) -> list[int]:
    import random

    idx = list(range(n))
    random.Random(1000 + seed).shuffle(idx)
    return idx


def _stream(items, seed: int, micro: int, count: int):
    """``count`` micro-batches walking a seeded permutation of ``items`` (reshuffled every epoch)."""
    out, epoch, pos, order = [], 0, 0, _order(len(items), seed)
    while len(out) < count:
        if pos + micro > len(order):
            epoch += 1
            order, pos = _order(len(items), seed * 7919 + epoch), 0
        out.append([items[i] for i in order[pos:pos + micro]])
        pos += micro
    return out


def qa_data(args):
    from sg_distributed.data.qa import load_qa_pairs, split_by_group

    pairs = load_qa_pairs()
    train, heldout = split_by_group(pairs, heldout_fraction=0.2, seed=0)
    groups = sorted({p.group for p in train})
    import random

    random.Random(12345).shuffle(groups)
    val_groups = set(groups[:args.val_groups])
    val = [p for p in train if p.group in val_groups][:args.val_size]
    train = [p for p in train if p.group not in val_groups]
    return train, val, heldout[:args.eval_size] if args.eval_size else heldout


def bbc_data(args):
    from sg_distributed.data.classify import load_bbc_news, split_articles

    train, heldout = split_articles(load_bbc_news(), heldout_fraction=0.2, seed=0)
    sub = train[:args.bbc_train]
    val = train[args.bbc_train:args.bbc_train + args.val_size]
    return sub, val, heldout[:args.eval_size] if args.eval_size else heldout


def load_model(task: str, seed: int):
    import torch

    _seed_all(seed)  # the bbc head's initialisation depends on the seed
    if task == "qa":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from sg_distributed.data.assets import smollm2_dir

        path = smollm2_dir()
        tok = AutoTokenizer.from_pretrained(path)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), tok
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from sg_distributed.data.assets import minilm_dir

    path = minilm_dir()
    tok = AutoTokenizer.from_pretrained(path)
    import transformers

    transformers.logging.set_verbosity_error()  # "some weights newly initialised": the head, expected
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=5, dtype=torch.float32)
    return model, tok


def head_parameters(model) -> list:
    return [p for n, p in model.named_parameters() if n.startswith(("classifier.", "bert.pooler."))]


def bbc_eval(model, collate, articles, batch_size: int = 32) -> dict:
    import torch
    import torch.nn.functional as F

    model.eval()
    correct, loss, n = 0, 0.0, 0
    with torch.no_grad():
        for i in range(0, len(articles), batch_size):
            batch = collate(articles[i:i + batch_size])
            labels = batch.pop("labels")
            logits = model(**batch).logits
            loss += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += int((logits.argmax(-1) == labels).sum())
            n += len(labels)
    model.train()
    return {"accuracy": correct / n, "loss": loss / n, "num_examples": n}


def run_job(job: dict) -> dict:
    """Train one (task, variant, seed, lr) and evaluate on the validation or held-out split."""
    import torch

    from sg_distributed import SparseGradConfig
    from sg_distributed.graddrop import GradDropConfig, GradualUnfreezing
    from sg_distributed.training.methods import prepare
    from sg_distributed.sparsegrad.targets import block_index, find_target_linears

    args = argparse.Namespace(**job["args"])
    task, variant, seed, lr = job["task"], job["variant"], job["seed"], job["lr"]
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    t_start = time.perf_counter()
    train, val, heldout = (qa_data if task == "qa" else bbc_data)(args)
    model, tok = load_model(task, seed)
    if task == "qa":
        from sg_distributed.data.qa import QACollator, evaluate_qa

        collate = QACollator(tok, max_length=args.seq)
    else:
        from sg_distributed.data.classify import ClassificationCollator

        collate = ClassificationCollator(tok, max_length=args.seq)
    stream = [collate(b) for b in _stream(train, seed, args.micro_batch_size, args.steps)]
    calib = stream[:args.calibration_steps]

    head = head_parameters(model) if task == "bbc" else []
    for p in head:
        p.requires_grad_(False)

    base = {"density": args.density, "calibration_steps": args.calibration_steps}
    method, cfg, extra = variant, dict(base), {}
    if variant in ("sparsegrad", "sparsegrad_b125", "sparsegrad_balanced", "sparsegrad_scored", "sparsegrad_refconv",
                   "sparsegrad_reselect"):
        method = "sparsegrad"
        cfg.update(max_rows=args.max_rows or None, max_cols=args.max_cols or None)
        if variant == "sparsegrad_b125":
            cfg.update(max_rows=0.125, max_cols=0.125)
        if variant == "sparsegrad_balanced":
            cfg.update(budget_axes="balanced")
        if variant == "sparsegrad_scored":
            cfg.update(budget_block="scored")
        if variant == "sparsegrad_refconv":
            cfg["input_convention"] = "reference"
        if variant == "sparsegrad_reselect":
            cfg.update(reselect_every=args.reselect_every, reselect_fraction=args.reselect_fraction)
    elif variant == "sparsegrad_reference":
        cfg.update(input_convention="reference", reference_freeze_layernorm=True)
    elif variant == "meprop":
        cfg.update(reference_freeze_layernorm=True)
    elif variant in ("lora", "lora_r8"):
        method = "lora"
        if variant == "lora_r8":
            extra["lora_rank"] = 8
        else:  # matched to the trainable count of the sparsegrad variant (same density)
            from sg_distributed.training.methods import matched_lora_rank

            extra["lora_rank"] = matched_lora_rank(model, SparseGradConfig(**base))
    elif variant in ("graddrop", "graddrop_row"):
        method = "graddrop"
        extra["graddrop"] = GradDropConfig(drop_prob=0.5, granularity="row" if variant == "graddrop_row" else "element",
                                           seed=seed)
    elif variant == "unfreeze":
        method = "full"
    config = SparseGradConfig(**cfg)

    t0 = time.perf_counter()
    train_losses, optimizers, after = [], [], []
    info: dict = {}
    if variant in ("sparsegrad_peft", "sparsegrad_paper"):
        from peft import get_peft_model

        heads = ["classifier", "pooler"] if head else []
        paper_dense = {"bbc": ["attention", "bert.embeddings"], "qa": ["self_attn", "gate_proj"]}  # peft: suffixes
        dense = paper_dense[task] if variant == "sparsegrad_paper" else []
        peft_config = SparseGradConfig(**cfg, max_rows=args.max_rows or None, max_cols=args.max_cols or None,
                                       modules_to_save=(heads + dense) or None)
        net = get_peft_model(model, peft_config)
        net.calibrate(calib)
        groups: dict[str, list] = {"values": [], "head": [], "dense": []}
        for n, p in net.named_parameters():
            if p.requires_grad:
                kind = "values" if n.endswith("sparsegrad_values") else "head" if any(f".{h}." in n for h in heads) \
                    else "dense"
                groups[kind].append(p)
        optimizers.append(torch.optim.AdamW([{"params": groups["values"], "lr": lr},
                                             {"params": groups["head"], "lr": args.head_lr},
                                             {"params": groups["dense"], "lr": args.dense_lr}], weight_decay=0.0))
        info["trainable"] = sum(p.numel() for p in groups["values"])
        info["dense_trainable"] = sum(p.numel() for p in groups["dense"])
        head = []  # trained through modules_to_save above
    elif variant in NO_LR:
        net = model
        for p in model.parameters():
            p.requires_grad_(False)
    else:
        prepared = prepare(method, model, config, calibration_batches=calib, **extra)
        net = prepared.model
        info = {k: v for k, v in prepared.info.items() if k in ("lora_rank",)}
        try:
            optimizers.append(prepared.make_optimizer(lr))
            after.append(prepared.after_step)
        except ValueError:  # dynamic mode with no dense trainable parameter (LLaMA, norms frozen)
            sparse = prepared.model.make_sparse_optimizer(lr)
            after.append(sparse.step)
        info["trainable"] = prepared.trainable_count() + sum(
            getattr(m, "k", 0) for m in prepared.model.modules() if type(m).__name__ == "DynamicSparseGradLinear")
        if variant == "unfreeze":
            targets = find_target_linears(model, config.target_modules, config.blocks, config.block_stride)
            by_block: dict[int, list] = {}
            for name, mod in targets.items():
                by_block.setdefault(block_index(name), []).append(mod)
            blocks = [torch.nn.ModuleList(by_block[b]) for b in sorted(by_block)]
            every = max(1, round(args.steps / (2 * len(blocks))))
            unfreezer = GradualUnfreezing(blocks, unfreeze_every=every)
            after.append(unfreezer.step)
            info["unfreeze_every"] = every
    if head and variant != "none":
        for p in head:
            p.requires_grad_(True)
        optimizers.append(torch.optim.AdamW(head, lr=args.head_lr, weight_decay=0.0))
    prepare_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    if variant != "none":
        net.train()
        for batch in stream:
            loss = net(**batch).loss
            loss.backward()
            for opt in optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)
            for fn in after:
                fn()
            train_losses.append(loss.item())
            if not math.isfinite(train_losses[-1]):
                break
    train_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    split = heldout if job["phase"] == "main" else val
    if task == "qa":
        if job["phase"] == "main":
            metrics = evaluate_qa(net, tok, split, batch_size=16, max_new_tokens=16, max_length=args.seq)
        else:  # selection: teacher-forced answer loss only
            from sg_distributed.data.qa import _answer_loss

            net.eval()
            with torch.no_grad():
                metrics = {"answer_loss": _answer_loss(net, collate, split, 16, False)[0]}
    else:
        metrics = bbc_eval(net, collate, split)
    eval_s = time.perf_counter() - t0
    tail = train_losses[-max(1, len(train_losses) // 4):] if train_losses else [float("nan")]
    return {**{k: job[k] for k in ("task", "variant", "seed", "lr", "phase", "key")}, "metrics": metrics,
            "train_loss_last_quarter": statistics.fmean(tail), "train_losses": train_losses,
            "prepare_s": prepare_s, "train_s": train_s, "eval_s": eval_s,
            "total_s": time.perf_counter() - t_start, "info": info}


# ============================================================================================ driver


def job_key(task, variant, seed, lr, phase, args) -> str:
    sizes = f"steps={args.steps},mb={args.micro_batch_size},seq={args.seq},density={args.density}"
    sizes += f",eval={args.eval_size},val={args.val_size}" + (f",train={args.bbc_train}" if task == "bbc" else "")
    if variant == "sparsegrad_reselect":
        sizes += f",reselect={args.reselect_every}x{args.reselect_fraction}"
    return f"{task}|{variant}|seed={seed}|lr={lr:.3g}|{phase}|{sizes}"


def load_done(path: Path) -> dict:
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done[r["key"]] = r
    return done


def run_jobs(jobs: list[dict], args, out: Path, done: dict) -> None:
    todo = [j for j in jobs if j["key"] not in done]
    if not todo:
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    tmpdir = out.parent / "quality_tmp"
    tmpdir.mkdir(parents=True, exist_ok=True)

    def one(i_job):
        i, job = i_job
        spec = tmpdir / f"job{os.getpid()}_{i}.json"
        res = tmpdir / f"res{os.getpid()}_{i}.json"
        spec.write_text(json.dumps(job))
        t0 = time.time()
        proc = subprocess.run([sys.executable, __file__, "--worker", str(spec), "--worker_out", str(res)],
                              env=env, capture_output=True, text=True)
        spec.unlink(missing_ok=True)
        if proc.returncode != 0:
            print(f"FAILED {job['key']}:\n{proc.stderr[-3000:]}", file=sys.stderr, flush=True)
            return None
        r = json.loads(res.read_text())
        res.unlink(missing_ok=True)
        m = r["metrics"]
        shown = ", ".join(f"{k}={v:.4f}" for k, v in m.items() if isinstance(v, float))
        print(f"[{time.strftime('%H:%M:%S')}] {job['variant']:<21} seed {job['seed']} lr {job['lr']:.3g} "
              f"{job['phase']:<6} train_loss(last 1/4)={r['train_loss_last_quarter']:.4f} {shown} "
              f"({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
        with open(out, "a") as fh:
            fh.write(json.dumps(r) + "\n")
        done[r["key"]] = r
        return r

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(one, enumerate(todo)))


def selection_score(task: str, r: dict) -> tuple:
    m = r["metrics"]
    if not math.isfinite(r["train_loss_last_quarter"]):
        return (float("inf"),)
    if task == "qa":
        return (m["answer_loss"],)
    return (-m["accuracy"], m["loss"])


def mean_std(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def run_task(task: str, args) -> None:
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = out_dir / f"quality_{task}.jsonl"
    done = load_done(raw)
    variants = [v for v in args.methods.split(",") if v]
    if task == "qa":
        variants = [v for v in variants if v != "head_only"]
    seeds = [int(s) for s in args.seeds.split(",")]
    grid = [float(g) for g in args.lr_grid.split(",")]
    jargs = {k: getattr(args, k) for k in ("steps", "micro_batch_size", "seq", "density", "calibration_steps",
                                           "max_rows", "max_cols", "eval_size", "val_size", "val_groups",
                                           "bbc_train", "head_lr", "dense_lr", "reselect_every", "reselect_fraction")}
    ns = argparse.Namespace(**jargs)

    def job(variant, seed, lr, phase):
        return {"task": task, "variant": variant, "seed": seed, "lr": lr, "phase": phase, "args": jargs,
                "key": job_key(task, variant, seed, lr, phase, ns)}

    chosen: dict[str, float] = {}
    sweep: dict[str, list] = {}
    t_task = time.time()
    if args.select and len(grid) > 1:
        jobs = [job(v, seeds[0], BASE_LR[task][v] * g, "select") for v in variants if v not in NO_LR for g in grid]
        run_jobs(jobs, args, raw, done)
        for v in variants:
            if v in NO_LR:
                continue
            rs = [done[j["key"]] for j in jobs if j["variant"] == v and j["key"] in done]
            if rs:
                best = min(rs, key=lambda r: selection_score(task, r))
                chosen[v] = best["lr"]
                sweep[v] = sorted(((r["lr"], selection_score(task, r)[0], r["train_loss_last_quarter"]) for r in rs))
    for v in variants:
        chosen.setdefault(v, 0.0 if v in NO_LR else BASE_LR[task][v] * (grid[0] if len(grid) == 1 else 1.0))
    jobs = [job(v, s, chosen[v], "main") for v in variants for s in (seeds[:1] if v == "none" else seeds)]
    run_jobs(jobs, args, raw, done)
    elapsed = time.time() - t_task

    rows = []
    for v in variants:
        rs = [done[j["key"]] for j in jobs if j["variant"] == v and j["key"] in done]
        if not rs:
            continue
        row = {"variant": v, "lr": chosen[v], "n": len(rs), "trainable": rs[0]["info"].get("trainable", 0),
               "lora_rank": rs[0]["info"].get("lora_rank"), "train_s": statistics.fmean(r["train_s"] for r in rs),
               "train_loss": mean_std([r["train_loss_last_quarter"] if r["train_losses"] else None for r in rs])}
        for k in (("answer_loss", "exact_match", "f1") if task == "qa" else ("accuracy", "loss")):
            row[k] = mean_std([r["metrics"][k] for r in rs])
            row[f"{k}_per_seed"] = [r["metrics"][k] for r in rs]
        rows.append(row)
    md = format_tables(task, rows, sweep, args, elapsed)
    print(md)
    (out_dir / f"quality_{task}.md").write_text(md + "\n")
    (out_dir / f"quality_{task}.json").write_text(json.dumps({"rows": rows, "sweep": sweep, "args": vars(args)},
                                                             indent=2, default=str))
    plot(task, rows, out_dir / f"quality_{task}.png", args)


def format_tables(task: str, rows: list[dict], sweep: dict, args, elapsed: float) -> str:
    seeds = args.seeds
    if task == "qa":
        head = f"### QA (SmolLM2-135M-Instruct, FanOutQA), {args.steps} steps x micro-batch {args.micro_batch_size} x {args.seq} tokens, seeds {seeds}, {args.eval_size or 'all'} held-out pairs"
        cols = ["answer loss", "exact match", "F1"]
        keys = ["answer_loss", "exact_match", "f1"]
    else:
        head = (f"### BBC News (MiniLM-L6 + head), {args.bbc_train} training articles, {args.steps} steps x batch "
                f"{args.micro_batch_size} x {args.seq} tokens, seeds {seeds}, {args.eval_size or 'all'} held-out articles")
        cols = ["held-out accuracy", "held-out loss"]
        keys = ["accuracy", "loss"]
    lines = [head, "", "| method | lr | trainable (body) | " + " | ".join(cols) + " | train loss (last 1/4) | train s | n |",
             "|---|---:|---:|" + "---:|" * (len(cols) + 3)]
    for r in rows:
        tr = f"{r['trainable']:,}" + (f" (r={r['lora_rank']})" if r.get("lora_rank") else "")
        cells = [f"{r[k][0]:.4f} ± {r[k][1]:.4f}" for k in keys]
        tl = f"{r['train_loss'][0]:.4f} ± {r['train_loss'][1]:.4f}" if math.isfinite(r["train_loss"][0]) else "-"
        lines.append(f"| {r['variant']} | {r['lr']:.3g} | {tr} | " + " | ".join(cells) + f" | {tl} | {r['train_s']:.0f} | {r['n']} |")
    if sweep:
        crit = "validation answer loss (teacher forced)" if task == "qa" else "validation accuracy (then loss)"
        lines += ["", f"Learning-rate selection on seed {seeds.split(',')[0]}, criterion: {crit} on a split carved "
                      "from the training data (never the held-out split):", "",
                  "| method | lr: criterion (train loss) |", "|---|---|"]
        for v, pts in sweep.items():
            lines.append(f"| {v} | " + "; ".join(f"{lr:.3g}: {c if task == 'qa' else -c:.4f} ({tl:.3f})" for lr, c, tl in pts) + " |")
    lines += ["", f"mean ± std (ddof 1) over seeds; wall time of this invocation {elapsed / 60:.1f} min "
                  f"(--jobs {args.jobs}, {args.threads} thread(s) each)."]
    return "\n".join(lines)


def plot(task: str, rows: list[dict], path: Path, args) -> None:
    """One horizontal dot plot per metric: every seed (small dots), mean ± std (bar); untrained rows
    (``none``) are named in the title instead of stretching the axis."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    keys = ("answer_loss", "f1") if task == "qa" else ("accuracy",)
    trained = [r for r in rows if r["variant"] != "none"]
    untrained = {r["variant"]: r for r in rows if r["variant"] == "none"}
    fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 0.42 * len(trained) + 1.6), squeeze=False)
    for ax, k in zip(axes[0], keys):
        for y, r in enumerate(trained):
            name = r["variant"]
            color = "tab:red" if name.startswith("sparsegrad") else "tab:blue" if name.startswith("lora") else "tab:gray"
            mean, std = r[k]
            ax.errorbar(mean, y, xerr=std, fmt="o", color=color, capsize=3, markersize=6)
            seeds = r.get(f"{k}_per_seed", [])
            ax.scatter(seeds, [y] * len(seeds), s=10, color=color, alpha=0.45, zorder=3)
        lora = next((r for r in trained if r["variant"] == "lora"), None)
        if lora:
            ax.axvline(lora[k][0], color="tab:blue", lw=0.8, ls="--")
        ax.set_yticks(range(len(trained)))
        ax.set_yticklabels([r["variant"] + (f" ({r['lr']:g})" if r["lr"] else "") for r in trained], fontsize=8)
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
        title = {"answer_loss": "held-out answer loss (lower is better)", "f1": "held-out token F1",
                 "accuracy": "held-out accuracy"}[k]
        if "none" in untrained:
            title += f"\nno training: {untrained['none'][k][0]:.3f}"
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"{task}: {args.steps} steps, seeds {args.seeds}; dashed: LoRA mean; (lr) chosen on validation",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=["qa", "bbc", "both"], default="both")
    p.add_argument("--methods", default=",".join(ALL_VARIANTS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=None, help="default: qa 40, bbc 60")
    p.add_argument("--eval_size", type=int, default=None, help="held-out examples (default: qa 64, bbc all)")
    p.add_argument("--micro_batch_size", type=int, default=None, help="default: qa 8, bbc 8")
    p.add_argument("--seq", type=int, default=None, help="tokens (default: qa 64, bbc 128)")
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--max_rows", type=float, default=0.25)
    p.add_argument("--max_cols", type=float, default=0.25)
    p.add_argument("--calibration_steps", type=int, default=8)
    p.add_argument("--lr_grid", default=None, help="multipliers of the base lr (default qa 0.316,1,3.16; bbc 0.1,1,10)")
    p.add_argument("--no_select", dest="select", action="store_false", help="use the base lr, no selection")
    p.add_argument("--val_size", type=int, default=None, help="validation examples (default: qa 64, bbc 200)")
    p.add_argument("--val_groups", type=int, default=20, help="qa: training-side top-level questions held for validation")
    p.add_argument("--bbc_train", type=int, default=400)
    p.add_argument("--head_lr", type=float, default=1e-3)
    p.add_argument("--dense_lr", type=float, default=1e-4,
                   help="sparsegrad_paper: lr of the densely trained modules (full fine-tuning's chosen lr: bbc 1e-4, qa 6.32e-5)")
    p.add_argument("--reselect_every", type=int, default=10, help="sparsegrad_reselect: steps between re-selections")
    p.add_argument("--reselect_fraction", type=float, default=0.2, help="sparsegrad_reselect: share swapped")
    p.add_argument("--out_dir", default=str(ROOT / "benchmarks" / "results"),
                   help="where quality_<task>.md/.jsonl/.png go (a side experiment: not over the full grid's)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker_out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        job = json.loads(Path(args.worker).read_text())
        Path(args.worker_out).write_text(json.dumps(run_job(job)))
        return
    defaults = {"qa": dict(steps=40, eval_size=64, micro_batch_size=8, seq=64, lr_grid="0.316,1,3.16", val_size=64),
                "bbc": dict(steps=60, eval_size=0, micro_batch_size=8, seq=128, lr_grid="0.1,1,10", val_size=200)}
    for task in (["qa", "bbc"] if args.task == "both" else [args.task]):
        targs = argparse.Namespace(**vars(args))
        for k, v in defaults[task].items():
            if getattr(targs, k) is None:
                setattr(targs, k, v)
        run_task(task, targs)


if __name__ == "__main__":
    main()
