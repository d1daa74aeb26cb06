"""Policy matching, explain, JSON/YAML/Python round trips and errors."""

import pathlib

import jax.numpy as jnp
import pytest
from flax import nnx

import lowbit
from lowbit.nn import Transformer, TransformerConfig
from lowbit.policy import PrecisionPolicy, PrecisionRule
from lowbit.quant import QuantSpec

ROOT = pathlib.Path(__file__).resolve().parents[1]
W8 = QuantSpec(bits=8, channel_axes=(1,))
W4 = QuantSpec(bits=4, channel_axes=(1,), group_size=64, pack=True, scale_dtype=jnp.bfloat16)
A8 = QuantSpec(bits=8, channel_axes=(0,))
CFG = TransformerConfig.gpt2(vocab_size=32, d_model=64, n_layers=2, n_heads=2, max_len=16)


def model():
  return Transformer(CFG, rngs=nnx.Rngs(0))


def test_first_match_wins_and_no_match_is_float():
  p = PrecisionPolicy((PrecisionRule(r"layers/0/.*", W8), PrecisionRule(r".*q_proj", W4),
                       PrecisionRule(r"layers/\d+/attn/.*", W4, A8)))
  assert p.lookup("layers/0/attn/q_proj")[0] == 0
  assert p.lookup("layers/1/attn/q_proj")[0] == 1
  assert p.lookup("layers/1/attn/k_proj")[0] == 2
  assert p.lookup("layers/1/mlp/up_proj") == (None, None)
  assert p.lookup("xlayers/0/attn") == (None, None)  # fullmatch, not search


def test_unused_rule_is_an_error_unless_allowed():
  p = PrecisionPolicy((PrecisionRule(r"layers/\d+/attn/.*", W8), PrecisionRule("mlp/.*", W4)))
  with pytest.raises(ValueError, match=r"#1 'mlp/\.\*' match no layer"):
    lowbit.quantize_model(model(), p)
  lowbit.quantize_model(model(), PrecisionPolicy(p.rules, allow_unused=True))


def test_explain_table():
  p = PrecisionPolicy((PrecisionRule("lm_head", keep_float=True),
                       PrecisionRule(r".*attn/.*", W8, A8), PrecisionRule(r".*mlp/.*", W4)))
  rows = p.explain(model(), print_table=False)
  by = {r["path"]: r for r in rows}
  assert len(rows) == 2 * 6 + 1
  assert by["lm_head"]["rule"] == 0 and by["lm_head"]["bytes"] == 64 * 32 * 4
  q = by["layers/1/attn/q_proj"]
  assert (q["rule"], q["weight"], q["act"]) == (1, "w8 per-channel", "a8 per-token")
  assert q["params"] == 64 * 64 + 64 and q["bytes"] == 64 * 64 + 64 * 4 + 64 * 4
  up = by["layers/0/mlp/up_proj"]
  assert up["weight"] == "w4 g64" and up["bytes"] == 64 * 256 // 2 + 1 * 256 * 2 + 256 * 4
  text = lowbit.policy.format_table(rows)
  assert "layers/1/attn/q_proj" in text and "w4 g64" in text and text.splitlines()[-1].startswith("total")
  # integer group scales: one byte a group, the channel scales beside
  wi = QuantSpec(bits=4, channel_axes=(1,), group_size=64, pack=True, group_scales="int",
                 scale_dtype=jnp.bfloat16)
  p = PrecisionPolicy((PrecisionRule("lm_head", keep_float=True), PrecisionRule(".*", wi, A8)))
  up = {r["path"]: r for r in p.explain(model(), print_table=False)}["layers/0/mlp/up_proj"]
  assert up["weight"] == "w4 g64 int-scales"
  assert up["bytes"] == 64 * 256 // 2 + 1 * 256 * 1 + 256 * 2 + 256 * 4


def test_json_round_trip_and_files(tmp_path):
  for name, make in lowbit.policy.READY_MADE.items():
    p = make()
    assert PrecisionPolicy.from_json(p.to_json()) == p, name
  p = lowbit.policy.load(ROOT / "configs" / "policy_mixed_w8attn_w4mlp.py")
  mixed = lowbit.policy.mixed()
  for path in lowbit.nn.quantizable_layers(model()):
    a, b = p.lookup(path)[1], mixed.lookup(path)[1]
    assert (a.weight, a.act, a.keep_float) == (b.weight, b.act, b.keep_float), path
  y = lowbit.policy.load(ROOT / "configs" / "policy_w4a16_g128.yaml")
  assert y == lowbit.policy.w4a16(128)
  f = tmp_path / "p.json"
  f.write_text(p.to_json(indent=1))
  assert lowbit.policy.load(f) == p


def test_bad_policies():
  with pytest.raises(ValueError, match="not a valid regex"):
    PrecisionRule("layers/(\\d+", W8)
  with pytest.raises(ValueError, match="keep_float=True with a weight"):
    PrecisionRule("x", W8, keep_float=True)
  with pytest.raises(ValueError, match="quantizes nothing"):
    PrecisionRule("x")
  with pytest.raises(ValueError, match="format_version"):
    PrecisionPolicy.from_dict({"format_version": 99, "rules": []})
  with pytest.raises(ValueError, match="unknown key"):
    PrecisionPolicy.from_dict({"format_version": 1, "rules": [
        {"module_path": ".*", "weight": {"bits": 4, "granularity": "channel"}}]})
  bad_group = PrecisionPolicy((PrecisionRule(".*mlp/down_proj", QuantSpec(
      bits=4, channel_axes=(1,), group_size=96)),))
  with pytest.raises(ValueError, match=r"group_size=96 does not divide axis 0 of "
                                       r"layers/0/mlp/down_proj\.kernel"):
    lowbit.quantize_model(model(), bad_group)

  class NoLinear(nnx.Module):
    def __init__(self):
      self.norm = nnx.LayerNorm(4, rngs=nnx.Rngs(0))

  with pytest.raises(ValueError, match="no quantizable layer"):
    lowbit.quantize_model(NoLinear(), lowbit.policy.w8a8())
  with pytest.raises(ValueError, match="no layer is in fake-quant mode"):
    lowbit.convert(model())
