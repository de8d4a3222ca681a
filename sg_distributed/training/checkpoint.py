"""Resumable training checkpoints for launch/train_qa.py: atomic, checksummed, guarded.

Layout of one checkpoint (``<checkpoint_dir>/step_N``, N = optimizer steps completed = the next step to run;
the data order is a pure function of (step, seed), so N is the whole data position)::

    step_N/
      manifest.json        written last, by rank 0: sha256 + size of every other file, the step, the run's
                           fingerprint (what must not change on resume), the backend and the world size
      trainer_state.json   losses so far, skipped (non-finite) steps
      adapter/             SparseGrad family: the adapter (peft's save_pretrained: k-values, supports, bases;
                           reference / dynamic mode: SparseGradModel.save_pretrained)
      trainable_state.pt   every backend, written by rank 0 after gathering (sg_distributed.training.trainable_state):
                           every trainable parameter by name (fp32; DeepSpeed: the fp32 master), its optimizer
                           state (Adam(W) exp_avg / exp_avg_sq and step count), DeepSpeed's step counters,
                           LR scheduler and fp16 loss scaler. World-size independent: what a resume on a
                           different number of ranks loads instead of the engine-specific state below
      trainable.pt         single process / DDP: every trainable parameter by name (incl. norms trained in
                           reference / dynamic mode, which the adapter does not hold)
      optimizer.pt         single process / DDP: the optimizer state dict
      engine/              DeepSpeed: engine.save_checkpoint (ZeRO partitions, fp32 master, optimizer,
                           LR scheduler, DeepSpeed's step counters); frozen weights excluded
      dcp/                 FSDP2: torch.distributed.checkpoint of get_state_dict(model, optimizer), trainable only
      rank_R.pt            per rank: RNG states (torch, cuda, python, numpy), comm counters,
                           GradDrop controller, SparseStateAdam (dynamic mode), re-selection scores

Resume (``launch/train_qa.py --resume``): the same backend at the same world size loads the engine-specific
state (bit-identical continuation). A different world size (or another ZeRO stage) loads
``trainable_state.pt`` into the freshly built engine instead; the global batch must stay the same (it is in
the fingerprint: 2 ranks x --grad_accum 1 -> 1 rank x --grad_accum 2) and so must the kind of engine
(DeepSpeed -> DeepSpeed, FSDP2 -> FSDP2, one process / DDP -> one process / DDP). Every new rank takes old
rank 0's per-rank state (RNG, GradDrop, SparseStateAdam; its re-selection schedule, with every old rank's
growth scores summed onto new rank 0). Checkpoints written before ``trainable_state.pt`` existed reshard
under FSDP2 (DCP) and one process / DDP only.

Atomicity for many writers: rank 0 creates ``step_N.tmp``; every rank writes its part; barrier; rank 0
writes the manifest (after fsync of every file) and renames ``step_N.tmp`` -> ``step_N`` in one
``os.replace``. A crash at any point leaves either no ``step_N`` or a complete one; ``*.tmp`` leftovers
are ignored (and removed by the next save of that step). ``find_latest`` takes the newest directory
whose manifest exists and whose checksums verify, and says which ones it skipped and why. The directory
must be on a file system every rank sees (one node, or a shared file system across nodes).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from sg_distributed.io import tensor_bytes
from sg_distributed.distributed.process_group import is_distributed

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
TRAINABLE_STATE = "trainable_state.pt"  # = trainable_state.FILENAME
FORMAT = "sg_distributed.checkpoint/1"  # a file-format name, kept when the module moved

# Exit codes of launch/train_qa.py (see README "Faults and bad input").
EXIT_ERROR = 1  # bad input / configuration / refused resume: fix the input, do not retry as is
EXIT_NONFINITE = 3  # more than --max_skipped_steps non-finite losses: a checkpoint of the last good state was saved
EXIT_COLLECTIVE = 4  # a collective failed or timed out (a peer rank died): retry with --resume auto

SPARSEGRAD_METHODS = ("sparsegrad", "sparsegrad_reference", "sparsegrad_dynamic", "meprop")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (incomplete, corrupt, or written by a different configuration)."""


# ------------------------------------------------------------------------------------------- helpers


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _broadcast(obj: Any) -> Any:
    """Rank 0's value on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def step_of(path: Path) -> int | None:
    name = path.name
    if not name.startswith("step_") or name.endswith(".tmp"):
        return None
    try:
        return int(name[len("step_"):])
    except ValueError:
        return None


def _tmp_step(path: Path) -> int | None:
    try:
        return int(path.name[len("step_"):-len(".tmp")]) if path.name.startswith("step_") else None
    except ValueError:
        return None


def checkpoint_path(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step}"


# ------------------------------------------------------------------------------------- verification


def verify(path: str | Path) -> dict:
    """The manifest of a complete, intact checkpoint; CheckpointError saying what is wrong otherwise."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory")
    if not manifest_path.exists():
        raise CheckpointError(f"{path} has no {MANIFEST} (incomplete: the save did not finish)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{manifest_path} is not valid JSON ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{manifest_path}: unknown format {manifest.get('format')!r}, expected {FORMAT!r}")
    for rel, entry in manifest["files"].items():
        f = path / rel
        if not f.exists():
            raise CheckpointError(f"{path}: file {rel} listed in the manifest is missing")
        if f.stat().st_size != entry["size"]:
            raise CheckpointError(f"{path}: file {rel} has {f.stat().st_size} bytes, the manifest says {entry['size']}")
        if sha256_file(f) != entry["sha256"]:
            raise CheckpointError(f"{path}: sha256 of {rel} does not match the manifest (corrupt)")
    return manifest


def find_latest(root: str | Path, log=print) -> Path | None:
    """The newest complete checkpoint under ``root`` (manifest present, checksums valid), or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    candidates = sorted((p for p in root.iterdir() if step_of(p) is not None), key=step_of, reverse=True)
    for path in candidates:
        try:
            verify(path)
            return path
        except CheckpointError as exc:
            log(f"checkpoint: skipping {path.name}: {exc}")
    return None


def resolve_resume(resume: str, root: str | Path, log=print) -> Path | None:
    """``--resume auto`` -> newest complete checkpoint under ``root`` (None if there is none);
    ``--resume PATH`` -> PATH (a ``step_N`` directory, or a checkpoint root: its newest), verified."""
    if resume == "auto":
        return find_latest(root, log)
    path = Path(resume)
    if step_of(path) is None and path.is_dir() and not (path / MANIFEST).exists():
        latest = find_latest(path, log)
        if latest is None:
            raise CheckpointError(f"--resume {resume}: no complete checkpoint (step_N with a valid manifest) in it")
        return latest
    verify(path)
    return path


# ---------------------------------------------------------------------------------------- fingerprint


def file_digest(path: str | Path | None) -> str | None:
    if path is None:
        return None
    path = Path(path)
    return sha256_file(path)[:16] if path.is_file() else None


def compare_fingerprints(saved: dict, current: dict, reshardable: bool) -> list[str]:
    """Human-readable differences that forbid resuming (empty list: compatible)."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        if key == "world_size" and reshardable:
            continue
        if saved.get(key) != current.get(key):
            diffs.append(f"{key}: checkpoint {saved.get(key)!r}, now {current.get(key)!r}")
    return diffs


def backend_kind(backend: str | None) -> str:
    """The kind of engine a backend name belongs to: a checkpoint resumes only under the same kind."""
    if backend is None:
        return "unknown"
    if backend.startswith("deepspeed"):
        return "DeepSpeed"
    if backend == "fsdp2":
        return "FSDP2"
    return "one process / DDP"  # single, ddp: replicated state


def planned_backend(ds_config: dict | None, fsdp: bool, world_size: int) -> str:
    """``backend_name`` of the engine a run will build, known before the model loads."""
    if ds_config is not None:
        stage = (ds_config.get("zero_optimization") or {}).get("stage", 0)
        return f"deepspeed_zero{stage}"
    if fsdp:
        return "fsdp2"
    return "ddp" if world_size > 1 else "single"


def reshardable(manifest: dict) -> bool:
    """The checkpoint can resume on another number of ranks: it holds ``trainable_state.pt`` (or, written
    before that file existed, by FSDP2 / one process / DDP, whose own state reshards)."""
    from sg_distributed.training.trainable_state import FILENAME

    return FILENAME in manifest.get("files", {}) or manifest.get("backend") in ("fsdp2", "single", "ddp")


def uses_engine_state(manifest: dict, backend: str, world_size: int) -> bool:
    """Resume from the engine-specific state (same backend, same world size: bit-identical), or else from
    ``trainable_state.pt``. Older checkpoints without that file keep the engine state (FSDP2's DCP and
    single/DDP's files reshard)."""
    from sg_distributed.training.trainable_state import FILENAME

    same = manifest.get("backend") == backend and manifest.get("world_size") == world_size
    return same or FILENAME not in manifest.get("files", {})


def check_compatible(manifest: dict, current: dict, backend: str, path: Path) -> None:
    """Refuse a resume whose configuration differs from the checkpoint's (naming every difference)."""
    saved_backend = manifest.get("backend")
    if backend_kind(saved_backend) != backend_kind(backend):
        raise CheckpointError(
            f"checkpoint {path} was written by backend {saved_backend!r} ({backend_kind(saved_backend)}), this run "
            f"uses {backend!r} ({backend_kind(backend)}); resume under the same kind of engine ({backend_kind(saved_backend)}; "
            f"the world size may change, DeepSpeed -> DeepSpeed, FSDP2 -> FSDP2, one process / DDP -> one process / DDP)")
    if saved_backend != backend and not reshardable(manifest):
        raise CheckpointError(f"checkpoint {path} was written by backend {saved_backend!r}, this run uses "
                              f"{backend!r}, and it has no world-size-independent state: resume with {saved_backend!r}")
    can_reshard = reshardable(manifest)
    diffs = compare_fingerprints(manifest.get("fingerprint", {}), current, can_reshard)
    if diffs:
        extra = ("" if can_reshard or not any(d.startswith("world_size") for d in diffs) else
                 f"\n(the {backend} checkpoint holds per-rank ZeRO partitions and predates the world-size-"
                 "independent trainable_state.pt: resume with the same number of ranks)")
        raise CheckpointError(f"checkpoint {path} was written with a different configuration; refusing to resume:\n  - "
                              + "\n  - ".join(diffs) + extra)


# ---------------------------------------------------------------------------------------------- saving


def save_checkpoint(root: str | Path, step: int, write_parts, manifest_extra: dict, trainer_state: dict,
                    keep: int = 2, fault_hook=None) -> Path:
    """Write checkpoint ``step`` atomically from every rank (a collective: all ranks must call it).

    ``write_parts(tmp_dir)`` runs on every rank (it may issue collectives: DeepSpeed, DCP).
    Rank 0 writes trainer_state.json and the manifest, then renames ``step_N.tmp`` -> ``step_N``.
    ``keep``: complete checkpoints kept (older ones are deleted after the new one is in place; 0 = all).
    """
    root = Path(root)
    final = checkpoint_path(root, step)
    tmp = root / f"step_{step}.tmp"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    write_parts(tmp)
    if fault_hook is not None:
        fault_hook(tmp)
    _barrier()
    if _rank() == 0:
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))
        files = {}
        for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            files[str(f.relative_to(tmp))] = {"sha256": sha256_file(f), "size": f.stat().st_size}
        manifest = {"format": FORMAT, "step": step, "files": files, **manifest_extra}
        manifest_tmp = tmp / (MANIFEST + ".part")
        manifest_tmp.write_text(json.dumps(manifest, indent=2))
        with open(manifest_tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(manifest_tmp, tmp / MANIFEST)
        _fsync_dir(tmp)
        old = None
        if final.exists():  # re-saving a step (after a resume): keep the old one until the new one is in place
            old = root / f"step_{step}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        if keep:  # older complete checkpoints beyond `keep`, and incomplete leftovers older than the new one
            complete = sorted((p for p in root.iterdir() if step_of(p) is not None and (p / MANIFEST).exists()),
                              key=step_of)
            kept = complete[-keep:]
            for p in root.iterdir():
                n = step_of(p) if not p.name.endswith(".tmp") else _tmp_step(p)
                if n is not None and p not in kept and n < step:
                    shutil.rmtree(p, ignore_errors=True)
    _barrier()
    return final


# ------------------------------------------------------------------------------------------- per rank


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def counter_state(counter) -> dict:
    """A CommCounter's totals as plain data ({(label, op): (calls, payload, wire)})."""
    return {key: (s.calls, s.payload, s.wire) for key, s in counter.snapshot().stats.items()}


def load_counter_state(counter, state: dict) -> None:
    from sg_distributed.distributed.comm import OpStats

    with counter._lock:
        counter._stats.clear()
        for key, (calls, payload, wire) in state.items():
            counter._stats[tuple(key)] = OpStats(calls, payload, wire)


def save_rank_state(tmp: Path, rank: int, state: dict) -> None:
    torch.save(state, tmp / f"rank_{rank}.pt")


def load_rank_state(path: Path, rank: int) -> dict:
    f = path / f"rank_{rank}.pt"
    if not f.exists():
        raise CheckpointError(f"{path} has no {f.name}: it was written by fewer ranks")
    return torch.load(f, map_location="cpu", weights_only=False)


# ----------------------------------------------------------------------------------- rebuild from adapter


def structure_checksum(model) -> str:
    """SHA-256 of what the SparseGrad layers compute with (supports, full-precision P/R slices).

    Unlike ``SparseGradModel.support_checksum`` (which hashes the float64 calibration bases in reference
    and dynamic mode) this is equal for a calibrated model and the same model restored by ``from_pretrained``."""
    from sg_distributed.sparsegrad.layer import SparseGradLinear

    digest = hashlib.sha256()
    for name, module in model.converted_layers().items():
        digest.update(name.encode())
        if isinstance(module, SparseGradLinear):
            tensors = [module.support_flat, module.P_sub, module.R_sub]
        else:
            tensors = [getattr(module, n) for n in ("P", "R") if getattr(module, n, None) is not None]
        for t in tensors:
            digest.update(tensor_bytes(t))
    return digest.hexdigest()


def prepared_from_adapter(method: str, model, adapter_dir: str | Path, weight_decay: float = 0.0):
    """``methods.prepare`` without calibration: the SparseGrad model rebuilt from a saved adapter, trainable."""
    from sg_distributed.training.methods import prepared_sparsegrad
    from sg_distributed.sparsegrad.convert import load_adapter

    return prepared_sparsegrad(method, load_adapter(model, adapter_dir, is_trainable=True), weight_decay)


def save_adapter(model, directory: str | Path) -> None:
    """Write ``model``'s SparseGrad adapter to ``directory`` atomically (peft's files, or the research wrapper's).
    The k-vectors must be whole here (inside ``full_params()`` under ZeRO-3 / sharded FSDP2)."""
    from peft import PeftModel

    from sg_distributed.io import atomic_directory

    if not isinstance(model, PeftModel):
        model.save_pretrained(directory)  # SparseGradModel: atomic itself
        return
    with atomic_directory(directory) as tmp:
        model.save_pretrained(str(tmp))


# ------------------------------------------------------------------------------------ engine state


def backend_name(engine) -> str:
    if engine.deepspeed:
        stage = engine.wrapped.zero_optimization_stage()
        return f"deepspeed_zero{stage}"
    if engine.fsdp:
        return "fsdp2"
    if is_distributed():
        return "ddp"
    return "single"


def _trainable_names(module) -> set[str]:
    return {n for n, p in module.named_parameters() if p.requires_grad}


def write_engine_state(tmp: Path, engine, prepared, method: str, full_params) -> None:
    """Every rank: the adapter (SparseGrad family), the engine's model/optimizer state and the
    world-size-independent ``trainable_state.pt`` (gathered to rank 0).

    ``full_params``: a context manager factory making the trainable parameters whole on every rank
    (ZeRO-3 GatheredParameters / FSDP2 full tensors; a collective)."""
    rank = _rank()
    if method in SPARSEGRAD_METHODS:
        with full_params():
            if rank == 0:
                save_adapter(prepared.model, tmp / "adapter")
    if engine.deepspeed:
        engine.wrapped.save_checkpoint(str(tmp / "engine"), tag="state", exclude_frozen_parameters=True)
    elif engine.fsdp:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(engine.wrapped, engine.optimizer)
        keep = _trainable_names(engine.wrapped)
        dcp.save({"model": {k: v for k, v in msd.items() if k in keep}, "optim": osd},
                 checkpoint_id=str(tmp / "dcp"))
    elif rank == 0:  # single process / DDP: replicated state, rank 0 writes it
        # every trainable parameter, also for the SparseGrad family: in reference / dynamic mode the norms
        # train too, and the adapter (save_pretrained) holds only the converted layers
        torch.save({n: p.detach().cpu() for n, p in engine.module.named_parameters() if p.requires_grad},
                   tmp / "trainable.pt")
        torch.save(engine.optimizer.state_dict(), tmp / "optimizer.pt")
    from sg_distributed.training import trainable_state

    trainable_state.write(tmp, engine)  # a collective under DeepSpeed / FSDP2: every rank


def load_trainable_state(path: Path, engine) -> dict:
    """Every rank: trainable values and optimizer state from ``path/trainable_state.pt`` into a fresh engine
    (a resume on another number of ranks); CheckpointError when the file does not fit."""
    from sg_distributed.training import trainable_state

    try:
        return trainable_state.restore(path, engine)
    except trainable_state.TrainableStateError as err:
        raise CheckpointError(str(err)) from None


def load_engine_state(path: Path, engine, method: str) -> None:
    """Every rank: the engine's model/optimizer state from checkpoint ``path`` (adapter already applied)."""
    if engine.deepspeed:
        loaded, _ = engine.wrapped.load_checkpoint(str(path / "engine"), tag="state", load_module_strict=False,
                                                   load_optimizer_states=True, load_lr_scheduler_states=True)
        if loaded is None:
            raise CheckpointError(f"DeepSpeed could not load the engine state in {path / 'engine'}")
    elif engine.fsdp:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

        msd, osd = get_state_dict(engine.wrapped, engine.optimizer)
        keep = _trainable_names(engine.wrapped)
        state = {"model": {k: v for k, v in msd.items() if k in keep}, "optim": osd}
        dcp.load(state, checkpoint_id=str(path / "dcp"))
        set_state_dict(engine.wrapped, engine.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"], options=StateDictOptions(strict=False))
    else:
        saved = torch.load(path / "trainable.pt", map_location="cpu", weights_only=True)
        params = dict(engine.module.named_parameters())
        missing = sorted(set(saved) ^ _trainable_names(engine.module))
        if missing:
            raise CheckpointError(f"{path}/trainable.pt does not match the model's trainable parameters "
                                  f"(e.g. {missing[:3]})")
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)
        state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
        engine.optimizer.load_state_dict(state)
