"""QLinear / QEinsum: float == nnx, converted == fake-quant, no float copy, bytes as promised."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lowbit
from lowbit.nn import (
  ActScale,
  QEinsum,
  QLinear,
  QScale,
  QuantState,
  QValue,
  WeightClip,
  WeightScale,
  converted_bytes,
)
from lowbit.quant import QuantSpec

A8 = QuantSpec(bits=8, channel_axes=(0,))
W_SPECS = {
    "w8": QuantSpec(bits=8, channel_axes=(1,)),
    "w4": QuantSpec(bits=4, channel_axes=(1,), pack=True),
    "w4g64bf16": QuantSpec(bits=4, channel_axes=(1,), group_size=64, pack=True,
                           scale_dtype=jnp.bfloat16),
    "w4g32asym": QuantSpec(bits=4, symmetric=False, channel_axes=(1,), group_size=32, pack=True),
    "w3g32": QuantSpec(bits=3, channel_axes=(1,), group_size=32),
    "w4g64int": QuantSpec(bits=4, channel_axes=(1,), group_size=64, pack=True,
                          group_scales="int", scale_dtype=jnp.bfloat16),
}


def x_(shape=(3, 5, 128), seed=1):
  return jax.random.normal(jax.random.key(seed), shape)


def test_float_mode_is_bit_identical_to_nnx_linear():
  for kw in (dict(), dict(use_bias=False), dict(dtype=jnp.bfloat16)):
    ref = nnx.Linear(128, 48, rngs=nnx.Rngs(3), **kw)
    q = QLinear(128, 48, rngs=nnx.Rngs(3), **kw)
    np.testing.assert_array_equal(np.asarray(q(x_())), np.asarray(ref(x_())))
    np.testing.assert_array_equal(np.asarray(QLinear.from_linear(ref)(x_())),
                                  np.asarray(ref(x_())))


def test_float_mode_is_bit_identical_to_nnx_einsum():
  ref = nnx.Einsum("btk,khd->bthd", (128, 4, 8), (4, 8), rngs=nnx.Rngs(0))
  q = QEinsum("btk,khd->bthd", (128, 4, 8), (4, 8), rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(np.asarray(q(x_())), np.asarray(ref(x_())))


@pytest.mark.parametrize("act", [None, A8], ids=["a-float", "a8"])
@pytest.mark.parametrize("wname", list(W_SPECS))
@pytest.mark.parametrize("learn", [None, "scale", "clip"])
def test_converted_equals_fake_quant(wname, act, learn):
  q = QLinear(128, 64, rngs=nnx.Rngs(0))
  if learn is not None and W_SPECS[wname].group_scales == "int":
    with pytest.raises(ValueError, match="calibrated, not learned"):
      q.set_precision(W_SPECS[wname], act, learn=learn)
    return
  q.set_precision(W_SPECS[wname], act, learn=learn)
  y_fq = q(x_())
  q.convert()
  y_cv = q(x_())
  err = float(jnp.linalg.norm(y_cv - y_fq) / jnp.linalg.norm(y_fq))
  assert err < 1e-5, err
  # the weight is held as integer codes only
  state = nnx.state(q)
  kinds = {type(v).__name__: v[...].dtype for v in jax.tree.leaves(
      state, is_leaf=lambda v: isinstance(v, nnx.Variable))}
  assert kinds["QValue"] in (jnp.int8, jnp.uint8)
  assert "Param" in kinds  # bias
  for v in jax.tree.leaves(state, is_leaf=lambda v: isinstance(v, nnx.Variable)):
    assert v[...].shape != (128, 64) or v[...].dtype in (jnp.int8, jnp.uint8)
  # bytes as promised
  held = q.qvalue[...].nbytes + q.qscale[...].nbytes + sum(
      getattr(q, v)[...].nbytes for v in ("qzero", "qchannel") if hasattr(q, v))
  assert held == converted_bytes((128, 64), W_SPECS[wname])


def test_learned_quantizer_state_is_its_own_variable_type_and_gets_gradients():
  q = QLinear(128, 32, rngs=nnx.Rngs(0))
  q.set_precision(W_SPECS["w4g64bf16"], QuantSpec(bits=8), learn="scale")
  q.set_act_scale(jnp.full((1, 1), 0.05))
  qs = nnx.state(q, QuantState)
  assert {type(v).__name__ for v in jax.tree.leaves(
      qs, is_leaf=lambda v: isinstance(v, nnx.Variable))} == {"WeightScale", "ActScale"}
  graphdef, params, qstate = nnx.split(q, nnx.Param, QuantState)

  def loss(qstate):
    m = nnx.merge(graphdef, params, qstate)
    return jnp.mean(m(x_()) ** 2)

  g = jax.grad(loss)(qstate)
  leaves = jax.tree.leaves(g)
  assert len(leaves) == 2 and all(float(jnp.abs(v).sum()) > 0 for v in leaves)
  assert isinstance(q.w_scale, WeightScale) and isinstance(q.act_scale, ActScale)
  q2 = QLinear(128, 32, rngs=nnx.Rngs(0))
  q2.set_precision(W_SPECS["w4"], None, learn="clip")
  assert isinstance(q2.w_clip, WeightClip)


def test_static_activation_scale_converts_exactly():
  q = QLinear(128, 64, rngs=nnx.Rngs(0))
  q.set_precision(W_SPECS["w8"], QuantSpec(bits=8), learn="scale")
  q.set_act_scale(jnp.full((1, 1), 0.02))
  y = q(x_())
  q.convert()
  assert isinstance(q.act_scale, ActScale)
  np.testing.assert_allclose(np.asarray(q(x_())), np.asarray(y), rtol=1e-5, atol=1e-5)


def test_qeinsum_modes():
  e = QEinsum("btk,kn->btn", (128, 64), (64,), rngs=nnx.Rngs(0))
  e.set_precision(W_SPECS["w4g64bf16"], QuantSpec(bits=8))
  y = e(x_())
  e.convert()
  assert isinstance(e.qvalue, QValue) and isinstance(e.qscale, QScale)
  assert not hasattr(e, "kernel") and e.qvalue[...].shape == (64, 64)
  np.testing.assert_allclose(np.asarray(e(x_())), np.asarray(y), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="per-tensor only"):
    QEinsum("btk,kn->btn", (128, 64), rngs=nnx.Rngs(0)).set_precision(None, A8)


@pytest.mark.parametrize("wname,act", [("w8", QuantSpec(bits=8)), ("w8", None),
                                       ("w4g64bf16", None), ("w4g32asym", QuantSpec(bits=8))],
                         ids=["w8-a8-tensor", "w8-a-float", "w4g64bf16-a-float", "w4g32asym-a8"])
def test_converted_qeinsum_calls_the_dispatch(wname, act, monkeypatch):
  """A matmul-shaped einsum ("btk,khd->bthd") goes through lowbit.kernels.qmatmul with the
  kernel as a [K, H*D] matrix: same numbers as fake-quant, through the XLA path and the
  Pallas kernel (interpreted); another einsum keeps the dequantize path."""
  spec = W_SPECS[wname]
  spec3 = QuantSpec(bits=spec.bits, symmetric=spec.symmetric, channel_axes=(1, 2),
                    group_size=spec.group_size, pack=spec.pack, scale_dtype=spec.scale_dtype)
  e = QEinsum("btk,khd->bthd", (128, 4, 16), (4, 16), rngs=nnx.Rngs(0))
  e.set_precision(spec3, act)
  y_fq = e(x_())
  e.convert()
  calls = []
  real = lowbit.kernels.qmatmul
  monkeypatch.setattr(lowbit.kernels, "qmatmul",
                      lambda x, w, **kw: calls.append(w.shape) or real(x, w, **kw))
  has_kernel = lowbit.kernels.kernel_for(e.quantized_weight().as_matrix(), act) is not None
  assert has_kernel == (wname == "w4g64bf16" or (wname == "w8" and act is not None))
  for impl in ("xla", "pallas") if has_kernel else ("xla",):
    e.implementation = impl
    y = e(x_())
    assert y.shape == (3, 5, 4, 16)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_fq), rtol=1e-5, atol=1e-5)
  assert calls and set(calls) == {(128, 64)}
  # not x[..., k] @ w[k, ...]: the kernel is contracted on another axis -> dequantize path
  e2 = QEinsum("bth,khd->btkd", (128, 5, 16), (128, 16), rngs=nnx.Rngs(0))
  e2.set_precision(QuantSpec(bits=8, channel_axes=(0, 2)), None)
  y2 = e2(x_((3, 7, 5)))
  e2.convert()
  calls.clear()
  np.testing.assert_allclose(np.asarray(e2(x_((3, 7, 5)))), np.asarray(y2), rtol=1e-5, atol=1e-5)
  assert not calls


def test_bad_specs_name_the_layer():
  q = QLinear(96, 32, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"group_size=64 does not divide axis 0 of "
                                       r"blocks/2/proj\.kernel"):
    q.set_precision(QuantSpec(bits=4, channel_axes=(1,), group_size=64), None,
                    path="blocks/2/proj")
  with pytest.raises(ValueError, match="pack_axis=1 is not the contraction axis"):
    q.set_precision(QuantSpec(bits=4, channel_axes=(0,), pack=True, pack_axis=1), None)
  with pytest.raises(ValueError, match="learn='lsq'"):
    q.set_precision(W_SPECS["w8"], None, learn="lsq")
  with pytest.raises(ValueError, match="set a precision first"):
    q.convert()


class UserMLP(nnx.Module):
  """A model written the way a user would, with plain nnx layers."""

  def __init__(self, rngs):
    self.embed = nnx.Embed(50, 64, rngs=rngs)
    self.fc1 = nnx.Linear(64, 256, rngs=rngs)
    self.norm = nnx.LayerNorm(256, rngs=rngs)
    self.heads = nnx.Einsum("btf,fhd->bthd", (256, 2, 32), rngs=rngs)
    self.blocks = nnx.List([nnx.Linear(64, 64, rngs=rngs) for _ in range(2)])
    self.out = nnx.Linear(64, 10, rngs=rngs)

  def __call__(self, tok):
    h = self.norm(jax.nn.relu(self.fc1(self.embed(tok))))
    h = self.heads(h).reshape(*tok.shape, 64)
    for b in self.blocks:
      h = h + jax.nn.relu(b(h))
    return self.out(h)


def test_quantize_model_on_a_user_model():
  model = UserMLP(nnx.Rngs(0))
  tok = jax.random.randint(jax.random.key(0), (2, 7), 0, 50)
  y_float = model(tok)
  policy = lowbit.PrecisionPolicy((
      lowbit.PrecisionRule("out", keep_float=True),
      lowbit.PrecisionRule(r"blocks/\d+", QuantSpec(bits=8, channel_axes=(1,)), A8),
      lowbit.PrecisionRule("heads", QuantSpec(bits=4, channel_axes=(1, 2), pack=True)),
      lowbit.PrecisionRule("fc.*", QuantSpec(bits=4, channel_axes=(1,), group_size=32,
                                             pack=True)),
  ))
  qm = lowbit.quantize_model(model, policy)
  # the original is untouched; the copy's matched layers are lowbit layers with the same weights
  assert type(model.fc1) is nnx.Linear and type(qm.fc1) is QLinear
  assert type(qm.heads) is QEinsum and type(qm.blocks[1]) is QLinear
  assert type(qm.out) is nnx.Linear and type(qm.norm) is nnx.LayerNorm
  np.testing.assert_array_equal(np.asarray(qm.fc1.kernel[...]), np.asarray(model.fc1.kernel[...]))
  y_fq = qm(tok)
  rel = float(jnp.linalg.norm(y_fq - y_float) / jnp.linalg.norm(y_float))
  assert 0 < rel < 0.2
  cv = lowbit.convert(qm)
  np.testing.assert_allclose(np.asarray(cv(tok)), np.asarray(y_fq), rtol=1e-4, atol=1e-5)
  rows = policy.explain(cv, print_table=False)
  by = {r["path"]: r for r in rows}
  assert by["out"]["rule"] == 0 and by["out"]["weight"] == "w-float"
  assert by["blocks/0"]["rule"] == 1 and by["blocks/1"]["act"] == "a8 per-token"
  assert by["heads"]["weight"] == "w4 per-channel" and by["heads"]["bytes"] == 256 * 64 // 2 + 64 * 4


@pytest.mark.parametrize("wname,act", [("w8", A8), ("w4", None), ("w4g64bf16", A8),
                                       ("w4g32asym", None)],
                         ids=["w8-a8", "w4-a-float", "w4g64bf16-a8", "w4g32asym-a-float"])
def test_weight_stored_k_major_gives_the_same_layer(wname, act):
  """convert(weight_layout="nk") stores [N, K] (int4: [N, K/2] bytes), the same bytes, and
  computes what the [K, N] layer computes; quantized_weight() is [K, N] again."""
  kn, nk = (QLinear(128, 64, rngs=nnx.Rngs(0)) for _ in range(2))
  for q in (kn, nk):
    q.set_precision(W_SPECS[wname], act)
  kn.convert()
  nk.convert(weight_layout="nk")
  assert nk.weight_layout == "nk" and kn.weight_layout == "kn"
  assert nk.qvalue[...].shape == kn.qvalue[...].shape[::-1]
  np.testing.assert_array_equal(np.asarray(nk.qvalue[...]), np.asarray(kn.qvalue[...]).T)
  np.testing.assert_array_equal(np.asarray(nk.qscale[...]), np.asarray(kn.qscale[...]).T)
  assert nk.weight_shape == kn.weight_shape == (128, 64)
  w_kn, w_nk = kn.quantized_weight(), nk.quantized_weight()
  assert w_nk.shape == (128, 64) and w_nk.pack_axis == w_kn.pack_axis
  np.testing.assert_array_equal(np.asarray(w_nk.qvalue), np.asarray(w_kn.qvalue))
  y_kn, y_nk = kn(x_()), nk(x_())
  np.testing.assert_allclose(np.asarray(y_nk), np.asarray(y_kn), rtol=1e-6, atol=1e-6)
  jitted = nnx.jit(lambda m, x: m(x))
  np.testing.assert_allclose(np.asarray(jitted(nk, x_())), np.asarray(y_kn), rtol=1e-5, atol=1e-5)


def test_k_major_storage_is_for_quantized_qlinear_only():
  e = QEinsum("btk,khd->bthd", (128, 4, 8), (4, 8), rngs=nnx.Rngs(0))
  e.set_precision(QuantSpec(bits=8, channel_axes=(1, 2)), None)
  with pytest.raises(ValueError, match="weight_layout='nk' is for QLinear"):
    e.convert(weight_layout="nk")
  q = QLinear(128, 64, rngs=nnx.Rngs(0))
  q.set_precision(W_SPECS["w8"], None)
  with pytest.raises(ValueError, match="use 'kn' or 'nk'"):
    q.convert(weight_layout="km")
