"""`PATConfig`: every knob of Pruning-Aware Tuning, validated when it is built."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from peft.config import PeftConfig

from ._registry import PatPeftType
from .errors import PATConfigError, PATTypeError

DEFAULT_TARGET_SPARSITY = 0.25  # used when neither target_sparsity nor target_width is given
PRUNE_AXES = ("hidden", "mlp", "heads", "kv_heads")  # what this version prunes
HEAD_AXES = ("heads", "kv_heads")
# What PATConfig(target_sparsity=...) prunes. At -25% / -50% parameters on SmolLM2-135M, hidden + MLP reached 98.4 / 306
# WikiText-2 PPL against 129.5 / ~550 for the hidden width alone (docs/quality.md, Multi-axis).
DEFAULT_PRUNE_AXES = ("hidden", "mlp")
DEFAULT_CALIBRATION_BATCHES = 8  # batches of the importance-aware start (also when calibrate() is called by hand)
IDENTITY_LOSS_FORMS = ("l0_gram", "none")
EMBEDDING_HSM_FORMS = ("auto", "full", "diagonal")


def _check_names(name: str, value, allow_str: bool = True) -> None:
    """None, a str (regex, PEFT semantics) if ``allow_str``, or a list of str."""
    if value is None or (allow_str and isinstance(value, str)):
        return
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return
    expected = "a str (regex), a list of str or None" if allow_str else "a list of str or None"
    example = "['q_proj', 'v_proj']" if name != "modules_to_save" else "['lm_head']"
    raise PATTypeError(f"PATConfig.{name} must be {expected}, e.g. {example}; got {type(value).__name__} ({value!r}).")


def _check_number(name: str, value, kinds: tuple[type, ...]) -> None:
    if isinstance(value, bool) or not isinstance(value, kinds):
        expected = " or ".join(k.__name__ for k in kinds)
        raise PATTypeError(f"PATConfig.{name} must be {expected}, got {type(value).__name__} ({value!r}).")
    if isinstance(value, float) and not math.isfinite(value):
        raise PATConfigError(f"PATConfig.{name} must be finite, got {value!r}.")


@dataclass
class PATConfig(PeftConfig):
    """Configuration of a PAT adapter (Liu et al., AAAI-25, arXiv 2408.14721).

    Pruning: ``target_sparsity`` (fraction of the base's parameters removed, default 0.25), split over
    ``prune_axes`` (default the hidden width and the MLP width, :mod:`peft_pat.budget`), or explicit kept
    sizes (``target_width``, ``target_intermediate_size``); the hidden width is rounded to a multiple of the
    attention head count (see :mod:`peft_pat.width`). HSMs (identity + rank-``hsm_rank`` operator, per-channel
    scale, shared mask) go on every producer of the residual stream; LoRA with ``r``, ``lora_alpha``,
    ``lora_dropout`` goes on ``target_modules`` (default: every linear of the decoder layers).

    Mask schedule (paper Eqs. 8-10), as fractions of the total optimizer steps: the temperature ramps
    and the offset decays until ``mask_milestone`` (s0); at ``mask_freeze`` the mask becomes an exact
    top-N 0/1 mask and stays fixed, so the rest of training sees the network that ships. By default both
    scale with the pruned fraction (the paper's 1/3 and 0.8/3 at 50%, half that at 25%;
    :func:`peft_pat.mask.default_schedule`).
    """

    # --- how much to prune ---
    target_sparsity: float | None = field(
        default=None,  # None: DEFAULT_TARGET_SPARSITY (0.25), unless target_width is given
        metadata={
            "help": "Fraction of the base's parameters removed, in (0, 1), split across prune_axes (with the hidden "
            f"width alone: the fraction of hidden channels, nearly the same). Default {DEFAULT_TARGET_SPARSITY}."
        },
    )
    target_width: int | None = field(
        default=None, metadata={"help": "Number of hidden channels kept (instead of target_sparsity)."}
    )
    width_multiple: int | None = field(
        default=None,
        metadata={"help": "Kept width is a multiple of lcm(num_attention_heads, width_multiple). None: auto."},
    )
    prune_axes: list[str] | None = field(
        default=None,
        metadata={
            "help": "What the masks prune: a subset of ('hidden', 'mlp', 'heads', 'kv_heads'); 'mlp' is the MLP "
            "intermediate width, 'heads' the query heads (every KV group keeps the same number of its own), "
            "'kv_heads' whole KV groups (a KV head with its query heads); every layer keeps the same counts of its "
            "own choice. None: ('hidden', 'mlp'), or just the axes whose explicit targets (target_width, "
            "target_intermediate_size, target_num_attention_heads, target_num_key_value_heads) are given without "
            "target_sparsity. With any axis beyond 'hidden', target_sparsity is the fraction of the base's "
            "parameters removed (tied embeddings counted once; docs/config.md says how the axes share it); with "
            "'hidden' alone, the fraction of hidden channels (nearly the same)."
        },
    )
    target_intermediate_size: int | None = field(
        default=None,
        metadata={"help": "MLP intermediate channels each layer keeps: the pruned config's intermediate_size."},
    )
    target_num_attention_heads: int | None = field(
        default=None,
        metadata={
            "help": "Query heads each layer keeps ('heads'): the pruned config's num_attention_heads, a multiple of "
            "the kept KV heads."
        },
    )
    target_num_key_value_heads: int | None = field(
        default=None,
        metadata={"help": "KV heads each layer keeps ('kv_heads'): the pruned config's num_key_value_heads."},
    )
    # --- HSM ---
    hsm_rank: int | None = field(
        default=None,
        metadata={
            "help": "Rank of the HSM operator I + L1 L0. None: min(d - N, 128), d - N the pruned hidden channels (at "
            "least ~5% of d, the paper's rank): the HSM can carry every removed channel into the kept ones, and "
            "the cap keeps its parameters a fixed multiple of LoRA's at 7B and beyond."
        },
    )
    embedding_hsm: str = field(
        default="auto",
        metadata={
            "help": "HSM on the embedding: 'full' (low-rank + scale), 'diagonal' (scale only, keeps tied "
            "embeddings tied after merging), 'auto' (diagonal if the base ties its embeddings, else full)."
        },
    )
    # --- LoRA branch ---
    r: int = field(default=20, metadata={"help": "LoRA rank on target_modules (0: no LoRA, HSMs only)."})
    lora_alpha: float = field(default=20.0, metadata={"help": "LoRA scaling numerator: scaling = lora_alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA branch input."})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "LoRA targets (PEFT semantics). None: every decoder-layer linear."}
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Modules excluded from LoRA (HSMs always sit on every producer)."}
    )
    target_parameters: list[str] | None = field(default=None, metadata={"help": "Unsupported; keep None."})
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Restrict LoRA to these layer indices."}
    )
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "PEFT semantics."})
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Extra fully trained modules (PEFT semantics); not producers."}
    )
    bias: str = field(default="none", metadata={"help": "Only 'none' is supported."})
    init_weights: bool = field(
        default=True,
        metadata={"help": "True: the wrapped model equals the base model at start. False: random start (tests)."},
    )
    # --- mask schedule, as fractions of the run ---
    mask_milestone: float | None = field(
        default=None,
        metadata={
            "help": "s0 / total steps: end of the temperature ramp. None: in proportion to the pruned fraction p, "
            "(2/3) p (the paper's 1/3 at 50%, 1/6 at 25%), with mask_freeze."
        },
    )
    mask_freeze: float | None = field(
        default=None,
        metadata={
            "help": "Step / total steps at which the mask becomes an exact top-N 0/1 mask. None: (1.6/3) p, 0.8 s0 "
            "(the paper's 0.8/3 at 50%, 0.8/6 at 25%): the soft phase lasts as long as the channels it removes need."
        },
    )
    mask_fade_to_hard: bool = field(
        default=True,
        metadata={
            "help": "Interpolate the soft gate towards a 0/1 target, M <- (1 - f) M + f target with f = step / freeze "
            "step, so the channels that will go fade out gradually and the freeze changes nothing (no loss cliff). "
            "The target is the set the importance-aware start chose (fixed at calibration and saved), so it needs "
            "calibration_batches > 0; an uncalibrated mask keeps the paper's gate. On by default: on SmolLM2 it beat "
            "the paper's gate at 25% and 50% (docs/quality.md, Levers)."
        },
    )
    mask_lr: float | None = field(
        default=None,
        metadata={
            "help": "Peak learning rate of the mask logits (Adam-type optimizers; a reparametrisation, no param "
            "groups needed). None: 2 / s0, so the logits can reach the polarisation targets +-0.5 well before "
            "the freeze, whatever the run length."
        },
    )
    # --- auxiliary losses ---
    active_loss_weight: float = field(
        default=10.0, metadata={"help": "Weight of |#kept - N| / N (paper Eq. 11, official weight 10)."}
    )
    polarization_weight: float = field(
        default=1.0, metadata={"help": "Weight of the pull of mask logits towards +-0.5 (official code)."}
    )
    identity_loss: str = field(
        default="l0_gram", metadata={"help": "'l0_gram': sum over HSMs of mean((L0 L0^T - I)^2); 'none'."}
    )
    identity_loss_weight: float = field(default=1.0, metadata={"help": "Weight of the identity loss."})
    # --- importance-aware start (docs/quality.md: the largest single lever measured) ---
    calibration_batches: int = field(
        default=DEFAULT_CALIBRATION_BATCHES,
        metadata={
            "help": "Training batches run forward (no gradient) at the start of training to rank hidden channels by "
            "activation (norm outputs summed over layers); the mask logits start ordered by that rank, so the "
            "mask begins at the activation top-N. PATCallback takes them from the Trainer's dataloader; a plain "
            "loop calls model.calibrate(batches). 0: logits start at 0 (the paper's start)."
        },
    )
    calibration_margin: float = field(
        default=0.02,
        metadata={"help": "Largest |logit| of the importance-aware start (logits are ranked within +-margin)."},
    )
    protect_massive_activations: bool = field(
        default=True,
        metadata={
            "help": "Never prune channels whose residual mean square exceeds massive_activation_ratio x the median "
            "(massive activations: attention-sink channels whose removal destroys the model). Needs calibration."
        },
    )
    massive_activation_ratio: float = field(
        default=100.0, metadata={"help": "Energy ratio to the median channel above which a channel is protected."}
    )
    # --- distillation from the dense model (the same weights with every PAT piece bypassed) ---
    distillation_weight: float = field(
        default=1.0,
        metadata={
            "help": "w in loss = (1 - w) * task loss + w * T^2 KL(teacher || student) over every non-padding token; "
            "the teacher is the base model (PAT bypassed, no gradient, one extra forward). 0: task loss only."
        },
    )
    distillation_temperature: float = field(default=1.0, metadata={"help": "T of the distillation loss."})
    # --- recorded at injection, checked when loading onto another base ---
    base_model_type: str | None = field(default=None, metadata={"help": "Filled in automatically."})
    base_hidden_size: int | None = field(default=None, metadata={"help": "Filled in automatically."})
    base_vocab_size: int | None = field(default=None, metadata={"help": "Filled in automatically."})
    base_num_hidden_layers: int | None = field(
        default=None, metadata={"help": "Filled in automatically (adapters saved by peft-pat 0.4.0 and older lack it)."}
    )
    kept_width: int | None = field(default=None, metadata={"help": "Resolved N, filled in automatically."})
    base_intermediate_size: int | None = field(default=None, metadata={"help": "Filled in automatically."})
    kept_intermediate_size: int | None = field(
        default=None, metadata={"help": "Resolved MLP width when 'mlp' is pruned, filled in automatically."}
    )
    base_num_attention_heads: int | None = field(default=None, metadata={"help": "Filled in automatically."})
    base_num_key_value_heads: int | None = field(default=None, metadata={"help": "Filled in automatically."})
    kept_num_attention_heads: int | None = field(
        default=None, metadata={"help": "Resolved query heads when heads are pruned, filled in automatically."}
    )
    kept_num_key_value_heads: int | None = field(
        default=None, metadata={"help": "Resolved KV heads when heads are pruned, filled in automatically."}
    )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs) -> PATConfig:
        """PEFT's loader, which builds the config class the file's ``peft_type`` names: refuse a non-PAT one."""
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        if not isinstance(config, cls):
            kind = getattr(config.peft_type, "value", config.peft_type)
            raise PATConfigError(
                f"{pretrained_model_name_or_path!r} holds a {kind} adapter ({type(config).__name__}), not "
                "a PAT adapter. Load it with peft.PeftConfig.from_pretrained / PeftModel.from_pretrained, or point "
                "PATConfig.from_pretrained at a folder saved from a PAT model."
            )
        return config

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PatPeftType.PAT
        if self.task_type is None:  # PAT prunes causal LMs only; without it PEFT's plain PeftModel skips our forward
            self.task_type = "CAUSAL_LM"
        for name in ("target_modules", "exclude_modules", "modules_to_save", "layers_to_transform", "layers_pattern"):
            if isinstance(getattr(self, name), (set, tuple)):
                setattr(self, name, sorted(getattr(self, name)))
        self._validate()

    @property
    def pruned_axes(self) -> tuple[str, ...]:
        """The axes this adapter prunes, in the order of :data:`PRUNE_AXES`.

        ``prune_axes`` when given (recorded in every adapter saved since the MLP axis). Otherwise: the axes whose
        explicit targets are given when ``target_sparsity`` is not (``target_width`` alone cuts the hidden width
        alone); the hidden width alone for an adapter resolved before ``prune_axes`` existed (it records
        ``kept_width`` and no MLP width, peft-pat 0.4); else :data:`DEFAULT_PRUNE_AXES`."""
        if self.prune_axes is not None:
            return tuple(a for a in PRUNE_AXES if a in self.prune_axes)
        if self.kept_width is not None and self.kept_intermediate_size is None:
            return ("hidden",)
        explicit = {"hidden": self.target_width, "mlp": self.target_intermediate_size,
                    "heads": self.target_num_attention_heads, "kv_heads": self.target_num_key_value_heads}  # fmt: skip
        if self.target_sparsity is None and any(v is not None for v in explicit.values()):
            return tuple(a for a in PRUNE_AXES if explicit[a] is not None)
        return DEFAULT_PRUNE_AXES

    def _validate_axes(self) -> None:
        axes = self.prune_axes
        if axes is None:
            return
        if isinstance(axes, str) or not isinstance(axes, (list, tuple)) or not all(isinstance(a, str) for a in axes):
            raise PATTypeError(
                f"PATConfig.prune_axes must be a list of axis names such as ['hidden', 'mlp'], got {axes!r}."
            )
        unknown = [a for a in axes if a not in PRUNE_AXES]
        if unknown or not axes:
            raise PATConfigError(
                f"PATConfig.prune_axes={list(axes)}: {'unknown axes ' + str(unknown) if unknown else 'no axis'}; "
                f"choose a non-empty subset of {list(PRUNE_AXES)}."
            )
        self.prune_axes = list(self.pruned_axes)
        if self.target_intermediate_size is not None and "mlp" not in axes:
            raise PATConfigError(
                f"target_intermediate_size={self.target_intermediate_size} cuts the MLP width, but prune_axes="
                f"{list(axes)} leaves it: add 'mlp' to prune_axes (or drop target_intermediate_size)."
            )
        if self.target_width is not None and "hidden" not in axes:
            raise PATConfigError(
                f"target_width={self.target_width} cuts the hidden width, but prune_axes={list(axes)} leaves it: add "
                "'hidden' to prune_axes (or drop target_width)."
            )

    def _validate_head_targets(self) -> None:
        """Head targets need their axis; with kv_heads alone every kept group keeps all its query heads."""
        for name, axis, what in (
            ("target_num_attention_heads", "heads", "query heads"),
            ("target_num_key_value_heads", "kv_heads", "KV heads"),
        ):
            value = getattr(self, name)
            if value is not None and axis not in self.pruned_axes:
                raise PATConfigError(
                    f"{name}={value} cuts the {what}, but prune_axes={self.prune_axes!r} (pruning "
                    f"{list(self.pruned_axes)}) leaves them: add {axis!r} to prune_axes (or drop {name})."
                )

    def _validate(self) -> None:
        if self.task_type != "CAUSAL_LM":
            raise PATConfigError(
                f"PATConfig.task_type={self.task_type!r} is not supported: PAT prunes decoder-only causal language "
                "models (*ForCausalLM). Use task_type='CAUSAL_LM' (the default)."
            )
        for name in ("init_weights", "inference_mode", "mask_fade_to_hard"):
            if not isinstance(getattr(self, name), bool):
                value = getattr(self, name)
                raise PATTypeError(f"PATConfig.{name} must be True or False, got {type(value).__name__} ({value!r}).")
        _check_names("target_modules", self.target_modules)
        _check_names("exclude_modules", self.exclude_modules)
        _check_names("layers_pattern", self.layers_pattern)
        _check_names("modules_to_save", self.modules_to_save, allow_str=False)
        layers = self.layers_to_transform
        if layers is not None and not (
            (isinstance(layers, int) and not isinstance(layers, bool))
            or (isinstance(layers, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in layers))
        ):
            raise PATTypeError(
                f"PATConfig.layers_to_transform must be an int, a list of int or None, got {type(layers).__name__} "
                f"({layers!r})."
            )
        self._validate_axes()
        if self.target_sparsity is not None and self.target_width is not None and self.pruned_axes == ("hidden",):
            raise PATConfigError(
                f"Give either target_sparsity ({self.target_sparsity}) or target_width ({self.target_width}), "
                "not both: target_width fixes the kept channel count, target_sparsity derives it."
            )
        if self.target_sparsity is not None:
            _check_number("target_sparsity", self.target_sparsity, (int, float))
            if not 0.0 < self.target_sparsity < 1.0:
                raise PATConfigError(
                    f"target_sparsity={self.target_sparsity} is impossible: it is the fraction of the model removed "
                    "and must lie strictly between 0 and 1 (e.g. 0.25)."
                )
        for name in (
            "target_width", "width_multiple", "hsm_rank", "kept_width", "base_num_hidden_layers",
            "target_intermediate_size", "kept_intermediate_size", "target_num_attention_heads",
            "target_num_key_value_heads", "kept_num_attention_heads", "kept_num_key_value_heads",
        ):  # fmt: skip
            value = getattr(self, name)
            if value is not None:
                _check_number(name, value, (int,))
                if value < 1:
                    raise PATConfigError(f"PATConfig.{name} must be a positive integer, got {value}.")
        self._validate_head_targets()
        if self.target_width is not None and self.kept_width is not None and self.kept_width != self.target_width:
            raise PATConfigError(
                f"PATConfig.kept_width={self.kept_width} contradicts target_width={self.target_width}. kept_width is "
                "filled in automatically from target_width / target_sparsity; do not set it yourself."
            )
        _check_number("r", self.r, (int,))
        if self.r < 0:
            raise PATConfigError(f"PATConfig.r must be >= 0 (0 disables LoRA), got {self.r}.")
        _check_number("lora_alpha", self.lora_alpha, (int, float))
        _check_number("lora_dropout", self.lora_dropout, (int, float))
        if not 0.0 <= self.lora_dropout < 1.0:
            raise PATConfigError(f"PATConfig.lora_dropout must be in [0, 1), got {self.lora_dropout}.")
        for name in ("mask_milestone", "mask_freeze"):
            value = getattr(self, name)
            if value is None:
                continue
            _check_number(name, value, (int, float))
            if not 0.0 < value <= 1.0:
                raise PATConfigError(
                    f"PATConfig.{name}={value} must be a fraction of the run in (0, 1]; e.g. mask_milestone=1/3, "
                    "mask_freeze=0.8/3."
                )
        if self.mask_lr is not None:
            _check_number("mask_lr", self.mask_lr, (int, float))
            if self.mask_lr <= 0:
                raise PATConfigError(f"PATConfig.mask_lr must be > 0 (or None for automatic), got {self.mask_lr}.")
        for name in ("active_loss_weight", "polarization_weight", "identity_loss_weight"):
            value = getattr(self, name)
            _check_number(name, value, (int, float))
            if value < 0:
                raise PATConfigError(f"PATConfig.{name} must be >= 0, got {value}.")
        _check_number("calibration_batches", self.calibration_batches, (int,))
        if self.calibration_batches < 0:
            raise PATConfigError(
                f"PATConfig.calibration_batches must be >= 0 (0 disables the importance-aware start), got "
                f"{self.calibration_batches}."
            )
        if not isinstance(self.protect_massive_activations, bool):
            raise PATTypeError(
                "PATConfig.protect_massive_activations must be True or False, got "
                f"{self.protect_massive_activations!r}."
            )
        for name, low in (
            ("calibration_margin", 0.0),
            ("massive_activation_ratio", 1.0),
            ("distillation_temperature", 0.0),
        ):
            value = getattr(self, name)
            _check_number(name, value, (int, float))
            if not value > low:
                raise PATConfigError(f"PATConfig.{name} must be > {low:g}, got {value}.")
        _check_number("distillation_weight", self.distillation_weight, (int, float))
        if not 0.0 <= self.distillation_weight <= 1.0:
            raise PATConfigError(
                f"PATConfig.distillation_weight={self.distillation_weight} must lie in [0, 1]: the loss is "
                "(1 - w) * task loss + w * distillation (1: distillation only, 0: task loss only)."
            )
        if self.identity_loss not in IDENTITY_LOSS_FORMS:
            raise PATConfigError(
                f"PATConfig.identity_loss={self.identity_loss!r} is unknown; choose one of {IDENTITY_LOSS_FORMS}."
            )
        if self.embedding_hsm not in EMBEDDING_HSM_FORMS:
            raise PATConfigError(
                f"PATConfig.embedding_hsm={self.embedding_hsm!r} is unknown; choose one of {EMBEDDING_HSM_FORMS}."
            )
        if self.bias != "none":
            raise PATConfigError(f"PATConfig.bias={self.bias!r} is not supported; PAT trains no biases, use 'none'.")
        if self.target_parameters:
            raise PATConfigError("PATConfig.target_parameters is not supported by PAT; use target_modules.")
