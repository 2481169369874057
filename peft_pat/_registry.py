"""Registration of the ``PAT`` tuner type with PEFT.

PEFT's ``register_peft_method`` only accepts members of its closed ``PeftType`` enum, so we keep an
enum of our own (a ``str`` enum, which hashes and compares equal to ``"PAT"``, the value written to
``adapter_config.json``) and write PEFT's three mapping dicts directly. Idempotent.
"""

from __future__ import annotations

import enum

PREFIX = "pat_"


class PatPeftType(str, enum.Enum):  # noqa: UP042  (PEFT compares peft_type with str values)
    PAT = "PAT"

    def __str__(self) -> str:  # PEFT's messages format the type: say "PAT", not "PatPeftType.PAT"
        return self.value


def register(config_cls: type, model_cls: type) -> None:
    """Make ``get_peft_model``/``PeftModel.from_pretrained`` know the ``PAT`` type (safe to call twice)."""
    from peft.mapping import (
        PEFT_TYPE_TO_CONFIG_MAPPING,
        PEFT_TYPE_TO_PREFIX_MAPPING,
        PEFT_TYPE_TO_TUNER_MAPPING,
    )

    peft_type = PatPeftType.PAT
    if PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type) is config_cls:
        return
    owners = [t for t, p in PEFT_TYPE_TO_PREFIX_MAPPING.items() if p == PREFIX and t != peft_type]
    if owners:
        raise KeyError(f"The adapter prefix {PREFIX!r} is already used by PEFT type {owners[0]}; cannot register PAT.")
    PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = PREFIX
    PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
    PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
