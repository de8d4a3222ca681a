"""FanOutQA pairs, group split, collator masking/truncation, metrics and evaluate_qa."""

import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from sg_distributed.data.qa import (
    IGNORE_INDEX,
    QACollator,
    QAPair,
    answer_ids,
    evaluate_qa,
    exact_match,
    f1_score,
    load_qa_pairs,
    normalize_answer,
    prompt_ids,
    split_by_group,
)


@pytest.fixture(scope="module")
def pairs():
    return load_qa_pairs()


@pytest.fixture(scope="module")
def smol_tokenizer():
    from transformers import AutoTokenizer

    from sg_distributed.data.assets import smollm2_dir

    return AutoTokenizer.from_pretrained(smollm2_dir())


@pytest.fixture(scope="module")
def plain_tokenizer():
    """A tiny word-level tokenizer without chat template (exercises the plain-text prompt)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "[PAD]", "[EOS]", "question", "answer", ":", "?", "what", "is", "the", "capital",
             "of", "france", "paris", "a", "very", "long", "prompt", "word"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()]
    )
    backend.normalizer = normalizers.Lowercase()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]"
    )


# ------------------------------------------------------------------------------------------ loading


def test_load_pairs(pairs):
    assert len(pairs) > 1000
    assert all(isinstance(p, QAPair) and p.question and p.answer and p.group for p in pairs)
    assert len(set(pairs)) == len(pairs)
    strings_only = load_qa_pairs(numeric=False)
    assert 1000 < len(strings_only) < len(pairs)
    answers = {p.answer for p in pairs}
    assert {"yes", "no"} <= answers  # booleans normalised
    assert {"680000", "61.6"} <= answers  # numbers written plainly


def _write(tmp_path, content):
    path = tmp_path / "qa.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        ({"question": "q"}, "expected a JSON list"),
        ([], "empty"),
        ([{"answer": "a", "decomposition": []}], "missing field 'question'"),
        ([{"id": "x", "question": "q", "answer": "a",
           "decomposition": [{"question": "sub", "decomposition": []}]}], "missing field 'answer'"),
        ([{"id": "x", "question": "q", "answer": "a",
           "decomposition": [{"question": "sub", "answer": ["a", "b"], "decomposition": []}]}],
         "no sub-question"),
    ],
)
def test_malformed_file(tmp_path, content, message):
    path = _write(tmp_path, content)
    with pytest.raises(ValueError, match=message) as info:
        load_qa_pairs(path)
    assert str(path) in str(info.value)


def test_nested_and_odd_answers(tmp_path):
    record = {
        "id": "g1", "question": "top", "answer": {"a": 1},
        "decomposition": [
            {"question": "s1", "answer": "Paris ", "decomposition": []},
            {"question": "s2", "answer": 3.0, "decomposition": []},
            {"question": "s3", "answer": 61.6, "decomposition": []},
            {"question": "s4", "answer": True, "decomposition": []},
            {"question": "s5", "answer": {"x": 1}, "decomposition": [
                {"question": "s6", "answer": 680000, "decomposition": []}]},
            {"question": "s7", "answer": "", "decomposition": []},
        ],
    }
    got = load_qa_pairs(_write(tmp_path, [record]))
    assert [(p.question, p.answer) for p in got] == [
        ("s1", "Paris"), ("s2", "3.0"), ("s3", "61.6"), ("s4", "yes"), ("s6", "680000")
    ]
    assert {p.group for p in got} == {"g1"}
    assert [p.question for p in load_qa_pairs(_write(tmp_path, [record]), numeric=False)] == ["s1"]


def test_split_by_group(pairs):
    train, heldout = split_by_group(pairs, heldout_fraction=0.2, seed=0)
    assert len(train) + len(heldout) == len(pairs)
    assert not {p.group for p in train} & {p.group for p in heldout}
    n_groups = len({p.group for p in pairs})
    assert len({p.group for p in heldout}) == round(0.2 * n_groups)
    assert split_by_group(pairs, 0.2, seed=0) == (train, heldout)
    assert split_by_group(pairs, 0.2, seed=1)[1] != heldout


# ----------------------------------------------------------------------------------------- collator


def test_collator_masks_prompt_and_padding(smol_tokenizer, pairs):
    collator = QACollator(smol_tokenizer, max_length=64)
    batch_pairs = [pairs[0], pairs[5], QAPair("What is it?", "A rather longer answer than others", "g")]
    batch = collator(batch_pairs)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[1] <= 64
    for row, pair in enumerate(batch_pairs):
        n_prompt = len(prompt_ids(smol_tokenizer, pair.question))
        n_real = int(batch["attention_mask"][row].sum())
        assert batch["attention_mask"][row, :n_real].all()  # right padding
        labels = batch["labels"][row]
        assert (labels[:n_prompt] == IGNORE_INDEX).all() and (labels[n_real:] == IGNORE_INDEX).all()
        supervised = labels[n_prompt:n_real]
        assert (supervised != IGNORE_INDEX).all()
        assert torch.equal(supervised, batch["input_ids"][row, n_prompt:n_real])
        assert smol_tokenizer.decode(supervised) == pair.answer + smol_tokenizer.eos_token
    assert collator.num_truncated_prompts == collator.num_truncated_answers == 0


def test_chat_prompt_format(smol_tokenizer):
    text = smol_tokenizer.decode(prompt_ids(smol_tokenizer, "Who?"))
    assert text.endswith("<|im_start|>user\nWho?<|im_end|>\n<|im_start|>assistant\n")


def test_collator_truncates_prompt_keeps_answer(smol_tokenizer):
    question = "Tell me " + "very " * 100 + "much: what is the capital of France?"
    collator = QACollator(smol_tokenizer, max_length=24)
    batch = collator([QAPair(question, "Paris", "g")])
    assert batch["input_ids"].shape == (1, 24)
    labels = batch["labels"][0]
    supervised = labels[labels != IGNORE_INDEX]
    assert smol_tokenizer.decode(supervised) == "Paris" + smol_tokenizer.eos_token
    assert smol_tokenizer.decode(batch["input_ids"][0]).endswith("assistant\nParis<|im_end|>")
    assert (collator.num_truncated_prompts, collator.num_truncated_answers) == (1, 0)

    long_answer = QAPair("Why?", "because " * 50, "g")
    batch = collator([long_answer])
    assert batch["input_ids"].shape == (1, 24)
    assert int((batch["labels"][0] != IGNORE_INDEX).sum()) == 23  # one prompt token kept
    assert collator.num_truncated_answers == 1


def test_collator_plain_prompt(plain_tokenizer):
    collator = QACollator(plain_tokenizer, max_length=16)
    batch = collator([QAPair("What is the capital of France?", "Paris", "g"), QAPair("What?", "A", "g")])
    first = plain_tokenizer.decode(batch["input_ids"][0])
    assert first == "question : what is the capital of france ? answer : paris [EOS]"
    labels = batch["labels"]
    assert plain_tokenizer.decode(labels[0][labels[0] != IGNORE_INDEX]) == "paris [EOS]"
    assert (batch["input_ids"][1, batch["attention_mask"][1] == 0] == plain_tokenizer.pad_token_id).all()
    assert answer_ids(plain_tokenizer, "Paris")[-1] == plain_tokenizer.eos_token_id


# ------------------------------------------------------------------------------------------ metrics


def test_normalisation_and_metrics():
    assert normalize_answer("  The  Eiffel-Tower, Paris! ") == "eiffeltower paris"
    assert normalize_answer("An apple a day") == "apple day"
    assert exact_match("the Paris.", "paris") == 1.0
    assert exact_match("Paris, France", "Paris") == 0.0
    assert f1_score("Paris, France", "Paris") == pytest.approx(2 / 3)
    assert f1_score("New York City", "new york") == pytest.approx(0.8)
    assert f1_score("London", "Paris") == 0.0
    assert f1_score("", "") == 1.0 and f1_score("the", "Paris") == 0.0


# --------------------------------------------------------------------------------------- evaluation


def _tiny_llama(vocab_size):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config)


def _check_metrics(metrics, n):
    assert metrics["num_examples"] == n
    assert math.isfinite(metrics["answer_loss"]) and metrics["answer_loss"] > 0
    assert 0.0 <= metrics["exact_match"] <= 1.0 and 0.0 <= metrics["f1"] <= 1.0


def test_evaluate_qa_tiny_llama(smol_tokenizer, pairs):
    model = _tiny_llama(len(smol_tokenizer))
    model.train()
    metrics = evaluate_qa(model, smol_tokenizer, pairs[:6], batch_size=4, max_new_tokens=4)
    _check_metrics(metrics, 6)
    assert model.training  # restored
    # Random logits over ~49k tokens: loss near log(vocab).
    assert abs(metrics["answer_loss"] - math.log(len(smol_tokenizer))) < 1.0


def test_answer_token_accuracy_counts_the_answer_tokens_ranked_first(smol_tokenizer, pairs):
    """Against an independent count: one forward per pair, argmax at each position that predicts an answer
    token (prompt positions excluded), pooled over all pairs' answer tokens."""
    model = _tiny_llama(len(smol_tokenizer)).eval()
    chosen = pairs[:5]
    collator = QACollator(smol_tokenizer, max_length=64)
    # bias the model towards one answer token so that the accuracy is not trivially 0
    target = collator.encode(chosen[0])[1][-1]  # eos: every answer ends with it
    with torch.no_grad():
        model.lm_head.weight[target] += 5.0 * model.model.norm.weight.sign()
    hits = total = 0
    with torch.no_grad():
        for pair in chosen:
            ids, labels = collator.encode(pair)
            logits = model(input_ids=torch.tensor([ids])).logits[0]
            for position in range(1, len(ids)):
                if labels[position] != -100:
                    total += 1
                    hits += int(logits[position - 1].argmax() == labels[position])
    metrics = evaluate_qa(model, smol_tokenizer, chosen, batch_size=2, max_new_tokens=2)
    assert 0 < hits < total  # the check can fail both ways
    assert metrics["answer_token_accuracy"] == pytest.approx(hits / total, abs=1e-12)


def test_evaluate_qa_wrapped_model(plain_tokenizer):
    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, labels):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    inner = _tiny_llama(len(plain_tokenizer))
    wrapped = Wrapper(inner).eval()
    data = [QAPair("What is the capital of France?", "Paris", "g"), QAPair("What?", "a", "g")]
    metrics = evaluate_qa(wrapped, plain_tokenizer, data, max_new_tokens=3, generate_model=inner,
                          show_progress=True)
    _check_metrics(metrics, 2)
    assert not wrapped.training and not inner.training
