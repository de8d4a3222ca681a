"""Held-out evaluation of a training run across ranks, and the run's closing summary."""
from __future__ import annotations

from sg_distributed.data.qa import evaluate_qa
from sg_distributed.distributed.process_group import DistInfo, all_reduce_mean


def evaluate_held_out(model, tokenizer, pairs, info: DistInfo, max_length: int, label: str,
                      zero3: bool = False) -> dict:
    """Each rank scores an equal share of the held-out pairs; metrics are averaged over all of them.

    Under ZeRO-3 every forward is a collective, so shares are equal and generation is synced.
    """
    mine = pairs[info.rank::info.world_size]
    metrics = evaluate_qa(model, tokenizer, mine, batch_size=16, max_length=max_length,
                          show_progress=info.is_main, return_predictions=True, synced_gpus=zero3)
    merged = all_reduce_mean({k: metrics[k] for k in ("answer_loss", "answer_token_accuracy", "exact_match", "f1")},
                             len(mine))
    if info.is_main:
        for pair, prediction in list(zip(mine, metrics["predictions"]))[:3]:
            print(f"  Q: {pair.question} | gold: {pair.answer} | model: {prediction!r}", flush=True)
        print(f"[{label}] held-out answer loss {merged['answer_loss']:.4f} | answer-token accuracy "
              f"{merged['answer_token_accuracy']:.3f} (teacher-forced) | exact match {merged['exact_match']:.3f} | "
              f"F1 {merged['f1']:.3f} (greedy answers vs the gold string) | n={merged['num_examples']}", flush=True)
    return merged


def summary(results: dict, steps: int) -> str:
    """What moved, held-out, first; and what exact match / F1 mean for a short run on a small model."""
    before, after = results.get("before"), results["after"]
    moved = lambda key, fmt: (f"{before[key]:{fmt}} -> " if before else "") + f"{after[key]:{fmt}}"
    return (f"held-out: answer loss {moved('answer_loss', '.3f')}, answer-token accuracy "
            f"{moved('answer_token_accuracy', '.3f')}; exact match {moved('exact_match', '.3f')}, F1 {moved('f1', '.3f')}\n"
            f"(loss and token accuracy are teacher-forced on the gold answer: they move first. Exact match and F1 "
            f"compare the model's own greedy answer with the gold string; after {steps} steps on a small model "
            f"they stay near 0, because the answer format is learned before the facts.)")
