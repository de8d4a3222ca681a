"""Finding the linear layers a method converts: name patterns, block selection, layer types."""
from __future__ import annotations

import re

from torch import nn

from sg_distributed.sparsegrad.config import BERT_TARGETS, LLAMA_TARGETS

_BLOCK_INDEX = re.compile(r"\.(\d+)(?:\.|$)")


def block_index(name: str) -> int | None:
    """Index of the transformer block a module belongs to: the first integer component of its name."""
    match = _BLOCK_INDEX.search("." + name)
    return int(match.group(1)) if match else None


def layer_type(name: str) -> str:
    """Name with block indices replaced by ``*``: all ``up_proj`` of a Llama share one type."""
    return re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", name)


def linear_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def default_targets(model: nn.Module) -> list[str] | str:
    names = linear_names(model)
    if any(n.endswith("up_proj") for n in names):
        return list(LLAMA_TARGETS)
    if any(re.fullmatch(BERT_TARGETS, n) for n in names):
        return BERT_TARGETS
    raise ValueError(
        "No default target modules for this model (neither Llama-style up_proj/down_proj nor BERT-style "
        f"intermediate/output.dense); pass target_modules. Linear layers found: {_candidates(names)}"
    )


def _candidates(names: list[str], limit: int = 20) -> list[str]:
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names} | {".".join(n.split(".")[-2:]) for n in names})
    return suffixes[:limit]


def _matches(name: str, targets: list[str] | str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def find_target_linears(
    model: nn.Module,
    target_modules: list[str] | str | None,
    blocks: list[int] | None = None,
    block_stride: int = 1,
    skip_types: tuple[type, ...] = (),
) -> dict[str, nn.Linear]:
    """Map of full module name -> linear module for every target, in model order.

    Raises a ValueError that lists candidate names when a target matches nothing, and names the
    missing blocks when ``blocks`` asks for blocks the model does not have.
    """
    targets = default_targets(model) if target_modules is None else target_modules
    names = linear_names(model)
    modules = dict(model.named_modules())
    if isinstance(targets, str):
        matched = [n for n in names if _matches(n, targets)]
        if not matched:
            raise ValueError(f"target_modules regex {targets!r} matches no nn.Linear; candidates: {_candidates(names)}")
    else:
        for target in targets:
            if not any(_matches(n, [target]) for n in names):
                raise ValueError(f"target module {target!r} matches no nn.Linear in the model; candidates: {_candidates(names)}")
        matched = [n for n in names if _matches(n, targets)]
    matched = [n for n in matched if not isinstance(modules[n], skip_types)]

    present = sorted({b for b in map(block_index, matched) if b is not None})
    if blocks is not None:
        missing = sorted(set(blocks) - set(present))
        if missing:
            raise ValueError(f"blocks {missing} do not exist among the targets; blocks present: {present}")
        chosen = set(blocks)
    else:
        chosen = set(present[::block_stride])
    return {n: modules[n] for n in matched if block_index(n) is None or block_index(n) in chosen}
