"""sg_distributed.sparsegrad.gradient_tap: which batches calibration accepts, and batches follow the model's device."""
from collections import namedtuple

import pytest
import torch
from torch import nn
from transformers import BatchEncoding

from sg_distributed import SparseGradConfig, get_sparsegrad_model
from sg_distributed.sparsegrad.gradient_tap import default_loss, model_device, move_to_device, run_backward_passes

from conftest import calibrated, lm_batches, make_tiny_llama


def test_tokenizer_batch_encoding_calibrates_like_a_plain_dict():
    config = SparseGradConfig(density=0.1, max_rows=None, max_cols=None)
    plain = calibrated(make_tiny_llama(), config, lm_batches(n=2))
    encoded = calibrated(make_tiny_llama(), config, [BatchEncoding(b) for b in lm_batches(n=2)])
    assert encoded.support_checksum() == plain.support_checksum()  # same bases and supports, bit for bit


def test_batch_without_loss_fn_must_be_a_mapping():
    model = get_sparsegrad_model(make_tiny_llama(), SparseGradConfig(density=0.1, max_rows=None, max_cols=None))
    ids = lm_batches(n=1)[0]["input_ids"]
    with pytest.raises(TypeError, match=r"batch of type Tensor: without a loss_fn, batches must be dicts \(any "
                                        r"Mapping, e.g. a tokenizer's BatchEncoding\).*pass loss_fn\(model, batch\)"):
        model.calibrate([ids])
    with pytest.raises(TypeError, match="batch of type list"):
        default_loss(model.get_base_model(), [ids, ids])


Pair = namedtuple("Pair", "x y")


def test_move_to_device_recurses_and_keeps_types_and_dtypes():
    ids, mask = torch.arange(6).view(2, 3), torch.ones(2, 3, dtype=torch.bool)
    batch = {"enc": BatchEncoding({"input_ids": ids, "attention_mask": mask}),
             "pairs": [Pair(torch.ones(2, dtype=torch.float16), "tag"), (torch.zeros(1, dtype=torch.float64), 3)]}
    moved = move_to_device(batch, "meta")
    assert isinstance(moved["enc"], BatchEncoding) and isinstance(moved["pairs"][0], Pair)
    assert isinstance(moved["pairs"], list) and isinstance(moved["pairs"][1], tuple)
    assert moved["enc"]["input_ids"].is_meta and moved["enc"]["input_ids"].dtype == torch.int64
    assert moved["enc"]["attention_mask"].is_meta and moved["enc"]["attention_mask"].dtype == torch.bool
    assert moved["pairs"][0].x.is_meta and moved["pairs"][0].x.dtype == torch.float16
    assert moved["pairs"][1][0].is_meta and moved["pairs"][1][0].dtype == torch.float64
    assert moved["pairs"][0].y == "tag" and moved["pairs"][1][1] == 3
    assert not batch["enc"]["input_ids"].is_meta  # the input batch is left as it was
    same = move_to_device(ids, "cpu")
    assert same is ids  # already there: no copy


class _Regression(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 1)

    def forward(self, x, labels):
        return ((self.linear(x) - labels) ** 2).mean()


def test_cpu_batches_follow_a_model_on_another_device():
    """meta stands in for a GPU: a CPU batch would not even reach the model's forward there."""
    model = _Regression().to("meta")
    assert model_device(model) == torch.device("meta")
    seen = []

    def loss_fn(m, batch):
        seen.append(batch[0].device.type)
        return m(*batch)

    assert run_backward_passes(model, [(torch.ones(2, 3), torch.ones(2, 1))], steps=1, loss_fn=loss_fn) == 1
    assert seen == ["meta"]
    loss = default_loss(model, BatchEncoding({"x": torch.ones(2, 3), "labels": torch.ones(2, 1)}))
    assert loss.is_meta and loss.dim() == 0


def test_model_device_skips_integer_weights():
    model = nn.Sequential(nn.Embedding(4, 2), nn.Linear(2, 2))
    model[0].weight = nn.Parameter(torch.zeros(4, 2, dtype=torch.int8), requires_grad=False)  # like a bnb weight
    model[1].to("meta")
    assert model_device(model) == torch.device("meta")
    assert model_device(nn.ReLU()) == torch.device("cpu")
