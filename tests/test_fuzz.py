"""Fuzzing the configuration space with hypothesis: no crash, only our own clear errors for invalid
combinations (predicted here independently of the code under test), and an exact merge: equal logits
up to float32 rounding (2e-5 of the logit scale, or at most 8 times the float32 noise the PAT model's own
forward shows against float64, for the occasional ill-conditioned random model).

Drawn per example: family, heads, GQA ratio, head_dim, width multiplier, depth, MLP width, tied
embeddings, dtype (float32 / bfloat16), init_weights, target_sparsity or target_width (valid and
invalid), hsm_rank (incl. 0 and >= hidden_size), LoRA r (incl. above a layer's width), target_modules
(None, a subset, or a name that matches nothing), embedding HSM form and 0-3 AdamW steps.

Examples per test: 30 by default (the whole file runs in seconds). A long run on demand:

    PEFT_PAT_FUZZ_EXAMPLES=2000 flock /tmp/peft_pat_heavy.lock \\
        python -m pytest tests/test_fuzz.py -p no:cacheprovider --hypothesis-show-statistics
"""

import copy
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings, target
from hypothesis import strategies as st
from peft import get_peft_model
from torch import nn

from peft_pat import PATConfig, PATConfigError, PATError
from peft_pat.families import family_for_model_type
from peft_pat.mask import PATMask, freeze_step
from peft_pat.testing import ALL_FAMILIES, tiny_inputs, tiny_model

from helpers import assert_logits_close, logits

EXAMPLES = int(os.environ.get("PEFT_PAT_FUZZ_EXAMPLES", "30"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    print_blob=True,
)
MERGE_NOISE_FACTOR = 8  # the merge (float32 folding) may add a few times the noise the model already has
BF16_ROUNDING = 2.0**-8  # largest relative error of one rounding to bfloat16 (8 significant bits)
NONEXISTENT_TARGET = "no_such_proj"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: a second thread only adds synchronisation, which explodes on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@st.composite
def setups(draw):
    family = draw(st.sampled_from(ALL_FAMILIES))
    heads = draw(st.sampled_from([1, 2, 3, 4, 6, 8]))
    kv = draw(st.sampled_from([k for k in range(1, heads + 1) if heads % k == 0]))  # GQA ratio heads / kv
    head_dim = draw(st.sampled_from([2, 4, 6, 8, 16]))
    hidden = heads * head_dim * draw(st.sampled_from([1, 2, 3]))
    model = {
        "family": family,
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": head_dim,
        "num_hidden_layers": draw(st.integers(1, 3)),
        "intermediate_size": draw(st.integers(4, 96)),
        "tie_word_embeddings": draw(st.booleans()),
        "dtype": draw(st.sampled_from([torch.float32, torch.bfloat16])),
        "seed": draw(st.integers(0, 2**16)),
    }
    kv_width, intermediate = kv * head_dim, model["intermediate_size"]
    # Each knob has a mode; the last mode (9) is invalid on purpose. Mode 0 is the common valid case, which
    # is also where hypothesis starts and shrinks to.
    width_mode = draw(st.integers(0, 9))
    if width_mode <= 5 or (width_mode <= 7 and hidden == heads):
        width = {"target_sparsity": draw(st.floats(0.05, 0.95))}
    elif width_mode <= 7:
        width = {"target_sparsity": None, "target_width": heads * draw(st.integers(1, hidden // heads - 1))}
    elif width_mode == 8:
        width = {"target_sparsity": None, "target_width": draw(st.integers(-2, hidden + 2))}
    else:
        width = {"target_sparsity": draw(st.sampled_from([-0.1, 0.0, 1.0, 1.1, 0.001, 0.999]))}
    lora_targets = list(family_for_model_type(family).lora_targets)
    target_mode = draw(st.integers(0, 9))
    if target_mode <= 4:
        targets = None
    elif target_mode <= 8:
        targets = draw(st.lists(st.sampled_from(lora_targets), min_size=1, unique=True))
    else:
        targets = [NONEXISTENT_TARGET]
    rank_mode = draw(st.integers(0, 9))
    if rank_mode <= 2 or (rank_mode <= 8 and hidden == 1):
        hsm_rank = None
    elif rank_mode <= 8:
        hsm_rank = draw(st.integers(1, hidden - 1))
    else:
        hsm_rank = draw(st.sampled_from([0, hidden, hidden + 1]))
    r_bound = min(hidden, kv_width, intermediate)  # no LoRA target is narrower than this
    r_mode = draw(st.integers(0, 9))
    if r_mode <= 6:
        r = draw(st.integers(1, min(r_bound, 16)))
    elif r_mode <= 8:
        r = 0
    else:
        r = r_bound + draw(st.integers(1, 64))  # may still fit when targets avoid the narrowest layer
    pat = {  # the hidden axis alone: its oracle below (the MLP budget's errors: tests/test_mlp_axis.py)
        "prune_axes": ["hidden"],
        **width,
        "hsm_rank": hsm_rank,
        "r": r,
        "target_modules": targets,
        "embedding_hsm": draw(st.sampled_from(["auto", "full", "diagonal"])),
        "init_weights": draw(st.booleans()),
    }
    training = {"steps": draw(st.integers(0, 3)), "lr": draw(st.floats(1e-3, 5e-2))}
    return model, pat, training


def expected_problem(base: nn.Module, model: dict, pat: dict) -> str | None:
    """Why this combination must be refused (None: it must work), from the spec, not from peft-pat's code."""
    d, heads = model["hidden_size"], model["num_attention_heads"]
    sparsity = pat.get("target_sparsity")
    if "target_width" in pat:
        width = pat["target_width"]
        if width < 1:
            return "target_width < 1"
        if not 0 < width < d or width % heads:
            return "target_width unreachable"
    elif not 0 < sparsity < 1:
        return "sparsity outside (0, 1)"
    elif not 0 < round((1 - sparsity) * d / heads) * heads < d:
        return "sparsity unreachable"
    if pat["hsm_rank"] is not None and not 1 <= pat["hsm_rank"] < d:
        return "hsm_rank not in [1, d)"
    if pat["r"] == 0:
        return None
    family = family_for_model_type(model["family"])
    names = pat["target_modules"] or family.lora_targets
    linears = [m for key, m in base.named_modules() if isinstance(m, nn.Linear) and key.rsplit(".", 1)[-1] in names]
    if not linears:
        return "target_modules match nothing"
    if pat["r"] > min(min(m.in_features, m.out_features) for m in linears):
        return "r above a target's width"
    return None


def train(model, steps: int, lr: float) -> None:
    ids = tiny_inputs(length=6)
    total = steps + 2
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(1, steps + 1):
        loss = model(input_ids=ids, labels=ids).loss
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        model.set_step(step, total, learning_rate=lr)
    model.eval()


@FUZZ
@given(setup=setups())
def test_no_crash_clear_errors_and_exact_merge(setup):
    model_kwargs, pat, training = setup
    model_kwargs = dict(model_kwargs)
    family, seed, dtype = model_kwargs.pop("family"), model_kwargs.pop("seed"), model_kwargs.pop("dtype")
    base = tiny_model(family, seed=seed, dtype=dtype, **model_kwargs)
    problem = expected_problem(base, {"family": family, **model_kwargs}, pat)
    torch.manual_seed(seed)
    if problem is not None:
        event(f"refused: {problem}")
        with pytest.raises(PATConfigError) as caught:
            get_peft_model(base, PATConfig(task_type="CAUSAL_LM", **pat))
        assert len(str(caught.value)) > 40  # a sentence that names the problem and the fix
        return
    event(f"accepted: {dtype}")
    try:
        model = get_peft_model(base, PATConfig(task_type="CAUSAL_LM", **pat))
    except PATError as error:  # pragma: no cover - a refusal the spec above does not predict is a bug
        raise AssertionError(f"valid combination refused: {error}") from error
    config = model.peft_config["default"]
    d, heads, kept = model_kwargs["hidden_size"], model_kwargs["num_attention_heads"], config.kept_width
    assert 0 < kept < d and kept % heads == 0
    if pat.get("target_width") is not None:
        assert kept == pat["target_width"]
    else:
        assert abs(kept - (1 - pat["target_sparsity"]) * d) <= max(d / 32, heads / 2) + 1e-9

    train(model, training["steps"], training["lr"])
    mask = model.base_model.pat_mask["default"]
    if not mask.hardened:
        model.base_model.harden_mask()
    assert int(mask.hard_mask.sum()) == kept and torch.isfinite(mask.logits).all()

    # bfloat16: the same weights upcast exactly to float32 give the reference; its merge must be exact, and the
    # bfloat16 merge must be that merge up to rounding: the bf16 path rounds twice (the fold, then the width
    # rescaling), the reference once, so every weight is within 3 roundings (relative 3 * 2**-8) of it.
    reference = copy.deepcopy(model).float() if dtype == torch.bfloat16 else model
    ids = tiny_inputs(length=6)
    expected = logits(reference, ids)
    # The float32 rounding noise this particular model already has: its own forward in float32 vs float64.
    with torch.no_grad():
        noise = float((copy.deepcopy(reference).double()(input_ids=ids).logits - expected.double()).abs().max())
    small = reference.merge_and_prune()
    assert type(small) is type(base) and small.config.hidden_size == kept
    assert not any(".pat_" in name for name, _ in small.named_parameters())
    actual = logits(small, ids)
    assert torch.isfinite(actual).all()
    error = float((actual - expected).abs().max())
    allowed = max(2e-5 * max(1.0, float(expected.abs().max())), MERGE_NOISE_FACTOR * noise)
    target(error / allowed, label="max |merged - PAT| / allowed (must stay <= 1)")  # hunt for the worst case
    assert error <= allowed, f"merge error {error:.3e} > allowed {allowed:.3e} (float32 noise {noise:.3e})"
    if dtype == torch.bfloat16:
        exact = small.state_dict()
        offset = family_for_model_type(family).norm_offset  # Gemma norms compute x * (1 + w): compare 1 + w
        steps = {}
        for name, weight in model.merge_and_prune().state_dict().items():
            assert weight.dtype == torch.bfloat16, name
            shift = offset if "norm" in name else 0.0
            rounded = (exact[name] + shift).to(torch.bfloat16).float()
            distance = (weight.float() + shift - rounded).abs()
            steps[name] = float((distance / (BF16_ROUNDING * rounded.abs()).clamp_min(1e-30)).max())
        worst = max(steps, key=steps.get)
        target(steps[worst], label="bfloat16 merge: max |w - bf16(exact w)| / |w|, in units of 2**-8")
        assert steps[worst] <= 3.0, f"{worst}: {steps[worst]:.2f} bfloat16 roundings from the exact merge"


@FUZZ
@given(
    d=st.integers(2, 64),
    kept_fraction=st.floats(0.01, 0.99),
    milestone=st.floats(0.01, 1.0),
    freeze=st.floats(0.01, 1.0),
    total=st.integers(1, 50),
    steps=st.lists(st.integers(-3, 60), min_size=1, max_size=30),
    seed=st.integers(0, 2**16),
)
def test_mask_schedule_under_any_step_sequence(d, kept_fraction, milestone, freeze, total, steps, seed):
    """Any sequence of set_step calls: out-of-run steps refused, one hardening, exactly N kept, state restorable."""
    kept = min(d - 1, max(1, round(kept_fraction * d)))
    torch.manual_seed(seed)
    mask = PATMask(d, kept, milestone=milestone, freeze=freeze, random_init=True)
    hardenings = 0
    for step in steps:
        if not 0 <= step <= total:
            with pytest.raises(PATConfigError, match="outside the run"):
                mask.set_step(step, total)
            continue
        with torch.no_grad():
            mask.logits.add_(0.1 * torch.randn(d))  # an optimizer step
        hardenings += mask.set_step(step, total)
        with torch.no_grad():
            gate = mask.gate()
        assert torch.isfinite(gate).all() and float(gate.min()) >= 0.0 and float(gate.max()) <= 1.5
        if step >= freeze_step(total, freeze):
            assert mask.hardened
    assert hardenings == int(mask.hardened) <= 1
    if mask.hardened:
        assert int(mask.hard_mask.sum()) == kept and set(mask.hard_mask.tolist()) <= {0.0, 1.0}
    restored = PATMask(d, kept, milestone=milestone, freeze=freeze)
    restored.load_state_dict(mask.state_dict())
    with torch.no_grad():
        assert restored.hardened == mask.hardened and torch.equal(restored.gate(), mask.gate())
    assert math.isclose(float(restored.tau), float(mask.tau)) and math.isclose(float(restored.beta), float(mask.beta))


# ------------------------------------------------------------------ regressions the fuzzer found
@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3_text"])
@pytest.mark.parametrize("tied", [False, True])
def test_upcast_gemma_merges_exactly(family, tied):
    """A Gemma loaded in bfloat16 and cast to float32 keeps its bf16-rounded sqrt(d) embedding scale; the
    merge used to assume the exact sqrt(d) (relative error ~1e-3 in the logits). Found by test_fuzz."""
    base = tiny_model(family, dtype=torch.bfloat16, hidden_size=24, num_attention_heads=2, tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = get_peft_model(base, PATConfig(task_type="CAUSAL_LM", target_sparsity=0.5, r=2, init_weights=False))
    model = model.float()
    assert float(model.base_model.model.model.embed_tokens.base_layer.embed_scale) != math.sqrt(24)
    model.base_model.harden_mask()
    ids = tiny_inputs(length=6)
    expected = logits(model, ids)
    assert_logits_close(logits(model.merge_and_prune(), ids), expected)
