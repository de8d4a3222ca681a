"""The batch scripts under a real Slurm scheduler: two ``slurmd`` nodes on this host, each in its own network
namespace (``sg_distributed.tools.local_slurm``), real ``sbatch`` / ``srun`` / ``scontrol`` / ``scancel``.

One rank per node (``GPUS_PER_NODE=1``, ``LAUNCH_CPU=1``), the tiny random Llama. What a cluster does to a job:
it trains and equals one process; a signal checkpoints it at a step boundary and a requeue resumes it
bit-identical to an uninterrupted run; a node dying ends it in bounded time and a resubmission resumes it.

Needs root and Debian's Slurm (``.ci/run`` installs it). Elsewhere these tests skip with the reason, unless
``SG_REQUIRE_CLUSTER=1`` (set by ``.ci/run``) turns the skip into a failure.
"""
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sg_distributed.tools.emulated_nodes import ClusterSetupError
from sg_distributed.tools.local_slurm import INSTALL_HINT, LocalSlurm, missing_slurm_tools

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
# 2 nodes x 1 rank x micro-batch 2 = one process x --grad_accum 2 (the same global batches)
STEPS = 40
TRAIN = (f"--steps {STEPS} --calibration_steps 2 --eval_size 2 --no_eval_before --density 0.5 --max_rows 0 "
         "--max_cols 0 --lr 1e-2 --micro_batch_size 2 --log_every 1")

pytestmark = pytest.mark.multiprocess


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces and Slurm daemons)"
    missing = missing_slurm_tools()
    if missing:
        return f"Slurm is not installed ({', '.join(missing)}): {INSTALL_HINT}"
    return None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = _why_not()
    if reason:
        if os.environ.get("SG_REQUIRE_CLUSTER") == "1":
            pytest.fail(f"SG_REQUIRE_CLUSTER=1 but the Slurm tests cannot run: {reason}")
        pytest.skip(reason)
    slurm = LocalSlurm(tmp_path_factory.mktemp("slurm"), nodes=2, kill_wait=30)
    try:
        slurm.up()
    except ClusterSetupError as err:
        slurm.down()
        pytest.fail(f"the two-node cluster did not come up: {err}")
    yield slurm
    slurm.down()


def submit(cluster, script: str, ckpt: Path, tiny_model_dir, *, save_every=1000, extra_env=None) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update({"PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}", "MODEL": str(tiny_model_dir),
                "LAUNCH_CPU": "1", "GPUS_PER_NODE": "1", "MASTER_PORT": str(random.randint(20000, 40000)),
                "LOG_DIR": str(ckpt.parent / "logs"), "CKPT_DIR": str(ckpt), "SAVE_EVERY": str(save_every),
                "EXTRA_ARGS": TRAIN, "OMP_NUM_THREADS": "1", **(extra_env or {})})
    out = ckpt.parent / f"{ckpt.name}-%j.out"
    return cluster.sbatch("--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1", f"--output={out}",
                          f"launch/slurm/{script}", cwd=ROOT, env=env)


def job_log(ckpt: Path, job_id: int) -> str:
    path = ckpt.parent / f"{ckpt.name}-{job_id}.out"
    return path.read_text(errors="replace") if path.exists() else ""


def wait_ended(cluster, job_id: int, ckpt: Path, timeout: float = 240) -> dict:
    try:
        return cluster.wait_state(job_id, ENDED, timeout)
    except TimeoutError as err:
        raise AssertionError(f"{err}\n{job_log(ckpt, job_id)[-4000:]}") from None


def wait_for_step(ckpt: Path, step: int, timeout: float = 120) -> None:
    """Until metrics.jsonl (rank 0, --log_every 1) has logged ``step``."""
    deadline = time.monotonic() + timeout
    path = ckpt / "metrics.jsonl"
    while time.monotonic() < deadline:
        if path.exists() and sum(1 for line in path.read_text().splitlines() if '"loss"' in line) >= step:
            return
        time.sleep(0.1)
    raise AssertionError(f"{path} never reached step {step}")


def adapter(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(ckpt / "adapter" / "adapter_model.safetensors")


def assert_identical(got: dict, ref: dict) -> None:
    assert sorted(got) == sorted(ref)
    for key in ref:
        assert torch.equal(got[key], ref[key]), key


@pytest.fixture(scope="module")
def uninterrupted(cluster, tiny_model_dir, tmp_path_factory) -> Path:
    """The torchrun script's run without interruption: the reference of the preemption and node-loss tests."""
    ckpt = tmp_path_factory.mktemp("uninterrupted") / "ckpt"
    job = submit(cluster, "torchrun_multinode.sbatch", ckpt, tiny_model_dir)
    info = wait_ended(cluster, job, ckpt)
    assert info["JobState"] == "COMPLETED", job_log(ckpt, job)[-4000:]
    return ckpt


@pytest.fixture(scope="module")
def one_process(train_qa, tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one_process")
    train_qa.main(["--model", str(tiny_model_dir), *TRAIN.split(), "--grad_accum", "2", "--output_dir", str(out)])
    return out


def assert_matches_one_process(ckpt: Path, one_process: Path) -> None:
    got, ref = adapter(ckpt), adapter(one_process)
    assert sorted(got) == sorted(ref)
    values = [k for k in ref if k.endswith("sparsegrad_values")]
    assert values and all(ref[k].abs().max() > 1e-3 for k in values)  # trained, not the zero start
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], atol=1e-5 if key in values else 0, rtol=0, msg=key)


def test_cluster_is_two_nodes_with_their_own_addresses(cluster, tmp_path):
    """sbatch -N2: one task per node, each in its node's namespace and address; node names resolve there."""
    script = tmp_path / "where.sh"
    script.write_text("#!/bin/bash\nsrun --nodes=2 --ntasks-per-node=1 bash -c "
                      "'echo $SLURM_NODEID $SLURMD_NODENAME $(getent hosts $SLURMD_NODENAME | cut -d\" \" -f1)'\n")
    job = cluster.sbatch("--nodes=2", f"--output={tmp_path / 'where.out'}", str(script), cwd=tmp_path)
    assert cluster.wait_state(job, ENDED, 60)["JobState"] == "COMPLETED"
    lines = sorted((tmp_path / "where.out").read_text().split("\n"))
    assert [line for line in lines if line] == ["0 node1 10.77.0.1", "1 node2 10.77.0.2"]


@pytest.mark.parametrize("script,engine", [
    ("torchrun_multinode.sbatch", "ds_configs/zero2.json"),
    ("deepspeed_multinode.sbatch", "ds_configs/zero2.json"),
    ("accelerate_multinode.sbatch", "ds_configs/zero3.json"),
])
def test_script_trains_on_two_nodes_and_equals_one_process(script, engine, cluster, tiny_model_dir, one_process,
                                                           uninterrupted, tmp_path):
    if script.startswith("torchrun"):
        ckpt = uninterrupted
    else:
        ckpt = tmp_path / "ckpt"
        extra = {"DS_NO_SSH": "1"} if script.startswith("deepspeed") else {
            "ACCELERATE_CONFIG": "launch/accelerate/multinode_deepspeed_zero3.yaml"}
        job = submit(cluster, script, ckpt, tiny_model_dir, extra_env=extra)
        info = wait_ended(cluster, job, ckpt)
        assert info["JobState"] == "COMPLETED", job_log(ckpt, job)[-4000:]
        assert sorted(info["NodeList"].strip("node[]").replace("-", ",").split(",")) == ["1", "2"]
        logs = ckpt.parent / "logs"
        if script.startswith("deepspeed"):
            assert (logs / f"hostfile.{job}").read_text() == "node1 slots=1\nnode2 slots=1\n"
        else:  # the accelerate template, filled for this allocation
            rendered = (logs / f"accelerate.{job}.yaml").read_text()
            assert "num_machines: 2" in rendered and "main_process_ip: node1" in rendered
    metrics = json.loads((ckpt / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["deepspeed"] == engine
    assert_matches_one_process(ckpt, one_process)


def test_usr1_checkpoints_requeues_and_resumes_bit_identical(cluster, tiny_model_dir, uninterrupted, tmp_path):
    """``#SBATCH --signal=B:USR1@<s>`` before a time limit, here sent by hand: the batch shell asks every rank to
    stop, they checkpoint at the step boundary, the job requeues itself, and its second run resumes."""
    ckpt = tmp_path / "ckpt"
    job = submit(cluster, "torchrun_multinode.sbatch", ckpt, tiny_model_dir)
    wait_for_step(ckpt, 5)
    cluster.run("scancel", "--signal=USR1", "--batch", str(job))
    info = wait_ended(cluster, job, ckpt, timeout=300)
    log = job_log(ckpt, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-4000:]
    (stop,) = [p for p in (ckpt / "checkpoints").iterdir() if p.name.startswith("step_")]  # the signal's, mid-run
    assert 5 <= int(stop.name.split("_")[1]) < STEPS
    assert "batch shell: requeueing job" in log and f"resume: from {stop}" in log
    assert_identical(adapter(ckpt), adapter(uninterrupted))


def test_sigterm_to_the_steps_checkpoints_and_scontrol_requeue_resumes(cluster, tiny_model_dir, uninterrupted,
                                                                       tmp_path):
    """``scancel --signal=TERM JOB`` (what a preemption or an admin sends the steps): checkpoint and stop;
    ``scontrol requeue`` runs the job again, resuming bit-identical."""
    ckpt = tmp_path / "ckpt"
    job = submit(cluster, "torchrun_multinode.sbatch", ckpt, tiny_model_dir)
    wait_for_step(ckpt, 5)
    cluster.run("scancel", "--signal=TERM", str(job))
    info = wait_ended(cluster, job, ckpt)
    log = job_log(ckpt, job)
    assert info["JobState"] == "FAILED" and "stopped by SIGTERM after step" in log, log[-4000:]
    (stop,) = [p for p in (ckpt / "checkpoints").iterdir() if p.name.startswith("step_")]
    cluster.run("scontrol", "requeue", str(job))
    info = wait_ended(cluster, job, ckpt, timeout=300)
    log = job_log(ckpt, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-4000:]
    assert f"resume: from {stop}" in log
    assert_identical(adapter(ckpt), adapter(uninterrupted))


def rank_pid(job_id: int, node: str) -> int | None:
    """The training rank of ``job_id`` on ``node``: a process whose environment has torchrun's LOCAL_RANK."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = dict(item.split("=", 1) for item in (proc / "environ").read_text().split("\0") if "=" in item)
        except (OSError, ValueError):
            continue
        if (env.get("SLURM_JOB_ID") == str(job_id) and env.get("SLURMD_NODENAME") == node and "LOCAL_RANK" in env
                and "train_qa.py" in (proc / "cmdline").read_text()):
            return int(proc.name)
    return None


def test_a_dead_node_ends_the_job_and_a_resubmission_resumes(cluster, tiny_model_dir, uninterrupted, tmp_path):
    """SIGKILL of node2's rank mid-run: the job ends within a bounded time with a non-zero exit code naming the
    dead rank; what a kill leaves behind (a torn metrics.jsonl line, a half-written checkpoint) does not stop the
    resubmitted job, which resumes from the last checkpoint and ends bit-identical."""
    ckpt = tmp_path / "ckpt"
    job = submit(cluster, "torchrun_multinode.sbatch", ckpt, tiny_model_dir, save_every=4)
    wait_for_step(ckpt, 10)
    pid = rank_pid(job, "node2")
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    info = wait_ended(cluster, job, ckpt, timeout=120)
    log = job_log(ckpt, job)
    assert time.monotonic() - killed < 90, log[-4000:]
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", log[-4000:]
    assert "host      : node2" in log and "Signal 9 (SIGKILL)" in log, log[-4000:]
    # what a kill in the middle of a write leaves behind
    with (ckpt / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 999, "loss": 1.2')
    junk = ckpt / "checkpoints" / ".step_99.tmp-killed"
    junk.mkdir()
    (junk / "trainable_state.pt").write_bytes(b"\0" * 100)
    saved = max(int(p.name.split("_")[1]) for p in (ckpt / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert saved >= 8 and saved % 4 == 0

    again = submit(cluster, "torchrun_multinode.sbatch", ckpt, tiny_model_dir, save_every=4)
    info = wait_ended(cluster, again, ckpt)
    log = job_log(ckpt, again)
    assert info["JobState"] == "COMPLETED", log[-4000:]
    assert f"resume: from {ckpt / 'checkpoints' / f'step_{saved}'}" in log
    assert_identical(adapter(ckpt), adapter(uninterrupted))
    steps = [json.loads(line)["step"] for line in (ckpt / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line]
    assert steps == list(range(1, STEPS + 1))  # one run's log: no torn line, no step twice
