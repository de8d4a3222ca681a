"""Checkpoint / resume of launch/train_qa.py: atomic checksummed checkpoints, SIGKILL + --resume auto, guards."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from sg_distributed.training import checkpoint as ckpt

from conftest import free_port, run_ranks, supports_reselected

ROOT = Path(__file__).resolve().parents[2]
COMMON = ["--steps", "8", "--calibration_steps", "2", "--eval_size", "2", "--no_eval_before", "--density", "0.5",
          "--max_rows", "0", "--max_cols", "0", "--lr", "1e-2", "--micro_batch_size", "2", "--save_every", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"}


def adapter(out: Path) -> dict:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def assert_identical(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------------------- atomic writes (no training)


def _save(root, step, payload: bytes, crash: bool = False):
    def parts(tmp):
        (tmp / "blob.bin").write_bytes(payload)

    def hook(tmp):
        if crash:
            raise KeyboardInterrupt("simulated crash during save")

    return ckpt.save_checkpoint(root, step, parts, {"backend": "single", "fingerprint": {}}, {"losses": []},
                                keep=2, fault_hook=hook)


def test_atomic_save_verify_and_newest_complete(tmp_path, capsys):
    root = tmp_path / "ck"
    _save(root, 2, b"two")
    _save(root, 4, b"four")
    with pytest.raises(KeyboardInterrupt):  # a crash mid-save leaves step_6.tmp, never step_6
        _save(root, 6, b"six", crash=True)
    assert (root / "step_6.tmp").exists() and not (root / "step_6").exists()
    assert ckpt.find_latest(root) == root / "step_4"
    manifest = ckpt.verify(root / "step_4")
    assert manifest["step"] == 4 and set(manifest["files"]) == {"blob.bin", "trainer_state.json"}

    (root / "step_4" / "blob.bin").write_bytes(b"fouR")  # corrupt the newest: resume falls back, says why
    assert ckpt.find_latest(root) == root / "step_2"
    assert "skipping step_4" in capsys.readouterr().out and "sha256" in str(pytest.raises(
        ckpt.CheckpointError, ckpt.verify, root / "step_4").value)
    (root / "step_2" / "manifest.json").unlink()  # no manifest = incomplete
    assert ckpt.find_latest(root) is None
    with pytest.raises(ckpt.CheckpointError, match="no manifest.json"):
        ckpt.resolve_resume(str(root / "step_2"), root)

    _save(root, 8, b"eight")  # keep=2 prunes older complete checkpoints only
    _save(root, 10, b"ten")
    assert sorted(p.name for p in root.iterdir() if ckpt.step_of(p)) == ["step_10", "step_8"]


def test_fingerprint_guard_names_every_difference():
    saved = {"method": "sparsegrad", "density": 0.5, "world_size": 2, "model_config_sha256": "aa"}
    now = {"method": "sparsegrad", "density": 0.3, "world_size": 1, "model_config_sha256": "bb"}
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.check_compatible({"backend": "deepspeed_zero2", "fingerprint": saved}, now, "deepspeed_zero2", Path("x"))
    text = str(err.value)
    assert "density: checkpoint 0.5, now 0.3" in text and "world_size: checkpoint 2, now 1" in text
    assert "model_config_sha256" in text and "same number of ranks" in text
    assert ckpt.compare_fingerprints(saved, {**saved, "world_size": 4}, reshardable=True) == []  # DCP reshards
    with pytest.raises(ckpt.CheckpointError, match="backend 'fsdp2'"):
        ckpt.check_compatible({"backend": "fsdp2", "fingerprint": saved}, saved, "ddp", Path("x"))
    # with the world-size-independent trainable_state.pt the world size may change under DeepSpeed too
    portable = {"backend": "deepspeed_zero2", "world_size": 2, "fingerprint": saved,
                "files": {"trainable_state.pt": {}}}
    ckpt.check_compatible(portable, {**saved, "world_size": 1}, "deepspeed_zero2", Path("x"))
    assert ckpt.uses_engine_state(portable, "deepspeed_zero2", 2)
    assert not ckpt.uses_engine_state(portable, "deepspeed_zero2", 1)
    assert not ckpt.uses_engine_state(portable, "deepspeed_zero3", 2)
    with pytest.raises(ckpt.CheckpointError, match=r"'deepspeed_zero2' \(DeepSpeed\), this run uses 'fsdp2' \(FSDP2\)"):
        ckpt.check_compatible(portable, {**saved, "world_size": 1}, "fsdp2", Path("x"))


# ------------------------------------------------------------------------------------- single process, end to end


def test_single_process_crash_during_save_then_resume_auto_is_bit_identical(train_qa, tiny_model_dir, tmp_path):
    args = ["--model", str(tiny_model_dir), *COMMON]
    train_qa.main([*args, "--output_dir", str(tmp_path / "full")])
    part = tmp_path / "part"
    # SIGKILL while step_6 is half written: step_4 stays the newest complete checkpoint
    proc = subprocess.run([sys.executable, "launch/train_qa.py", *args, "--output_dir", str(part)], cwd=ROOT,
                          env={**ENV, "SG_FAULT_INJECT": "crash_in_save_at_step_6"}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (part / "checkpoints" / "step_6.tmp").is_dir() and not (part / "checkpoints" / "step_6").exists()

    # a changed configuration is refused, naming the difference; the checkpoints stay intact
    with pytest.raises(SystemExit, match=r"density: checkpoint 0.5, now 0.25"):
        train_qa.main([*args, "--density", "0.25", "--output_dir", str(part), "--resume", "auto"])

    results = train_qa.main([*args, "--output_dir", str(part), "--resume", "auto"])
    assert results["resumed_from"].endswith("step_4")
    assert_identical(adapter(tmp_path / "full"), adapter(part))
    full = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert results["train_loss_first_last"] == full["train_loss_first_last"]
    assert results["structure_checksum"] == full["structure_checksum"]

    # export: the newest checkpoint -> PEFT-style adapter + merged plain model with the same outputs
    from sg_distributed.tools.export import main as export_main

    exported = tmp_path / "exported"
    assert export_main(["--checkpoint", str(part / "checkpoints"), "--base_model", str(tiny_model_dir),
                        "--adapter_out", str(exported / "adapter"), "--merged_out", str(exported / "merged")]) == 0
    assert_identical(adapter(exported), adapter(part))
    assert not any("sparse" in k for k in load_file(str(exported / "merged" / "model.safetensors")))
    assert export_main(["--checkpoint", str(tmp_path / "nowhere"), "--base_model", str(tiny_model_dir),
                        "--merged_out", str(exported / "m2")]) == 1


def test_resume_between_reselections_is_bit_identical(train_qa, tiny_model_dir, tmp_path):
    """Re-selection every 3 steps, checkpoint at step 4: the resumed run keeps the schedule, the swapped
    supports and the growth scores accumulated since step 3, and ends where the uninterrupted run ends."""
    args = ["--model", str(tiny_model_dir), *COMMON, "--density", "0.05", "--max_rows", "0.5", "--max_cols", "0.5",
            "--reselect_every", "3", "--reselect_fraction", "0.5"]
    full = train_qa.main([*args, "--output_dir", str(tmp_path / "full")])
    train_qa.main([*args, "--steps", "4", "--output_dir", str(tmp_path / "part")])
    resumed = train_qa.main([*args, "--output_dir", str(tmp_path / "part"), "--resume", "auto"])
    assert resumed["resumed_from"].endswith("step_4")
    reference = adapter(tmp_path / "full")
    assert supports_reselected(reference)
    assert_identical(reference, adapter(tmp_path / "part"))
    assert resumed["train_loss_first_last"] == full["train_loss_first_last"]


def test_sigterm_saves_a_checkpoint_and_resume_auto_is_bit_identical(train_qa, tiny_model_dir, tmp_path, monkeypatch):
    """SIGTERM (Slurm before a time limit) during step 3 with --save_every: the step finishes, a verified
    checkpoint of step 4 is written, the run exits with 128 + 15; --resume auto ends where the uninterrupted
    run ends."""
    args = ["--model", str(tiny_model_dir), *COMMON, "--save_every", "3"]
    full = train_qa.main([*args, "--output_dir", str(tmp_path / "full")])
    monkeypatch.setenv("SG_FAULT_INJECT", "sigterm_at_step_3")
    with pytest.raises(SystemExit) as stop:
        train_qa.main([*args, "--output_dir", str(tmp_path / "part")])
    assert stop.value.code == 128 + signal.SIGTERM and "stopped by SIGTERM after step 4 of 8" in str(stop.value)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone after the run
    ckpt.verify(tmp_path / "part" / "checkpoints" / "step_4")
    monkeypatch.delenv("SG_FAULT_INJECT")
    resumed = train_qa.main([*args, "--output_dir", str(tmp_path / "part"), "--resume", "auto"])
    assert resumed["resumed_from"].endswith("step_4")
    assert_identical(adapter(tmp_path / "full"), adapter(tmp_path / "part"))
    assert resumed["train_loss_first_last"] == full["train_loss_first_last"]
    logs = [[r for r in map(json.loads, (tmp_path / d / "metrics.jsonl").read_text().splitlines())
             if r.get("split") != "eval"] for d in ("full", "part")]  # the resumed run's log reads as one run
    assert [r["step"] for r in logs[1]] == list(range(1, 9))
    assert [r["loss"] for r in logs[1]] == [r["loss"] for r in logs[0]]


# ------------------------------------------------------------------------------------------ DeepSpeed ZeRO-2


SIGKILL_BACKENDS = {  # backend: (flags, what its checkpoint holds besides the adapter)
    "zero2": (["--ds_config", "ds_configs/zero2.json"], "engine/state"),
    "zero3": (["--ds_config", "ds_configs/zero3.json"], "engine/state"),
    "fsdp2": (["--fsdp"], "dcp"),
}


@pytest.mark.multiprocess
@pytest.mark.parametrize("backend", list(SIGKILL_BACKENDS))
def test_two_ranks_sigkill_then_resume_auto_is_bit_identical(tiny_model_dir, tmp_path, backend):
    flags, engine_state = SIGKILL_BACKENDS[backend]

    def cmd(out):
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(free_port()), "launch/train_qa.py", "--model", str(tiny_model_dir), *COMMON,
                *flags, "--output_dir", str(out)]

    full, part = tmp_path / "full", tmp_path / "part"
    uninterrupted = subprocess.Popen(cmd(full), cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
    # every rank stalls at the start of step index 6, right after checkpoint step_6 is saved; SIGKILL the group then
    victim = subprocess.Popen(cmd(part), cwd=ROOT, env={**ENV, "SG_FAULT_INJECT": "hang_at_step_6"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 120
    while not (part / "checkpoints" / "step_6" / "manifest.json").exists():
        assert victim.poll() is None and time.time() < deadline, victim.stdout.read()[-3000:]
        time.sleep(0.2)
    # torchrun starts its workers in their own sessions: kill the whole tree, not just the launcher's group
    launcher = psutil.Process(victim.pid)
    for proc in launcher.children(recursive=True) + [launcher]:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    victim.wait(timeout=30)
    victim.stdout.close()

    resumed = subprocess.run(cmd(part) + ["--resume", "auto"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                             timeout=240)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resume: from" in resumed.stdout and "step_6 (step 6)" in resumed.stdout
    out, _ = uninterrupted.communicate(timeout=240)
    assert uninterrupted.returncode == 0, out[-3000:]
    assert_identical(adapter(full), adapter(part))
    assert (part / "checkpoints" / "step_8" / engine_state).is_dir()


# ------------------------------------------------------- another world size: trainable_state.pt (2 ranks -> 1 rank)

# 2 ranks x --grad_accum 1 and 1 rank x --grad_accum 2 see the same global batches (runtime.rank_micro_batches)
RESHARD = ["--steps", "4", "--calibration_steps", "2", "--eval_size", "2", "--no_eval_before", "--density", "0.5",
           "--max_rows", "0", "--max_cols", "0", "--lr", "1e-2", "--micro_batch_size", "2", "--save_every", "2"]


@pytest.fixture(scope="module")
def one_rank_run(train_qa, tiny_model_dir, tmp_path_factory):
    """An uninterrupted one-process run to step 4 (checkpoints step_2, step_4), micro-batch 2 x accumulation 2."""
    out = tmp_path_factory.mktemp("one_rank")
    train_qa.main(["--model", str(tiny_model_dir), *RESHARD, "--grad_accum", "2", "--output_dir", str(out)])
    return out


def losses(out: Path) -> list[float]:
    return json.loads((out / "checkpoints" / "step_4" / ckpt.TRAINER_STATE).read_text())["losses"]


def assert_resumed_equals(resumed: Path, reference: Path) -> None:
    """Supports, bases and everything but the trained values identical; values and losses within fp32 1e-5."""
    ref, got = adapter(reference), adapter(resumed)
    assert sorted(ref) == sorted(got)
    values = [k for k in ref if k.endswith("sparsegrad_values")]
    assert values and any(ref[k].abs().sum() > 0 for k in values)
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], atol=1e-5 if key in values else 0, rtol=0, msg=key)
    assert len(losses(resumed)) == len(losses(reference)) == 4
    torch.testing.assert_close(torch.tensor(losses(resumed)), torch.tensor(losses(reference)), atol=1e-5, rtol=0)


def two_then_one(tiny_model_dir, tmp_path, engine_args) -> tuple[Path, str]:
    """2 ranks to step 2 (checkpoint step_2), then --resume of that checkpoint on 1 rank (--grad_accum 2) to
    step 4 in another output folder; returns (the 2-rank output folder, the 1-rank run's stdout)."""
    def launch(ranks, out, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), "launch/train_qa.py", "--model", str(tiny_model_dir),
               *RESHARD, *engine_args, "--output_dir", str(out), *extra]
        proc = run_ranks(cmd, env=ENV)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout

    two = tmp_path / "two"
    launch(2, two, "--steps", "2")
    manifest = ckpt.verify(two / "checkpoints" / "step_2")
    assert manifest["world_size"] == 2 and ckpt.TRAINABLE_STATE in manifest["files"]  # checksummed
    stdout = launch(1, tmp_path / "one", "--grad_accum", "2", "--resume", str(two / "checkpoints"))
    assert "resume: resharding from 2 ranks" in stdout and "through trainable_state.pt" in stdout
    return two, stdout


@pytest.mark.multiprocess
def test_zero2_two_ranks_resume_on_one_rank_matches_one_rank_run(train_qa, tiny_model_dir, one_rank_run, tmp_path):
    """ZeRO-2 partitions are per rank: the 1-rank engine takes values, Adam moments and step count from
    trainable_state.pt (written by rank 0 after gathering through DeepSpeed's safe_get_full_* API)."""
    two, _ = two_then_one(tiny_model_dir, tmp_path, ["--ds_config", "ds_configs/zero2.json"])
    state = torch.load(two / "checkpoints" / "step_2" / ckpt.TRAINABLE_STATE, weights_only=False)
    assert state["backend"] == "deepspeed_zero2" and state["world_size"] == 2
    assert {e["step"] for e in state["optimizer"].values()} == {2} and state["deepspeed"]["global_steps"] == 2
    assert_resumed_equals(tmp_path / "one", one_rank_run)
    resumed = ckpt.verify(tmp_path / "one" / "checkpoints" / "step_4")
    assert resumed["backend"] == "deepspeed_zero2" and resumed["world_size"] == 1
    assert (tmp_path / "one" / "checkpoints" / "step_4" / "engine" / "state").is_dir()
    # a DeepSpeed checkpoint does not resume without DeepSpeed (refused before the model loads)
    with pytest.raises(SystemExit, match=r"'deepspeed_zero2' \(DeepSpeed\), this run uses 'single'"):
        train_qa.main(["--model", str(tiny_model_dir), *RESHARD, "--grad_accum", "2", "--output_dir",
                       str(tmp_path / "refused"), "--resume", str(two / "checkpoints")])


@pytest.mark.multiprocess
@pytest.mark.parametrize("engine", [["--ds_config", "ds_configs/zero2.json"], ["--fsdp"]], ids=["zero2", "fsdp2"])
def test_bf16_two_ranks_resume_on_one_rank_is_bit_identical(tiny_model_dir, tmp_path, engine):
    """bf16 weights: trainable_state.pt carries the fp32 k-vectors and moments (under DeepSpeed the fp32 masters,
    not the bf16 module copies), so 2 ranks -> 1 rank ends bit-identical to an uninterrupted 1-rank bf16 run under
    the same engine (measured: trained values and losses equal)."""
    engine = [*engine, "--precision", "bf16"]
    two_then_one(tiny_model_dir, tmp_path, engine)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "launch/train_qa.py", "--model", str(tiny_model_dir), *RESHARD, *engine,
           "--grad_accum", "2", "--output_dir", str(tmp_path / "reference")]
    proc = run_ranks(cmd, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert losses(tmp_path / "one") == losses(tmp_path / "reference")
    assert_identical(adapter(tmp_path / "reference"), adapter(tmp_path / "one"))


@pytest.mark.multiprocess
def test_fsdp2_two_ranks_resume_on_one_rank_matches_one_rank_run(tiny_model_dir, one_rank_run, tmp_path):
    two_then_one(tiny_model_dir, tmp_path, ["--fsdp"])
    assert_resumed_equals(tmp_path / "one", one_rank_run)


def test_resume_under_another_kind_of_engine_is_refused(train_qa, tiny_model_dir, one_rank_run, tmp_path):
    """A one-process checkpoint under FSDP2: refused before the model loads (no process group needed)."""
    with pytest.raises(SystemExit) as err:
        train_qa.main(["--model", str(tiny_model_dir), *RESHARD, "--grad_accum", "2", "--fsdp", "--output_dir",
                       str(tmp_path / "refused"), "--resume", str(one_rank_run / "checkpoints")])
    text = str(err.value)
    assert "written by backend 'single' (one process / DDP), this run uses 'fsdp2' (FSDP2)" in text
    assert "resume under the same kind of engine" in text and "DeepSpeed -> DeepSpeed" in text
    assert not (tmp_path / "refused" / "checkpoints").exists()
