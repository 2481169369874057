"""Benchmarks of peft-pat, run from the repository root as modules: ``python -m benchmarks.<name>``.

Maintained: quality (``python -m benchmarks.quality``), training, inference, merge_memory, family_merge,
engine_speed (llama.cpp) and lm_eval_run (lm-evaluation-harness on the ``pat_*`` tasks of
``benchmarks/lm_eval_tasks/``); shared helpers in :mod:`benchmarks.measure` (timing, memory, JSON) and
:mod:`benchmarks.cost_model` (ideal costs from shapes). ``benchmarks/research/`` keeps one-off probes
whose numbers the docs cite (``python -m benchmarks.research.<name>``), not maintained as products.
Not installed with the package: run them from a clone.
"""
