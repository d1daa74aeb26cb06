"""`QArray`: quantized values with their scale, as a pytree."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lowbit.quant import packing


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QArray:
  """A quantized tensor.

  Invariant (elementwise, for the logical shape ``shape``)::

      x ~= (q - zero_point) * broadcast(scale)              # zero_point_form "integer"
      x ~= (q - qmin) * broadcast(scale) + broadcast(zero_point)   # "min"
      x ~= (q * broadcast(scale)) * broadcast(channel_scale)      # integer group scales

  where ``q`` are the signed integer codes (``unpack_int4(qvalue)`` when
  ``packed``), ``zero_point`` is 0 when absent, and ``broadcast`` repeats each
  scale entry over the axes it is shared along: every axis not in
  ``channel_axes``, and ``group_size`` consecutive elements of ``group_axis``.
  :func:`lowbit.quant.dequantize` computes the right-hand side.

  Leaves (arrays): ``qvalue``, ``scale``, ``zero_point``, ``channel_scale``.

  * ``qvalue``: ``shape`` int8 codes, or when ``packed``, uint8 with
    ``shape[pack_axis] // 2`` along ``pack_axis`` (0.5 byte per code).
  * ``scale``: float, of rank ``len(shape)``: ``shape[a]`` on a channel axis,
    ``shape[group_axis] // group_size`` on the group axis, 1 elsewhere.
  * ``zero_point``: like ``scale``: a float holding an integer code in the
    ``"integer"`` form, the float minimum ``m`` of each scale entry's range in
    the ``"min"`` form (``qmin = -2**(bits-1)``); ``None`` for symmetric
    quantization.
  * ``channel_scale``: ``None``, or with integer group scales
    (``QuantSpec(group_scales="int")``) the float scale of each channel, shaped like
    ``scale`` with 1 on the group axis; ``scale`` then holds int8 integers in
    ``[1, 16]`` and ``q * scale`` is an int8 value (symmetric only).

  Static metadata: ``bits``, ``shape``, ``channel_axes``, ``group_axis``,
  ``group_size``, ``pack_axis`` (``None`` when not packed), ``zero_point_form``.
  """

  qvalue: jax.Array
  scale: jax.Array
  zero_point: jax.Array | None
  bits: int = dataclasses.field(metadata=dict(static=True))
  shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
  channel_axes: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
  group_axis: int | None = dataclasses.field(default=None, metadata=dict(static=True))
  group_size: int | None = dataclasses.field(default=None, metadata=dict(static=True))
  pack_axis: int | None = dataclasses.field(default=None, metadata=dict(static=True))
  zero_point_form: str = dataclasses.field(default="integer", metadata=dict(static=True))
  channel_scale: jax.Array | None = None

  @property
  def packed(self) -> bool:
    """Whether ``qvalue`` holds two int4 codes a byte (halves of ``pack_axis``)."""
    return self.pack_axis is not None

  @property
  def symmetric(self) -> bool:
    """Whether there is no zero point: ``dequantize = codes * scale``."""
    return self.zero_point is None

  @property
  def ndim(self) -> int:
    """Rank of the logical (unpacked) ``shape``."""
    return len(self.shape)

  @property
  def codes(self) -> jax.Array:
    """The int8 codes in the logical ``shape`` (unpacked if needed)."""
    if self.packed:
      return packing.unpack_int4(self.qvalue, self.pack_axis)
    return self.qvalue

  @property
  def nbytes(self) -> int:
    """True bytes held: values (packed where packed) + scales + zero points (+ channel scales)."""
    n = _nbytes(self.qvalue) + _nbytes(self.scale)
    for a in (self.zero_point, self.channel_scale):
      if a is not None:
        n += _nbytes(a)
    return n

  @property
  def bytes_per_element(self) -> float:
    """``nbytes / prod(shape)``: 0.5 plus the scales' share for packed int4."""
    return self.nbytes / int(np.prod(self.shape))

  def transpose(self) -> QArray:
    """The 2-D QArray of ``x^T``: ``dequantize(q.transpose()) == dequantize(q).T``.

    Values, scales and zero points are transposed (one copy each) and the axis
    metadata swapped; a weight ``[K, N]`` with per-channel scales ``[1, N]``
    becomes ``[N, K]`` with scales ``[N, 1]`` (``channel_axes=(0,)``). Packed
    values stay packed along the same logical axis. Kernels that read the
    weight K-major take this form (``w8a8_matmul(..., weight_layout="nk")``).
    """
    if self.ndim != 2:
      raise ValueError(f"QArray.transpose: needs a 2-D QArray, got shape {self.shape}.")
    swap = {0: 1, 1: 0}
    t = lambda a: None if a is None else a.T  # noqa: E731
    return dataclasses.replace(
        self, qvalue=self.qvalue.T, scale=self.scale.T, zero_point=t(self.zero_point),
        channel_scale=t(self.channel_scale),
        shape=self.shape[::-1], channel_axes=tuple(sorted(swap[a] for a in self.channel_axes)),
        group_axis=None if self.group_axis is None else swap[self.group_axis],
        pack_axis=None if self.pack_axis is None else swap[self.pack_axis])

  def as_matrix(self) -> QArray:
    """The 2-D QArray ``[shape[0], prod(shape[1:])]`` of a weight contracted along axis 0:
    ``dequantize(q.as_matrix()) == dequantize(q).reshape(shape[0], -1)``.

    Needs groups and packing (if any) along axis 0. Scales and zero points shared over
    some trailing axes are repeated over them first (per-column after the reshape), so a
    ``[K, H, D]`` kernel with ``channel_axes=(1, 2)`` or ``(2,)`` becomes ``[K, H*D]`` with
    ``channel_axes=(1,)``; a per-tensor one stays per-tensor. Values are reshaped, not copied.
    """
    if self.ndim < 2:
      raise ValueError(f"QArray.as_matrix: needs 2 or more axes, got shape {self.shape}.")
    if 0 in self.channel_axes or self.group_axis not in (None, 0) or self.pack_axis not in (None, 0):
      raise ValueError(
          f"QArray.as_matrix: groups (axis {self.group_axis}) and packing (axis "
          f"{self.pack_axis}) must be along axis 0, the contraction axis, and the scales "
          f"shared along it (channel_axes={self.channel_axes}).")
    if self.ndim == 2:
      return self
    cols = int(np.prod(self.shape[1:]))
    per_col = bool(self.channel_axes)

    def flat(a):
      if a is None:
        return None
      if per_col:
        a = jnp.broadcast_to(a, (a.shape[0], *self.shape[1:]))
      return a.reshape(a.shape[0], cols if per_col else 1)

    return dataclasses.replace(
        self, qvalue=self.qvalue.reshape(self.qvalue.shape[0], cols), scale=flat(self.scale),
        zero_point=flat(self.zero_point), channel_scale=flat(self.channel_scale),
        shape=(self.shape[0], cols),
        channel_axes=(1,) if per_col else ())


def _nbytes(a) -> int:
  return int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize
