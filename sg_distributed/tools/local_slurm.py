"""A throwaway two-node Slurm cluster on this host, for trying and testing the batch scripts under the real
scheduler (real ``sbatch`` / ``srun`` / ``scontrol`` / ``scancel``, requeue, node failure), not a fake.

Debian's Slurm 22.05 (``apt-get install slurmctld slurmd slurm-client munge``), run as root:

* a private ``munged`` (its own key and socket under the cluster directory; the system's is left alone);
* ``slurmctld`` in the root namespace on the head address of :mod:`sg_distributed.tools.emulated_nodes`;
* one ``slurmd -N nodeI`` inside each emulated node's network namespace, so each node has its own address and
  the links between nodes can be rate-limited (``--rate``).

Everything lives in one directory (config, state, spools, logs, pids); client commands need
``SLURM_CONF=<dir>/slurm.conf`` (``env`` prints it)::

    python -m sg_distributed.tools.local_slurm up  --dir /tmp/sg-slurm      # or: make slurm-up
    export SLURM_CONF=/tmp/sg-slurm/slurm.conf
    sinfo; sbatch --nodes=2 ...
    python -m sg_distributed.tools.local_slurm down --dir /tmp/sg-slurm    # or: make slurm-down
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from sg_distributed.tools.emulated_nodes import HEAD_ADDRESS, ClusterSetupError, Nodes, require_root_and_tools

DEFAULT_DIR = Path("/tmp/sg-slurm")
DAEMONS = ("munged", "slurmctld", "slurmd")
INSTALL_HINT = "apt-get install -y slurmctld slurmd slurm-client munge"


def missing_slurm_tools() -> list[str]:
    return [t for t in (*DAEMONS, "sbatch", "srun", "scontrol", "scancel", "squeue", "sinfo", "mungekey")
            if shutil.which(t) is None and not Path("/usr/sbin", t).exists()]


def _which(tool: str) -> str:
    return shutil.which(tool) or str(Path("/usr/sbin", tool))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def slurm_conf(directory: Path, nodes: Nodes, ctld_port: int, node_ports: list[int], kill_wait: int) -> str:
    d = directory
    lines = [
        "# written by sg_distributed.tools.local_slurm: a throwaway cluster on one host",
        "ClusterName=sglocal",
        f"SlurmctldHost={socket.gethostname().split('.')[0]}({HEAD_ADDRESS})",
        f"SlurmctldPort={ctld_port}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        # cred_expire also delays a requeued job's restart (Slurm's default: 120 s)
        f"AuthInfo=socket={d}/munge/munge.socket,cred_expire=10",
        f"StateSaveLocation={d}/state",
        f"SlurmdSpoolDir={d}/spool/%n",
        f"SlurmctldPidFile={d}/slurmctld.pid",
        f"SlurmdPidFile={d}/slurmd.%n.pid",
        f"SlurmctldLogFile={d}/log/slurmctld.log",
        f"SlurmdLogFile={d}/log/slurmd.%n.log",
        "ProctrackType=proctrack/linuxproc",  # no cgroups needed; the step's processes are tracked by parentage
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "SchedulerType=sched/backfill",
        "MpiDefault=none",
        "ReturnToService=2",  # a node that went down comes back by itself once its slurmd registers again
        "JobRequeue=1",
        f"KillWait={kill_wait}",  # seconds between a job's SIGTERM and SIGKILL (cancel, time limit, node loss)
        "SlurmdTimeout=30",
        "InactiveLimit=0",
        "MinJobAge=300",
        "SchedulerParameters=nohold_on_prolog_fail",
    ]
    for node, port in zip(nodes, node_ports):
        lines.append(f"NodeName={node.name} NodeAddr={node.address} Port={port} CPUs=2 State=UNKNOWN")
    lines.append(f"PartitionName=debug Nodes={','.join(n.name for n in nodes)} Default=YES MaxTime=INFINITE State=UP")
    return "\n".join(lines) + "\n"


class LocalSlurm:
    """``up()`` starts munged, slurmctld and one slurmd per emulated node and waits until every node is idle;
    ``down()`` stops them and removes the namespaces. ``env()`` is what client commands need."""

    def __init__(self, directory: str | Path = DEFAULT_DIR, nodes: int = 2, kill_wait: int = 30):
        self.dir = Path(directory).resolve()
        self.nodes = Nodes(nodes)
        self.kill_wait = kill_wait

    @property
    def conf(self) -> Path:
        return self.dir / "slurm.conf"

    def env(self, base: dict | None = None) -> dict:
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        return env

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise ClusterSetupError(f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    # ------------------------------------------------------------------------------------------------ up
    def up(self, rate: str = "unlimited", timeout: float = 60) -> None:
        require_root_and_tools()
        missing = missing_slurm_tools()
        if missing:
            raise ClusterSetupError(f"Slurm is not installed ({', '.join(missing)} missing): {INSTALL_HINT}")
        self.down()
        shutil.rmtree(self.dir, ignore_errors=True)
        for sub in ("munge", "state", "log", *(f"spool/{node.name}" for node in self.nodes)):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self.nodes.up(rate)
        ports = [_free_port() for _ in range(len(self.nodes.nodes) + 1)]
        self.conf.write_text(slurm_conf(self.dir, self.nodes, ports[0], ports[1:], self.kill_wait))
        (self.dir / "cgroup.conf").write_text("CgroupPlugin=autodetect\nIgnoreSystemd=yes\n")
        self._start_munge()
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        for node in self.nodes:
            self._spawn(f"slurmd.{node.name}",
                        [*node.exec_prefix(), _which("slurmd"), "-D", "-N", node.name, "-f", str(self.conf)])
        self._wait_idle(timeout)

    def _start_munge(self) -> None:
        munge = self.dir / "munge"
        key = munge / "munge.key"
        subprocess.run([_which("mungekey"), "--create", "--keyfile", str(key)], check=True, capture_output=True)
        key.chmod(0o600)
        munge.chmod(0o755)  # munged wants its socket's directory traversable by all
        self._spawn("munged", [_which("munged"), "--foreground", "--force", "--key-file", str(key),
                               "--socket", str(munge / "munge.socket"), "--pid-file", str(munge / "munged.pid"),
                               "--log-file", str(munge / "munged.log"), "--seed-file", str(munge / "munged.seed")])
        deadline = time.monotonic() + 10
        while not (munge / "munge.socket").exists():
            if time.monotonic() > deadline:
                raise ClusterSetupError(f"munged did not start: see {munge / 'munged.log'}")
            time.sleep(0.1)

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.dir / "log" / f"{name}.out", "ab")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=self.env())
        (self.dir / f"{name}.daemon").write_text(str(proc.pid))

    def node_states(self) -> dict[str, str]:
        out = self.run("sinfo", "--noheader", "--Node", "--format=%N %T", check=False).stdout
        return dict(line.split() for line in out.splitlines() if len(line.split()) == 2)

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            states = self.node_states()
            if len(states) == len(self.nodes.nodes) and all(s == "idle" for s in states.values()):
                return
            time.sleep(0.5)
        raise ClusterSetupError(f"nodes not idle after {timeout:.0f}s: {states or 'slurmctld not answering'}; "
                                f"logs in {self.dir / 'log'}")

    # ------------------------------------------------------------------------------------------------ down
    def down(self) -> None:
        for pidfile in sorted(self.dir.glob("*.daemon")):
            try:
                os.killpg(int(pidfile.read_text()), signal.SIGTERM)
            except (ProcessLookupError, ValueError, PermissionError):
                pass
        deadline = time.monotonic() + 10
        for pidfile in sorted(self.dir.glob("*.daemon")):
            pid = int(pidfile.read_text())
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.1)
            if _alive(pid):
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            pidfile.unlink()
        if os.geteuid() == 0 and shutil.which("ip"):
            self.nodes.down()

    # ------------------------------------------------------------------------------------------------ jobs
    def sbatch(self, *args: str, cwd: str | Path | None = None, env: dict | None = None) -> int:
        proc = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, env=self.env(env), capture_output=True,
                              text=True, timeout=60)
        if proc.returncode != 0:
            raise ClusterSetupError(f"sbatch {' '.join(args)} failed: {proc.stderr.strip()}")
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, ExitCode, Restarts, NodeList, ...); {} once it is purged."""
        proc = self.run("scontrol", "show", "job", "--oneliner", str(job_id), check=False)
        fields = {}
        for token in proc.stdout.split():
            key, _, value = token.partition("=")
            fields.setdefault(key, value)
        return fields

    def wait_state(self, job_id: int, states: set[str], timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not in {sorted(states)} after {timeout:.0f}s: {info.get('JobState')}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sg_distributed.tools.local_slurm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("up", "down", "env", "status"))
    parser.add_argument("--dir", default=str(DEFAULT_DIR), help="where config, state and logs live [%(default)s]")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--rate", default="unlimited", help="link rate between nodes (tc units) [%(default)s]")
    args = parser.parse_args(argv)
    cluster = LocalSlurm(args.dir, args.nodes)
    try:
        if args.action == "up":
            cluster.up(args.rate)
            print(f"two-node Slurm up: {cluster.node_states()}\nexport SLURM_CONF={cluster.conf}")
        elif args.action == "down":
            cluster.down()
        elif args.action == "env":
            print(f"export SLURM_CONF={cluster.conf}")
        else:
            print(cluster.node_states() or "not running")
    except (ClusterSetupError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
