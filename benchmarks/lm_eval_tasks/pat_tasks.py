"""Offline lm-evaluation-harness tasks on the project's local data (no hub access, no peft_pat import).

The YAML files beside this module define the tasks; lm-eval imports this module through their
``!function`` entries. Data folder, first match wins:

1. ``--metadata '{"data_dir": "/path/to/data"}'`` on the lm-eval command line;
2. the environment variable ``PAT_DATA_DIR``;
3. ``../shared/data`` relative to the repository root (this file is ``benchmarks/lm_eval_tasks/``).

The folder holds ``commonsense/<task>/test.json`` (LLM-Adapters records: instruction with the
candidates and an ``Answer format: a/b/...`` line, gold label in ``answer``) and
``wikitext-2-raw/wiki.test.raw``.

Commonsense docs carry the question, the candidate answer texts, the candidate labels, the gold index
and the tuning prompt (``label_context``), so one dataset serves two scorings:

* ``pat_<task>`` (group ``pat_commonsense``): zero-shot, the prompt each task has in lm-eval's own
  task folder (ARC, PIQA: ``Question: {q}\\nAnswer:``; OpenBookQA: the bare question stem; BoolQ:
  ``Question: {q}?\\nAnswer:`` with `` no``/`` yes`` -- lm-eval's BoolQ prompt without the passage,
  which these records do not have), candidates = answer texts;
* ``pat_<task>_label`` (group ``pat_commonsense_label``): the instruction-tuning prompt plus
  ``the correct answer is``, candidates = the labels (``answer1``, ``true``, ...), which measures
  what tuning on this format taught.

WikiText-2 (``pat_wikitext2``): the raw test file is cut into its articles (the lines
`` = Title = ``), as in lm-eval's ``wikitext`` task (document-level WikiText-2 test split), and each
article is scored with rolling windows of the model's maximum length.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import datasets

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA_DIR = REPO.parent / "shared" / "data"

# lm-eval imports this file by path, so the repository root must already be importable: it is when
# lm-eval runs inside ``python -m benchmarks.lm_eval_run`` (the launcher is itself a module of the package).
try:
    from benchmarks.quality.commonsense import TEXT_CONTEXT, ChoiceItem, load_records, parse_choice
except ModuleNotFoundError as error:
    if error.name != "benchmarks":
        raise
    raise ModuleNotFoundError(
        f"The pat_* tasks parse their data with the benchmarks package of the repository ({REPO}), which is not "
        "importable here. Run lm-eval through the launcher from the repository root: python -m "
        "benchmarks.lm_eval_run ... (or put the repository root on PYTHONPATH for a plain lm_eval run).",
        name=error.name,
    ) from error

_ARTICLE = re.compile(r"^ = [^=].* = $")
_QUESTION_PREFIX, _QUESTION_SUFFIX = TEXT_CONTEXT.split("{question}")


def data_dir(**metadata) -> Path:
    """The data folder (module docstring); raises with the three ways to set it if it is missing."""
    folder = Path(metadata.get("data_dir") or os.environ.get("PAT_DATA_DIR") or DEFAULT_DATA_DIR).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f'Data folder {folder} does not exist. Pass --metadata \'{{"data_dir": "/path/to/data"}}\', '
            f"set PAT_DATA_DIR, or put the data at {DEFAULT_DATA_DIR}."
        )
    return folder


def doc_from_item(item: ChoiceItem) -> dict:
    """The lm-eval doc of one item parsed by the quality benchmark's own parser (one parser for both
    scorers): question, choices (answer texts), labels, gold, label_context."""
    question = item.text_context[len(_QUESTION_PREFIX) : len(item.text_context) - len(_QUESTION_SUFFIX)]
    return {
        "question": question,
        "choices": [c[1:] if c.startswith(" ") else c for c in item.text_candidates],
        "labels": [c.strip() for c in item.label_candidates],
        "gold": item.gold,
        "label_context": item.label_context,
    }


def commonsense_dataset(task_folder: str, **metadata) -> dict:
    """{"test": Dataset} of one commonsense task (``task_folder`` from the YAML's dataset_kwargs)."""
    path = data_dir(**metadata) / "commonsense" / task_folder / "test.json"
    records = load_records(path)
    docs = [doc_from_item(parse_choice(r, task_folder, f"{path}, record {i}")) for i, r in enumerate(records)]
    return {"test": datasets.Dataset.from_list(docs)}


def boolq_question(doc: dict) -> str:
    """lm-eval's BoolQ prompt without the passage: ``Question: {q}?\\nAnswer:`` (one question mark)."""
    return "Question: " + doc["question"].rstrip().rstrip("?") + "?\nAnswer:"


def wikitext_articles(text: str) -> list[str]:
    """The articles of a raw WikiText file, each starting with its `` = Title = `` line."""
    pages, current = [], []
    for line in text.splitlines(keepends=True):
        if _ARTICLE.match(line.rstrip("\n")) and any(x.strip() for x in current):
            pages.append("".join(current))
            current = []
        current.append(line)
    if any(x.strip() for x in current):
        pages.append("".join(current))
    return [p.strip("\n") for p in pages]


def wikitext_dataset(**metadata) -> dict:
    path = data_dir(**metadata) / "wikitext-2-raw" / "wiki.test.raw"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (expected wikitext-2-raw/wiki.test.raw in the data folder)")
    pages = wikitext_articles(path.read_text(encoding="utf-8"))
    return {"test": datasets.Dataset.from_list([{"page": p} for p in pages])}


def wikitext_detokenizer(doc: dict) -> str:
    """lm-eval's WikiText detokenizer (tasks/wikitext/preprocess_wikitext.py), unchanged in effect."""
    string = doc["page"]
    string = string.replace("s '", "s'")
    string = re.sub(r"/' [0-9]/", r"/'[0-9]/", string)
    string = string.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    for mark in (":", ";", ".", "!", "?", ","):
        string = string.replace(f" {mark} ", f"{mark} ")
    string = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", string)
    string = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", string)
    string = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", string)
    string = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', string)
    string = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", string)
    string = string.replace("= = = =", "====").replace("= = =", "===").replace("= =", "==")
    string = string.replace(" " + chr(176) + " ", chr(176))
    string = string.replace(" \n", "\n").replace("\n ", "\n")
    string = string.replace(" N ", " 1 ").replace(" 's", "'s")
    return string


def wikitext_results(doc: dict, results) -> dict:
    """Word and byte counts of the original (not detokenised) page, as lm-eval's wikitext task does."""
    (loglikelihood,) = results
    words = len(re.split(r"\s+", doc["page"]))
    size = len(doc["page"].encode("utf-8"))
    return {
        "word_perplexity": (loglikelihood, words),
        "byte_perplexity": (loglikelihood, size),
        "bits_per_byte": (loglikelihood, size),
    }
