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
