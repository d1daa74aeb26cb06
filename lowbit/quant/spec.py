"""`QuantSpec`: the frozen description of how a tensor is quantized.

A spec says *what* to do (bits, symmetry, which axes keep their own scale,
group size, calibration, rounding); it holds no arrays. Everything that needs a
tensor's shape is checked by :meth:`QuantSpec.resolve`, which returns the
concrete, validated :class:`Layout` used by the array functions.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax.numpy as jnp
import numpy as np

Calibration = Literal["absmax", "percentile", "mse"]
Rounding = Literal["nearest", "stochastic"]
ZeroPointForm = Literal["integer", "min"]
GroupScales = Literal["float", "int"]

_CALIBRATIONS = ("absmax", "percentile", "mse")
_ROUNDINGS = ("nearest", "stochastic")
_ZERO_POINT_FORMS = ("integer", "min")
_GROUP_SCALES = ("float", "int")
#: The largest integer group scale of ``QuantSpec(group_scales="int")``: codes times it stay
#: in int8 (``8 * 16 = 128``: ``-7 * 16 = -112``), and ``(q + 8) * s`` in a byte.
INT_GROUP_SCALE_MAX = 16


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """How to quantize one tensor.

  Codes are always signed integers in ``[qmin, qmax]``:

  * symmetric: ``qmin = -(2**(bits-1) - 1)``, ``qmax = 2**(bits-1) - 1``
    (the restricted range, so ``+absmax`` and ``-absmax`` both have a code);
    no zero point.
  * asymmetric: ``qmin = -2**(bits-1)``, ``qmax = 2**(bits-1) - 1`` and a zero
    point, in one of two forms (``zero_point_form``):

    - ``"integer"``: ``x ~= (q - z) * scale`` with ``z`` an integer code, so
      that 0 has an exact code (the range is widened to hold 0);
    - ``"min"``: ``x ~= (q - qmin) * scale + m`` with ``m`` the float minimum
      of the clipping range ("scale and min", as in GGUF Q4_1 and AWQ); the
      range is not widened, and a tensor already on such a grid re-quantizes
      bit-exactly when ``scale_dtype`` holds the grid's scale exactly (fp16
      for GGUF: XLA computes ``range / 15`` as ``range * (1/15)``, which can
      be 1 ulp off in f32).

  Attributes:
    bits: code width, 2..8.
    symmetric: symmetric (no zero point) or asymmetric (with zero point).
    channel_axes: axes that keep their own scale (per-channel). ``()`` with no
      ``group_size`` is per-tensor. Negative axes count from the end.
    group_size: if set, the ``group_axis`` is cut into groups of this many
      elements, each with its own scale (per-group). Must divide that axis.
    group_axis: the axis grouped by ``group_size``; for a weight ``[K, N]`` it
      is the contraction axis ``0``.
    ragged: allow a ``group_size`` that does not divide the group axis; the
      last group is then shorter (``K = 576`` with groups of 128: four of 128
      and one of 64). Off by default, so a size that does not divide is an
      error rather than a surprise.
    calibration: how the clipping range is chosen: ``"absmax"`` (the largest
      magnitude), ``"percentile"`` (the ``percentile``-th percentile of the
      magnitudes, or of the values for asymmetric), or ``"mse"`` (the clip
      ratio in ``mse_grid`` that minimizes ``sum((x - dq(q(x)))**2)`` for each
      scale entry).
    percentile: for ``calibration="percentile"``, in (0, 100].
    mse_grid: for ``calibration="mse"``, the number of clip ratios tried,
      evenly spaced in ``[mse_min_ratio, 1]``.
    mse_min_ratio: smallest clip ratio tried by the MSE search.
    rounding: ``"nearest"`` (half to even) or ``"stochastic"`` (needs a PRNG
      key at quantize time).
    zero_point_form: ``"integer"`` or ``"min"`` (asymmetric specs only).
    scale_dtype: dtype scales and zero points are stored in.
    pack: store codes of ``bits <= 4`` packed two per byte along
      ``pack_axis`` (see :func:`lowbit.quant.pack_int4`).
    pack_axis: the axis packed; the contraction axis for weights.
    group_scales: ``"float"`` (each group's own float scale) or ``"int"``: QServe's
      progressive group quantization (Lin et al. 2024, arXiv 2405.04532), two levels
      of scale: a float ``channel_scale`` ``c`` shared by all groups of a channel and an
      integer group scale ``s`` in ``[1, INT_GROUP_SCALE_MAX]`` (stored int8), so that
      ``x ~= (q * s) * c`` with ``q * s`` an int8 value. An int8-activation kernel then
      sums all of K in int32 and scales once per channel instead of once per group
      (:func:`lowbit.kernels.w4a8_matmul`). Calibration picks each group's float scale
      ``d`` as usual, then ``c = max_g d / INT_GROUP_SCALE_MAX`` per channel and
      ``s = clip(round(d / c), 1, INT_GROUP_SCALE_MAX)`` (``calibration="mse"``: the
      better of ``floor`` and ``ceil``). Needs ``symmetric``, ``bits <= 4`` and a
      ``group_size``.
  """

  bits: int = 8
  symmetric: bool = True
  channel_axes: tuple[int, ...] = ()
  group_size: int | None = None
  group_axis: int = 0
  ragged: bool = False
  calibration: Calibration = "absmax"
  percentile: float = 99.9
  mse_grid: int = 64
  mse_min_ratio: float = 0.25
  rounding: Rounding = "nearest"
  zero_point_form: ZeroPointForm = "integer"
  scale_dtype: jnp.dtype = jnp.float32
  pack: bool = False
  pack_axis: int = 0
  group_scales: GroupScales = "float"

  def __post_init__(self):
    if not isinstance(self.bits, (int, np.integer)) or not 2 <= self.bits <= 8:
      raise ValueError(
          f"QuantSpec.bits={self.bits!r} is out of range: lowbit quantizes to "
          "2..8 bits; pass an integer in [2, 8].")
    object.__setattr__(self, "channel_axes", tuple(int(a) for a in self.channel_axes))
    if len(set(self.channel_axes)) != len(self.channel_axes):
      raise ValueError(
          f"QuantSpec.channel_axes={self.channel_axes} repeats an axis; list "
          "each axis once.")
    if self.group_size is not None and (
        not isinstance(self.group_size, (int, np.integer)) or self.group_size < 1):
      raise ValueError(
          f"QuantSpec.group_size={self.group_size!r} must be a positive integer "
          "or None (no grouping).")
    if self.calibration not in _CALIBRATIONS:
      raise ValueError(
          f"QuantSpec.calibration={self.calibration!r} is unknown; use one of "
          f"{_CALIBRATIONS}.")
    if self.rounding not in _ROUNDINGS:
      raise ValueError(
          f"QuantSpec.rounding={self.rounding!r} is unknown; use one of "
          f"{_ROUNDINGS}.")
    if self.zero_point_form not in _ZERO_POINT_FORMS:
      raise ValueError(
          f"QuantSpec.zero_point_form={self.zero_point_form!r} is unknown; use one of "
          f"{_ZERO_POINT_FORMS}.")
    if self.symmetric and self.zero_point_form != "integer":
      raise ValueError(
          f"QuantSpec(symmetric=True, zero_point_form={self.zero_point_form!r}): a symmetric "
          "spec has no zero point; set symmetric=False for the 'min' form.")
    if not 0.0 < self.percentile <= 100.0:
      raise ValueError(
          f"QuantSpec.percentile={self.percentile!r} must be in (0, 100].")
    if self.mse_grid < 1 or not 0.0 < self.mse_min_ratio <= 1.0:
      raise ValueError(
          f"QuantSpec mse_grid={self.mse_grid}, mse_min_ratio={self.mse_min_ratio}: "
          "need mse_grid >= 1 and 0 < mse_min_ratio <= 1.")
    if self.pack and self.bits > 4:
      raise ValueError(
          f"QuantSpec(pack=True, bits={self.bits}): only codes of 4 bits or "
          "fewer fit two per byte; set pack=False or bits<=4.")
    if self.group_scales not in _GROUP_SCALES:
      raise ValueError(
          f"QuantSpec.group_scales={self.group_scales!r} is unknown; use one of "
          f"{_GROUP_SCALES}.")
    if self.group_scales == "int" and (
        not self.symmetric or self.bits > 4 or self.group_size is None):
      raise ValueError(
          f"QuantSpec(group_scales='int', symmetric={self.symmetric}, bits={self.bits}, "
          f"group_size={self.group_size}): integer group scales keep q * s in int8 for "
          "symmetric codes of 4 bits or fewer in groups; set symmetric=True, bits<=4 and a "
          "group_size, or group_scales='float'.")
    dt = jnp.dtype(self.scale_dtype)
    if not jnp.issubdtype(dt, jnp.floating):
      raise ValueError(
          f"QuantSpec.scale_dtype={dt} must be a float dtype (float32, bfloat16, float16).")
    object.__setattr__(self, "scale_dtype", dt)

  @property
  def qmin(self) -> int:
    """Smallest code: ``-(2**(bits-1) - 1)`` symmetric, ``-2**(bits-1)`` asymmetric."""
    return -(2 ** (self.bits - 1) - 1) if self.symmetric else -(2 ** (self.bits - 1))

  @property
  def qmax(self) -> int:
    """Largest code: ``2**(bits-1) - 1``."""
    return 2 ** (self.bits - 1) - 1

  def resolve(self, shape: tuple[int, ...], name: str = "x") -> "Layout":
    """Check this spec against a tensor shape; return its concrete :class:`Layout`.

    Raises:
      ValueError: an axis out of range, a group size that does not divide its
        axis, a group axis that is also a channel axis, or packing an
        odd-length axis. The message names the argument, the value and the fix.
    """
    ndim = len(shape)

    def norm(axis: int, what: str) -> int:
      if not -ndim <= axis < ndim:
        raise ValueError(
            f"QuantSpec.{what}={axis} is out of range for {name} of shape "
            f"{tuple(shape)} (ndim={ndim}); use an axis in [{-ndim}, {ndim - 1}].")
      return axis % ndim

    channel_axes = tuple(sorted(norm(a, "channel_axes") for a in self.channel_axes))
    group_axis = None
    if self.group_size is not None:
      group_axis = norm(self.group_axis, "group_axis")
      if group_axis in channel_axes:
        raise ValueError(
            f"QuantSpec: axis {group_axis} of {name} is both grouped and in "
            f"channel_axes={self.channel_axes}; an axis is either per-channel or "
            "per-group, not both.")
      if shape[group_axis] % self.group_size and not self.ragged:
        raise ValueError(
            f"QuantSpec.group_size={self.group_size} does not divide axis "
            f"{group_axis} of {name} (shape {tuple(shape)}, size "
            f"{shape[group_axis]}); pick a group size that divides "
            f"{shape[group_axis]}, or set ragged=True for a shorter last group.")
    pack_axis = None
    if self.pack:
      pack_axis = norm(self.pack_axis, "pack_axis")
      if shape[pack_axis] % 2:
        raise ValueError(
            f"QuantSpec(pack=True): axis {pack_axis} of {name} has odd length "
            f"{shape[pack_axis]} (shape {tuple(shape)}); int4 packing stores two "
            "codes per byte along that axis, so pad it to an even length or set "
            "pack=False.")
    return Layout(tuple(int(d) for d in shape), channel_axes, group_axis,
                  self.group_size if group_axis is not None else None, pack_axis)


@dataclasses.dataclass(frozen=True)
class Layout:
  """A spec resolved against a shape: which axes the scale varies along.

  ``scale_shape`` has the tensor's rank: the size of a channel axis,
  ``ceil(size / group_size)`` on the group axis, and 1 elsewhere. Broadcasting
  a scale to the tensor means repeating each entry ``group_size`` times along
  the group axis (the last group is shorter when the spec is ``ragged``; the
  blocked view pads it to full length by repeating its last element, which
  leaves its min, max and absmax unchanged, and the padding is cut off again).
  """

  shape: tuple[int, ...]
  channel_axes: tuple[int, ...]
  group_axis: int | None
  group_size: int | None
  pack_axis: int | None

  @property
  def scale_shape(self) -> tuple[int, ...]:
    """Shape of the scales: ``shape[a]`` on channel axes, ``ceil(shape[a] / group_size)``
    on the group axis, 1 elsewhere (broadcast against :attr:`block_shape`'s groups)."""
    out = []
    for a, d in enumerate(self.shape):
      if a in self.channel_axes:
        out.append(d)
      elif a == self.group_axis:
        out.append(-(-d // self.group_size))
      else:
        out.append(1)
    return tuple(out)

  @property
  def channel_scale_shape(self) -> tuple[int, ...]:
    """Shape of the channel scale of integer group scales (``group_scales="int"``):
    :attr:`scale_shape` with 1 on the group axis."""
    return tuple(1 if a == self.group_axis else d for a, d in enumerate(self.scale_shape))

  @property
  def block_shape(self) -> tuple[int, ...]:
    """The tensor's shape with the group axis split into ``(n_groups, group_size)``."""
    if self.group_axis is None:
      return self.shape
    a = self.group_axis
    return self.shape[:a] + (-(-self.shape[a] // self.group_size), self.group_size) + self.shape[a + 1:]

  @property
  def group_pad(self) -> int:
    """Elements added to the group axis to make the last group full (0 unless ragged)."""
    if self.group_axis is None:
      return 0
    return -self.shape[self.group_axis] % self.group_size

  @property
  def elements_per_scale(self) -> int:
    """Tensor elements sharing one scale: ``prod(shape) / prod(scale_shape)``."""
    return int(np.prod(self.shape)) // int(np.prod(self.scale_shape))
