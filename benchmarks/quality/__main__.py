"""``python -m benchmarks.quality``: the command line of :mod:`benchmarks.quality.cli`."""

from .cli import main

main()
