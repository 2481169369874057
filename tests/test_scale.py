"""The default HSM rank scales: its values, its cost at 7B/8B shapes, and that adapters record the rank they resolved.

Counts at 7B/8B shapes come from get_peft_model on meta-device slices of 2 and 3 layers (nothing allocated), the
difference scaled to full depth, with the cut resolved on the full-depth config (benchmarks.training.count_trainable).
"""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaForCausalLM

from benchmarks import training
from benchmarks.training import LORA_TARGETS, full_depth_widths, llama_config
from peft_pat import PATConfig
from peft_pat.resolution import HSM_RANK_CAP, default_hsm_rank
from peft_pat.testing import tiny_inputs, tiny_model

from helpers import logits, wrap


@pytest.mark.parametrize(
    ("hidden", "kept", "rank"),
    [
        (576, 504, 72),  # SmolLM2-135M, hidden + MLP at -25%: d - N, as before the cap
        (576, 432, 128),  # at -50% (d - N = 144 before the cap)
        (576, 560, 32),  # a small cut: the paper's 5% of d (28.8), rounded up to a multiple of 8
        (2048, 1792, 128),  # d = 2048 at -25% (d - N = 256)
        (4096, 3584, 128),  # Llama-2-7B / Llama-3-8B at -25% (d - N = 512)
        (4096, 3072, 128),  # at -50% (1024)
        (8192, 7168, 128),  # d = 8192: 5% of d (410) is above the cap too
        (64, 48, 16),  # the tiny test models: far below the cap
        (16, 1, 15),  # always below d
    ],
)
def test_default_rank_values(hidden, kept, rank):
    assert default_hsm_rank(hidden, kept) == rank


@pytest.mark.parametrize(("sparsity", "rank"), [(0.25, 16), (0.5, 32)])
def test_tiny_model_resolves_the_pruned_count(sparsity, rank):
    """hsm_rank=None on a tiny model (d = 64, hidden axis): d - N, far below the cap."""
    config = wrap(tiny_model("llama"), hsm_rank=None, target_sparsity=sparsity, prune_axes=["hidden"])
    config = config.peft_config["default"]
    assert (config.kept_width, config.hsm_rank) == (64 - rank, rank)


def test_uncapped_rule_is_the_previous_default():
    assert default_hsm_rank(576, 432, cap=None) == 144
    assert default_hsm_rank(4096, 3584, cap=None) == 512
    assert default_hsm_rank(4096, 3072, cap=None) == 1024 and default_hsm_rank(4096, 4032, cap=None) == 208
    assert HSM_RANK_CAP == default_hsm_rank(10**5, 1)


@pytest.mark.parametrize("shape", ["llama2-7b", "llama3-8b"])
@pytest.mark.parametrize("sparsity", [0.25, 0.5])
def test_default_trains_at_most_3_5x_lora_at_7b(shape, sparsity):
    cut = full_depth_widths(shape, sparsity)
    assert cut["prune_axes"] == ["hidden", "mlp"] and cut["target_width"] < 4096
    lora = training.count_trainable(shape, lambda: LoraConfig(r=20, lora_alpha=20, target_modules=LORA_TARGETS))
    pat = training.count_trainable(shape, lambda: PATConfig(calibration_batches=0, **cut))
    uncapped_rank = 4096 - cut["target_width"]
    uncapped = training.count_trainable(shape, lambda: PATConfig(calibration_batches=0, hsm_rank=uncapped_rank, **cut))
    assert 49e6 < lora < 53e6  # LoRA r=20 on every decoder linear: 50.0M (Llama-2-7B), 52.4M (Llama-3-8B)
    assert pat <= 3.5 * lora, f"{pat / lora:.2f}x LoRA r=20"
    assert uncapped > 6 * lora  # what the cap prevents: 6.2-11.9x
    with torch.device("meta"):
        base = LlamaForCausalLM(llama_config(shape, 2))
    model = get_peft_model(base, PATConfig(calibration_batches=0, **cut))
    assert model.peft_config["default"].hsm_rank == HSM_RANK_CAP
    # optimizer state (16 bytes per trainable parameter) next to the bfloat16 base (2 bytes per parameter)
    with torch.device("meta"):
        dense = sum(p.numel() for p in LlamaForCausalLM(llama_config(shape)).parameters())
    state_ratio = (2 * dense + 16 * pat) / (2 * dense + 16 * lora)
    assert state_ratio < 1.08, f"{state_ratio:.3f}"


def test_resolved_rank_is_recorded_in_the_saved_adapter(tmp_path):
    base = tiny_model("llama", hidden_size=384, num_attention_heads=4, num_key_value_heads=2)
    model = wrap(base, target_sparsity=0.5, prune_axes=["hidden"], hsm_rank=None)
    config = model.peft_config["default"]
    assert (config.kept_width, config.hsm_rank) == (192, HSM_RANK_CAP)  # d - N = 192, capped
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["hsm_rank"] == HSM_RANK_CAP


def test_adapter_with_a_recorded_uncapped_rank_loads_unchanged(tmp_path):
    """An adapter whose rank resolved under the previous rule (d - N = 192 here) keeps that rank when loaded."""
    ids = tiny_inputs()
    make = lambda: tiny_model("llama", hidden_size=384, num_attention_heads=4, num_key_value_heads=2)  # noqa: E731
    old_rank = default_hsm_rank(384, 192, cap=None)
    assert old_rank == 192 > default_hsm_rank(384, 192)
    model = wrap(make(), target_sparsity=0.5, prune_axes=["hidden"], hsm_rank=old_rank, init_weights=False)
    expected = logits(model, ids)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make(), tmp_path)
    assert loaded.peft_config["default"].hsm_rank == old_rank
    down = loaded.base_model.model.model.layers[0].self_attn.o_proj.pat_hsm_down["default"].weight
    assert tuple(down.shape) == (old_rank, 384)
    assert torch.equal(logits(loaded, ids), expected)


def test_training_benchmark_slice_arguments(capsys):
    args = training.parse_args(["--shape", "llama2-7b", "--layers", "4,2"])
    assert (args.depths, args.dtype, args.configs, args.repeats) == ([2, 4], "bfloat16", "pat,lora-20", 0)
    assert args.out.name == "training-llama2-7b.json"
    assert training.parse_args([]).dtype == "float32" and training.parse_args(["--count"]).out.name.endswith(
        "counts.json"
    )
    for argv, message in (
        (["--shape", "llama2-7b", "--layers", "2"], "two or more depths"),
        (["--shape", "llama2-7b", "--layers", "2,x"], "comma list of integers"),
        (["--dtype", "float33"], "is not a torch dtype"),
    ):
        with pytest.raises(SystemExit):
            training.parse_args(argv)
        assert message in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            training.parse_args(["--device", "cuda"])
        assert "CUDA is not available" in capsys.readouterr().err


def test_extrapolation_is_the_line_through_the_outer_depths():
    assert training.extrapolate([2, 4], [2110.0, 3166.0], 32) == pytest.approx(2110 + 30 * 528)
    assert training.extrapolate([2, 3, 4], [10.0, 99.0, 30.0], 6) == pytest.approx(50.0)


@pytest.mark.slow
def test_training_benchmark_slice_runs_end_to_end(tmp_path):
    """The --shape pipeline (probe processes per depth, extrapolation, ratios, timing) on the tiny test shape."""
    out = tmp_path / "slice.json"
    argv = ["--shape", "tiny-llama", "--layers", "1,3", "--batch", "1", "--seq-len", "8", "--memory-repeats", "1",
            "--memory-steps", "1", "--repeats", "1", "--warmup", "0", "--configs", "pat,pat-uncapped,lora-20",
            "--threads", "1", "--out", str(out)]  # fmt: skip
    training.main(argv)
    result = json.loads(out.read_text())
    assert result["full_depth"] == 8 and result["cut"]["prune_axes"] == ["hidden", "mlp"]
    rows = {row["config"]: row for row in result["configs"]}
    cut = result["cut"]
    lora = training.count_trainable("tiny-llama", lambda: LoraConfig(r=20, lora_alpha=20, target_modules=LORA_TARGETS))
    assert rows["lora-20"]["trainable_full"] == lora  # parameter counts are linear in depth: exact
    pat = training.count_trainable("tiny-llama", lambda: PATConfig(calibration_batches=0, **cut))
    assert rows["pat"]["trainable_full"] == pat and rows["pat"]["hsm_rank"] == default_hsm_rank(64, cut["target_width"])
    assert rows["lora-20"]["peak_vs_lora_20"] == 1.0 and rows["pat"]["params_vs_lora_20"] == pat / lora
    for row in rows.values():
        assert row["peak_full_mib"] > 0 and row["step_s"] > 0 and set(result["per_depth"]) == {"1", "3"}
