"""vLLM serves a pruned checkpoint: greedy tokens and log-probabilities equal transformers' on a tiny model
whose hidden width differs from heads x head_dim and whose MLP width is cut too.

vLLM brings its own torch, so it lives in its own venv: ``PEFT_PAT_VLLM_PYTHON`` names that venv's
python (examples/serve_vllm.py says how to make it), and vLLM runs in a subprocess of it. Without it,
or when that python cannot import vllm, the tests are skipped with the reason.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

import peft_pat
from peft_pat.offline_models import tiny_random_llama
from peft_pat.testing import tiny_model

pytestmark = pytest.mark.slow  # vLLM starts engine processes (about a minute per start on 2 cores)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "serve_vllm.py"
PROMPTS = ([5, 17, 33, 8, 60, 21, 44], [9, 9, 40, 71])
NEW_TOKENS = 10
TOP = 3


def vllm_python() -> str:
    """The python of vLLM's venv, or skip saying what is missing."""
    python = os.environ.get("PEFT_PAT_VLLM_PYTHON")
    if not python:
        pytest.skip("vLLM's venv is not configured: set PEFT_PAT_VLLM_PYTHON to its python (examples/serve_vllm.py)")
    if not Path(python).is_file():
        pytest.skip(f"PEFT_PAT_VLLM_PYTHON={python} is not a file")
    probe = subprocess.run([python, "-c", "import vllm"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"PEFT_PAT_VLLM_PYTHON={python} cannot import vllm: {probe.stderr.strip().splitlines()[-1:]}")
    return python


@pytest.fixture(scope="module")
def pruned(tmp_path_factory) -> Path:
    """A tiny Llama cut to hidden 96 of 128 (2 heads x head_dim 64: vLLM's CPU kernel needs 64) and MLP 64 of
    96 per layer, saved as a stock checkpoint. A wide initialisation makes the greedy tokens vary."""
    _, tokenizer = tiny_random_llama()
    model = tiny_model(
        "llama", hidden_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
        intermediate_size=96, vocab_size=len(tokenizer), tie_word_embeddings=True, max_position_embeddings=256,
        initializer_range=0.25,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randperm(128, generator=generator)[:96].sort().values
    mlp = torch.stack([torch.randperm(96, generator=generator)[:64].sort().values for _ in range(2)])
    peft_pat.prune_model(model, peft_pat.family_for_model(model), hidden=hidden, mlp=mlp)
    config = model.config
    assert config.hidden_size == 96 != config.num_attention_heads * config.head_dim and config.intermediate_size == 64
    folder = tmp_path_factory.mktemp("pruned") / "model"
    peft_pat.save_pruned(model, folder, tokenizer=tokenizer)
    return folder


def run_example(python: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    result = subprocess.run([python, str(EXAMPLE), *args], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def transformers_greedy(folder: Path, ids: list[int]) -> tuple[list[int], torch.Tensor]:
    """(greedy new tokens, log-softmax of the logits at each step) from transformers, float32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
            output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
    return out.sequences[0, len(ids) :].tolist(), torch.log_softmax(torch.cat(out.logits).float(), -1)


def test_vllm_greedy_tokens_and_logprobs_match_transformers(pruned, tmp_path):
    python = vllm_python()
    out = tmp_path / "vllm.json"
    prompt_args = [a for ids in PROMPTS for a in ("--prompt-ids", ",".join(map(str, ids)))]
    run_example(python, "--model", str(pruned), *prompt_args, "--max-tokens", str(NEW_TOKENS),
                "--logprobs", str(TOP), "--no-compare", "--json", str(out))  # fmt: skip
    results = json.loads(out.read_text())["offline"]
    assert [r["prompt_token_ids"] for r in results] == [list(p) for p in PROMPTS]
    distinct = set()
    for result, ids in zip(results, PROMPTS):
        tokens, logprobs = transformers_greedy(pruned, list(ids))
        assert result["token_ids"] == tokens
        distinct.update(tokens)
        for step, (theirs, ours) in enumerate(zip(result["logprobs"], logprobs)):
            assert {int(k) for k in theirs} == set(ours.topk(TOP).indices.tolist()), step
            for token, value in theirs.items():
                assert value == pytest.approx(float(ours[int(token)]), abs=2e-3), (step, token)
    assert len(distinct) > 2  # the comparison is not between two constant outputs


def test_vllm_refuses_a_config_without_head_dim_before_starting(pruned, tmp_path):
    """Without head_dim vLLM would size the attention as hidden_size // heads = 48 (q_proj has 128 rows)."""
    python = vllm_python()
    broken = tmp_path / "no-head-dim"
    broken.mkdir()
    for file in pruned.iterdir():
        (broken / file.name).symlink_to(file)
    config = json.loads((pruned / "config.json").read_text())
    del config["head_dim"]
    (broken / "config.json").unlink()
    (broken / "config.json").write_text(json.dumps(config))
    result = subprocess.run([python, str(EXAMPLE), "--model", str(broken)], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert '"head_dim": 64' in result.stderr and "q_proj has 128" in result.stderr


def test_vllm_openai_server_answers_with_the_offline_tokens(pruned, tmp_path):
    python = vllm_python()
    out = tmp_path / "server.json"
    run_example(python, "--model", str(pruned), "--server", "--prompt", "hello world", "--port", "8765",
                "--max-tokens", str(NEW_TOKENS), "--json", str(out))  # fmt: skip
    server = json.loads(out.read_text())["server"]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(pruned)
    tokens, _ = transformers_greedy(pruned, tokenizer("hello world")["input_ids"])
    assert server["text"] == tokenizer.decode(tokens, skip_special_tokens=True)  # the server's default
