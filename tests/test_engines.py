"""A pruned checkpoint runs in llama.cpp: GGUF conversion with llama.cpp's own converter, logits and greedy
tokens against transformers'.

Three levels, each skipped with its reason when what it needs is absent (see README "Deploy"):

* always: the refusals (config without ``head_dim``, missing engine, wrong converter path) name the fix;
* the converter (``LLAMA_CPP_CONVERTER``, or the cache that ``examples/deploy_llamacpp.py`` fills, plus
  ``sentencepiece``, which it imports): the GGUF of a tiny PAT-pruned model carries ``head_dim``;
* llama-cpp-python too: llama.cpp's logits and greedy tokens match transformers';
* onnxruntime + onnxscript (marked slow, the export takes minutes on a busy CPU): ONNX Runtime's
  logits match transformers' (examples/deploy_onnxruntime.py).

The converter and engine tests run on each tiny engine case of ``deploy_llamacpp.TINY_SHAPES``, all with
head_dim 32 pinned so that ``hidden_size != num_attention_heads * head_dim``, the case engines may not
expect: the hidden width PAT-pruned 64 -> 48 (random non-trivial adapter, random hardened mask); hidden 48
and MLP 96 -> 64 cut post hoc by ``peft_pat.prune_model``; and that shape with 2 query heads and 1 KV head
instead of 4 and 2.
"""

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from helpers import load_example


@pytest.fixture(scope="module")
def deploy():
    return load_example("deploy_llamacpp")


@pytest.fixture(scope="module")
def converter(deploy):
    pytest.importorskip("sentencepiece", reason="llama.cpp's converter imports sentencepiece")
    try:
        path = deploy.find_converter()
    except ImportError:
        path = None  # no LLAMA_CPP_CONVERTER and no llama_cpp to name the cached converter's version
    if path is None:
        pytest.skip(
            "llama.cpp's convert_hf_to_gguf.py not found: set LLAMA_CPP_CONVERTER, or run "
            "`python examples/deploy_llamacpp.py --tiny` once with llama-cpp-python installed (it fetches it)"
        )
    return path


# (hidden_size, intermediate_size, num_attention_heads, num_key_value_heads, head_dim) of each tiny case
TINY_CASES = {"hidden": (48, 96, 4, 2, 32), "hidden-mlp": (48, 64, 4, 2, 32), "heads": (48, 64, 2, 1, 32)}


@pytest.fixture(scope="module")
def tiny_folder(deploy, tmp_path_factory):
    return deploy.tiny_pruned_folder(tmp_path_factory.mktemp("pruned") / "model")


@pytest.fixture(scope="module", params=list(TINY_CASES))
def converted(request, deploy, converter, tmp_path_factory):
    folder = deploy.tiny_folder(tmp_path_factory.mktemp(request.param) / "model", request.param)
    gguf = deploy.convert(folder, folder.parent / "model-f32.gguf", "f32", converter)
    return request.param, folder, gguf


def test_tiny_cases_are_every_engine_shape(deploy):
    assert set(TINY_CASES) == set(deploy.TINY_SHAPES)


def test_pruned_config_is_the_engine_hard_case(deploy, converted):
    case, folder, _ = converted
    config = json.loads((folder / "config.json").read_text())
    assert tuple(config[k] for k in deploy.SHAPE_FIELDS) == TINY_CASES[case]
    assert config["hidden_size"] != config["num_attention_heads"] * config["head_dim"]


def test_gguf_carries_every_shape_and_head_dim(converted):
    from gguf import GGUFReader

    case, _, gguf = converted
    hidden, intermediate, heads, kv_heads, head_dim = TINY_CASES[case]
    reader = GGUFReader(gguf)
    fields = {name: field.parts[field.data[0]][0] for name, field in reader.fields.items() if field.data}
    assert int(fields["llama.embedding_length"]) == hidden
    assert int(fields["llama.feed_forward_length"]) == intermediate
    assert int(fields["llama.attention.head_count"]) == heads
    assert int(fields["llama.attention.head_count_kv"]) == kv_heads
    assert int(fields["llama.attention.key_length"]) == head_dim
    assert int(fields["llama.attention.value_length"]) == head_dim
    assert int(fields["llama.rope.dimension_count"]) == head_dim
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in reader.tensors}  # GGUF lists (in, out)
    assert shapes["blk.0.attn_q.weight"] == (hidden, heads * head_dim)
    assert shapes["blk.0.attn_k.weight"] == shapes["blk.0.attn_v.weight"] == (hidden, kv_heads * head_dim)
    assert shapes["blk.0.attn_output.weight"] == (heads * head_dim, hidden)
    assert shapes["blk.1.ffn_down.weight"] == (intermediate, hidden)


def test_llama_cpp_logits_and_greedy_tokens_match_transformers(deploy, converted):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[llamacpp]')")
    ids = [1, *list(np.random.default_rng(0).integers(3, 97, size=23))]
    result = deploy.compare(converted[1], converted[2], [int(i) for i in ids], new_tokens=12)
    # float32 GGUF: the engine and transformers differ only by summation order
    assert result["max_abs_logit_diff"] <= 1e-3 * max(1.0, result["max_abs_logit"]), result
    assert result["argmax_agreement"] == 1.0
    assert result["greedy_llama_cpp"] == result["greedy_transformers"]


def test_widths_off_llama_cpps_fast_path_warn_and_name_the_fix(deploy, tmp_path):
    config = {"hidden_size": 504, "intermediate_size": 1168, "num_attention_heads": 9, "head_dim": 64}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match=r"hidden_size=504 is not a multiple of 16.*width_multiple=16.*prune_axes"):
        deploy.check_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_size": 576, "intermediate_size": 880}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        deploy.check_config(tmp_path)  # multiples of 16: silent


def test_missing_head_dim_is_refused_before_conversion(deploy, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 48, "num_attention_heads": 5}))
    with pytest.raises(ValueError, match="head_dim"):
        deploy.check_config(tmp_path)


def test_missing_engine_names_the_install_command(deploy, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp -> ImportError
    with pytest.raises(ImportError, match=r"\[llamacpp\]"):
        deploy.load_gguf(Path("model.gguf"))


def test_wrong_converter_path_names_the_fix(deploy, monkeypatch, tmp_path):
    monkeypatch.setenv(deploy.CONVERTER_ENV, str(tmp_path / "missing.py"))
    with pytest.raises(FileNotFoundError, match="convert_hf_to_gguf.py"):
        deploy.find_converter()


@pytest.mark.slow
def test_onnx_runtime_logits_match_transformers(tiny_folder):
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (see examples/deploy_onnxruntime.py)")
    pytest.importorskip("onnxscript", reason="torch.onnx.export(dynamo=True) needs onnxscript")
    onnx_example = load_example("deploy_onnxruntime")
    folder = tiny_folder
    onnx_file = onnx_example.export(folder, folder.parent / "model.onnx", max_tokens=64)
    for n in (8, 23):
        ids = [int(i) for i in np.random.default_rng(n).integers(3, 97, size=n)]
        result = onnx_example.compare(folder, onnx_file, ids)
        assert result["max_abs_logit_diff"] <= 1e-4 * max(1.0, result["max_abs_logit"]), result
        assert result["argmax_agreement"] == 1.0
