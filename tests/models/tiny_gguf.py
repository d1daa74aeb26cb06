"""Write a tiny random LLaMA GGUF file the way llama.cpp's converter does (for unit tests)."""

import pathlib

import gguf
import numpy as np

T = gguf.GGMLQuantizationType


def byte_tokens() -> list[str]:
  """GPT-2's 256 byte-level symbols (so any text tokenizes, with no merges)."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
      list(range(ord("®"), ord("ÿ") + 1))
  cs, n = bs[:], 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return [chr(c) for _, c in sorted(zip(bs, cs, strict=True))]


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp's convert_hf_to_gguf ``permute`` of q/k rows (half-split -> interleaved)."""
  return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def hf_weights(seed=0, n_layers=2, d=64, n_heads=4, n_kv=2, ff=128, vocab=260):
  """Random HF-layout weights ([out, in] linears) of a small LLaMA."""
  rng = np.random.default_rng(seed)
  hd = d // n_heads
  w = {"embed": rng.normal(0, 0.5, (vocab, d)), "final_norm": 1 + 0.1 * rng.normal(size=d)}
  for i in range(n_layers):
    for name, shape in (("q", (n_heads * hd, d)), ("k", (n_kv * hd, d)), ("v", (n_kv * hd, d)),
                        ("o", (d, n_heads * hd)), ("gate", (ff, d)), ("up", (ff, d)),
                        ("down", (d, ff))):
      w[f"{i}.{name}"] = rng.normal(0, shape[1] ** -0.5, shape)
    w[f"{i}.attn_norm"] = 1 + 0.1 * rng.normal(size=d)
    w[f"{i}.ffn_norm"] = 1 + 0.1 * rng.normal(size=d)
  cfg = dict(n_layers=n_layers, d=d, n_heads=n_heads, n_kv=n_kv, ff=ff, vocab=vocab)
  return {k: v.astype(np.float32) for k, v in w.items()}, cfg


_GGUF = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output", "gate": "ffn_gate",
         "up": "ffn_up", "down": "ffn_down"}


def write(path: pathlib.Path, w, cfg, *, linear_type=T.Q4_1, arch="llama", skip=(),
          rename=None, embed_type=T.Q8_0, pre="smollm") -> pathlib.Path:
  """Write ``w`` (from :func:`hf_weights`) as a GGUF llama file; linears as ``linear_type``."""
  wr = gguf.GGUFWriter(str(path), arch)
  wr.add_block_count(cfg["n_layers"])
  wr.add_context_length(256)
  wr.add_embedding_length(cfg["d"])
  wr.add_feed_forward_length(cfg["ff"])
  wr.add_head_count(cfg["n_heads"])
  wr.add_head_count_kv(cfg["n_kv"])
  wr.add_rope_freq_base(10000.0)
  wr.add_layer_norm_rms_eps(1e-5)
  wr.add_rope_dimension_count(cfg["d"] // cfg["n_heads"])
  wr.add_vocab_size(cfg["vocab"])
  toks = byte_tokens() + ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "ab"][: cfg["vocab"] - 256]
  wr.add_tokenizer_model("gpt2")
  wr.add_tokenizer_pre(pre)
  wr.add_token_list(toks)
  wr.add_token_merges(["a b"])
  wr.add_token_types([1] * 256 + [3] * (len(toks) - 257) + [1])

  def add(name, a, ttype):
    if name in skip:
      return
    name = (rename or {}).get(name, name)
    if ttype in (T.F32,):
      wr.add_tensor(name, a.astype(np.float32))
    else:
      wr.add_tensor(name, gguf.quants.quantize(a.astype(np.float32), ttype), raw_dtype=ttype)

  add("token_embd.weight", w["embed"], embed_type)
  for i in range(cfg["n_layers"]):
    for k, g in _GGUF.items():
      a = w[f"{i}.{k}"]
      if k == "q":
        a = permute(a, cfg["n_heads"])
      elif k == "k":
        a = permute(a, cfg["n_kv"])
      add(f"blk.{i}.{g}.weight", a, linear_type)
    add(f"blk.{i}.attn_norm.weight", w[f"{i}.attn_norm"], T.F32)
    add(f"blk.{i}.ffn_norm.weight", w[f"{i}.ffn_norm"], T.F32)
  add("output_norm.weight", w["final_norm"], T.F32)
  wr.write_header_to_file()
  wr.write_kv_data_to_file()
  wr.write_tensors_to_file()
  wr.close()
  return path
