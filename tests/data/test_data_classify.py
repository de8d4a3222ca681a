"""BBC News loader: counts, labels, dedupe, deterministic stratified split, collator."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from sg_distributed.data.classify import (
    BBC_CATEGORIES,
    Article,
    ClassificationCollator,
    load_bbc_news,
    split_articles,
)


@pytest.fixture(scope="module")
def articles():
    return load_bbc_news()


def test_counts_labels_and_dedupe(articles):
    assert len(articles) == 2127
    assert len(load_bbc_news(dedupe=False)) == 2225
    assert {a.category for a in articles} == set(BBC_CATEGORIES)
    assert all(BBC_CATEGORIES[a.label] == a.category for a in articles)
    assert len({a.text for a in articles}) == len(articles)
    assert len({a.doc_id for a in articles}) == len(articles)


def test_split_is_deterministic_stratified_and_disjoint(articles):
    train, heldout = split_articles(articles, 0.2, seed=0)
    again_train, again_heldout = split_articles(articles, 0.2, seed=0)
    assert [a.doc_id for a in train] == [a.doc_id for a in again_train]
    assert [a.doc_id for a in heldout] == [a.doc_id for a in again_heldout]
    assert {a.doc_id for a in train}.isdisjoint({a.doc_id for a in heldout})
    assert len(train) + len(heldout) == len(articles)
    for label in range(len(BBC_CATEGORIES)):
        total = sum(a.label == label for a in articles)
        assert sum(a.label == label for a in heldout) == round(0.2 * total)
    other, _ = split_articles(articles, 0.2, seed=1)
    assert [a.doc_id for a in other] != [a.doc_id for a in train]
    with pytest.raises(ValueError):
        split_articles(articles, 1.5)


def test_collator_truncates_and_labels():
    from transformers import AutoTokenizer

    from sg_distributed.data.assets import minilm_dir

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    batch = [Article("short text", 2, "politics", "politics/x"), Article("word " * 500, 4, "tech", "tech/y")]
    out = ClassificationCollator(tokenizer, max_length=16)(batch)
    assert out["input_ids"].shape == (2, 16)
    assert out["attention_mask"][0].sum() < 16 and out["attention_mask"][1].sum() == 16
    assert torch.equal(out["labels"], torch.tensor([2, 4]))
    with pytest.raises(ValueError):
        ClassificationCollator(tokenizer, max_length=1)
