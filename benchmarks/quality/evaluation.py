"""Evaluation of a stock (merged and/or pruned) causal LM: perplexity, zero-shot accuracy, size.

Perplexity: PPL = exp( sum_w sum_t -log p(x_t | x_<t) / tokens ) over the windows of
:mod:`.wikitext`; the standard error of the mean NLL is taken across windows, and the per-window
NLLs are kept so two models can be compared window by window (:func:`paired_log_loss`).

Zero-shot multiple choice (lm-eval-harness style): the score of candidate k is the summed
log-likelihood of its continuation tokens given the context, LL_k = sum_t log p(c_t | ctx, c_<t).
``acc`` takes argmax_k LL_k; ``acc_norm`` takes argmax_k LL_k / len(continuation in characters)
(lm-eval's length normalisation, which removes the bias towards short answers). Standard error of an
accuracy over n items: sqrt(p (1 - p) / (n - 1)); of the mean over T tasks: sqrt(sum_t se_t^2) / T.
Per-item correctness is kept so two models can be compared on the same items (paired difference:
standard error of the mean of d_i = a_i - b_i), which is much tighter than comparing two accuracies.

Only the logits that are needed are computed: the decoder runs on the padded batch and the LM head
is applied to the continuation positions only (right padding is harmless for a causal model).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from .commonsense import ChoiceItem


def parameter_count(model: nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def _decoder_and_head(model: nn.Module):
    return model.get_decoder(), model.get_output_embeddings()


def _logits(model: nn.Module, head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


@torch.inference_mode()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, progress: bool = True) -> dict:
    """Perplexity over ``windows`` (see module docstring); returns the numbers that describe the run."""
    model.eval()
    decoder, head = _decoder_and_head(model)
    device = head.weight.device
    per_window = []
    for start in tqdm(range(0, len(windows), batch_size), desc="  perplexity", disable=not progress, leave=False):
        ids = windows[start : start + batch_size].to(device)
        hidden = decoder(input_ids=ids).last_hidden_state[:, :-1]
        for row in range(ids.shape[0]):
            logits = _logits(model, head, hidden[row])
            nll = torch.nn.functional.cross_entropy(logits, ids[row, 1:], reduction="mean")
            per_window.append(float(nll))
    nll = torch.tensor(per_window, dtype=torch.float64)
    mean = float(nll.mean())
    stderr = float(nll.std() / math.sqrt(len(nll))) if len(nll) > 1 else float("nan")
    return {
        "perplexity": math.exp(mean),
        "nll": mean,
        "nll_stderr": stderr,
        "context": int(windows.shape[1]),
        "windows": int(windows.shape[0]),
        "tokens_scored": int(windows.shape[0] * (windows.shape[1] - 1)),
        "per_window_nll": [round(x, 6) for x in per_window],
    }


def _requests(items: list[ChoiceItem], tokenizer, mode: str, max_length: int):
    """(item index, candidate index, token ids, number of continuation tokens, continuation characters)."""
    out = []
    for i, item in enumerate(items):
        context, candidates = item.scoring(mode)
        ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
        for k, cand in enumerate(candidates):
            cont = tokenizer(cand, add_special_tokens=False)["input_ids"][: max_length - 1]
            ids = ctx[max(0, len(ctx) + len(cont) - max_length) :] + cont
            out.append((i, k, ids, len(cont), len(cand)))
    return out


@torch.inference_mode()
def choice_loglikelihoods(
    model: nn.Module,
    tokenizer,
    items: list[ChoiceItem],
    mode: str = "text",
    max_length: int = 512,
    batch_tokens: int = 4096,
    progress: bool = True,
    desc: str = "",
) -> list[list[tuple[float, int]]]:
    """Per item, per candidate: (summed log-likelihood, continuation length in characters)."""
    model.eval()
    decoder, head = _decoder_and_head(model)
    device = head.weight.device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    requests = sorted(_requests(items, tokenizer, mode, max_length), key=lambda r: -len(r[2]))
    batches, current = [], []
    for request in requests:
        width = len(current[0][2]) if current else len(request[2])
        if current and width * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current = []
        current.append(request)
    if current:
        batches.append(current)
    scores: list[list[tuple[float, int]]] = [[(0.0, 1)] * len(item.scoring(mode)[1]) for item in items]
    for batch in tqdm(batches, desc=f"  {desc} ({mode})", disable=not progress, leave=False):
        width = max(len(r[2]) for r in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        for row, r in enumerate(batch):
            ids[row, : len(r[2])] = torch.tensor(r[2])
        hidden = decoder(input_ids=ids.to(device)).last_hidden_state
        rows, positions, targets = [], [], []
        for row, r in enumerate(batch):
            length, n = len(r[2]), r[3]
            for t in range(length - n, length):
                rows.append(row)
                positions.append(t - 1)
                targets.append(r[2][t])
        logits = _logits(model, head, hidden[torch.tensor(rows), torch.tensor(positions)])
        logprobs = torch.log_softmax(logits, dim=-1)[torch.arange(len(targets)), torch.tensor(targets, device=device)]
        offset = 0
        for r in batch:
            scores[r[0]][r[1]] = (float(logprobs[offset : offset + r[3]].sum()), r[4])
            offset += r[3]
    return scores


def accuracy_stderr(p: float, n: int) -> float:
    return math.sqrt(p * (1.0 - p) / (n - 1)) if n > 1 else float("nan")


def task_accuracy(items: list[ChoiceItem], scores: list[list[tuple[float, int]]]) -> dict:
    """acc / acc_norm with standard errors, plus per-item correctness strings ('1' correct, '0' wrong)."""
    correct, correct_norm = [], []
    for item, cand_scores in zip(items, scores):
        raw = max(range(len(cand_scores)), key=lambda k: cand_scores[k][0])
        norm = max(range(len(cand_scores)), key=lambda k: cand_scores[k][0] / max(cand_scores[k][1], 1))
        correct.append(int(raw == item.gold))
        correct_norm.append(int(norm == item.gold))
    n = len(items)
    acc, acc_norm = sum(correct) / n, sum(correct_norm) / n
    return {
        "n": n,
        "acc": acc,
        "acc_stderr": accuracy_stderr(acc, n),
        "acc_norm": acc_norm,
        "acc_norm_stderr": accuracy_stderr(acc_norm, n),
        "chance": sum(1.0 / len(cand_scores) for cand_scores in scores) / n,
        "correct": "".join(map(str, correct)),
        "correct_norm": "".join(map(str, correct_norm)),
    }


def mean_over_tasks(per_task: dict[str, dict]) -> dict:
    """Unweighted mean over tasks; stderr = sqrt(sum se^2) / T."""
    tasks = list(per_task)
    out = {"tasks": len(tasks), "chance": sum(per_task[t]["chance"] for t in tasks) / len(tasks)}
    for key in ("acc", "acc_norm"):
        out[key] = sum(per_task[t][key] for t in tasks) / len(tasks)
        out[f"{key}_stderr"] = math.sqrt(sum(per_task[t][f"{key}_stderr"] ** 2 for t in tasks)) / len(tasks)
    return out


def paired_difference(a: dict[str, dict], b: dict[str, dict], key: str = "correct_norm") -> dict:
    """Mean over tasks of (accuracy a - accuracy b) on the same items, with its paired standard error."""
    diffs, variances = [], []
    for task in a:
        if task not in b or len(a[task][key]) != len(b[task][key]):
            continue
        d = torch.tensor([int(x) - int(y) for x, y in zip(a[task][key], b[task][key])], dtype=torch.float64)
        diffs.append(float(d.mean()))
        variances.append(float(d.var() / len(d)) if len(d) > 1 else float("nan"))
    if not diffs:
        return {"difference": float("nan"), "stderr": float("nan")}
    return {"difference": sum(diffs) / len(diffs), "stderr": math.sqrt(sum(variances)) / len(diffs)}


def paired_log_loss(a: dict, b: dict) -> dict:
    """Model a against model b on the same WikiText windows: PPL ratio a / b = exp(mean_w (nll_a,w - nll_b,w))
    (all windows have the same length), the mean log-loss difference with its paired standard error,
    and the ratio's interval exp(mean +- 2 se)."""
    na, nb = a.get("per_window_nll"), b.get("per_window_nll")
    if not na or not nb or len(na) != len(nb):
        ratio = a["perplexity"] / b["perplexity"] if a.get("perplexity") and b.get("perplexity") else float("nan")
        return {"ppl_ratio": ratio, "nll_difference": math.log(ratio) if ratio > 0 else float("nan"),
                "nll_difference_stderr": float("nan"), "ppl_ratio_2se": [float("nan"), float("nan")]}  # fmt: skip
    d = torch.tensor(na, dtype=torch.float64) - torch.tensor(nb, dtype=torch.float64)
    mean = float(d.mean())
    se = float(d.std() / math.sqrt(len(d))) if len(d) > 1 else float("nan")
    return {
        "ppl_ratio": math.exp(mean),
        "nll_difference": mean,
        "nll_difference_stderr": se,
        "ppl_ratio_2se": [math.exp(mean - 2 * se), math.exp(mean + 2 * se)],
    }


def evaluate_model(
    model: nn.Module,
    tokenizer,
    test_items: dict[str, list[ChoiceItem]],
    windows: torch.Tensor | None,
    modes: tuple[str, ...] = ("text",),
    max_length: int = 512,
    batch_tokens: int = 4096,
    ppl_batch: int = 4,
    progress: bool = True,
) -> dict:
    """Everything reported for one final model."""
    result: dict = {"parameters": parameter_count(model), "hidden_size": int(model.config.hidden_size)}
    if windows is not None:
        result["wikitext2"] = perplexity(model, windows, batch_size=ppl_batch, progress=progress)
    for mode in modes:
        per_task = {}
        for task, items in test_items.items():
            scores = choice_loglikelihoods(
                model, tokenizer, items, mode, max_length, batch_tokens, progress=progress, desc=task
            )
            per_task[task] = task_accuracy(items, scores)
        result[f"accuracy_{mode}"] = {"tasks": per_task, "mean": mean_over_tasks(per_task)}
    return result
