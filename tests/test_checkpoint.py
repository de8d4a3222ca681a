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

from sg_distributed import checkpoint as ckpt

from conftest import free_port, supports_reselected

ROOT = Path(__file__).resolve().parents[1]
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
    from sg_distributed.export import main as export_main

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
    logs = [[json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
            for d in ("full", "part")]  # the resumed run's log reads as one run: no step twice
    assert [r["step"] for r in logs[1]] == list(range(1, 9))
    assert [r["loss"] for r in logs[1]] == [r["loss"] for r in logs[0]]


# ------------------------------------------------------------------------------------------ DeepSpeed ZeRO-2


@pytest.mark.multiprocess
def test_zero2_two_ranks_sigkill_then_resume_auto_is_bit_identical(tiny_model_dir, tmp_path):
    def cmd(out):
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(free_port()), "launch/train_qa.py", "--model", str(tiny_model_dir), *COMMON,
                "--ds_config", "ds_configs/zero2.json", "--output_dir", str(out)]

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
    assert (part / "checkpoints" / "step_8" / "engine" / "state").is_dir()
