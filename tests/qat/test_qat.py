"""QAT on a small transformer: loss falls, groups train or freeze, converted == fake-quant."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lowbit
from lowbit.nn import QuantState, Transformer, TransformerConfig
from lowbit.qat import make_optimizers, make_train_step, set_quant_enabled

CFG = TransformerConfig.gpt2(vocab_size=32, d_model=64, n_layers=2, n_heads=4, max_len=32)
POLICY = lowbit.PrecisionPolicy((
    lowbit.PrecisionRule("lm_head", keep_float=True),
    lowbit.PrecisionRule(".*", lowbit.quant.QuantSpec(bits=4, channel_axes=(1,), pack=True)),
))


def batch(step, b=8, t=32):
  """A learnable sequence task: tokens follow x[i+1] = (x[i] * 3 + 1) % 32."""
  x0 = jax.random.randint(jax.random.key(step), (b, 1), 0, 32)
  seq = [x0]
  for _ in range(t):
    seq.append((seq[-1] * 3 + 1) % 32)
  s = jnp.concatenate(seq, 1)
  return s[:, :-1], s[:, 1:]


def loss_fn(model, b):
  x, y = b
  logits = model(x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@pytest.fixture(scope="module")
def float_model():
  model = Transformer(CFG, rngs=nnx.Rngs(0))
  w, _ = make_optimizers(model, optax.adam(3e-3))
  step = make_train_step(loss_fn)
  for i in range(60):
    step(model, w, None, batch(i))
  return model


@pytest.mark.parametrize("learn", ["scale", "clip", None])
def test_qat_loss_falls_and_converted_matches(float_model, learn):
  model = lowbit.quantize_model(float_model, POLICY, learn=learn)
  w, q = make_optimizers(model, optax.adamw(1e-3, weight_decay=0.01),
                         optax.adam(1e-3) if learn else None)
  step = make_train_step(loss_fn)
  eval_b = batch(10_000)
  before = float(loss_fn(model, eval_b))
  q0 = jax.tree.map(jnp.copy, nnx.state(model, QuantState))
  for i in range(40):
    step(model, w, q, batch(100 + i))
  after = float(loss_fn(model, eval_b))
  assert after < before, (before, after)
  if learn:  # the quantizer parameters moved
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), q0,
                         nnx.state(model, QuantState))
    assert max(jax.tree.leaves(moved)) > 0
  cv = lowbit.convert(model)
  x = eval_b[0]
  np.testing.assert_allclose(np.asarray(cv(x)), np.asarray(model(x)), rtol=1e-4, atol=1e-4)


def test_frozen_groups_do_not_move(float_model):
  model = lowbit.quantize_model(float_model, POLICY, learn="scale")
  step = make_train_step(loss_fn)
  p0 = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))
  q0 = jax.tree.map(jnp.copy, nnx.state(model, QuantState))
  w, q = make_optimizers(model, optax.adam(1e-2), optax.adam(1e-2), freeze_weights=True)
  assert w is None
  step(model, w, q, batch(1))
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), p0,
                                   nnx.state(model, nnx.Param)))
  assert not jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), q0,
                                       nnx.state(model, QuantState)))
  w, q = make_optimizers(model, optax.adam(1e-2), optax.adam(1e-2), freeze_quant=True)
  q1 = jax.tree.map(jnp.copy, nnx.state(model, QuantState))
  step(model, w, q, batch(2))
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), q1,
                                   nnx.state(model, QuantState)))


def test_float_warmup_then_quantization(float_model):
  model = lowbit.quantize_model(float_model, POLICY, learn="scale")
  x = batch(3)[0]
  set_quant_enabled(model, False)
  np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(float_model(x)))
  set_quant_enabled(model, True)
  assert float(jnp.abs(model(x) - float_model(x)).max()) > 0
  cv = lowbit.convert(model)
  with pytest.raises(ValueError, match="converted"):
    set_quant_enabled(cv, False)


def test_weight_and_activation_qat(float_model):
  policy = lowbit.policy.w8a8()
  model = lowbit.quantize_model(float_model, policy, learn="scale")
  w, q = make_optimizers(model, optax.adam(1e-3), optax.adam(1e-4))
  step = make_train_step(loss_fn)
  losses = [float(step(model, w, q, batch(200 + i))) for i in range(15)]
  assert np.mean(losses[-5:]) < np.mean(losses[:5])


def test_resumed_run_is_bit_identical(float_model, tmp_path):
  from lowbit import ckpt

  def fresh():
    model = lowbit.quantize_model(float_model, POLICY, learn="clip")
    w, q = make_optimizers(model, optax.adamw(1e-3), optax.adam(1e-3))
    return model, w, q

  step = make_train_step(loss_fn)
  rng = jax.random.key(7)

  def run(model, w, q, start, stop, rng):
    losses = []
    for _i in range(start, stop):
      rng, sub = jax.random.split(rng)
      xb, yb = batch(int(jax.random.randint(sub, (), 0, 10_000)))
      losses.append(float(step(model, w, q, (xb, yb))))
    return losses, rng

  m1, w1, q1 = fresh()
  straight, _ = run(m1, w1, q1, 0, 8, rng)

  m2, w2, q2 = fresh()
  first, rng2 = run(m2, w2, q2, 0, 4, rng)
  ckpt.save_train_state(tmp_path / "run", 4, m2, w2, q2, extra={"rng": jax.random.key_data(rng2)})
  m3, w3, q3 = fresh()  # a new process would build these the same way
  k, extra = ckpt.restore_train_state(tmp_path / "run", m3, w3, q3,
                                      extra={"rng": jax.random.key_data(rng2)})
  assert k == 4
  rest, _ = run(m3, w3, q3, 4, 8, jax.random.wrap_key_data(jnp.asarray(extra["rng"])))
  assert first + rest == straight
  for a, b in zip(jax.tree.leaves(nnx.state(m1)), jax.tree.leaves(nnx.state(m3)), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
