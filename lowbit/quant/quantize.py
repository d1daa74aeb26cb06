"""Calibration, quantization and dequantization: pure array functions."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from lowbit.quant import packing

try:  # jax.core.Tracer is public on 0.10 and 0.11; keep a fallback for later moves.
  from jax.core import Tracer as _Tracer
except ImportError:  # pragma: no cover
  from jax._src.core import Tracer as _Tracer
from lowbit.quant.qarray import QArray
from lowbit.quant.spec import INT_GROUP_SCALE_MAX, Layout, QuantSpec


class QuantParams(NamedTuple):
  """Scale and zero point of a quantizer, shaped like ``Layout.scale_shape``.

  ``zero_point`` is ``None`` for symmetric specs. ``channel_scale``: with
  ``QuantSpec(group_scales="int")`` the float scale of each channel (``scale_shape``
  with 1 on the group axis), ``scale`` then the int8 group scales in
  ``[1, INT_GROUP_SCALE_MAX]``; ``None`` otherwise.
  """

  scale: jax.Array
  zero_point: jax.Array | None = None
  channel_scale: jax.Array | None = None


def effective_scale(scale: jax.Array, channel_scale: jax.Array | None) -> jax.Array:
  """Each group's float scale in f32: ``scale * channel_scale`` with integer group
  scales (``channel_scale`` broadcast over the group axis), else ``scale``. Shapes:
  ``scale_shape`` in and out."""
  s = scale.astype(jnp.float32)
  return s if channel_scale is None else s * channel_scale.astype(jnp.float32)


# ----------------------------------------------------------------------------
# Blocked views: the tensor laid out so scale entries broadcast against it.


def to_blocks(x: jax.Array, layout: Layout) -> jax.Array:
  """Reshape ``x`` so that a scale of ``expand_scale`` shape broadcasts to it.

  A ragged last group is padded by repeating the axis' last element.
  """
  if layout.group_pad:
    pad = [(0, 0)] * x.ndim
    pad[layout.group_axis] = (0, layout.group_pad)
    x = jnp.pad(x, pad, mode="edge")
  return x.reshape(layout.block_shape)


def from_blocks(xb: jax.Array, layout: Layout) -> jax.Array:
  """Inverse of :func:`to_blocks`: back to ``layout.shape`` (padding cut off)."""
  if not layout.group_pad:
    return xb.reshape(layout.shape)
  a = layout.group_axis
  full = layout.shape[:a] + (layout.shape[a] + layout.group_pad,) + layout.shape[a + 1:]
  return lax.slice_in_dim(xb.reshape(full), 0, layout.shape[a], axis=a)


def expand_scale(s: jax.Array, layout: Layout) -> jax.Array:
  """A ``scale_shape`` array made broadcastable against ``to_blocks(x)``."""
  if layout.group_axis is None:
    return s
  return jnp.expand_dims(s, layout.group_axis + 1)


def _reduce_axes(layout: Layout) -> tuple[int, ...]:
  """Axes of the blocked view that one scale entry is shared over."""
  keep = set()
  for a in layout.channel_axes:
    keep.add(a if layout.group_axis is None or a < layout.group_axis else a + 1)
  if layout.group_axis is not None:
    keep.add(layout.group_axis)
  nb = len(layout.block_shape)
  return tuple(a for a in range(nb) if a not in keep)


def _reduce(fn, xb: jax.Array, layout: Layout) -> jax.Array:
  return fn(xb, axis=_reduce_axes(layout), keepdims=True)


def _to_scale_shape(stat: jax.Array, layout: Layout) -> jax.Array:
  return stat.reshape(layout.scale_shape)


# ----------------------------------------------------------------------------
# Calibration


def _range_to_params(lo: jax.Array, hi: jax.Array, spec: QuantSpec) -> QuantParams:
  """Scale (and zero point) from a clipping range; f32 in, ``scale_dtype`` out.

  symmetric:  ``s = max(|lo|, |hi|) / qmax``;
  asymmetric, integer zero point: ``s = (hi - lo) / (qmax - qmin)``,
  ``z = qmin - round(lo / s)`` with the range widened to hold 0, so that 0 has
  an exact code; asymmetric, min form: the same ``s`` and ``z = lo`` (the range
  is not widened). A zero range gives ``s = 1`` (finite; such entries
  dequantize to 0, or to ``lo`` in the min form).
  """
  if spec.symmetric:
    amax = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
    s = jnp.where(amax == 0, 1.0, amax / spec.qmax)  # NaN stays NaN
    return QuantParams(s.astype(spec.scale_dtype), None)
  if spec.zero_point_form == "min":
    rng = hi - lo
    s = jnp.where(rng == 0, 1.0, rng / (spec.qmax - spec.qmin)).astype(spec.scale_dtype)
    return QuantParams(s, lo.astype(spec.scale_dtype))
  lo = jnp.minimum(lo, 0.0)
  hi = jnp.maximum(hi, 0.0)
  rng = hi - lo
  s = jnp.where(rng == 0, 1.0, rng / (spec.qmax - spec.qmin)).astype(spec.scale_dtype)
  z = spec.qmin - jnp.round(lo / s.astype(jnp.float32))
  return QuantParams(s, z.astype(spec.scale_dtype))


def _stat_range(xb: jax.Array, layout: Layout, spec: QuantSpec):
  """Clipping range before any search: absmax or percentile bounds (blocked, keepdims)."""
  if spec.calibration == "percentile" and spec.percentile < 100.0:
    axes = _reduce_axes(layout)
    if spec.symmetric:
      hi = jnp.percentile(jnp.abs(xb), spec.percentile, axis=axes, keepdims=True)
      return -hi, hi
    lo = jnp.percentile(xb, 100.0 - spec.percentile, axis=axes, keepdims=True)
    hi = jnp.percentile(xb, spec.percentile, axis=axes, keepdims=True)
    return lo, hi
  if spec.symmetric:
    hi = _reduce(jnp.max, jnp.abs(xb), layout)
    return -hi, hi
  return _reduce(jnp.min, xb, layout), _reduce(jnp.max, xb, layout)


def _fake_quant_blocked(xb, s, z, spec: QuantSpec):
  """``dq(q(x))`` on blocked, broadcastable arrays (f32), in the spec's zero-point form."""
  s = s.astype(jnp.float32)
  if z is not None and spec.zero_point_form == "min":
    m = z.astype(jnp.float32)
    u = jnp.clip(jnp.round((xb - m) / s), 0, spec.qmax - spec.qmin)
    return u * s + m
  zf = 0.0 if z is None else z.astype(jnp.float32)
  q = jnp.clip(jnp.round(xb / s) + zf, spec.qmin, spec.qmax)
  return (q - zf) * s


def code_zero_point(scale: jax.Array, zero_point: jax.Array | None, bits: int,
                    form: str) -> jax.Array | None:
  """The zero point in code units, ``z_code`` with ``x ~= (q - z_code) * s``.

  ``"integer"`` form: ``z`` itself; ``"min"`` form: ``qmin - m / s`` (a float).
  Shapes: like ``scale``. Used by code that works on ``(q - z) * s``: fake
  quantization, GPTQ, matmul epilogues.
  """
  if zero_point is None or form == "integer":
    return zero_point
  qmin = -(2 ** (bits - 1))
  return qmin - zero_point.astype(jnp.float32) / scale.astype(jnp.float32)


def calibrate(x: jax.typing.ArrayLike, spec: QuantSpec) -> QuantParams:
  """Choose scale (and zero point) for ``x`` under ``spec``.

  With ``lo, hi`` the clipping range of each scale entry's elements:

  * ``absmax``: ``hi = max|x|`` (symmetric) or ``lo, hi = min x, max x``;
  * ``percentile``: the ``p``-th percentile of ``|x|`` (symmetric), or the
    ``(100-p)``-th and ``p``-th percentiles of ``x``;
  * ``mse``: ``r* = argmin_r sum((x - fq(x; r lo, r hi))**2)`` over the grid
    ``r in linspace(mse_min_ratio, 1, mse_grid)``, chosen per scale entry,
    starting from the absmax range.

  then the scale of :func:`_range_to_params`; with ``group_scales="int"`` those group
  scales split into a channel scale and integer group scales (:func:`_int_group_scales`).
  Shapes: ``x`` any, result ``Layout.scale_shape`` (and the channel scale with 1 on the
  group axis).
  """
  x = jnp.asarray(x)
  layout = spec.resolve(x.shape)
  return _calibrate_jit(x, spec, layout)


def _calibrate(x: jax.Array, spec: QuantSpec, layout: Layout) -> QuantParams:
  xb = to_blocks(x.astype(jnp.float32), layout)
  lo, hi = _stat_range(xb, layout, spec)
  if spec.calibration == "mse":
    ratios = jnp.linspace(spec.mse_min_ratio, 1.0, spec.mse_grid, dtype=jnp.float32)

    def err_at(r):
      p = _range_to_params(lo * r, hi * r, spec)
      d = xb - _fake_quant_blocked(xb, p.scale, p.zero_point, spec)
      return _reduce(jnp.sum, d * d, layout)

    def body(i, carry):
      best_err, best_r = carry
      r = ratios[i]
      e = err_at(r)
      better = e < best_err
      return jnp.where(better, e, best_err), jnp.where(better, r, best_r)

    init = (err_at(jnp.float32(1.0)), jnp.ones_like(lo))
    _, best_r = lax.fori_loop(0, spec.mse_grid, body, init)
    lo, hi = lo * best_r, hi * best_r
  p = _range_to_params(lo, hi, spec)
  if spec.group_scales == "int":  # symmetric: lo = -hi; an all-zero group has hi = 0
    return _int_group_scales(xb, p.scale.astype(jnp.float32), hi > 0, spec, layout)
  return QuantParams(_to_scale_shape(p.scale, layout),
                     None if p.zero_point is None else _to_scale_shape(p.zero_point, layout))


def _int_group_scales(xb: jax.Array, d: jax.Array, nonzero: jax.Array, spec: QuantSpec,
                      layout: Layout) -> QuantParams:
  """Two levels from the float group scales ``d`` (blocked, broadcastable to ``xb``).

  ``c = max_g d / S`` per channel over its groups with a nonzero range (``nonzero``;
  an all-zero group's placeholder scale 1 must not set ``c``; an all-zero channel takes
  ``c = 1 / S``), ``S = INT_GROUP_SCALE_MAX``, rounded to ``scale_dtype``;
  ``s = clip(round(d / c), 1, S)``; with ``calibration="mse"`` the better of
  ``floor(d / c)`` and ``floor(d / c) + 1`` (clipped to ``[1, S]``) by each group's
  squared error. Returns int8 ``s`` and ``c`` in ``scale_dtype``.
  """
  ga = layout.group_axis  # the groups' axis in the blocked view
  dmax = jnp.max(jnp.where(nonzero, d, 0.0), axis=ga, keepdims=True)
  c = (jnp.where(dmax > 0, dmax, 1.0) / INT_GROUP_SCALE_MAX).astype(spec.scale_dtype)
  cf = c.astype(jnp.float32)
  r = d / cf
  if spec.calibration == "mse":
    lo = jnp.clip(jnp.floor(r), 1, INT_GROUP_SCALE_MAX)
    hi = jnp.clip(lo + 1, 1, INT_GROUP_SCALE_MAX)

    def err(si):
      e = xb - _fake_quant_blocked(xb, si * cf, None, spec)
      return _reduce(jnp.sum, e * e, layout)
    si = jnp.where(err(hi) < err(lo), hi, lo)
  else:
    si = jnp.clip(jnp.round(r), 1, INT_GROUP_SCALE_MAX)
  return QuantParams(_to_scale_shape(si.astype(jnp.int8), layout), None,
                     c.reshape(layout.channel_scale_shape))


# The eager entry points run one compiled program per (shape, spec) instead of
# op by op: eagerly, every primitive compiles on its own for each new shape
# (about 1.3 s for one asymmetric packed int4 quantize on a 2-core CPU, 0.1 s
# jitted), and the numbers are those a jitted caller gets.
_calibrate_jit = jax.jit(_calibrate, static_argnames=("spec", "layout"))


# ----------------------------------------------------------------------------
# Quantize / dequantize


@jax.jit
def _all_finite(x: jax.Array) -> jax.Array:
  return jnp.all(jnp.isfinite(x))


def _check_input(x: jax.Array, who: str) -> None:
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(
        f"{who}: x has dtype {x.dtype}; quantize takes a float array "
        "(float32, bfloat16, float16). Cast integer data to float first.")
  if not isinstance(x, _Tracer):
    if not bool(_all_finite(x)):
      n_bad = int(jnp.sum(~jnp.isfinite(x)))
      raise ValueError(
          f"{who}: x (shape {x.shape}) holds {n_bad} NaN/Inf value(s); a scale "
          "computed from it would be NaN/Inf. Find where they come from, or "
          "replace them (jnp.nan_to_num) before quantizing.")


def quantize(x: jax.typing.ArrayLike, spec: QuantSpec,
             params: QuantParams | None = None, *,
             key: jax.Array | None = None) -> QArray:
  """Quantize ``x`` to a :class:`QArray`.

  ``q = clip(round(x / s) + z, qmin, qmax)`` with ``s, z`` broadcast as in the
  ``QArray`` invariant; ``round`` is to-nearest-even, or stochastic
  ``floor(x / s + u)``, ``u ~ U[0, 1)`` drawn from ``key``.

  Args:
    x: float array of any shape.
    spec: the :class:`QuantSpec`.
    params: scale / zero point to use; default :func:`calibrate` ``(x, spec)``.
    key: PRNG key, required when ``spec.rounding == "stochastic"``.

  Returns:
    A :class:`QArray` of logical shape ``x.shape``; int8 codes, or uint8
    packed two per byte along ``spec.pack_axis`` when ``spec.pack``.

  Eager calls refuse NaN/Inf in ``x`` with a ``ValueError``. Under ``jit`` the
  values are not inspected (no host sync): a NaN makes its scale entry NaN and
  its codes undefined, so check inputs before jitting conversion code. Either
  way the codes come from one compiled program per shape and spec, so eager and
  jitted calls give the same codes.
  """
  x = jnp.asarray(x)
  _check_input(x, "quantize")
  layout = spec.resolve(x.shape)
  if spec.rounding == "stochastic" and key is None:
    raise ValueError(
        "quantize: spec.rounding='stochastic' needs an explicit PRNG key: "
        "quantize(x, spec, key=jax.random.key(0)).")
  if params is not None:
    _check_params(params, spec, layout)
  qvalue, params = _quantize(x, params, key, spec, layout)
  return QArray(qvalue=qvalue, scale=params.scale, zero_point=params.zero_point,
                bits=spec.bits, shape=layout.shape, channel_axes=layout.channel_axes,
                group_axis=layout.group_axis, group_size=layout.group_size,
                pack_axis=layout.pack_axis,
                zero_point_form="integer" if spec.symmetric else spec.zero_point_form,
                channel_scale=params.channel_scale)


def _check_params(params: QuantParams, spec: QuantSpec, layout: Layout) -> None:
  if tuple(params.scale.shape) != layout.scale_shape:
    raise ValueError(
        f"quantize: params.scale has shape {tuple(params.scale.shape)}, but this "
        f"spec on shape {layout.shape} needs {layout.scale_shape}; compute it "
        "with calibrate(x, spec).")
  if spec.symmetric != (params.zero_point is None):
    raise ValueError(
        f"quantize: spec.symmetric={spec.symmetric} but params.zero_point is "
        f"{'None' if params.zero_point is None else 'set'}; symmetric specs take "
        "no zero point, asymmetric ones need one.")
  if spec.group_scales == "int":
    cshape = layout.channel_scale_shape
    c = params.channel_scale
    if c is None or tuple(c.shape) != cshape or params.scale.dtype != jnp.int8:
      raise ValueError(
          f"quantize: QuantSpec(group_scales='int') takes params with int8 group scales "
          f"{layout.scale_shape} and a channel_scale {cshape}; got scale "
          f"{params.scale.dtype}{tuple(params.scale.shape)}, channel_scale "
          f"{None if c is None else tuple(c.shape)}. Compute them with calibrate(x, spec).")
  elif params.channel_scale is not None:
    raise ValueError(
        "quantize: params has a channel_scale but the spec has float group scales; pass "
        "QuantSpec(group_scales='int') or params without channel_scale.")


@functools.partial(jax.jit, static_argnames=("spec", "layout"))
def _quantize(x: jax.Array, params: QuantParams | None, key: jax.Array | None, spec: QuantSpec,
              layout: Layout) -> tuple[jax.Array, QuantParams]:
  """Codes (packed when the layout packs) and the params they were computed with."""
  if params is None:
    params = _calibrate(x, spec, layout)
  q = _codes(x, params, spec, layout, key)
  if layout.pack_axis is not None:
    q = packing.pack_int4(q, layout.pack_axis)
  return q, params


def _codes(x, params: QuantParams, spec: QuantSpec, layout: Layout, key) -> jax.Array:
  xb = to_blocks(x.astype(jnp.float32), layout)
  s = expand_scale(effective_scale(params.scale, params.channel_scale), layout)
  min_form = params.zero_point is not None and spec.zero_point_form == "min"
  if min_form:  # q = round((x - m) / s) + qmin
    xb = xb - expand_scale(params.zero_point.astype(jnp.float32), layout)
  v = xb / s
  if spec.rounding == "stochastic":
    v = jnp.floor(v + jax.random.uniform(key, v.shape, jnp.float32))
  else:
    v = jnp.round(v)
  if min_form:
    v = v + spec.qmin
  elif params.zero_point is not None:
    v = v + expand_scale(params.zero_point.astype(jnp.float32), layout)
  q = jnp.clip(v, spec.qmin, spec.qmax).astype(jnp.int8)
  return from_blocks(q, layout)


@functools.partial(jax.jit, static_argnames="dtype")
def dequantize(qa: QArray, dtype: jnp.dtype = jnp.float32) -> jax.Array:
  """``(q - zero_point) * broadcast(scale)``, computed in f32, cast to ``dtype``.

  In the ``"min"`` zero-point form: ``(q - qmin) * broadcast(scale) +
  broadcast(zero_point)``; with integer group scales ``(q * broadcast(scale)) *
  broadcast(channel_scale)`` (``q * scale`` exact). Shapes: ``qa.shape`` out.
  """
  layout = Layout(qa.shape, qa.channel_axes, qa.group_axis, qa.group_size, qa.pack_axis)
  q = to_blocks(qa.codes.astype(jnp.float32), layout)
  if qa.channel_scale is not None:
    out = (q * expand_scale(qa.scale.astype(jnp.float32), layout)) * expand_scale(
        qa.channel_scale.astype(jnp.float32), layout)
    return from_blocks(out, layout).astype(dtype)
  if qa.zero_point is not None and qa.zero_point_form == "min":
    u = q + float(2 ** (qa.bits - 1))
    out = u * expand_scale(qa.scale.astype(jnp.float32), layout) + expand_scale(
        qa.zero_point.astype(jnp.float32), layout)
    return from_blocks(out, layout).astype(dtype)
  if qa.zero_point is not None:
    q = q - expand_scale(qa.zero_point.astype(jnp.float32), layout)
  out = q * expand_scale(qa.scale.astype(jnp.float32), layout)
  return from_blocks(out, layout).astype(dtype)


def quantization_error(x: jax.typing.ArrayLike, spec: QuantSpec) -> float:
  """Relative reconstruction error ``||x - dq(q(x))|| / ||x||`` (host float)."""
  x = jnp.asarray(x)
  d = dequantize(quantize(x, spec)) - x.astype(jnp.float32)
  return float(jnp.linalg.norm(d) / jnp.linalg.norm(x.astype(jnp.float32)))



__all__ = ["QuantParams", "calibrate", "code_zero_point", "dequantize", "effective_scale",
           "quantization_error", "quantize"]
