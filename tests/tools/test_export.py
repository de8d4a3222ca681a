"""sg_distributed.tools.export from 8-bit and 4-bit checkpoints of launch/train_qa.py: the quantisation is read from
the adapter, every bitsandbytes layer is dequantised, and the merged plain model matches the adapter model on
that dequantised base within the fp32 tolerance."""
import json

import pytest
from conftest import save_tiny_llama_dir


@pytest.fixture(scope="module")
def tiny_wide_model_dir(tmp_path_factory):
    """The tiny Llama with in_features >= 64 (bitsandbytes' int8/nf4 layers want them)."""
    return save_tiny_llama_dir(tmp_path_factory.mktemp("tiny_wide"), hidden=64, intermediate=128)


@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_export_from_a_quantized_checkpoint_needs_no_flag(train_qa, tiny_wide_model_dir, tmp_path, bits, capsys):
    from sg_distributed.tools.export import main as export_main

    run = tmp_path / "run"
    train_qa.main(["--model", str(tiny_wide_model_dir), f"--load_in_{bits}", "--steps", "4", "--save_every", "2",
                   "--eval_size", "2", "--calibration_steps", "2", "--micro_batch_size", "2", "--density", "0.05",
                   "--lr", "3e-2", "--no_eval_before", "--output_dir", str(run)])
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["base_quantization"] == bits
    capsys.readouterr()
    assert export_main(["--checkpoint", str(run / "checkpoints"), "--base_model", str(tiny_wide_model_dir),
                        "--merged_out", str(tmp_path / "merged")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["base_quantization"] == bits and report["dequantized_layers"] == 14  # 7 linears x 2 blocks
    assert report["max_abs_logit_diff"] <= 1e-5  # a tiny model: far inside the relative tolerance
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config

    other = "4bit" if bits == "8bit" else "8bit"  # a flag that contradicts the record is refused, by name
    assert export_main(["--checkpoint", str(run), "--base_model", str(tiny_wide_model_dir),
                        "--merged_out", str(tmp_path / "m2"), f"--load_in_{other}"]) == 1
    assert f"--load_in_{other} given, but the adapter was trained on a {bits} quantised base" in capsys.readouterr().err
