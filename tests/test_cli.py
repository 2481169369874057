"""``peft-pat merge BASE ADAPTER OUT``: disk-to-disk, shard by shard, equal to the in-memory merge."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from peft_pat import AdapterMismatchError, PATConfig, UnsupportedModelError
from peft_pat.cli import main
from peft_pat.errors import CheckpointError
from peft_pat.merge import fold
from peft_pat.merge.checkpoint import merge_checkpoint
from peft_pat.merge.plan import TensorOp
from peft_pat.testing import VOCAB, tiny_inputs, tiny_model

from helpers import logits, train_steps, wrap

SHARD = "40KB"  # a tiny model (~170 KB in float32) is saved as several shards


def _save_tokenizer(folder: Path) -> None:
    vocab = {f"t{i}": i for i in range(VOCAB)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t3"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="t3", eos_token="t2").save_pretrained(folder)


def _checkpoint(tmp_path: Path, family: str, tied: bool = False, dtype=torch.float32, train: bool = False, **pat):
    """A sharded base checkpoint, a PAT adapter for it, and the in-memory merge_and_prune result."""
    base_kwargs = {"tie_word_embeddings": tied, "dtype": dtype}
    if family == "llama":
        base_kwargs["attention_bias"] = True  # producer biases too
    base = tiny_model(family, **base_kwargs)
    base.save_pretrained(tmp_path / "base", max_shard_size=SHARD)
    model = wrap(base, init_weights=False, **pat)
    if train:
        train_steps(model, tiny_inputs(length=10), steps=3, total=30)  # stops with a soft mask
    else:
        model.base_model.harden_mask()
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "base", tmp_path / "adapter", model


def _assert_same_model(folder: Path, expected_model, ids):
    merged = AutoModelForCausalLM.from_pretrained(folder).eval()
    expected = expected_model.state_dict()
    got = merged.state_dict()
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    assert torch.equal(logits(merged, ids), logits(expected_model, ids))
    return merged


@pytest.mark.parametrize(
    ("family", "tied", "pat"),
    [
        ("llama", True, {}),  # tied: diagonal embedding HSM, stays tied
        ("llama", False, {"modules_to_save": ["lm_head"]}),
        ("gemma", True, {"embedding_hsm": "full"}),  # tied base, untied at merge
        ("gemma2", False, {}),
        ("phi3", False, {}),
        ("qwen3", True, {"target_modules": ["q_proj", "lm_head"]}),
    ],
    ids=["llama-tied", "llama-modules_to_save", "gemma-untie", "gemma2", "phi3", "qwen3-lora-lm_head"],
)
def test_cli_merge_equals_in_memory_merge(tmp_path, monkeypatch, family, tied, pat):
    monkeypatch.setattr(fold, "CHUNK_BYTES", 4096)  # both merges fold (and the CLI reads) many row/column chunks
    base, adapter, model = _checkpoint(tmp_path, family, tied, **pat)
    shards = sorted(p.name for p in base.glob("*.safetensors"))
    assert len(shards) >= 3 and (base / "model.safetensors.index.json").is_file()
    ids = tiny_inputs()
    pat_logits = logits(model, ids)
    small = model.merge_and_prune()

    assert main(["merge", str(base), str(adapter), str(tmp_path / "out"), "--no-progress"]) == 0
    out = tmp_path / "out"
    merged = _assert_same_model(out, small, ids)
    assert (logits(merged, ids) - pat_logits).abs().max() <= 2e-5 * max(1.0, float(pat_logits.abs().max()))
    assert merged.config.hidden_size == 48 and merged.config.head_dim == 16
    assert merged.config.tie_word_embeddings == small.config.tie_word_embeddings
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards  # one output shard per input shard
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(small.state_dict()) - (
        {"lm_head.weight"} if merged.config.tie_word_embeddings else set()
    )
    assert (out / "generation_config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_single_file_checkpoint_tokenizer_and_generation(tmp_path):
    base = tiny_model("qwen2", tie_word_embeddings=True)
    base.save_pretrained(tmp_path / "base")  # one model.safetensors, no index
    _save_tokenizer(tmp_path / "base")
    model = wrap(base, init_weights=False)
    model.base_model.harden_mask()
    model.save_pretrained(tmp_path / "adapter")
    ids = tiny_inputs()
    small = model.merge_and_prune()
    merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", progressbar=False)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not (out / "model.safetensors.index.json").exists()
    merged = _assert_same_model(out, small, ids)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (tmp_path / "base" / name).read_bytes()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(out)
    prompt = tokenizer(["t5 t9 t11"], return_tensors="pt")
    generated = merged.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert torch.equal(generated, small.generate(**prompt, max_new_tokens=4, do_sample=False))


def test_soft_mask_is_hardened_with_a_warning(tmp_path):
    base, adapter, model = _checkpoint(tmp_path, "mistral", train=True)
    assert not model.base_model.pat_mask["default"].hardened
    with pytest.warns(UserWarning, match="still soft"):
        small = model.merge_and_prune()
    with pytest.warns(UserWarning, match="still soft"):
        merge_checkpoint(base, adapter, tmp_path / "out", progressbar=False)
    _assert_same_model(tmp_path / "out", small, tiny_inputs())


def test_dtype_option_equals_merging_a_base_loaded_in_that_dtype(tmp_path):
    base, adapter, _ = _checkpoint(tmp_path, "gemma2", tied=True)
    half_base = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    small = PeftModel.from_pretrained(half_base, adapter).merge_and_prune()
    small.save_pretrained(tmp_path / "in_memory")  # reload both the same way (buffers keep their dtype)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "in_memory").eval()
    merge_checkpoint(base, adapter, tmp_path / "out", dtype="bfloat16", progressbar=False)
    merged = _assert_same_model(tmp_path / "out", reference, tiny_inputs())
    assert merged.dtype == torch.bfloat16 and merged.config.dtype == torch.bfloat16


def test_adapter_saved_as_bin(tmp_path):
    base, _, model = _checkpoint(tmp_path, "qwen2")
    model.save_pretrained(tmp_path / "adapter_bin", safe_serialization=False)
    assert (tmp_path / "adapter_bin" / "adapter_model.bin").is_file()
    merge_checkpoint(base, tmp_path / "adapter_bin", tmp_path / "out", progressbar=False)
    _assert_same_model(tmp_path / "out", model.merge_and_prune(), tiny_inputs())


def test_named_adapter(tmp_path):
    base = tiny_model("llama")
    base.save_pretrained(tmp_path / "base", max_shard_size=SHARD)
    model = wrap(base, init_weights=False)
    model.add_adapter("narrow", PATConfig(target_sparsity=0.5, hsm_rank=4, r=2, init_weights=False))
    model.base_model.harden_mask("narrow")
    model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(CheckpointError, match=r"no adapter_config.json for adapter 'wide'.*\['default', 'narrow'\]"):
        merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", adapter_name="wide")
    model.set_adapter("narrow")
    narrow = model.peft_config["narrow"]  # the default axes, beside a hidden-only "default" adapter
    assert narrow.prune_axes == ["hidden", "mlp"] and narrow.kept_width == 48
    with pytest.warns(UserWarning, match="dropping"):
        small = model.merge_and_prune("narrow")
    merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", adapter_name="narrow")
    merged = _assert_same_model(tmp_path / "out", small, tiny_inputs())
    assert merged.config.hidden_size == 48 and merged.config.intermediate_size == narrow.kept_intermediate_size


# ---------------------------------------------------------------------------------------------- OUT handling
def test_refuses_to_overwrite_unless_asked(tmp_path, capsys):
    base, adapter, model = _checkpoint(tmp_path, "llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["merge", str(base), str(adapter), str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    assert main(["merge", str(base), str(adapter), str(out), "--no-progress", "--overwrite"]) == 0
    assert not (out / "keep.txt").exists()
    _assert_same_model(out, model.merge_and_prune(), tiny_inputs())


def test_interrupted_merge_leaves_no_output(tmp_path, monkeypatch, capsys):
    base, adapter, _ = _checkpoint(tmp_path, "llama")
    calls = []
    original = TensorOp.compute

    def interrupt_midway(self, source, keep):
        calls.append(self.name)
        if len(calls) == 10:
            raise KeyboardInterrupt
        return original(self, source, keep)

    monkeypatch.setattr(TensorOp, "compute", interrupt_midway)
    assert main(["merge", str(base), str(adapter), str(tmp_path / "out"), "--no-progress"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"]  # no OUT, no temporary folder


def test_out_inside_base_is_refused(tmp_path):
    base, adapter, _ = _checkpoint(tmp_path, "llama")
    with pytest.raises(CheckpointError, match="must not be BASE"):
        merge_checkpoint(base, adapter, base / "pruned", progressbar=False)


@pytest.mark.parametrize("overwrite", [False, True])
def test_out_holding_the_inputs_is_refused_and_nothing_is_lost(tmp_path, overwrite):
    """`peft-pat merge run/base run/adapter run --overwrite` used to delete BASE and ADAPTER."""
    run = tmp_path / "run"
    run.mkdir()
    base, adapter, _ = _checkpoint(run, "llama")
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    argv = ["merge", str(base), str(adapter), str(run), "--no-progress", *(["--overwrite"] if overwrite else [])]
    assert main(argv) == 1
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before
    with pytest.raises(CheckpointError, match="contains BASE"):
        merge_checkpoint(base, adapter, tmp_path, overwrite=True, progressbar=False)
    link = tmp_path / "link"
    link.symlink_to(run)  # the same folder under another name
    with pytest.raises(CheckpointError, match="contains BASE"):
        merge_checkpoint(base, adapter, link, overwrite=True, progressbar=False)
    assert sorted(str(p.relative_to(tmp_path)) for p in run.rglob("*")) == [x for x in before if x != "run"]


# ---------------------------------------------------------------------------------------------- bad inputs
def test_lora_adapter_is_not_a_pat_adapter(tmp_path):
    base = tiny_model("llama")
    base.save_pretrained(tmp_path / "base")
    get_peft_model(base, LoraConfig(target_modules=["q_proj"])).save_pretrained(tmp_path / "lora")
    with pytest.raises(AdapterMismatchError, match="'LORA' adapter, not a PAT adapter"):
        merge_checkpoint(tmp_path / "base", tmp_path / "lora", tmp_path / "out")


@pytest.mark.parametrize(
    ("other", "what"),
    [
        ({"family": "mistral"}, "model family='llama'"),
        ({"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2}, "hidden_size=64"),
        ({"vocab_size": 120}, "vocab_size=97"),
        ({"num_hidden_layers": 3}, "num_hidden_layers=2, but the base checkpoint has num_hidden_layers=3"),
    ],
    ids=["family", "width", "vocab", "depth"],
)
def test_adapter_of_another_base_is_refused(tmp_path, other, what):
    _, adapter, _ = _checkpoint(tmp_path, "llama")
    other = dict(other)
    tiny_model(other.pop("family", "llama"), **other).save_pretrained(tmp_path / "other")
    with pytest.raises(AdapterMismatchError, match=what):
        merge_checkpoint(tmp_path / "other", adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_layernorm_base_is_refused(tmp_path):
    _, adapter, _ = _checkpoint(tmp_path, "llama")
    (tmp_path / "opt").mkdir()
    config = {"model_type": "opt", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2}
    (tmp_path / "opt" / "config.json").write_text(json.dumps({**config, "vocab_size": VOCAB, "ffn_dim": 96}))
    shutil.copy(tmp_path / "base" / "model.safetensors.index.json", tmp_path / "opt")
    for shard in (tmp_path / "base").glob("*.safetensors"):
        shutil.copy(shard, tmp_path / "opt")
    with pytest.raises(UnsupportedModelError, match="'opt'.*LayerNorm.*Supported families"):
        merge_checkpoint(tmp_path / "opt", adapter, tmp_path / "out")


def test_missing_files_are_named(tmp_path):
    base, adapter, _ = _checkpoint(tmp_path, "llama")
    with pytest.raises(CheckpointError, match="nothing does not exist; BASE must be a transformers model folder"):
        merge_checkpoint(tmp_path / "nothing", adapter, tmp_path / "out")
    with pytest.raises(CheckpointError, match="adapter has no config.json"):
        merge_checkpoint(adapter, adapter, tmp_path / "out")
    with pytest.raises(CheckpointError, match="is not a folder"):
        merge_checkpoint(base / "config.json", adapter, tmp_path / "out")
    with pytest.raises(CheckpointError, match="does not exist"):
        merge_checkpoint(base, tmp_path / "nothing", tmp_path / "out")
    with pytest.raises(CheckpointError, match="is a file, not a folder"):
        merge_checkpoint(base, adapter / "adapter_config.json", tmp_path / "out")
    shard = sorted(base.glob("*.safetensors"))[-1]
    shard.rename(tmp_path / "moved.safetensors")
    with pytest.raises(CheckpointError, match="lists shards that are not in"):
        merge_checkpoint(base, adapter, tmp_path / "out")
    (base / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError, match="has no model.safetensors"):
        merge_checkpoint(base, adapter, tmp_path / "out")
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no adapter_model.safetensors"):
        merge_checkpoint(base, adapter, tmp_path / "out")


# ---------------------------------------------------------------------------------------------- console script
def test_console_script_and_module_entry_point(tmp_path):
    base, adapter, model = _checkpoint(tmp_path, "gemma3_text", tied=True)
    script = shutil.which("peft-pat", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    assert script, "the peft-pat console script is not installed (pip install -e .)"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [script, "merge", str(base), str(adapter), str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "Wrote the pruned model" in done.stdout and "peft-pat merge" in done.stderr  # progress bar on stderr
    _assert_same_model(tmp_path / "out", model.merge_and_prune(), tiny_inputs())

    again = subprocess.run(
        [sys.executable, "-m", "peft_pat.cli", "merge", str(base), str(adapter), str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 1 and "already exists" in again.stderr
