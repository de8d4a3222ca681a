#!/usr/bin/env python
"""Bytes between ranks, step time, peak memory and optimizer state per rank, every method, 2 ranks under
DeepSpeed ZeRO, DDP or FSDP2 (CPU / gloo): the 2-rank systems table.

    .venv/bin/python benchmarks/bench_comm.py                      # tiny Llama, ZeRO-2, ~30 s
    .venv/bin/python benchmarks/bench_comm.py --stage 3
    # GradDrop's kept-only exchange against its dense exchange, on each engine it is built for:
    .venv/bin/python benchmarks/bench_comm.py --methods full,graddrop,graddrop_kept_p0.5,graddrop_kept_p0.9,graddrop_kept_row_p0.5,graddrop_kept_row_p0.9
    .venv/bin/python benchmarks/bench_comm.py --engine ddp --methods full,graddrop,graddrop_kept_p0.5,graddrop_kept_p0.9,graddrop_kept_row_p0.5,graddrop_kept_row_p0.9
    .venv/bin/python benchmarks/bench_comm.py --engine fsdp2 --methods full,graddrop,graddrop_kept_p0.9
    .venv/bin/python benchmarks/bench_comm.py --model smollm2 --steps 2   # embedded SmolLM2-135M
    .venv/bin/python benchmarks/bench_comm.py --compare-persistence --methods sparsegrad --density 0.05 --z3_live 0

Every method runs in its own ``torch.distributed.run`` launch (so a rank's peak RSS is that method's),
``--rounds`` times, interleaved; step time is the median over rounds of the mean counted step (rank 0),
peak memory the training peak (VmHWM reset after calibration and engine set-up) above the RSS with the
model loaded, optimizer state the bytes this rank holds (ZeRO partitions; SparseStateAdam included).
SparseGrad variants use the row/column budget ``--budget`` (train_qa.py's default 0.25); bytes do not
depend on it. ``sparsegrad_reselect`` swaps supports every ``--reselect_every`` steps: its bytes per step
include that all-reduce of the r x c score blocks, amortised over the counted steps.

Started with plain python it relaunches itself with ``torch.distributed.run`` (2 ranks, OMP_NUM_THREADS=1,
DS_ACCELERATOR=cpu). Every method trains the same target layers (SparseGradConfig defaults: the MLP
up/down projections of every block) with the same data; after one uncounted warm-up step the collectives
of ``--steps`` steps are counted on every rank with ``sg_distributed.distributed.comm.CommCounter``, split into
``forward`` / ``backward`` (gradient reduction) / ``step`` (optimizer + ZeRO's all-gather of updated
partitions). Printed per method (rank 0; ranks agree to a few bytes): payload bytes per step by op,
total payload, ring "wire" bytes per step (see sg_distributed/distributed/comm.py for both conventions), the ratio to
full fine-tuning, and the analytic value next to the measurement.

``graddrop`` (p = 0.5) reduces the dense, zero-filled gradient; ``graddrop_kept[_row]_p{0.5,0.9}`` reduce only
the kept entries (``sg_distributed.graddrop.exchange``; element or whole-row masks): DDP through its comm hook,
ZeRO-2 through the bucket-reduction override (``reduce_scatter`` off), FSDP2 through its custom reduce-scatter,
where GradDrop also masks (so ``graddrop`` under FSDP2 masks there too and reduce-scatters the zero-filled rows).
K, the kept values per step, is counted from the masks; "grad-reduce" is the payload of the reductions issued in
the backward (the parameter all-gathers of ZeRO-3 / FSDP2 are left out). ``--engine ddp`` and ``fsdp2`` step a
torch AdamW themselves; fsdp2 runs full and the graddrop rows only, ddp every method but sparsegrad_reference
and sparsegrad_dynamic* (DeepSpeed-only pieces); the kept rows are refused under ZeRO-1/3 (built for ZeRO-2).
Unknown or refused methods stop the bench before any launch. "grad-reduce vs dense graddrop" divides each
backward payload by that of the ``graddrop`` row (or ``full`` when absent).

Analytic column (p ranks, D trainable fp32 values): ZeRO-2 = gradient all-reduce ``2(p-1)/p*4D`` +
all-gather of the updated partitions ``(p-1)/p*4D`` (scalar all-reduces for norms/overflow ignored);
ZeRO-3 = gradient reduce-scatter ``(p-1)/p*4D`` only (its parameter all-gathers touch every partitioned
parameter, frozen ones included, and are shown measured). ``sparsegrad_reference`` and ``graddrop`` still
exchange the dense gradient ("dense exchange"); their column "sparse exchange (planned)" is the
all-gather of (int32 index, fp32 value) pairs of DESIGN §2, ``(p-1)*k*(4+4)``.

ZeRO-3 ``stage3_param_persistence_threshold``: ``--persistence 0`` (default: every parameter partitioned
and gathered at each use), ``hf`` (accelerate's 10 x hidden) or ``auto`` (sg_distributed's ``resolve_auto``
with the converted model: max(10 x hidden, largest k-vector), so k-vectors stay whole on every rank).
``--ds_config FILE`` replaces the bench's own ZeRO config by a shipped one, its "auto" values filled by
``resolve_auto`` (hidden-size buckets: prefetch 0.9 x hidden^2, as a user of that file gets); ``--persistence``
then overrides only its threshold (``auto`` keeps the file's "auto" and passes the model).
``--compare-persistence`` (ZeRO-3; ``--ds_config`` defaults to ds_configs/zero3.json) runs each method under
``hf`` and ``auto`` and prints the number of collective calls per step by op, split forward / backward /
step, side by side. The tiny model's 10 x hidden is 640: use ``--density 0.05`` (k = 819 per matrix) so
that ``hf`` leaves the k-vectors partitioned; ``--z3_live 0`` releases every gathered parameter after use,
as DeepSpeed does once a model exceeds ``stage3_max_live_parameters`` (1e9 in zero3.json: a 7B model), so the
backward gathers again (the tiny model otherwise keeps everything gathered from forward to backward).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = ("full", "lora", "sparsegrad", "sparsegrad_b125", "sparsegrad_reselect", "graddrop",
           "sparsegrad_reference", "sparsegrad_dynamic", "sparsegrad_dynamic_sparse")
# GradDrop's kept-only exchange (sg_distributed.graddrop.exchange): element or whole-row masks at p = 0.5 / 0.9
GRADDROP_KEPT = ("graddrop_kept_p0.5", "graddrop_kept_p0.9", "graddrop_kept_row_p0.5", "graddrop_kept_row_p0.9")
ENGINES = ("zero", "ddp", "fsdp2")
NOTES = {"sparsegrad_b125": "row/column budget 0.125 (fewer rotated products per step)",
         "sparsegrad_reference": "dense exchange through ZeRO (per-step top-k on flat partitions: use dynamic)",
         "graddrop": "p = 0.5, dense exchange (masked entries travel as zeros)",
         **{v: "kept-only exchange" for v in GRADDROP_KEPT},
         "sparsegrad_dynamic": "exact exchange: dense all-reduce of G~, then top-k (equals 1 rank)",
         "sparsegrad_dynamic_sparse": "sparse exchange: local top-k, all-gather (int64 idx, fp32 val), k-vector all-reduce"}


def method_refusal(variant: str, engine: str, stage: int) -> str | None:
    """Why ``variant`` cannot run on ``engine`` (ZeRO ``stage``), or None: checked before any launch."""
    if variant not in METHODS + GRADDROP_KEPT:
        return f"unknown method {variant!r}; valid: {', '.join(METHODS + GRADDROP_KEPT)}"
    if engine != "zero" and variant.startswith(("sparsegrad_reference", "sparsegrad_dynamic")):
        return f"--engine {engine}: {variant} needs DeepSpeed-only pieces; run it with --engine zero"
    if engine == "fsdp2" and variant not in ("full", "graddrop") + GRADDROP_KEPT:
        return f"--engine fsdp2 runs full, graddrop and {', '.join(GRADDROP_KEPT)}; not {variant}"
    if variant in GRADDROP_KEPT and engine == "zero" and stage != 2:
        return (f"{variant}: the kept-only exchange is built for ZeRO stage 2 (and --engine ddp / fsdp2), not "
                f"stage {stage}; use graddrop (dense exchange) there")
    return None


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny", choices=["tiny", "smollm2"])
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--engine", default="zero", choices=ENGINES,
                    help="zero: DeepSpeed ZeRO (--stage); ddp: DistributedDataParallel; fsdp2: fully_shard (full and "
                         "graddrop* only)")
    ap.add_argument("--stage", type=int, default=2, choices=[1, 2, 3])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--density", type=float, default=0.01)
    ap.add_argument("--micro-batch-size", type=int, default=2)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1, help="interleaved launches per method; medians reported")
    ap.add_argument("--budget", type=float, default=0.25, help="SparseGrad max_rows = max_cols (0 = none)")
    ap.add_argument("--reselect_every", type=int, default=2, help="sparsegrad_reselect: steps between swaps")
    ap.add_argument("--persistence", default="0", choices=["0", "hf", "auto"],
                    help="ZeRO-3 stage3_param_persistence_threshold: 0, 10 x hidden, or resolve_auto with the model")
    ap.add_argument("--compare-persistence", action="store_true",
                    help="ZeRO-3: run every method with --persistence hf and auto; print collective calls per step")
    ap.add_argument("--ds_config", default=None, help="a DeepSpeed JSON (\"auto\" values resolved) instead of "
                    "the bench's own config; its stage wins over --stage")
    ap.add_argument("--z3_live", type=int, default=None,
                    help="ZeRO-3: set stage3_max_live_parameters and stage3_max_reuse_distance to N (0: release every "
                         "parameter after use and gather it again in the backward, as a model above 1e9 values does)")
    ap.add_argument("--out", default=None, help="write the raw JSON here")
    ap.add_argument("--local_rank", type=int, default=-1)
    return ap.parse_args(argv)


# ------------------------------------------------------------------------------------------------ worker


def build_model(name: str):
    import torch

    torch.manual_seed(0)
    if name == "smollm2":
        from transformers import AutoModelForCausalLM

        from sg_distributed.data.assets import smollm2_dir

        return AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32), 49152
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)
    return LlamaForCausalLM(config), 256


def batches(n: int, micro: int, seq: int, vocab: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (micro, seq), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def ds_config(stage: int, micro: int, world: int, persistence_threshold: int | str = 0) -> dict:
    zero = {"stage": stage, "overlap_comm": False, "contiguous_gradients": True,
            "reduce_bucket_size": 500_000_000}
    if stage == 3:
        zero.update(stage3_param_persistence_threshold=persistence_threshold, stage3_prefetch_bucket_size=50_000_000)
    else:
        zero.update(reduce_scatter=True, allgather_bucket_size=500_000_000)
    return {"train_batch_size": micro * world, "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": 1, "gradient_clipping": 0.0, "zero_optimization": zero,
            "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}


def run_method(method: str, args, rank: int, world: int) -> dict:
    import torch
    import torch.distributed as dist

    from sg_distributed.distributed.comm import CommCounter
    from sg_distributed.sparsegrad.config import SparseGradConfig
    from sg_distributed.integrations.deepspeed import initialize_engine, largest_sparse_k, load_ds_config, resolve_auto
    from sg_distributed.training.methods import prepare
    from sg_distributed.sparsegrad.targets import find_target_linears

    from bench_methods import reset_peak, status_mib

    from sg_distributed.graddrop import GradDropConfig

    refusal = method_refusal(method, args.engine, args.stage)  # main() checks first; this guards direct torchrun
    if refusal:
        raise SystemExit(refusal)

    model, vocab = build_model(args.model)
    rss_loaded = status_mib("VmRSS")
    variant = method
    graddrop, kept_exchange = GradDropConfig(drop_prob=0.5), False
    if method.startswith("graddrop_kept"):  # graddrop_kept[_row]_p<p>
        kept_exchange = True
        graddrop = GradDropConfig(drop_prob=float(method.rsplit("_p", 1)[1]),
                                  granularity="row" if "_row_" in method else "element")
        method = "graddrop"
    exchange = "sparse" if method.endswith("_sparse") else "exact"
    method = method.removesuffix("_sparse").removesuffix("_reselect").removesuffix("_b125")
    share = 0.125 if variant == "sparsegrad_b125" else args.budget  # b125: the faster, smaller budget
    budget = {"max_rows": share or None, "max_cols": share or None} if method == "sparsegrad" else {}
    if variant == "sparsegrad_reselect":
        budget["reselect_every"] = args.reselect_every
    config = SparseGradConfig(density=args.density, calibration_steps=2, exchange=exchange, **budget)
    targets = find_target_linears(model, config.target_modules, config.blocks, config.block_stride)
    dense_numel = sum(m.weight.numel() for m in targets.values())
    k_total = sum(config.entries_for(m.out_features, m.in_features, n) for n, m in targets.items())
    total_numel = sum(p.numel() for p in model.parameters())
    calib = batches(2, args.micro_batch_size, args.seq, vocab, seed=7)
    prepared = prepare(method, model, config, calibration_batches=calib, graddrop=graddrop)
    controller = prepared.info.get("controller")
    trainable = prepared.trainable_parameters()
    optimizer = prepared.make_optimizer(1e-4)
    hidden = model.config.hidden_size
    threshold = {"0": 0, "hf": 10 * hidden, "auto": "auto"}[args.persistence]
    if args.ds_config:
        cfg = load_ds_config(args.ds_config)
        cfg.setdefault("zero_optimization", {})["stage3_param_persistence_threshold"] = threshold
        args.stage = cfg["zero_optimization"].get("stage", 0)  # the file's stage (recorded in the JSON)
    else:
        cfg = ds_config(args.stage, args.micro_batch_size, world, threshold)
    if args.z3_live is not None:
        cfg["zero_optimization"].update(stage3_max_live_parameters=args.z3_live, stage3_max_reuse_distance=args.z3_live)
    # the library's rules ("auto" threshold: max(10 x hidden, largest k) of the converted model)
    cfg = resolve_auto(cfg, world_size=world, micro_batch_size=args.micro_batch_size, gradient_accumulation_steps=1,
                       max_grad_norm=None, hidden_size=hidden, model=prepared.model)
    from sg_distributed.graddrop.exchange import KeptEntries
    from sg_distributed.integrations import kept_exchange as kx

    counting = CommCounter()  # DDP's reducer calls C++ collectives: the dense hook counts into the active counter
    if args.engine == "zero":
        engine = initialize_engine(prepared.model, optimizer, kx.kept_exchange_ds_config(cfg) if kept_exchange else cfg)
        if kept_exchange:
            kx.install_on_deepspeed(engine, KeptEntries(controller))
    elif args.engine == "ddp":
        engine = torch.nn.parallel.DistributedDataParallel(prepared.model, broadcast_buffers=False)
        engine.register_comm_hook(None, kx.ddp_comm_hook(KeptEntries(controller)) if kept_exchange
                                  else counting.ddp_hook())
    else:
        from sg_distributed.integrations.fsdp import apply_fsdp2

        engine = apply_fsdp2(prepared.model, optimizer=optimizer)
        if controller is not None:  # FSDP2 drops the gradient hooks: GradDrop masks in its reduce-scatter
            kx.install_on_fsdp2(engine, KeptEntries(controller), compact=kept_exchange)
    persistent = list(getattr(getattr(engine, "optimizer", None), "persistent_parameters", []) or [])  # ZeRO-3
    persist_info = {"persistence": args.persistence, "hidden": hidden, "largest_k": largest_sparse_k(prepared.model),
                    "threshold": cfg["zero_optimization"].get("stage3_param_persistence_threshold"),
                    "persistent_params": len(persistent),
                    "persistent_numel": int(sum(p.ds_numel for p in persistent)),
                    "persistent_trainable": sum(1 for p in persistent if p.requires_grad),
                    "trainable_tensors": len(trainable), "ds_config": args.ds_config or "bench",
                    "prefetch_bucket": cfg["zero_optimization"].get("stage3_prefetch_bucket_size"),
                    "max_live": cfg["zero_optimization"].get("stage3_max_live_parameters"),
                    "max_reuse": cfg["zero_optimization"].get("stage3_max_reuse_distance")}
    data = batches((args.steps + 1) * world, args.micro_batch_size, args.seq, vocab, seed=11)
    reset_peak()  # training's peak, not calibration's or DeepSpeed set-up's

    def one_step(i: int, counter) -> None:
        with counter.label("forward"):
            loss = engine(**data[i * world + rank]).loss
        with counter.label("backward"):
            engine.backward(loss) if args.engine == "zero" else loss.backward()
        with counter.label("step"):
            if args.engine == "zero":
                engine.step()
            else:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            prepared.after_step()  # SparseStateAdam's exchange, re-selection's score all-reduce, GradDrop's counter

    with CommCounter() as warm:  # warm-up (lazy buffers, first gathers), not reported
        one_step(0, warm)
    t0 = time.perf_counter()
    counter = counting
    with counter:
        for i in range(1, args.steps + 1):
            one_step(i, counter)
    seconds = (time.perf_counter() - t0) / args.steps
    kept_values = None
    if controller is not None:  # kept entries of the counted steps, from the masks (CPU draws, as on these ranks)
        last = controller.state_dict()
        kept_values = 0
        for step in range(last["step"] - args.steps, last["step"]):
            controller.load_state_dict({**last, "step": step})
            kept_values += sum(int(controller.mask_for(n).sum()) for n in controller.targets)
        controller.load_state_dict(last)
        kept_values /= args.steps
    peak = status_mib("VmHWM")
    states = [optimizer] + [prepared.info.get("sparse", {}).get("optimizer")]  # SparseStateAdam (dynamic)
    opt_bytes = sum(t.numel() * t.element_size() for o in states if o is not None for st in o.state.values()
                    for t in (getattr(v, "_local_tensor", v) for v in st.values())  # FSDP2: this rank's shard
                    if torch.is_tensor(t) and t.dim() > 0)
    snap = counter.per_step(args.steps)
    d = snap.to_dict()
    d["by_label_op"] = {f"{lab}/{op}": vars(s) for (lab, op), s in snap.stats.items()}
    d.update(method=variant, kept_values=kept_values, kept_exchange=kept_exchange,
             peak_over_loaded_mib=peak - rss_loaded, peak_rss_mib=peak, opt_state_bytes=opt_bytes,
             trainable_numel=int(sum(getattr(p, "ds_numel", p.numel()) for p in trainable)),
             dense_numel=dense_numel, k_total=k_total, model_numel=total_numel, step_s=seconds,
             world=world, info={k: v for k, v in prepared.info.items() if k == "lora_rank"}, **persist_info)
    dist.barrier()
    return d


def worker(args) -> None:
    import torch.distributed as dist

    from sg_distributed.integrations.deepspeed import init_distributed

    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    results = [run_method(m, args, rank, world) for m in args.methods.split(",")]
    gathered: list = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump({"engine": args.engine, "stage": args.stage, "model": args.model, "steps": args.steps,
                       "density": args.density, "ranks": gathered}, fh, indent=2)
    dist.barrier()
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ report


def engine_name(data: dict) -> str:
    engine = data.get("engine", "zero")
    return f"ZeRO-{data['stage']}" if engine == "zero" else {"ddp": "DDP", "fsdp2": "FSDP2"}[engine]


def analytic(res: dict, stage: int, engine: str = "zero") -> tuple[float, float | None]:
    """(ring wire bytes/step of the gradient + trainable-parameter exchange, planned sparse exchange or None).

    GradDrop's kept-only exchange reduces K kept values (``kept_values``, counted from the masks) instead of D:
    DDP / ZeRO-2 all-reduce ``2(p-1)/p*4K`` (ZeRO-2 adds its dense all-gather of updated partitions), FSDP2
    reduce-scatter ``(p-1)/p*4K`` (measured a little above: each rank's row is padded to the longest)."""
    from sg_distributed.distributed.comm import dense_allreduce_bytes, sparse_allgather_bytes

    p, D = res["world"], res["trainable_numel"]
    reduced = res["kept_values"] if res.get("kept_exchange") else D
    if engine == "ddp":
        return dense_allreduce_bytes(reduced, p, 4), None
    if engine == "fsdp2":
        return (p - 1) / p * 4 * reduced, None
    if res.get("kept_exchange"):  # ZeRO-2
        return dense_allreduce_bytes(reduced, p, 4) + (p - 1) / p * 4 * D, None
    if stage == 3:
        grad = (p - 1) / p * 4 * D
    else:
        grad = dense_allreduce_bytes(D, p, 4) + (p - 1) / p * 4 * D
    planned = None
    if res["method"] == "sparsegrad_reference":
        planned = sparse_allgather_bytes(res["k_total"], p, 4, 4)
    if res["method"] == "sparsegrad_dynamic":  # engine: norms only; exchange: dense all-reduce of every G~
        grad += dense_allreduce_bytes(res["dense_numel"], p, 4)
    if res["method"] == "sparsegrad_dynamic_sparse":  # all-gather of (int64, fp32) pairs + k-vector all-reduce
        grad += sparse_allgather_bytes(res["k_total"], p, 8, 4) + dense_allreduce_bytes(res["k_total"], p, 4)
    return grad, planned


REDUCTIONS = ("all_reduce", "reduce", "reduce_scatter", "reduce_scatter_tensor")


def bw_payload(r: dict) -> float:
    """Payload of the reductions issued during the backward (the gradient reduction; the parameter all-gathers
    that ZeRO-3 and FSDP2 also issue there are not gradient traffic)."""
    return sum(s["payload"] for k, s in r["by_label_op"].items()
               if k.startswith("backward/") and k.split("/", 1)[1] in REDUCTIONS)


def report(data: dict) -> str:
    from sg_distributed.distributed.comm import fmt_bytes

    stage, engine = data["stage"], data.get("engine", "zero")
    r0 = data["ranks"][0]
    full = next((r for r in r0 if r["method"] == "full"), None)
    dense_graddrop = next((r for r in r0 if r["method"] == "graddrop"), full)
    ops = sorted({op for r in r0 for op in r["by_op"]})
    head = ["method", "trainable", *[f"{op} payload" for op in ops], "grad-reduce payload (backward)",
            "total payload", "total wire (ring)", "wire vs full", "grad-reduce vs full",
            "grad-reduce vs dense graddrop", "analytic wire (grad+param exchange)", "note"]
    lines = [f"{engine_name(data)}, {r0[0]['world']} ranks, model={data['model']} ({r0[0]['model_numel']:,} params; "
             f"targets {r0[0]['dense_numel']:,} values, sum k = {r0[0]['k_total']:,} at density {data['density']}), "
             f"bytes per optimizer step per rank (mean of {data['steps']} steps, rank 0)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in r0:
        bw = bw_payload(r)
        full_bw = bw_payload(full) if full else None
        grad, planned = analytic(r, stage, engine)
        note = NOTES.get(r["method"], "")
        if r.get("kept_exchange"):
            note += f"; K = {r['kept_values']:,.0f} kept values per step ({r['kept_values'] / r['trainable_numel']:.4f} of D)"
        if planned is not None:
            note += f"; sparse exchange (planned) {fmt_bytes(planned)}"
        if r["info"].get("lora_rank"):
            note += f"LoRA rank {r['info']['lora_rank']}"
        cells = [r["method"], f"{r['trainable_numel']:,}"]
        cells += [fmt_bytes(r["by_op"].get(op, {}).get("payload", 0)) for op in ops]
        cells += [fmt_bytes(bw), fmt_bytes(r["total"]["payload"]), fmt_bytes(r["total"]["wire"]),
                  f"{r['total']['wire'] / full['total']['wire']:.4f}" if full else "-",
                  f"{bw / full_bw:.4f}" if full_bw else "-",
                  f"{bw / bw_payload(dense_graddrop):.4f}" if dense_graddrop and bw_payload(dense_graddrop) else "-",
                  fmt_bytes(grad), note]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", systems_table(data)]
    agree = all(abs(bw_payload(a) - bw_payload(b)) <= 64 and abs(a["total"]["wire"] - b["total"]["wire"]) <= 1024
                for a, b in zip(data["ranks"][0], data["ranks"][-1]))
    lines += ["", f"ranks agree on gradient-reduce payload (64 B) and total wire (1 kB): {agree} "
              "(broadcast payload counts on the source rank only)"]
    return "\n".join(lines)


def _short(path: str) -> str:
    return os.path.relpath(path, ROOT) if os.path.isabs(path) else path


def persistence_table(data: dict) -> str:
    """Collective calls per optimizer step (rank 0) by op, forward / backward / step, per threshold."""
    r0 = data["ranks"][0]
    ops = sorted({k.split("/", 1)[1] for r in r0 for k in r["by_label_op"]})
    head = ["method", "stage3_param_persistence_threshold", "persistent params (trainable of all trainable)",
            *[f"{op} calls fwd/bwd/step" for op in ops], "total calls", "total payload"]
    lines = [f"ZeRO-3, {r0[0]['world']} ranks, model={data['model']} (hidden {r0[0]['hidden']}, largest k "
             f"{r0[0]['largest_k']:,} at density {data['density']}): collective calls per optimizer step, rank 0 "
             f"(mean of {data['steps']} steps); ZeRO config {_short(r0[0]['ds_config'])} "
             f"(stage3_prefetch_bucket_size {r0[0]['prefetch_bucket']:,}, max_live_parameters "
             f"{r0[0]['max_live']:,}, max_reuse_distance {r0[0]['max_reuse']:,})", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    from sg_distributed.distributed.comm import fmt_bytes

    for r in r0:
        calls = lambda lab, op: r["by_label_op"].get(f"{lab}/{op}", {}).get("calls", 0)
        fmt = lambda c: f"{c:g}"
        cells = [r["method"], f"{r['threshold']:,} ({r['persistence']})",
                 f"{r['persistent_params']} ({r['persistent_trainable']} of {r['trainable_tensors']})"]
        cells += ["/".join(fmt(calls(lab, op)) for lab in ("forward", "backward", "step")) for op in ops]
        cells += [fmt(r["total"]["calls"]), fmt_bytes(r["total"]["payload"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def systems_table(data: dict) -> str:
    """Step time (rank 0), training peak above the loaded model (worst rank) and optimizer state per rank."""
    r0 = data["ranks"][0]
    by = {r["method"]: r for r in r0}
    peaks = {r["method"]: max(rank[i]["peak_over_loaded_mib"] for rank in data["ranks"]) for i, r in enumerate(r0)}

    def ratio(value, ref):
        return f"{value / ref:.2f}" if ref else "-"

    lines = [f"Systems, {r0[0]['world']} ranks, {engine_name(data)}, medians of {data.get('rounds', 1)} round(s):",
             "", "| method | step s | x LoRA | x full | training peak over loaded MiB (worst rank) | x LoRA | x full | "
             "optimizer state per rank MiB | x full |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lora, full = by.get("lora"), by.get("full")
    for r in r0:
        m = r["method"]
        lines.append(
            f"| {m} | {r['step_s']:.3f} | {ratio(r['step_s'], lora and lora['step_s'])} | "
            f"{ratio(r['step_s'], full and full['step_s'])} | {peaks[m]:.0f} | {ratio(peaks[m], lora and peaks['lora'])} | "
            f"{ratio(peaks[m], full and peaks['full'])} | {r['opt_state_bytes'] / 2**20:.2f} | "
            f"{ratio(r['opt_state_bytes'], full and full['opt_state_bytes'])} |")
    return "\n".join(lines)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, argv: list[str], methods: str, out: str, env: dict) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), __file__, *argv, "--methods", methods,
           "--out", out]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-6000:])
        sys.exit(proc.returncode)
    with open(out, encoding="utf-8") as fh:
        return json.load(fh)


def merge_rounds(runs: list[dict]) -> dict:
    """One result per method and rank: the first round's bytes, medians of time and memory over rounds."""
    import statistics

    merged = runs[0]
    for rank, results in enumerate(merged["ranks"]):
        for i, r in enumerate(results):
            for key in ("step_s", "peak_over_loaded_mib", "peak_rss_mib"):
                r[key] = statistics.median(run["ranks"][rank][i][key] for run in runs)
            r["rounds"] = len(runs)
    return merged


def main() -> None:
    args = parse_args()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        worker(args)
        return
    if args.compare_persistence:
        args.ds_config = args.ds_config or str(ROOT / "ds_configs" / "zero3.json")
    if args.ds_config:
        from sg_distributed.integrations.deepspeed import load_ds_config

        args.stage = load_ds_config(args.ds_config).get("zero_optimization", {}).get("stage", 0)
    if args.compare_persistence and args.stage != 3:
        sys.exit("--compare-persistence needs a ZeRO-3 config")
    refusals = [r for r in (method_refusal(m, args.engine, args.stage) for m in args.methods.split(",")) if r]
    if refusals:  # before any launch: a refusal inside torchrun is buried in its traceback
        sys.exit("bench_comm.py --methods: " + "; ".join(refusals))
    tag = "_persistence" if args.compare_persistence else ""
    where = f"zero{args.stage}" if args.engine == "zero" else args.engine
    out = args.out or str(ROOT / "outputs" / f"bench_comm_{args.model}_{where}{tag}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    argv, skip = [], False
    own = ("--out", "--methods", "--persistence", "--ds_config")  # each launch gets its own
    for a in sys.argv[1:]:  # drop "--out X" / "--methods X" / "--persistence X" (and "=" forms)
        if skip or a.startswith(own) or a == "--compare-persistence":
            skip = a in own and not skip
            continue
        argv.append(a)
    t0 = time.time()
    methods = args.methods.split(",")
    modes = ("hf", "auto") if args.compare_persistence else (args.persistence,)
    jobs = [(m, mode) for m in methods for mode in modes]
    per_job: dict[tuple, list[dict]] = {j: [] for j in jobs}
    for r in range(args.rounds):  # one launch per method: a rank's peak RSS is that method's own
        for m, mode in jobs:
            print(f"round {r + 1}/{args.rounds}: {m} (persistence {mode})", file=sys.stderr, flush=True)
            tmp = out + f".{m}.{mode}.tmp"
            extra = ["--persistence", mode] + (["--ds_config", args.ds_config] if args.ds_config else [])
            per_job[m, mode].append(launch(args, [*argv, *extra], m, tmp, env))
            os.unlink(tmp)
    merged = {j: merge_rounds(runs) for j, runs in per_job.items()}
    first = merged[jobs[0]]
    data = {**{k: first[k] for k in ("engine", "stage", "model", "steps", "density")}, "rounds": args.rounds,
            "ranks": [[merged[j]["ranks"][rank][0] for j in jobs] for rank in range(len(first["ranks"]))]}
    with open(out, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2)
    print(persistence_table(data) if args.compare_persistence else report(data))
    command = " ".join(["python", "benchmarks/bench_comm.py", *sys.argv[1:]])
    print(f"\n({time.time() - t0:.0f} s; raw JSON: {out}; command: {command})")


if __name__ == "__main__":
    main()
