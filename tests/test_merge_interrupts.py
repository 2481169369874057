"""A merge interrupted at any moment, a merge after unload(), damaged files: nothing silently wrong."""

from __future__ import annotations

import json

import pytest
import torch
from peft.tuners.tuners_utils import BaseTuner

from peft_pat import PATStateError
from peft_pat.cli import main
from peft_pat.errors import CheckpointError
from peft_pat.merge import fold
from peft_pat.merge import in_memory as in_memory_module
from peft_pat.merge.checkpoint import merge_checkpoint
from peft_pat.testing import tiny_inputs, tiny_model

from helpers import logits, wrap

IDS = tiny_inputs(length=7)


def _model(tied: bool = True, seed: int = 0):
    base = tiny_model("llama", tie_word_embeddings=tied, seed=3)
    torch.manual_seed(seed)
    model = wrap(base, init_weights=False)
    model.base_model.harden_mask()
    return model


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _count_steps(monkeypatch) -> list[int]:
    """Patch _set_parameter to count the tensor steps of a merge (and to raise on demand)."""
    calls: list[int] = []
    original = in_memory_module._set_parameter

    def counting(model, name, tensor):
        calls.append(1)
        if len(calls) == counting.stop_at:
            raise KeyboardInterrupt
        original(model, name, tensor)

    counting.stop_at = -1
    monkeypatch.setattr(in_memory_module, "_set_parameter", counting)
    return calls, counting


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("method", ["merge_and_prune", "merge_and_unload"])
def test_merge_interrupted_at_every_step_then_retried_is_bit_identical(tied, method, monkeypatch):
    """Ctrl-C at any tensor of the merge, then the same call again: the very same model as one uninterrupted
    call (it used to fold a second time, off by ~0.07 in the logits, or fail with an internal index error)."""
    monkeypatch.setattr(fold, "CHUNK_BYTES", 4096)
    expected = _state(getattr(_model(tied), method)())
    calls, counting = _count_steps(monkeypatch)
    getattr(_model(tied), method)()
    steps = len(calls)
    assert steps > 10
    for stop in range(1, steps + 1):
        calls.clear()
        counting.stop_at = stop
        model = _model(tied)
        with pytest.raises(KeyboardInterrupt):
            getattr(model, method)()
        with pytest.raises(PATStateError, match="interrupted midway"):
            model(input_ids=IDS)  # the partly merged model refuses to run
        counting.stop_at = -1
        got = _state(getattr(model, method)())
        assert got.keys() == expected.keys(), stop
        for name, tensor in expected.items():
            assert torch.equal(got[name], tensor), (stop, name)


@pytest.mark.parametrize("stop", [1, 8, 15])
def test_merge_interrupted_while_unloading_the_layers_then_retried(stop, monkeypatch):
    """Ctrl-C while the PAT layers are being replaced by their base layers (before any tensor is merged)."""
    expected = _state(_model().merge_and_prune())
    original, calls = BaseTuner._replace_module, []

    def replace(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == stop:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    model = _model()
    monkeypatch.setattr(BaseTuner, "_replace_module", replace)  # after injection, which replaces modules too
    with pytest.raises(KeyboardInterrupt):
        model.merge_and_prune()
    got = _state(model.merge_and_prune())
    assert all(torch.equal(got[k], v) for k, v in expected.items()) and got.keys() == expected.keys()


def test_interrupted_merge_and_prune_is_not_finished_by_another_merge(monkeypatch):
    _, counting = _count_steps(monkeypatch)
    counting.stop_at = 3
    model = _model()
    with pytest.raises(KeyboardInterrupt):
        model.merge_and_prune()
    counting.stop_at = -1
    with pytest.raises(PATStateError, match=r"merge_and_prune\(\) of this model was interrupted"):
        model.merge_and_unload()
    with pytest.raises(PATStateError, match="interrupted midway"):
        model.unload()
    small = model.merge_and_prune()
    assert small.config.hidden_size == 48


@pytest.mark.parametrize("first", ["unload", "merge_and_unload"])
@pytest.mark.parametrize("then", ["merge_and_prune", "merge_and_unload"])
def test_merge_after_unload_is_refused_and_the_returned_model_is_untouched(first, then):
    """merge_and_prune() after unload() used to cut the raw, unfolded base in place: the model unload()
    returned (the caller holds it) lost its channels and its adapter was never folded."""
    model = _model()
    returned = getattr(model, first)()
    before, out_before = _state(returned), logits(returned, IDS)
    with pytest.raises(PATStateError, match="holds no PAT layers any more"):
        getattr(model, then)()
    assert all(torch.equal(returned.state_dict()[k], v) for k, v in before.items())
    assert torch.equal(logits(returned, IDS), out_before)


def test_merge_after_merge_and_prune_is_refused():
    model = _model()
    model.merge_and_prune()
    for call in (model.merge_and_prune, model.merge_and_unload, model.unload):
        with pytest.raises(PATStateError, match="already merged and pruned"):
            call()


# ---------------------------------------------------------------------------------------------- damaged files
@pytest.mark.parametrize(
    ("where", "name", "what"),
    [
        ("adapter", "adapter_config.json", "adapter config"),
        ("base", "model.safetensors.index.json", "shard index"),
        ("base", "config.json", "model config"),
    ],
)
def test_truncated_json_is_a_clear_error_not_a_traceback(tmp_path, capsys, where, name, what):
    base = tiny_model("llama", seed=3)
    base.save_pretrained(tmp_path / "base", max_shard_size="40KB")
    wrap(base).save_pretrained(tmp_path / "adapter")
    path = tmp_path / where / name
    text = path.read_text()
    path.write_text(text[: len(text) // 2])  # a truncated copy
    files = sorted(str(p) for p in tmp_path.rglob("*"))
    assert (
        main(["merge", str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "out"), "--no-progress"]) == 1
    )
    err = capsys.readouterr().err
    assert f"{path} is not valid JSON" in err and f"the {what} is damaged" in err and "Traceback" not in err
    assert sorted(str(p) for p in tmp_path.rglob("*")) == files  # nothing written, nothing removed
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(CheckpointError, match="holds a JSON list"):
        merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", progressbar=False)


def test_merge_of_offloaded_weights_is_refused_before_anything_changes():
    model = _model()
    layer = model.base_model.model.model.layers[1].mlp.down_proj.base_layer
    layer.weight = torch.nn.Parameter(torch.empty_like(layer.weight, device="meta"), requires_grad=False)
    before = {k: v for k, v in model.state_dict().items() if not v.is_meta}
    with pytest.raises(PATStateError, match="peft-pat merge BASE ADAPTER OUT"):
        model.merge_and_prune()
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_a_killed_cli_merge_leaves_nothing_the_next_run_trips_over(tmp_path, capsys):
    """SIGKILL skips every clean-up: the next write to OUT removes the killed run's temporary folder."""
    import signal
    import subprocess
    import sys

    base = tiny_model("llama", seed=3)
    base.save_pretrained(tmp_path / "base", max_shard_size="20KB")
    wrap(base).save_pretrained(tmp_path / "adapter")
    code = (
        "import os, signal, sys\n"
        "from peft_pat.merge import plan\n"
        "compute = plan.TensorOp.compute\n"
        "def killing(self, source, keep):\n"
        "    if self.name.endswith('layers.1.mlp.down_proj.weight'):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return compute(self, source, keep)\n"
        "plan.TensorOp.compute = killing\n"
        "from peft_pat.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    argv = ["merge", str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "out"), "--no-progress"]
    killed = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]
    assert len(leftovers) == 1 and not (tmp_path / "out").exists()
    assert main(argv) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base", "out"]

    # killed between the two renames of an overwrite: the previous output is put back, not lost
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    before = (tmp_path / "out" / "config.json").read_text()
    (tmp_path / "out").rename(tmp_path / f".out.old-{dead.pid}-abcd")
    capsys.readouterr()
    assert main(argv) == 1  # OUT is back, so without --overwrite the merge refuses to replace it
    assert "restored the previous output" in capsys.readouterr().err
    assert (tmp_path / "out" / "config.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base", "out"]
