"""PATConfig validation and PEFT registration."""

import json

import pytest
from peft import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

import peft_pat
from peft_pat import PATConfig, PATConfigError, PATTypeError


def test_registration_is_idempotent_and_complete():
    peft_pat.register(PATConfig, peft_pat.PATModel)
    assert PEFT_TYPE_TO_CONFIG_MAPPING["PAT"] is PATConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING["PAT"] is peft_pat.PATModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING["PAT"] == "pat_"
    assert list(PEFT_TYPE_TO_PREFIX_MAPPING.values()).count("pat_") == 1


def test_config_json_roundtrip(tmp_path):
    config = PATConfig(task_type="CAUSAL_LM", target_sparsity=0.3, hsm_rank=16, r=8, mask_lr=5e-3)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "PAT"
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, PATConfig)
    assert loaded.peft_type.value == "PAT"
    assert (loaded.target_sparsity, loaded.hsm_rank, loaded.r, loaded.mask_lr) == (0.3, 16, 8, 5e-3)


@pytest.mark.parametrize("sparsity", [0, 0.0, 1, 1.0, -0.1, 1.5])
def test_sparsity_outside_open_interval(sparsity):
    with pytest.raises(PATConfigError, match="strictly between 0 and 1"):
        PATConfig(target_sparsity=sparsity)


def test_sparsity_and_width_together():
    """Refused with the hidden width alone (both fix the same number); the default axes: tests/test_misuse.py."""
    with pytest.raises(PATConfigError, match="either target_sparsity .* or target_width"):
        PATConfig(target_sparsity=0.25, target_width=48, prune_axes=["hidden"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"hsm_rank": 0}, "hsm_rank must be a positive integer"),
        ({"target_width": 0}, "target_width must be a positive integer"),
        ({"r": -1}, "r must be >= 0"),
        ({"lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\)"),
        ({"mask_milestone": 0.0}, "mask_milestone=0.0 must be a fraction"),
        ({"mask_freeze": 1.5}, "mask_freeze=1.5 must be a fraction"),
        ({"mask_lr": 0}, "mask_lr must be > 0"),
        ({"active_loss_weight": -1}, "active_loss_weight must be >= 0"),
        ({"identity_loss": "orthogonal"}, "identity_loss='orthogonal' is unknown"),
        ({"embedding_hsm": "lowrank"}, "embedding_hsm='lowrank' is unknown"),
        ({"bias": "all"}, "bias='all' is not supported"),
        ({"target_parameters": ["w"]}, "target_parameters is not supported"),
        ({"target_sparsity": float("nan")}, "must be finite"),
    ],
)
def test_invalid_values_name_the_field(kwargs, match):
    with pytest.raises(PATConfigError, match=match):
        PATConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_sparsity": "0.25"}, "target_sparsity must be int or float"),
        ({"hsm_rank": 8.0}, "hsm_rank must be int"),
        ({"r": True}, "r must be int"),
    ],
)
def test_wrong_types(kwargs, match):
    with pytest.raises(PATTypeError, match=match):
        PATConfig(**kwargs)


def test_errors_are_value_errors():
    with pytest.raises(ValueError):
        PATConfig(target_sparsity=2.0)
    with pytest.raises(TypeError):
        PATConfig(hsm_rank="8")
