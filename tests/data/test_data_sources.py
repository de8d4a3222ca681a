"""User datasets as QA examples (each source and format end to end, held-out splits, errors) and their cached
tokenisation (padding collator == QACollator, labels -100 exactly on prompt and padding)."""

import csv
import json

import pytest
import torch

from sg_distributed.data.qa import (IGNORE_INDEX, QACollator, QAPair, TokenizedCollator, build_prompt, load_qa_pairs,
                                    split_by_group)
from sg_distributed.data.sources import TOKENIZED_COLUMNS, load_examples, tokenize_examples


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tok.chat_template
    return tok


@pytest.fixture(scope="module")
def plain_tokenizer():
    """A word-level tokenizer without chat template (the plain-text prompt)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "[PAD]", "[EOS]", "question", "answer", "context", ":", "?", "what", "is", "the", "capital",
             "of", "france", "paris", "be", "brief", "hi", "hello"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    backend.normalizer = normalizers.Lowercase()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")


@pytest.fixture
def load(tmp_path):
    """load_examples with the datasets cache under tmp_path."""
    return lambda source, **kwargs: load_examples(source, cache_dir=tmp_path / "hf-cache", **kwargs)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_csv(path, header, rows):
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def qa_rows(n, group=None):
    return [{"question": f"q{i}?", "answer": f"a{i}", **({"g": group(i)} if group else {})} for i in range(n)]


# ----------------------------------------------------------------------------------------- formats

CHATS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
     {"role": "assistant", "content": "Paris"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "And the capital of Italy?"}, {"role": "assistant", "content": " Rome\n"}],
    [{"role": "user", "content": "Largest planet?"}, {"role": "assistant", "content": "Jupiter"},
     {"role": "user", "content": "Thanks!"}],  # a trailing turn after the last answer is ignored
    [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}],
    [{"role": "user", "content": "Opposite of up?"}, {"role": "assistant", "content": "down"}],
]


def test_messages_jsonl(tmp_path, load, tokenizer):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m, "id": i} for i, m in enumerate(CHATS)])
    train, heldout = load(path, system_prompt="Answer tersely.")
    expected = [
        QAPair("Capital of France?", "Paris", "0", system="Be brief."),  # the row's own system turn wins
        QAPair("And the capital of Italy?", "Rome", "1", system="Answer tersely.",
               history=(("user", "Hi"), ("assistant", "Hello! How can I help?"))),
        QAPair("Largest planet?", "Jupiter", "2", system="Answer tersely."),
        QAPair("2 + 2?", "4", "3", system="Answer tersely."),
        QAPair("Opposite of up?", "down", "4", system="Answer tersely."),
    ]
    assert len(heldout) == 1 and sorted(train + heldout, key=lambda p: p.group) == expected
    assert (train, heldout) == split_by_group(expected, 0.2, 0)
    assert load(path, system_prompt="Answer tersely.") == (train, heldout)  # deterministic

    # The prompt is the conversation up to the answer, rendered by the model's own chat template.
    by_group = {p.group: p for p in train + heldout}
    system = [{"role": "system", "content": "Answer tersely."}]
    for group, messages in (("0", CHATS[0][:2]), ("1", system + CHATS[1][:3])):
        assert build_prompt(tokenizer, by_group[group]) == tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True)
    no_system, _ = load(path, eval_fraction=0.5)
    assert all(p.system in (None, "Be brief.") for p in no_system)


def test_question_answer_csv_is_read_verbatim(tmp_path, load):
    rows = [("What is the code?", "007", "x"), ("Country code of Namibia?", "NA", "y"),
            ("Price, in euros?", "1.50", "z"), ("  Padded?  ", " yes ", "w")]
    path = write_csv(tmp_path / "qa.csv", ["question", "answer", "note"], rows)
    train, heldout = load(path, eval_fraction=0.25)
    got = sorted(train + heldout, key=lambda p: int(p.group))
    assert got == [QAPair("What is the code?", "007", "0"), QAPair("Country code of Namibia?", "NA", "1"),
                   QAPair("Price, in euros?", "1.50", "2"), QAPair("Padded?", "yes", "3")]
    assert len(heldout) == 1


def test_parquet_with_context_column(tmp_path, load, plain_tokenizer):
    import pandas as pd

    path = tmp_path / "alpaca.parquet"
    pd.DataFrame({"instruction": ["What is the capital?", "Count the words.", "Say hi.", "Two plus one?"],
                  "input": ["France", "be brief", None, ""],
                  "output": ["Paris", "2", "hello", "3"],
                  "n": [1, 2, 3, 4]}).to_parquet(path)
    train, heldout = load(path, context_column="input", eval_fraction=0.25, seed=3)
    got = sorted(train + heldout, key=lambda p: int(p.group))
    assert got == [QAPair("What is the capital?", "Paris", "0", context="France"),
                   QAPair("Count the words.", "2", "1", context="be brief"),
                   QAPair("Say hi.", "hello", "2"), QAPair("Two plus one?", "3", "3")]
    assert build_prompt(plain_tokenizer, got[0]) == "Context: France\nQuestion: What is the capital?\nAnswer:"
    # a numeric answer column arrives typed (int64) and is written as FanOutQA writes numbers
    by_n, _ = load(path, question_column="instruction", answer_column="n", eval_fraction=0.5)
    assert sorted(p.answer for p in by_n + _) == ["1", "2", "3", "4"]


def test_save_to_disk_with_splits(tmp_path, load):
    from datasets import Dataset, DatasetDict

    data = DatasetDict({"train": Dataset.from_list(qa_rows(6)), "test": Dataset.from_list(qa_rows(2))})
    data.save_to_disk(tmp_path / "saved")
    train, heldout = load(tmp_path / "saved", eval_split="test")
    assert train == [QAPair(f"q{i}?", f"a{i}", str(i)) for i in range(6)]
    assert heldout == [QAPair(f"q{i}?", f"a{i}", str(i)) for i in range(2)]
    # without eval_split the training split is divided; a single saved Dataset works the same way
    train, heldout = load(tmp_path / "saved", eval_fraction=0.5)
    assert len(train) == len(heldout) == 3
    Dataset.from_list(qa_rows(6)).save_to_disk(tmp_path / "single")
    assert load(tmp_path / "single", eval_fraction=0.5) == (train, heldout)


def test_folder_of_data_files(tmp_path, load):
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"prompt": "p1", "completion": "c1"}, {"prompt": "p2", "completion": "c2"}])
    write_jsonl(folder / "test.jsonl", [{"prompt": "p3", "completion": "c3"}])
    train, heldout = load(folder, eval_split="test")
    assert train == [QAPair("p1", "c1", "0"), QAPair("p2", "c2", "1")]
    assert heldout == [QAPair("p3", "c3", "0")]


def test_group_column_keeps_groups_on_one_side(tmp_path, load):
    path = write_jsonl(tmp_path / "g.jsonl", qa_rows(30, group=lambda i: f"topic{i % 6}"))
    splits = {seed: load(path, group_column="g", eval_fraction=0.34, seed=seed) for seed in range(4)}
    for train, heldout in splits.values():
        assert len(train) + len(heldout) == 30
        assert not {p.group for p in train} & {p.group for p in heldout}
        assert len({p.group for p in heldout}) == 2  # round(6 x 0.34)
        assert all(p.group == f"topic{int(p.question[1:-1]) % 6}" for p in train + heldout)
    assert load(path, group_column="g", eval_fraction=0.34, seed=0) == splits[0]
    assert len({tuple(p.group for p in h) for _, h in splits.values()}) > 1  # the seed matters


def test_fanoutqa_default(load):
    expected = split_by_group(load_qa_pairs(), 0.2, 0)
    assert load(None) == expected
    assert load("fanoutqa") == expected
    train, heldout = load(None, system_prompt="Be brief.", eval_fraction=0.3, seed=1)
    plain = split_by_group(load_qa_pairs(), 0.3, 1)
    assert [p.system for p in train + heldout] == ["Be brief."] * (len(plain[0]) + len(plain[1]))
    assert [(p.question, p.answer, p.group) for p in train] == [(p.question, p.answer, p.group) for p in plain[0]]


# ------------------------------------------------------------------------------------ tokenisation

def example_set(long_prompt=True):
    examples = [
        QAPair("What is the capital of France?", "Paris", "g0"),
        QAPair("Capital?", "Paris", "g1", context="France is a country in Europe.", system="Be brief."),
        QAPair("And of Italy?", "Rome", "g2", history=(("user", "Hi"), ("assistant", "Hello!"))),
        QAPair("Why?", "because " * 40, "g3"),  # answer truncated
    ]
    if long_prompt:
        examples.append(QAPair("Tell me " + "very " * 60 + "much: what is it?", "It", "g4"))  # prompt truncated
    return examples


@pytest.mark.parametrize("which", ["tokenizer", "plain_tokenizer"])
def test_tokenized_collator_equals_qa_collator(request, which):
    tok = request.getfixturevalue(which)
    examples = example_set()
    tokenized = tokenize_examples(examples, tok, max_length=24)
    assert tokenized.column_names == list(TOKENIZED_COLUMNS) and len(tokenized) == len(examples)
    reference = QACollator(tok, max_length=24)
    expected = reference(examples)
    for rows in ([tokenized[i] for i in range(len(examples))], tokenized[list(range(len(examples)))]):
        collate = TokenizedCollator(tok)
        got = collate(rows)
        assert got.keys() == expected.keys()
        for key in expected:
            assert got[key].dtype == expected[key].dtype and torch.equal(got[key], expected[key]), key
        counters = (collate.num_truncated_prompts, collate.num_truncated_answers)
        assert counters == (reference.num_truncated_prompts, reference.num_truncated_answers)
    assert reference.num_truncated_answers == 1 and reference.num_truncated_prompts >= 1
    # a sub-batch in another order is the same rows
    order = [3, 0, 2]
    assert torch.equal(TokenizedCollator(tok)(tokenized[order])["labels"],
                       QACollator(tok, max_length=24)([examples[i] for i in order])["labels"])


def test_labels_mask_exactly_prompt_and_padding(tokenizer):
    """Against an independent tokenisation: the chat template on hand-written messages, answer + eos."""
    examples = example_set(long_prompt=False)[:3]
    messages = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": "France is a country in Europe.\n\nCapital?"}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
         {"role": "user", "content": "And of Italy?"}],
    ]
    batch = TokenizedCollator(tokenizer)(tokenize_examples(examples, tokenizer, max_length=256)[:])
    width = batch["input_ids"].shape[1]
    for row, (example, msgs) in enumerate(zip(examples, messages)):
        prompt = tokenizer(tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
                           add_special_tokens=False)["input_ids"]
        answer = tokenizer(example.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        n = len(prompt) + len(answer)
        assert batch["input_ids"][row, :n].tolist() == prompt + answer
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
        assert batch["labels"][row].tolist() == [IGNORE_INDEX] * len(prompt) + answer + [IGNORE_INDEX] * (width - n)
        assert (batch["input_ids"][row, n:] == tokenizer.pad_token_id).all()
    assert int(batch["attention_mask"].sum(1).min()) < width  # some row is padded


def test_tokenization_cache_file_is_reused(tmp_path, tokenizer, monkeypatch):
    from sg_distributed.data import sources

    examples = example_set()
    assert tokenize_examples(examples, tokenizer, max_length=24).cache_files == []  # in memory
    first = tokenize_examples(examples, tokenizer, max_length=24, cache_dir=tmp_path)
    files = sorted(tmp_path.glob("qa-tokens-*.arrow"))
    assert len(files) == 1 and first.cache_files[0]["filename"] == str(files[0])

    def fail(*args, **kwargs):
        raise AssertionError("tokenised again instead of reading the cache")

    monkeypatch.setattr(sources, "_encode_row", fail)
    again = tokenize_examples(examples, tokenizer, max_length=24, cache_dir=tmp_path)
    assert again[:] == first[:] and again.cache_files == first.cache_files
    with pytest.raises(AssertionError, match="tokenised again"):  # other inputs: another key, tokenised anew
        tokenize_examples(examples, tokenizer, max_length=32, cache_dir=tmp_path)
    with pytest.raises(AssertionError, match="tokenised again"):
        tokenize_examples(examples[:-1], tokenizer, max_length=24, cache_dir=tmp_path)


# ------------------------------------------------------------------------------------------ errors


def test_missing_and_unreadable_sources(tmp_path, load):
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl'?: no such file"):
        load(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="no-such-org/no-such-set.*Hub.*offline"):
        load("no-such-org/no-such-set")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="empty_dir: the folder is no save_to_disk folder"):
        load(tmp_path / "empty_dir")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"notes\.txt: unsupported file type '\.txt'"):
        load(tmp_path / "notes.txt")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"empty\.jsonl: the file is empty"):
        load(tmp_path / "empty.jsonl")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match=r"blank\.jsonl: the file has no rows"):
        load(tmp_path / "blank.jsonl")
    write_csv(tmp_path / "header.csv", ["question", "answer"], [])
    with pytest.raises(ValueError, match=r"header\.csv: the file has no rows"):
        load(tmp_path / "header.csv")
    (tmp_path / "broken.jsonl").write_text('{"question": "q", "answer": "a"}\n{not json\n')
    with pytest.raises(ValueError, match=r"broken\.jsonl: cannot read it as json data"):
        load(tmp_path / "broken.jsonl")


@pytest.mark.parametrize("kwargs, message", [
    ({"question_column": "q"},
     r"split 'train': unknown column 'q' \(question_column\); columns: \['question', 'answer', 'g'\]"),
    ({"answer_column": "label"}, r"unknown column 'label' \(answer_column\); columns: \['question', 'answer', 'g'\]"),
    ({"context_column": "ctx"}, r"unknown column 'ctx' \(context_column\)"),
    ({"group_column": "topic"}, r"unknown column 'topic' \(group_column\)"),
    ({"messages_column": "chat"}, r"unknown column 'chat' \(messages_column\)"),
    ({"eval_split": "test"}, r"qa\.jsonl: no split 'test' \(eval_split\); splits: \['train'\]"),
    ({"eval_fraction": 0.01}, r"eval_fraction=0\.01 of 4 rows holds out nothing"),
    ({"eval_fraction": 0.9, "group_column": "g"}, r"eval_fraction=0\.9 of 2 groups \(column 'g'\) leaves nothing"),
    ({"eval_fraction": 1.0}, r"eval_fraction must be in \(0, 1\)"),
])
def test_option_errors(tmp_path, load, kwargs, message):
    path = write_jsonl(tmp_path / "qa.jsonl", qa_rows(4, group=lambda i: f"t{i % 2}"))
    with pytest.raises(ValueError, match=message):
        load(path, **kwargs)


@pytest.mark.parametrize("rows, message", [
    ([{"text": "t", "label": 1}], r"neither chat nor question/answer data; columns: \['text', 'label'\]. Expected a "
                                  r"'messages' column"),
    ([{"question": "q", "prompt": "p", "answer": "a"}], r"columns \['question', 'prompt'\] could all be the question"),
    ([{"question": "q", "label": "a"}], r"no answer column \(none of \['answer', 'completion', 'output'\]\); name it "
                                        r"with answer_column; columns: \['question', 'label'\]"),
    (qa_rows(2) + [{"question": "q2", "answer": "  "}], r"split 'train', row 2: empty answer \(column 'answer'\)"),
    ([{"question": "q", "answer": ["a", "b"]}], r"row 0: column 'answer' holds list \['a', 'b'\], expected text"),
    ([{"question": None, "answer": "a"}], r"row 0: empty question \(column 'question'\)"),
    ([{"messages": CHATS[0]}, {"messages": [{"role": "user", "content": "q"}]}],
     r"row 1: 'messages' has no assistant turn \(roles: \['user'\]\)"),
    ([{"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}],
     r"row 0: malformed 'messages': expected a non-empty list of \{'role': str, 'content': str\} objects"),
    ([{"messages": "hello"}], r"row 0: malformed 'messages'.*got 'hello'"),
    ([{"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]}],
     r"row 0: the turn before the last assistant turn must be a user turn, got nothing"),
    ([{"messages": CHATS[3] + [{"role": "assistant", "content": "again"}]}],
     r"row 0: the turn before the last assistant turn must be a user turn, got 'assistant'"),
    ([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}],
     r"row 0: empty answer \(the last assistant turn, messages\[1\]\)"),
])
def test_bad_rows_and_formats(tmp_path, load, rows, message):
    path = write_jsonl(tmp_path / "bad.jsonl", rows * 1)
    with pytest.raises(ValueError, match=message) as info:
        load(path)
    assert str(path) in str(info.value)


def test_split_errors(tmp_path, load):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list(qa_rows(3)), "test": Dataset.from_list(qa_rows(1))}).save_to_disk(
        tmp_path / "tt")
    with pytest.raises(ValueError, match=r"no split 'validation' \(eval_split\); splits: \['train', 'test'\]"):
        load(tmp_path / "tt", eval_split="validation")
    with pytest.raises(ValueError, match=r"eval_split='train' is the training split"):
        load(tmp_path / "tt", eval_split="train")
    Dataset.from_list(qa_rows(3)).save_to_disk(tmp_path / "single")
    with pytest.raises(ValueError, match=r"single: eval_split='test', but the dataset has no named splits"):
        load(tmp_path / "single", eval_split="test")
    DatasetDict({"a": Dataset.from_list(qa_rows(3)), "b": Dataset.from_list(qa_rows(3))}).save_to_disk(tmp_path / "ab")
    with pytest.raises(ValueError, match=r"cannot tell the training split: splits \['a', 'b'\]"):
        load(tmp_path / "ab")
    assert load(tmp_path / "ab", eval_split="b")[1] == [QAPair(f"q{i}?", f"a{i}", str(i)) for i in range(3)]
    empty = Dataset.from_dict({"question": [], "answer": []})
    with_empty = DatasetDict({"train": Dataset.from_list(qa_rows(3)), "test": empty})
    with pytest.raises(ValueError, match=r"<DatasetDict>: split 'test' is empty"):  # a dataset in hand
        load(with_empty, eval_split="test")
    with pytest.raises(ValueError, match=r"<DatasetDict>: split 'train' is empty"):
        load(DatasetDict({"train": empty}))
    with_empty.save_to_disk(tmp_path / "empty_test")  # datasets 5.2 cannot reload an empty saved split
    with pytest.raises(ValueError, match=r"empty_test: split 'test' is empty \(saved with no rows\)"):
        load(tmp_path / "empty_test", eval_split="test")
    folder = tmp_path / "files"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", qa_rows(3))
    (folder / "test.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"files: split 'test' is empty"):
        load(folder, eval_split="test")
    # the held-out split is checked like the training split
    DatasetDict({"train": Dataset.from_list(qa_rows(3)),
                 "test": Dataset.from_list([{"question": "q", "answer": ""}])}).save_to_disk(tmp_path / "bad_test")
    with pytest.raises(ValueError, match=r"split 'test', row 0: empty answer"):
        load(tmp_path / "bad_test", eval_split="test")


def test_option_conflicts(tmp_path, load):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CHATS])
    with pytest.raises(ValueError, match="context_column applies to question/answer data"):
        load(path, context_column="ctx")
    with pytest.raises(ValueError, match=r"FanOutQA data takes none of \['eval_split', 'question_column'\]"):
        load(None, question_column="q", eval_split="test")
    with pytest.raises(ValueError, match="at least one example"):
        tokenize_examples([], None)
