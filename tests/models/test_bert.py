"""The BERT importer and the encoder on a tiny random safetensors file (no download)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from lowbit.models import bert
from lowbit.nn import quantizable_layers, sentence_embedding

from . import bert_reference

CFG = dict(model_type="bert", vocab_size=40, hidden_size=32, num_hidden_layers=2,
           num_attention_heads=4, intermediate_size=64, max_position_embeddings=16,
           type_vocab_size=2, layer_norm_eps=1e-12, hidden_act="gelu")


def tiny_weights(seed=0):
  rng = np.random.default_rng(seed)
  d, ff = CFG["hidden_size"], CFG["intermediate_size"]
  w = {"embeddings.word_embeddings.weight": rng.normal(0, 1, (CFG["vocab_size"], d)),
       "embeddings.position_embeddings.weight": rng.normal(0, 0.1, (16, d)),
       "embeddings.token_type_embeddings.weight": rng.normal(0, 0.1, (2, d)),
       "embeddings.LayerNorm.weight": 1 + 0.1 * rng.normal(size=d),
       "embeddings.LayerNorm.bias": 0.1 * rng.normal(size=d),
       "embeddings.position_ids": np.arange(16)[None].astype(np.int64),
       "pooler.dense.weight": rng.normal(size=(d, d)), "pooler.dense.bias": np.zeros(d)}
  for i in range(CFG["num_hidden_layers"]):
    p = f"encoder.layer.{i}."
    for name, (o, k) in {"attention.self.query": (d, d), "attention.self.key": (d, d),
                         "attention.self.value": (d, d), "attention.output.dense": (d, d),
                         "intermediate.dense": (ff, d), "output.dense": (d, ff)}.items():
      w[p + name + ".weight"] = rng.normal(0, k ** -0.5, (o, k))
      w[p + name + ".bias"] = 0.1 * rng.normal(size=o)
    for name in ("attention.output.LayerNorm", "output.LayerNorm"):
      w[p + name + ".weight"] = 1 + 0.1 * rng.normal(size=d)
      w[p + name + ".bias"] = 0.1 * rng.normal(size=d)
  return {k: v if v.dtype == np.int64 else v.astype(np.float32) for k, v in w.items()}


def write(tmp_path, w, cfg=CFG):
  save_file(w, str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  return tmp_path / "model.safetensors", tmp_path / "config.json"


def test_encoder_matches_the_numpy_bert_reference_with_padding(tmp_path):
  w = tiny_weights()
  m = bert.load_bert(*write(tmp_path, w))
  rng = np.random.default_rng(1)
  ids = rng.integers(1, CFG["vocab_size"], (3, 11)).astype(np.int32)
  mask = np.ones((3, 11), bool)
  mask[1, 7:] = False
  mask[2, 3:] = False
  ids[~mask] = 0
  ours = np.asarray(sentence_embedding(m.model(jnp.asarray(ids), jnp.asarray(mask)), jnp.asarray(mask)))
  ref = bert_reference.embed(w, CFG, ids, mask)
  np.testing.assert_allclose(ours, ref, atol=1e-5)
  # padding does not leak: row 2 alone (3 tokens) embeds the same as in the padded batch
  alone = m.model(jnp.asarray(ids[2:, :3]), jnp.asarray(mask[2:, :3]))
  np.testing.assert_allclose(np.asarray(sentence_embedding(alone, jnp.asarray(mask[2:, :3]))),
                             ours[2:], atol=1e-6)


def test_encoder_layers_have_the_decoder_paths(tmp_path):
  m = bert.load_bert(*write(tmp_path, tiny_weights()))
  paths = sorted(quantizable_layers(m.model))
  assert paths[:6] == ["layers/0/attn/k_proj", "layers/0/attn/o_proj", "layers/0/attn/q_proj",
                       "layers/0/attn/v_proj", "layers/0/mlp/down_proj", "layers/0/mlp/up_proj"]
  assert len(paths) == 12


def test_missing_tensor_is_named(tmp_path):
  w = tiny_weights()
  del w["encoder.layer.1.intermediate.dense.bias"]
  with pytest.raises(ValueError, match=r"'encoder.layer.1.intermediate.dense.bias' \(for "
                                       r"layers/1/mlp/up_proj/bias\) is missing"):
    bert.load_bert(*write(tmp_path, w))


def test_shape_mismatch_is_named(tmp_path):
  w = tiny_weights()
  w["encoder.layer.0.attention.self.key.weight"] = w["encoder.layer.0.attention.self.key.weight"][:16]
  with pytest.raises(ValueError, match=r"'encoder.layer.0.attention.self.key.weight' has shape "
                                       r"\[16, 32\]; layers/0/attn/k_proj/kernel needs \[32, 32\]"):
    bert.load_bert(*write(tmp_path, w))


def test_unsupported_config(tmp_path):
  with pytest.raises(ValueError, match="hidden_act='relu'"):
    bert.load_bert(*write(tmp_path, tiny_weights(), dict(CFG, hidden_act="relu")))
  with pytest.raises(ValueError, match="model_type='roberta'"):
    bert.load_bert(*write(tmp_path, tiny_weights(), dict(CFG, model_type="roberta")))
