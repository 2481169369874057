"""The ``peft-pat`` command line.

``peft-pat merge BASE ADAPTER OUT`` merges a trained PAT adapter into its base checkpoint and writes
the pruned model, streaming tensor by tensor from safetensors (see :mod:`peft_pat.merge.checkpoint`), so it
works for models larger than RAM. Also runnable as ``python -m peft_pat.cli``.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence

from .errors import PATError
from .merge.checkpoint import DTYPES, merge_checkpoint

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peft-pat",
        description="Tools for PAT (Pruning-Aware Tuning) adapters.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    merge = commands.add_parser(
        "merge",
        help="merge a PAT adapter into its base model and write the smaller, pruned model",
        description="Fold the adapter (LoRA, HSMs, mask) into the base weights, drop the pruned hidden channels "
        "and write a stock transformers checkpoint to OUT. Streams the base's safetensors shards one tensor at "
        "a time, so peak memory is about the adapter plus one weight matrix. Equal to PeftModel.merge_and_prune().",
    )
    merge.add_argument("base", metavar="BASE", help="base model folder (config.json + safetensors weights)")
    merge.add_argument("adapter", metavar="ADAPTER", help="PAT adapter folder (adapter_config.json + weights)")
    merge.add_argument("out", metavar="OUT", help="output folder for the pruned model (must not exist)")
    merge.add_argument(
        "--adapter-name",
        default=None,
        help="which adapter of ADAPTER to merge: a named adapter lives in ADAPTER/NAME (default: ADAPTER itself)",
    )
    merge.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="cast the base weights to this dtype before merging (default: keep the base's dtype)",
    )
    merge.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    merge.add_argument("--no-progress", action="store_true", help="do not show a progress bar")
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"peft-pat: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``peft-pat`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    warnings.showwarning = _show_warning
    try:
        if args.command == "merge":
            out = merge_checkpoint(
                args.base,
                args.adapter,
                args.out,
                adapter_name=args.adapter_name,
                dtype=args.dtype,
                overwrite=args.overwrite,
                progressbar=not args.no_progress,
            )
            print(f"Wrote the pruned model to {out}")
    except (PATError, FileExistsError, OSError) as exc:
        print(f"peft-pat: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("peft-pat: interrupted; OUT was left as it was.", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
