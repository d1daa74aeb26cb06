"""W4A8: int8 activations (per-token scale) x int4-packed weights.

The weight is unpacked to int8 in the kernel and multiplied int8 x int8 ->
int32: ``out[m, n] = sx[m] * sum_g sw[g, n] * sum_{k in g} xq[m, k] * q[k, n]``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from lowbit.kernels import _mosaic_gpu, _pallas
from lowbit.kernels._mosaic_gpu import HopperW4Tiles
from lowbit.kernels._pallas import BlockSizes
from lowbit.kernels.w4a16 import (
    cpu_halves_dot,
    cpu_takes_loop,
    grouped_halves_dot,
    int_scaled_halves_dot,
)

from lowbit.quant import QArray, dequantize


@functools.partial(jax.jit, static_argnames=("out_dtype", "block_sizes", "backend",
                                             "weight_layout"))
def w4a8_matmul(x: QArray, w: QArray, *, out_dtype: jnp.dtype = jnp.bfloat16,
                block_sizes: BlockSizes | HopperW4Tiles | None = None,
                backend: str | None = None, weight_layout: str = "kn") -> jax.Array:
  """Pallas W4A8 matmul.

  Args:
    x: ``[M, K]`` int8 QArray with per-token scale ``[M, 1]``.
    w: ``[K, N]`` int4 QArray packed along K, per-channel or grouped scale;
      with ``weight_layout="nk"``, ``w.transpose()`` (see
      :func:`lowbit.kernels.w4a16_matmul`).
    out_dtype, block_sizes, backend: as in :func:`lowbit.kernels.w8a8_matmul`;
      a :class:`HopperW4Tiles` selects the Mosaic GPU kernel (the codes become
      int8 in registers for an int8 ``wgmma``; exact int32 group sums).
    weight_layout: ``"kn"`` or ``"nk"``, as in :func:`lowbit.kernels.w4a16_matmul`.

  Returns:
    ``[M, N]`` in ``out_dtype``.

  A weight with integer group scales (``QuantSpec(group_scales="int")``): the Mosaic GPU
  kernel multiplies the codes by their scales in registers and sums all of K in int32;
  the Triton and TPU kernels take it as float group scales ``s`` (exact), the output times
  the channel scales (:func:`_int_scales`).
  """
  if isinstance(w, QArray) and w.channel_scale is not None:
    return _int_scales(x, w, out_dtype=out_dtype, block_sizes=block_sizes, backend=backend,
                       weight_layout=weight_layout)
  w = _pallas.logical_weight(w, weight_layout, "w4a8_matmul")
  if backend is None and block_sizes is None:  # Hopper: the Mosaic GPU kernel where it wins
    block_sizes = _mosaic_gpu.default_tiles("w4a8", x, w, weight_layout)
  backend = _mosaic_gpu.select_backend("w4a8_matmul", backend, block_sizes, HopperW4Tiles)
  xq, xs = _pallas.act_operands(x, "w4a8_matmul")
  wq, ws, group = _pallas.weight_operands(w, "w4a8_matmul", packed=True)
  (m, k), n = xq.shape, w.shape[1]
  if w.shape[0] != k:
    raise ValueError(f"w4a8_matmul: x is [{m}, {k}] but w is {w.shape}; K must match.")
  if backend in ("mosaic_gpu", "mosaic_gpu_interpret"):
    y = _mosaic_gpu.w4_matmul(xq, wq, ws, group, tiles=block_sizes or HopperW4Tiles(),
                              interpret=backend == "mosaic_gpu_interpret",
                              name="w4a8_matmul(backend='mosaic_gpu')",
                              kernel_name="lowbit_w4a8_hopper", weight_layout=weight_layout,
                              out_dtype=out_dtype, token_scale=xs)
    return y.astype(out_dtype)  # a no-op for epilogue="kernel", which wrote out_dtype
  bs = _pallas.resolve_block_sizes("w4a8", backend, m, k, n, block_sizes, weight_layout)
  _pallas.check_block_fit("w4a8_matmul", k, n, True, group, bs, backend)
  return _pallas.run_matmul(xq, xs, wq, ws, k=k, n=n, packed=True, group=group,
                            int_dot=True, out_dtype=out_dtype, bs=bs, backend=backend,
                            name="lowbit_w4a8")


def _int_scales(x: QArray, w: QArray, *, out_dtype, block_sizes, backend,
                weight_layout: str) -> jax.Array:
  """:func:`w4a8_matmul` for a weight with integer group scales. The Mosaic GPU kernel
  takes them as they are (codes times their scale in registers, all of K summed in int32,
  one scale per token and channel: ``_mosaic_gpu.w4_matmul(channel_scale=...)``); the
  Triton and TPU kernels take the float-group-scale form (the scales exact in f32, the
  output times the channel scales, :func:`lowbit.kernels._pallas.split_channel_scale`)."""
  stripped, c = _pallas.split_channel_scale(w, weight_layout)
  logical = _pallas.logical_weight(stripped, weight_layout, "w4a8_matmul")
  if backend is None and block_sizes is None:
    block_sizes = _mosaic_gpu.default_tiles("w4a8", x, logical, weight_layout)
  chosen = _mosaic_gpu.select_backend("w4a8_matmul", backend, block_sizes, HopperW4Tiles)
  if chosen not in ("mosaic_gpu", "mosaic_gpu_interpret"):
    y = w4a8_matmul(x, stripped, out_dtype=jnp.float32, block_sizes=block_sizes,
                    backend=backend, weight_layout=weight_layout)
    return (y * c).astype(out_dtype)
  xq, xs = _pallas.act_operands(x, "w4a8_matmul")
  wq, _, group = _pallas.weight_operands(logical, "w4a8_matmul", packed=True)
  if logical.shape[0] != xq.shape[1]:
    raise ValueError(f"w4a8_matmul: x is {xq.shape} but w is {logical.shape}; K must match.")
  s = _pallas.logical_weight(w, weight_layout, "w4a8_matmul").scale  # int8 [K/G, N]
  y = _mosaic_gpu.w4_matmul(xq, wq, s, group, tiles=block_sizes or HopperW4Tiles(),
                            interpret=chosen == "mosaic_gpu_interpret",
                            name="w4a8_matmul(backend='mosaic_gpu')",
                            kernel_name="lowbit_w4a8_hopper", weight_layout=weight_layout,
                            out_dtype=out_dtype, token_scale=xs, channel_scale=c)
  return y.astype(out_dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype", "weight_layout"))
def xla(x: QArray, w: QArray, *, out_dtype: jnp.dtype = jnp.bfloat16,
        weight_layout: str = "kn") -> jax.Array:
  """The XLA path: unpack int4 to int8, int8 x int8 -> int32 dots, scales in f32.

  ``out[m, n] = sx[m] * sum_g s[g, n] * sum_{k in g} x[m, k] * q[k, n]``; grouped weights
  take one int32 dot per group. ``weight_layout`` as in :func:`w4a8_matmul`. On CPU a loop
  over slices of the packed weight (:func:`lowbit.kernels.w4a16.cpu_halves_dot`: 2-D int8
  dots, which XLA:CPU runs far faster than one batched integer dot), one token padded to
  two rows. (Qwix and AQT lower W4A8 to an int32 x int32 dot, 2.7-3.2x slower than float
  on CPU; the int8 dot is what makes W4A8 pay there.)

  Integer group scales (``QuantSpec(group_scales="int")``): ``out[m, n] = sx[m] * c[n] *
  sum_k x[m, k] * (q[k, n] * s[k // G, n])``, the codes times their group's integer scale
  in int8 (exact), all of K summed in int32 (:func:`lowbit.kernels.w4a16.int_scaled_halves_dot`;
  on CPU the same loop, ``int_scales=True``), one f32 scale per token and channel.
  """
  xq, xs = _pallas.act_operands(x, "w4a8.xla")
  if w.channel_scale is not None:
    return _int_scales_xla(xq, xs, w, weight_layout).astype(out_dtype)
  wq, ws, group = _pallas.weight_operands(
      _pallas.logical_weight(w, weight_layout, "w4a8.xla"), "w4a8.xla", packed=True)
  xw = _pallas.widen_single_row(xq)
  if _pallas.platform() == "cpu" and cpu_takes_loop(xq.shape[1], group):
    out = cpu_halves_dot(xw, w.qvalue, ws, group, k_major=weight_layout == "nk",
                         dot_dtype=jnp.int8, acc_dtype=jnp.int32)
  else:
    out = grouped_halves_dot(xw, wq, ws, group, jnp.int8, jnp.int32)
  return (out[:xq.shape[0]] * xs).astype(out_dtype)


def _int_scales_xla(xq: jax.Array, xs: jax.Array, w: QArray, weight_layout: str) -> jax.Array:
  """:func:`xla` for a weight with integer group scales: f32 ``[M, N]``."""
  logical = _pallas.logical_weight(w, weight_layout, "w4a8.xla")
  stripped, c = _pallas.split_channel_scale(logical)
  wq, _, group = _pallas.weight_operands(stripped, "w4a8.xla", packed=True)
  s = logical.scale  # int8 [K/G, N]
  xw = _pallas.widen_single_row(xq)
  if _pallas.platform() == "cpu" and cpu_takes_loop(xq.shape[1], group):
    acc = cpu_halves_dot(xw, w.qvalue, s, group, k_major=weight_layout == "nk",
                         dot_dtype=jnp.int8, acc_dtype=jnp.int32, int_scales=True)
  else:
    acc = int_scaled_halves_dot(xw, wq, s, group).astype(jnp.float32)
  return acc[:xq.shape[0]] * xs * c


def reference(x: QArray, w: QArray, *, out_dtype: jnp.dtype = jnp.float32) -> jax.Array:
  """Dequantize both operands to f32, ``jnp.dot`` at highest precision."""
  out = jnp.dot(dequantize(x), dequantize(w), precision=lax.Precision.HIGHEST)
  return out.astype(out_dtype)
