"""A decoder-only transformer LM built from lowbit layers.

Configurable to GPT-2 style (LayerNorm, GELU MLP, learned positions, biases)
and LLaMA style (RMSNorm, SwiGLU, RoPE, grouped-query attention, tied
embeddings). Every linear layer has a stable path: ``layers/{i}/attn/{q,k,v,o}_proj``,
``layers/{i}/mlp/{gate,up,down}_proj``, ``lm_head``.

>>> import jax.numpy as jnp
>>> from flax import nnx
>>> cfg = TransformerConfig.llama(vocab_size=64, d_model=32, n_layers=2, n_heads=4,
...                               n_kv_heads=2, d_ff=64, max_len=16)
>>> model = Transformer(cfg, rngs=nnx.Rngs(0))
>>> model(jnp.zeros((2, 8), jnp.int32)).shape
(2, 8, 64)
>>> sorted(p for p in lowbit.nn.quantizable_layers(model))[:3]
['layers/0/attn/k_proj', 'layers/0/attn/o_proj', 'layers/0/attn/q_proj']
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

import lowbit  # noqa: F401  (doctest namespace)
from lowbit.nn.layers import QLinear


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Shape and style of a decoder-only transformer.

  ``n_kv_heads < n_heads`` gives grouped-query attention; ``d_ff`` defaults to
  ``4 * d_model``; ``causal=False`` makes attention bidirectional (encoders,
  :class:`lowbit.nn.Encoder`).
  """

  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int | None = None
  d_ff: int | None = None
  max_len: int = 1024
  norm: Literal["layernorm", "rmsnorm"] = "layernorm"
  mlp: Literal["gelu", "swiglu"] = "gelu"
  pos: Literal["learned", "rope"] = "learned"
  rope_base: float = 10000.0
  tie_embeddings: bool = False
  use_bias: bool = True
  norm_eps: float = 1e-5
  gelu_approximate: bool = False
  causal: bool = True
  dtype: jnp.dtype | None = None
  param_dtype: jnp.dtype = jnp.float32

  def __post_init__(self):
    if self.d_model % self.n_heads:
      raise ValueError(f"d_model={self.d_model} is not a multiple of n_heads={self.n_heads}.")
    if self.kv_heads < 1 or self.n_heads % self.kv_heads:
      raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.kv_heads}.")
    for f, ok in (("norm", ("layernorm", "rmsnorm")), ("mlp", ("gelu", "swiglu")),
                  ("pos", ("learned", "rope"))):
      if getattr(self, f) not in ok:
        raise ValueError(f"TransformerConfig.{f}={getattr(self, f)!r}; use one of {ok}.")

  @property
  def kv_heads(self) -> int:
    """Key/value heads: ``n_kv_heads`` (grouped-query attention) or ``n_heads``."""
    return self.n_kv_heads or self.n_heads

  @property
  def head_dim(self) -> int:
    """``d_model / n_heads``."""
    return self.d_model // self.n_heads

  @property
  def ff(self) -> int:
    """MLP hidden width: ``d_ff`` or ``4 d_model``."""
    return self.d_ff or 4 * self.d_model

  @classmethod
  def gpt2(cls, **kw) -> "TransformerConfig":
    """GPT-2's choices (LayerNorm, GELU MLP, learned positions, biases); ``kw`` override."""
    return cls(**{**dict(norm="layernorm", mlp="gelu", pos="learned", use_bias=True), **kw})

  @classmethod
  def llama(cls, **kw) -> "TransformerConfig":
    """LLaMA's choices (RMSNorm, SwiGLU, RoPE, no biases, tied embeddings); ``kw`` override."""
    return cls(**{**dict(norm="rmsnorm", mlp="swiglu", pos="rope", use_bias=False,
                         tie_embeddings=True), **kw})


def _linear(cfg: TransformerConfig, i: int, o: int, rngs: nnx.Rngs, bias: bool | None = None,
            axes: tuple[str | None, str | None] | None = None):
  """A QLinear ``[i, o]`` whose kernel carries the logical axes ``axes`` (see lowbit.sharding)."""
  layer = QLinear(i, o, use_bias=cfg.use_bias if bias is None else bias, dtype=cfg.dtype,
                  param_dtype=cfg.param_dtype, rngs=rngs)
  layer.logical_axes = axes
  return layer


def _norm(cfg: TransformerConfig, rngs: nnx.Rngs):
  if cfg.norm == "rmsnorm":
    return nnx.RMSNorm(cfg.d_model, epsilon=cfg.norm_eps, dtype=cfg.dtype,
                       param_dtype=cfg.param_dtype, rngs=rngs)
  return nnx.LayerNorm(cfg.d_model, epsilon=cfg.norm_eps, dtype=cfg.dtype,
                       param_dtype=cfg.param_dtype, rngs=rngs)


def rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
  """Rotary embedding, LLaMA's half-split form.

  ``x [B, T, H, D]``; with ``f_i = base**(-2i/D)``, ``a = pos * f``:
  ``out = concat(x1 cos a - x2 sin a, x2 cos a + x1 sin a)`` for the halves ``x1, x2``.
  """
  d = x.shape[-1]
  freqs = base ** (-jnp.arange(0, d // 2, dtype=jnp.float32) * 2.0 / d)
  ang = positions[:, None].astype(jnp.float32) * freqs[None, :]  # [T, D/2]
  cos, sin = jnp.cos(ang)[None, :, None, :], jnp.sin(ang)[None, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


class Attention(nnx.Module):
  """Multi-head attention (causal unless ``cfg.causal=False``), grouped-query heads, optional RoPE.

  ``__call__(x [B, T, D], mask [B, T] bool | None)``: ``mask`` marks the keys
  that may be attended to (False: padding).
  """

  def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    hd = cfg.head_dim
    self.q_proj = _linear(cfg, cfg.d_model, cfg.n_heads * hd, rngs, axes=("embed", "heads"))
    self.k_proj = _linear(cfg, cfg.d_model, cfg.kv_heads * hd, rngs, axes=("embed", "kv_heads"))
    self.v_proj = _linear(cfg, cfg.d_model, cfg.kv_heads * hd, rngs, axes=("embed", "kv_heads"))
    self.o_proj = _linear(cfg, cfg.n_heads * hd, cfg.d_model, rngs, axes=("heads", "embed"))

  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    cfg = self.cfg
    b, t, _ = x.shape
    hd = cfg.head_dim
    q = self.q_proj(x).reshape(b, t, cfg.n_heads, hd)
    k = self.k_proj(x).reshape(b, t, cfg.kv_heads, hd)
    v = self.v_proj(x).reshape(b, t, cfg.kv_heads, hd)
    if cfg.pos == "rope":
      pos = jnp.arange(t)
      q, k = rope(q, pos, cfg.rope_base), rope(k, pos, cfg.rope_base)
    rep = cfg.n_heads // cfg.kv_heads
    k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32))
    s = s / jnp.sqrt(jnp.float32(hd))
    allowed = jnp.tril(jnp.ones((t, t), bool)) if cfg.causal else jnp.ones((t, t), bool)
    allowed = allowed[None, None]
    if mask is not None:
      allowed = allowed & mask[:, None, None, :].astype(bool)
    s = jnp.where(allowed, s, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bhqk,bkhd->bqhd", p, v.astype(jnp.float32)).astype(x.dtype)
    return self.o_proj(o.reshape(b, t, cfg.n_heads * hd))


class MLP(nnx.Module):
  """GELU MLP (``down(gelu(up(x)))``) or SwiGLU (``down(silu(gate(x)) * up(x))``)."""

  def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    if cfg.mlp == "swiglu":
      self.gate_proj = _linear(cfg, cfg.d_model, cfg.ff, rngs, axes=("embed", "mlp"))
    self.up_proj = _linear(cfg, cfg.d_model, cfg.ff, rngs, axes=("embed", "mlp"))
    self.down_proj = _linear(cfg, cfg.ff, cfg.d_model, rngs, axes=("mlp", "embed"))

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.cfg.mlp == "swiglu":
      h = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
    else:
      h = jax.nn.gelu(self.up_proj(x), approximate=self.cfg.gelu_approximate)
    return self.down_proj(h)


class Block(nnx.Module):
  """Pre-norm residual block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

  def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
    self.attn_norm = _norm(cfg, rngs)
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = _norm(cfg, rngs)
    self.mlp = MLP(cfg, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.attn_norm(x))
    return x + self.mlp(self.mlp_norm(x))


class Transformer(nnx.Module):
  """Decoder-only LM: ``tokens [B, T] int -> logits [B, T, vocab]``."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    init = nnx.initializers.normal(0.02)
    self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, embedding_init=init, dtype=cfg.dtype,
                           param_dtype=cfg.param_dtype, rngs=rngs)
    if cfg.pos == "learned":
      self.pos_embed = nnx.Embed(cfg.max_len, cfg.d_model, embedding_init=init, dtype=cfg.dtype,
                                 param_dtype=cfg.param_dtype, rngs=rngs)
    self.layers = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layers)])
    self.final_norm = _norm(cfg, rngs)
    if not cfg.tie_embeddings:
      self.lm_head = _linear(cfg, cfg.d_model, cfg.vocab_size, rngs, bias=False,
                             axes=("embed", "vocab"))

  def __call__(self, tokens: jax.Array) -> jax.Array:
    t = tokens.shape[-1]
    if t > self.cfg.max_len:
      raise ValueError(f"sequence length {t} exceeds max_len={self.cfg.max_len}.")
    x = self.embed(tokens)
    if self.cfg.pos == "learned":
      x = x + self.pos_embed(jnp.arange(t))[None]
    for layer in self.layers:
      x = layer(x)
    x = self.final_norm(x)
    if self.cfg.tie_embeddings:
      return self.embed.attend(x)
    return self.lm_head(x)
