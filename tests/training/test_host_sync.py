"""The training loop (training/loop.py, run by launch/train_qa.py) reads the device at most once per optimizer step.

On a GPU every ``.item()``, ``.tolist()``, ``bool(t)``, ``float(t)``, ``int(t)``, ``.cpu()``, ``.numpy()`` of a device
tensor (and boolean-mask indexing, whose output size needs the mask's count) makes the CPU wait for the GPU. The
test runs ``main([...])`` in-process on the tiny model under a ``TorchFunctionMode`` that counts those calls
between the training loop's first forward and the held-out evaluation that follows the loop (calibration and
evaluation are outside the window). On CPU tensors these calls are not real syncs, but they are exactly where a
GPU would sync. (On a GPU, ``torch.cuda.set_sync_debug_mode("warn")`` reports the real ones, including the
blocking host-to-device copies that this CPU test cannot see.)
"""
import math
import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode

FAST = ["--calibration_steps", "2", "--eval_size", "2", "--no_eval_before", "--density", "0.5",
        "--max_rows", "0", "--max_cols", "0", "--lr", "1e-2", "--micro_batch_size", "2"]

HOST_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__,
              torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.cpu, torch.Tensor.numpy}


# Python-level wrappers of Tensor methods (``f"{t}"``, ``len(t)``...): the read is their caller's
WRAPPERS = ("/torch/_tensor.py", "/torch/overrides.py", "/torch/utils/_python_dispatch.py")
OWN = ("sg_distributed/training/loop.py", "sg_distributed/training/engine.py")  # the training loop and its Engine


class HostReadCounter(TorchFunctionMode):
    """Records each host read while ``active`` as (caller "file:line function", what), the caller being the
    code that called the Tensor method (one frame out; through Python wrappers in torch/_tensor.py)."""

    def __init__(self):
        super().__init__()
        self.active, self.reads = False, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.active:
            index = args[1] if func is torch.Tensor.__getitem__ and len(args) > 1 else None
            boolean_mask = index is not None and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool
                for i in (index if isinstance(index, tuple) else (index,)))
            if func in HOST_READS or boolean_mask:
                frames = [f for f in traceback.extract_stack()[:-1]
                          if f.filename != __file__ and not f.filename.endswith(WRAPPERS)]
                caller = frames[-1]
                self.reads.append((f"{caller.filename}:{caller.lineno} {caller.name}",
                                   "boolean mask" if boolean_mask else func.__name__))
        return func(*args, **kwargs)

    def own(self) -> list[str]:
        """The reads made by train_qa's loop and the Engine themselves, less the host-only data permutation
        (``global_batch_indices``: ``randperm`` with a CPU generator, on the host on every machine)."""
        return [f"{what} at {where}" for where, what in self.reads
                if any(f"/{o}:" in where for o in OWN) and not where.endswith(" global_batch_indices")]

    def library(self) -> list[str]:
        """Reads inside torch, transformers or sg_distributed's layers/optimizers (reported, not asserted)."""
        return [f"{what} at {where}" for where, what in self.reads if not any(f"/{o}:" in where for o in OWN)]


def host_reads_in_training_loop(train_qa, monkeypatch, argv) -> tuple[HostReadCounter, dict]:
    """Run ``main(argv)``; return the host reads between the loop's first forward and the 'after' evaluation."""
    counter = HostReadCounter()
    from sg_distributed.training import loop
    from sg_distributed.training.engine import Engine

    forward, evaluate = Engine.forward, loop.evaluate_held_out

    def counting_forward(self, batch):
        counter.active = True  # the loop's first forward opens the window (calibration does not use the Engine)
        return forward(self, batch)

    def closing_evaluate(*args, **kwargs):
        counter.active = False  # the held-out evaluation after the loop closes it
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(Engine, "forward", counting_forward)
    monkeypatch.setattr(loop, "evaluate_held_out", closing_evaluate)
    with counter:
        results = train_qa.main(argv)
    return counter, results


@pytest.mark.parametrize("method,grad_accum", [("sparsegrad", 1), ("sparsegrad", 2), ("lora", 3)])
def test_at_most_one_host_read_per_optimizer_step(train_qa, tiny_model_dir, tmp_path, monkeypatch, method,
                                                  grad_accum):
    steps = 4
    counter, results = host_reads_in_training_loop(train_qa, monkeypatch, [
        "--model", str(tiny_model_dir), *FAST, "--method", method, "--steps", str(steps),
        "--grad_accum", str(grad_accum), "--output_dir", str(tmp_path)])
    assert results["skipped_steps"] == [] and len(results["train_loss_first_last"]) == 2
    own, library = counter.own(), counter.library()
    print(f"\n{len(own)} host reads of train_qa's loop in {steps} steps:", *own, sep="\n  ")
    print(f"{len(library)} inside torch / transformers / sg_distributed (not asserted):",
          *sorted(set(library)), sep="\n  ")
    assert len(own) <= steps, f"{len(own)} host reads in {steps} optimizer steps:\n  " + "\n  ".join(own)
    assert not any("boolean mask" in r for r in own)


def test_skip_and_stop_still_take_one_host_read_per_step(train_qa, tiny_model_dir, tmp_path, monkeypatch):
    """Non-finite steps (fault injection) are still skipped, the run still stops past --max_skipped_steps, and
    deciding that costs no extra host read: 5 steps (2 good, 2 skipped, the 5th stops the run) with
    --grad_accum 2 read the device at most 5 times (the checkpoint written on the stop reads the weights
    and is not counted: ``evaluate`` is not reached, so the window is closed by hand)."""
    from sg_distributed.training import checkpoint as ckpt

    monkeypatch.setenv("SG_FAULT_INJECT", "nan_loss_at_step_2,nan_loss_at_step_3,nan_loss_at_step_4")
    save = ckpt.save_checkpoint
    counter = {}

    def closing_save(*args, **kwargs):
        counter["mode"].active = False
        return save(*args, **kwargs)

    monkeypatch.setattr(ckpt, "save_checkpoint", closing_save)
    original = HostReadCounter.__init__

    def remember(self):
        original(self)
        counter["mode"] = self

    monkeypatch.setattr(HostReadCounter, "__init__", remember)
    with pytest.raises(SystemExit, match=r"3 steps with a non-finite loss \(steps \[2, 3, 4\]\)") as err:
        host_reads_in_training_loop(train_qa, monkeypatch, [
            "--model", str(tiny_model_dir), *FAST, "--steps", "6", "--grad_accum", "2", "--max_skipped_steps", "2",
            "--output_dir", str(tmp_path)])
    assert err.value.code == ckpt.EXIT_NONFINITE
    own = counter["mode"].own()
    assert len(own) <= 5, "\n  ".join(own)
    import json

    state = json.loads((tmp_path / "checkpoints" / "step_5" / "trainer_state.json").read_text())
    assert state["skipped_steps"] == [2, 3, 4] and len(state["losses"]) == 2


@pytest.mark.multiprocess
def test_fsdp_skip_after_unsynced_micro_batches_leaks_no_gradient(tiny_model_dir, tmp_path):
    """FSDP2, --grad_accum 2, LoRA (sharded trainable weights): the non-finite step is decided before its last
    backward, after the first micro-batch's unsynced backward; its NaN gradients must not reach the next step
    (they would without the synced flush backward: step 3 then turns non-finite and the run stops)."""
    import json
    import os
    import sys

    from conftest import free_port, run_ranks

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "SG_FAULT_INJECT": "nan_loss_at_step_1"}
    proc = run_ranks([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                      "127.0.0.1", "--master_port", str(free_port()), "launch/train_qa.py", "--model",
                      str(tiny_model_dir), *FAST, "--method", "lora", "--fsdp", "--steps", "4", "--grad_accum", "2",
                      "--max_skipped_steps", "1", "--output_dir", str(tmp_path)],
                     env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["skipped_steps"] == [1]
    assert all(map(math.isfinite, metrics["train_loss_first_last"] + [metrics["after"]["answer_loss"]]))
