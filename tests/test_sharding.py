"""Sharded QAT, inference and checkpoints on 8 simulated CPU devices (a subprocess).

``--xla_force_host_platform_device_count=8`` must be set before jax starts, so
the checks run in ``tests/_sharding_worker.py`` in a fresh interpreter and this
file asserts on the numbers it prints; the rest of the suite keeps one device.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lowbit
from lowbit import sharding

WORKER = pathlib.Path(__file__).with_name("_sharding_worker.py")


def _worker(*args: str) -> dict:
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, str(WORKER), "fsdp_tp", *args], env=env, capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  line = next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULT "))
  return json.loads(line[len("RESULT "):])


@pytest.fixture(scope="module")
def result():
  """The worker without what only the slow tests below read (the default suite's run)."""
  return _worker("quick")


@pytest.fixture(scope="module")
def full_result():
  """The whole worker: tp_qmatmul over every layout and activation too."""
  return _worker()


def test_weight_only_qat_on_a_4x2_mesh_equals_one_device(result):
  """FSDP + TP, learned scales: same losses and parameters up to float summation order."""
  assert result["wo_loss_rel_diff"] < 1e-6
  assert result["wo_param_max_abs_diff"] < 1e-5 * max(1.0, result["wo_param_max_abs_change"])
  assert result["shardings_kept_after_steps"]
  k = result["sharded_kernels"]
  assert k["layers/0/attn/q_proj/kernel"] == ["data", "model"]
  assert k["layers/0/attn/o_proj/kernel"] == ["model", "data"]


def test_qat_with_dynamic_int8_activations_tracks_one_device(result):
  """An ulp of summation order can flip an activation code: losses agree to 1e-3."""
  assert result["loss_rel_diff"] < 1e-3
  assert result["losses_1"][0] == pytest.approx(result["losses_mesh"][0], rel=1e-6)


def test_adam_state_sharded_like_the_model_tracks_one_device(result):
  """AdamW's moments sharded with shard_like: the same first loss, later ones to 1e-3."""
  a1, a8 = result["adam_losses_1"], result["adam_losses_mesh"]
  assert a1[0] == pytest.approx(a8[0], rel=1e-6)
  assert max(abs(x - y) / abs(x) for x, y in zip(a1, a8, strict=True)) < 1e-3
  assert a1[-1] < a1[0]   # it trains


def test_compiled_step_gathers_no_full_float_weight(result):
  """TP: no weight is gathered at all except the gradient of a layer kept whole along K
  (its groups would straddle devices); FSDP + TP: weights are gathered over 'data' only."""
  allowed = set(result["kept_whole_kernel_shapes"])
  assert allowed == {"f32[160,96]"}                      # down_proj: K=160 over 2 cuts groups of 32
  for name in ("tp", "fsdp_tp"):
    assert set(result[f"full_weight_all_gathers_{name}"]) <= allowed, result[f"all_gathers_{name}"]
  assert result["all_gathers_tp"] == [g for g in result["all_gathers_tp"] if g in allowed]
  assert "f32[96,48]" in result["all_gathers_fsdp_tp"]    # q_proj gathered over data, split on model


def test_converted_inference_under_tensor_parallelism(result):
  assert result["converted_wo_logits_max_abs_diff"] <= 1e-5 * result["converted_wo_logits_max_abs"]
  assert result["converted_a8_logits_max_abs_diff"] <= 1e-2 * result["converted_a8_logits_max_abs"]
  per_device = result["converted_bytes_per_device"]
  assert len(per_device) == 8 and max(per_device.values()) < 0.6 * result["converted_bytes_total"]
  assert result["packed_down_proj"]["dtype"] == "uint8"
  assert result["explain_notes"] == ["K=160 over model=2 cuts groups of 32; K kept whole"]


def test_checkpoint_restores_onto_other_meshes_exactly(result):
  assert result["restore_2_exact"] and result["restore_1_exact"] and result["restore_logits_equal"]
  assert result["restore_2_devices"] == 2


def test_partition_specs_follow_the_kernel_and_divisibility():
  """In-process (1 device): the specs a mesh would get, from logical axes alone."""
  cfg = lowbit.TransformerConfig.llama(vocab_size=64, d_model=32, n_layers=1, n_heads=4,
                                       n_kv_heads=2, d_ff=64, max_len=16)
  model = lowbit.quantize_model(lowbit.Transformer(cfg, rngs=nnx.Rngs(0)),
                                lowbit.policy.w4a16(32), learn="scale")
  axes = sharding.logical_axes(model)
  assert axes["layers/0/mlp/down_proj/kernel"] == ("mlp", "embed")
  assert axes["layers/0/mlp/down_proj/w_scale"] == ("mlp", "embed")     # [2, 32] groups along K
  assert axes["layers/0/attn/q_proj/w_scale"] == (None, "heads")         # [1, 32] per channel
  assert axes["embed/embedding"] == ("vocab", "embed")
  mesh = sharding.make_mesh((1, 1))
  assert all(len(tuple(s)) <= 2 for s in sharding.partition_specs(model, mesh, sharding.RULES["tp"]).values())
  # a weight stored K-major (convert(weight_layout="nk")): the same axes, swapped
  nk = sharding.logical_axes(lowbit.convert(model, weight_layout="nk"))
  kn = sharding.logical_axes(lowbit.convert(model))
  assert kn["layers/0/mlp/down_proj/qvalue"] == ("mlp", "embed")
  assert nk["layers/0/mlp/down_proj/qvalue"] == ("embed", "mlp")
  assert kn["layers/0/mlp/down_proj/qscale"] == ("mlp", "embed")  # [2, 32] groups along K
  assert nk["layers/0/mlp/down_proj/qscale"] == ("embed", "mlp")
  assert nk["layers/0/attn/q_proj/qscale"] == ("heads", None)      # [32, 1] per channel
  # integer group scales: each channel's float scale follows the weight's N axis
  fq_int = lowbit.quantize_model(lowbit.Transformer(cfg, rngs=nnx.Rngs(0)),
                                 lowbit.policy.w4a8(32, "int"))
  for layout, want in (("kn", (None, "embed")), ("nk", ("embed", None))):
    ax = sharding.logical_axes(lowbit.convert(fq_int, weight_layout=layout))
    assert ax["layers/0/mlp/down_proj/qchannel"] == want


def test_per_shard_kernels_under_tensor_parallelism(result):
  """shard_map: column-parallel layers on their N block, row-parallel ones on their K block
  (the two half-blocks of the packed layout), Pallas kernels interpreted on CPU."""
  assert result["per_shard_wo_logits_max_abs_diff"] <= 1e-5 * result["converted_wo_logits_max_abs"]
  assert result["per_shard_a8_logits_max_abs_diff"] <= 1e-2 * result["converted_a8_logits_max_abs"]
  kinds = result["per_shard_layers"]
  assert kinds["layers/0/attn/q_proj"] == ["column", "pallas"]
  assert kinds["layers/0/attn/o_proj"] == ["row", "pallas"]
  assert kinds["layers/0/mlp/gate_proj"] == ["column", "pallas"]
  assert kinds["layers/0/mlp/down_proj"][0] is None          # kept whole: groups would straddle


@pytest.mark.slow  # (per-shard kernels in the converted model run in the default suite)
def test_tp_qmatmul_matches_the_unsharded_reference(full_result):
  assert full_result["tp_qmatmul_cases"] == 16  # incl. integer group scales
  assert full_result["tp_qmatmul_max_rel_err"] < 1e-5


def test_train_state_restores_into_a_model_sharded_on_another_mesh(result):
  assert result["train_state_restore_exact"]
  assert result["train_state_restore_devices"] == 2
  assert result["train_state_restore_local"] == [96, 80]     # up_proj [96, 160] split over 2


def test_group_and_packing_conflicts_keep_k_whole():
  """On a 2-way model axis: K=160 with groups of 32 (80 per device: 2.5 groups) and packed
  per-channel K=90 (two half-blocks of 22.5 rows) stay whole; K=128 g32 splits."""
  from lowbit.nn import QLinear
  from lowbit.quant import QuantSpec

  class M(nnx.Module):
    def __init__(self):
      self.a = QLinear(160, 8, rngs=nnx.Rngs(0))
      self.b = QLinear(90, 8, rngs=nnx.Rngs(1))
      self.c = QLinear(128, 8, rngs=nnx.Rngs(2))
      for layer in (self.a, self.b, self.c):
        layer.logical_axes = ("mlp", "embed")

  m = M()
  m.a.set_precision(QuantSpec(bits=4, channel_axes=(1,), group_size=32, pack=True), None)
  m.b.set_precision(QuantSpec(bits=4, channel_axes=(1,), pack=True), None)
  m.c.set_precision(QuantSpec(bits=4, channel_axes=(1,), group_size=32, pack=True), None)

  class FakeMesh:  # partition_specs only reads mesh.shape
    shape = {"data": 1, "model": 2}

  conflicts = sharding._group_conflicts(m, FakeMesh(), sharding.RULES["tp"], "data")
  assert conflicts == {"a": "K=160 over model=2 cuts groups of 32; K kept whole",
                       "b": "K=90 over model=2 cuts the packed half-blocks; K kept whole"}
  specs = sharding.partition_specs(m, FakeMesh(), sharding.RULES["tp"])
  assert tuple(specs["a/kernel"]) == () and tuple(specs["b/kernel"]) == ()
  assert tuple(specs["c/kernel"]) == ("model",)


def test_k_major_weights_keep_their_tensor_parallel_kind():
  """In-process (1 device): a weight stored [N, K] (convert(weight_layout="nk")) is column
  or row parallel as its [K, N] twin is, and the per-shard forward gives the same logits."""
  cfg = lowbit.TransformerConfig.llama(vocab_size=64, d_model=32, n_layers=1, n_heads=4,
                                       n_kv_heads=2, d_ff=64, max_len=16)
  policy = lowbit.policy.READY_MADE["w8a8"]()
  mesh = sharding.make_mesh((1, 1))
  tok = jnp.zeros((2, 8), jnp.int32)
  kinds, logits = {}, {}
  for layout in ("kn", "nk"):
    m = lowbit.convert(lowbit.Transformer(cfg, rngs=nnx.Rngs(0)), policy, weight_layout=layout)
    sharding.shard(m, mesh, sharding.RULES["tp"], per_shard_kernels=True)
    kinds[layout] = {p: q.tp[2] for p, q in lowbit.nn.quantizable_layers(m).items()
                     if getattr(q, "tp", None)}
    logits[layout] = np.asarray(nnx.jit(lambda m, t: m(t))(m, tok))  # eager shard_map: slow
  assert kinds["kn"] and kinds["nk"] == kinds["kn"]
  assert kinds["kn"]["layers/0/mlp/down_proj"] == "row"
  assert kinds["kn"]["layers/0/mlp/up_proj"] == "column"
  np.testing.assert_allclose(logits["nk"], logits["kn"], rtol=1e-5, atol=1e-5)
