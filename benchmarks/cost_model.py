"""Ideal cost of a decoder-only transformer, from its shapes alone (what hidden-width pruning can buy).

Notation: L layers, d hidden width (the residual stream PAT prunes), H_q / H_kv query / key-value
heads of size h (unchanged by hidden pruning: ``head_dim`` is pinned), I intermediate size, V vocab.

Multiply-accumulates (MACs) per token and layer of the linears:

    linear = d (H_q h) + 2 d (H_kv h) + (H_q h) d + 3 d I          q, k, v, o, gate, up, down

**Prefill** (time to the first token: one forward over B x T prompt tokens with a KV cache and
logits for the last position only, ``logits_to_keep=1``), FLOPs = 2 MACs:

    2 B T L linear  +  2 B L (2 H_q h) T (T + 1) / 2  +  2 B d V
    linears            attention core QK^T and AV     lm_head on the last position
                       (causal; independent of d)

**Decode** (one new token per sequence with a KV cache of length c), bytes moved per step:

    bytes(dtype) * ( L linear  +  d V  +  (2 L + 1) d  +  B d  +  2 L B c H_kv h  +  2 L B H_kv h )
                    linear weights lm_head  norm gains   embed rows  KV cache read  KV cache write

Both are linear in d except the attention core and the KV cache, which hidden-width pruning does
not shrink (a head's q·k and softmax work is per head_dim, which PAT keeps), and the element-wise
work that scales with I or the heads (SiLU * up, rotary, softmax), which no FLOP count here includes.
The ideal speed-up of a pruned model is cost(dense) / cost(pruned); efficiency = measured speed-up /
ideal speed-up.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DecoderShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def from_config(cls, config) -> DecoderShape:
        heads = int(config.num_attention_heads)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            layers=int(config.num_hidden_layers),
            hidden=int(config.hidden_size),
            heads=heads,
            kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            head_dim=int(head_dim),
            intermediate=int(config.intermediate_size),
            vocab=int(config.vocab_size),
        )

    @property
    def linear_macs_per_token(self) -> int:
        """MACs of one layer's seven linears for one token (also their parameter count)."""
        d, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return d * q + 2 * d * kv + q * d + 3 * d * self.intermediate

    def prefill_flops(self, batch: int, tokens: int) -> float:
        linears = 2 * batch * tokens * self.layers * self.linear_macs_per_token
        attention = 2 * batch * self.layers * 2 * self.heads * self.head_dim * tokens * (tokens + 1) / 2
        lm_head = 2 * batch * self.hidden * self.vocab
        return float(linears + attention + lm_head)

    def decode_bytes(self, batch: int, context: int, new_tokens: int, bytes_per_value: int) -> float:
        """Bytes moved by ``new_tokens`` decode steps after a prompt of ``context`` tokens."""
        kv_row = 2 * self.layers * batch * self.kv_heads * self.head_dim
        weights = self.layers * self.linear_macs_per_token + self.hidden * self.vocab
        weights += (2 * self.layers + 1) * self.hidden
        total = 0.0
        for step in range(new_tokens):
            total += weights + batch * self.hidden + kv_row * (context + step) + kv_row
        return total * bytes_per_value
