"""W4A16: bf16 (or f32) activations x int4 weights packed two per byte.

``out[m, n] = sum_g s[g, n] * sum_{k in g} x[m, k] * q[k, n]``: the weight is
unpacked in the kernel, each group's partial sum is scaled in f32 (per-channel:
one group spanning K).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from lowbit.kernels import _mosaic_gpu, _pallas
from lowbit.kernels._mosaic_gpu import HopperW4Tiles
from lowbit.kernels._pallas import BlockSizes

from lowbit.quant import QArray, dequantize, unpack_int4_halves


@functools.partial(jax.jit, static_argnames=("out_dtype", "block_sizes", "backend",
                                             "weight_layout"))
def w4a16_matmul(x: jax.Array, w: QArray, *, out_dtype: jnp.dtype | None = None,
                 block_sizes: BlockSizes | HopperW4Tiles | None = None,
                 backend: str | None = None, weight_layout: str = "kn") -> jax.Array:
  """Pallas W4A16 matmul.

  Args:
    x: ``[M, K]`` bf16, f16 or f32 activations (bf16 for the Mosaic GPU kernel).
    w: ``[K, N]`` int4 QArray packed along K as ``[K/2, N]`` uint8, scale
      ``[1, N]`` (per-channel) or ``[K/G, N]`` (group G, G dividing K/2);
      with ``weight_layout="nk"`` that weight transposed once ahead of time,
      ``w.transpose()`` (``[N, K/2]`` bytes), which the Mosaic GPU kernel reads
      without a per-call transpose.
    out_dtype: default ``x.dtype``.
    block_sizes, backend: as in :func:`lowbit.kernels.w8a8_matmul`; a
      :class:`HopperW4Tiles` (or ``backend="mosaic_gpu"``) selects the Hopper
      kernel of :func:`lowbit.kernels._mosaic_gpu.w4_kernel`.
    weight_layout: ``"kn"`` or ``"nk"`` (an ``"nk"`` weight takes K-major Triton tiles:
      no transpose in the call; on TPU it is transposed back).

  Returns:
    ``[M, N]`` in ``out_dtype``.
  """
  w = _pallas.logical_weight(w, weight_layout, "w4a16_matmul")
  if backend is None and block_sizes is None:
    # Hopper: the Mosaic GPU kernel where it wins (it multiplies bf16 tokens only)
    block_sizes = _mosaic_gpu.default_tiles("w4a16", x, w, weight_layout)
  backend = _mosaic_gpu.select_backend("w4a16_matmul", backend, block_sizes, HopperW4Tiles)
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"w4a16_matmul: x must be float (bf16/f32), got {x.dtype}.")
  wq, ws, group = _pallas.weight_operands(w, "w4a16_matmul", packed=True)
  (m, k), n = x.shape, w.shape[1]
  if w.shape[0] != k:
    raise ValueError(f"w4a16_matmul: x is [{m}, {k}] but w is {w.shape}; K must match.")
  if backend in ("mosaic_gpu", "mosaic_gpu_interpret"):
    return _hopper(x, wq, ws, group, out_dtype=out_dtype or x.dtype,
                   tiles=block_sizes or HopperW4Tiles(),
                   interpret=backend == "mosaic_gpu_interpret", weight_layout=weight_layout)
  bs = _pallas.resolve_block_sizes("w4a16", backend, m, k, n, block_sizes, weight_layout)
  _pallas.check_block_fit("w4a16_matmul", k, n, True, group, bs, backend)
  return _pallas.run_matmul(x, None, wq, ws, k=k, n=n, packed=True, group=group,
                            int_dot=False, out_dtype=out_dtype or x.dtype, bs=bs,
                            backend=backend, name="lowbit_w4a16")


def _hopper(x, wq, ws, group, *, out_dtype, tiles: HopperW4Tiles, interpret: bool,
            weight_layout: str) -> jax.Array:
  """The Mosaic GPU kernel (:func:`lowbit.kernels._mosaic_gpu.w4_matmul`) on validated
  operands; it multiplies in bf16, so x must be bf16 (no silent rounding of f32)."""
  name = "w4a16_matmul(backend='mosaic_gpu')"
  if x.dtype != jnp.bfloat16:
    raise ValueError(f"{name}: x is {x.dtype}; the kernel multiplies in bf16 (the int4 codes "
                     "become bf16 for wgmma). Cast x to bfloat16 or use backend='gpu'.")
  y = _mosaic_gpu.w4_matmul(x, wq, ws, group, tiles=tiles, interpret=interpret, name=name,
                            kernel_name="lowbit_w4a16_hopper", weight_layout=weight_layout,
                            out_dtype=out_dtype)
  return y.astype(out_dtype)  # a no-op for epilogue="kernel", which wrote out_dtype


def grouped_halves_dot(x: jax.Array, wq: jax.Array, ws: jax.Array, group: int | None,
                       dot_dtype: jax.typing.DTypeLike,
                       acc_dtype: jax.typing.DTypeLike) -> jax.Array:
  """``sum_g s[g] * (x_g @ q_g)`` over both packed halves, in f32: ``[M, N]``.

  ``x [M, K]``, ``wq [K/2, N]`` packed, ``ws [K/G or 1, N]``. The half-split
  layout means ``x @ q == x[:, :K/2] @ lo + x[:, K/2:] @ hi``: no interleave.
  """
  m, k = x.shape
  h = k // 2
  lo, hi = unpack_int4_halves(wq, dot_dtype)
  ws = ws.astype(jnp.float32)
  # f32 operands: full f32 products (GPUs default to TF32 otherwise).
  prec = lax.Precision.HIGHEST if jnp.dtype(dot_dtype) == jnp.float32 else None
  if group is not None and _pallas.platform() == "cpu":
    return _group_scan(x.astype(dot_dtype), jnp.concatenate([lo, hi], axis=0), ws, group,
                       acc_dtype, prec)
  xs = (x[:, :h].astype(dot_dtype), x[:, h:].astype(dot_dtype))
  if group is None:
    acc = sum(lax.dot(a, b, precision=prec, preferred_element_type=acc_dtype)
              for a, b in zip(xs, (lo, hi), strict=False))
    return acc.astype(jnp.float32) * ws
  if h % group:  # a group straddles the halves: regroup the full K axis
    q = jnp.concatenate([lo, hi], axis=0)
    g = k // group
    part = jnp.einsum("mgk,gkn->mgn", x.astype(dot_dtype).reshape(m, g, group),
                      q.reshape(g, group, -1), precision=prec, preferred_element_type=acc_dtype)
    return jnp.einsum("mgn,gn->mn", part.astype(jnp.float32), ws, precision=lax.Precision.HIGHEST)
  g = h // group
  out = 0.0
  for half, (a, b) in enumerate(zip(xs, (lo, hi), strict=False)):
    part = jnp.einsum("mgk,gkn->mgn", a.reshape(m, g, group), b.reshape(g, group, -1),
                      precision=prec, preferred_element_type=acc_dtype)
    out = out + jnp.einsum("mgn,gn->mn", part.astype(jnp.float32), ws[half * g:(half + 1) * g],
                           precision=lax.Precision.HIGHEST)
  return out


def _group_scan(x: jax.Array, q: jax.Array, ws: jax.Array, group: int, acc_dtype,
                precision) -> jax.Array:
  """``sum_g s[g] * (x_g @ q_g)`` as a loop over the groups, one 2-D dot each: ``[M, N]`` f32.

  ``x [M, K]``, ``q [K, N]`` (both in the dot's dtype), ``ws [K/G, N]`` f32. XLA:CPU runs a
  batched integer dot (``"mgk,gkn->mgn"``) on a slow generic loop: W4A8 with groups of 128
  at M = 256, K = N = 4096 took 578 ms that way and 20 ms as this loop, against 12 ms for
  one int8 dot without groups (2 cores, jax 0.10.2).
  """
  (m, k), n = x.shape, q.shape[1]
  g = k // group
  xg = x.reshape(m, g, group).transpose(1, 0, 2)  # [G, M, group]

  def step(acc, operands):
    xt, qt, st = operands
    part = lax.dot(xt, qt, precision=precision, preferred_element_type=acc_dtype)
    return acc + part.astype(jnp.float32) * st, None

  acc, _ = lax.scan(step, jnp.zeros((m, n), jnp.float32),
                    (xg, q.reshape(g, group, n), ws[:, None, :]))
  return acc


@functools.partial(jax.jit, static_argnames=("out_dtype",))
def xla(x: jax.Array, w: QArray, *, out_dtype: jnp.dtype | None = None) -> jax.Array:
  """The XLA path: unpack the halves to ``x.dtype``, two dots, scales in f32."""
  wq, ws, group = _pallas.weight_operands(w, "w4a16.xla", packed=True)
  if group is not None and _pallas.platform() == "cpu":
    # XLA:CPU runs one large dot far faster than K/G small batched ones: scale
    # the codes per group first (exact in f32 for bf16 / f16 scales; one f32 rounding,
    # 2^-24 relative, for f32 scales), then a single dot.
    return _pallas.dequant_dot(x, w).astype(out_dtype or x.dtype)
  out = grouped_halves_dot(x, wq, ws, group, _pallas.float_dot_dtype(x.dtype), jnp.float32)
  return out.astype(out_dtype or x.dtype)


def reference(x: jax.Array, w: QArray, *, out_dtype: jnp.dtype | None = None) -> jax.Array:
  """Dequantize the weight to f32, ``jnp.dot`` at highest precision."""
  out = jnp.dot(x.astype(jnp.float32), dequantize(w), precision=lax.Precision.HIGHEST)
  return out.astype(out_dtype or x.dtype)
