"""Ideal cost of a decoder-only transformer from its config's shapes alone (what pruning can buy).

Notation, every one read from the config: L layers (``num_hidden_layers``), d hidden width
(``hidden_size``), H_q query heads and H_kv key-value heads (``num_attention_heads``,
``num_key_value_heads``) of size h (``head_dim``, read from the config: a pruned model pins it, so
``d != H_q h`` in general), I intermediate size (``intermediate_size``), V vocab. Each axis PAT or a
post-hoc cut shrinks (hidden, MLP width, query heads, KV heads) enters only through these numbers.

Multiply-accumulates (MACs) per token and layer of the linears, which is also their weight count:

    linear = d (H_q h) + 2 d (H_kv h) + (H_q h) d + 3 d I          q, k, v, o, gate, up, down

Parameters (Llama layout: Llama, Mistral, SmolLM2; ``attention_bias`` adds the q, k, v, o biases,
``mlp_bias`` the gate, up, down ones; a tied lm_head has no weight of its own):

    L (linear + biases + 2 d)  +  d  +  V d (1 + untied)
       layers, 2 norm gains     final norm   embedding, lm_head

**Prefill** (time to the first token: one forward over B x T prompt tokens with a KV cache and
logits for the last position only, ``logits_to_keep=1``), FLOPs = 2 MACs:

    2 B T L linear  +  2 B L (2 H_q h) T (T + 1) / 2  +  2 B d V
    linears            attention core QK^T and AV     lm_head on the last position
                       (causal; ``causal=False``: T^2, what a kernel that computes the full score
                       matrix does)

**Decode** (one new token per sequence with a KV cache of length c), bytes moved per step:

    bytes(dtype) * ( L (linear + biases + 2 d) + d + d V  +  B d  +  KV(B, c)  +  KV(B, 1) )
                    every weight read once, lm_head incl.  embed rows  cache read  cache write

    KV(B, c) = 2 L B c H_kv h       the KV cache: keys and values of every layer

Hidden-width pruning shrinks every term linear in d and leaves the attention core (H_q h) and the KV
cache (H_kv h) as they are; an MLP cut shrinks the 3 d I term; head cuts shrink the attention core
(H_q) and the KV cache (H_kv). Element-wise work (norms, SiLU * up over I, rotary, softmax over the
heads) is in no count here. The ideal speed-up of a pruned model is cost(dense) / cost(pruned);
efficiency = measured speed-up / ideal speed-up.
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
    tied: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False

    @classmethod
    def from_config(cls, config) -> DecoderShape:
        """The shape of a transformers config (or any object with its attributes). ``head_dim`` is the config's;
        only a config without one (a dense model) gets transformers' own default ``hidden_size // heads``."""
        heads, hidden = int(config.num_attention_heads), int(config.hidden_size)
        head_dim = getattr(config, "head_dim", None)
        if head_dim is None:
            if hidden % heads:
                raise ValueError(
                    f"config has hidden_size={hidden}, num_attention_heads={heads} and no head_dim: the head size "
                    "is not hidden_size / heads for a pruned width; set head_dim in the config (merge_and_prune() "
                    "and prune_model() write it)"
                )
            head_dim = hidden // heads
        kv_heads = getattr(config, "num_key_value_heads", None)
        return cls(
            layers=int(config.num_hidden_layers),
            hidden=hidden,
            heads=heads,
            kv_heads=int(kv_heads if kv_heads is not None else heads),
            head_dim=int(head_dim),
            intermediate=int(config.intermediate_size),
            vocab=int(config.vocab_size),
            tied=bool(getattr(config, "tie_word_embeddings", False)),
            attention_bias=bool(getattr(config, "attention_bias", False)),
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
        )

    @property
    def linear_macs_per_token(self) -> int:
        """MACs of one layer's seven linears for one token (also their weight count)."""
        d, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return d * q + 2 * d * kv + q * d + 3 * d * self.intermediate

    @property
    def layer_parameters(self) -> int:
        """Parameters of one decoder layer: the linears' weights and biases, two norm gains."""
        d, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        biases = (q + 2 * kv + d if self.attention_bias else 0) + (2 * self.intermediate + d if self.mlp_bias else 0)
        return self.linear_macs_per_token + biases + 2 * d

    @property
    def weights_read_per_step(self) -> int:
        """Values of the weights one decode step reads: every layer, the final norm and the lm_head (the
        embedding table only through its B looked-up rows, counted apart)."""
        return self.layers * self.layer_parameters + self.hidden + self.hidden * self.vocab

    @property
    def parameters(self) -> int:
        """Parameter count of the model (``sum(p.numel() for p in model.parameters())``)."""
        return self.weights_read_per_step + (0 if self.tied else self.vocab * self.hidden)

    def kv_cache_values(self, batch: int, context: int) -> int:
        """Values held by the KV cache of ``batch`` sequences of ``context`` tokens: 2 L B c H_kv h."""
        return 2 * self.layers * batch * context * self.kv_heads * self.head_dim

    def kv_cache_bytes(self, batch: int, context: int, bytes_per_value: int) -> int:
        return self.kv_cache_values(batch, context) * bytes_per_value

    def prefill_flops(self, batch: int, tokens: int, causal: bool = True) -> float:
        linears = 2 * batch * tokens * self.layers * self.linear_macs_per_token
        scores = tokens * (tokens + 1) / 2 if causal else tokens * tokens
        attention = 2 * batch * self.layers * 2 * self.heads * self.head_dim * scores
        lm_head = 2 * batch * self.hidden * self.vocab
        return float(linears + attention + lm_head)

    def decode_bytes(self, batch: int, context: int, new_tokens: int, bytes_per_value: int) -> float:
        """Bytes moved by ``new_tokens`` decode steps after a prompt of ``context`` tokens."""
        total = 0.0
        for step in range(new_tokens):
            total += self.weights_read_per_step + batch * self.hidden
            total += self.kv_cache_values(batch, context + step) + self.kv_cache_values(batch, 1)
        return total * bytes_per_value
