"""WikiText-2 perplexity data: the standard concatenate-and-chunk protocol.

The raw test file is read whole (it is already the concatenation of the test articles, with their
blank lines), tokenised once without special tokens, and cut into consecutive non-overlapping
windows of ``context`` tokens; the last partial window is dropped. Each window is scored on its own
(no carried-over context), so a window predicts ``context - 1`` tokens. ``max_windows`` keeps the
first windows, so every model is scored on the same tokens (and two models can be compared window by
window).
"""

from __future__ import annotations

from pathlib import Path

import torch


class WikiTextError(ValueError):
    """The WikiText file is missing or too short for one window."""


def perplexity_windows(path: Path, tokenizer, context: int, max_windows: int | None) -> torch.Tensor:
    """LongTensor (windows, context) of consecutive token windows from the start of ``path``."""
    path = Path(path)
    if not path.is_file():
        raise WikiTextError(
            f"{path} does not exist. Pass --data-dir pointing at a folder with wikitext-2-raw/wiki.test.raw "
            "(the project's default is ../shared/data)."
        )
    ids = tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    windows = len(ids) // context
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows < 1:
        raise WikiTextError(f"{path} has {len(ids)} tokens, fewer than one window of {context}; lower --ppl-context.")
    return torch.tensor(ids[: windows * context], dtype=torch.long).view(windows, context)
