"""A bidirectional transformer encoder (BERT family) built from lowbit layers.

Post-LayerNorm blocks, ``x = LN(x + attn(x)); x = LN(x + mlp(x))``, a GELU
MLP, learned positions and token-type embeddings with a LayerNorm on their
sum. Linear layers have the decoder's paths (``layers/{i}/attn/{q,k,v,o}_proj``,
``layers/{i}/mlp/{up,down}_proj``), so the same precision policies apply.

>>> import jax.numpy as jnp
>>> from flax import nnx
>>> cfg = EncoderConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, d_ff=64)
>>> enc = Encoder(cfg, rngs=nnx.Rngs(0))
>>> tokens, mask = jnp.ones((2, 7), jnp.int32), jnp.ones((2, 7), bool)
>>> enc(tokens, mask).shape
(2, 7, 32)
>>> e = sentence_embedding(enc(tokens, mask), mask)
>>> e.shape, bool(jnp.allclose(jnp.linalg.norm(e, axis=-1), 1.0, atol=1e-5))
((2, 32), True)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from lowbit.nn.transformer import MLP, Attention, TransformerConfig


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """Shape of a BERT-style encoder (defaults: BERT's LayerNorm eps and exact GELU)."""

  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  d_ff: int | None = None
  max_len: int = 512
  type_vocab_size: int = 2
  norm_eps: float = 1e-12
  gelu_approximate: bool = False
  dtype: jnp.dtype | None = None
  param_dtype: jnp.dtype = jnp.float32

  def block_config(self) -> TransformerConfig:
    """The :class:`TransformerConfig` of one block: bidirectional, LayerNorm, GELU, biases."""
    return TransformerConfig.gpt2(
        vocab_size=self.vocab_size, d_model=self.d_model, n_layers=self.n_layers,
        n_heads=self.n_heads, d_ff=self.d_ff, max_len=self.max_len, norm_eps=self.norm_eps,
        gelu_approximate=self.gelu_approximate, causal=False, dtype=self.dtype,
        param_dtype=self.param_dtype)


def _layernorm(cfg: EncoderConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(cfg.d_model, epsilon=cfg.norm_eps, dtype=cfg.dtype,
                       param_dtype=cfg.param_dtype, rngs=rngs)


class EncoderBlock(nnx.Module):
  """Post-norm block: ``x = attn_norm(x + attn(x)); x = mlp_norm(x + mlp(x))``."""

  def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
    bc = cfg.block_config()
    self.attn = Attention(bc, rngs)
    self.attn_norm = _layernorm(cfg, rngs)
    self.mlp = MLP(bc, rngs)
    self.mlp_norm = _layernorm(cfg, rngs)

  def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    x = self.attn_norm(x + self.attn(x, mask))
    return self.mlp_norm(x + self.mlp(x))


class Encoder(nnx.Module):
  """``tokens [B, T] int, mask [B, T] bool, token_types [B, T] int -> hidden [B, T, D]``."""

  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    init = nnx.initializers.normal(0.02)
    kw = dict(embedding_init=init, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, **kw)
    self.pos_embed = nnx.Embed(cfg.max_len, cfg.d_model, **kw)
    self.type_embed = nnx.Embed(cfg.type_vocab_size, cfg.d_model, **kw)
    self.embed_norm = _layernorm(cfg, rngs)
    self.layers = nnx.List([EncoderBlock(cfg, rngs) for _ in range(cfg.n_layers)])

  def __call__(self, tokens: jax.Array, mask: jax.Array | None = None,
               token_types: jax.Array | None = None) -> jax.Array:
    t = tokens.shape[-1]
    if t > self.cfg.max_len:
      raise ValueError(f"sequence length {t} exceeds max_len={self.cfg.max_len}; truncate it.")
    types = jnp.zeros_like(tokens) if token_types is None else token_types
    x = self.embed(tokens) + self.pos_embed(jnp.arange(t))[None] + self.type_embed(types)
    x = self.embed_norm(x)
    for layer in self.layers:
      x = layer(x, mask)
    return x


def sentence_embedding(hidden: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean pooling over the mask, then L2 normalization (sentence-transformers' recipe).

  ``e = normalize(sum_t m_t h_t / max(sum_t m_t, 1e-9))``; shapes ``hidden
  [B, T, D]``, ``mask [B, T]`` -> ``[B, D]`` (f32).
  """
  m = mask.astype(jnp.float32)[..., None]
  pooled = (hidden.astype(jnp.float32) * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)
  return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
