"""The GGUF importer on tiny files written like llama.cpp writes them (no download)."""

import gguf
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit.models import gguf_llama
from lowbit.nn import convert, quantizable_layers, quantize_model
from lowbit.policy import PrecisionPolicy, PrecisionRule
from lowbit.quant import QuantSpec, dequantize

from . import llama_reference, tiny_gguf

T = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  w, cfg = tiny_gguf.hf_weights()
  path = tiny_gguf.write(tmp_path_factory.mktemp("gguf") / "tiny.gguf", w, cfg)
  return path, w, cfg


@pytest.mark.parametrize("ttype", [T.Q4_0, T.Q4_1, T.Q8_0], ids=lambda t: t.name)
def test_gguf_qarray_equals_ggufs_own_dequantize(tmp_path, ttype):
  w, cfg = tiny_gguf.hf_weights(seed=1)
  path = tiny_gguf.write(tmp_path / "t.gguf", w, cfg, linear_type=ttype)
  reader = gguf.GGUFReader(str(path))
  t = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
  qa = gguf_llama.gguf_qarray(t)
  ref = gguf.quants.dequantize(np.asarray(t.data), ttype).T           # [K, N]
  assert qa.shape == ref.shape and qa.group_size == 32 and qa.channel_axes == (1,)
  assert qa.scale.dtype == jnp.float16
  if ttype != T.Q8_0:
    assert qa.packed and qa.qvalue.dtype == jnp.uint8 and qa.qvalue.shape == (ref.shape[0] // 2,
                                                                             ref.shape[1])
  np.testing.assert_allclose(np.asarray(dequantize(qa)), ref, rtol=0, atol=1e-6 * np.abs(ref).max())
  assert qa.zero_point_form == ("min" if ttype == T.Q4_1 else "integer")


def test_config_tokenizer_and_weights_land_where_they_belong(tiny):
  path, w, cfg = tiny
  g = gguf_llama.load_gguf(path)
  c = g.config
  assert (c.n_layers, c.d_model, c.n_heads, c.kv_heads, c.ff, c.vocab_size) == (
      cfg["n_layers"], cfg["d"], cfg["n_heads"], cfg["n_kv"], cfg["ff"], cfg["vocab"])
  assert c.tie_embeddings and c.norm == "rmsnorm" and c.pos == "rope" and c.rope_base == 10000.0
  assert set(g.types.values()) == {"Q4_1"} and len(g.qarrays) == 7 * cfg["n_layers"]
  # q_proj after un-permuting is the HF weight (to Q4_1 precision), not the permuted one
  q = np.asarray(g.model.layers[0].attn.q_proj.kernel[...]).T
  err = np.abs(q - w["0.q"]).max()
  assert err < 0.2 * np.abs(w["0.q"]).max(), err
  assert np.abs(q - tiny_gguf.permute(w["0.q"], cfg["n_heads"])).max() > 3 * err
  np.testing.assert_array_equal(np.asarray(g.model.final_norm.scale[...]), w["final_norm"])
  text = "To be, or not to be: 1234 ab<|im_start|>"
  ids = g.tokenizer.encode(text).ids
  assert g.tokenizer.decode(ids, skip_special_tokens=False) == text
  assert ids[-1] == 257 and 259 in ids                   # the special token and the 'a b' merge


def test_float_forward_matches_the_numpy_llama_cpp_reference(tiny):
  path, _, cfg = tiny
  g = gguf_llama.load_gguf(path)
  ids = np.random.default_rng(0).integers(0, cfg["vocab"], 24)
  ours = np.asarray(g.model(jnp.asarray(ids[None], jnp.int32))[0], np.float64)
  ref = llama_reference.forward(gguf.GGUFReader(str(path)), ids)
  np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-5 * np.abs(ref).max())


def test_converted_model_holds_the_files_codes_and_gives_the_float_logits(tiny):
  path, _, cfg = tiny
  g = gguf_llama.load_gguf(path)
  conv = gguf_llama.converted_from_gguf(g)
  layers = quantizable_layers(conv)
  for p, qa in g.qarrays.items():
    np.testing.assert_array_equal(np.asarray(layers[p].qvalue[...]), np.asarray(qa.qvalue))
    assert layers[p].mode == "converted" and not hasattr(layers[p], "kernel")
  ids = jnp.asarray(np.random.default_rng(1).integers(0, cfg["vocab"], (2, 16)), jnp.int32)
  np.testing.assert_array_equal(np.asarray(conv(ids)), np.asarray(g.model(ids)))


def test_asymmetric_group32_min_form_requantization_is_the_identity(tiny):
  """The weights lie on a Q4_1 grid: re-quantizing with that scheme changes nothing."""
  path, _, cfg = tiny
  g = gguf_llama.load_gguf(path)
  spec = QuantSpec(bits=4, symmetric=False, zero_point_form="min", channel_axes=(1,),
                   group_size=32, pack=True, scale_dtype=jnp.float16)
  policy = PrecisionPolicy((PrecisionRule(r"layers/.*", weight=spec),))
  conv = convert(quantize_model(g.model, policy))
  layers = quantizable_layers(conv)
  for p, qa in g.qarrays.items():
    for mine, theirs in ((layers[p].qvalue, qa.qvalue), (layers[p].qscale, qa.scale),
                         (layers[p].qzero, qa.zero_point)):
      np.testing.assert_array_equal(np.asarray(mine[...]), np.asarray(theirs), err_msg=p)
  ids = jnp.asarray(np.random.default_rng(2).integers(0, cfg["vocab"], (2, 16)), jnp.int32)
  np.testing.assert_array_equal(np.asarray(conv(ids)), np.asarray(g.model(ids)))


def test_other_types_load_as_float(tmp_path):
  w, cfg = tiny_gguf.hf_weights(seed=3)
  path = tiny_gguf.write(tmp_path / "f.gguf", w, cfg, linear_type=T.F32, embed_type=T.F32)
  g = gguf_llama.load_gguf(path)
  assert g.qarrays == {} and set(g.types.values()) == {"F32"}
  np.testing.assert_array_equal(np.asarray(g.model.layers[1].attn.k_proj.kernel[...]).T, w["1.k"])
  np.testing.assert_array_equal(np.asarray(g.model.embed.embedding[...]), w["embed"])


# --------------------------------------------------------------------------- bad input


def test_unsupported_architecture(tmp_path):
  w, cfg = tiny_gguf.hf_weights()
  path = tiny_gguf.write(tmp_path / "a.gguf", w, cfg, arch="gpt2")
  with pytest.raises(ValueError, match="architecture 'gpt2' is not supported"):
    gguf_llama.load_gguf(path)


def test_unsupported_tensor_type_names_the_tensor(tmp_path):
  w, cfg = tiny_gguf.hf_weights()
  path = tiny_gguf.write(tmp_path / "f.gguf", w, cfg, linear_type=T.F32)
  t = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "blk.1.ffn_up.weight")
  with pytest.raises(ValueError, match=r"'blk.1.ffn_up.weight' has type F32"):
    gguf_llama.gguf_qarray(t)


def test_missing_tensor_is_named(tmp_path):
  w, cfg = tiny_gguf.hf_weights()
  path = tiny_gguf.write(tmp_path / "m.gguf", w, cfg, skip=("blk.1.ffn_gate.weight",))
  with pytest.raises(ValueError, match="no GGUF tensor for .*layers/1/mlp/gate_proj/kernel"):
    gguf_llama.load_gguf(path)


def test_shape_mismatch_is_named(tmp_path):
  w, cfg = tiny_gguf.hf_weights()
  w = dict(w)
  w["0.up"] = w["0.up"][:96]                     # 96 instead of ff=128 output rows
  path = tiny_gguf.write(tmp_path / "s.gguf", w, cfg)
  with pytest.raises(ValueError, match=r"'blk.0.ffn_up.weight' is \[96, 64\]"):
    gguf_llama.load_gguf(path)


def test_unknown_tensor_and_unknown_pretokenizer(tmp_path):
  w, cfg = tiny_gguf.hf_weights()
  path = tiny_gguf.write(tmp_path / "u.gguf", w, cfg, rename={"blk.0.ffn_up.weight": "blk.0.ffn_up2.weight"})
  with pytest.raises(ValueError, match="'blk.0.ffn_up2.weight' has no place"):
    gguf_llama.load_gguf(path)
  path = tiny_gguf.write(tmp_path / "p.gguf", w, cfg, pre="qwen2")
  with pytest.raises(ValueError, match="pre='qwen2' is not supported"):
    gguf_llama.load_gguf(path)


def test_spec_of_round_trips_a_qarray_layout(tiny):
  g = gguf_llama.load_gguf(tiny[0])
  qa = next(iter(g.qarrays.values()))
  spec = gguf_llama.spec_of(qa)
  assert spec.zero_point_form == "min" and spec.scale_dtype == jnp.float16 and spec.pack
  assert spec.resolve(qa.shape).scale_shape == qa.scale.shape
