"""launch/train_qa.py --dataset: each format end to end in one process, resume and 1-rank = 2-rank parity with a
datasets source, and its bad input (the loading itself is tested in tests/data/test_data_sources.py)."""
import json
import sys

import pytest
import torch

from conftest import free_port
from conftest import run_train_qa as run

FAST = ["--steps", "12", "--calibration_steps", "2", "--eval_size", "4", "--density", "0.5", "--max_rows", "0",
        "--max_cols", "0", "--lr", "3e-2", "--micro_batch_size", "2"]
ROWS = 60


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    """The first FanOutQA pairs in every supported form (group = the top-level question)."""
    import datasets

    from sg_distributed.data.qa import load_qa_pairs

    pairs = load_qa_pairs()[:ROWS]
    root = tmp_path_factory.mktemp("datasets")
    with open(root / "chat.jsonl", "w") as f:
        for p in pairs:
            f.write(json.dumps({"messages": [{"role": "system", "content": "Answer briefly."},
                                             {"role": "user", "content": p.question},
                                             {"role": "assistant", "content": p.answer}], "topic": p.group}) + "\n")
    table = datasets.Dataset.from_list([{"q": p.question, "a": p.answer, "topic": p.group,
                                         "ctx": f"Topic {p.group}."} for p in pairs])
    table.to_csv(str(root / "qa.csv"), index=False)
    table.to_parquet(str(root / "qa.parquet"))
    datasets.DatasetDict({"train": table.select(range(48)), "test": table.select(range(48, ROWS))}).save_to_disk(
        str(root / "on_disk"))
    return root


FORMATS = {  # id: (file, extra flags, expected (train, held-out) sizes before --eval_size)
    "messages-jsonl": ("chat.jsonl", ["--group_column", "topic"], None),
    "question-answer-csv": ("qa.csv", ["--question_column", "q", "--answer_column", "a"], None),
    "parquet-with-context": ("qa.parquet", ["--question_column", "q", "--answer_column", "a",
                                            "--context_column", "ctx", "--system_prompt", "Be short."], None),
    "save-to-disk-splits": ("on_disk", ["--question_column", "q", "--answer_column", "a", "--eval_split", "test"],
                            (48, ROWS - 48)),
}


@pytest.mark.parametrize("name", list(FORMATS))
def test_each_format_trains_in_one_process(train_qa, tiny_model_dir, data_files, tmp_path, name):
    file, extra, sizes = FORMATS[name]
    results = train_qa.main(["--model", str(tiny_model_dir), *FAST, "--dataset", str(data_files / file), *extra,
                             "--output_dir", str(tmp_path)])
    data = results["data"]
    assert data["train"] + data["heldout"] == ROWS and data["heldout"] > 0
    if sizes:
        assert (data["train"], data["heldout"]) == sizes
    assert results["after"]["answer_loss"] < results["before"]["answer_loss"] - 0.02
    assert (tmp_path / "adapter" / "adapter_config.json").exists()


def test_resume_with_a_dataset_is_bit_identical(train_qa, tiny_model_dir, data_files, tmp_path):
    args = ["--model", str(tiny_model_dir), *FAST, "--steps", "8", "--no_eval_before", "--save_every", "2",
            "--dataset", str(data_files / "chat.jsonl")]
    full = train_qa.main([*args, "--output_dir", str(tmp_path / "full")])
    train_qa.main([*args, "--steps", "4", "--output_dir", str(tmp_path / "part")])
    resumed = train_qa.main([*args, "--output_dir", str(tmp_path / "part"), "--resume", "auto"])
    assert resumed["resumed_from"].endswith("step_4")
    assert resumed["train_loss_first_last"] == full["train_loss_first_last"]
    from safetensors.torch import load_file

    a, b = (load_file(str(tmp_path / d / "adapter" / "adapter_model.safetensors")) for d in ("full", "part"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(SystemExit, match="different configuration"):  # another dataset is another run
        train_qa.main([*args[:-1], str(data_files / "qa.parquet"), "--question_column", "q", "--answer_column", "a",
                       "--output_dir", str(tmp_path / "part"), "--resume", "auto"])


@pytest.mark.multiprocess
def test_two_rank_zero2_with_a_dataset_equals_one_rank(tiny_model_dir, data_files, tmp_path):
    common = ["launch/train_qa.py", "--model", str(tiny_model_dir), *FAST, "--steps", "4", "--no_eval_before",
              "--dataset", str(data_files / "chat.jsonl"), "--group_column", "topic"]
    one, _ = run([sys.executable, *common, "--grad_accum", "2"], tmp_path / "one")
    two, stdout = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                       "127.0.0.1", "--master_port", str(free_port()), *common, "--ds_config", "ds_configs/zero2.json"],
                      tmp_path / "two")
    assert "world size 2" in stdout and sorted(one) == sorted(two)
    values = [k for k in one if k.endswith("sparsegrad_values")]
    assert values and any(one[k].abs().sum() > 0 for k in values)
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-5 if key in values else 0, rtol=0, msg=key)


def test_dataset_bad_input_is_named(train_qa, tiny_model_dir, data_files, tmp_path):
    with pytest.raises(SystemExit, match=r"cannot use the training data: .*'nope'.*columns"):
        train_qa.main(["--model", str(tiny_model_dir), *FAST, "--dataset", str(data_files / "qa.csv"),
                       "--question_column", "nope", "--answer_column", "a", "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="argument --question_column: applies to --dataset"):
        train_qa.parse_args(["--question_column", "q"])
    with pytest.raises(SystemExit, match="argument --dataset: not allowed with argument --data"):
        train_qa.parse_args(["--data", "x.json", "--dataset", "y.jsonl"])
