"""An independent float64 numpy forward of a HF BERT safetensors file (for the MiniLM tests).

It reads HF tensor names directly (no lowbit mapping) and follows HF's
``BertModel``: embeddings + LayerNorm, post-LN blocks, exact (erf) GELU, then
sentence-transformers' mean pooling and L2 normalization.
"""

import numpy as np
from scipy.special import erf


def _ln(x, w, b, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * w + b


def embed(w: dict[str, np.ndarray], cfg: dict, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Sentence embeddings ``[B, D]`` for ``ids, mask [B, T]``."""
  w = {k: np.asarray(v, np.float64) for k, v in w.items()}
  eps, nh = cfg["layer_norm_eps"], cfg["num_attention_heads"]
  b, t = ids.shape
  x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:t]
       + w["embeddings.token_type_embeddings.weight"][0])
  x = _ln(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)
  d = x.shape[-1]
  hd = d // nh
  bias = np.where(mask[:, None, None, :], 0.0, -1e30)

  def lin(h, name):
    return h @ w[name + ".weight"].T + w[name + ".bias"]

  for i in range(cfg["num_hidden_layers"]):
    p = f"encoder.layer.{i}."
    q, k, v = (lin(x, p + f"attention.self.{n}").reshape(b, t, nh, hd) for n in ("query", "key", "value"))
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd) + bias
    s = np.exp(s - s.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    o = np.einsum("bhqk,bkhd->bqhd", s, v).reshape(b, t, d)
    x = _ln(x + lin(o, p + "attention.output.dense"), w[p + "attention.output.LayerNorm.weight"],
            w[p + "attention.output.LayerNorm.bias"], eps)
    h = lin(x, p + "intermediate.dense")
    h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
    x = _ln(x + lin(h, p + "output.dense"), w[p + "output.LayerNorm.weight"],
            w[p + "output.LayerNorm.bias"], eps)
  m = mask[..., None].astype(np.float64)
  e = (x * m).sum(1) / np.maximum(m.sum(1), 1e-9)
  return e / np.linalg.norm(e, axis=-1, keepdims=True)
