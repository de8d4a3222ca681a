"""SparseGrad through peft's own entry points: get_peft_model, calibrate, save_pretrained,
PeftModel.from_pretrained, merge_and_unload, disable_adapter, modules_to_save."""
import copy
from pathlib import Path

import pytest
import torch
from conftest import cls_batches, lm_batches, make_tiny_bert, make_tiny_llama
from peft import PeftConfig, PeftModel, get_peft_model
from transformers import BertForSequenceClassification, LlamaForCausalLM

from sg_distributed import SparseGradConfig, SparseGradTuner, get_sparsegrad_model
from sg_distributed.sparsegrad.layer import SparseGradLinear


def test_peft_knows_sparsegrad(tmp_path):
    """The enum extension and registry entries peft needs (sparsegrad/registration.py): fails loudly, here, if a
    peft upgrade changes the mechanism."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils.peft_types import PeftType

    assert PeftType("SPARSEGRAD") is PeftType.SPARSEGRAD and "SPARSEGRAD" in list(PeftType)
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.SPARSEGRAD] is SparseGradConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.SPARSEGRAD] is SparseGradTuner
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.SPARSEGRAD] == "sparsegrad_"
    SparseGradConfig(density=0.02, max_rows=0.5).save_pretrained(str(tmp_path))
    loaded = PeftConfig.from_pretrained(str(tmp_path))  # peft picks our class from the saved peft_type
    assert type(loaded) is SparseGradConfig and (loaded.density, loaded.max_rows) == (0.02, 0.5)


def _train(model, batches, steps=6, lr=1e-2):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(steps):
        model(**batches[step % len(batches)]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def test_get_peft_model_calibrate_train_save_load_merge(tmp_path):
    base, batches = make_tiny_llama(), lm_batches()
    reference = copy.deepcopy(base)
    model = get_peft_model(base, SparseGradConfig(density=0.05, task_type="CAUSAL_LM"))
    layers = [m for m in model.modules() if isinstance(m, SparseGradLinear)]
    assert len(layers) == 4  # up_proj and down_proj of 2 blocks
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith("sparsegrad_values") for n in trainable)
    with pytest.raises(RuntimeError, match="not calibrated: call calibrate"):
        model(**batches[0])

    model.calibrate(batches)
    loss_before = model(**batches[0]).loss.item()
    _train(model, batches)
    assert model(**batches[0]).loss.item() < loss_before - 1e-3
    with torch.no_grad():
        logits = model(**batches[0]).logits
        with model.disable_adapter():
            torch.testing.assert_close(model(**batches[0]).logits, reference(**batches[0]).logits, atol=1e-6, rtol=0)
    assert not torch.allclose(logits, reference(**batches[0]).logits, atol=1e-4)

    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path / "adapter")
    assert isinstance(loaded.base_model, SparseGradTuner)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batches[0]).logits, logits, atol=1e-5, rtol=0)
    assert not any(p.requires_grad for p in loaded.parameters())  # is_trainable=False: inference mode
    merged = loaded.merge_and_unload()
    assert type(merged) is LlamaForCausalLM and not any(isinstance(m, SparseGradLinear) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(**batches[0]).logits, logits, atol=1e-4, rtol=0)

    resumed = PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path / "adapter", is_trainable=True)
    assert {n for n, p in resumed.named_parameters() if p.requires_grad} == trainable
    loss_loaded = resumed(**batches[0]).loss.item()
    _train(resumed, batches)  # training continues from the saved values
    assert resumed(**batches[0]).loss.item() < loss_loaded
    unloaded = resumed.unload()  # the base layers back, no merge
    with torch.no_grad():
        torch.testing.assert_close(unloaded(**batches[0]).logits, reference(**batches[0]).logits, atol=0, rtol=0)


def test_get_sparsegrad_model_is_peft_for_fixed_support_and_the_wrapper_for_the_paper_modes():
    """One way per mode: fixed support is the peft method (get_sparsegrad_model is get_peft_model), the
    reference / dynamic modes are the research wrapper, which refuses fixed support."""
    from sg_distributed import SparseGradModel

    fixed = get_sparsegrad_model(make_tiny_llama(), SparseGradConfig(density=0.05))
    assert isinstance(fixed, PeftModel) and isinstance(fixed.base_model, SparseGradTuner)
    for mode in ("reference", "dynamic"):
        assert isinstance(get_sparsegrad_model(make_tiny_llama(), SparseGradConfig(k=5, support_mode=mode)),
                          SparseGradModel)
    with pytest.raises(ValueError, match="fixed.* is a peft method: peft.get_peft_model"):
        SparseGradModel(make_tiny_llama(), SparseGradConfig())


def test_modules_to_save_trains_and_restores_a_fresh_head(tmp_path):
    """A sequence-classification model: the fresh head is trained densely (peft's ModulesToSaveWrapper) next
    to the k-vectors, saved in the adapter and restored onto a fresh base."""
    base, batches = make_tiny_bert(), cls_batches()
    reference = copy.deepcopy(base)
    model = get_peft_model(base, SparseGradConfig(density=0.05, modules_to_save=["classifier"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("classifier" in n for n in trainable) and any(n.endswith("sparsegrad_values") for n in trainable)
    model.calibrate(batches)
    assert all(p.grad is None for p in model.parameters())  # calibration leaves no gradient for the first step
    assert trainable == {n for n, p in model.named_parameters() if p.requires_grad}
    head_before = model.base_model.model.classifier.modules_to_save["default"].weight.detach().clone()
    _train(model, batches)
    head_after = model.base_model.model.classifier.modules_to_save["default"].weight
    assert not torch.allclose(head_before, head_after)
    with torch.no_grad():
        logits = model(**batches[0]).logits
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batches[0]).logits, logits, atol=1e-5, rtol=0)
        merged = loaded.merge_and_unload()
        assert type(merged) is BertForSequenceClassification
        torch.testing.assert_close(merged(**batches[0]).logits, logits, atol=1e-4, rtol=0)


def test_bad_input_is_named(tmp_path):
    with pytest.raises(ValueError, match="matches no nn.Linear.*candidates"):
        get_peft_model(make_tiny_llama(), SparseGradConfig(target_modules=["gate_projection"]))
    with pytest.raises(ValueError, match="use sg_distributed.get_sparsegrad_model"):
        get_peft_model(make_tiny_llama(), SparseGradConfig(support_mode="reference"))
    model = get_peft_model(make_tiny_llama(), SparseGradConfig(density=0.05))
    model.calibrate(lm_batches())
    model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.up_proj.* is 96x32 in this model.*64x32"):
        PeftModel.from_pretrained(make_tiny_llama(intermediate=96), tmp_path / "adapter")


FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def test_an_older_format_adapter_converts_and_loads(tmp_path):
    """Adapters written by SparseGradModel before SparseGrad became a peft method (tests/fixtures/README.md) load
    through peft after ``python -m sg_distributed.sparsegrad.convert``, and through ``load_adapter`` directly,
    with the logits that model had."""
    from sg_distributed.sparsegrad.convert import load_adapter, main as convert_main

    old = FIXTURES / "sparsegrad_adapter_v1"
    expected = torch.load(FIXTURES / "sparsegrad_adapter_v1_logits.pt")
    batch = lm_batches()[0]
    assert convert_main([str(old), str(tmp_path / "peft")]) == 0
    for loaded in (PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "peft"), load_adapter(make_tiny_llama(), old)):
        assert isinstance(loaded, PeftModel)
        with torch.no_grad():
            torch.testing.assert_close(loaded(**batch).logits, expected, atol=1e-5, rtol=0)
    assert convert_main([str(tmp_path / "peft"), str(tmp_path / "again")]) == 1  # named: already peft


@pytest.mark.parametrize("bits", [8, 4])
def test_merge_onto_a_quantized_base_is_the_dequantized_weight_plus_the_update(bits):
    """merge_and_unload on an 8-bit / 4-bit base: each converted layer becomes a plain nn.Linear holding the
    dequantised weight + P S R^T (float64, rounded once); checked against the adapter's own delta_weight and
    bitsandbytes' dequantisation, and the frozen int8/nf4 bytes stay untouched by training."""
    from conftest import quantize_linears
    from torch import nn

    from sg_distributed.quant import dequantized_weight

    base = make_tiny_llama(hidden=64, intermediate=128)
    names = [n for n, _ in base.named_modules() if n.endswith(("up_proj", "down_proj"))]
    quantize_linears(base, names, bits=bits)
    frozen = {n: base.get_submodule(n).weight.detach().clone() for n in names}
    model = get_peft_model(base, SparseGradConfig(density=0.05))
    model.calibrate(lm_batches())
    _train(model, lm_batches())
    layers = {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, SparseGradLinear)}
    for name, layer in layers.items():
        assert torch.equal(layer.base_layer.weight, frozen[name]), name
    expected = {n: (dequantized_weight(l.base_layer).double() + l.delta_weight()).float() for n, l in layers.items()}
    merged = model.merge_and_unload()
    for name in names:
        linear = merged.get_submodule(name)
        assert type(linear) is nn.Linear and linear.weight.dtype == torch.float32
        torch.testing.assert_close(linear.weight, expected[name], atol=0, rtol=0)


@pytest.mark.parametrize("reentrant", [True, False])
def test_calibration_under_gradient_checkpointing_is_unchanged(reentrant):
    """TRL's SFTConfig turns gradient checkpointing on by default: calibration through a checkpointed model
    (forward hooks fire again, or only, in backward's recomputation) picks the same bases and supports."""
    batches = lm_batches()
    plain = get_peft_model(make_tiny_llama(), SparseGradConfig(density=0.05))
    plain.train()
    plain.calibrate(batches)
    base = make_tiny_llama()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    checkpointed = get_peft_model(base, SparseGradConfig(density=0.05))
    checkpointed.enable_input_require_grads()  # what TRL does for peft models under checkpointing
    checkpointed.train()
    checkpointed.calibrate(batches)
    assert checkpointed.base_model.support_checksum() == plain.base_model.support_checksum()


def test_bf16_model_keeps_fp32_k_vectors_and_matches_fp32_within_bf16_rounding(tmp_path):
    """A bf16 model through peft: the k-vectors and the saved bases stay fp32, and the trained adapter's bf16
    logits match the same adapter on an fp32 copy of the same (bf16-rounded) weights within 2e-2: bf16 keeps
    8 bits of mantissa, and the logits of this 2-block model are O(1)."""
    base, batches = make_tiny_llama().to(torch.bfloat16), lm_batches()
    upcast = copy.deepcopy(base).float()
    model = get_peft_model(base, SparseGradConfig(density=0.05))
    model.calibrate(batches)
    _train(model, batches)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    model.save_pretrained(tmp_path / "adapter")
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert all(v.dtype == torch.float32 for k, v in saved.items() if k.endswith(("sparsegrad_values", ".P", ".R")))
    reference = PeftModel.from_pretrained(upcast, tmp_path / "adapter")
    with torch.no_grad():
        got, want = model(**batches[0]).logits.float(), reference(**batches[0]).logits
    assert want.abs().max() > 0.1  # not trivially small
    torch.testing.assert_close(got, want, atol=2e-2, rtol=0)
