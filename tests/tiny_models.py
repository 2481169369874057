"""The tiny random models of every family live in benchmarks/tiny_models.py (family_merge scales them up);
the test modules keep importing them from here."""

from benchmarks.tiny_models import (
    ALL_FAMILIES,
    CORE_FAMILIES,
    FAMILY_BUILDERS,
    VOCAB,
    tiny_config,
    tiny_inputs,
    tiny_model,
)

__all__ = ["ALL_FAMILIES", "CORE_FAMILIES", "FAMILY_BUILDERS", "VOCAB", "tiny_config", "tiny_inputs", "tiny_model"]
