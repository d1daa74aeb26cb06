"""Import a BERT-family encoder (e.g. all-MiniLM-L6-v2) from safetensors into lowbit.

:func:`load_bert` reads HF's ``config.json``, ``model.safetensors`` (with numpy:
no torch) and ``tokenizer.json``, and returns a float
:class:`~lowbit.nn.Encoder` with its tokenizer. :func:`embed_sentences` gives
sentence-transformers' embeddings: mean pooling over the attention mask, then
L2 normalization.

Weight mapping (HF ``[out, in]`` linears are transposed to lowbit's ``[in, out]``):

=============================================  ==========================
HF tensor                                      lowbit path
=============================================  ==========================
embeddings.{word,position,token_type}_emb...   embed / pos_embed / type_embed
embeddings.LayerNorm                           embed_norm
encoder.layer.i.attention.self.{query,key,v.}  layers/i/attn/{q,k,v}_proj
encoder.layer.i.attention.output.dense         layers/i/attn/o_proj
encoder.layer.i.attention.output.LayerNorm     layers/i/attn_norm
encoder.layer.i.intermediate.dense             layers/i/mlp/up_proj
encoder.layer.i.output.dense                   layers/i/mlp/down_proj
encoder.layer.i.output.LayerNorm               layers/i/mlp_norm
=============================================  ==========================
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from lowbit.nn.encoder import Encoder, EncoderConfig, sentence_embedding
from lowbit.nn.surgery import flat_variables


@dataclasses.dataclass
class BertModel:
  """What :func:`load_bert` returns: the float encoder, its tokenizer and config."""

  model: Encoder
  tokenizer: Any
  config: EncoderConfig


def config_from_hf(cfg: dict[str, Any]) -> EncoderConfig:
  """An :class:`EncoderConfig` from a HF BERT ``config.json`` dict."""
  if cfg.get("model_type") not in ("bert", None):
    raise ValueError(f"config.json model_type={cfg.get('model_type')!r}; lowbit loads 'bert' encoders.")
  act = cfg.get("hidden_act", "gelu")
  if act not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
    raise ValueError(f"config.json hidden_act={act!r} is not supported (gelu variants only).")
  if cfg.get("position_embedding_type", "absolute") != "absolute":
    raise ValueError("only absolute position embeddings are supported.")
  return EncoderConfig(
      vocab_size=cfg["vocab_size"], d_model=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"],
      n_heads=cfg["num_attention_heads"], d_ff=cfg["intermediate_size"],
      max_len=cfg["max_position_embeddings"], type_vocab_size=cfg.get("type_vocab_size", 2),
      norm_eps=cfg.get("layer_norm_eps", 1e-12), gelu_approximate=act != "gelu")


def _mapping(n_layers: int) -> dict[str, tuple[str, bool]]:
  """lowbit state path -> (HF tensor name, transpose)."""
  m = {"embed/embedding": ("embeddings.word_embeddings.weight", False),
       "pos_embed/embedding": ("embeddings.position_embeddings.weight", False),
       "type_embed/embedding": ("embeddings.token_type_embeddings.weight", False),
       "embed_norm/scale": ("embeddings.LayerNorm.weight", False),
       "embed_norm/bias": ("embeddings.LayerNorm.bias", False)}
  linears = {"attn/q_proj": "attention.self.query", "attn/k_proj": "attention.self.key",
             "attn/v_proj": "attention.self.value", "attn/o_proj": "attention.output.dense",
             "mlp/up_proj": "intermediate.dense", "mlp/down_proj": "output.dense"}
  norms = {"attn_norm": "attention.output.LayerNorm", "mlp_norm": "output.LayerNorm"}
  for i in range(n_layers):
    hf = f"encoder.layer.{i}."
    for ours, theirs in linears.items():
      m[f"layers/{i}/{ours}/kernel"] = (hf + theirs + ".weight", True)
      m[f"layers/{i}/{ours}/bias"] = (hf + theirs + ".bias", False)
    for ours, theirs in norms.items():
      m[f"layers/{i}/{ours}/scale"] = (hf + theirs + ".weight", False)
      m[f"layers/{i}/{ours}/bias"] = (hf + theirs + ".bias", False)
  return m


def load_bert(model_file: str | pathlib.Path, config_file: str | pathlib.Path,
              tokenizer_file: str | pathlib.Path | None = None) -> BertModel:
  """Load a BERT encoder from ``model.safetensors`` + ``config.json`` (+ ``tokenizer.json``).

  Errors name the tensor: a missing one, or one whose shape differs from what
  the config needs. Tensors the encoder does not use (the pooler,
  ``position_ids``) are ignored.
  """
  try:
    from safetensors.numpy import load_file
  except ImportError as e:  # pragma: no cover - eval extra
    raise ImportError("loading safetensors needs `safetensors`: pip install 'lowbit[eval]'.") from e
  cfg = config_from_hf(json.loads(pathlib.Path(config_file).read_text()))
  tensors = load_file(str(model_file))
  abstract = nnx.eval_shape(lambda: Encoder(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  flat = flat_variables(state)
  mapping = _mapping(cfg.n_layers)
  assert set(mapping) == set(flat), sorted(set(mapping) ^ set(flat))
  for path, (name, transpose) in mapping.items():
    if name not in tensors:
      raise ValueError(f"{model_file}: tensor {name!r} (for {path}) is missing.")
    a = tensors[name].T if transpose else tensors[name]
    want = tuple(flat[path].get_value().shape)
    if a.shape != want:
      raise ValueError(f"{model_file}: tensor {name!r} has shape {list(tensors[name].shape)}; "
                       f"{path} needs {list(want[::-1] if transpose else want)} for this config.")
    flat[path].set_value(jnp.asarray(a, flat[path].get_value().dtype))
  tok = bert_tokenizer(tokenizer_file, cfg.max_len) if tokenizer_file else None
  return BertModel(nnx.merge(graphdef, state), tok, cfg)


def bert_tokenizer(path: str | pathlib.Path, max_len: int = 512):
  """The ``tokenizers.Tokenizer`` of ``tokenizer.json``, truncating at ``max_len``, padding to
  the longest sequence of a batch (the file's own fixed 128-token padding is overridden)."""
  from tokenizers import Tokenizer
  tok = Tokenizer.from_file(str(path))
  tok.enable_truncation(max_length=max_len)
  pad = tok.token_to_id("[PAD]")
  tok.enable_padding(pad_id=0 if pad is None else pad, pad_token="[PAD]")
  return tok


def tokenize(tokenizer, sentences: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """``(ids [B, T] int32, mask [B, T] bool)`` padded to the longest sentence."""
  enc = tokenizer.encode_batch(list(sentences))
  ids = np.array([e.ids for e in enc], np.int32)
  mask = np.array([e.attention_mask for e in enc], bool)
  return ids, mask


def embed_sentences(model: Encoder, tokenizer, sentences: Sequence[str],
                    batch_size: int = 64) -> np.ndarray:
  """Sentence embeddings ``[len(sentences), D]`` (f32, unit norm), in batches."""
  fwd = nnx.jit(lambda m, ids, mask: sentence_embedding(m(ids, mask), mask))
  out = []
  for i in range(0, len(sentences), batch_size):
    ids, mask = tokenize(tokenizer, sentences[i:i + batch_size])
    out.append(np.asarray(fwd(model, jnp.asarray(ids), jnp.asarray(mask))))
  return np.concatenate(out) if out else np.zeros((0, model.cfg.d_model), np.float32)
