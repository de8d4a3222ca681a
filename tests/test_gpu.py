"""CUDA checks of the public API in bf16 (``pytest -m gpu``; skipped without CUDA; run by ``make gpu-check``).

What they hold the library to, on a tiny random Llama on the GPU:

* bf16 SparseGrad vs an fp32 computation of the same model (same base weights, bases, supports and
  k-values: the adapter saved from the bf16 model and loaded onto its fp32 copy): loss and every
  k-value gradient agree within a relative tolerance of **5e-2** (relative = ||g_bf16 - g_fp32|| /
  ||g_fp32|| per k-vector; bf16 keeps 8 significant bits, so single products are good to ~4e-3 and
  the tolerance leaves room for the accumulations over tokens and blocks), and one optimizer step
  moves the values and keeps them finite. With a row/column budget (dense-block kernel), with the
  library defaults (no budget, density 1 %), and with no budget at density 0.3, where the touched
  block (at least k entries) exceeds the dense-block threshold, so the CSR kernels run.
* small updates survive in bf16 (DESIGN section 7): 40 AdamW steps at lr 1e-5 move k-values of 0.05,
  whose bf16 spacing (2.4e-4) is larger than each step.
* support_checksum() (recorded by train_qa.py for every SparseGrad run) works on a bf16 model.
* a 1-rank NCCL process group (env:// rendezvous on a free port): calibration runs under it and gives
  the same supports as without one; NCCL reduces the float64 Gram dtype on the GPU; and the metric
  average that ``launch/train_qa.py`` uses (``process_group.all_reduce_mean``) works under NCCL.

The helpers take the device, so the same code can be run on CPU by hand (bf16 there too).
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import socket

import pytest
import torch
from safetensors.torch import load_file

from sg_distributed import SparseGradConfig, get_sparsegrad_model
from sg_distributed.sparsegrad.convert import load_adapter

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (pytest -m gpu)")]

REL_TOL = 5e-2

CONFIGS = {
    "defaults": dict(),  # SparseGradConfig() = train_qa.py: density 1 %, budget 0.25, dense-block kernel
    "budget_0.125": dict(density=0.01, max_rows=0.125, max_cols=0.125),
    "csr_no_budget": dict(density=0.3, max_rows=None, max_cols=None),  # supports spread: CSR kernels
}
EXPECTED_KERNELS = {"defaults": {"dense-block"}, "budget_0.125": {"dense-block"}, "csr_no_budget": {"csr"}}


def tiny_llama(seed: int = 0, hidden: int = 128, intermediate: int = 512, layers: int = 2, vocab: int = 256,
               attn: str = "sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=128, use_cache=False)
    config._attn_implementation = attn  # set on the config: the constructor keyword differs across versions
    return LlamaForCausalLM(config).eval()


def batches(device, n: int = 4, batch: int = 4, seq: int = 32, vocab: int = 256, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
        out.append({"input_ids": ids, "labels": ids})
    return out


def kernels(model) -> set[str]:
    return {"csr" if "kernel=csr" in m.extra_repr() else "dense-block"
            for m in model.modules() if type(m).__name__ == "SparseGradLinear"}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check_bf16_against_fp32(device: str, config_kwargs: dict, tmp_path) -> dict:
    """Calibrate in bf16, load the same adapter onto the fp32 copy, compare loss and k-value gradients."""
    base_bf16 = tiny_llama().to(device=device, dtype=torch.bfloat16)
    base_fp32 = copy.deepcopy(base_bf16).float()  # the very same (bf16-rounded) weights, computed in fp32
    data = batches(device)
    model = get_sparsegrad_model(base_bf16, SparseGradConfig(**config_kwargs))
    model.calibrate(data)
    model.save_pretrained(tmp_path / "adapter")
    reference = load_adapter(base_fp32, tmp_path / "adapter", is_trainable=True)
    params, ref_params = model.trainable_parameters(), reference.trainable_parameters()
    assert params and [p.shape for p in params] == [p.shape for p in ref_params]
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # non-zero values, so the forward's delta term is compared too
        for p, q in zip(params, ref_params):
            p.copy_((0.02 * torch.randn(p.shape, generator=g)).to(device=p.device, dtype=p.dtype))
            q.copy_(p.to(q.dtype))
    loss = model(**data[0]).loss
    ref_loss = reference(**data[0]).loss
    loss.backward()
    ref_loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(ref_loss)
    assert abs(loss.item() - ref_loss.item()) <= REL_TOL * abs(ref_loss.item()), (loss.item(), ref_loss.item())
    errors = [relative_error(p.grad, q.grad) for p, q in zip(params, ref_params)]
    assert max(errors) <= REL_TOL, f"k-value gradient relative errors {errors} (tolerance {REL_TOL})"

    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    optimizer.step()
    for p, b in zip(params, before):
        assert torch.isfinite(p).all()
        assert not torch.equal(p.detach(), b), "an optimizer step left a k-vector unchanged"
    return {"errors": errors, "kernels": kernels(model), "loss": (loss.item(), ref_loss.item())}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bf16_sparsegrad_matches_fp32_on_cuda(name, tmp_path):
    result = check_bf16_against_fp32("cuda", CONFIGS[name], tmp_path)
    assert result["kernels"] == EXPECTED_KERNELS[name]


def check_small_updates_survive(device: str) -> float:
    """40 AdamW steps at lr 1e-5 on values of 0.05 (bf16 spacing there: 2.4e-4 > each step's 1e-5)."""
    base = tiny_llama().to(device=device, dtype=torch.bfloat16)
    data = batches(device)
    model = get_sparsegrad_model(base, SparseGradConfig(density=0.01, max_rows=0.25, max_cols=0.25))
    model.calibrate(data)
    params = model.trainable_parameters()
    with torch.no_grad():
        for p in params:
            p.fill_(0.05)
    start = [p.detach().float().clone() for p in params]  # 0.05 as stored (bf16 rounds it to 0.050049)
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    for _ in range(40):  # the same batch: a steady gradient sign, so Adam moves each entry by ~lr per step
        model(**data[0]).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    moved = torch.cat([(p.detach().float() - s).abs() for p, s in zip(params, start)])
    return moved.median().item()


def test_small_updates_survive_in_bf16_on_cuda():
    median_move = check_small_updates_survive("cuda")
    # 40 steps x ~1e-5 = ~4e-4 expected; stored in bf16 each 1e-5 step rounds away and nothing moves
    assert median_move >= 2e-4, f"median |v - v0| after 40 steps at lr 1e-5 from v0 = 0.05 is {median_move:.2e}"


def test_support_checksum_of_a_bf16_model_on_cuda():
    """train_qa.py records support_checksum() of every SparseGrad run: it must accept bf16 bases."""
    base = tiny_llama().to(device="cuda", dtype=torch.bfloat16)
    data = batches("cuda")
    model = get_sparsegrad_model(base, SparseGradConfig(density=0.01, max_rows=0.25, max_cols=0.25))
    model.calibrate(data)
    digest = model.support_checksum()
    assert isinstance(digest, str) and len(digest) == 64 and digest == model.support_checksum()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def one_rank_nccl(monkeypatch):
    """init_process_group("nccl") with world size 1 through env:// on a free port; destroyed on exit."""
    import torch.distributed as dist

    assert not dist.is_initialized()
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method="env://", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=120))
    try:
        yield dist
    finally:
        dist.destroy_process_group()


def calibrated_supports(device: str, directory) -> dict[str, torch.Tensor]:
    """Calibrate a bf16 tiny Llama, run one training forward/backward; the saved adapter's supports."""
    base = tiny_llama(attn="eager").to(device=device, dtype=torch.bfloat16)  # eager: deterministic backward
    model = get_sparsegrad_model(base, SparseGradConfig(density=0.01, max_rows=0.25, max_cols=0.25))
    model.calibrate(batches(device))
    loss = model(**batches(device, n=1, seed=3)[0]).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.trainable_parameters())
    model.save_pretrained(directory)
    adapter = load_file(str(directory / "adapter_model.safetensors"))
    supports = {k: v for k, v in adapter.items() if k.endswith(".support_flat")}
    assert supports
    return supports


def test_calibrate_under_nccl_one_rank(monkeypatch, tmp_path):
    without_group = calibrated_supports("cuda", tmp_path / "alone")
    with one_rank_nccl(monkeypatch) as dist:
        assert dist.get_backend() == "nccl" and dist.get_world_size() == 1
        under_nccl = calibrated_supports("cuda", tmp_path / "nccl")
        gram = torch.arange(6, dtype=torch.float64, device="cuda").reshape(2, 3)  # Grams accumulate in float64
        dist.all_reduce(gram)
        torch.cuda.synchronize()
        assert torch.equal(gram, torch.arange(6, dtype=torch.float64, device="cuda").reshape(2, 3))
        dist.barrier()
    assert under_nccl.keys() == without_group.keys()
    for key in under_nccl:
        assert torch.equal(under_nccl[key], without_group[key]), f"{key}: other supports under a 1-rank NCCL group"


def test_metric_average_under_nccl(monkeypatch):
    """train_qa.py averages held-out metrics with process_group.all_reduce_mean: it must work on an NCCL group."""
    from sg_distributed.distributed.process_group import all_reduce_mean

    with one_rank_nccl(monkeypatch):
        merged = all_reduce_mean({"answer_loss": 2.5, "f1": 0.25}, 4)
    assert merged["answer_loss"] == pytest.approx(2.5) and merged["f1"] == pytest.approx(0.25)
    assert merged["num_examples"] == 4
