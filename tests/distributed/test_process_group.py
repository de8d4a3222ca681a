"""distributed/process_group.py: the device collectives use, and process-group set-up for NCCL (checked on CPU)."""
import types

import pytest
import torch
import torch.distributed as dist

from sg_distributed.distributed import process_group as runtime
from sg_distributed.distributed.process_group import all_reduce_mean, collective_device


def test_collective_device_follows_the_groups_backend(one_rank_group, monkeypatch):
    assert collective_device() == torch.device("cpu")  # gloo takes CPU tensors
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    nccl_like = types.SimpleNamespace(_device_types=[torch.device("cuda")])
    assert collective_device(nccl_like) == torch.device("cuda", 1)  # NCCL: the current CUDA device
    mixed = types.SimpleNamespace(_device_types=[torch.device("cuda"), torch.device("cpu")])
    assert collective_device(mixed) == torch.device("cpu")  # "cpu:gloo,cuda:nccl": host values stay on the host


def test_collective_device_without_a_process_group():
    assert not dist.is_initialized() and collective_device() == torch.device("cpu")


def test_all_reduce_mean_weights_ranks_and_builds_on_the_collective_device(one_rank_group, monkeypatch):
    assert all_reduce_mean({"f1": 0.5, "loss": 2.0}, 4) == {"f1": 0.5, "loss": 2.0, "num_examples": 4}

    class Stop(Exception):
        pass

    seen = []

    def fake_all_reduce(tensor, *args, **kwargs):
        seen.append(tensor.device)
        raise Stop

    monkeypatch.setattr(runtime, "collective_device", lambda group=None: torch.device("meta"))  # stands in for cuda
    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    with pytest.raises(Stop):
        all_reduce_mean({"loss": 1.0}, 2)
    assert seen == [torch.device("meta")]


def test_init_process_group_sets_the_cuda_device_before_nccl_starts(monkeypatch):
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append(("init", backend)))
    assert runtime.init_process_group(use_deepspeed=False) == runtime.DistInfo()  # (the fake init initialises nothing)
    assert calls == [("set_device", 1), ("init", "nccl")]


def _replica_worker(rank, port, perturb, results):
    import os

    from torch import nn

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
        model[1].weight.requires_grad_(False)  # frozen weights count too
        if perturb and rank == 1:
            with torch.no_grad():
                model[1].weight[3] += 1e-6
        agree = runtime.replicas_agree(model)
        ddp = nn.parallel.DistributedDataParallel(model, init_sync=not agree)  # what training/engine.py does
        state = [t.detach().clone() for t in ddp.module.state_dict().values()]
        gathered = [None, None]
        dist.all_gather_object(gathered, state)
        results[rank] = (agree, all(torch.equal(a, b) for a, b in zip(*gathered)))
    finally:
        dist.destroy_process_group()


@pytest.mark.multiprocess
def test_replicas_agree_lets_ddp_skip_its_startup_broadcast_only_when_ranks_match():
    """Equal weights on both ranks: agree, DDP skips the broadcast and the replicas stay equal. One frozen entry
    off by 1e-6 on rank 1: disagree, DDP broadcasts rank 0's weights as it always did, and they end equal."""
    import torch.multiprocessing as mp

    from conftest import free_port

    for perturb in (False, True):
        with mp.Manager() as manager:
            results = manager.dict()
            mp.spawn(_replica_worker, args=(free_port(), perturb, results), nprocs=2)
            assert dict(results) == {0: (not perturb, True), 1: (not perturb, True)}
