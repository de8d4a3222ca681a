#!/usr/bin/env python
"""Step time against link bandwidth: two emulated nodes (a network namespace each, one rank per node) joined by a
token-bucket-limited link (``sg_distributed.tools.emulated_nodes``), ``torchrun --nnodes 2`` over their addresses.

For every engine x method x rate it runs ``launch/train_qa.py`` and reports, from the run's own metrics.jsonl
(``--log_every 1``) and the link's interface counters (bytes that really crossed the veth pair, TCP included):

* ``step_s``: the steady-state step, the median step time from step 3 on;
* ``first_step_s``: wall time from launch to the end of the first step (model load, calibration, engine set-up);
* ``MB/step``: bytes on the link per steady step (both directions), and ``floor_s``: the busier direction's
  bytes / rate, the least time the link needs for them;
* ``startup_MB``: bytes on the link until the first step ended; the table shows it less one steady step's bytes
  (what start-up itself sent: weights checks, calibration's Gram all-reduce, engine set-up).

Needs root (it says so and exits 2 otherwise). Results go to ``--out`` (JSON lines, appended, so an interrupted
sweep keeps what it measured), a markdown table and a PNG plot (step time against bandwidth, log x)::

    python benchmarks/bench_network.py --model smollm2 --engines ddp,zero2 --steps 6
    python benchmarks/bench_network.py --model tiny --engines ddp --methods sparsegrad --rates 1gbit --steps 2
    python benchmarks/bench_network.py --report     # table and plot again from benchmarks/results/network.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sg_distributed.tools.emulated_nodes import (  # noqa: E402
    ClusterSetupError, Nodes, rate_bits_per_second, require_root_and_tools)

# method name -> train_qa.py flags (and the engines it runs under)
METHODS = {
    "full": (["--method", "full"], ("ddp", "zero2")),
    "full_powersgd": (["--method", "full", "--ddp_comm_hook", "powersgd"], ("ddp",)),
    "full_bf16": (["--method", "full", "--ddp_comm_hook", "bf16"], ("ddp",)),
    "lora": (["--method", "lora"], ("ddp", "zero2")),
    "shira": (["--method", "shira"], ("ddp", "zero2")),
    "sparsegrad": (["--method", "sparsegrad"], ("ddp", "zero2")),
    "graddrop_dense_p0.9": (["--method", "graddrop", "--drop_prob", "0.9", "--graddrop_exchange", "dense"],
                            ("ddp", "zero2")),
    "graddrop_kept_p0.5": (["--method", "graddrop", "--drop_prob", "0.5", "--graddrop_exchange", "kept"],
                           ("ddp", "zero2")),
    "graddrop_kept_p0.9": (["--method", "graddrop", "--drop_prob", "0.9", "--graddrop_exchange", "kept"],
                           ("ddp", "zero2")),
}
ENGINES = {"ddp": [], "zero2": ["--ds_config", "ds_configs/zero2.json"]}
RATES = ("unlimited", "10gbit", "1gbit", "100mbit")
PORT = 29400


def tiny_model(directory: Path) -> Path:
    """The suite's 2-block random Llama with SmolLM2's tokenizer (seconds per run)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import save_tiny_llama_dir

    if not (directory / "config.json").exists():
        save_tiny_llama_dir(directory)
    return directory


def link_bytes(nodes: Nodes) -> list[int]:
    """Bytes each node has sent on the link so far (its host-side veth's receive counter)."""
    return [int(Path(f"/sys/class/net/{n.host_veth}/statistics/rx_bytes").read_text()) for n in nodes]


def train_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    lines = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # being written
        if "loss" in record:
            lines.append(record)
    return lines


class TorchrunLaunch:
    """One ``torchrun --nnodes 2 --node_rank i`` per node, started inside the node's namespace."""

    def __init__(self, nodes: Nodes, train: list[str], env: dict, logs: Path):
        self.logs = logs
        self.procs = []
        for i, node in enumerate(nodes):
            cmd = [*node.exec_prefix(), sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                   "--nproc_per_node", "1", "--node_rank", str(i), "--master_addr", nodes[0].address,
                   "--master_port", str(PORT), *train]
            log = open(f"{logs}.node{i + 1}.log", "w")
            self.procs.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log))

    def alive(self) -> bool:
        return any(p.poll() is None for p, _ in self.procs)

    def kill(self) -> None:
        for p, _ in self.procs:
            p.kill()

    def finish(self) -> list[int]:
        for p, log in self.procs:
            p.wait()
            log.close()
        return [p.returncode for p, _ in self.procs]

    def log_tail(self) -> str:
        return Path(f"{self.logs}.node1.log").read_text(errors="replace")[-1500:]


def take_flag(args: list[str], flag: str) -> tuple[str | None, list[str]]:
    """(the value of ``flag value`` in ``args`` or None, the other arguments)."""
    if flag not in args:
        return None, list(args)
    i = args.index(flag)
    return args[i + 1], args[:i] + args[i + 2:]


class SlurmLaunch:
    """``sbatch --nodes=2 launch/slurm/torchrun_multinode.sbatch`` on the local two-node cluster."""

    ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}

    def __init__(self, cluster, train: list[str], env: dict, logs: Path):
        self.cluster, self.logs = cluster, Path(f"{logs}.slurm.out")
        # the batch script takes the model, DeepSpeed config and output dir as variables, the rest as EXTRA_ARGS
        out, args = take_flag(train[1:], "--output_dir")
        model, args = take_flag(args, "--model")
        ds, keep = take_flag(args, "--ds_config")
        model, ds = model or "embedded", ds or ""
        job_env = {**env, "MODEL": model, "DS_CONFIG": ds, "CKPT_DIR": out, "LOG_DIR": str(Path(out).parent / "logs"),
                   "LAUNCH_CPU": "1", "GPUS_PER_NODE": "1", "SAVE_EVERY": "0", "RESUME": "",
                   "MASTER_PORT": str(PORT), "EXTRA_ARGS": " ".join(keep),
                   "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"}
        self.job = cluster.sbatch("--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1", f"--output={self.logs}",
                                  "launch/slurm/torchrun_multinode.sbatch", cwd=ROOT, env=job_env)
        self.state = "PENDING"

    def alive(self) -> bool:
        self.state = self.cluster.job(self.job).get("JobState", "COMPLETED")
        return self.state not in self.ENDED

    def kill(self) -> None:
        self.cluster.run("scancel", str(self.job), check=False)

    def finish(self) -> list[int]:
        while self.alive():
            time.sleep(0.5)
        return [0 if self.state == "COMPLETED" else 1]

    def log_tail(self) -> str:
        return self.logs.read_text(errors="replace")[-1500:] if self.logs.exists() else ""


def run_one(nodes: Nodes, model_args: list[str], method: str, engine: str, rate: str, steps: int, work: Path,
            timeout: float, cluster=None) -> dict:
    flags, _ = METHODS[method]
    out = work / f"{engine}-{method}-{rate}" / "out"
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    train = ["launch/train_qa.py", *model_args, *flags, *ENGINES[engine], "--steps", str(steps), "--log_every", "1",
             "--no_eval_before", "--eval_size", "2", "--output_dir", str(out)]
    nodes.shape(rate)
    before = link_bytes(nodes)
    t0 = time.monotonic()
    launch = (SlurmLaunch(cluster, train, env, out.parent / "run") if cluster is not None
              else TorchrunLaunch(nodes, train, env, out.parent / "run"))
    samples: dict[int, tuple[float, list[int]]] = {}  # step -> (wall time, link bytes) when its line appeared
    deadline = t0 + timeout
    while launch.alive():
        for record in train_lines(out / "metrics.jsonl"):
            samples.setdefault(record["step"], (time.monotonic() - t0, link_bytes(nodes)))
        if time.monotonic() > deadline:
            launch.kill()
            break
        time.sleep(0.05)
    codes = launch.finish()
    row = {"engine": engine, "method": method, "rate": rate, "steps": steps, "exit_codes": codes,
           "via": "slurm" if cluster is not None else "torchrun"}
    lines = train_lines(out / "metrics.jsonl")
    if any(codes) or len(lines) < steps:
        return {**row, "error": f"exit codes {codes}, {len(lines)} of {steps} steps", "log_tail": launch.log_tail()}
    elapsed = [r["elapsed_s"] for r in lines]
    step_times = [b - a for a, b in zip(elapsed, elapsed[1:])]
    steady = step_times[1:] or step_times  # from step 3 on (step 2 still warms caches and buckets)
    first_wall, first_bytes = samples.get(1, (None, before))
    last = max(samples)
    base = 2 if last > 2 and 2 in samples else 1
    per_node = [(b - a) / (last - base) for a, b in zip(samples[base][1], samples[last][1])] if last > base else None
    bps = rate_bits_per_second(rate)
    row.update({
        "step_s": statistics.median(steady),
        "first_step_s": first_wall,
        "MB_per_step": sum(per_node) / 1e6 if per_node else None,
        "floor_s": max(per_node) * 8 / bps if per_node and bps else 0.0,
        "startup_MB": sum(b - a for a, b in zip(before, first_bytes)) / 1e6,
        "wall_s": time.monotonic() - t0,
        "counted_payload_MB": (json.loads((out / "metrics.json").read_text()).get("comm_bytes_per_step") or {})
        .get("payload", 0) / 1e6,
    })
    return row


def table(rows: list[dict]) -> str:
    def engine(r):  # the launch path is part of the configuration compared
        return r["engine"] + (" (sbatch)" if r.get("via") == "slurm" else "")

    ok = [r for r in rows if "error" not in r]
    unlimited = {(engine(r), r["method"]): r["step_s"] for r in ok if r["rate"] == "unlimited"}
    out = ["| engine | method | rate | step s | vs unlimited | MB/step on the link | link floor s | first step s | "
           "start-up MB before step 1 |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in ok:
        base = unlimited.get((engine(r), r["method"]))
        ratio = "" if base is None else f"{r['step_s'] / base:.2f}x"
        out.append(f"| {engine(r)} | {r['method']} | {r['rate']} | {r['step_s']:.2f} | {ratio} | "
                   f"{r['MB_per_step']:.1f} | {r['floor_s']:.2f} | {r['first_step_s']:.1f} | "
                   f"{max(r['startup_MB'] - r['MB_per_step'], 0):.1f} |")
    for r in rows:
        if "error" in r:
            out.append(f"| {engine(r)} | {r['method']} | {r['rate']} | failed: {r['error']} | | | | | |")
    return "\n".join(out)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    ok = [r for r in rows if "error" not in r]
    engines = sorted({r["engine"] for r in ok})
    fig, axes = plt.subplots(1, len(engines), figsize=(6.5 * len(engines), 4.8), squeeze=False, sharey=True)
    for ax, engine in zip(axes[0], engines):
        for method in METHODS:
            pts = sorted(((rate_bits_per_second(r["rate"]) or 1e11) / 1e9, r["step_s"]) for r in ok
                         if r["engine"] == engine and r["method"] == method)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=method)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks([0.1, 1, 10, 100], ["0.1", "1", "10", "unlimited"])
        ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("link bandwidth, Gbit/s")
        ax.set_title(f"{engine}: step time vs bandwidth, 2 nodes x 1 rank")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("steady step time, s")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="smollm2 (embedded), tiny (random 2-block Llama) or a directory")
    p.add_argument("--engines", default="ddp,zero2")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--rates", default=",".join(RATES))
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--via", choices=["torchrun", "slurm"], default="torchrun",
                   help="torchrun per node by hand, or sbatch of launch/slurm/torchrun_multinode.sbatch on the local "
                        "two-node Slurm cluster (sg_distributed.tools.local_slurm) over the same shaped link")
    p.add_argument("--timeout", type=float, default=900, help="seconds per run before it is killed")
    p.add_argument("--out", default="benchmarks/results/network.jsonl")
    p.add_argument("--plot", default="benchmarks/results/network.png")
    p.add_argument("--report", action="store_true", help="run nothing: table and plot from the rows in --out")
    args = p.parse_args(argv)
    if args.report:
        rows = [json.loads(line) for line in (ROOT / args.out).read_text().splitlines() if line.strip()]
        print(table(rows))
        if args.plot:
            plot(rows, ROOT / args.plot)
            print(f"plot: {args.plot}")
        return 0
    engines, methods, rates = args.engines.split(","), args.methods.split(","), args.rates.split(",")
    for name, given, known in (("engine", engines, ENGINES), ("method", methods, METHODS)):
        bad = [g for g in given if g not in known]
        if bad:
            p.error(f"unknown {name}(s) {bad}; choose from {list(known)}")
    try:
        for rate in rates:
            rate_bits_per_second(rate)
        require_root_and_tools()
    except (ValueError, ClusterSetupError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.steps < 2:
        p.error("--steps must be at least 2 (a steady step needs one after the first)")
    work = Path(tempfile.mkdtemp(prefix="bench_network-"))
    if args.model == "smollm2":
        model_args = []
    elif args.model == "tiny":
        model_args = ["--model", str(tiny_model(work / "tiny"))]
    else:
        model_args = ["--model", args.model]
    cluster = None
    if args.via == "slurm":
        from sg_distributed.tools.local_slurm import LocalSlurm

        cluster = LocalSlurm(work / "slurm")
        cluster.up()  # brings the emulated nodes up too
        nodes = cluster.nodes
    else:
        nodes = Nodes(2)
        nodes.up()
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for engine in engines:
            for method in methods:
                if engine not in METHODS[method][1]:
                    continue
                for rate in rates:
                    row = run_one(nodes, model_args, method, engine, rate, args.steps, work, args.timeout, cluster)
                    row["model"] = args.model
                    rows.append(row)
                    with out.open("a") as handle:
                        handle.write(json.dumps(row) + "\n")
                    print(json.dumps({k: v for k, v in row.items() if k != "log_tail"}), flush=True)
    finally:
        if cluster is not None:
            cluster.down()
        else:
            nodes.down()
    print(table(rows))
    if args.plot and any("error" not in r for r in rows):
        plot(rows, ROOT / args.plot)
        print(f"plot: {args.plot}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
