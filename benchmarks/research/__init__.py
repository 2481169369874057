"""Research probes: scripts that each answered one question, kept so their recorded numbers can be re-run.

Not maintained as products (see README.md in this folder): they run as modules from the repository root
(``python -m benchmarks.research.<name>``) but are not kept in step with the package's defaults the way
``python -m benchmarks.quality`` and the other benchmarks are.
"""
