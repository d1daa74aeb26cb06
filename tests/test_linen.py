"""Linen QDense: float == nn.Dense, converted == fake-quant, same policy object."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import lowbit
from lowbit.linen import QDense, convert_params
from lowbit.quant import QuantSpec


class Net(nn.Module):
  policy: lowbit.PrecisionPolicy | None = None
  mode: str = "float"
  dense: type = QDense

  @nn.compact
  def __call__(self, x):
    kw = dict(policy=self.policy, mode=self.mode) if self.dense is QDense else {}
    h = nn.gelu(self.dense(256, name="fc1", **kw)(x))
    h = nn.LayerNorm()(h)
    h = self.dense(128, name="fc2", **kw)(h)
    return self.dense(10, name="head", **kw)(h)


def test_float_is_bit_identical_to_dense():
  x = jax.random.normal(jax.random.key(0), (4, 128))
  params = Net(dense=nn.Dense).init(jax.random.key(1), x)
  np.testing.assert_array_equal(np.asarray(Net().apply(params, x)),
                                np.asarray(Net(dense=nn.Dense).apply(params, x)))


def test_policy_modes_on_linen():
  x = jax.random.normal(jax.random.key(0), (4, 128))
  params = Net().init(jax.random.key(1), x)
  policy = lowbit.PrecisionPolicy((
      lowbit.PrecisionRule("head", keep_float=True),
      lowbit.PrecisionRule("fc1", QuantSpec(bits=8, channel_axes=(1,)),
                           QuantSpec(bits=8, channel_axes=(0,))),
      lowbit.PrecisionRule("fc2", QuantSpec(bits=4, channel_axes=(1,), group_size=64, pack=True)),
  ))
  y_float = Net().apply(params, x)
  y_fq = Net(policy, "fake_quant").apply(params, x)
  assert 0 < float(jnp.linalg.norm(y_fq - y_float) / jnp.linalg.norm(y_float)) < 0.2
  q = convert_params(params, policy)
  p = q["params"]
  assert set(p["fc1"]) == {"bias", "qscale", "qvalue"} and p["fc1"]["qvalue"].dtype == jnp.int8
  assert p["fc2"]["qvalue"].dtype == jnp.uint8 and p["fc2"]["qvalue"].shape == (128, 128)
  assert "kernel" in p["head"]
  y_cv = Net(policy, "converted").apply(q, x)
  np.testing.assert_allclose(np.asarray(y_cv), np.asarray(y_fq), rtol=1e-5, atol=1e-5)


def test_integer_group_scales_on_linen():
  """QDense with integer group scales: converted params hold int8 group scales and a
  channel scale (``qchannel``); converted == fake-quant."""
  x = jax.random.normal(jax.random.key(0), (4, 128))
  params = Net().init(jax.random.key(1), x)
  policy = lowbit.PrecisionPolicy((
      lowbit.PrecisionRule("head", keep_float=True),
      lowbit.PrecisionRule("fc.*", QuantSpec(bits=4, channel_axes=(1,), group_size=64, pack=True,
                                             group_scales="int"),
                           QuantSpec(bits=8, channel_axes=(0,))),
  ))
  y_fq = Net(policy, "fake_quant").apply(params, x)
  q = convert_params(params, policy)
  p = q["params"]["fc2"]
  assert set(p) == {"bias", "qchannel", "qscale", "qvalue"}
  assert p["qscale"].dtype == jnp.int8 and p["qscale"].shape == (4, 128)
  assert p["qchannel"].shape == (1, 128)
  y_cv = Net(policy, "converted").apply(q, x)
  np.testing.assert_allclose(np.asarray(y_cv), np.asarray(y_fq), rtol=1e-5, atol=1e-5)
