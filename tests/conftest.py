import os
import warnings

import pytest
import torch
import transformers

import peft_pat  # noqa: F401  (registers the PAT type with PEFT)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
transformers.logging.set_verbosity_error()
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

DEVICE_ENV = "PEFT_PAT_TEST_DEVICE"  # e.g. cuda, cuda:1; default cpu (benchmarks/gpu_check.py sets it)


def pytest_addoption(parser):
    parser.addoption(
        "--pat-device",
        default=None,
        help=f"device for the tests that take the `device` fixture (default ${DEVICE_ENV} or cpu); "
        "`-m device` selects exactly those tests",
    )


def pytest_configure(config):
    config.addinivalue_line("markers", "device: runs on --pat-device / $PEFT_PAT_TEST_DEVICE (the `device` fixture)")
    name = config.getoption("--pat-device") or os.environ.get(DEVICE_ENV) or "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise pytest.UsageError(f"--pat-device / ${DEVICE_ENV}={name!r} is not a torch device ({error})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(
            f"--pat-device / ${DEVICE_ENV}={name!r}, but CUDA is not available here (torch {torch.__version__}); "
            "unset it to run on the CPU."
        )
    config.pat_device = device


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.device)


@pytest.fixture
def device(request) -> torch.device:
    """The device the tiny models and inputs of this test live on: cpu unless --pat-device / $PEFT_PAT_TEST_DEVICE."""
    return request.config.pat_device


@pytest.fixture(autouse=True)
def _seed_and_quiet():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="PAT adapter .* mask hardened")
        yield
