"""int4 packing: two signed 4-bit codes per byte, half-split along one axis.

Layout (see ``../shared/KERNELS.md``): for codes ``q`` of length ``K`` along
``axis``, byte ``j`` (``0 <= j < K/2``) holds ``q[j]`` in its low nibble and
``q[j + K/2]`` in its high nibble. A matmul kernel then reads one tile of
packed bytes and gets two contiguous K-slices of the weight, with no
interleave or transpose: ``x @ w == x[:, :K/2] @ lo + x[:, K/2:] @ hi``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def pack_int4(q: jax.typing.ArrayLike, axis: int = 0) -> jax.Array:
  """Pack signed 4-bit codes two per byte along ``axis`` (half-split layout).

  ``packed[j] = (q[j] & 0xF) | (q[j + K/2] & 0xF) << 4`` along ``axis``.

  Args:
    q: ``[..., K, ...]`` integer codes in ``[-8, 7]`` (int8 or wider).
    axis: the axis packed; its length ``K`` must be even.

  Returns:
    ``[..., K/2, ...]`` uint8: exactly 0.5 byte per code.

  Raises:
    ValueError: ``q`` is not an integer array, or ``K`` is odd.

  >>> import jax.numpy as jnp
  >>> p = pack_int4(jnp.array([1, -2, 7, -8], jnp.int8))
  >>> p.dtype, p.shape
  (dtype('uint8'), (2,))
  >>> unpack_int4(p).tolist()
  [1, -2, 7, -8]
  """
  q = jnp.asarray(q)
  if not jnp.issubdtype(q.dtype, jnp.integer):
    raise ValueError(
        f"pack_int4: q has dtype {q.dtype}; it takes integer codes in [-8, 7]. "
        "Quantize first (lowbit.quant.quantize).")
  axis = _norm_axis(axis, q.ndim, "pack_int4")
  k = q.shape[axis]
  if k % 2:
    raise ValueError(
        f"pack_int4: axis {axis} of q (shape {q.shape}) has odd length {k}; "
        "pad it to an even length before packing.")
  lo, hi = jnp.split(q.astype(jnp.int32), 2, axis=axis)
  return ((lo & 0xF) | ((hi & 0xF) << 4)).astype(jnp.uint8)


def unpack_int4(packed: jax.typing.ArrayLike, axis: int = 0,
                dtype: jnp.dtype = jnp.int8) -> jax.Array:
  """Inverse of :func:`pack_int4`: ``[..., K/2, ...]`` uint8 -> ``[..., K, ...]`` codes.

  ``lo = (p << 28) >> 28`` and ``hi = (p << 24) >> 28`` in int32 (arithmetic
  shifts sign-extend each nibble), then ``concat([lo, hi], axis)``.
  """
  p = jnp.asarray(packed)
  if p.dtype != jnp.uint8:
    raise ValueError(
        f"unpack_int4: packed has dtype {p.dtype}; expected uint8 from pack_int4.")
  axis = _norm_axis(axis, p.ndim, "unpack_int4")
  lo, hi = unpack_int4_halves(p, dtype)
  return jnp.concatenate([lo, hi], axis=axis)


def unpack_int4_halves(packed: jax.Array, dtype: jnp.dtype = jnp.int8
                       ) -> tuple[jax.Array, jax.Array]:
  """The two halves ``(q[:K/2], q[K/2:])`` of a packed array, same shape as ``packed``.

  The int32 widening before the shifts is deliberate: int8 shifts do not
  legalize on Mosaic TPU, and int32 shifts are free on every backend.
  """
  w = packed.astype(jnp.int32)
  lo = lax.shift_right_arithmetic(lax.shift_left(w, 28), 28)
  hi = lax.shift_right_arithmetic(lax.shift_left(w, 24), 28)
  return lo.astype(dtype), hi.astype(dtype)


def _norm_axis(axis: int, ndim: int, who: str) -> int:
  if not -ndim <= axis < ndim:
    raise ValueError(f"{who}: axis={axis} is out of range for an array of rank {ndim}.")
  return axis % ndim
