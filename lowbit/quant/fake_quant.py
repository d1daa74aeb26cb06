"""Differentiable fake quantization for QAT: STE, learned step size, learned clipping."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from lowbit.quant.quantize import (
    QuantParams,
    _calibrate,
    _stat_range,
    effective_scale,
    expand_scale,
    from_blocks,
    to_blocks,
)
from lowbit.quant.spec import Layout, QuantSpec


class LearnedClip(NamedTuple):
  """Learnable weight clipping (OmniQuant's LWC), shaped like ``Layout.scale_shape``.

  The clipping range is ``hi = sigmoid(gamma) * max(x)`` and, for asymmetric
  specs, ``lo = sigmoid(beta) * min(x)`` (symmetric: ``hi = sigmoid(gamma) *
  max|x|``, ``lo = -hi``), with the statistics taken from the current tensor
  and the clip strengths ``gamma``, ``beta`` trained.
  """

  gamma: jax.Array
  beta: jax.Array | None = None


@jax.custom_vjp
def round_ste(v: jax.Array) -> jax.Array:
  """``round(v)`` forward, identity gradient (the straight-through estimator)."""
  return jnp.round(v)


round_ste.defvjp(lambda v: (jnp.round(v), None), lambda _, g: (g,))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _fq(xb, s, z, qmin: int, qmax: int, grad_scale: float):
  v = jnp.clip(xb / s + z, qmin, qmax)
  return (jnp.round(v) - z) * s


def _fq_fwd(xb, s, z, qmin, qmax, grad_scale):
  u = xb / s + z
  v = jnp.clip(u, qmin, qmax)
  r = jnp.round(v)
  return (r - z) * s, (xb, s, z, u, r)


def _sum_to(g: jax.Array, shape) -> jax.Array:
  pairs = enumerate(zip(g.shape, shape, strict=True))
  axes = tuple(a for a, (gd, d) in pairs if d == 1 and gd != 1)
  return jnp.sum(g, axis=axes, keepdims=True).reshape(shape)


def _fq_bwd(qmin, qmax, grad_scale, res, g):
  xb, s, z, u, r = res
  # The range's own ends count as inside up to a few f32 ulps: with an absmax scale the
  # largest |x| lands on qmax, and x / s (which XLA may compute as x * (1 / s)) can overshoot
  # it by an ulp, which would flip that element's gradients (dx 1 -> 0, ds ~0 -> qmax).
  tol = 4 * float(jnp.finfo(jnp.float32).eps) * max(abs(qmin), abs(qmax), 1)
  inside = (u >= qmin - tol) & (u <= qmax + tol)
  dx = jnp.where(inside, g, 0.0)
  # d y / d s: inside round(x/s + z) - z - x/s; below qmin - z; above qmax - z.
  ds_el = jnp.where(inside, r - z - xb / s, jnp.where(u < qmin, qmin - z, qmax - z))
  ds = _sum_to(g * ds_el, s.shape) * grad_scale
  # d y / d z: 0 inside (the code moves with z), -s outside.
  dz = _sum_to(jnp.where(inside, 0.0, -g * s), jnp.shape(z))
  return dx, ds, dz


_fq.defvjp(_fq_fwd, _fq_bwd)


@functools.partial(jax.jit, static_argnames="spec")  # eager calls: one program, not op by op
def fake_quant(x: jax.typing.ArrayLike, spec: QuantSpec,
               params: QuantParams | LearnedClip | None = None) -> jax.Array:
  """Quantize-dequantize ``x`` with gradients for QAT; returns ``x.dtype``.

  Forward, with ``s, z`` broadcast as in the ``QArray`` invariant::

      y = (round(clip(x / s + z, qmin, qmax)) - z) * s

  In the ``"min"`` zero-point form the stored zero point ``m`` enters as
  ``z = qmin - m / s`` (so ``y = (q - qmin) * s + m``), and gradients reach
  ``m`` through that.

  Backward (custom VJP), with ``u = x / s + z`` and ``inside = qmin - t <= u <= qmax + t``,
  ``t = 4 * eps_f32 * max(|qmin|, qmax)`` (so that an absmax scale's own largest element,
  whose ``x / s`` can round an ulp past ``qmax``, is inside):

  * ``dy/dx = 1`` inside, ``0`` outside (straight-through estimator);
  * ``dy/ds = round(u) - z - x / s`` inside, ``qmin - z`` / ``qmax - z``
    below / above (LSQ, Esser et al. 2019), summed over the elements sharing
    the scale and multiplied by the LSQ gradient scale ``1 / sqrt(N * qmax)``,
    ``N`` the number of elements per scale entry, when ``s`` is learned;
  * ``dy/dz = 0`` inside, ``-s`` outside.

  ``params`` selects what is learned:

  * ``None``: ``s, z`` from :func:`calibrate` on ``stop_gradient(x)`` (the
    dynamic quantizer; only ``x`` gets a gradient); with integer group scales
    ``s = scale * channel_scale``, the only choice for such a spec;
  * :class:`QuantParams`: a learned scale (and zero point), LSQ;
  * :class:`LearnedClip`: learned clip strengths; ``s, z`` are computed from
    the clipped range and ``gamma``/``beta`` get gradients through them
    (``z`` rounded with :func:`round_ste`).

  Shapes: ``x`` any; ``params`` leaves ``spec.resolve(x.shape).scale_shape``.
  """
  x = jnp.asarray(x)
  layout = spec.resolve(x.shape)
  xb = to_blocks(x.astype(jnp.float32), layout)
  grad_scale = 1.0
  if params is None:
    p = _calibrate(jax.lax.stop_gradient(x), spec, layout)
    s = jax.lax.stop_gradient(effective_scale(p.scale, p.channel_scale))
    z = None if p.zero_point is None else jax.lax.stop_gradient(p.zero_point.astype(jnp.float32))
  elif spec.group_scales == "int":
    raise ValueError(
        f"fake_quant: QuantSpec(group_scales='int') takes no learned {type(params).__name__}: "
        "its group scales are integers, calibrated from the tensor; train with "
        "group_scales='float' and learned scales, or params=None.")
  elif isinstance(params, LearnedClip):
    s, z = _clip_to_scale(jax.lax.stop_gradient(xb), params, spec, layout)
    s = _ste_cast(s, spec.scale_dtype)
    z = None if z is None else _ste_cast(z, spec.scale_dtype)
  elif isinstance(params, QuantParams):
    if tuple(params.scale.shape) != layout.scale_shape:
      raise ValueError(
          f"fake_quant: params.scale has shape {tuple(params.scale.shape)}; this "
          f"spec on shape {layout.shape} needs {layout.scale_shape}.")
    s = _ste_cast(params.scale.astype(jnp.float32), spec.scale_dtype)
    z = None if params.zero_point is None else _ste_cast(
        params.zero_point.astype(jnp.float32), spec.scale_dtype)
    grad_scale = lsq_grad_scale(spec, layout)
  else:
    raise ValueError(
        f"fake_quant: params must be None, QuantParams or LearnedClip, got "
        f"{type(params).__name__}.")
  if (z is None) != spec.symmetric:
    raise ValueError(
        f"fake_quant: spec.symmetric={spec.symmetric} does not match params "
        f"({'no ' if z is None else ''}zero point).")
  if z is not None and spec.zero_point_form == "min":
    z = spec.qmin - z / s  # the float minimum m in code units: y = (q - qmin) * s + m
  sb = expand_scale(s, layout) if s.ndim == len(layout.shape) else s
  zb = jnp.zeros((1,) * xb.ndim, jnp.float32) if z is None else (
      expand_scale(z, layout) if z.ndim == len(layout.shape) else z)
  y = _fq(xb, sb, zb, spec.qmin, spec.qmax, grad_scale)
  return from_blocks(y, layout).astype(x.dtype)


def _ste_cast(v: jax.Array, dtype) -> jax.Array:
  """Round ``v`` to ``dtype`` (the stored scale dtype) forward; identity gradient.

  Training then sees exactly the scales a converted model will store.
  """
  if jnp.dtype(dtype) == jnp.float32:
    return v
  return v + jax.lax.stop_gradient(v.astype(dtype).astype(jnp.float32) - v)


def learned_clip_params(x: jax.typing.ArrayLike, spec: QuantSpec,
                        clip: LearnedClip) -> QuantParams:
  """The scale (and zero point) that ``fake_quant(x, spec, clip)`` uses, in ``scale_dtype``.

  Shapes: ``x`` any; result ``spec.resolve(x.shape).scale_shape``. Used to
  convert a model trained with learned clipping.
  """
  x = jnp.asarray(x)
  layout = spec.resolve(x.shape)
  s, z = _clip_to_scale(to_blocks(x.astype(jnp.float32), layout), clip, spec, layout)
  shape = layout.scale_shape
  return QuantParams(s.reshape(shape).astype(spec.scale_dtype),
                     None if z is None else z.reshape(shape).astype(spec.scale_dtype))


def lsq_grad_scale(spec: QuantSpec, layout: Layout) -> float:
  """LSQ's step-size gradient scale ``1 / sqrt(N * qmax)``, ``N`` elements per scale."""
  return 1.0 / math.sqrt(layout.elements_per_scale * spec.qmax)


def _clip_to_scale(xb, clip: LearnedClip, spec: QuantSpec, layout: Layout):
  """Blocked ``(s, z)`` from learned clip strengths (differentiable in gamma/beta)."""
  stat_spec = spec if spec.calibration != "mse" else _absmax(spec)
  lo, hi = _stat_range(xb, layout, stat_spec)
  gamma = expand_scale(clip.gamma.astype(jnp.float32), layout)
  hi = jax.nn.sigmoid(gamma) * hi
  if spec.symmetric:
    s = jnp.where(hi > 0, hi / spec.qmax, 1.0)
    return s, None
  if clip.beta is None:
    raise ValueError("fake_quant: an asymmetric LearnedClip needs beta (the min strength).")
  beta = expand_scale(clip.beta.astype(jnp.float32), layout)
  if spec.zero_point_form == "min":
    lo = jax.nn.sigmoid(beta) * lo
    rng = hi - lo
    return jnp.where(rng > 0, rng / (spec.qmax - spec.qmin), 1.0), lo
  lo = jnp.minimum(jax.nn.sigmoid(beta) * lo, 0.0)
  hi = jnp.maximum(hi, 0.0)
  rng = hi - lo
  s = jnp.where(rng > 0, rng / (spec.qmax - spec.qmin), 1.0)
  z = spec.qmin - round_ste(lo / s)
  return s, z


def _absmax(spec: QuantSpec) -> QuantSpec:
  return dataclasses.replace(spec, calibration="absmax")


def init_learned_scale(x: jax.typing.ArrayLike, spec: QuantSpec) -> QuantParams:
  """LSQ initialization: the calibrated scale (and zero point) of ``x``, in f32."""
  x = jnp.asarray(x)
  p = _calibrate(x, spec, spec.resolve(x.shape))
  return QuantParams(p.scale.astype(jnp.float32),
                     None if p.zero_point is None else p.zero_point.astype(jnp.float32))


def init_learned_clip(x: jax.typing.ArrayLike, spec: QuantSpec,
                      max_strength: float = 0.995) -> LearnedClip:
  """Clip strengths whose range matches ``calibrate(x, spec)``.

  ``gamma = logit(min(r, max_strength))`` with ``r = hi_calibrated / hi_absmax``
  per scale entry (``max_strength < 1`` keeps the sigmoid off its flat tail, so
  the clip can still learn); ``beta`` likewise for the minimum.
  """
  x = jnp.asarray(x)
  layout = spec.resolve(x.shape)
  xb = to_blocks(x.astype(jnp.float32), layout)
  lo_abs, hi_abs = _stat_range(xb, layout, _absmax(spec))
  if spec.calibration == "percentile":
    lo_c, hi_c = _stat_range(xb, layout, spec)
  else:
    lo_c, hi_c = lo_abs, hi_abs
  if spec.calibration == "mse":
    p = _calibrate(x, spec, layout)
    pa = _calibrate(x, _absmax(spec), layout)
    r = (p.scale.astype(jnp.float32) / pa.scale.astype(jnp.float32)).reshape(layout.scale_shape)
    r_hi = r_lo = r
  else:
    def ratio(c, a):
      r = jnp.where(jnp.abs(a) > 0, c / jnp.where(a == 0, 1.0, a), 1.0)
      return r.reshape(layout.scale_shape)
    r_hi, r_lo = ratio(hi_c, hi_abs), ratio(lo_c, lo_abs)

  def logit(r):
    r = jnp.clip(r, 1e-3, max_strength)
    return jnp.log(r) - jnp.log1p(-r)

  return LearnedClip(logit(r_hi), None if spec.symmetric else logit(r_lo))
