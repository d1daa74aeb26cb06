"""The transformer: float == a plain-JAX forward; each ready-made policy converts exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lowbit
from lowbit.nn import Transformer, TransformerConfig, set_implementation

GPT2 = TransformerConfig.gpt2(vocab_size=65, d_model=128, n_layers=2, n_heads=4, max_len=32)
LLAMA = TransformerConfig.llama(vocab_size=96, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2,
                                d_ff=256, max_len=32, rope_base=1e5)


def tokens(cfg, b=2, t=16, seed=0):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, cfg.vocab_size)


def plain_forward(m: Transformer, tok):
  """A hand-written forward from the raw parameter arrays (no lowbit/nnx modules)."""
  cfg = m.cfg
  P = lambda v: v[...]  # noqa: E731

  def norm(mod, x):
    if cfg.norm == "rmsnorm":
      return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + cfg.norm_eps) * P(mod.scale)
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / jnp.sqrt(var + cfg.norm_eps) * P(mod.scale) + P(mod.bias)

  def lin(mod, x):
    y = x @ P(mod.kernel)
    return y + P(mod.bias) if mod.bias is not None else y

  def rot(x):  # [B, T, H, D]
    d = x.shape[-1]
    f = cfg.rope_base ** (-np.arange(0, d // 2) * 2.0 / d)
    a = np.arange(x.shape[1])[:, None] * f[None]
    c, s = np.cos(a)[None, :, None], np.sin(a)[None, :, None]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)

  b, t = tok.shape
  h = P(m.embed.embedding)[tok]
  if cfg.pos == "learned":
    h = h + P(m.pos_embed.embedding)[:t]
  hd, H, KV = cfg.head_dim, cfg.n_heads, cfg.kv_heads
  for blk in m.layers:
    x = norm(blk.attn_norm, h)
    q = lin(blk.attn.q_proj, x).reshape(b, t, H, hd)
    k = lin(blk.attn.k_proj, x).reshape(b, t, KV, hd)
    v = lin(blk.attn.v_proj, x).reshape(b, t, KV, hd)
    if cfg.pos == "rope":
      q, k = rot(q), rot(k)
    k, v = np.repeat(k, H // KV, 2), np.repeat(v, H // KV, 2)
    att = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd)
    att = np.where(np.tril(np.ones((t, t), bool)), att, -np.inf)
    att = jax.nn.softmax(att, -1)
    o = np.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, t, H * hd)
    h = h + lin(blk.attn.o_proj, o)
    x = norm(blk.mlp_norm, h)
    if cfg.mlp == "swiglu":
      u = jax.nn.silu(lin(blk.mlp.gate_proj, x)) * lin(blk.mlp.up_proj, x)
    else:
      u = jax.nn.gelu(lin(blk.mlp.up_proj, x), approximate=False)
    h = h + lin(blk.mlp.down_proj, u)
  h = norm(m.final_norm, h)
  return h @ P(m.embed.embedding).T if cfg.tie_embeddings else h @ P(m.lm_head.kernel)


@pytest.mark.parametrize("cfg", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_float_forward_matches_plain_jax(cfg):
  m = Transformer(cfg, rngs=nnx.Rngs(0))
  tok = tokens(cfg)
  with jax.default_matmul_precision("highest"):
    ours = m(tok)
    ref = plain_forward(m, tok)
  assert ours.shape == (2, 16, cfg.vocab_size)
  # tolerance: f32 with differently ordered reductions
  np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-4, atol=1e-4)


def test_module_paths_are_stable_and_readable():
  paths = set(lowbit.nn.quantizable_layers(Transformer(LLAMA, rngs=nnx.Rngs(0))))
  assert {"layers/1/attn/q_proj", "layers/1/attn/k_proj", "layers/0/mlp/down_proj",
          "layers/0/mlp/gate_proj"} <= paths
  assert "lm_head" not in paths  # tied
  assert "lm_head" in lowbit.nn.quantizable_layers(Transformer(GPT2, rngs=nnx.Rngs(0)))


def _ready_made_cases():
  """Every ready-made policy on both configs; integer group scales on GPT-2 run with the
  slow set (LLaMA keeps them in the default suite: the same layers, ~10 s less)."""
  out = []
  for name in lowbit.policy.READY_MADE:
    for cid, cfg in (("gpt2", GPT2), ("llama", LLAMA)):
      slow = name.endswith("-int") and cid == "gpt2"
      out.append(pytest.param(cfg, name, id=f"{cid}-{name}",
                              marks=[pytest.mark.slow] if slow else []))
  return out


@pytest.mark.parametrize("cfg,name", _ready_made_cases())
def test_ready_made_policies_convert_exactly(cfg, name):
  policy = lowbit.policy.READY_MADE[name]()
  m = Transformer(cfg, rngs=nnx.Rngs(0))
  tok = tokens(cfg)
  fq = lowbit.quantize_model(m, policy)
  cv = lowbit.convert(fq)
  a, b = fq(tok), cv(tok)
  assert float(jnp.linalg.norm(b - a) / jnp.linalg.norm(a)) < 1e-5
  _check_converted_bytes(policy, cv)


@pytest.mark.parametrize("cfg", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_grouped_w4a8_converts_exactly_but_for_activation_rounding_ties(cfg):
  """W4A8 with groups of 128: the converted model gives the fake-quant logits except where
  an int8 activation code lands on the other side of a rounding tie (the two forwards order
  their f32 reductions differently, ~1e-7 apart upstream): on the test's seed one LLaMA
  position of 32 differs by 1e-2, every other position by < 1e-6 (GPT-2: none). So at most
  one position in 20 may differ, by what one code moves (< 5e-2), the rest within 1e-5."""
  policy = lowbit.policy.w4a8(128)
  tok = tokens(cfg)
  fq = lowbit.quantize_model(Transformer(cfg, rngs=nnx.Rngs(0)), policy)
  cv = lowbit.convert(fq)
  a, b = np.asarray(fq(tok)), np.asarray(cv(tok))
  err = np.linalg.norm(b - a, axis=-1) / np.linalg.norm(a, axis=-1)
  assert (err > 1e-5).mean() <= 0.05 and err.max() < 5e-2, err
  _check_converted_bytes(policy, cv)


def _check_converted_bytes(policy, cv):
  """explain's promise == the converted layers' bytes; no float copy of a quantized weight."""
  rows = {r["path"]: r for r in policy.explain(cv, print_table=False)}
  for path, layer in lowbit.nn.quantizable_layers(cv).items():
    row = rows[path]
    held = sum(v[...].nbytes for v in jax.tree.leaves(
        nnx.state(layer), is_leaf=lambda v: isinstance(v, nnx.Variable)))
    assert held == row["bytes"], path
    if row["weight"] != "w-float":
      assert not hasattr(layer, "kernel")
      dtypes = {v[...].dtype for v in jax.tree.leaves(
          nnx.state(layer, lowbit.nn.QValue), is_leaf=lambda v: isinstance(v, nnx.Variable))}
      assert dtypes <= {jnp.dtype(jnp.int8), jnp.dtype(jnp.uint8)}


@pytest.mark.parametrize("name", ["w8a8", "w4a16", "w4a8", "w4a8-g128",
                                  # the g128 kernels on the float form: slow set
                                  pytest.param("w4a8-g128-int", marks=pytest.mark.slow)])
def test_converted_logits_same_through_pallas_and_xla(name):
  m = Transformer(LLAMA, rngs=nnx.Rngs(1))
  policy = lowbit.policy.w4a8(128) if name == "w4a8-g128" else lowbit.policy.READY_MADE[name]()
  cv = lowbit.convert(m, policy)
  tok = tokens(LLAMA, b=1, t=8)
  set_implementation(cv, "xla")
  y_xla = cv(tok)
  set_implementation(cv, "pallas")  # interpreted on CPU
  y_pallas = cv(tok)
  np.testing.assert_allclose(np.asarray(y_pallas), np.asarray(y_xla), rtol=1e-5, atol=1e-5)


def test_jitted_converted_forward():
  cv = lowbit.convert(Transformer(GPT2, rngs=nnx.Rngs(0)), lowbit.policy.mixed())
  tok = tokens(GPT2)
  y = nnx.jit(lambda m, t: m(t))(cv, tok)
  np.testing.assert_allclose(np.asarray(y), np.asarray(cv(tok)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["w8a8", "w4a16"])
def test_k_major_converted_model_matches_and_explains(name):
  """lowbit.convert(..., weight_layout="nk"): every quantized QLinear stores its weight
  K-major; logits equal the [K, N] model's through the XLA path and the kernels (interpreted),
  and explain's bytes still hold."""
  m = Transformer(LLAMA, rngs=nnx.Rngs(1))
  policy = lowbit.policy.READY_MADE[name]()
  kn = lowbit.convert(m, policy)
  nk = lowbit.convert(m, policy, weight_layout="nk")
  layers = lowbit.nn.quantizable_layers(nk)
  stored = {p: q.weight_layout for p, q in layers.items() if getattr(q, "qmeta", None)}
  assert stored and set(stored.values()) == {"nk"}
  tok = tokens(LLAMA, b=1, t=8)
  y = kn(tok)
  for impl in ("xla", "pallas"):
    set_implementation(nk, impl)
    np.testing.assert_allclose(np.asarray(nk(tok)), np.asarray(y), rtol=1e-5, atol=1e-5)
  rows = {r["path"]: r for r in policy.explain(nk, print_table=False)}
  for path, layer in layers.items():
    held = sum(v[...].nbytes for v in jax.tree.leaves(
        nnx.state(layer), is_leaf=lambda v: isinstance(v, nnx.Variable)))
    assert held == rows[path]["bytes"], path
