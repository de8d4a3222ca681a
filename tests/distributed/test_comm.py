"""sg_distributed.distributed.comm: analytic byte formulas (DESIGN §2), the CommCounter, and a 2-rank ZeRO-2 count."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from sg_distributed.distributed import comm
from sg_distributed.distributed.comm import (
    CollectiveDeviceError, CommCounter, check_collective_devices, dense_allreduce_bytes, design_cost_check,
    kvector_allreduce_bytes, sparse_allgather_bytes, sparse_breakeven_density, wire_bytes)
from sg_distributed.sparsegrad.config import SparseGradConfig

from conftest import free_port, run_ranks

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------ analytic formulas


def test_formulas_small_cases():
    assert dense_allreduce_bytes(1000, 2, bytes_per=4) == 4000  # 2(p-1)/p = 1 at p=2
    assert dense_allreduce_bytes(1000, 8, bytes_per=2) == pytest.approx(2 * 7 / 8 * 2000)
    assert dense_allreduce_bytes(1000, 1) == 0
    assert sparse_allgather_bytes(10, 4, index_bytes=4, value_bytes=2) == 3 * 10 * 6
    assert kvector_allreduce_bytes(10, 8, value_bytes=2) == dense_allreduce_bytes(10, 8, 2)
    with pytest.raises(ValueError):
        dense_allreduce_bytes(10, 0)


def test_breakeven_density_is_two_over_three_p_in_bf16():
    for p in (2, 8, 64):
        d = sparse_breakeven_density(p)
        assert d == pytest.approx(2 / (3 * p))
        N = 10**6
        assert sparse_allgather_bytes(round(d * N), p) == pytest.approx(dense_allreduce_bytes(N, p), rel=1e-4)


def test_wire_bytes_ring_conventions():
    N, p = 800, 8
    assert wire_bytes("all_reduce", N, p) == pytest.approx(2 * 7 / 8 * N)
    assert wire_bytes("reduce_scatter_tensor", N, p) == pytest.approx(7 / 8 * N)
    assert wire_bytes("all_gather_into_tensor", N, p) == pytest.approx(7 / 8 * N)
    assert wire_bytes("broadcast", N, p) == N
    assert wire_bytes("recv", N, p) == 0
    assert wire_bytes("barrier", N, p) == 0
    assert wire_bytes("all_reduce", N, 1) == 0


def test_design_cost_check_reproduces_design_numbers():
    c = design_cost_check()
    assert c["N"] == 22 * 11008 * 4096
    assert round(c["density"] * 100, 2) == 0.22
    assert round(c["dense_allreduce"] / 1e9, 2) == 3.47  # GB per rank per step
    assert round(c["sparse_allgather"] / 1e6) == 92  # MB
    assert round(c["kvector_allreduce"] / 1e6, 1) == 7.7  # MB
    assert round(c["sparse_ratio"]) == 38
    assert round(c["kvector_ratio"]) == 451


# ------------------------------------------------------------------ counter on a 1-rank gloo group


def test_counter_counts_payload_by_op_and_label(one_rank_group):
    originals = (dist.all_reduce, dist.distributed_c10d.all_gather_into_tensor)
    t = torch.ones(10)  # 40 bytes
    with CommCounter() as counter:
        assert dist.all_reduce is not originals[0]
        dist.all_reduce(t)
        with counter.label("converted"):
            dist.distributed_c10d.all_reduce(torch.ones(5, dtype=torch.float64))  # 40 bytes
            out = torch.empty(3)
            dist.all_gather_into_tensor(out, torch.ones(3))
        dist.broadcast(torch.ones(4), src=0)
        dist.barrier()
        with counter.paused():
            dist.all_reduce(t)
        objs = [None]
        dist.all_gather_object(objs, {"x": 1})
    assert (dist.all_reduce, dist.distributed_c10d.all_gather_into_tensor) == originals  # restored on exit
    dist.all_reduce(t)  # not counted after exit
    snap = counter.snapshot()
    by_op = snap.by_op()
    assert by_op["all_reduce"].calls == 2 and by_op["all_reduce"].payload == 80
    assert by_op["all_gather_into_tensor"].payload == 12
    assert by_op["broadcast"].payload == 16
    assert by_op["barrier"].calls == 1 and by_op["barrier"].payload == 0
    assert by_op["all_gather_object"].calls == 1 and by_op["all_gather_object"].payload > 0
    assert all(s.wire == 0 for s in by_op.values())  # one rank: nothing on the wire
    assert snap.by_label()["converted"].payload == 52
    assert counter.per_step(2).total().payload == pytest.approx(snap.total().payload / 2)
    table = counter.table(steps=1)
    assert table.startswith("| op |") and "**total**" in table
    assert counter.reset().total().payload == snap.total().payload
    assert counter.snapshot().total().calls == 0


def test_dispatch_layer_agrees_with_python_layer(one_rank_group):
    def work():
        dist.all_reduce(torch.ones(7))
        dist.all_gather_into_tensor(torch.empty(2), torch.ones(2))
        dist.reduce_scatter_tensor(torch.empty(3), torch.ones(3))

    with CommCounter() as a:
        work()
    with CommCounter(layer="dispatch") as b:
        work()
    assert {k: (v.calls, v.payload) for k, v in a.snapshot().by_op().items()} == \
        {k: (v.calls, v.payload) for k, v in b.snapshot().by_op().items()}


def test_nested_counters_share_the_patch(one_rank_group):
    with CommCounter() as outer:
        with CommCounter() as inner:
            dist.all_reduce(torch.ones(2))
        dist.all_reduce(torch.ones(2))
        assert dist.all_reduce is not comm._ORIGINALS["all_reduce"]
    assert dist.all_reduce is comm._ORIGINALS["all_reduce"]
    assert inner.snapshot().total().payload == 8 and outer.snapshot().total().payload == 16


# ------------------------------------------------------------------ collective-device check (NCCL's rule, on CPU)


def test_device_check_refuses_a_cpu_tensor_where_the_group_takes_cuda(one_rank_group):
    t = torch.ones(3)
    with CommCounter(expected_device="cuda") as counter:  # what NCCL would require
        with pytest.raises(CollectiveDeviceError, match=r"all_reduce: argument tensor \(\(3,\), torch.float32\) is on "
                                                        r"cpu, but the check was told to expect cuda"):
            dist.all_reduce(t)
    assert counter.snapshot().total().calls == 0  # refused before the call ran
    with check_collective_devices("meta"), pytest.raises(CollectiveDeviceError,  # one bad tensor in a list
                                                         match=r"all_gather: argument tensor_list\[1\] .* is on cpu"):
        dist.all_gather([torch.empty(3, device="meta"), torch.empty(3)], torch.empty(3, device="meta"))
    with CommCounter(check_device=True) as ok:  # default expectation: the group's device (gloo: cpu)
        dist.all_reduce(t)
        dist.all_gather_object([None], {"x": 1})
    assert ok.snapshot().by_op()["all_reduce"].calls == 1
    assert dist.all_reduce is comm._ORIGINALS["all_reduce"]  # the check's patch is gone with the counter


def test_device_check_covers_deepspeeds_cached_functions_and_the_ddp_hook(one_rank_group, monkeypatch):
    import types

    # DeepSpeed's TorchBackend caches all_gather_into_tensor at init_distributed: a stand-in backend
    cdb = types.SimpleNamespace(all_gather_function=dist.all_gather_into_tensor,
                                reduce_scatter_function=dist.reduce_scatter_tensor)
    monkeypatch.setitem(sys.modules, "deepspeed.comm.comm", types.SimpleNamespace(cdb=cdb))
    ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 2))
    with check_collective_devices("cuda"):
        with pytest.raises(CollectiveDeviceError, match="all_gather_into_tensor: argument output_tensor"):
            cdb.all_gather_function(torch.empty(3), torch.ones(3))
        ddp.register_comm_hook(None, CommCounter().ddp_hook())
        with pytest.raises(RuntimeError, match="all_reduce: argument tensor .* is on cpu"):
            ddp(torch.ones(4, 3)).sum().backward()
    cdb.all_gather_function(torch.empty(3), torch.ones(3))  # restored: no check
    assert cdb.all_gather_function is comm._ORIGINALS["all_gather_into_tensor"]


def test_device_check_follows_each_backend_of_a_mixed_group(one_rank_group, monkeypatch):
    import types

    meta = [("tensor", torch.empty(2, device="meta"))]  # stands in for a CUDA tensor
    group = types.SimpleNamespace(_device_types=[torch.device("meta"), torch.device("cpu")])
    with check_collective_devices():
        monkeypatch.setattr(comm, "_backend_name", lambda g: "cpu:gloo,meta:nccl")
        comm._check_tensors("all_reduce", meta, group)  # each device type has its backend: allowed
        monkeypatch.setattr(comm, "_backend_name", lambda g: "gloo")
        with pytest.raises(CollectiveDeviceError, match=r"is on meta, but the process group \(gloo\) takes cpu"):
            comm._check_tensors("all_reduce", meta, group)


def test_dispatch_layer_checks_c10d_operators(one_rank_group):
    with CommCounter(layer="dispatch", expected_device="cuda"):
        with pytest.raises(CollectiveDeviceError, match="c10d::allreduce_: argument args\\[0\\]\\[0\\]"):
            comm._ORIGINALS["all_reduce"](torch.ones(2))  # below the python layer: only the mode sees it


def test_device_check_env_switch(monkeypatch):
    monkeypatch.setenv("SG_CHECK_COLLECTIVE_DEVICE", "1")
    assert CommCounter().check_device and not CommCounter(check_device=False).check_device
    monkeypatch.setenv("SG_CHECK_COLLECTIVE_DEVICE", "0")
    assert not CommCounter().check_device and CommCounter(expected_device="cuda").check_device
    monkeypatch.setenv("SG_CHECK_COLLECTIVE_DEVICE", "yes please")
    with pytest.raises(ValueError, match="SG_CHECK_COLLECTIVE_DEVICE='yes please': use 1"):
        CommCounter()


# ------------------------------------------------------------------ real 2-rank ZeRO-2 run


@pytest.mark.multiprocess
def test_zero2_bytes_full_vs_sparsegrad(tmp_path):
    hidden, inter, density = 64, 256, 0.01
    out = tmp_path / "comm.json"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(REPO / "tests" / "comm_worker.py"), "--out", str(out),
           "--stage", "2", "--steps", "2", "--hidden", str(hidden), "--intermediate", str(inter),
           "--density", str(density)]
    proc = run_ranks(cmd, cwd=REPO, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = json.loads(out.read_text())["ranks"]
    assert len(ranks) == 2

    # Tiny Llama: 2 blocks x {up, down} (the default targets), fp32.
    d_full = 2 * 2 * hidden * inter
    k_total = 4 * SparseGradConfig(density=density).entries_for(inter, hidden)
    for r in ranks:
        full, sg = r["full"], r["sparsegrad"]
        assert full["trainable_numel"] == d_full
        assert sg["trainable_numel"] == k_total

        def reduce_bytes(res):  # gradient reduction issued during engine.backward
            return sum(s["payload"] for s in res["backward_by_op"].values())

        # ZeRO-2 reduces every trainable fp32 gradient once per step (bucket padding would show up here)
        assert d_full * 4 <= reduce_bytes(full) <= d_full * 4 * 1.02 + 64
        assert k_total * 4 <= reduce_bytes(sg) <= k_total * 4 * 1.02 + 64
        # ... and all-gathers the updated partitions (1/p of the parameters per rank) at the step
        assert full["step_by_op"]["all_gather_into_tensor"]["payload"] == pytest.approx(d_full * 4 / 2, rel=0.02)
        # the promise: <= 2 % of dense traffic at 1 % density (scalar all-reduces are the slack)
        assert reduce_bytes(sg) / reduce_bytes(full) <= 0.02 + 1e-3
        assert sg["total"]["wire"] / full["total"]["wire"] <= 0.02 + 1e-3


# ------------------------------------------------------------------ cross-checks against independent counters
#
# tests/comm_crosscheck_worker.py counts one step of a tiny MLP (16-32-4, fp32: N = 676 values, 2704 B) per engine
# with CommCounter, torch's CommDebugMode (op counts only) and, under DeepSpeed, DeepSpeed's comms logger (op
# counts and message sizes), all at once, on 2 gloo ranks. Why CommCounter does not sit on either of them: see
# "Why not CommDebugMode or DeepSpeed's comms logger" in sg_distributed/distributed/comm.py.

MLP_BYTES = (16 * 32 + 32 + 32 * 4 + 4) * 4
CDM_OPS = {"c10d.allreduce_": "all_reduce", "c10d._allgather_base_": "all_gather_into_tensor",
           "c10d._reduce_scatter_base_": "reduce_scatter_tensor", "c10d.broadcast_": "broadcast",
           "c10d.allgather_": "all_gather", "c10d_functional.all_reduce": "all_reduce"}


@pytest.fixture(scope="module")
def crosscheck(tmp_path_factory):
    out = tmp_path_factory.mktemp("crosscheck") / "counts.json"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(REPO / "tests" / "comm_crosscheck_worker.py"), "--out", str(out),
           "--engines", "eager,ddp,fsdp2,zero2,zero3"]
    proc = run_ranks(cmd, cwd=REPO, env=env, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())["ranks"]


def _calls(by_op: dict) -> dict:
    return {op: s["calls"] for op, s in by_op.items() if s["calls"]}


@pytest.mark.multiprocess
def test_commcounter_and_commdebugmode_agree_on_op_counts(crosscheck):
    # What each counter sees that the other does not, per engine (measured, torch 2.13):
    only_counter = {"eager": {"barrier": 1, "send": 1, "recv": 1}}  # CommDebugMode's op set has no barrier/send/recv_
    # (the functional all-reduce of clip_grad_norm_ over FSDP2's DTensor gradients is counted by both now)
    only_cdm = {"ddp": {"broadcast": 2}}  # DDP rebuilds its buckets at the 2nd backward: C++ broadcasts
    for rank, res in enumerate(crosscheck):
        for engine, counts in res.items():
            cdm = {}
            for op, n in counts["commdebugmode"].items():
                cdm[CDM_OPS.get(op, op)] = cdm.get(CDM_OPS.get(op, op), 0) + n
            counter = _calls(counts["python"])
            for op, n in _calls(counts.get("ddp_hook", {})).items():  # DDP's reducer is counted by Engine's hook
                counter[op] = counter.get(op, 0) + n
            diff_counter = {op: n - cdm.get(op, 0) for op, n in counter.items() if n != cdm.get(op, 0)}
            diff_cdm = {op: n - counter.get(op, 0) for op, n in cdm.items() if n != counter.get(op, 0)}
            expected_counter = dict(only_counter.get(engine, {}))
            if engine == "eager":
                expected_counter.pop("recv" if rank == 0 else "send")
            assert diff_counter == expected_counter, (rank, engine, counter, cdm)
            assert diff_cdm == only_cdm.get(engine, {}), (rank, engine, counter, cdm)
            # the dispatch layer sees every c10d operator CommDebugMode sees, DDP's C++ calls included
            c10d = {CDM_OPS.get(op, op): n for op, n in counts["commdebugmode"].items()
                    if not op.startswith("c10d_functional.")}
            assert {op: n for op, n in _calls(counts["dispatch"]).items() if op in c10d} == c10d, (rank, engine)
    # and the bytes are the analytic ones: every gradient reduced once, FSDP2 gathers each shard fwd + bwd
    for res in crosscheck:
        assert res["ddp"]["ddp_hook"]["all_reduce"]["payload"] == MLP_BYTES
        assert res["ddp"]["ddp_hook"]["all_reduce"]["wire"] == dense_allreduce_bytes(MLP_BYTES // 4, 2, 4)
        assert res["fsdp2"]["python"]["reduce_scatter_tensor"]["payload"] == MLP_BYTES
        assert res["fsdp2"]["python"]["all_gather_into_tensor"]["payload"] == 2 * MLP_BYTES // 2
        assert res["zero2"]["python"]["all_gather_into_tensor"]["payload"] == MLP_BYTES // 2
        assert res["zero3"]["python"]["reduce_scatter_tensor"]["payload"] == MLP_BYTES


@pytest.mark.multiprocess
def test_commcounter_bytes_equal_deepspeeds_comms_logger(crosscheck):
    p = len(crosscheck)
    for rank, res in enumerate(crosscheck):
        for engine in ("zero2", "zero3"):
            logged, counted = res[engine]["ds_comms_logger"], res[engine]["python"]
            assert set(logged) == set(counted), (rank, engine, logged, counted)
            for op, sizes in logged.items():
                calls = sum(sizes.values())
                nbytes = sum(int(size) * n for size, n in sizes.items())  # the ``tensor`` argument of each call
                if op == "broadcast":  # DeepSpeed logs the tensor on every rank; payload counts it on the source only
                    payload, wire = (nbytes, float(nbytes)) if rank == 0 else (0, 0.0)
                else:  # ring bytes from the logged sizes (all-gather: the logged tensor is one shard of p)
                    payload, wire = nbytes, wire_bytes(op, nbytes * (p if op.startswith("all_gather") else 1), p)
                assert (counted[op]["calls"], counted[op]["payload"]) == (calls, payload), (rank, engine, op)
                assert counted[op]["wire"] == pytest.approx(wire), (rank, engine, op)
    assert crosscheck[0]["zero2"]["ds_comms_logger"]["all_reduce"][str(MLP_BYTES)] == 1  # the gradients, once
