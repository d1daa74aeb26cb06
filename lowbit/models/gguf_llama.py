"""Import a LLaMA-architecture GGUF file (llama.cpp's format) into lowbit.

* :func:`load_gguf`: the float model (a lowbit :class:`~lowbit.nn.Transformer`,
  LLaMA style), its tokenizer built from the GGUF metadata with ``tokenizers``,
  and the file's own int4 / int8 tensors as :class:`~lowbit.quant.QArray`.
* :func:`gguf_qarray`: one Q4_0 / Q4_1 / Q8_0 tensor straight into a ``QArray``
  (integer repacking only, no float round trip):

  ======  ==========================================  ===============================
  GGUF    block of 32 along the input axis             lowbit ``QArray``
  ======  ==========================================  ===============================
  Q4_0    fp16 ``d``; ``w = d * (u - 8)``, u in 0..15   symmetric int4, codes ``u - 8``
  Q4_1    fp16 ``d, m``; ``w = d * u + m``              asymmetric int4, ``"min"`` form
  Q8_0    fp16 ``d``; ``w = d * q``, q int8             symmetric int8
  ======  ==========================================  ===============================

  each with ``channel_axes=(1,)``, ``group_size=32`` on axis 0 of the ``[K, N]``
  kernel, fp16 scales; int4 packed two per byte along K.
* :func:`converted_from_gguf`: a converted (packed) lowbit model holding those
  codes, the file's precision kept as it is.

GGUF stores a linear weight as ``[N, K]`` rows (``ne0 = K`` fastest) and, for
LLaMA, the rows of ``attn_q`` / ``attn_k`` permuted for llama.cpp's
interleaved RoPE; lowbit's RoPE is the half-split form, so those rows are put
back (:func:`unpermute_rope_rows`).
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from lowbit.nn.surgery import flat_variables
from lowbit.nn.transformer import Transformer, TransformerConfig
from lowbit.quant import QArray, QuantSpec, dequantize, pack_int4

BLOCK = 32
QARRAY_TYPES = ("Q4_0", "Q4_1", "Q8_0")  # GGUF types gguf_qarray maps onto a QArray


@dataclasses.dataclass
class GGUFModel:
  """What :func:`load_gguf` returns.

  ``model``: the float Transformer (weights = the file's tensors dequantized);
  ``tokenizer``: a ``tokenizers.Tokenizer``; ``config``; ``qarrays``: ``{layer
  path: QArray}`` for the linear layers whose GGUF type maps to a ``QArray``;
  ``types``: ``{layer path: GGUF type name}``; ``meta``: the GGUF key/values
  (token lists left out).
  """

  model: Transformer
  tokenizer: Any
  config: TransformerConfig
  qarrays: dict[str, QArray]
  types: dict[str, str]
  meta: dict[str, Any]


def _gguf():
  try:
    import gguf
  except ImportError as e:  # pragma: no cover - eval extra
    raise ImportError("reading GGUF files needs the `gguf` package: pip install 'lowbit[eval]'.") from e
  return gguf


def _field(reader, key: str, default=None):
  f = reader.fields.get(key)
  if f is None:
    return default
  return f.contents()


def config_from_gguf(reader, *, max_len: int | None = None,
                     dtype: jnp.dtype | None = None) -> TransformerConfig:
  """The LLaMA-style :class:`TransformerConfig` that a GGUF's metadata describes."""
  arch = _field(reader, "general.architecture")
  if arch != "llama":
    raise ValueError(f"GGUF architecture {arch!r} is not supported; lowbit imports 'llama' "
                     "(LLaMA, SmolLM, Mistral-style) files.")

  def need(key):
    v = _field(reader, f"llama.{key}")
    if v is None:
      raise ValueError(f"GGUF metadata lacks llama.{key}; the file is incomplete.")
    return v

  d_model, n_heads = int(need("embedding_length")), int(need("attention.head_count"))
  rope_dim = _field(reader, "llama.rope.dimension_count")
  if rope_dim is not None and int(rope_dim) != d_model // n_heads:
    raise ValueError(f"GGUF llama.rope.dimension_count={rope_dim} is a partial rotary "
                     f"embedding (head_dim {d_model // n_heads}); lowbit rotates whole heads.")
  names = {t.name for t in reader.tensors}
  vocab = _field(reader, "llama.vocab_size")
  if vocab is None:
    vocab = int(next(t for t in reader.tensors if t.name == "token_embd.weight").shape[1])
  return TransformerConfig.llama(
      vocab_size=int(vocab), d_model=d_model, n_layers=int(need("block_count")),
      n_heads=n_heads, n_kv_heads=int(_field(reader, "llama.attention.head_count_kv", n_heads)),
      d_ff=int(need("feed_forward_length")),
      max_len=int(max_len or _field(reader, "llama.context_length", 2048)),
      rope_base=float(_field(reader, "llama.rope.freq_base", 10000.0)),
      norm_eps=float(need("attention.layer_norm_rms_epsilon")),
      tie_embeddings="output.weight" not in names, dtype=dtype)


def unpermute_rope_rows(n_out: int, n_heads: int) -> np.ndarray:
  """Column order that undoes llama.cpp's q/k permutation: ``hf[:, c] = gguf[:, perm[c]]``.

  llama.cpp stores head ``h``'s output ``2 i + j`` (interleaved pairs) where
  the half-split form has ``j * head_dim / 2 + i``. Shapes: ``[n_out]``.
  """
  hd = n_out // n_heads
  return np.arange(n_out).reshape(n_heads, hd // 2, 2).swapaxes(1, 2).reshape(-1)


def _blocks(raw: np.ndarray, n_out: int, k: int, block_bytes: int) -> np.ndarray:
  if k % BLOCK:
    raise ValueError(f"a row of {k} elements is not a whole number of {BLOCK}-element blocks.")
  return np.ascontiguousarray(raw).reshape(n_out, k // BLOCK, block_bytes)


def _f16(b: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(b).view(np.float16)[..., 0]


def gguf_qarray(tensor) -> QArray:
  """A 2-D Q4_0 / Q4_1 / Q8_0 GGUF tensor as a ``[K, N]`` QArray, codes copied as integers.

  See the module table for the formats. Raises ``ValueError`` naming the
  tensor for any other type or rank.
  """
  gguf = _gguf()
  T = gguf.GGMLQuantizationType
  name, ttype = tensor.name, T(tensor.tensor_type)
  if len(tensor.shape) != 2:
    raise ValueError(f"GGUF tensor {name!r} has shape {list(tensor.shape)}; only 2-D weights "
                     "map onto a QArray.")
  k, n = (int(d) for d in tensor.shape)  # ne0 = K (input), ne1 = N (output)
  raw = np.asarray(tensor.data)
  kw = dict(shape=(k, n), channel_axes=(1,), group_axis=0, group_size=BLOCK)
  if ttype in (T.Q4_0, T.Q4_1):
    bb = 18 if ttype == T.Q4_0 else 20
    blk = _blocks(raw, n, k, bb)
    d = _f16(blk[..., 0:2])                              # [N, K/32]
    qs = blk[..., bb - 16:]                              # [N, K/32, 16]
    u = np.concatenate([qs & 0xF, qs >> 4], axis=-1)    # element j low, j + 16 high
    codes = (u.astype(np.int8) - 8).reshape(n, k).T      # [K, N], signed
    qvalue = pack_int4(jnp.asarray(codes), axis=0)
    zero, form = None, "integer"
    if ttype == T.Q4_1:  # w = d u + m = (q - qmin) d + m with q = u - 8, qmin = -8
      zero, form = jnp.asarray(_f16(blk[..., 2:4]).T), "min"
    return QArray(qvalue, jnp.asarray(d.T), zero, 4, pack_axis=0, zero_point_form=form, **kw)
  if ttype == T.Q8_0:
    blk = _blocks(raw, n, k, 34)
    d = _f16(blk[..., 0:2])
    codes = np.ascontiguousarray(blk[..., 2:]).view(np.int8).reshape(n, k).T
    return QArray(jnp.asarray(codes), jnp.asarray(d.T), None, 8, **kw)
  raise ValueError(f"GGUF tensor {name!r} has type {ttype.name}; lowbit maps Q4_0, Q4_1 and Q8_0 "
                   "onto a QArray (others load as float through load_gguf).")


def spec_of(qa: QArray) -> QuantSpec:
  """The :class:`QuantSpec` whose quantizer produces ``qa``'s layout (for policies)."""
  return QuantSpec(bits=qa.bits, symmetric=qa.symmetric, channel_axes=qa.channel_axes,
                   group_size=qa.group_size, group_axis=qa.group_axis or 0,
                   zero_point_form=qa.zero_point_form, scale_dtype=qa.scale.dtype,
                   pack=qa.packed, pack_axis=qa.pack_axis or 0)


def _permute_cols(qa: QArray, perm: np.ndarray) -> QArray:
  take = lambda a: None if a is None else jnp.take(a, perm, axis=1)  # noqa: E731
  return dataclasses.replace(qa, qvalue=take(qa.qvalue), scale=take(qa.scale),
                             zero_point=take(qa.zero_point))


_LAYER = {"attn_q": "attn/q_proj", "attn_k": "attn/k_proj", "attn_v": "attn/v_proj",
          "attn_output": "attn/o_proj", "ffn_gate": "mlp/gate_proj", "ffn_up": "mlp/up_proj",
          "ffn_down": "mlp/down_proj"}
_NORM = {"attn_norm": "attn_norm", "ffn_norm": "mlp_norm"}


def _target(name: str, cfg: TransformerConfig) -> tuple[str, str]:
  """GGUF tensor name -> (lowbit state path, kind) with kind in linear|norm|embed|head."""
  if name == "token_embd.weight":
    return "embed/embedding", "embed"
  if name == "output_norm.weight":
    return "final_norm/scale", "norm"
  if name == "output.weight":
    return "lm_head/kernel", "linear"
  parts = name.split(".")
  if len(parts) == 4 and parts[0] == "blk" and parts[3] == "weight" and parts[1].isdigit():
    i, kind = int(parts[1]), parts[2]
    if i < cfg.n_layers and kind in _LAYER:
      return f"layers/{i}/{_LAYER[kind]}/kernel", "linear"
    if i < cfg.n_layers and kind in _NORM:
      return f"layers/{i}/{_NORM[kind]}/scale", "norm"
  raise ValueError(f"GGUF tensor {name!r} has no place in lowbit's LLaMA transformer "
                   f"(layers 0..{cfg.n_layers - 1}); the file's architecture differs.")


def load_gguf(path: str | pathlib.Path, *, max_len: int | None = None,
              dtype: jnp.dtype | None = None) -> GGUFModel:
  """Load a LLaMA GGUF file: float model, tokenizer, and the file's QArrays.

  Linear weights of a type :func:`gguf_qarray` maps are dequantized with
  :func:`lowbit.quant.dequantize` of that QArray (so re-quantizing on the same
  grid is exact); other types with ``gguf.quants.dequantize``. Every tensor is
  checked against the shape the config needs; errors name the tensor.
  """
  gguf = _gguf()
  path = pathlib.Path(path)
  if not path.exists():
    raise ValueError(f"GGUF file {path} does not exist.")
  reader = gguf.GGUFReader(str(path))
  cfg = config_from_gguf(reader, max_len=max_len, dtype=dtype)
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  flat = flat_variables(state)
  qarrays, types, seen = {}, {}, set()
  for t in reader.tensors:
    target, kind = _target(t.name, cfg)
    var = flat[target]
    want = tuple(var.get_value().shape)
    ttype = gguf.GGMLQuantizationType(t.tensor_type)
    if kind == "linear":
      k, n = (int(d) for d in t.shape)
      if (k, n) != want:
        raise ValueError(f"GGUF tensor {t.name!r} is [{n}, {k}] (out, in); {target} needs "
                         f"[{want[1]}, {want[0]}].")
      layer = target.rsplit("/", 1)[0]
      perm = None
      if t.name.endswith(("attn_q.weight", "attn_k.weight")):
        heads = cfg.n_heads if "attn_q" in t.name else cfg.kv_heads
        perm = unpermute_rope_rows(n, heads)
      if ttype.name in QARRAY_TYPES:
        qa = gguf_qarray(t)
        if perm is not None:
          qa = _permute_cols(qa, perm)
        qarrays[layer], types[layer] = qa, ttype.name
        value = dequantize(qa)
      else:
        w = gguf.quants.dequantize(np.asarray(t.data), ttype).reshape(n, k).T
        value = jnp.asarray(w[:, perm] if perm is not None else w, jnp.float32)
        types[layer] = ttype.name
    else:
      value = jnp.asarray(gguf.quants.dequantize(np.asarray(t.data), ttype), jnp.float32)
      value = value.reshape(want) if value.size == int(np.prod(want)) else value
      if tuple(value.shape) != want:
        raise ValueError(f"GGUF tensor {t.name!r} has shape {list(value.shape)}; {target} needs "
                         f"{list(want)}.")
    var.set_value(value.astype(var.get_value().dtype))
    seen.add(target)
  missing = sorted(set(flat) - seen)
  if missing:
    raise ValueError(f"{path}: no GGUF tensor for {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
                     "the file is incomplete or its layer count differs.")
  model = nnx.merge(graphdef, state)
  meta = {k: _field(reader, k) for k in reader.fields
          if not k.startswith("tokenizer.ggml.") or k.endswith(("model", "pre", "_id", "prefix"))}
  return GGUFModel(model, gguf_tokenizer(reader), cfg, qarrays, types, meta)


def gguf_tokenizer(reader):
  """A ``tokenizers.Tokenizer`` from the GGUF's ``tokenizer.ggml.*`` metadata (byte-level BPE).

  Supported: ``tokenizer.ggml.model == "gpt2"`` with the ``pre`` tokenizers
  ``"gpt2"`` and ``"smollm"`` (digits split one by one, then GPT-2's regex).
  Control tokens (type 3) are added as special tokens.
  """
  try:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  except ImportError as e:  # pragma: no cover - eval extra
    raise ImportError("the GGUF tokenizer needs `tokenizers`: pip install 'lowbit[eval]'.") from e
  kind, pre = _field(reader, "tokenizer.ggml.model"), _field(reader, "tokenizer.ggml.pre", "gpt2")
  if kind != "gpt2":
    raise ValueError(f"GGUF tokenizer.ggml.model={kind!r} is not supported; lowbit builds "
                     "byte-level BPE ('gpt2') tokenizers.")
  steps = {"gpt2": [], "smollm": [pre_tokenizers.Digits(individual_digits=True)]}
  if pre not in steps:
    raise ValueError(f"GGUF tokenizer.ggml.pre={pre!r} is not supported; known: {sorted(steps)}.")
  tokens = _field(reader, "tokenizer.ggml.tokens")
  merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
  types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
  tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                             fuse_unk=False))
  tok.pre_tokenizer = pre_tokenizers.Sequence(
      steps[pre] + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([t for t, ty in zip(tokens, types, strict=True) if ty == 3])
  return tok


def converted_from_gguf(loaded: GGUFModel) -> nnx.Module:
  """A converted lowbit model holding the GGUF file's own codes and scales.

  Every linear layer with a QArray in ``loaded.qarrays`` is converted at that
  QArray's precision (:func:`spec_of`) and then given the file's arrays
  unchanged: the packed int4 in memory is the file's int4, repacked.
  """
  from lowbit.nn.surgery import convert, quantizable_layers, quantize_model

  model = convert(quantize_model(loaded.model, gguf_policy(loaded)))
  layers = quantizable_layers(model)
  for p, qa in loaded.qarrays.items():
    layer = layers[p]
    layer.qvalue.set_value(qa.qvalue)
    layer.qscale.set_value(qa.scale)
    if qa.zero_point is not None:
      layer.qzero.set_value(qa.zero_point)
  return model


def gguf_policy(loaded: GGUFModel):
  """The precision policy the file itself has: one rule per distinct QArray layout.

  Layers whose GGUF type has no QArray (F32, K-quants) stay float.
  """
  import re

  from lowbit.policy import PrecisionPolicy, PrecisionRule

  by_spec: dict[QuantSpec, list[str]] = {}
  for path, qa in loaded.qarrays.items():
    by_spec.setdefault(spec_of(qa), []).append(path)
  return PrecisionPolicy(tuple(
      PrecisionRule("|".join(re.escape(p) for p in paths), weight=spec)
      for spec, paths in by_spec.items()))
