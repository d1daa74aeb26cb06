"""W8A8: int8 activations (per-token scale) x int8 weights (per-channel scale).

``out[m, n] = sx[m] * sw[n] * sum_k xq[m, k] * wq[k, n]``, the sum in int32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from lowbit.kernels import _pallas
from lowbit.kernels._pallas import BlockSizes

from lowbit.quant import QArray, dequantize


@functools.partial(jax.jit, static_argnames=("out_dtype", "block_sizes", "backend"))
def w8a8_matmul(x: QArray, w: QArray, *, out_dtype: jnp.dtype = jnp.bfloat16,
                block_sizes: BlockSizes | None = None, backend: str | None = None) -> jax.Array:
  """Pallas W8A8 matmul.

  Args:
    x: ``[M, K]`` int8 QArray, per-token scale ``[M, 1]`` (or per-tensor).
    w: ``[K, N]`` int8 QArray, per-channel scale ``[1, N]`` (or per-tensor).
    out_dtype: output dtype (bf16 or f32).
    block_sizes: tiles; default :func:`lowbit.kernels.default_block_sizes`.
    backend: ``"gpu"`` (Triton), ``"tpu"`` (Mosaic), ``"interpret"``; default
      from the platform (interpret on CPU).

  Returns:
    ``[M, N]`` in ``out_dtype``. M of any size (padded to the block).
  """
  backend = _pallas.resolve_backend(backend)
  xq, xs = _pallas.act_operands(x, "w8a8_matmul")
  wq, ws, group = _pallas.weight_operands(w, "w8a8_matmul", packed=False)
  if group is not None:
    raise ValueError("w8a8_matmul: grouped int8 weights are not supported; use per-channel.")
  (m, k), n = xq.shape, wq.shape[1]
  if wq.shape[0] != k:
    raise ValueError(f"w8a8_matmul: x is [{m}, {k}] but w is {w.shape}; K must match.")
  bs = block_sizes or _pallas.default_block_sizes("w8a8", backend, m, k, n)
  _pallas.check_block_fit("w8a8_matmul", k, n, False, None, bs, backend)
  return _pallas.run_matmul(xq, xs, wq, ws, k=k, n=n, packed=False, group=None,
                            int_dot=True, out_dtype=out_dtype, bs=bs, backend=backend,
                            name="lowbit_w8a8")


@functools.partial(jax.jit, static_argnames=("out_dtype",))
def xla(x: QArray, w: QArray, *, out_dtype: jnp.dtype = jnp.bfloat16) -> jax.Array:
  """The XLA path: one int8 x int8 -> int32 ``dot_general``, then both scales."""
  xq, xs = _pallas.act_operands(x, "w8a8.xla")
  wq, ws, group = _pallas.weight_operands(w, "w8a8.xla", packed=False)
  acc = lax.dot(xq, wq, preferred_element_type=jnp.int32)
  return (acc.astype(jnp.float32) * xs * ws.astype(jnp.float32)).astype(out_dtype)


def reference(x: QArray, w: QArray, *, out_dtype: jnp.dtype = jnp.float32) -> jax.Array:
  """Dequantize both operands to f32, ``jnp.dot`` at highest precision."""
  out = jnp.dot(dequantize(x), dequantize(w), precision=lax.Precision.HIGHEST)
  return out.astype(out_dtype)
