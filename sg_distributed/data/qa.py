"""Single-hop question answering on FanOutQA dev: pairs, group split, collator and evaluation.

Each of the 310 top-level FanOutQA questions carries a ``decomposition`` tree of sub-questions with
their answers. ``load_qa_pairs`` keeps every sub-question (at any depth) whose answer is a scalar:

* strings (stripped; the single empty one is skipped),
* numbers: integers as ``"680000"``, floats as Python writes them (``"61.6"``, ``"36.0"``: the
  source uses floats for one-decimal quantities such as a Gini index),
* booleans as ``"yes"`` / ``"no"`` (yes/no questions such as "Was X born in Y?"),

and skips list and dict answers (multi-entity answers such as "the first 5 picks" whose parts are
asked again as their own sub-questions). Pass ``numeric=False`` for strings only (1,265 pairs; the
raw file has 1,266 string answers, one of them empty). Duplicates of the same (question, answer)
within a top-level question are dropped. ``group`` is the top-level question id.

``QAPair`` is also the record of any other QA data (``sg_distributed.data.sources``): besides the
question it may carry a ``context`` (put before the question in the user turn), a ``system`` prompt
and a ``history`` of earlier chat turns; ``build_prompt`` renders all of them, and only the answer
is ever supervised.
"""

from __future__ import annotations

import collections
import json
import random
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


@dataclass(frozen=True)
class QAPair:
    """One supervised example: a prompt and its answer (the only supervised tokens).

    The prompt is, in order: ``system`` (optional), the ``history`` of earlier chat turns (optional
    ``(role, content)`` pairs, e.g. a multi-turn prefix; its assistant turns are context, not trained),
    then one user turn holding ``context`` (optional, before the question) and ``question``. ``group``
    names the examples that must stay on one side of a train/held-out split. ``history`` may be given
    as ``{"role", "content"}`` dicts; it is stored as a tuple of pairs so that the record stays hashable.
    """

    question: str
    answer: str
    group: str
    context: str | None = None
    system: str | None = None
    history: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        turns = []
        for turn in self.history:
            if isinstance(turn, Mapping):
                turn = (turn.get("role"), turn.get("content"))
            turn = tuple(turn)
            if len(turn) != 2 or not all(isinstance(x, str) for x in turn):
                raise ValueError(f"a history turn must be (role, content) strings, got {turn!r}")
            turns.append(turn)
        object.__setattr__(self, "history", tuple(turns))


# ----------------------------------------------------------------------------------------- loading


def answer_to_text(answer, numeric: bool) -> str | None:
    """Scalar answer -> text, or None for answers that are skipped (lists, dicts, empty)."""
    if isinstance(answer, str):
        return answer.strip() or None
    if not numeric:
        return None
    if isinstance(answer, bool):
        return "yes" if answer else "no"
    if isinstance(answer, int):
        return str(answer)
    if isinstance(answer, float):
        return repr(answer)
    return None


def _walk(nodes, group: str, path: Path, where: str, numeric: bool, out: list[QAPair]) -> None:
    if not isinstance(nodes, list):
        raise ValueError(f"{path}: {where}: 'decomposition' must be a list, got {type(nodes).__name__}")
    for i, node in enumerate(nodes):
        here = f"{where}.decomposition[{i}]"
        if not isinstance(node, Mapping):
            raise ValueError(f"{path}: {here} is not an object")
        for field in ("question", "answer"):
            if field not in node:
                raise ValueError(f"{path}: {here} is missing field {field!r}")
        text = answer_to_text(node["answer"], numeric)
        question = node["question"].strip() if isinstance(node["question"], str) else ""
        if text is not None and question:
            out.append(QAPair(question, text, group))
        _walk(node.get("decomposition", []), group, path, here, numeric, out)


def load_qa_pairs(path: str | Path | None = None, *, numeric: bool = True) -> list[QAPair]:
    """Single-hop sub-question/answer pairs of FanOutQA dev (see the module docstring)."""
    if path is None:
        from sg_distributed.data.assets import fanoutqa_dev_path

        path = fanoutqa_dev_path()
    path = Path(path)
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of questions, got {type(records).__name__}")
    if not records:
        raise ValueError(f"{path}: the list of questions is empty")

    pairs: list[QAPair] = []
    for i, record in enumerate(records):
        where = f"record[{i}]"
        if not isinstance(record, Mapping):
            raise ValueError(f"{path}: {where} is not an object")
        for field in ("question", "answer"):
            if field not in record:
                raise ValueError(f"{path}: {where} is missing field {field!r}")
        group = str(record.get("id", i))
        _walk(record.get("decomposition", []), group, path, where, numeric, pairs)

    pairs = list(dict.fromkeys(pairs))  # drop exact duplicates, keep order
    if not pairs:
        raise ValueError(f"{path}: no sub-question with a usable answer found")
    return pairs


def split_by_group(
    pairs: Sequence[QAPair], heldout_fraction: float = 0.2, seed: int = 0
) -> tuple[list[QAPair], list[QAPair]]:
    """Deterministic train/held-out split in which no group appears on both sides."""
    if not 0.0 <= heldout_fraction <= 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1], got {heldout_fraction}")
    groups = sorted({p.group for p in pairs})
    random.Random(seed).shuffle(groups)
    heldout_groups = set(groups[: round(len(groups) * heldout_fraction)])
    train = [p for p in pairs if p.group not in heldout_groups]
    heldout = [p for p in pairs if p.group in heldout_groups]
    return train, heldout


# ------------------------------------------------------------------------------------ tokenisation


_PLAIN_ROLES = {"user": "Question", "assistant": "Answer"}


def _as_pair(prompt: str | QAPair) -> QAPair:
    return prompt if isinstance(prompt, QAPair) else QAPair(prompt, "", "")


def user_content(pair: QAPair) -> str:
    """The final user turn: the context (if any), a blank line, then the question."""
    return f"{pair.context}\n\n{pair.question}" if pair.context else pair.question


def prompt_messages(pair: QAPair) -> list[dict[str, str]]:
    """The prompt as chat messages: system (if any), history, then the user turn."""
    messages = [{"role": "system", "content": pair.system}] if pair.system else []
    messages += [{"role": role, "content": content} for role, content in pair.history]
    messages.append({"role": "user", "content": user_content(pair)})
    return messages


def build_prompt(tokenizer, prompt: str | QAPair) -> str:
    """Chat-template prompt (``prompt_messages`` + generation prompt) if the tokenizer has one, else plain text.

    ``prompt`` is a question or a ``QAPair`` (whose system prompt, history and context are rendered too).
    The plain text is ``"Question: ...\nAnswer:"``, preceded by the system prompt and a blank line, the
    history as ``"Question: ..."`` / ``"Answer: ..."`` lines (other roles capitalised) and ``"Context: ..."``.
    """
    pair = _as_pair(prompt)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(prompt_messages(pair), tokenize=False, add_generation_prompt=True)
    text = f"{pair.system}\n\n" if pair.system else ""
    text += "".join(f"{_PLAIN_ROLES.get(role, role.capitalize())}: {content}\n" for role, content in pair.history)
    text += f"Context: {pair.context}\n" if pair.context else ""
    return text + f"Question: {pair.question}\nAnswer:"


def prompt_ids(tokenizer, prompt: str | QAPair) -> list[int]:
    """Token ids of the prompt (a chat template already contains its special tokens)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    return tokenizer(build_prompt(tokenizer, prompt), add_special_tokens=not has_template)["input_ids"]


def answer_ids(tokenizer, answer: str) -> list[int]:
    """Token ids of the answer followed by eos."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; set tokenizer.eos_token")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    text = answer if has_template else " " + answer
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


class QACollator:
    """Batches QAPairs into ``input_ids``/``attention_mask``/``labels`` with right padding.

    Labels are ``-100`` on prompt and padding tokens; answer tokens and eos are supervised. Too-long
    examples lose prompt tokens from the left; the answer is cut only if it alone leaves no room for
    one prompt token (counted in ``num_truncated_answers``).
    """

    def __init__(self, tokenizer, max_length: int = 64):
        if max_length < 2:
            raise ValueError("max_length must be at least 2")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.num_truncated_prompts = 0
        self.num_truncated_answers = 0

    def encode(self, pair: QAPair) -> tuple[list[int], list[int]]:
        """(input_ids, labels) of one pair, truncated to ``max_length``."""
        prompt = prompt_ids(self.tokenizer, pair)
        answer = answer_ids(self.tokenizer, pair.answer)
        if len(answer) > self.max_length - 1:  # keep one prompt token to predict the first answer token
            answer = answer[: self.max_length - 1]
            self.num_truncated_answers += 1
        room = self.max_length - len(answer)
        if len(prompt) > room:
            prompt = prompt[len(prompt) - room :]
            self.num_truncated_prompts += 1
        return prompt + answer, [IGNORE_INDEX] * len(prompt) + answer

    def __call__(self, pairs: Sequence[QAPair]) -> dict[str, torch.Tensor]:
        return pad_batch([self.encode(p) for p in pairs], _pad_id(self.tokenizer))


def pad_batch(encoded: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """(input_ids, labels) rows -> right-padded ``input_ids``/``attention_mask``/``labels`` (labels -100 on padding)."""
    if not encoded:
        raise ValueError("cannot build a batch from no examples")
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, lab) in enumerate(encoded):
        if len(ids) != len(lab):
            raise ValueError(f"row {row}: {len(ids)} input ids but {len(lab)} labels")
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
        labels[row, : len(lab)] = torch.tensor(lab, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class TokenizedCollator:
    """``QACollator`` for rows tokenised ahead of time (``sources.tokenize_examples``): pads only.

    Takes a sequence of rows (``{"input_ids", "labels"}``, as ``dataset[i]`` gives them) or one batch
    (``dataset[indices]``: a mapping of lists) and returns exactly what ``QACollator`` returns for the
    same examples. Rows with ``prompt_truncated`` / ``answer_truncated`` flags add to the same counters.
    """

    def __init__(self, tokenizer):
        self.pad_id = _pad_id(tokenizer)
        self.num_truncated_prompts = 0
        self.num_truncated_answers = 0

    def __call__(self, rows) -> dict[str, torch.Tensor]:
        if isinstance(rows, Mapping):  # a batch: column -> list of values
            rows = [dict(zip(rows, values)) for values in zip(*rows.values())]
        self.num_truncated_prompts += sum(bool(r.get("prompt_truncated", False)) for r in rows)
        self.num_truncated_answers += sum(bool(r.get("answer_truncated", False)) for r in rows)
        return pad_batch([(r["input_ids"], r["labels"]) for r in rows], self.pad_id)


# ----------------------------------------------------------------------------------------- metrics


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation and articles, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    """1.0 if the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    """SQuAD token-level F1 between normalised strings."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred_tokens), overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


# -------------------------------------------------------------------------------------- evaluation


def _device_of(module: torch.nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _batches(items: Sequence, batch_size: int, show_progress: bool, desc: str):
    chunks = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    if show_progress:
        from tqdm.auto import tqdm

        return tqdm(chunks, desc=desc)
    return chunks


def _answer_loss(model, collator: QACollator, pairs, batch_size: int, show_progress: bool) -> tuple[float, float]:
    """Mean cross-entropy over all supervised answer tokens (teacher-forced), and the fraction of those tokens
    the model ranks first (answer-token accuracy: what moves first when a small model learns a format)."""
    device = _device_of(model)
    total, correct, count = 0.0, 0, 0
    for chunk in _batches(pairs, batch_size, show_progress, "answer loss"):
        batch = {k: v.to(device) for k, v in collator(chunk).items()}
        out = model(**batch)
        logits = out["logits"] if isinstance(out, Mapping) else out.logits
        shift_logits = logits[:, :-1].float()
        shift_labels = batch["labels"][:, 1:]
        supervised = shift_labels != IGNORE_INDEX
        total += F.cross_entropy(
            shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
            ignore_index=IGNORE_INDEX, reduction="sum",
        ).item()
        correct += int((shift_logits.argmax(-1).eq(shift_labels) & supervised).sum())
        count += int(supervised.sum())
    return total / max(count, 1), correct / max(count, 1)


def _generate_answers(
    generate_model, tokenizer, pairs, batch_size: int, max_new_tokens: int, max_length: int,
    show_progress: bool, synced_gpus: bool = False,
) -> list[str]:
    """Greedy answers from left-padded prompts, new tokens only, cut at the first newline.

    ``synced_gpus`` keeps every rank generating until all are done (needed under ZeRO-3, whose
    forward passes are collectives).
    """
    device = _device_of(generate_model)
    pad = _pad_id(tokenizer)
    predictions = []
    for chunk in _batches(pairs, batch_size, show_progress, "generate"):
        prompts = [prompt_ids(tokenizer, p)[-max_length:] for p in chunk]
        width = max(len(ids) for ids in prompts)
        input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention_mask[row, width - len(ids) :] = 1
        output = generate_model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=pad, eos_token_id=tokenizer.eos_token_id, synced_gpus=synced_gpus,
        )
        for new_tokens in output[:, width:]:
            text = tokenizer.decode(new_tokens, skip_special_tokens=True)
            predictions.append(text.split("\n", 1)[0].strip())
    return predictions


def evaluate_qa(
    model: torch.nn.Module,
    tokenizer,
    pairs: Sequence[QAPair],
    batch_size: int = 16,
    max_new_tokens: int = 16,
    max_length: int = 64,
    *,
    generate_model: torch.nn.Module | None = None,
    show_progress: bool = False,
    return_predictions: bool = False,
    synced_gpus: bool = False,
) -> dict[str, float]:
    """Teacher-forced ``answer_loss`` and ``answer_token_accuracy``, plus greedy ``exact_match`` and ``f1``
    (fractions in [0, 1]).

    ``model`` may be a wrapper whose forward takes input_ids/attention_mask/labels and returns
    logits; ``generate_model`` (default ``model``) must provide HF ``.generate``.
    """
    if not pairs:
        raise ValueError("evaluate_qa needs at least one pair")
    generate_model = model if generate_model is None else generate_model
    modules = {id(m): m for m in (model, generate_model)}.values()
    was_training = [(m, m.training) for m in modules]
    try:
        for m in modules:
            m.eval()
        with torch.no_grad():
            loss, accuracy = _answer_loss(model, QACollator(tokenizer, max_length), pairs, batch_size, show_progress)
            predictions = _generate_answers(
                generate_model, tokenizer, pairs, batch_size, max_new_tokens, max_length, show_progress,
                synced_gpus=synced_gpus,
            )
    finally:
        for m, mode in was_training:
            m.train(mode)
    em = sum(exact_match(pred, p.answer) for pred, p in zip(predictions, pairs)) / len(pairs)
    f1 = sum(f1_score(pred, p.answer) for pred, p in zip(predictions, pairs)) / len(pairs)
    metrics = {"answer_loss": loss, "answer_token_accuracy": accuracy, "exact_match": em, "f1": f1,
               "num_examples": len(pairs)}
    if return_predictions:
        metrics["predictions"] = predictions
    return metrics
