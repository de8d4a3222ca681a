"""launch/train_qa.py as one process, on a tiny random Llama with the real SmolLM2 tokenizer and QA data."""
import json

import pytest


@pytest.mark.parametrize("method", ["sparsegrad", "lora", "shira", "graddrop"])
def test_single_process_run_trains_and_saves(train_qa, tiny_model_dir, tmp_path, method):
    out = tmp_path / "run"
    results = train_qa.main(["--model", str(tiny_model_dir), "--method", method, "--steps", "12", "--eval_size", "4", "--density", "0.5",
                             "--calibration_steps", "2", "--micro_batch_size", "2", "--lr", "3e-2",
                             "--max_rows", "0", "--max_cols", "0", "--output_dir", str(out)])
    assert results["after"]["num_examples"] == 4
    assert results["after"]["answer_loss"] < results["before"]["answer_loss"] - 0.02
    assert json.loads((out / "metrics.json").read_text())["method"] == method
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in lines if r.get("split") != "eval"]
    assert [r["step"] for r in lines if r.get("split") == "eval"] == [0, 12]  # held-out before and after
    assert [r["step"] for r in logged] == list(range(1, 13))  # --log_every 1 (default)
    assert logged[0]["loss"] == results["train_loss_first_last"][0]
    assert all(r["loss_interval"] == r["loss"] and r["lr"] == 3e-2 for r in logged)
    assert (out / "adapter" / "adapter_config.json").exists() == (method != "graddrop")


def test_budget_axes_and_block_options_reach_the_saved_adapter(train_qa, tiny_model_dir, tmp_path):
    """--budget_axes balanced --budget_block leading: the cost-balanced block shape, made of the leading
    eigen-directions, which a reloaded adapter reads as slices of its bases."""
    import torch
    from transformers import AutoModelForCausalLM

    from peft import PeftModel

    out = tmp_path / "run"
    train_qa.main(["--model", str(tiny_model_dir), "--steps", "2", "--eval_size", "2", "--no_eval_before",
                   "--calibration_steps", "2", "--micro_batch_size", "2", "--density", "0.02",
                   "--budget_axes", "balanced", "--budget_block", "leading", "--output_dir", str(out)])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out / "adapter")
    assert (model.active_peft_config.budget_axes, model.active_peft_config.budget_block) == ("balanced", "leading")
    for name, layer in model.converted_layers().items():
        m, n = layer.out_features, layer.in_features
        r, c = round(0.25 * n), round(0.25 * m)
        assert torch.equal(layer.rows_used, torch.arange(r)) and torch.equal(layer.cols_used, torch.arange(c)), name
        assert (layer._slice_index(0), layer._slice_index(1)) == (r, c), name
