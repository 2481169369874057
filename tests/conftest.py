import os
import warnings

import pytest
import torch
import transformers

import peft_pat  # noqa: F401  (registers the PAT type with PEFT)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
transformers.logging.set_verbosity_error()
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed_and_quiet():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="PAT adapter .* mask hardened")
        yield
