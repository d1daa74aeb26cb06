"""An independent float64 numpy forward of a LLaMA GGUF file, in llama.cpp's own conventions.

It reads the tensors with ``gguf.quants.dequantize`` (not lowbit), keeps
``attn_q`` / ``attn_k`` in the file's permuted row order and applies RoPE the
way llama.cpp's "normal" mode does, to adjacent pairs ``(x[2i], x[2i+1])``.
lowbit un-permutes the rows and rotates half-split pairs instead, so agreement
checks the permutation, the tokenizer-free forward and every tensor mapping.
"""

import gguf
import numpy as np


def _meta(reader, key):
  return reader.fields[key].contents()


def tensors(reader) -> dict[str, np.ndarray]:
  out = {}
  for t in reader.tensors:
    w = gguf.quants.dequantize(np.asarray(t.data), gguf.GGMLQuantizationType(t.tensor_type))
    out[t.name] = np.asarray(w, np.float64).reshape([int(d) for d in reversed(t.shape)])
  return out


def forward(reader, ids, w: dict[str, np.ndarray] | None = None) -> np.ndarray:
  """Logits ``[T, vocab]`` for one sequence of token ids (causal, positions 0..T-1)."""
  w = tensors(reader) if w is None else w
  n_layers = int(_meta(reader, "llama.block_count"))
  n_heads = int(_meta(reader, "llama.attention.head_count"))
  n_kv = int(_meta(reader, "llama.attention.head_count_kv"))
  eps = float(_meta(reader, "llama.attention.layer_norm_rms_epsilon"))
  base = float(_meta(reader, "llama.rope.freq_base"))
  x = w["token_embd.weight"][np.asarray(ids)]                  # [T, D]
  t, d = x.shape
  hd = d // n_heads
  pos = np.arange(t)[:, None]
  theta = pos * base ** (-np.arange(0, hd, 2) / hd)            # [T, hd/2]
  cos, sin = np.cos(theta)[:, None], np.sin(theta)[:, None]

  def rms(v, g):
    return v / np.sqrt(np.mean(v * v, -1, keepdims=True) + eps) * g

  def rope_pairs(v):                                           # [T, H, hd], adjacent pairs
    a, b = v[..., 0::2], v[..., 1::2]
    out = np.empty_like(v)
    out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
    return out

  mask = np.tril(np.ones((t, t), bool))
  for i in range(n_layers):
    p = f"blk.{i}."
    h = rms(x, w[p + "attn_norm.weight"])
    q = rope_pairs((h @ w[p + "attn_q.weight"].T).reshape(t, n_heads, hd))
    k = rope_pairs((h @ w[p + "attn_k.weight"].T).reshape(t, n_kv, hd))
    v = (h @ w[p + "attn_v.weight"].T).reshape(t, n_kv, hd)
    k, v = np.repeat(k, n_heads // n_kv, 1), np.repeat(v, n_heads // n_kv, 1)
    s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd)
    s = np.where(mask, s, -np.inf)
    s = np.exp(s - s.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    o = np.einsum("hqk,khd->qhd", s, v).reshape(t, d)
    x = x + o @ w[p + "attn_output.weight"].T
    h = rms(x, w[p + "ffn_norm.weight"])
    g = h @ w[p + "ffn_gate.weight"].T
    x = x + (g / (1 + np.exp(-g)) * (h @ w[p + "ffn_up.weight"].T)) @ w[p + "ffn_down.weight"].T
  x = rms(x, w["output_norm.weight"])
  head = w.get("output.weight", w["token_embd.weight"])
  return x @ head.T
