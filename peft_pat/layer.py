"""PAT layers: LoRA on linears, and the Hybrid Sparsification Module on producers of the residual stream.

On a producer (embedding, ``o_proj``, ``down_proj``) the output y goes through the HSM (paper Eqs. 4-5
with the official per-channel scale)

    HSM(y) = s ⊙ M ⊙ (I + L1 L0) y,     L0 in R^{r x d} (kaiming), L1 in R^{d x r} (zeros), s = 1

where M is the adapter's shared gate, computed here from the tuner's :class:`~peft_pat.mask.PATMask`
on every call (never cached per forward, so gradient checkpointing can recompute it). A "diagonal"
HSM has no L0/L1. Linears in ``target_modules`` also carry LoRA, y = W x + (alpha / r) B A x, added
before the HSM.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from .axes import column_gate
from .errors import PATStateError
from .hsm import low_rank_hsm
from .merge import fold
from .merge.adapter import gate_scale, lora_scaling
from .sharding import replicated


class PATLayer(BaseTunerLayer):
    """Per-adapter containers shared by :class:`PATLinear` and :class:`PATEmbedding`."""

    adapter_layer_names = ("pat_lora_A", "pat_lora_B", "pat_hsm_down", "pat_hsm_up", "pat_hsm_scale", "pat_unit_scale")
    other_param_names = ("pat_r", "pat_scaling", "pat_lora_dropout", "pat_unit_gate")

    def __init__(self, base_layer: nn.Module, hsm_width: int) -> None:
        self.base_layer = base_layer
        self.hsm_width = hsm_width
        self.pat_lora_A = nn.ModuleDict()
        self.pat_lora_B = nn.ModuleDict()
        self.pat_lora_dropout = nn.ModuleDict()
        self.pat_hsm_down = nn.ModuleDict()
        self.pat_hsm_up = nn.ModuleDict()
        self.pat_hsm_scale = nn.ParameterDict()
        # Per-layer axes gating this layer's input units (down_proj: mlp; o_proj: heads, kv_heads): s ⊙ M on the
        # input, M the product of the axes' rows of this layer over the input columns (peft_pat.axes.column_gate).
        self.pat_unit_scale = nn.ParameterDict()
        self.pat_unit_gate: dict[str, tuple[tuple[str, ...], int]] = {}  # adapter -> (axes, layer index)
        self.pat_r: dict[str, int] = {}
        self.pat_scaling: dict[str, float] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._unmerge_backup: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        # Plain (unregistered) references to the tuner's ModuleDicts of PATMask: one per adapter (the hidden
        # axis), and one ModuleDict of per-layer axis masks per adapter.
        object.__setattr__(self, "_pat_masks", None)
        object.__setattr__(self, "_pat_unit_masks", None)

    # ------------------------------------------------------------------ construction
    def update_layer(
        self,
        adapter_name: str,
        masks: nn.ModuleDict,
        *,
        lora_rank: int,
        lora_alpha: float,
        lora_dropout: float,
        hsm_rank: int | None,
        with_hsm: bool,
        init_weights: bool,
        inference_mode: bool = False,
        unit_gate: tuple[tuple[str, ...], int] | None = None,
        unit_masks: nn.ModuleDict | None = None,
    ) -> None:
        """Add ``adapter_name``: LoRA if ``lora_rank`` > 0, an HSM if ``with_hsm`` (low-rank if ``hsm_rank``), and
        a gate s ⊙ M on the input units if ``unit_gate`` = (axes, layer) names per-layer axis masks."""
        object.__setattr__(self, "_pat_masks", masks)
        if unit_gate is not None:
            object.__setattr__(self, "_pat_unit_masks", unit_masks)
            self.pat_unit_gate[adapter_name] = unit_gate
            width = self._lora_shape()[0]
            self.pat_unit_scale[adapter_name] = nn.Parameter(
                torch.ones(width) if init_weights else 1.0 + 0.1 * torch.randn(width)
            )
        if lora_rank > 0:
            in_features, out_features = self._lora_shape()
            self.pat_r[adapter_name] = lora_rank
            self.pat_scaling[adapter_name] = lora_scaling(lora_alpha, lora_rank)
            self.pat_lora_dropout[adapter_name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
            self.pat_lora_A[adapter_name] = nn.Linear(in_features, lora_rank, bias=False)
            self.pat_lora_B[adapter_name] = nn.Linear(lora_rank, out_features, bias=False)
            nn.init.kaiming_uniform_(self.pat_lora_A[adapter_name].weight, a=math.sqrt(5))
            if init_weights:
                nn.init.zeros_(self.pat_lora_B[adapter_name].weight)
            else:
                nn.init.normal_(self.pat_lora_B[adapter_name].weight, std=0.02)
        if with_hsm:
            d = self.hsm_width
            scale = torch.ones(d) if init_weights else 1.0 + 0.1 * torch.randn(d)
            self.pat_hsm_scale[adapter_name] = nn.Parameter(scale)
            if hsm_rank:
                self.pat_hsm_down[adapter_name] = nn.Linear(d, hsm_rank, bias=False)  # L0, kaiming (nn default)
                self.pat_hsm_up[adapter_name] = nn.Linear(hsm_rank, d, bias=False)  # L1
                if init_weights:
                    nn.init.zeros_(self.pat_hsm_up[adapter_name].weight)
                else:
                    nn.init.normal_(self.pat_hsm_up[adapter_name].weight, std=0.02)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self._keep_adapter_float32(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _keep_adapter_float32(self, adapter_name: str) -> None:
        """Adapter weights stay float32 on half-precision bases (as PEFT's autocast_adapter_dtype does)."""
        for name in self.adapter_layer_names:
            container = getattr(self, name)
            if adapter_name not in container:
                continue
            item = container[adapter_name]
            params = [item] if isinstance(item, nn.Parameter) else list(item.parameters())
            for p in params:
                if p.dtype in (torch.float16, torch.bfloat16):
                    p.data = p.data.float()

    def _lora_shape(self) -> tuple[int, int]:
        raise NotImplementedError

    # ------------------------------------------------------------------ forward pieces
    def in_teacher_pass(self) -> bool:
        """True inside ``PATModel.teacher_pass()``: the layer computes its base layer only."""
        masks = self._pat_masks
        return masks is not None and getattr(masks, "teacher_pass", False) and not self.merged

    def has_hsm(self, adapter_name: str) -> bool:
        return adapter_name in self.pat_hsm_scale

    def hsm_gate_scale(self, adapter_name: str) -> torch.Tensor:
        """g = s ⊙ M, float32, shape (d,)."""
        return gate_scale(self.pat_hsm_scale[adapter_name], self._pat_masks[adapter_name].gate())

    def unit_gate_scale(self, adapter_name: str) -> torch.Tensor:
        """c = s ⊙ M[layer] on the input units (the per-layer axis masks' rows of this layer only), float32."""
        axes, layer = self.pat_unit_gate[adapter_name]
        scale = self.pat_unit_scale[adapter_name]
        masks = self._pat_unit_masks[adapter_name]
        return gate_scale(scale, column_gate({axis: masks[axis].gate(layer) for axis in axes}, scale.numel()))

    def _apply_hsm(self, y: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """s ⊙ M ⊙ (y + L1 L0 y), computed in the activation dtype (weights are cast, not activations).

        The low-rank form runs as one fused autograd function (:mod:`peft_pat.hsm`) that keeps only y
        and L0 y for backward; the gate g = s ⊙ M is recomputed from the shared logits on every call.
        """
        dtype = y.dtype
        gate_scale = self.hsm_gate_scale(adapter_name).to(y.device, dtype)
        if adapter_name in self.pat_hsm_down:
            down = self.pat_hsm_down[adapter_name].weight
            up = self.pat_hsm_up[adapter_name].weight
            return low_rank_hsm(y, down.to(dtype), up.to(dtype), gate_scale)
        return y * gate_scale

    def identity_loss(self, adapter_name: str) -> torch.Tensor | None:
        """mean((L0 L0^T - I_r)^2): keeps L0's rows orthonormal (official code's identity loss)."""
        if adapter_name not in self.pat_hsm_down:
            return None
        l0 = replicated(self.pat_hsm_down[adapter_name].weight).float()  # read after this layer's forward
        gram = l0 @ l0.T
        eye = torch.eye(gram.shape[0], device=gram.device)
        return ((gram - eye) ** 2).mean()

    def _lora_update(self, adapter_name: str) -> fold.LoRAUpdate | None:
        if adapter_name not in self.pat_lora_A:
            return None
        return fold.LoRAUpdate(
            self.pat_lora_A[adapter_name].weight, self.pat_lora_B[adapter_name].weight, self.pat_scaling[adapter_name]
        )

    def hsm_factors(self, adapter_name: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(L0, L1) or (None, None) for a diagonal HSM."""
        if adapter_name not in self.pat_hsm_down:
            return None, None
        return self.pat_hsm_down[adapter_name].weight, self.pat_hsm_up[adapter_name].weight

    # ------------------------------------------------------------------ merging
    def merge(
        self,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
        keep_backup: bool = True,
        in_place: bool = False,
    ) -> None:
        """Fold the adapters into the base weight at full width (pruned channels become zero rows).

        ``in_place``: write the folded weight into the base weight's own storage (no second copy of the
        matrix; the caller guarantees no other module shares that weight). Otherwise the base layer gets
        a new Parameter, so a weight tied to another module is not changed behind its back.
        """
        for adapter_name in check_adapters_to_merge(self, adapter_names):
            base = self.get_base_layer()
            if keep_backup:
                bias = base.bias.detach().clone() if getattr(base, "bias", None) is not None else None
                self._unmerge_backup[adapter_name] = (base.weight.detach().clone(), bias)
            in_place_now = in_place and not safe_merge  # safe_merge checks the result before touching the base
            with torch.no_grad():
                new_weight, new_bias = self._folded_weight(adapter_name, out=base.weight if in_place_now else None)
            if safe_merge and not torch.isfinite(new_weight).all():
                self._unmerge_backup.pop(adapter_name, None)
                raise PATStateError(f"Merging adapter '{adapter_name}' produced non-finite weights; not merged.")
            if not in_place_now:
                base.weight = nn.Parameter(new_weight.to(base.weight.dtype), requires_grad=base.weight.requires_grad)
            if new_bias is not None:
                base.bias.data = new_bias.to(base.bias.dtype)
            self.merged_adapters.append(adapter_name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            adapter_name = self.merged_adapters.pop()
            base = self.get_base_layer()
            if adapter_name not in self._unmerge_backup:
                raise PATStateError(f"Adapter '{adapter_name}' was merged without a backup and cannot be unmerged.")
            weight, bias = self._unmerge_backup.pop(adapter_name)
            base.weight.data = weight
            if bias is not None:
                base.bias.data = bias

    def _folded_weight(
        self, adapter_name: str, out: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The merged weight in the base weight's dtype, written into ``out`` if given, and the bias."""
        raise NotImplementedError

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._unmerge_backup.pop(adapter_name, None)


class PATLinear(nn.Module, PATLayer):
    """An ``nn.Linear`` with LoRA and, on producers, an HSM on its output."""

    def __init__(self, base_layer: nn.Linear, adapter_name: str, masks: nn.ModuleDict, **kwargs: Any) -> None:
        super().__init__()
        PATLayer.__init__(self, base_layer, hsm_width=base_layer.out_features)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, masks, **kwargs)

    def _lora_shape(self) -> tuple[int, int]:
        base = self.get_base_layer()
        return base.in_features, base.out_features

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.in_teacher_pass():
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        for adapter_name in self.active_adapters:
            if adapter_name in self.pat_unit_gate:  # units the mask drops reach neither W nor LoRA
                x = x * self.unit_gate_scale(adapter_name).to(x.device, x.dtype)
        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        for adapter_name in self.active_adapters:
            if adapter_name in self.pat_lora_A:
                lora_a = self.pat_lora_A[adapter_name]
                lora_b = self.pat_lora_B[adapter_name]
                dropout = self.pat_lora_dropout[adapter_name]
                h = self._cast_input_dtype(x, lora_a.weight.dtype)
                result = result + lora_b(lora_a(dropout(h))) * self.pat_scaling[adapter_name]
        result = result.to(result_dtype)
        for adapter_name in self.active_adapters:
            if adapter_name in self.pat_hsm_scale:
                result = self._apply_hsm(result, adapter_name)
        return result

    def _folded_weight(
        self, adapter_name: str, out: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        base = self.get_base_layer()
        delta = self._lora_update(adapter_name)
        if adapter_name in self.pat_unit_gate:  # (W + dW) diag(c): scale the columns of W and of A
            c = self.unit_gate_scale(adapter_name).detach()
            weight = fold.scale_columns(base.weight, c)
            if delta is not None:
                delta = fold.LoRAUpdate(delta.lora_a.float() * c.to(delta.lora_a.device), delta.lora_b, delta.scaling)
        else:
            weight = base.weight
        if not self.has_hsm(adapter_name):
            if delta is None:
                return (weight.detach().clone() if out is None else out.copy_(weight)), base.bias
            return fold.merge_lora(weight, delta, out=out), base.bias
        down, up = self.hsm_factors(adapter_name)
        gate_scale = self.hsm_gate_scale(adapter_name)
        bias = None if base.bias is None else fold.fold_bias(base.bias, down, up, gate_scale)
        return fold.fold_producer(weight, delta, down, up, gate_scale, out=out), bias

    def __repr__(self) -> str:
        return "pat." + super().__repr__()


class PATEmbedding(nn.Module, PATLayer):
    """An ``nn.Embedding`` (including Gemma's scaled embedding) with an HSM on its output."""

    def __init__(self, base_layer: nn.Embedding, adapter_name: str, masks: nn.ModuleDict, **kwargs: Any) -> None:
        super().__init__()
        PATLayer.__init__(self, base_layer, hsm_width=base_layer.embedding_dim)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, masks, **kwargs)

    def _lora_shape(self) -> tuple[int, int]:
        raise PATStateError("PAT puts no LoRA on embeddings; the embedding carries the HSM only.")

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.in_teacher_pass():
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for adapter_name in self.active_adapters:
            if adapter_name in self.pat_hsm_scale:
                result = self._apply_hsm(result, adapter_name)
        return result

    def _folded_weight(self, adapter_name: str, out: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        base = self.get_base_layer()
        down, up = self.hsm_factors(adapter_name)
        gate_scale = self.hsm_gate_scale(adapter_name)
        return fold.fold_embedding(base.weight, down, up, gate_scale, out=out), None

    def __repr__(self) -> str:
        return "pat." + super().__repr__()
