"""Writes that cannot corrupt: the pruned model's save (``save_pretrained`` of what ``merge_and_prune``
returns, and :func:`peft_pat.save_pruned`) builds in a temporary sibling folder and renames at the end.

Failures are injected mid-write (an OSError or Ctrl-C while the weights or the config are half
written); afterwards the previous output is byte-for-byte intact (or there is none) and no temporary
folder is left.
"""

import json
from pathlib import Path

import pytest
import torch
import transformers.modeling_utils
from transformers import AutoModelForCausalLM, LlamaForCausalLM, PretrainedConfig

from peft_pat import save_pruned
from peft_pat.testing import tiny_inputs, tiny_model

from helpers import logits, wrap


def pruned(seed: int = 0):
    torch.manual_seed(seed)
    model = wrap(tiny_model("llama", seed=seed), init_weights=False)
    model.base_model.harden_mask()
    return model.merge_and_prune()


def snapshot(folder):
    """{relative path: bytes} of every file under ``folder`` (None if it does not exist)."""
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def half_written_weights(error):
    def save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)  # a torn file, as a crash mid-write would leave
        raise error

    return save_file


def half_written_config(error):
    def save_pretrained(self, save_directory, *args, **kwargs):
        (Path(save_directory) / "config.json").write_text('{"model_type": "lla')
        raise error

    return save_pretrained


@pytest.mark.parametrize("error", [OSError("No space left on device"), KeyboardInterrupt()], ids=["oserror", "ctrl-c"])
@pytest.mark.parametrize("where", ["weights", "config"])
@pytest.mark.parametrize("previous", [False, True], ids=["fresh", "over-previous"])
def test_failure_mid_write_leaves_previous_output_or_nothing(tmp_path, monkeypatch, error, where, previous):
    out = tmp_path / "pruned"
    if previous:
        pruned(seed=1).save_pretrained(out)
        (out / "tokenizer.json").write_text("{}")
    before = snapshot(out)
    model = pruned()
    if where == "weights":
        monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", half_written_weights(error))
    else:
        monkeypatch.setattr(PretrainedConfig, "save_pretrained", half_written_config(error))

    with pytest.raises(type(error)):
        model.save_pretrained(out)

    assert snapshot(out) == before
    assert leftovers(tmp_path) == []
    monkeypatch.undo()
    model.save_pretrained(out)  # the same call succeeds once the fault is gone
    ids = tiny_inputs()
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(out), ids), logits(model, ids))


def test_failure_while_saving_the_tokenizer_keeps_previous_output(tmp_path):
    class BrokenTokenizer:
        def save_pretrained(self, folder):
            (Path(folder) / "tokenizer.json").write_text("{")
            raise KeyboardInterrupt

    out = tmp_path / "pruned"
    save_pruned(pruned(seed=1), out)
    before = snapshot(out)
    with pytest.raises(KeyboardInterrupt):
        save_pruned(pruned(), out, overwrite=True, tokenizer=BrokenTokenizer())
    assert snapshot(out) == before and leftovers(tmp_path) == []


def test_pruned_model_stays_stock_and_reloads_without_custom_code(tmp_path):
    model = pruned()
    assert type(model) is LlamaForCausalLM and "save_pretrained" in vars(model)  # instance attribute only
    assert LlamaForCausalLM.save_pretrained is transformers.modeling_utils.PreTrainedModel.save_pretrained
    model.save_pretrained(tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=False)
    assert type(reloaded) is LlamaForCausalLM
    ids = tiny_inputs()
    assert torch.equal(logits(reloaded, ids), logits(model, ids))
    texts = [p.read_text() for p in (tmp_path / "out").glob("*.json")]
    assert not any(".partial-" in text for text in texts)  # no trace of the temporary folder's name
    assert json.loads((tmp_path / "out" / "config.json").read_text())["hidden_size"] == 48


def test_overwrite_replaces_the_model_and_keeps_other_files(tmp_path):
    out = tmp_path / "out"
    pruned(seed=1).save_pretrained(out, max_shard_size="20KB")  # sharded: several weight files + an index
    assert len(list(out.glob("model-*.safetensors"))) > 1
    (out / "tokenizer.json").write_text('{"kept": true}')
    (out / "notes").mkdir()
    (out / "notes" / "README.md").write_text("mine")

    model = pruned()
    model.save_pretrained(out)  # transformers-like default: writes into an existing folder
    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors", "notes", "tokenizer.json"]
    assert (out / "tokenizer.json").read_text() == '{"kept": true}'
    assert (out / "notes" / "README.md").read_text() == "mine"
    ids = tiny_inputs()
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(out), ids), logits(model, ids))
    assert leftovers(tmp_path) == []


def test_save_pruned_refuses_an_existing_folder_unless_told(tmp_path):
    out = tmp_path / "out"
    model = pruned()
    assert save_pruned(model, out) == out
    before = snapshot(out)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_pruned(pruned(seed=1), out)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        model.save_pretrained(out, overwrite=False)
    assert snapshot(out) == before


def test_save_pruned_with_tokenizer_writes_both_in_one_rename(tmp_path):
    class Tokenizer:
        def save_pretrained(self, folder):
            (tmp_path / "seen").write_text(str(folder))
            (Path(folder) / "tokenizer.json").write_text("{}")

    out = tmp_path / "out"
    save_pruned(pruned(), out, tokenizer=Tokenizer())
    assert (out / "tokenizer.json").exists() and (out / "model.safetensors").exists()
    assert ".partial-" in (tmp_path / "seen").read_text()  # written inside the temporary folder


def test_non_main_process_writes_nothing(tmp_path):
    out = tmp_path / "out"
    pruned().save_pretrained(out, is_main_process=False)
    assert not out.exists() and leftovers(tmp_path) == []
