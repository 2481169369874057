"""Commonsense task folders: parsing, prompt formats, training batches and multiple-choice items.

A data folder holds one sub-folder per task, each with ``train.json`` and/or ``test.json``: a JSON
list of records ``{"instruction", "input", "output", "answer"}`` (the LLM-Adapters format of
``shared/data/commonsense``). Any task name works. The candidates are read from the instruction:

* the line ``Answer format: a/b/c`` gives the candidate *labels* (``answer1``, ``solution2``, ``true``);
* the text after ``Label:`` (case-insensitive, e.g. ``Answer1: ...``) up to the next label is that
  candidate's *answer text*; a label that does not occur is its own text, except ``true``/``false``,
  which read ``yes``/``no`` as in lm-eval-harness's BoolQ;
* the question is what precedes the first candidate, without a leading ``Please ...:`` clause.

Two scorings of the same item (see :mod:`.evaluation`):

* ``text`` (lm-eval-harness style, the default): context ``Question: {question}\\nAnswer:``, one
  continuation `` {answer text}`` per candidate. Zero-shot: it needs no knowledge of the tuning format.
* ``label``: context = the tuning prompt plus the output's fixed prefix (``the correct answer is``),
  continuation `` {label}``. Measures what tuning on this format taught.

Training sequences are the tuning prompt followed by the record's ``output`` and EOS; the labels cover
the output and EOS only (``answer``) or every token (``full``, also the labels of ``--loss distill``,
whose cross-entropy is logged next to the distillation loss). Tasks are mixed with equal probability
per optimizer step; each batch comes from one task (less padding on CPU), the order of tasks and
examples is fixed by the seed, so every method sees exactly the same batches.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
TEXT_CONTEXT = "Question: {question}\nAnswer:"
IGNORE = -100
BOOLEAN_TEXTS = {"true": "yes", "false": "no"}  # lm-eval's BoolQ answers; other unlisted labels are their own text

_FORMAT_LINE = re.compile(r"Answer format:\s*(?P<labels>\S+)\s*$", re.IGNORECASE | re.MULTILINE)
_PREAMBLE = re.compile(r"^Please[^:]*:\s*", re.IGNORECASE)


class TaskDataError(ValueError):
    """A task folder or record cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class ChoiceItem:
    """One multiple-choice test item with both scorings' contexts and continuations."""

    task: str
    text_context: str
    text_candidates: tuple[str, ...]
    label_context: str
    label_candidates: tuple[str, ...]
    gold: int

    def scoring(self, mode: str) -> tuple[str, tuple[str, ...]]:
        if mode == "text":
            return self.text_context, self.text_candidates
        if mode == "label":
            return self.label_context, self.label_candidates
        raise ValueError(f"Unknown scoring mode {mode!r}; use 'text' or 'label'.")


def prompt_for(record: dict) -> str:
    if record.get("input"):
        return PROMPT_WITH_INPUT.format(instruction=record["instruction"], input=record["input"])
    return PROMPT.format(instruction=record["instruction"])


def load_records(path: Path) -> list[dict]:
    if not path.is_file():
        raise TaskDataError(f"{path} does not exist; a task folder needs train.json and/or test.json.")
    with open(path) as handle:
        records = json.load(handle)
    if not isinstance(records, list) or not records:
        raise TaskDataError(f"{path} must hold a non-empty JSON list of records.")
    for i, record in enumerate(records):
        missing = [k for k in ("instruction", "output", "answer") if k not in record]
        if missing:
            raise TaskDataError(f"{path}, record {i}: missing keys {missing} (need instruction, output, answer).")
    return records


def task_folders(root: Path, split: str, tasks: list[str] | None = None) -> dict[str, Path]:
    """Task name -> ``root/<task>/<split>.json`` for the named tasks (or every task that has the split)."""
    root = Path(root)
    if not root.is_dir():
        raise TaskDataError(
            f"Commonsense data folder {root} does not exist. Pass --data-dir pointing at a folder that contains "
            "commonsense/<task>/{train,test}.json (the project's default is ../shared/data)."
        )
    if tasks is None:
        found = {p.name: p / f"{split}.json" for p in sorted(root.iterdir()) if (p / f"{split}.json").is_file()}
        if not found:
            raise TaskDataError(f"No task folder under {root} has a {split}.json.")
        return found
    missing = [t for t in tasks if not (root / t / f"{split}.json").is_file()]
    if missing:
        available = sorted(p.name for p in root.iterdir() if (p / f"{split}.json").is_file())
        raise TaskDataError(f"No {split}.json for task(s) {missing} under {root}; tasks with one: {available}.")
    return {t: root / t / f"{split}.json" for t in tasks}


def parse_choice(record: dict, task: str, where: str) -> ChoiceItem:
    """Candidates, question and gold index of one record (module docstring)."""
    instruction = record["instruction"]
    match = _FORMAT_LINE.search(instruction)
    if match is None:
        raise TaskDataError(f"{where}: the instruction has no 'Answer format: a/b/...' line to read candidates from.")
    labels = tuple(label for label in match.group("labels").split("/") if label)
    answer = str(record["answer"]).strip()
    if answer not in labels:
        raise TaskDataError(f"{where}: answer {answer!r} is not one of the candidates {labels}.")
    body = instruction[: match.start()]
    spans = []
    for label in labels:
        found = re.search(rf"(?<![A-Za-z0-9]){re.escape(label)}\s*:\s*", body, re.IGNORECASE)
        spans.append((found.start(), found.end()) if found else None)
    starts = sorted(s[0] for s in spans if s is not None)
    texts = []
    for label, span in zip(labels, spans):
        if span is None:
            texts.append(BOOLEAN_TEXTS.get(label.lower(), label))
            continue
        end = next((s for s in starts if s > span[0]), len(body))
        texts.append(" ".join(body[span[1] : end].split()))
    question = body[: starts[0]] if starts else body
    question = _PREAMBLE.sub("", " ".join(question.split()))
    output = str(record["output"])
    prefix = output[: -len(answer)].rstrip() if output.endswith(answer) else output.rstrip()
    return ChoiceItem(
        task=task,
        text_context=TEXT_CONTEXT.format(question=question),
        text_candidates=tuple(" " + t for t in texts),
        label_context=prompt_for(record) + prefix,
        label_candidates=tuple(" " + label for label in labels),
        gold=labels.index(answer),
    )


def load_test_items(root: Path, tasks: list[str] | None, limit: int | None, seed: int) -> dict[str, list[ChoiceItem]]:
    """Task -> test items; ``limit`` draws a seeded random subsample of that many items per task."""
    items = {}
    for task, path in task_folders(root, "test", tasks).items():
        records = load_records(path)
        order = list(range(len(records)))
        if limit is not None and limit < len(records):
            order = sorted(random.Random(f"{seed}-{task}").sample(order, limit))
        items[task] = [parse_choice(records[i], task, f"{path}, record {i}") for i in order]
    return items


LOSS_ON = ("answer", "full")


def encode_example(record: dict, tokenizer, max_length: int, loss_on: str = "answer") -> tuple[list[int], list[int]]:
    """(input ids, labels): loss on the output + EOS (``answer``) or on every token (``full``);
    an over-long prompt loses its start."""
    prompt = tokenizer(prompt_for(record), add_special_tokens=False)["input_ids"]
    answer = tokenizer(str(record["output"]), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    answer = answer[:max_length]
    prompt = prompt[max(0, len(prompt) - (max_length - len(answer))) :] if max_length > len(answer) else []
    prompt_labels = prompt if loss_on == "full" else [IGNORE] * len(prompt)
    return prompt + answer, prompt_labels + answer


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch with attention mask and labels (pads ignored)."""
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (seq, lab) in enumerate(examples):
        ids[row, : len(seq)] = torch.tensor(seq)
        labels[row, : len(lab)] = torch.tensor(lab)
        mask[row, : len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class TaskMixture:
    """Seeded stream of single-task batches; each step's task is drawn uniformly over the tasks."""

    def __init__(
        self, root: Path, tasks: list[str] | None, tokenizer, batch_size: int, max_length: int, loss_on: str = "answer"
    ) -> None:
        if loss_on not in LOSS_ON:
            raise TaskDataError(f"loss_on={loss_on!r}: choose one of {LOSS_ON}.")
        self.loss_on = loss_on
        self.records = {task: load_records(path) for task, path in task_folders(root, "train", tasks).items()}
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @property
    def tasks(self) -> list[str]:
        return list(self.records)

    def batches(self, steps: int, seed: int) -> list[dict[str, torch.Tensor]]:
        rng = random.Random(seed)
        queues: dict[str, list[int]] = {task: [] for task in self.records}
        out = []
        for _ in range(steps):
            task = rng.choice(self.tasks)
            picked = []
            while len(picked) < self.batch_size:
                if not queues[task]:
                    queues[task] = list(range(len(self.records[task])))
                    rng.shuffle(queues[task])
                picked.append(queues[task].pop())
            examples = [
                encode_example(self.records[task][i], self.tokenizer, self.max_length, self.loss_on) for i in picked
            ]
            out.append(collate(examples, self.pad_id))
        return out
