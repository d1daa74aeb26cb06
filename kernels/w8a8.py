"""W8A8: int8 activations (per-token scale) x int8 weights (per-channel scale).

``out[m, n] = sx[m] * sw[n] * sum_k xq[m, k] * wq[k, n]``, the sum in int32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from lowbit.kernels import _mosaic_gpu, _pallas
from lowbit.kernels._mosaic_gpu import HopperTiles
from lowbit.kernels._pallas import BlockSizes

from lowbit.quant import QArray, dequantize


@functools.partial(jax.jit, static_argnames=("out_dtype", "block_sizes", "backend",
                                             "weight_layout"))
def w8a8_matmul(x: QArray, w: QArray, *, out_dtype: jnp.dtype = jnp.bfloat16,
                block_sizes: BlockSizes | HopperTiles | None = None,
                backend: str | None = None, weight_layout: str = "kn") -> jax.Array:
  """Pallas W8A8 matmul.

  Args:
    x: ``[M, K]`` int8 QArray, per-token scale ``[M, 1]`` (or per-tensor).
    w: ``[K, N]`` int8 QArray, per-channel scale ``[1, N]`` (or per-tensor);
      with ``weight_layout="nk"`` the weight transposed once ahead of time,
      ``w.transpose()``: ``[N, K]``, scale ``[N, 1]``.
    out_dtype: output dtype (bf16 or f32).
    block_sizes: tiles; default :func:`lowbit.kernels.default_block_sizes`
      (a :class:`HopperTiles` for ``backend="mosaic_gpu"``). With neither
      ``backend`` nor ``block_sizes``, a Hopper GPU takes the Mosaic GPU kernel
      where the measured runs put it ahead (``_mosaic_gpu.AUTO``: M >= 2048).
    backend: ``"gpu"`` (Triton), ``"tpu"`` (Mosaic), ``"interpret"``;
      ``"mosaic_gpu"`` (Hopper: TMA + wgmma, :mod:`lowbit.kernels._mosaic_gpu`)
      or ``"mosaic_gpu_interpret"`` (that kernel in jax's GPU interpreter);
      default from the platform (interpret on CPU) and the tiles' type.
    weight_layout: ``"kn"`` or ``"nk"``. Hopper's int8 tensor-core
      instructions read K-major operands, so the K-major kernels (Triton
      ``BlockSizes(k_major=True)``, the Mosaic GPU kernel) transpose a ``"kn"``
      weight per call, one XLA pass over it; an ``"nk"`` weight skips that pass
      (XLA folds the two transposes) and always takes K-major Triton tiles
      (on TPU it is transposed back).

  Returns:
    ``[M, N]`` in ``out_dtype``. M of any size (masked or padded to the block).
  """
  w = _pallas.logical_weight(w, weight_layout, "w8a8_matmul")
  if backend is None and block_sizes is None:  # large M on Hopper: the Mosaic GPU kernel
    block_sizes = _mosaic_gpu.default_tiles("w8a8", x, w, weight_layout, out_dtype)
  backend = _mosaic_gpu.select_backend("w8a8_matmul", backend, block_sizes, HopperTiles)
  xq, xs = _pallas.act_operands(x, "w8a8_matmul")
  wq, ws, group = _pallas.weight_operands(w, "w8a8_matmul", packed=False)
  if group is not None:
    raise ValueError("w8a8_matmul: grouped int8 weights are not supported; use per-channel.")
  (m, k), n = xq.shape, wq.shape[1]
  if wq.shape[0] != k:
    raise ValueError(f"w8a8_matmul: x is [{m}, {k}] but w is {w.shape}; K must match.")
  if backend in ("mosaic_gpu", "mosaic_gpu_interpret"):
    return _hopper(xq, xs, wq, ws, out_dtype=out_dtype, tiles=block_sizes or HopperTiles(),
                   interpret=backend == "mosaic_gpu_interpret")
  bs = _pallas.resolve_block_sizes("w8a8", backend, m, k, n, block_sizes, weight_layout)
  _pallas.check_block_fit("w8a8_matmul", k, n, False, None, bs, backend)
  return _pallas.run_matmul(xq, xs, wq, ws, k=k, n=n, packed=False, group=None,
                            int_dot=True, out_dtype=out_dtype, bs=bs, backend=backend,
                            name="lowbit_w8a8")


def _hopper(xq, xs, wq, ws, *, out_dtype, tiles: HopperTiles, interpret: bool) -> jax.Array:
  """The Mosaic GPU kernel on validated operands (``xq [M, K]``, ``xs [M, 1]``,
  ``wq [K, N]``, ``ws [1, N]``): scales as f32 vectors, the weight K-major, M padded."""
  if jnp.dtype(out_dtype) not in (jnp.bfloat16, jnp.float32):
    raise ValueError(f"w8a8_matmul(backend='mosaic_gpu'): out_dtype={jnp.dtype(out_dtype)}; "
                     "use bfloat16 or float32.")
  (m, k), n = xq.shape, wq.shape[1]
  _mosaic_gpu.check_fit("w8a8_matmul(backend='mosaic_gpu')", k, n, tiles, out_dtype)
  m_pad = -(-m // tiles.cta_m) * tiles.cta_m
  xs = xs[:, 0]
  if m_pad != m:
    xq = jnp.pad(xq, ((0, m_pad - m), (0, 0)))
    xs = jnp.pad(xs, (0, m_pad - m))
  wk = wq if interpret else wq.T  # K-major for the int8 wgmma: one XLA transpose per call
  out = _mosaic_gpu.w8a8_kernel(xq, xs, wk, ws[0].astype(jnp.float32), tiles=tiles,
                                out_dtype=out_dtype, interpret=interpret)
  return out[:m]


@functools.partial(jax.jit, static_argnames=("out_dtype", "weight_layout"))
def xla(x: QArray, w: QArray, *, out_dtype: jnp.dtype = jnp.bfloat16,
        weight_layout: str = "kn") -> jax.Array:
  """The XLA path: one int8 x int8 -> int32 ``dot_general``, then both scales.

  ``weight_layout`` as in :func:`w8a8_matmul`: the dot contracts the stored codes' K axis,
  the minor one of an ``"nk"`` weight, with no transpose: XLA:CPU widens an int8 dot whose
  operand is a transpose to int32 x int32 (Qwix's slow form), even one it folds away later
  (K-major, M = 1, K = N = 4096: 28 ms so, 1.4 ms on the stored axes; 2 cores, jax 0.10.2).
  K-major is XLA:CPU's fast int8 form too: ``[2, 4096] x [4096, 4096]`` took 1.1-1.5 ms
  against 3-6.7 ms ``[K, N]``.
  """
  xq, xs = _pallas.act_operands(x, "w8a8.xla")
  _, ws, _ = _pallas.weight_operands(
      _pallas.logical_weight(w, weight_layout, "w8a8.xla"), "w8a8.xla", packed=False)
  k_axis = 1 if weight_layout == "nk" else 0  # of the stored codes
  acc = lax.dot_general(_pallas.widen_single_row(xq), w.qvalue, (((1,), (k_axis,)), ((), ())),
                        preferred_element_type=jnp.int32)
  acc = acc[:xq.shape[0]]
  return (acc.astype(jnp.float32) * xs * ws.astype(jnp.float32)).astype(out_dtype)


def reference(x: QArray, w: QArray, *, out_dtype: jnp.dtype = jnp.float32) -> jax.Array:
  """Dequantize both operands to f32, ``jnp.dot`` at highest precision."""
  out = jnp.dot(dequantize(x), dequantize(w), precision=lax.Precision.HIGHEST)
  return out.astype(out_dtype)
