"""A user's QA dataset as ``QAPair`` examples (train, held-out), and their tokenisation through ``datasets.map``.

This module holds what touches the ``datasets`` library; the records, prompts and collators live in ``qa``.

Sources (``load_examples(source)``):

* ``None`` or ``"fanoutqa"``: the embedded FanOutQA dev pairs (``qa.load_qa_pairs``), split by top-level
  question with ``qa.split_by_group`` exactly as before.
* a ``.json`` / ``.jsonl`` / ``.csv`` / ``.parquet`` file (``datasets.load_dataset("json"|"csv"|"parquet")``).
  CSV cells are read as text, verbatim (no type inference: ``"007"`` stays ``"007"``, ``"NA"`` stays
  ``"NA"``, an empty cell is ``""``). JSON and parquet keep their types: numbers become text as in
  FanOutQA (``3`` -> ``"3"``, ``61.6`` -> ``"61.6"``, booleans ``"yes"``/``"no"``).
* a ``save_to_disk`` folder (``datasets.load_from_disk``: a ``Dataset`` or a ``DatasetDict``).
* another folder: its data files (``datasets.load_dataset(folder)``; splits from the file names, e.g.
  ``train.jsonl`` / ``test.jsonl``; CSV types are inferred there, as ``datasets`` does).
* anything else: a Hugging Face Hub dataset name (``datasets.load_dataset(name)``; needs the network).

Formats, per dataset:

* chat: a ``messages`` column (``messages_column``) holding lists of ``{"role", "content"}``. The last
  assistant turn is the answer; a leading system turn is the system prompt (``system_prompt`` fills it
  in where a row has none); the turn just before the answer must be a user turn (the question); the
  turns between are the history. Earlier assistant turns are prompt, not trained; turns after the last
  assistant turn are ignored.
* question/answer: ``question_column`` / ``answer_column``, or, where not given, the one column of
  ``QUESTION_COLUMNS`` / ``ANSWER_COLUMNS`` present (``question``/``prompt``/``instruction`` and
  ``answer``/``completion``/``output``); ``context_column`` (optional, e.g. ``input`` of Alpaca-style
  data) goes before the question; ``system_prompt`` applies to every row. Naming a question or answer
  column selects this format even where a ``messages`` column exists.

Questions and answers are stripped of surrounding whitespace. Held-out: ``eval_split`` names a split
of the dataset (training then uses ``train``, or the only other split); otherwise ``eval_fraction`` of the
training split's groups (``group_column``, else one group per row) is held out with ``split_by_group``,
deterministically in ``seed``. Every error names its culprit: the path, the column (with the columns
found), the split (with the splits found) or the row (0-based index within its split).
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from sg_distributed.data import qa
from sg_distributed.data.qa import QACollator, QAPair, load_qa_pairs, split_by_group

FANOUTQA = "fanoutqa"
DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
QUESTION_COLUMNS = ("question", "prompt", "instruction")
ANSWER_COLUMNS = ("answer", "completion", "output")
TRAIN_SPLIT = "train"


# ----------------------------------------------------------------------------------------- loading


def _looks_like_path(source: str) -> bool:
    """True for strings that cannot be a hub name (``name`` or ``owner/name``)."""
    return (source.startswith((".", "/", "~")) or source.count("/") > 1 or source.endswith("/")
            or Path(source).suffix.lower() in DATA_FILE_BUILDERS or os.sep != "/" and os.sep in source)


def _csv_text_features(path: Path):
    """All columns of a CSV file as strings (the header read with the csv module), or None without a header."""
    from datasets import Features, Value

    with path.open(newline="", encoding="utf-8-sig") as f:
        header = next(csv.reader(f), None)
    return Features({name: Value("string") for name in header}) if header else None


def _empty_split(exc: ValueError) -> str | None:
    """The split named by datasets' 'Instruction "<split>" corresponds to no data!' (an empty split), else None."""
    match = re.search(r'Instruction "(.+?)" corresponds to no data', str(exc))
    return match.group(1) if match else None


def _load_from_disk(path: Path):
    import datasets

    try:
        return datasets.load_from_disk(str(path))
    except IndexError as exc:  # datasets 5.2: a split saved with no rows has no Arrow file and cannot be reloaded
        states = [path / "state.json"] if (path / "state.json").is_file() else sorted(path.glob("*/state.json"))
        empty = [s.parent.name for s in states if not json.loads(s.read_text()).get("_data_files")]
        if empty:
            raise ValueError(f"{path}: split {empty[0]!r} is empty (saved with no rows)") from exc
        raise


def _load_file(path: Path, cache_dir):
    import datasets
    from datasets.exceptions import DatasetsError

    builder = DATA_FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; expected one of {sorted(DATA_FILE_BUILDERS)}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: the file is empty")
    kwargs = {}
    if builder == "csv":
        kwargs = {"features": _csv_text_features(path), "keep_default_na": False, "na_filter": False}
    try:
        return datasets.load_dataset(builder, data_files=str(path), cache_dir=cache_dir, **kwargs)
    except StopIteration:  # datasets 5.2: a JSON Lines file of blank lines
        raise ValueError(f"{path}: the file has no rows") from None
    except DatasetsError as exc:
        raise ValueError(f"{path}: cannot read it as {builder} data: {exc.__cause__ or exc}") from exc
    except ValueError as exc:
        if _empty_split(exc):  # datasets 5.2: a CSV file with a header only
            raise ValueError(f"{path}: the file has no rows") from exc
        raise


def load_source(source: str | os.PathLike, cache_dir: str | os.PathLike | None = None):
    """A local file, ``save_to_disk`` folder, folder of data files or hub name -> ``Dataset`` or ``DatasetDict``."""
    import datasets

    source = str(source)
    cache_dir = None if cache_dir is None else str(cache_dir)
    path = Path(source).expanduser()
    if path.is_file():
        return _load_file(path, cache_dir)
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return _load_from_disk(path)
        try:
            return datasets.load_dataset(str(path), cache_dir=cache_dir)
        except ValueError as exc:
            if _empty_split(exc):  # datasets 5.2: e.g. an empty test.jsonl next to train.jsonl
                raise ValueError(f"{path}: split {_empty_split(exc)!r} is empty") from exc
            raise
        except FileNotFoundError as exc:  # EmptyDatasetError, DataFilesNotFoundError
            raise FileNotFoundError(f"{path}: the folder is no save_to_disk folder and holds no data files "
                                    f"({', '.join(sorted(DATA_FILE_BUILDERS))}): {exc}") from exc
        except datasets.exceptions.DatasetsError as exc:
            raise ValueError(f"{path}: cannot read the folder's data files: {exc.__cause__ or exc}") from exc
    if _looks_like_path(source):
        raise FileNotFoundError(f"dataset {source!r}: no such file or folder")
    try:
        return datasets.load_dataset(source, cache_dir=cache_dir)
    except OSError as exc:  # ConnectionError offline, DatasetNotFoundError (a FileNotFoundError) online
        offline = "" if not datasets.config.HF_HUB_OFFLINE else (
            " (offline mode is on: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE; give a local file or folder instead)")
        raise FileNotFoundError(f"dataset {source!r}: no such local file or folder, and loading it from the "
                                f"Hugging Face Hub failed{offline}: {exc}") from exc


# ------------------------------------------------------------------------------------------ splits


def _pick_splits(data, eval_split: str | None, source: str):
    """(train name, train Dataset, held-out name or None, held-out Dataset or None)."""
    import datasets

    if isinstance(data, datasets.Dataset):
        if eval_split is not None:
            raise ValueError(f"{source}: eval_split={eval_split!r}, but the dataset has no named splits "
                             "(a single Dataset); use eval_fraction")
        splits = {TRAIN_SPLIT: data}
    else:
        splits = dict(data)
    names = list(splits)
    if eval_split is not None:
        if eval_split not in splits:
            raise ValueError(f"{source}: no split {eval_split!r} (eval_split); splits: {names}")
        if eval_split == TRAIN_SPLIT:
            raise ValueError(f"{source}: eval_split={eval_split!r} is the training split; splits: {names}")
    rest = [n for n in names if n != eval_split]
    if TRAIN_SPLIT in rest:
        train_name = TRAIN_SPLIT
    elif len(rest) == 1:
        train_name = rest[0]
    else:
        raise ValueError(f"{source}: cannot tell the training split: splits {names}, none named {TRAIN_SPLIT!r}")
    chosen = [(train_name, splits[train_name])] + ([(eval_split, splits[eval_split])] if eval_split else [])
    for name, split in chosen:
        if len(split) == 0:
            raise ValueError(f"{source}: split {name!r} is empty")
    return train_name, splits[train_name], eval_split, splits[eval_split] if eval_split else None


# ------------------------------------------------------------------------------------------ format


def _auto_column(columns: Sequence[str], candidates: Sequence[str], option: str, source: str) -> str | None:
    found = [c for c in candidates if c in columns]
    if len(found) > 1:
        raise ValueError(f"{source}: columns {found} could all be the {option.split('_')[0]}; name one with "
                         f"{option}; columns: {list(columns)}")
    return found[0] if found else None


def _check_column(name: str, option: str, columns: Sequence[str], where: str) -> None:
    if name not in columns:
        raise ValueError(f"{where}: unknown column {name!r} ({option}); columns: {list(columns)}")


def _detect_format(columns, *, question_column, answer_column, context_column, messages_column, source):
    """("chat", {...}) or ("qa", {...}): the columns each role is read from."""
    if question_column is None and answer_column is None and messages_column in columns:
        if context_column is not None:
            raise ValueError(f"{source}: context_column applies to question/answer data, but the dataset is in "
                             f"chat format (column {messages_column!r}); put the context into the messages")
        return "chat", {"messages": messages_column}
    if messages_column != "messages" and question_column is None and answer_column is None:
        _check_column(messages_column, "messages_column", columns, source)
    question = question_column or _auto_column(columns, QUESTION_COLUMNS, "question_column", source)
    answer = answer_column or _auto_column(columns, ANSWER_COLUMNS, "answer_column", source)
    if question is None and answer is None:
        raise ValueError(
            f"{source}: neither chat nor question/answer data; columns: {list(columns)}. Expected a "
            f"{messages_column!r} column of [{{'role', 'content'}}, ...] lists (messages_column), or a question and "
            f"an answer column (question_column/answer_column, found automatically when named one of "
            f"{list(QUESTION_COLUMNS)} and {list(ANSWER_COLUMNS)})")
    for name, option, candidates in ((question, "question_column", QUESTION_COLUMNS),
                                     (answer, "answer_column", ANSWER_COLUMNS)):
        if name is None:
            raise ValueError(f"{source}: no {option.split('_')[0]} column (none of {list(candidates)}); name it with "
                             f"{option}; columns: {list(columns)}")
    return "qa", {"question": question, "answer": answer, "context": context_column}


def _text(value, where: str, column: str) -> str | None:
    """A cell as stripped text (numbers and booleans as FanOutQA writes them), None when empty."""
    if value is None:
        return None
    if isinstance(value, (str, bool, int, float)):
        return qa.answer_to_text(value, numeric=True)
    raise ValueError(f"{where}: column {column!r} holds {type(value).__name__} {_short(value)}, expected text")


def _short(value, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _qa_example(row, where, columns, group, system_prompt) -> QAPair:
    question = _text(row[columns["question"]], where, columns["question"])
    if question is None:
        raise ValueError(f"{where}: empty question (column {columns['question']!r})")
    answer = _text(row[columns["answer"]], where, columns["answer"])
    if answer is None:
        raise ValueError(f"{where}: empty answer (column {columns['answer']!r})")
    context = _text(row[columns["context"]], where, columns["context"]) if columns["context"] else None
    return QAPair(question, answer, group, context=context, system=system_prompt or None)


def _chat_example(row, where, columns, group, system_prompt) -> QAPair:
    column = columns["messages"]
    messages = row[column]
    if not isinstance(messages, list) or not messages or not all(
        isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages
    ):
        raise ValueError(f"{where}: malformed {column!r}: expected a non-empty list of "
                         f"{{'role': str, 'content': str}} objects, got {_short(messages)}")
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        raise ValueError(f"{where}: {column!r} has no assistant turn (roles: {roles})")
    last = len(roles) - 1 - roles[::-1].index("assistant")
    answer = messages[last]["content"].strip()
    if not answer:
        raise ValueError(f"{where}: empty answer (the last assistant turn, {column}[{last}])")
    prefix = messages[:last]
    system = system_prompt or None
    if prefix and prefix[0]["role"] == "system":
        system, prefix = prefix[0]["content"], prefix[1:]
    if not prefix or prefix[-1]["role"] != "user":
        got = repr(prefix[-1]["role"]) if prefix else "nothing"
        raise ValueError(f"{where}: the turn before the last assistant turn must be a user turn, got {got} "
                         f"(roles: {roles})")
    question = prefix[-1]["content"].strip()
    if not question:
        raise ValueError(f"{where}: empty question (the user turn {column}[{last - 1}])")
    history = tuple((m["role"], m["content"]) for m in prefix[:-1])
    return QAPair(question, answer, group, system=system, history=history)


def _examples(split, split_name: str, source: str, fmt: str, columns: dict, group_column: str | None,
              system_prompt: str | None) -> list[QAPair]:
    where_split = f"{source}: split {split_name!r}"
    used = [c for c in columns.values() if c] + ([group_column] if group_column else [])
    for role, name in list(columns.items()) + [("group", group_column)]:
        if name:
            _check_column(name, f"{role}_column", split.column_names, where_split)
    make = _chat_example if fmt == "chat" else _qa_example
    out = []
    for i, row in enumerate(split.select_columns(list(dict.fromkeys(used)))):
        where = f"{where_split}, row {i}"
        if group_column:
            group = _text(row[group_column], where, group_column)
            if group is None:
                raise ValueError(f"{where}: empty group (column {group_column!r})")
        else:
            group = str(i)
        out.append(make(row, where, columns, group, system_prompt))
    return out


def load_examples(
    source=None,
    *,
    question_column: str | None = None,
    answer_column: str | None = None,
    context_column: str | None = None,
    messages_column: str = "messages",
    system_prompt: str | None = None,
    group_column: str | None = None,
    eval_split: str | None = None,
    eval_fraction: float = 0.2,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[list[QAPair], list[QAPair]]:
    """(train, held-out) examples of ``source`` (see the module docstring); both non-empty.

    ``source`` is a path or name (``str`` / ``os.PathLike``), ``None``, or a ``datasets.Dataset`` /
    ``DatasetDict`` already in hand. ``cache_dir`` is where ``datasets`` keeps the Arrow files of a loaded
    file or hub dataset (default: the ``datasets`` cache, ``HF_DATASETS_CACHE``).
    """
    if eval_split is None and not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    if source is None or str(source) == FANOUTQA:
        given = {k: v for k, v in (("question_column", question_column), ("answer_column", answer_column),
                                   ("context_column", context_column), ("group_column", group_column),
                                   ("eval_split", eval_split)) if v is not None}
        if messages_column != "messages":
            given["messages_column"] = messages_column
        if given:
            raise ValueError(f"the embedded FanOutQA data takes none of {sorted(given)} (it is split by top-level "
                             "question with eval_fraction and seed)")
        pairs = load_qa_pairs()
        if system_prompt:
            pairs = [replace(p, system=system_prompt) for p in pairs]
        return split_by_group(pairs, eval_fraction, seed)

    import datasets

    if isinstance(source, (datasets.Dataset, datasets.DatasetDict)):
        data, source = source, f"<{type(source).__name__}>"
    else:
        source = str(source)
        data = load_source(source, cache_dir)
    train_name, train_split, eval_name, eval_data = _pick_splits(data, eval_split, source)
    fmt, columns = _detect_format(train_split.column_names, question_column=question_column,
                                  answer_column=answer_column, context_column=context_column,
                                  messages_column=messages_column, source=f"{source}: split {train_name!r}")
    train = _examples(train_split, train_name, source, fmt, columns, group_column, system_prompt)
    if eval_data is not None:
        return train, _examples(eval_data, eval_name, source, fmt, columns, group_column, system_prompt)
    train, heldout = split_by_group(train, eval_fraction, seed)
    n_groups = len({p.group for p in train}) + len({p.group for p in heldout})
    what = f"groups (column {group_column!r})" if group_column else "rows"
    if not heldout:
        raise ValueError(f"{source}: eval_fraction={eval_fraction} of {n_groups} {what} holds out nothing; "
                         "raise eval_fraction or give eval_split")
    if not train:
        raise ValueError(f"{source}: eval_fraction={eval_fraction} of {n_groups} {what} leaves nothing to train on; "
                         "lower eval_fraction or give eval_split")
    return train, heldout


# ------------------------------------------------------------------------------------ tokenisation

_EXAMPLE_COLUMNS = ("question", "answer", "group", "context", "system", "history")
TOKENIZED_COLUMNS = ("input_ids", "labels", "prompt_truncated", "answer_truncated")


def _example_row(pair: QAPair) -> dict:
    return {"question": pair.question, "answer": pair.answer, "group": pair.group, "context": pair.context,
            "system": pair.system, "history": json.dumps(pair.history)}


def _row_example(row: Mapping) -> QAPair:
    return QAPair(row["question"], row["answer"], row["group"], context=row["context"], system=row["system"],
                  history=tuple(tuple(turn) for turn in json.loads(row["history"])))


def _encode_row(row: Mapping, tokenizer, max_length: int) -> dict:
    collator = QACollator(tokenizer, max_length)  # the one truncation rule; its counters flag this row
    input_ids, labels = collator.encode(_row_example(row))
    return {"input_ids": input_ids, "labels": labels, "prompt_truncated": collator.num_truncated_prompts > 0,
            "answer_truncated": collator.num_truncated_answers > 0}


def tokenize_examples(examples: Sequence[QAPair], tokenizer, max_length: int = 64, *,
                      cache_dir: str | os.PathLike | None = None):
    """``datasets.Dataset`` of ``TOKENIZED_COLUMNS``; row ``i`` holds ``QACollator(tokenizer, max_length).encode``
    of ``examples[i]`` (the same truncation) and whether it cut the prompt / the answer.

    Tokenised with ``Dataset.from_list(...).map(...)``. Without ``cache_dir`` the dataset lives in memory
    and nothing is reused across calls (``datasets`` only caches datasets backed by files). With
    ``cache_dir`` the result is the Arrow file ``cache_dir/qa-tokens-<key>.arrow``, where ``key`` hashes the
    examples, the tokenizer (``datasets``' Hasher), ``max_length`` and the source of ``qa``/``sources``: a
    second call with the same inputs reads that file (``load_from_cache_file``) instead of tokenising.
    Ranks may tokenise into the same ``cache_dir`` at once: ``datasets`` writes a temporary file and moves it
    into place. ``qa.TokenizedCollator`` pads rows of it into the batches ``QACollator`` builds.
    """
    from datasets import Dataset, Features, Value
    from datasets.fingerprint import Hasher

    if not examples:
        raise ValueError("tokenize_examples needs at least one example")
    features = Features({name: Value("string") for name in _EXAMPLE_COLUMNS})
    dataset = Dataset.from_list([_example_row(p) for p in examples], features=features)
    kwargs = {}
    if cache_dir is not None:
        hasher = Hasher()
        for part in (dataset._fingerprint, tokenizer, max_length, Path(qa.__file__).read_bytes(),
                     Path(__file__).read_bytes()):
            hasher.update(part)
        key = hasher.hexdigest()
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        kwargs = {"cache_file_name": str(Path(cache_dir) / f"qa-tokens-{key}.arrow"), "new_fingerprint": key}
    return dataset.map(_encode_row, fn_kwargs={"tokenizer": tokenizer, "max_length": max_length},
                       remove_columns=list(_EXAMPLE_COLUMNS), desc="tokenize", **kwargs)


def load_pairs(args) -> tuple[list[QAPair], list[QAPair]]:
    """(train, held-out) pairs chosen by the launch scripts' data flags (``training.arguments.add_data_arguments``):
    FanOutQA (embedded, or ``args.data``) split by top-level question, or ``args.dataset`` through
    ``load_examples``; ``--system_prompt`` applies to either."""
    if args.dataset is None:
        train, heldout = split_by_group(load_qa_pairs(args.data), heldout_fraction=args.eval_fraction, seed=0)
        if args.system_prompt:
            train, heldout = ([replace(p, system=args.system_prompt) for p in side] for side in (train, heldout))
        return train, heldout
    return load_examples(args.dataset, question_column=args.question_column, answer_column=args.answer_column,
                         context_column=args.context_column, messages_column=args.messages_column,
                         system_prompt=args.system_prompt, group_column=args.group_column,
                         eval_split=args.eval_split, eval_fraction=args.eval_fraction, seed=0)
