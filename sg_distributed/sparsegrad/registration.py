"""SparseGrad as a peft method: ``PeftType.SPARSEGRAD`` and peft's registry entries.

peft keeps its methods in the ``PeftType`` enum and refuses to register (``register_peft_method``) or to
save and load (``save_and_load``: "Unknown PEFT type passed") a type that is not a member. An out-of-tree
method therefore extends the enum; ``aenum.extend_enum`` is the maintained way to add a member to a
standard-library Enum. This is the one place that relies on peft's registry mechanism: if a peft upgrade
changes it, ``tests/sparsegrad/test_peft.py::test_peft_knows_sparsegrad`` fails here, by name.
"""
from __future__ import annotations

from aenum import extend_enum
from peft.utils.peft_types import PeftType

NAME = "sparsegrad"


def peft_type() -> PeftType:
    """``PeftType.SPARSEGRAD``, added to peft's enum on first use."""
    member = NAME.upper()
    if member not in PeftType.__members__:
        extend_enum(PeftType, member, member)
    return PeftType[member]


def register(config_cls, model_cls) -> None:
    """Register the config and tuner classes with peft (``get_peft_model``, ``PeftModel.from_pretrained``,
    ``PeftConfig.from_pretrained``); idempotent."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    if PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type()) is model_cls:
        return
    register_peft_method(name=NAME, config_cls=config_cls, model_cls=model_cls, prefix=f"{NAME}_")
