"""fake_quant's forward equals quantize->dequantize; its custom gradients equal
autodiff of the formula written with a straight-through round."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit.quant import (
  LearnedClip,
  QuantParams,
  QuantSpec,
  dequantize,
  fake_quant,
  init_learned_clip,
  init_learned_scale,
  lsq_grad_scale,
  quantize,
  round_ste,
)
from lowbit.quant.quantize import expand_scale, to_blocks

SPECS = [
    QuantSpec(bits=4, channel_axes=(1,)),
    QuantSpec(bits=4, channel_axes=(1,), group_size=16),
    QuantSpec(bits=8),
    QuantSpec(bits=4, symmetric=False, channel_axes=(1,)),
    QuantSpec(bits=3, symmetric=False, channel_axes=(1,), group_size=8),
    QuantSpec(bits=4, symmetric=False, channel_axes=(1,), group_size=16, zero_point_form="min"),
]
MIN_FORM = SPECS[-1]


def x_and_cotangent(shape=(64, 12), seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return jax.random.normal(k1, shape), jax.random.normal(k2, shape)


def formula(x, s, z, spec):
  """The fake-quant formula with a straight-through round: the autodiff reference."""
  layout = spec.resolve(x.shape)
  xb = to_blocks(x, layout)
  sb = expand_scale(s, layout)
  zb = 0.0 if z is None else expand_scale(z, layout)
  v = jnp.clip(xb / sb + zb, spec.qmin, spec.qmax)
  return ((round_ste(v) - zb) * sb).reshape(x.shape)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_forward_equals_quantize_dequantize(spec):
  x, _ = x_and_cotangent()
  # the min form fake-quantizes in code units, (q - (qmin - m/s)) * s: f32 rounding of the range
  atol = 1e-6 if spec.zero_point_form == "min" else 1e-7
  np.testing.assert_allclose(np.asarray(fake_quant(x, spec)),
                             np.asarray(dequantize(quantize(x, spec))), rtol=1e-6, atol=atol)
  p = init_learned_scale(x, spec)
  np.testing.assert_allclose(np.asarray(fake_quant(x, spec, p)),
                             np.asarray(dequantize(quantize(x, spec, p))), rtol=1e-6, atol=atol)


@pytest.mark.parametrize("spec", [s for s in SPECS if s.zero_point_form == "integer"], ids=str)
def test_lsq_gradients_match_autodiff_of_formula(spec):
  x, g = x_and_cotangent()
  p = init_learned_scale(x, spec)
  # shrink the scale so that some elements fall outside the clip range
  p = QuantParams(p.scale * 0.7, p.zero_point)
  layout = spec.resolve(x.shape)
  gs = lsq_grad_scale(spec, layout)

  def ours(x, p):
    return jnp.vdot(fake_quant(x, spec, p), g)

  def ref(x, s, z):
    return jnp.vdot(formula(x, s, z, spec), g)

  dx, dp = jax.grad(ours, argnums=(0, 1))(x, p)
  rx, rs, rz = jax.grad(ref, argnums=(0, 1, 2))(x, p.scale, p.zero_point)
  np.testing.assert_allclose(np.asarray(dx), np.asarray(rx), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(dp.scale), np.asarray(rs) * gs, rtol=1e-4, atol=1e-6)
  if spec.symmetric:
    assert dp.zero_point is None
  else:
    np.testing.assert_allclose(np.asarray(dp.zero_point), np.asarray(rz), rtol=1e-4, atol=1e-6)


def test_lsq_gradients_in_the_min_form_reach_the_minimum():
  """Min form: z = qmin - m / s inside the formula; autodiff of that is the reference."""
  spec = MIN_FORM
  x, g = x_and_cotangent()
  p = init_learned_scale(x, spec)
  p = QuantParams(p.scale * 0.7, p.zero_point * 0.9)
  gs = lsq_grad_scale(spec, spec.resolve(x.shape))

  def ref(x, s_step, s_in_z, m):
    return jnp.vdot(formula(x, s_step, spec.qmin - m / s_in_z, spec), g)

  dx, dp = jax.grad(lambda x, p: jnp.vdot(fake_quant(x, spec, p), g), argnums=(0, 1))(x, p)
  rx, rs_step, rs_z, rm = jax.grad(ref, argnums=(0, 1, 2, 3))(x, p.scale, p.scale, p.zero_point)
  np.testing.assert_allclose(np.asarray(dx), np.asarray(rx), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(dp.zero_point), np.asarray(rm), rtol=1e-4, atol=1e-6)
  assert float(jnp.abs(dp.zero_point).sum()) > 0
  # the scale: LSQ-scaled as the step, unscaled through z = qmin - m / s
  np.testing.assert_allclose(np.asarray(dp.scale), np.asarray(rs_step * gs + rs_z),
                             rtol=1e-4, atol=1e-6)


def test_ste_passes_inside_and_blocks_outside_the_clip_range():
  spec = QuantSpec(bits=4)
  x = jnp.array([-20.0, -6.9, -0.3, 0.0, 0.4, 6.9, 7.6, 20.0])
  p = QuantParams(jnp.ones((1,)))
  dx = jax.grad(lambda x: fake_quant(x, spec, p).sum())(x)
  assert np.asarray(dx).tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
  # dynamic quantizer: all elements inside (absmax), identity gradient
  dx = jax.grad(lambda x: fake_quant(x, spec).sum())(x)
  np.testing.assert_array_equal(np.asarray(dx), np.ones(8))


@pytest.mark.parametrize("spec", [QuantSpec(bits=4, channel_axes=(1,), group_size=32, ragged=True),
                                  QuantSpec(bits=8, channel_axes=(1,))], ids=["int4-g32-ragged", "int8"])
def test_an_absmax_scale_keeps_every_element_inside(spec):
  """Each group's largest |x| sits on qmax; an ulp of rounding in x / s must not clip it."""
  for seed in range(8):
    x = jnp.asarray(np.random.default_rng(seed).standard_normal((100, 8), np.float32))
    p = init_learned_scale(x, spec)
    dx, dp = jax.grad(lambda x, p: fake_quant(x, spec, p).sum(), argnums=(0, 1))(x, p)
    np.testing.assert_array_equal(np.asarray(dx), np.ones(x.shape), err_msg=f"seed {seed}")
    # inside, d y / d s = round(u) - u, so the scale's gradient is small: no element adds qmax.
    n = x.size // dp.scale.size
    assert float(jnp.abs(dp.scale).max()) <= 0.5 * n * lsq_grad_scale(spec, spec.resolve(x.shape)) + 1e-6


def test_lsq_scale_gradient_values():
  """Esser et al.: inside round(v) - v, outside +-qmax, times 1/sqrt(N qmax)."""
  spec = QuantSpec(bits=4)
  x = jnp.array([0.26, 20.0, -20.0])
  s = QuantParams(jnp.ones((1,)))
  ds = jax.grad(lambda p: fake_quant(x, spec, p).sum())(s).scale
  expected = ((0.0 - 0.26) + 7 + (-7)) / np.sqrt(3 * 7)
  np.testing.assert_allclose(float(ds[0]), expected, rtol=1e-5)


@pytest.mark.parametrize("spec", [QuantSpec(bits=4, channel_axes=(1,)),
                                  QuantSpec(bits=4, symmetric=False, channel_axes=(1,),
                                            group_size=16)], ids=str)
def test_learned_clip_gradients_match_autodiff_of_formula(spec):
  x, g = x_and_cotangent()
  c = init_learned_clip(x, spec)
  c = LearnedClip(c.gamma - 1.0, None if c.beta is None else c.beta - 1.0)
  layout = spec.resolve(x.shape)

  def ref(c):
    xb = to_blocks(x, layout)
    axes = tuple(a for a in range(xb.ndim) if xb.shape[a] != expand_scale(c.gamma, layout).shape[a]
                 or expand_scale(c.gamma, layout).shape[a] == 1 and xb.shape[a] != 1)
    if spec.symmetric:
      hi = jax.nn.sigmoid(expand_scale(c.gamma, layout)) * jnp.max(jnp.abs(xb), axes, keepdims=True)
      s = hi / spec.qmax
      z = None
    else:
      hi = jax.nn.sigmoid(expand_scale(c.gamma, layout)) * jnp.max(xb, axes, keepdims=True)
      lo = jax.nn.sigmoid(expand_scale(c.beta, layout)) * jnp.min(xb, axes, keepdims=True)
      lo, hi = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)
      s = (hi - lo) / (spec.qmax - spec.qmin)
      z = spec.qmin - round_ste(lo / s)
    zz = 0.0 if z is None else z
    v = jnp.clip(xb / s + zz, spec.qmin, spec.qmax)
    return jnp.vdot(((round_ste(v) - zz) * s).reshape(x.shape), g)

  ours = jax.grad(lambda c: jnp.vdot(fake_quant(x, spec, c), g))(c)
  want = jax.grad(ref)(c)
  np.testing.assert_allclose(np.asarray(ours.gamma), np.asarray(want.gamma), rtol=1e-4, atol=1e-6)
  if not spec.symmetric:
    np.testing.assert_allclose(np.asarray(ours.beta), np.asarray(want.beta), rtol=1e-4, atol=1e-6)
  assert float(jnp.abs(ours.gamma).sum()) > 0


def test_learned_clip_init_reproduces_calibration():
  w = jax.random.t(jax.random.key(1), 3.0, (256, 16))
  spec = QuantSpec(bits=4, channel_axes=(1,), calibration="mse")
  c = init_learned_clip(w, spec)
  err_clip = float(jnp.linalg.norm(fake_quant(w, spec, c) - w))
  err_mse = float(jnp.linalg.norm(dequantize(quantize(w, spec)) - w))
  assert err_clip == pytest.approx(err_mse, rel=0.05)


def test_learning_the_clip_lowers_reconstruction_error():
  """A few Adam steps on the clip strength beat absmax at 4 bits on heavy tails."""
  import optax
  w = jax.random.t(jax.random.key(2), 3.0, (256, 16))
  spec = QuantSpec(bits=4, channel_axes=(1,))
  c = init_learned_clip(w, spec)
  loss = jax.jit(lambda c: jnp.mean((fake_quant(w, spec, c) - w) ** 2))
  opt = optax.adam(0.1)
  st = opt.init(c)
  l0 = float(loss(c))
  for _ in range(60):
    g = jax.grad(loss)(c)
    u, st = opt.update(g, st)
    c = optax.apply_updates(c, u)
  assert float(loss(c)) < 0.8 * l0


def test_fake_quant_jits_and_keeps_dtype():
  x = jax.random.normal(jax.random.key(0), (32, 8)).astype(jnp.bfloat16)
  y = jax.jit(lambda x: fake_quant(x, QuantSpec(bits=8, channel_axes=(1,))))(x)
  assert y.dtype == jnp.bfloat16 and y.shape == x.shape
