"""Benchmarks of peft-pat, run from the repository root as modules: ``python -m benchmarks.<name>``.

quality (``python -m benchmarks.quality``), training, inference, merge_memory, family_merge; shared
helpers in :mod:`benchmarks.measure` (timing, memory, JSON) and :mod:`benchmarks.cost_model`
(ideal costs from shapes). Not installed with the package: run them from a clone.
"""
