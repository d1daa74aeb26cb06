"""Integer group scales under a channel scale (``QuantSpec(group_scales="int")``, QServe's
progressive group quantization) against their properties and a float64 reference."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit.quant import (
  INT_GROUP_SCALE_MAX,
  QuantParams,
  QuantSpec,
  calibrate,
  dequantize,
  fake_quant,
  quantization_error,
  quantize,
)


def weight(shape, seed=0):
  """Gaussian rows with a log-normal spread of magnitude along K: groups of one channel
  then need different scales, which is what integer group scales must resolve."""
  rng = np.random.default_rng(seed)
  w = rng.standard_normal(shape).astype(np.float32)
  return jnp.asarray(w * np.exp(rng.standard_normal((shape[0], 1))).astype(np.float32))


def spec(**kw):
  base = dict(bits=4, channel_axes=(1,), group_size=64, pack=True, group_scales="int")
  return QuantSpec(**{**base, **kw})


@pytest.mark.parametrize("calibration", ["absmax", "percentile", "mse"])
def test_layout_and_range(calibration):
  w = weight((256, 96))
  qa = quantize(w, spec(calibration=calibration))
  s, c, q = np.asarray(qa.scale), np.asarray(qa.channel_scale), np.asarray(qa.codes, np.int64)
  assert qa.scale.dtype == jnp.int8 and s.shape == (4, 96)
  assert c.shape == (1, 96) and qa.channel_scale.dtype == jnp.float32
  assert s.min() >= 1 and s.max() <= INT_GROUP_SCALE_MAX
  # q * s is an int8 value: what the W4A8 kernels feed their int8 dot
  qs = q.reshape(4, 64, 96) * s[:, None, :]
  assert np.abs(qs).max() <= 7 * INT_GROUP_SCALE_MAX <= 127
  # codes 0.5 byte, int8 group scales 1 byte per 64 codes, f32 channel scales
  assert qa.nbytes == 256 * 96 // 2 + 4 * 96 + 4 * 96
  # absmax: the largest group of each channel gets the largest integer scale
  if calibration == "absmax":
    assert (s.max(0) == INT_GROUP_SCALE_MAX).all()


def test_dequantize_is_codes_times_both_scales():
  w = weight((128, 40), seed=1)
  qa = quantize(w, spec())
  q = np.asarray(qa.codes, np.float64).reshape(2, 64, 40)
  ref = (q * np.asarray(qa.scale, np.float64)[:, None, :]
         * np.asarray(qa.channel_scale, np.float64)[:, None, :]).reshape(128, 40)
  np.testing.assert_allclose(np.asarray(dequantize(qa)), ref, rtol=1e-6, atol=0)


def test_codes_round_to_the_two_level_grid():
  """Each code is the nearest on its group's grid ``s * c`` (clipped to [-7, 7])."""
  w = weight((128, 32), seed=2)
  qa = quantize(w, spec())
  step = (np.asarray(qa.scale, np.float64) * np.asarray(qa.channel_scale, np.float64))
  step = np.repeat(step, 64, axis=0)
  want = np.clip(np.round(np.asarray(w, np.float64) / step), -7, 7)
  assert (np.asarray(qa.codes) == want).mean() > 0.999  # f32 ties may round either way
  assert np.abs(np.asarray(qa.codes) - want).max() <= 1


def test_error_close_to_float_group_scales():
  """The accuracy the format gives up: measured on these weights, the relative error of
  integer group scales is within 2% of float group scales and far below per-channel."""
  w = weight((1024, 256), seed=3)
  e_int = quantization_error(w, spec())
  e_float = quantization_error(w, spec(group_scales="float"))
  e_channel = quantization_error(w, spec(group_scales="float", group_size=None))
  assert e_float <= e_int <= 1.02 * e_float
  assert e_int < 0.8 * e_channel


def test_mse_picks_the_better_integer():
  w = weight((512, 64), seed=4)
  e = {cal: quantization_error(w, spec(calibration=cal)) for cal in ("absmax", "mse")}
  assert e["mse"] < e["absmax"]


def test_zero_groups_and_channels_stay_finite_and_do_not_set_the_channel_scale():
  w = np.asarray(weight((128, 8), seed=5)).copy() * 0.01  # scales well under 1
  w[:64, 0] = 0.0   # one zero group in channel 0
  w[:, 1] = 0.0     # a zero channel
  qa = quantize(jnp.asarray(w), spec())
  out = np.asarray(dequantize(qa))
  assert np.isfinite(out).all()
  assert (out[:64, 0] == 0).all() and (out[:, 1] == 0).all()
  # the zero group's placeholder scale (1) does not set channel 0's scale: its other group
  # keeps the largest integer scale and an error like float group scales'
  assert int(qa.scale[1, 0]) == INT_GROUP_SCALE_MAX
  ref = np.asarray(dequantize(quantize(jnp.asarray(w), spec(group_scales="float"))))
  err = lambda o: np.linalg.norm(o[64:, 0] - w[64:, 0])  # noqa: E731
  assert err(out) <= 1.05 * err(ref)


def test_params_round_trip_and_checks():
  w = weight((128, 16), seed=6)
  s = spec()
  p = calibrate(w, s)
  assert p.scale.dtype == jnp.int8 and p.channel_scale.shape == (1, 16)
  np.testing.assert_array_equal(quantize(w, s, p).qvalue, quantize(w, s).qvalue)
  with pytest.raises(ValueError, match="channel_scale"):
    quantize(w, s, QuantParams(p.scale))
  with pytest.raises(ValueError, match="int8 group scales"):
    quantize(w, s, QuantParams(p.scale.astype(jnp.float32), None, p.channel_scale))
  with pytest.raises(ValueError, match="float group scales"):
    quantize(w, spec(group_scales="float"),
             QuantParams(p.scale.astype(jnp.float32), None, p.channel_scale))


@pytest.mark.parametrize("kw", [dict(symmetric=False), dict(bits=8, pack=False),
                                dict(group_size=None)])
def test_spec_refuses_what_the_format_cannot_hold(kw):
  with pytest.raises(ValueError, match="group_scales='int'"):
    spec(**kw)
  with pytest.raises(ValueError, match="group_scales"):
    QuantSpec(group_scales="bf16")


def test_fake_quant_matches_quantize_and_passes_gradients():
  w = weight((128, 24), seed=7)
  s = spec()
  y = fake_quant(w, s)
  np.testing.assert_allclose(np.asarray(y), np.asarray(dequantize(quantize(w, s))),
                             rtol=1e-6, atol=1e-6)
  g = jax.grad(lambda x: jnp.sum(fake_quant(x, s) * x))(w)
  assert np.isfinite(np.asarray(g)).all() and float(jnp.abs(g).sum()) > 0
  with pytest.raises(ValueError, match="no learned"):
    fake_quant(w, s, QuantParams(jnp.ones((2, 24))))


def test_transpose_and_as_matrix_keep_the_channel_scale():
  w = weight((128, 12), seed=8)
  qa = quantize(w, spec())
  t = qa.transpose()
  assert t.channel_scale.shape == (12, 1)
  np.testing.assert_array_equal(np.asarray(dequantize(t)), np.asarray(dequantize(qa)).T)
  w3 = w.reshape(128, 3, 4)
  q3 = quantize(w3, dataclasses.replace(spec(), channel_axes=(1, 2)))
  assert q3.channel_scale.shape == (1, 3, 4)
  m = q3.as_matrix()
  assert m.channel_scale.shape == (1, 12)
  np.testing.assert_array_equal(np.asarray(dequantize(m)),
                                np.asarray(dequantize(q3)).reshape(128, 12))
