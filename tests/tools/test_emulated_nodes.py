"""tools/emulated_nodes.py and benchmarks/bench_network.py: two network namespaces joined by a token-bucket link.

Rate parsing runs anywhere; the rest needs root (namespaces, veth, tc) and skips with the reason elsewhere, unless
``SG_REQUIRE_CLUSTER=1`` (``.ci/run``) turns the skip into a failure."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sg_distributed.tools.emulated_nodes import Nodes, rate_bits_per_second

ROOT = Path(__file__).resolve().parents[2]


def test_rates_parse_and_bad_ones_name_the_valid_forms():
    assert rate_bits_per_second("100mbit") == 1e8 and rate_bits_per_second("10gbit") == 1e10
    assert rate_bits_per_second("unlimited") is None
    with pytest.raises(ValueError, match=r"'100MB' is not valid: use tc's units \(e.g. 100mbit"):
        rate_bits_per_second("100MB")


@pytest.fixture
def root_only():
    if os.geteuid() != 0:
        if os.environ.get("SG_REQUIRE_CLUSTER") == "1":
            pytest.fail("SG_REQUIRE_CLUSTER=1 but not running as root")
        pytest.skip("needs root (network namespaces, veth pairs, tc)")


def test_the_link_between_nodes_runs_at_the_set_rate(root_only):
    """8 MB from node1 to node2 through a 200 Mbit/s bucket take about 0.34 s (measured from the receiver)."""
    nodes = Nodes(2)
    nodes.up("200mbit")
    try:
        assert nodes.current_rate() == "200Mbit"
        receiver = subprocess.Popen([*nodes[1].exec_prefix(), sys.executable, "-c", (
            "import socket, time\n"
            "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
            "s.bind(('0.0.0.0', 5901)); s.listen(1); c, _ = s.accept(); n = 0; t = None\n"
            "while True:\n"
            "    b = c.recv(1 << 20)\n"
            "    if not b: break\n"
            "    t = t or time.monotonic(); n += len(b)\n"
            "print(n * 8 / (time.monotonic() - t))\n")], stdout=subprocess.PIPE, text=True)
        time.sleep(1.0)
        sender = subprocess.run([*nodes[0].exec_prefix(), sys.executable, "-c", (
            "import socket\n"
            "s = socket.create_connection(('node2', 5901)); s.sendall(b'x' * 8_000_000); s.close()\n")],
            capture_output=True, text=True, timeout=60)
        assert sender.returncode == 0, sender.stderr
        bits_per_s = float(receiver.communicate(timeout=60)[0])
        assert 0.75 * 2e8 < bits_per_s < 1.05 * 2e8
    finally:
        nodes.down()
    assert not nodes.is_up()


@pytest.mark.multiprocess
def test_bench_network_runs_the_tiny_model_across_a_shaped_link(root_only, tmp_path):
    out = tmp_path / "network.jsonl"
    proc = subprocess.run([sys.executable, "benchmarks/bench_network.py", "--model", "tiny", "--engines", "ddp",
                           "--methods", "sparsegrad", "--rates", "1gbit", "--steps", "3", "--out", str(out),
                           "--plot", str(tmp_path / "network.png")], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["exit_codes"] == [0, 0] and row["rate"] == "1gbit"
    assert row["MB_per_step"] > 0 and row["step_s"] > 0 and row["first_step_s"] > row["step_s"]
    assert (tmp_path / "network.png").stat().st_size > 10_000
    assert "| ddp | sparsegrad | 1gbit |" in proc.stdout
