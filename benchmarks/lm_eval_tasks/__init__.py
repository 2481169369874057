"""The ``pat_*`` lm-evaluation-harness tasks: YAML files plus :mod:`.pat_tasks`, their data functions.

lm-eval loads ``pat_tasks.py`` by file path (the YAMLs' ``!function pat_tasks.<name>`` entries), not as
this package's module; ``python -m benchmarks.lm_eval_run`` points lm-eval here. The package exists so
that Python code (tests, ``benchmarks.research.lm_eval_compare``) imports ``benchmarks.lm_eval_tasks.pat_tasks``.
"""
