"""The training loop of a QA fine-tuning run, as an object: setup -> resume -> train_step -> evaluate -> save.

``launch/train_qa.py`` is argument parsing around it; from Python the same run is::

    from sg_distributed.training import TrainingLoop, options

    loop = TrainingLoop(options(model="path/to/model", steps=20, output_dir="out"))
    results = loop.run()              # setup, resume, every step with checkpoints, held-out evaluation, adapter

or step by step (``loop.setup(); loop.resume(); loss = loop.train_step(0); loop.evaluate("after");
loop.save(1)``). The engine (DeepSpeed, FSDP2, DDP or one process) sits behind ``training.engine.Engine``; the
method (SparseGrad through peft, LoRA, GradDrop, ...) behind ``training.methods.prepare``. Every rank runs the
same calls in the same order: the loop's collectives (one per optimizer step, plus saves and evaluation) match.

Errors that end a run raise ``SystemExit`` with an ``error: ...`` message (bad input, exit 1) or ``Stop`` (a
clean stop with a documented exit code: non-finite losses, a dead peer, SIGTERM / SIGINT).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sg_distributed.data.qa import TokenizedCollator
from sg_distributed.data.sources import load_pairs, tokenize_examples
from sg_distributed.distributed.comm import CommCounter
from sg_distributed.distributed.process_group import (
    assert_same_on_all_ranks, barrier, in_place_collective, init_process_group)
from sg_distributed.graddrop import GradDropConfig
from sg_distributed.quant import quantized_storage_bytes, quantized_weights_digest
from sg_distributed.sparsegrad.config import SparseGradConfig
from sg_distributed.training import checkpoint as ckpt
from sg_distributed.training.engine import Engine, epoch_and_offset, global_batch_indices, rank_micro_batches
from sg_distributed.training.evaluation import evaluate_held_out, summary
from sg_distributed.training.faults import Faults
from sg_distributed.training.methods import prepare, sparsegrad_config
from sg_distributed.training.metrics_log import MetricsLog
from sg_distributed.training.model_loading import enable_gradient_checkpointing, load_model_and_tokenizer
from sg_distributed.training.cli import DEFAULT_LR, DTYPES, check_precision
from sg_distributed.training.signals import GracefulStop, rearm_sigterm


class Stop(SystemExit):
    """A clean stop with a message (printed by the launch script) and a specific exit code."""

    def __init__(self, message: str, code: int):
        super().__init__(code)
        self.message = message

    def __str__(self) -> str:
        return self.message


def gathered(params, zero3: bool):
    """Full parameters inside the block (ZeRO-3 partitions them); a no-op otherwise."""
    if not zero3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def load_data(args) -> tuple[list, list, str]:
    """(train pairs, held-out pairs, the data's resume key): FanOutQA (embedded, or --data) split by top-level
    question, or any --dataset through sg_distributed.data.sources. The key is the FanOutQA file's digest
    ("default" for the embedded one) or a digest of the loaded examples."""
    try:
        train, heldout = load_pairs(args)
        if args.dataset is None and not args.system_prompt and args.eval_fraction == 0.2:  # as before --dataset
            return train, heldout, ckpt.file_digest(args.data) if args.data else "default"
        return train, heldout, examples_digest(train, heldout)
    except (ValueError, OSError, UnicodeDecodeError) as err:
        raise SystemExit(f"error: cannot use the training data: {err}")


def examples_digest(train, heldout) -> str:
    digest = hashlib.sha256(json.dumps([[dataclasses.astuple(p) for p in side] for side in (train, heldout)],
                                       ensure_ascii=False).encode())
    return digest.hexdigest()[:16]


def fingerprint(args, world_size: int, global_batch: int, data_key: str) -> dict:
    """What a resumed run must share with the checkpoint (compared key by key; see checkpoint.check_compatible)."""
    return {"method": args.method, "density": args.density, "k": args.k, "max_rows": args.max_rows,
            "max_cols": args.max_cols, "input_convention": args.input_convention, "block_stride": args.block_stride,
            **({"budget_axes": args.budget_axes} if args.budget_axes != "own" else {}),  # older checkpoints: own
            **({"budget_block": args.budget_block} if args.budget_block != "scored" else {}),  # ... and scored blocks
            **({"graddrop": [args.graddrop_granularity, args.graddrop_resample, args.graddrop_rescale]}
               if (args.graddrop_granularity, args.graddrop_resample, args.graddrop_rescale) != ("element", "step", False)
               else {}),  # older checkpoints: the defaults
            "calibration_steps": args.calibration_steps, "drop_prob": args.drop_prob, "lora_rank": args.lora_rank,
            "reselect_every": args.reselect_every, "reselect_fraction": args.reselect_fraction,
            "lr": args.lr if args.lr is not None else DEFAULT_LR[args.method], "seed": args.seed,
            "global_batch": global_batch, "max_length": args.max_length, "precision": args.precision,
            "load_in_8bit": args.load_in_8bit, "load_in_4bit": args.load_in_4bit, "autocast": args.autocast,
            "model_config_sha256": ckpt.file_digest(Path(args.model) / "config.json"),
            "data": data_key, "init_adapter": args.init_adapter,
            "fsdp_shard_sparse_values": args.fsdp_shard_sparse_values, "world_size": world_size,
            **({"ddp_comm_hook": args.ddp_comm_hook} if args.ddp_comm_hook != "none" else {})}


def is_collective_failure(err: BaseException) -> bool:
    text = f"{type(err).__name__} {err}".lower()
    return isinstance(err, TimeoutError) or type(err).__name__ == "DistBackendError" or any(
        w in text for w in ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "socket", "broken pipe"))


class TrainingLoop:
    """One fine-tuning run. ``args``: the namespace of ``training.cli.parse_args`` / ``options(...)``.

    ``faults``: the fault-injection hook (default: ``SG_FAULT_INJECT`` from the environment, nothing when unset).
    After ``setup()``: ``model`` (the prepared model), ``engine``, ``tokenizer``, ``train_pairs`` / ``heldout``,
    ``info`` (rank and world size), ``results`` (what ``run`` returns and writes to ``metrics.json``).
    """

    def __init__(self, args: argparse.Namespace, faults: Faults | None = None):
        self.args = args
        self.faults = faults if faults is not None else Faults()
        self.results: dict = {}
        self.losses: list[float] = []
        self.skipped: list[int] = []
        self.start_step = 0
        self.resume_dir: Path | None = None
        self.resume_manifest: dict | None = None
        rearm_sigterm()
        self.graceful = GracefulStop(enabled=bool(args.save_every))
        self._stop_requested = False
        self._is_setup = False

    # ---------------------------------------------------------------------------------------------- setup
    def setup(self) -> "TrainingLoop":
        """Everything before the first step: engine config, data, process group, the checkpoint to resume from,
        the model, the method (calibration or a saved adapter), the engine."""
        if not self._is_setup:
            self._configure()
            self._find_checkpoint()
            self._load_model()
            self._prepare_method()
            self._build_engine()
            self._is_setup = True
        return self

    def _configure(self) -> None:
        args = self.args
        torch.manual_seed(args.seed)
        from sg_distributed.integrations.accelerate import AccelerateConfigError, apply_accelerate_env

        try:  # `accelerate launch`: its DeepSpeed plugin / FSDP / mixed precision, read from the environment
            accelerate_ds = apply_accelerate_env(args)
        except AccelerateConfigError as err:
            raise SystemExit(f"error: {err}")
        self.ds_config = None
        if args.ds_config:
            from sg_distributed.integrations.deepspeed import DeepSpeedConfigError, load_ds_config, validate_ds_config

            try:
                self.ds_config = load_ds_config(args.ds_config) if accelerate_ds is None else accelerate_ds
                validate_ds_config(self.ds_config)
            except DeepSpeedConfigError as err:
                raise SystemExit(f"error: {err}")
        if args.model is None:
            from sg_distributed.data.assets import smollm2_dir

            args.model = str(smollm2_dir())  # a given --model was checked by parse_args
        if args.init_adapter and args.method not in ckpt.SPARSEGRAD_METHODS:
            raise SystemExit(f"error: --init_adapter is for the SparseGrad methods {ckpt.SPARSEGRAD_METHODS}")
        self.train_pairs, self.heldout, self.data_key = load_data(args)
        self.results["data"] = {"source": args.dataset or args.data or "fanoutqa", "train": len(self.train_pairs),
                                "heldout": len(self.heldout)}
        check_precision(args, deepspeed=self.ds_config is not None)
        self.info = init_process_group(use_deepspeed=self.ds_config is not None, timeout=args.collective_timeout)
        self.lr = args.lr if args.lr is not None else DEFAULT_LR[args.method]
        self.global_batch = args.micro_batch_size * args.grad_accum * self.info.world_size
        if len(self.train_pairs) < self.global_batch:
            raise SystemExit(f"error: the data has {len(self.train_pairs)} training pairs, fewer than one global "
                             f"batch ({self.global_batch} = micro_batch_size x grad_accum x world size)")
        self.checkpoint_dir = Path(args.checkpoint_dir or Path(args.output_dir) / "checkpoints")

    def fingerprint(self) -> dict:
        return fingerprint(self.args, self.info.world_size, self.global_batch, self.data_key)

    def _log(self, message: str) -> None:
        if self.info.is_main:
            print(message, flush=True)

    def _find_checkpoint(self) -> None:
        """--resume: the checkpoint to continue from (rank 0 looks, every rank gets its answer), checked against
        this run's options before the model loads."""
        args = self.args
        if not args.resume:
            return
        found = None
        if self.info.is_main:
            try:
                path = ckpt.resolve_resume(args.resume, self.checkpoint_dir, log=self._log)
                found = ("ok", str(path) if path else None)
            except ckpt.CheckpointError as err:
                found = ("error", str(err))
        found = ckpt._broadcast(found)
        if found[0] == "error":
            raise SystemExit(f"error: cannot resume: {found[1]}")
        if found[1] is None:
            self._log(f"resume: no complete checkpoint in {self.checkpoint_dir}; starting from scratch")
            return
        self.resume_dir = Path(found[1])
        self.resume_manifest = json.loads((self.resume_dir / ckpt.MANIFEST).read_text())
        try:  # checked again against the engine's own backend once it exists
            ckpt.check_compatible(self.resume_manifest, self.fingerprint(),
                                  ckpt.planned_backend(self.ds_config, args.fsdp, self.info.world_size),
                                  self.resume_dir)
        except ckpt.CheckpointError as err:
            raise SystemExit(f"error: {err}")
        self._log(f"resume: from {self.resume_dir} (step {self.resume_manifest['step']})")

    def _load_model(self) -> None:
        args, info = self.args, self.info
        try:
            self.base_model, self.tokenizer = load_model_and_tokenizer(args.model, args.load_in_8bit,
                                                                       args.load_in_4bit, DTYPES[args.precision],
                                                                       fsdp=args.fsdp)
        except (OSError, ValueError) as err:
            raise SystemExit(f"error: cannot load the model from {args.model}: {err}")
        if args.gradient_checkpointing:
            enable_gradient_checkpointing(self.base_model, args.gradient_checkpointing)
        heldout = self.heldout[: args.eval_size] if args.eval_size else self.heldout
        self.heldout = heldout[: len(heldout) - len(heldout) % info.world_size]  # equal shares per rank
        # tokenised once through datasets.map (cached in the output folder), padded per micro-batch
        self.train_tokens = tokenize_examples(self.train_pairs, self.tokenizer, args.max_length,
                                              cache_dir=Path(args.output_dir) / "cache" / "tokens")
        self.collate = TokenizedCollator(self.tokenizer)
        self.device = (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                       else torch.device("cpu"))
        self.results = {"method": args.method, "world_size": info.world_size, "deepspeed": args.ds_config,
                        "fsdp": args.fsdp, **self.results,
                        "quantized_base_digest_before": quantized_weights_digest(self.base_model),
                        "quantized_base_bytes": quantized_storage_bytes(self.base_model)}
        if not args.no_eval_before and self.resume_dir is None:
            self.results["before"] = evaluate_held_out(self.base_model, self.tokenizer, self.heldout, info,
                                                       args.max_length, "before")

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        # a blocking host-to-device copy from pageable memory waits for the GPU's queue (cudaStreamSynchronize):
        # stage through pinned memory and copy asynchronously (the pinned block is held until the copy is done)
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)

    def micro_batches(self, step: int) -> list[dict]:
        """This rank's micro-batches of global batch ``step``, on the device (a pure function of seed and step)."""
        indices = global_batch_indices(len(self.train_pairs), step, self.global_batch, self.args.seed)  # host only
        return [{k: self._to_device(v) for k, v in self.collate(self.train_tokens[list(chunk)]).items()}
                for chunk in rank_micro_batches(indices, self.info, self.args.micro_batch_size)]

    def _prepare_method(self) -> None:
        args, results = self.args, self.results
        config = SparseGradConfig(density=args.density, k=args.k, max_rows=args.max_rows or None,
                                  max_cols=args.max_cols or None, budget_axes=args.budget_axes,
                                  budget_block=args.budget_block, input_convention=args.input_convention,
                                  block_stride=args.block_stride, calibration_steps=args.calibration_steps,
                                  reselect_every=args.reselect_every if args.method == "sparsegrad" else 0,
                                  reselect_fraction=args.reselect_fraction)
        t0 = time.perf_counter()
        adapter = (self.resume_dir / "adapter" if self.resume_dir is not None
                   and args.method in ckpt.SPARSEGRAD_METHODS else args.init_adapter)
        if adapter is not None:  # resume / warm start: bases and supports come from the adapter, no calibration
            try:
                prepared = ckpt.prepared_from_adapter(args.method, self.base_model, adapter)
            except (ValueError, FileNotFoundError, KeyError) as err:
                raise SystemExit(f"error: the adapter {adapter} does not fit this run (model {args.model}): {err}")
            expected = {"sparsegrad": "fixed", "sparsegrad_reference": "reference"}.get(args.method, "dynamic")
            saved_mode = sparsegrad_config(prepared.model).support_mode
            if saved_mode != expected:
                raise SystemExit(f"error: the adapter {adapter} has support_mode {saved_mode!r}, --method "
                                 f"{args.method} needs {expected!r}")
        else:
            # Calibration reads this rank's micro-batches of the first global batches; Grams and scores are
            # summed over ranks, so any world size sees the same calibration data and gets the same supports.
            calibration = ([b for s in range(args.calibration_steps) for b in self.micro_batches(s)]
                           if args.method in ckpt.SPARSEGRAD_METHODS else None)
            config.calibration_steps = len(calibration) if calibration else config.calibration_steps
            prepared = prepare(args.method, self.base_model, config, calibration_batches=calibration,
                               graddrop=GradDropConfig(drop_prob=args.drop_prob, seed=args.seed,
                                                       granularity=args.graddrop_granularity,
                                                       resample=args.graddrop_resample,
                                                       rescale=args.graddrop_rescale),
                               lora_rank=args.lora_rank, show_progress=self.info.is_main,
                               seed=args.seed)
        results["calibration_s"] = time.perf_counter() - t0
        self.prepared, self.model = prepared, prepared.model
        if hasattr(self.model, "support_checksum"):
            results["support_checksum"] = self.model.support_checksum()
            results["structure_checksum"] = ckpt.structure_checksum(self.model)
            assert_same_on_all_ranks(results["structure_checksum"], "SparseGrad bases/supports")
            saved = (self.resume_manifest or {}).get("structure_checksum")
            if saved is not None and saved != results["structure_checksum"]:
                raise SystemExit(f"error: the supports/bases rebuilt from {self.resume_dir} (checksum "
                                 f"{results['structure_checksum'][:12]}) differ from those recorded at save time "
                                 f"({saved[:12]}); refusing to resume")
        trainable = prepared.trainable_count()
        total = sum(p.numel() for p in self.model.parameters())
        self._log(f"method {args.method}: trainable params {trainable:,d} of {total:,d} "
                  f"({100 * trainable / total:.3f}%), lr {self.lr}, world size {self.info.world_size}, "
                  f"global batch {self.global_batch}")

    def _build_engine(self) -> None:
        args = self.args
        resolved = None
        if self.ds_config is not None:
            from sg_distributed.integrations.deepspeed import resolve_auto

            resolved = resolve_auto(self.ds_config, world_size=self.info.world_size,
                                    micro_batch_size=args.micro_batch_size, gradient_accumulation_steps=args.grad_accum,
                                    max_grad_norm=args.max_grad_norm, hidden_size=self.base_model.config.hidden_size,
                                    precision=args.precision,
                                    model=self.model)  # ZeRO-3: k-vectors persistent (no per-layer gathers)
            self._log("resolved DeepSpeed config: " + json.dumps(resolved, sort_keys=True))
        self.zero3 = bool(resolved) and resolved.get("zero_optimization", {}).get("stage") == 3
        if args.fsdp and (self.ds_config is not None or args.method not in ("sparsegrad", "lora", "full", "graddrop")):
            raise SystemExit("error: --fsdp runs --method sparsegrad, lora, full or graddrop without --ds_config (the "
                             "other methods keep per-step state on parameter objects or gradient hooks, which FSDP2 "
                             "replaces)")
        if args.fsdp and args.method == "graddrop" and self.info.world_size < 2:
            raise SystemExit("error: --method graddrop --fsdp needs 2 or more ranks: GradDrop masks inside FSDP2's "
                             "reduce-scatter, which FSDP2 skips on one rank (run one rank without --fsdp)")
        if args.reselect_every and args.fsdp_shard_sparse_values:
            raise SystemExit("error: --reselect_every with --fsdp_shard_sparse_values: the k-vectors would be "
                             "DTensor shards (not supported yet); keep them replicated (the --fsdp default) or use "
                             "--ds_config")
        if resolved and args.method == "sparsegrad_reference":
            raise SystemExit("error: --method sparsegrad_reference keeps per-step selection masks on parameter "
                             "objects, which ZeRO replaces by flat partitions; use --method sparsegrad_dynamic (same "
                             "algorithm, data-parallel exchange) or --method sparsegrad (fixed support) under "
                             "DeepSpeed")
        self.counter = CommCounter()
        kept = self._kept_exchange(resolved)
        bf16 = "bf16" in (args.precision, args.autocast)
        fsdp = {"shard_sparse_values": args.fsdp_shard_sparse_values, "param_dtype": torch.bfloat16 if bf16 else None}
        self.engine = Engine(self.model, self.prepared.make_optimizer(self.lr), args.grad_accum, resolved,
                             max_grad_norm=args.max_grad_norm, comm_counter=self.counter,
                             fsdp=fsdp if args.fsdp else False,
                             autocast=DTYPES[args.autocast] if args.autocast else None,
                             loss_scaling="fp16" in (args.precision, args.autocast), kept_exchange=kept,
                             kept_compact=args.graddrop_exchange != "dense", ddp_comm_hook=args.ddp_comm_hook)
        self.backend = ckpt.backend_name(self.engine)
        # what each rank holds of the frozen bnb weights once the engine is built (FSDP2 shards a bf16-stored nf4 base)
        self.results["quantized_base_bytes_per_rank"] = quantized_storage_bytes(self.base_model)
        info = self.prepared.info
        self.sparse_optimizer = info.get("sparse", {}).get("optimizer")  # SparseStateAdam (dynamic mode)
        self.controller = info.get("controller")  # GradDrop masks
        self.reselector = info.get("reselector")  # drop-and-grow schedule and growth scores

    def _kept_exchange(self, resolved: dict | None):
        """GradDrop's kept-only exchange where the engine has it (DDP, ZeRO-2, FSDP2), per ``--graddrop_exchange``;
        under FSDP2 also where GradDrop masks, whichever exchange."""
        args = self.args
        controller = self.prepared.info.get("controller")
        if controller is None or self.info.world_size == 1:
            return None
        from sg_distributed.graddrop.exchange import KeptEntries

        if args.fsdp:  # FSDP2 replaces the hooked parameters: GradDrop masks in its reduce-scatter, either way
            self._log(f"GradDrop exchange: {'dense' if args.graddrop_exchange == 'dense' else 'kept entries only'} "
                      "(masked in FSDP2's reduce-scatter)")
            return KeptEntries(controller)
        if args.graddrop_exchange == "dense":
            return None
        stage = resolved.get("zero_optimization", {}).get("stage") if resolved is not None else None
        if resolved is not None and stage != 2:
            if args.graddrop_exchange == "kept":
                raise SystemExit(f"error: --graddrop_exchange kept runs under DDP or DeepSpeed ZeRO stage 2; this "
                                 f"DeepSpeed config has stage {stage} (use --graddrop_exchange dense or auto)")
            self._log(f"GradDrop exchange: dense (ZeRO stage {stage} reduces its own flat partitions)")
            return None
        self._log("GradDrop exchange: kept entries only" + (" (ZeRO-2 with reduce_scatter false)" if resolved else ""))
        return KeptEntries(controller)

    def full_params(self) -> contextlib.ExitStack:
        """Trainable parameters whole on every rank (a collective under ZeRO-3 / sharded FSDP2)."""
        stack = contextlib.ExitStack()
        if self.engine.deepspeed and self.args.precision != "fp32":  # the fp32 masters, not the bf16/fp16 copies
            from sg_distributed.integrations.deepspeed import fp32_master_params

            stack.enter_context(fp32_master_params(self.prepared.trainable_parameters()))
        else:
            stack.enter_context(gathered(self.prepared.trainable_parameters(), self.zero3))
        if self.args.fsdp:
            from sg_distributed.integrations.fsdp import gathered_full_params

            stack.enter_context(gathered_full_params(self.model))
        return stack

    # --------------------------------------------------------------------------------------------- resume
    def resume(self) -> int:
        """Load the checkpoint found by ``setup`` (if any); returns the step to start from."""
        self.setup()
        if self.resume_dir is None or self.start_step:
            return self.start_step
        resume_dir, manifest, info = self.resume_dir, self.resume_manifest, self.info
        try:
            ckpt.check_compatible(manifest, self.fingerprint(), self.backend, resume_dir)
        except ckpt.CheckpointError as err:
            raise SystemExit(f"error: {err}")
        same_world = manifest["world_size"] == info.world_size
        if ckpt.uses_engine_state(manifest, self.backend, info.world_size):  # same engine and ranks: exact
            ckpt.load_engine_state(resume_dir, self.engine, self.args.method)
        else:  # another world size (or ZeRO stage): the world-size-independent trainable_state.pt
            self._log(f"resume: resharding from {manifest['world_size']} ranks ({manifest['backend']}) to "
                      f"{info.world_size} ({self.backend}) through {ckpt.TRAINABLE_STATE}")
            try:
                ckpt.load_trainable_state(resume_dir, self.engine)
            except ckpt.CheckpointError as err:
                raise SystemExit(f"error: cannot resume from {resume_dir}: {err}")
        trainer_state = json.loads((resume_dir / ckpt.TRAINER_STATE).read_text())
        self.losses, self.skipped = trainer_state["losses"], trainer_state["skipped_steps"]
        self.results.update({k: v for k, v in trainer_state.get("results", {}).items() if k not in self.results})
        # resharded resume: new ranks take rank 0's RNG, GradDrop and SparseStateAdam state (the latter two are
        # identical on every rank); the byte counters restart (they are per world size)
        rank_state = ckpt.load_rank_state(resume_dir, info.rank if same_world else 0)
        if same_world:
            ckpt.load_counter_state(self.counter, rank_state["comm"])
        elif ckpt.uses_engine_state(manifest, self.backend, info.world_size):
            self._log(f"resume: resharding from {manifest['world_size']} to {info.world_size} ranks")
        if self.controller is not None:
            self.controller.load_state_dict(rank_state["graddrop"])
        if self.sparse_optimizer is not None:
            self.sparse_optimizer.load_state_dict(rank_state["sparse_adam"])
        if self.reselector is not None:  # schedule + growth scores; resharded: rank 0 takes every old rank's scores
            self.reselector.load_state_dict(rank_state["reselect"], scores=same_world)
            if not same_world and info.is_main:
                for old_rank in range(manifest["world_size"]):
                    self.reselector.add_scores(ckpt.load_rank_state(resume_dir, old_rank)["reselect"])
        ckpt.set_rng_state(rank_state["rng"])  # last: nothing between here and the loop draws random numbers
        self.results["resumed_from"] = str(resume_dir)
        self.start_step = manifest["step"]
        return self.start_step

    # ----------------------------------------------------------------------------------------------- save
    def save(self, step: int) -> Path:
        """Checkpoint ``step`` (= optimizer steps done = next step to run) from every rank, atomically."""
        def parts(tmp: Path) -> None:
            ckpt.write_engine_state(tmp, self.engine, self.prepared, self.args.method, self.full_params)
            ckpt.save_rank_state(tmp, self.info.rank, {
                "rng": ckpt.rng_state(), "comm": ckpt.counter_state(self.counter),
                "graddrop": self.controller.state_dict() if self.controller is not None else None,
                "sparse_adam": self.sparse_optimizer.state_dict() if self.sparse_optimizer is not None else None,
                "reselect": self.reselector.state_dict() if self.reselector is not None else None})

        def crash(tmp: Path) -> None:  # SG_FAULT_INJECT=crash_in_save_at_step_N: die with a half-written step_N.tmp
            self.faults.during_save(step)

        extra = {"backend": self.backend, "world_size": self.info.world_size, "fingerprint": self.fingerprint(),
                 # now, not at calibration: re-selection changes the supports
                 "structure_checksum": (ckpt.structure_checksum(self.model)
                                        if "structure_checksum" in self.results else None)}
        state = {"losses": self.losses, "skipped_steps": self.skipped,
                 "results": {k: self.results[k] for k in ("before", "quantized_base_digest_before")
                             if k in self.results}}
        with self.counter.paused():
            path = ckpt.save_checkpoint(self.checkpoint_dir, step, parts, extra, state,
                                        keep=self.args.keep_checkpoints, fault_hook=crash)
        self._log(f"checkpoint: saved {path}")
        return path

    # ----------------------------------------------------------------------------------------- train step
    def _agree_on_step(self, nonfinite: list[torch.Tensor], loss_sum: torch.Tensor) -> tuple[list[int], float]:
        """The optimizer step's one collective and one host read: which micro-batches had a non-finite loss on
        any rank, and the step's loss (mean over micro-batches and ranks).

        ``nonfinite``: one 0-dim flag per micro-batch of this rank; ``loss_sum``: this rank's mean micro-batch
        loss. The same collective carries whether a rank caught SIGTERM / SIGINT. Everything stays on the device
        until the single ``tolist`` below (on a GPU each ``.item()`` or ``bool(t)`` waits for the GPU to catch
        up). Every rank gets the same answer, so every rank skips or stops on the same steps (their collectives
        must match)."""
        stop_flag = torch.tensor(float(self.graceful.requested is not None), device=loss_sum.device)
        stats = torch.stack([flag.float() for flag in nonfinite] + [loss_sum.float(), stop_flag])
        if self.info.world_size > 1:
            with self.counter.paused():  # bookkeeping, not training traffic
                in_place_collective(stats, torch.distributed.all_reduce)
        *flags, total, stops = stats.tolist()
        self._stop_requested = stops > 0  # a signal on any rank stops every rank after this step
        return [i for i, flag in enumerate(flags) if flag > 0], total / self.info.world_size

    def _growth_scores(self) -> list[torch.Tensor]:
        return [layer.structure.score for layer in self.reselector.layers.values()] if self.reselector else []

    def train_step(self, step: int) -> float | None:
        """Optimizer step ``step`` (0-based) over its global batch: the step's loss (mean over micro-batches and
        ranks), or None when a non-finite loss on any rank skipped it (no update; ``Stop`` past
        ``--max_skipped_steps``)."""
        args, engine, counter = self.args, self.engine, self.counter
        self.faults.at_step_start(step, self.info.rank)
        if not engine.wrapped.training:  # from_pretrained and evaluation leave eval mode; dropout needs train
            engine.wrapped.train()
        if step == 1:
            counter.reset()  # the first step carries one-off set-up traffic
        if self.controller is not None:  # GradDrop --graddrop_resample epoch: the data's epoch of this step
            self.controller.set_epoch(epoch_and_offset(len(self.train_pairs), step, self.global_batch)[0])
        # A step's non-finite check is decided after its last forward, before that micro-batch's backward
        # (and, under DeepSpeed, before the engine.step() that applies the update): one collective and
        # one host read per optimizer step. Earlier micro-batches of the step have already run backward.
        scores = [t.clone() for t in self._growth_scores()] if args.grad_accum > 1 else []  # device copies
        batches = self.micro_batches(step)
        nonfinite, loss_sum, bad = [], None, []
        for i, batch in enumerate(batches):
            with counter.label("forward"):
                loss = self.faults.loss(step, engine.forward(batch))
            value = loss.detach().float()
            nonfinite.append(~torch.isfinite(value))
            loss_sum = value / len(batches) if loss_sum is None else loss_sum + value / len(batches)
            if i == len(batches) - 1:
                bad, step_loss = self._agree_on_step(nonfinite, loss_sum)
                if bad:
                    break
            with counter.label("backward"):
                engine.backward(loss)
            with counter.label("step"):
                engine.micro_step()
        if not bad:
            with counter.label("step"):
                engine.step()
                self.prepared.after_step()
            self.losses.append(step_loss)
            return step_loss
        # skip the whole step: no update, its batch is dropped
        if engine.deepspeed and len(batches) > 1:
            path = self.save(step)  # DeepSpeed holds this step's partial gradients: redo the step on resume
            raise Stop(f"error: non-finite loss at step {step}, micro-batch {bad[0]}: DeepSpeed cannot drop a partly "
                       f"accumulated step (--grad_accum {args.grad_accum}); checkpoint {path} (resume redoes step "
                       f"{step})", ckpt.EXIT_NONFINITE)
        if engine.fsdp and len(batches) > 1:
            # FSDP2 holds the earlier micro-batches' unsharded gradients until a synced backward:
            # run the last one (every rank does) so that they land in .grad, then drop them
            with counter.paused():
                engine.backward(loss)
        for score, saved in zip(self._growth_scores(), scores):
            score.copy_(saved)  # the skipped step's backward passes must not count for re-selection
        engine.discard_gradients()
        if self.sparse_optimizer is not None:
            self.sparse_optimizer.zero_grad()
        if args.method == "sparsegrad_reference":
            self.prepared.after_step()  # clears the selection masks only
        self.skipped.append(step)
        self._log(f"warning: non-finite loss at step {step}: step skipped ({len(self.skipped)} of at most "
                  f"{args.max_skipped_steps})")
        if len(self.skipped) > args.max_skipped_steps:
            path = self.save(step + 1)
            raise Stop(f"error: {len(self.skipped)} steps with a non-finite loss (steps {self.skipped}), more than "
                       f"--max_skipped_steps {args.max_skipped_steps}; stopped with checkpoint {path} (the last good "
                       f"state)", ckpt.EXIT_NONFINITE)
        return None

    # ------------------------------------------------------------------------------------------- evaluate
    def evaluate(self, label: str = "after") -> dict:
        """Held-out answer loss, answer-token accuracy, exact match and F1 over every rank's share."""
        self.results[label] = evaluate_held_out(self.model, self.tokenizer, self.heldout, self.info,
                                                self.args.max_length, label, zero3=self.zero3 or self.args.fsdp)
        return self.results[label]

    # ------------------------------------------------------------------------------------------------ run
    def run(self) -> dict:
        """The whole run: setup, resume, the steps (checkpoints every --save_every, a clean stop on SIGTERM /
        SIGINT), held-out evaluation, the adapter and ``metrics.json``. Returns the results."""
        args, info = self.args, self.setup().info
        start = self.resume()
        t0 = time.perf_counter()
        bar = tqdm(range(start, args.steps), desc=f"train {args.method}", disable=not info.is_main,
                   initial=start, total=args.steps)
        run_config = {k: v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
                      for k, v in vars(args).items()}
        self.metrics_log = MetricsLog(Path(args.output_dir) / "metrics.jsonl", args.log_every, enabled=info.is_main,
                                      start_step=start, report_to=args.report_to, run_config=run_config)
        with self.metrics_log:
            if start == 0 and "before" in self.results:
                self.metrics_log.log_eval(0, self.results["before"])
            self._train(start, bar)
            self.results["train_s"] = time.perf_counter() - t0
            return self._finish()

    def _train(self, start: int, bar) -> None:
        args, info = self.args, self.info
        try:
            with self.counter, self.graceful:
                for step in bar:
                    loss = self.train_step(step)
                    if loss is not None:
                        bar.set_postfix(loss=f"{loss:.3f}")
                        self.metrics_log.log(step + 1, loss, self.lr, len(self.skipped))
                    saved = self.save(step + 1) if args.save_every and (step + 1) % args.save_every == 0 else None
                    if self._stop_requested:
                        path = saved or self.save(step + 1)
                        raise Stop(f"stopped by {self.graceful.name} after step {step + 1} of {args.steps}: checkpoint "
                                   f"{path}; continue with --resume auto", self.graceful.exit_code)
        except Stop:
            raise
        except (RuntimeError, TimeoutError) as err:  # a dead or hung peer surfaces as a failed collective
            if info.world_size > 1 and is_collective_failure(err):
                raise Stop(f"error: rank {info.rank}: a collective failed or timed out (--collective_timeout "
                           f"{args.collective_timeout:g}s); another rank probably died. Restart with --resume auto "
                           f"to continue from the last checkpoint. Cause: {type(err).__name__}: {str(err)[:300]}",
                           ckpt.EXIT_COLLECTIVE) from err
            raise

    def _finish(self) -> dict:
        """Byte counts, held-out evaluation, the adapter and metrics.json after the last step."""
        args, info, results, collate = self.args, self.info, self.results, self.collate
        results["skipped_steps"] = self.skipped
        results["truncated"] = {"prompts": collate.num_truncated_prompts, "answers": collate.num_truncated_answers}
        if collate.num_truncated_prompts or collate.num_truncated_answers:
            self._log(f"note: {collate.num_truncated_prompts} prompts and {collate.num_truncated_answers} answers "
                      f"were truncated to --max_length {args.max_length} on rank 0")
        if args.steps > 1:
            per_step = self.counter.per_step(args.steps - 1)
            results["comm_bytes_per_step"] = {"payload": per_step.total().payload, "wire": per_step.total().wire,
                                              "by_label": {k: v.payload for k, v in per_step.by_label().items()},
                                              "by_op": {k: v.payload for k, v in per_step.by_op().items()}}
            if info.world_size > 1:
                self._log(f"bytes per step on rank 0 (steps 2..{args.steps}):\n"
                          + self.counter.table(args.steps - 1, by="label"))
        losses = self.losses
        results["train_loss_first_last"] = [losses[0], sum(losses[-5:]) / len(losses[-5:])] if losses else None
        self.metrics_log.log_eval(args.steps, self.evaluate("after"))
        base_params = [p for p in self.base_model.parameters() if not p.dtype.is_floating_point]
        with gathered(base_params, self.zero3):
            results["quantized_base_digest_after"] = quantized_weights_digest(self.base_model)
        out = Path(args.output_dir)
        with self.full_params():  # a collective under ZeRO-3 / sharded FSDP2: all ranks enter
            if info.is_main:
                out.mkdir(parents=True, exist_ok=True)
                if args.method not in ("full", "graddrop"):  # dense methods would save the whole model
                    ckpt.save_adapter(self.model, out / "adapter")
        if info.is_main:
            (out / "metrics.json").write_text(json.dumps(results, indent=2, default=str))
            first_last = results["train_loss_first_last"] or [math.nan, math.nan]
            print(f"train loss {first_last[0]:.3f} -> {first_last[1]:.3f} in {results.get('train_s', 0):.1f}s "
                  f"(calibration {results['calibration_s']:.1f}s); adapter and metrics in {out}", flush=True)
            print(summary(results, args.steps), flush=True)
        barrier()
        return results
