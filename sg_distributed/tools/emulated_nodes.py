"""Emulated compute nodes on one host: a Linux network namespace per node, joined by a bridge, each link
rate-limited by a token bucket, so that traffic between "nodes" costs time the way a real network does.

Layout (``Nodes(2)``; root only, iproute2)::

    root namespace: bridge sgbr0, 10.77.0.254/24 (the "head" address: a Slurm controller listens here)
      |-- veth sgv1 <-> eth0 in namespace sg-node1, 10.77.0.1   (hostname node1)
      |-- veth sgv2 <-> eth0 in namespace sg-node2, 10.77.0.2   (hostname node2)

Each node's ``eth0`` carries a ``tc ... tbf`` qdisc when a rate is set: its egress is shaped, so each direction
of a node-to-node transfer crosses exactly one token bucket at that rate (this kernel has no netem; tbf works:
a socket test through 800 Mbit/s measured 800 Mbit/s). ``/etc/netns/<ns>/hosts`` makes the node names (and
this host's own name, mapped to the node's address so that gloo binds to ``eth0``) resolve inside each
namespace (``Node.exec_prefix`` bind-mounts it over ``/etc/hosts`` for the process it starts; so does
``ip netns exec``).

    python -m sg_distributed.tools.emulated_nodes up --rate 1gbit
    ip netns exec sg-node1 <command>          # runs "on node1"
    python -m sg_distributed.tools.emulated_nodes shape --rate 100mbit
    python -m sg_distributed.tools.emulated_nodes down
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

BRIDGE = "sgbr0"
SUBNET = "10.77.0"
HEAD_ADDRESS = f"{SUBNET}.254"
NETNS_ETC = Path("/etc/netns")
RATE_PATTERN = re.compile(r"^(unlimited|\d+(\.\d+)?(bit|kbit|mbit|gbit))$")
# tbf's bucket must hold at least one packet and enough bytes for the rate at the kernel's timer granularity;
# a deeper bucket only lets bursts through faster than the rate. Queue latency bounds the backlog in time.
BURST = {"bit": "32kb", "kbit": "32kb", "mbit": "256kb", "gbit": "4mb"}


class ClusterSetupError(RuntimeError):
    """A clear, user-facing reason why the emulated nodes cannot be set up here."""


def require_root_and_tools(tools: tuple[str, ...] = ("ip", "tc", "nsenter", "unshare")) -> None:
    if os.geteuid() != 0:
        raise ClusterSetupError("emulated nodes need root (network namespaces, veth pairs and tc qdiscs): run as root")
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise ClusterSetupError(f"{', '.join(missing)} not found on PATH: apt-get install iproute2")


def rate_bits_per_second(rate: str) -> float | None:
    """'100mbit' -> 1e8; 'unlimited' -> None. Raises ValueError naming the valid forms."""
    if not RATE_PATTERN.match(rate):
        raise ValueError(f"rate {rate!r} is not valid: use tc's units (e.g. 100mbit, 1gbit, 10gbit) or 'unlimited'")
    if rate == "unlimited":
        return None
    unit = re.sub(r"^[\d.]+", "", rate)
    return float(rate[: -len(unit)]) * {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}[unit]


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise ClusterSetupError(f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


@dataclass(frozen=True)
class Node:
    index: int  # 1-based

    @property
    def name(self) -> str:
        return f"node{self.index}"

    @property
    def netns(self) -> str:
        return f"sg-node{self.index}"

    @property
    def address(self) -> str:
        return f"{SUBNET}.{self.index}"

    @property
    def host_veth(self) -> str:
        return f"sgv{self.index}"

    def exec_prefix(self) -> list[str]:
        """Prefix a command with this to run it "on the node": in its network namespace, with its hosts file.

        Not ``ip netns exec``: that also remounts /sys, which hides the host's cgroup mounts from slurmd. Here
        only the network namespace changes, plus a private mount namespace for the hosts file."""
        return ["nsenter", f"--net=/run/netns/{self.netns}", "unshare", "--mount", "--propagation", "private",
                "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"', str(NETNS_ETC / self.netns / "hosts")]


class Nodes:
    """``count`` emulated nodes. ``up()`` is idempotent (an earlier layout is removed first); ``down()`` removes
    everything ``up()`` made and ignores what is already gone."""

    def __init__(self, count: int = 2):
        if not 1 <= count <= 200:
            raise ValueError(f"count={count}: between 1 and 200 emulated nodes")
        self.nodes = [Node(i) for i in range(1, count + 1)]
        self.hostname = socket.gethostname()

    def __iter__(self):
        return iter(self.nodes)

    def __getitem__(self, i: int) -> Node:
        return self.nodes[i]

    def hosts_file(self, own: Node) -> str:
        lines = ["127.0.0.1 localhost", f"{HEAD_ADDRESS} sg-head"]
        for node in self.nodes:
            names = f"{node.name} {self.hostname}" if node == own else node.name
            lines.append(f"{node.address} {names}")
        return "\n".join(lines) + "\n"

    def up(self, rate: str = "unlimited") -> None:
        require_root_and_tools()
        rate_bits_per_second(rate)  # validate before touching anything
        self.down()
        _run("ip", "link", "add", BRIDGE, "type", "bridge")
        _run("ip", "addr", "add", f"{HEAD_ADDRESS}/24", "dev", BRIDGE)
        _run("ip", "link", "set", BRIDGE, "up")
        for node in self.nodes:
            _run("ip", "netns", "add", node.netns)
            _run("ip", "link", "add", node.host_veth, "type", "veth", "peer", "name", "eth0", "netns", node.netns)
            _run("ip", "link", "set", node.host_veth, "master", BRIDGE)
            _run("ip", "link", "set", node.host_veth, "up")
            _run("ip", "-n", node.netns, "link", "set", "lo", "up")
            _run("ip", "-n", node.netns, "addr", "add", f"{node.address}/24", "dev", "eth0")
            _run("ip", "-n", node.netns, "link", "set", "eth0", "up")
            etc = NETNS_ETC / node.netns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(self.hosts_file(node))
        self.shape(rate)

    def shape(self, rate: str) -> None:
        """Set every node's egress rate (``unlimited`` removes the bucket)."""
        rate_bits_per_second(rate)
        for node in self.nodes:
            _run("tc", "-n", node.netns, "qdisc", "del", "dev", "eth0", "root", check=False)
            if rate != "unlimited":
                unit = re.sub(r"^[\d.]+", "", rate)
                _run("tc", "-n", node.netns, "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", rate,
                     "burst", BURST[unit], "latency", "200ms")

    def current_rate(self, node: Node | None = None) -> str:
        node = node or self.nodes[0]
        out = _run("tc", "-n", node.netns, "qdisc", "show", "dev", "eth0").stdout
        match = re.search(r"tbf .*?rate (\S+)", out)
        return match.group(1) if match else "unlimited"

    def down(self) -> None:
        for node in self.nodes:
            _run("ip", "netns", "del", node.netns, check=False)
            _run("ip", "link", "del", node.host_veth, check=False)
            shutil.rmtree(NETNS_ETC / node.netns, ignore_errors=True)
        _run("ip", "link", "del", BRIDGE, check=False)

    def is_up(self) -> bool:
        listed = _run("ip", "netns", "list", check=False).stdout.split()
        return all(node.netns in listed for node in self.nodes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sg_distributed.tools.emulated_nodes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("up", "shape", "down", "show"))
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--rate", default="unlimited", help="per-node egress rate: 100mbit, 1gbit, ... or unlimited")
    args = parser.parse_args(argv)
    nodes = Nodes(args.nodes)
    try:
        if args.action == "up":
            nodes.up(args.rate)
        elif args.action == "shape":
            nodes.shape(args.rate)
        elif args.action == "down":
            require_root_and_tools()
            nodes.down()
            return 0
        for node in nodes:
            print(f"{node.name}: namespace {node.netns}, address {node.address}, rate {nodes.current_rate(node)}")
    except (ClusterSetupError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
