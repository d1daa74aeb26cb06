"""PTQ: SmoothQuant helps with activation outliers; GPTQ beats round-to-nearest."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lowbit
from lowbit import ptq
from lowbit.nn import QLinear, Transformer, TransformerConfig
from lowbit.qat import make_optimizers, make_train_step
from lowbit.quant import QuantSpec

W8 = QuantSpec(bits=8, channel_axes=(1,))
A8_TENSOR = QuantSpec(bits=8)


class OneLayer(nnx.Module):
  def __init__(self):
    self.proj = nnx.Linear(256, 128, rngs=nnx.Rngs(0))

  def __call__(self, x):
    return self.proj(x)


def outlier_batches(n=4, seed=0):
  """Activations with a few channels 50x larger than the rest (as in LLM.int8 / SmoothQuant)."""
  out = []
  for i in range(n):
    x = jax.random.normal(jax.random.key(seed + i), (64, 256))
    out.append(x.at[:, jnp.array([3, 77, 150, 201])].multiply(50.0))
  return out


def rel_err(model, ref, batches):
  num = sum(float(jnp.sum((model(b) - ref(b)) ** 2)) for b in batches)
  den = sum(float(jnp.sum(ref(b) ** 2)) for b in batches)
  return np.sqrt(num / den)


@pytest.mark.parametrize("act", [A8_TENSOR, QuantSpec(bits=8, channel_axes=(0,))],
                         ids=["per-tensor", "per-token"])
def test_smoothquant_lowers_w8a8_error_with_outliers(act):
  ref = OneLayer()
  policy = lowbit.PrecisionPolicy((lowbit.PrecisionRule("proj", W8, act),))
  calib, test = outlier_batches(4, 0), outlier_batches(2, 100)
  errs = {}
  for smooth in (False, True):
    q = lowbit.quantize_model(ref, policy)
    stats = ptq.collect(q, calib, progress=False)
    if smooth:
      ptq.smooth_quant(q, stats, alpha=0.5)
      if not act.channel_axes:  # a static scale from pre-smoothing stats would be wrong
        with pytest.raises(ValueError, match="collect again after smooth_quant"):
          ptq.calibrate_activations(q, stats)
      stats = ptq.collect(q, calib, progress=False)
    ptq.calibrate_activations(q, stats)
    errs[smooth] = rel_err(lowbit.convert(q), ref, test)
  assert errs[True] < 0.5 * errs[False], errs


def test_smoothing_alone_keeps_the_float_function():
  ref = OneLayer()
  q = lowbit.quantize_model(ref, lowbit.PrecisionPolicy((
      lowbit.PrecisionRule("proj", None, A8_TENSOR),)))
  stats = ptq.collect(q, outlier_batches(2), progress=False)
  ptq.smooth_quant(q, stats, alpha=0.7)
  lowbit.qat.set_quant_enabled(q, False)
  x = outlier_batches(1, 50)[0]
  np.testing.assert_allclose(np.asarray(q(x)), np.asarray(ref(x)), rtol=1e-4, atol=1e-3)


CFG = TransformerConfig.gpt2(vocab_size=32, d_model=64, n_layers=2, n_heads=4, max_len=32)


def seq_batch(step, b=8, t=32):
  x0 = jax.random.randint(jax.random.key(step), (b, 1), 0, 32)
  seq = [x0]
  for _ in range(t):
    seq.append((seq[-1] * 5 + 3) % 32)
  s = jnp.concatenate(seq, 1)
  return s[:, :-1], s[:, 1:]


@pytest.fixture(scope="module")
def trained():
  model = Transformer(CFG, rngs=nnx.Rngs(0))
  w, _ = make_optimizers(model, optax.adam(3e-3))
  step = make_train_step(lambda m, b: optax.softmax_cross_entropy_with_integer_labels(
      m(b[0]), b[1]).mean())
  for i in range(80):
    step(model, w, None, seq_batch(i))
  return model


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_int4_per_channel_beats_rtn(trained, act_order):
  policy = lowbit.PrecisionPolicy((
      lowbit.PrecisionRule("lm_head", keep_float=True),
      lowbit.PrecisionRule(".*", QuantSpec(bits=4, channel_axes=(1,), pack=True)),
  ))
  calib = [seq_batch(1000 + i)[0] for i in range(4)]
  test = [seq_batch(2000 + i) for i in range(2)]
  rtn = lowbit.quantize_model(trained, policy)
  g = lowbit.quantize_model(trained, policy)
  stats = ptq.collect(g, calib, hessian=True, progress=False)
  ptq.gptq(g, stats, act_order=act_order, progress=False)
  m_rtn = ptq.compare(rtn, trained, test, progress=False)
  m_gptq = ptq.compare(g, trained, test, progress=False)
  out_err = lambda m: rel_err(lambda b: m(b[0]), lambda b: trained(b[0]), test)  # noqa: E731
  assert out_err(g) < out_err(rtn)
  assert m_gptq["kl"] < m_rtn["kl"]
  # GPTQ's codes survive conversion exactly
  cv = lowbit.convert(g)
  x = test[0][0]
  np.testing.assert_allclose(np.asarray(cv(x)), np.asarray(g(x)), rtol=1e-4, atol=1e-4)


def test_gptq_grouped_static_groups():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((512, 128)) @ rng.standard_normal((128, 128))  # correlated inputs
  w = rng.standard_normal((128, 64))
  h = x.T @ x
  spec = QuantSpec(bits=4, channel_axes=(1,), group_size=32)
  for act_order in (False, True):
    wq, params = ptq.gptq_quantize(w, h, spec, act_order=act_order)
    assert params.scale.shape == (4, 64)
    rtn = np.asarray(lowbit.quant.dequantize(lowbit.quant.quantize(jnp.asarray(w, jnp.float32),
                                                                    spec)))
    e_g = np.linalg.norm(x @ (wq - w))
    e_r = np.linalg.norm(x @ (rtn - w))
    assert e_g < 0.9 * e_r, (act_order, e_g, e_r)
    # on the grid: re-quantizing with the same scales changes nothing
    again = lowbit.quant.dequantize(lowbit.quant.quantize(jnp.asarray(wq, jnp.float32), spec,
                                                          params))
    np.testing.assert_allclose(np.asarray(again), wq, rtol=1e-5, atol=1e-6)


def test_compare_metrics_are_zero_for_identical_models(trained):
  m = ptq.compare(trained, trained, [seq_batch(5)], progress=False)
  assert m["delta_loss"] == 0.0 and m["top1_agreement"] == 1.0 and abs(m["kl"]) < 1e-6
  assert m["ppl"] == pytest.approx(np.exp(m["loss"]))


def test_collect_requires_a_policy_and_eager_calls():
  with pytest.raises(ValueError, match="quantize_model"):
    ptq.collect(OneLayer(), outlier_batches(1), progress=False)
  q = lowbit.quantize_model(OneLayer(), lowbit.PrecisionPolicy((
      lowbit.PrecisionRule("proj", W8),)))
  with pytest.raises(ValueError, match="eagerly"):
    ptq.collect(q, outlier_batches(1), forward=nnx.jit(lambda m, b: m(b)), progress=False)
  assert isinstance(q.proj, QLinear) and q.proj.observer is None


def test_gptq_refuses_integer_group_scales():
  spec = QuantSpec(bits=4, channel_axes=(1,), group_size=32, pack=True, group_scales="int")
  with pytest.raises(ValueError, match="not supported yet"):
    ptq.gptq_quantize(np.ones((64, 8)), np.eye(64), spec)
