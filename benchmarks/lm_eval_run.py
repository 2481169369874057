"""Score any model with lm-evaluation-harness on the project's local data, fully offline.

    python -m benchmarks.lm_eval_run --model_args pretrained=PRUNED_FOLDER --tasks pat_commonsense,pat_wikitext2
    python -m benchmarks.lm_eval_run --model_args pretrained=smollm2-135m --tasks pat_commonsense --limit 200
    python -m benchmarks.lm_eval_run --model_args pretrained=BASE,peft=ADAPTER_FOLDER --tasks pat_commonsense_label

It is ``lm_eval run`` (every lm-eval option passes through unchanged) with three defaults added:

* ``--include_path benchmarks/lm_eval_tasks`` (the ``pat_*`` task YAMLs; data folder: ``--metadata
  '{"data_dir": ...}'``, ``PAT_DATA_DIR``, or ``../shared/data`` beside the repository);
* ``--model hf`` and ``--batch_size 8``, unless given;
* ``import peft_pat`` first, so ``peft=`` loads a PAT adapter (PEFT only knows the ``PAT`` type once
  it is registered), and ``pretrained=smollm2-135m`` resolves to the offline copy that
  ``peft_pat.offline_models`` uses (``peft_pat.offline_models.resolve_model_path``).

``HF_DATASETS_OFFLINE`` / ``HF_HUB_OFFLINE`` are set: nothing is fetched from the hub. Tasks:

    pat_commonsense        zero-shot ARC-C, ARC-E, BoolQ (no passage), OpenBookQA, PIQA: acc, acc_norm
    pat_commonsense_label  the instruction-tuning prompt, candidates = labels (answer1, true, ...)
    pat_wikitext2          WikiText-2 test, document level: word/byte perplexity, bits per byte
    pat_<task>[_label]     one task
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

TASKS = Path(__file__).resolve().parent / "lm_eval_tasks"


def _resolve_pretrained(model_args: str) -> str:
    """``pretrained=<alias>`` replaced by the folder ``peft_pat.offline_models`` keeps for it; the rest unchanged."""
    from peft_pat.offline_models import resolve_model_path

    parts = []
    for part in model_args.split(","):
        key, _, value = part.partition("=")
        if key.strip() == "pretrained":
            part = f"{key}={resolve_model_path(value)}"
        parts.append(part)
    return ",".join(parts)


def build_argv(argv: list[str]) -> list[str]:
    """lm_eval's argv with the defaults of the module docstring added."""
    argv = list(argv)
    if argv and argv[0] == "run":
        argv = argv[1:]
    names = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    for i, arg in enumerate(argv):
        if arg == "--model_args" and i + 1 < len(argv):
            argv[i + 1] = _resolve_pretrained(argv[i + 1])
        elif arg.startswith("--model_args="):
            argv[i] = "--model_args=" + _resolve_pretrained(arg.split("=", 1)[1])
    extra = []
    if "--include_path" not in names:
        extra += ["--include_path", str(TASKS)]
    if "--model" not in names:
        extra += ["--model", "hf"]
    if "--batch_size" not in names:
        extra += ["--batch_size", "8"]
    return ["run", *extra, *argv]


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from lm_eval.__main__ import cli_evaluate

    import peft_pat  # noqa: F401  (registers the PAT adapter type with PEFT, for peft=ADAPTER)

    sys.argv = [sys.argv[0], *build_argv(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()
