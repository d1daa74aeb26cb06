"""Checkpoints of converted models: exact round trip, packed bytes on disk, loud errors."""

import json
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lowbit
from lowbit import ckpt
from lowbit.nn import Transformer, TransformerConfig

CFG = TransformerConfig.llama(vocab_size=64, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2,
                              d_ff=256, max_len=16)


def make(policy_name):
  return lambda: lowbit.convert(Transformer(CFG, rngs=nnx.Rngs(0)),
                                lowbit.policy.READY_MADE[policy_name]())


@pytest.mark.parametrize("name", ["w8a8", "w4a16", "mixed", "w4a8-g128-int"])
def test_round_trip_is_bit_identical(tmp_path, name):
  model = make(name)()
  policy = lowbit.policy.READY_MADE[name]()
  ckpt.save(tmp_path / "c", model, policy=policy, compression=False)
  restored = ckpt.restore(tmp_path / "c", nnx.eval_shape(make(name)), policy=policy)
  tok = jax.random.randint(jax.random.key(0), (2, 16), 0, 64)
  np.testing.assert_array_equal(np.asarray(restored(tok)), np.asarray(model(tok)))
  meta = ckpt.read_meta(tmp_path / "c")
  assert meta["format_version"] == ckpt.FORMAT_VERSION and meta["policy"] == policy.to_dict()
  # no float copy of a quantized weight was stored
  for path in meta["layers"]:
    assert f"{path}/kernel" not in meta["tensors"]
    assert meta["tensors"][f"{path}/qvalue"]["dtype"] in ("int8", "uint8")


def test_k_major_weights_round_trip_and_a_layout_mismatch_is_named(tmp_path):
  """A model converted with weight_layout="nk" restores exactly into an "nk" model; an
  "nk" checkpoint refuses a "kn" model by name (a square int8 weight would have matched
  its shape, transposed)."""
  policy = lowbit.policy.READY_MADE["w8a8"]()

  def nk():
    return lowbit.convert(Transformer(CFG, rngs=nnx.Rngs(0)), policy, weight_layout="nk")
  model = nk()
  d = ckpt.save(tmp_path / "c", model, policy=policy)
  assert {m["weight_layout"] for m in ckpt.read_meta(d)["layers"].values()} == {"nk"}
  restored = ckpt.restore(d, nnx.eval_shape(nk), policy=policy)
  tok = jax.random.randint(jax.random.key(0), (2, 16), 0, 64)
  np.testing.assert_array_equal(np.asarray(restored(tok)), np.asarray(model(tok)))
  with pytest.raises(ValueError, match=r"layer 'layers/0/attn/k_proj' in .* stores its weight "
                                       r"'nk', the model expects 'kn'"):
    ckpt.restore(d, nnx.eval_shape(make("w8a8")), policy=policy)


class Stack(nnx.Module):
  """Only quantizable weights (no biases, norms or embeddings): bytes on disk per weight."""

  def __init__(self):
    rngs = nnx.Rngs(0)
    self.layers = nnx.List([nnx.Linear(1024, 1024, use_bias=False, rngs=rngs) for _ in range(2)])


@pytest.mark.parametrize("policy,limit", [(lowbit.policy.PrecisionPolicy((lowbit.PrecisionRule(
    ".*", lowbit.policy._w(4, 128)),)), 0.52), (lowbit.policy.PrecisionPolicy((
        lowbit.PrecisionRule(".*", lowbit.policy._w(8)),)), 1.02)], ids=["int4-g128", "int8"])
def test_bytes_on_disk_per_weight(tmp_path, policy, limit):
  model = lowbit.convert(Stack(), policy)
  n = 2 * 1024 * 1024
  sizes = {}
  for comp in (False, True):
    d = ckpt.save(tmp_path / f"c{comp}", model, policy=policy, compression=comp)
    sizes[comp] = ckpt.checkpoint_bytes(d) / n
  print(f"bytes/weight on disk: no compression {sizes[False]:.4f}, zstd {sizes[True]:.4f}")
  assert sizes[False] <= limit
  assert sizes[True] <= limit


def test_errors_name_the_path_and_tensor(tmp_path):
  model = make("w4a16")()
  p = ckpt.save(tmp_path / "c", model, policy=lowbit.policy.w4a16())
  with pytest.raises(ValueError, match="exists; pass overwrite=True"):
    ckpt.save(p, model)
  # a model built with another policy
  with pytest.raises(ValueError, match=r"tensor 'layers/0/attn/k_proj/qscale' in .*/c is "
                                       r"bfloat16\[1, 64\], the model expects float32\[1, 64\]"):
    ckpt.restore(p, nnx.eval_shape(make("w8a16")))
  with pytest.raises(ValueError, match="another precision policy"):
    ckpt.restore(p, nnx.eval_shape(make("w4a16")), policy=lowbit.policy.w8a16())
  # a wrong format version
  bad = tmp_path / "bad"
  ckpt.save(bad, model)
  meta_file = next((bad / "meta").rglob("*")) if (bad / "meta").is_dir() else bad / "meta"
  meta = json.loads(meta_file.read_text())
  meta["format_version"] = 99
  meta_file.write_text(json.dumps(meta))
  with pytest.raises(ValueError, match=f"{bad}.*format_version=99"):
    ckpt.restore(bad, nnx.eval_shape(make("w4a16")))
  # a missing, truncated or altered array file is named before any array is read
  damages = {"delete": (lambda f: f.unlink(), "is missing"),
             "truncate": (lambda f: f.write_bytes(f.read_bytes()[: f.stat().st_size // 3]),
                          "bytes, the save wrote"),
             "flip": (lambda f: f.write_bytes(bytes([f.read_bytes()[0] ^ 1]) + f.read_bytes()[1:]),
                      "sha256 differs")}
  for damage, (hurt, message) in damages.items():
    d = ckpt.save(tmp_path / damage, model)
    [big] = sorted((f for f in (d / "state").rglob("*") if f.is_file()),
                   key=lambda f: -f.stat().st_size)[:1]
    hurt(big)
    with pytest.raises(ValueError, match=f"{big.relative_to(d)}.*{message}"):
      ckpt.restore(d, nnx.eval_shape(make("w4a16")))
  with pytest.raises(ValueError, match="not a complete lowbit checkpoint"):
    ckpt.restore(tmp_path / "nothing", nnx.eval_shape(make("w4a16")))


def test_a_save_without_its_file_list_is_incomplete(tmp_path):
  """Killed after Orbax's rename but before the file list: restore refuses it and
  ``latest`` skips it for the previous checkpoint."""
  model = make("w8a8")()
  first = ckpt.save(tmp_path / "step_1", model)
  second = ckpt.save(tmp_path / "step_2", model)
  assert ckpt.latest(tmp_path) == second
  (second / ckpt.FILES).unlink()
  assert ckpt.latest(tmp_path) == first
  with pytest.raises(ValueError, match=f"{second} has no {ckpt.FILES}"):
    ckpt.restore(second, nnx.eval_shape(make("w8a8")))
  restored = ckpt.restore(second, nnx.eval_shape(make("w8a8")), verify=False)
  tok = jnp.arange(8)[None]
  np.testing.assert_array_equal(np.asarray(restored(tok)), np.asarray(model(tok)))


def test_interrupted_save_leaves_previous_checkpoint_restorable(tmp_path):
  root = tmp_path / "run"
  model = make("w8a8")()
  ckpt.save(root / "step_00001", model)
  script = textwrap.dedent(f"""
      import jax, jax.numpy as jnp
      from flax import nnx
      import lowbit
      from lowbit import ckpt
      class Big(nnx.Module):
        def __init__(self):
          self.layers = nnx.List([nnx.Linear(2048, 2048, rngs=nnx.Rngs(i)) for i in range(24)])
      print("saving", flush=True)
      ckpt.save({str(root / "step_00002")!r}, Big(), compression=True)
      print("done", flush=True)
  """)
  proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "saving"
  deadline = time.time() + 120
  while time.time() < deadline and not any(".orbax-checkpoint-tmp" in p.name for p in root.iterdir()):
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (root / "step_00002").exists() or not (root / "step_00002" / "meta").exists()
  assert ckpt.latest(root) == root / "step_00001"
  restored = ckpt.restore(ckpt.latest(root), nnx.eval_shape(make("w8a8")))
  tok = jnp.arange(8)[None]
  np.testing.assert_array_equal(np.asarray(restored(tok)), np.asarray(model(tok)))


def test_static_activation_scales_round_trip_and_fake_quant_is_refused(tmp_path):
  """A PTQ-calibrated per-tensor activation scale (ActScale) is saved with the model."""
  policy = lowbit.PrecisionPolicy((lowbit.PrecisionRule(
      ".*", lowbit.quant.QuantSpec(bits=8, channel_axes=(1,)), lowbit.quant.QuantSpec(bits=8)),),
      allow_unused=True)

  def build(scale=0.05):
    m = lowbit.quantize_model(Transformer(CFG, rngs=nnx.Rngs(0)), policy)
    with pytest.raises(ValueError, match="fake-quant"):
      ckpt.save(tmp_path / "never", m)
    for layer in lowbit.nn.quantizable_layers(m).values():
      layer.set_act_scale(jnp.full((1, 1), scale))
    return lowbit.convert(m)

  model = build()
  ckpt.save(tmp_path / "c", model, policy=policy)
  assert "layers/0/attn/q_proj/act_scale" in ckpt.read_meta(tmp_path / "c")["tensors"]
  restored = ckpt.restore(tmp_path / "c", nnx.eval_shape(lambda: build(1.0)), policy=policy)
  tok = jnp.arange(8)[None]
  np.testing.assert_array_equal(np.asarray(restored(tok)), np.asarray(model(tok)))


def test_a_damaged_train_state_is_named_before_it_is_read(tmp_path):
  """save_train_state lists the step's files as save does; restore_train_state checks them."""
  import optax

  model = lowbit.quantize_model(Transformer(CFG, rngs=nnx.Rngs(0)), lowbit.policy.w8a8())
  opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
  ckpt.save_train_state(tmp_path / "run", 3, model, opt)
  step_dir = tmp_path / "run" / "3"
  assert (step_dir / ckpt.FILES).exists()
  assert ckpt.restore_train_state(tmp_path / "run", model, opt)[0] == 3
  [big] = sorted((f for f in step_dir.rglob("*") if f.is_file()), key=lambda f: -f.stat().st_size)[:1]
  big.write_bytes(big.read_bytes()[:-1])
  with pytest.raises(ValueError, match=f"{big.relative_to(step_dir)} has .* bytes, the save wrote"):
    ckpt.restore_train_state(tmp_path / "run", model, opt)
