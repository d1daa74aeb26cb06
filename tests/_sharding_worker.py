"""Runs in a subprocess with 8 simulated CPU devices (see tests/test_sharding.py); prints JSON.

Everything compares a run on a (4, 2) ("data", "model") mesh with the same run
on one device, from the same initial arrays and batches.

    python tests/_sharding_worker.py RULES [quick]

``quick`` (the default suite's run) leaves out tp_qmatmul over every layout and
activation (16 compiled calls, ~13% of the worker's time), which only a ``slow`` test
reads; the converted model's per-shard kernels cover that path in the default suite.
"""

import json
import os
import re
import sys
import tempfile

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import lowbit  # noqa: E402
from lowbit import ckpt, sharding  # noqa: E402
from lowbit.nn import convert, quantize_model  # noqa: E402
from lowbit.policy import A8, PrecisionPolicy, PrecisionRule  # noqa: E402
from lowbit.qat import make_optimizers, make_train_step  # noqa: E402
from lowbit.quant import QuantSpec  # noqa: E402

STEPS = 3
CFG = lowbit.TransformerConfig.llama(vocab_size=128, d_model=96, n_layers=2, n_heads=6, n_kv_heads=2,
                                     d_ff=160, max_len=32)
# (dimensions chosen so that no per-device shape equals a full weight's shape)
W4G32 = QuantSpec(bits=4, channel_axes=(1,), group_size=32, pack=True)
W8 = QuantSpec(bits=8, channel_axes=(1,))
POLICY = PrecisionPolicy((PrecisionRule(r".*attn/.*", W8, A8), PrecisionRule(r".*mlp/.*", W4G32)))
WEIGHT_ONLY = PrecisionPolicy((PrecisionRule(r".*attn/.*", W8), PrecisionRule(r".*mlp/.*", W4G32)))


def loss_fn(model, batch):
  logits = model(batch[:, :-1]).astype(jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


def flat(tree):
  return {"/".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(tree))}


def train(model, batches, mesh=None, rules=None, adam=False):
  opts = (make_optimizers(model, optax.adamw(3e-3), optax.adam(1e-3)) if adam
          else make_optimizers(model, optax.sgd(0.5), optax.sgd(0.01)))
  if mesh is not None:
    sharding.shard(model, mesh, rules)
    for o in opts:
      sharding.shard_like(o, model, mesh, rules)
  step = make_train_step(loss_fn)
  losses = []
  for b in batches:
    if mesh is not None:
      b = jax.device_put(b, sharding.batch_sharding(mesh))
    losses.append(float(step(model, *opts, b)))
  return losses, opts, step


def all_gathers(hlo: str) -> list[str]:
  """Result shapes of the all-gathers in a compiled HLO text, e.g. 'f32[64,32]'."""
  return re.findall(r"= (\w+\[[\d,]*\])[^=]*? all-gather(?:-start)?\(", hlo)


def compiled_gathers(base, batch, mesh, rules):
  """All-gather result shapes in the compiled QAT step (a functional copy of make_train_step's)."""
  model = sharding.shard(nnx.clone(base), mesh, rules)
  opts = make_optimizers(model, optax.sgd(0.5), optax.sgd(0.01))
  for o in opts:
    sharding.shard_like(o, model, mesh, rules)
  graphdef, state = nnx.split((model, *opts))

  def pure(state, batch):
    m, wo, qo = nnx.merge(graphdef, state)
    wrt = nnx.DiffState(0, nnx.Any(nnx.Param, lowbit.nn.QuantState))
    loss, grads = nnx.value_and_grad(lambda m: loss_fn(m, batch), argnums=wrt)(m)
    wo.update(m, grads)
    qo.update(m, grads)
    return loss, nnx.state((m, wo, qo))

  hlo = jax.jit(pure).lower(state, jax.device_put(batch, sharding.batch_sharding(mesh))).compile().as_text()
  return all_gathers(hlo)


def main():
  assert "xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", ""), "set XLA_FLAGS"
  devices = jax.devices()
  assert len(devices) == 8, devices
  mesh = sharding.make_mesh((4, 2))
  rules = sharding.RULES[sys.argv[1] if len(sys.argv) > 1 else "fsdp_tp"]
  quick = sys.argv[2:] == ["quick"]
  base = quantize_model(lowbit.Transformer(CFG, rngs=nnx.Rngs(0)), POLICY, learn="scale")
  rng = np.random.default_rng(0)
  batches = [jnp.asarray(rng.integers(0, CFG.vocab_size, (8, 17)), jnp.int32) for _ in range(STEPS)]
  out = {}

  # --- QAT, one device vs the mesh. Weight-only fake quant with learned scales: the same
  # numbers up to float summation order. With dynamic int8 activations (POLICY) an ulp of
  # summation-order difference can flip an activation code, so only the losses are compared.
  wo = quantize_model(lowbit.Transformer(CFG, rngs=nnx.Rngs(0)), WEIGHT_ONLY, learn="scale")
  one, many = nnx.clone(wo), nnx.clone(wo)
  lw1, _, _ = train(one, batches)
  lw8, _, _ = train(many, batches, mesh, rules)
  p1, p8 = flat(one), flat(many)
  out["wo_losses_1"], out["wo_losses_mesh"] = lw1, lw8
  out["wo_loss_rel_diff"] = max(abs(a - b) / abs(a) for a, b in zip(lw1, lw8, strict=True))
  out["wo_param_max_abs_diff"] = max(float(np.abs(p1[k] - p8[k]).max()) for k in p1)
  out["wo_param_max_abs_change"] = max(float(np.abs(p1[k] - v).max()) for k, v in flat(wo).items())
  wo_trained = one
  one = nnx.clone(base)
  l1, _, _ = train(one, batches)
  many = nnx.clone(base)
  l8, opts8, _ = train(many, batches, mesh, rules)
  p1, p8 = flat(one), flat(many)
  out["losses_1"], out["losses_mesh"] = l1, l8
  out["loss_rel_diff"] = max(abs(a - b) / abs(a) for a, b in zip(l1, l8, strict=True))
  out["param_max_abs_diff"] = max(float(np.abs(p1[k] - p8[k]).max()) for k in p1)
  out["param_max_abs"] = max(float(np.abs(p1[k]).max()) for k in p1)
  out["param_max_abs_change"] = max(float(np.abs(p1[k] - v).max()) for k, v in flat(base).items())
  a1, _, _ = train(nnx.clone(base), batches, adam=True)
  a8, _, _ = train(nnx.clone(base), batches, mesh, rules, adam=True)
  out["adam_losses_1"], out["adam_losses_mesh"] = a1, a8
  specs = sharding.partition_specs(many, mesh, rules)
  out["shardings_kept_after_steps"] = all(
      tuple(v.get_value().sharding.spec) == tuple(specs["/".join(map(str, p))])
      for p, v in nnx.to_flat_state(nnx.state(many)))
  out["sharded_kernels"] = {k: list(map(str, specs[k])) for k in specs if k.endswith("kernel")}

  # --- the compiled step's collectives, for TP (batch on data) and FSDP + TP
  full = {f"f32[{','.join(map(str, layer.kernel.get_value().shape))}]"
          for layer in lowbit.nn.quantizable_layers(base).values()}
  out["full_float_kernel_shapes"] = sorted(full)
  for name in ("tp", "fsdp_tp"):
    gathers = compiled_gathers(base, batches[0], mesh, sharding.RULES[name])
    out[f"all_gathers_{name}"] = gathers
    out[f"full_weight_all_gathers_{name}"] = [g for g in gathers if g in full]
  # layers kept whole along K (groups would straddle devices): their weight gradient is
  # gathered to update the replicated copy -- expected, and the only full-size gather allowed
  kept = sharding._group_conflicts(base, mesh, sharding.RULES["tp"], "data")
  out["kept_whole_kernel_shapes"] = sorted(
      {f"f32[{','.join(map(str, lowbit.nn.quantizable_layers(base)[p].kernel.get_value().shape))}]"
       for p in kept})

  # --- converted inference under tensor parallelism (weight-only: the same numbers; with
  # dynamic int8 activations an ulp of summation order can flip a code, so a looser bound)
  x = batches[0][:, :-1]
  fwd = nnx.jit(lambda m, x: m(x))
  xs = jax.device_put(x, sharding.batch_sharding(mesh))
  for tag, trained in (("wo", wo_trained), ("a8", one)):
    c1 = convert(nnx.clone(trained))
    c8 = sharding.shard(convert(nnx.clone(trained)), mesh, sharding.RULES["tp"])
    r = np.asarray(c1(x))
    out[f"converted_{tag}_logits_max_abs_diff"] = float(np.abs(np.asarray(fwd(c8, xs)) - r).max())
    out[f"converted_{tag}_logits_max_abs"] = float(np.abs(r).max())
  conv1, conv8, ref = c1, c8, r
  # the same, each device running the matmul on its own block (shard_map), Pallas (interpreted
  # on CPU) where a kernel takes the layer, the XLA path elsewhere
  wo_ref = np.asarray(convert(nnx.clone(wo_trained))(x))
  for tag, trained, r in (("wo", wo_trained, wo_ref), ("a8", one, ref)):
    cp = sharding.shard(convert(nnx.clone(trained)), mesh, sharding.RULES["tp"], per_shard_kernels=True)
    kinds = {}
    for path, layer in lowbit.nn.quantizable_layers(cp).items():
      layer.implementation = "pallas" if lowbit.kernels.kernel_for(
          layer.quantized_weight(), layer.act_spec) else "xla"
      kinds[path] = (layer.tp[2] if layer.tp else None, layer.implementation)
    y = np.asarray(fwd(cp, xs))
    out[f"per_shard_{tag}_logits_max_abs_diff"] = float(np.abs(y - r).max())
  out["per_shard_layers"] = {p: list(v) for p, v in kinds.items() if p.startswith("layers/0/")}
  out["converted_bytes_per_device"] = sharding.bytes_per_device(conv8)
  out["converted_bytes_total"] = sum(int(np.asarray(v.get_value()).nbytes) for _, v in
                                     nnx.to_flat_state(nnx.state(conv1)))
  qv = conv8.layers[0].mlp.down_proj.qvalue.get_value()
  out["packed_down_proj"] = dict(shape=list(qv.shape), dtype=str(qv.dtype),
                                 spec=list(map(str, qv.sharding.spec)),
                                 local=list(qv.addressable_shards[0].data.shape))
  out["explain_notes"] = sorted({r["notes"] for r in sharding.explain(conv8, mesh, sharding.RULES["tp"])
                                 if r["notes"]})

  # --- tp_qmatmul alone: every layout, column and row, with and without int8 activations
  errs = []
  w4g32_int = QuantSpec(bits=4, channel_axes=(1,), group_size=32, pack=True, group_scales="int")
  for spec in () if quick else (W4G32, QuantSpec(bits=4, channel_axes=(1,), pack=True), W8,
                                w4g32_int):
    w = lowbit.quant.quantize(jnp.asarray(rng.normal(size=(256, 96)), jnp.float32), spec)
    xx = jnp.asarray(rng.normal(size=(8, 5, 256)), jnp.float32)
    for act in (None, A8):
      r = np.asarray(lowbit.kernels.qmatmul(xx, w, act_spec=act, implementation="reference"))
      impl = "pallas" if lowbit.kernels.kernel_for(w, act) else "xla"
      for kind in ("column", "row"):
        y = jax.jit(lambda xx, w, kind=kind, act=act, impl=impl: sharding.tp_qmatmul(
            xx, w, mesh, kind, act_spec=act, implementation=impl))(xx, w)
        errs.append(float(np.abs(np.asarray(y) - r).max() / np.abs(r).max()))
  if errs:
    out["tp_qmatmul_max_rel_err"], out["tp_qmatmul_cases"] = max(errs), len(errs)

  # --- checkpoints: saved from the (4, 2) mesh, restored onto 2 devices and onto 1
  with tempfile.TemporaryDirectory() as d:
    ckpt.save(f"{d}/c", conv8, policy=POLICY)
    saved = flat(conv1)
    abstract = nnx.eval_shape(lambda: convert(quantize_model(lowbit.Transformer(CFG, rngs=nnx.Rngs(1)),
                                                             POLICY)))
    two = sharding.make_mesh((1, 2), devices=devices[:2])
    r2 = ckpt.restore(f"{d}/c", abstract, policy=POLICY, mesh=two, rules=sharding.RULES["tp"])
    r1 = ckpt.restore(f"{d}/c", nnx.eval_shape(lambda: convert(quantize_model(
        lowbit.Transformer(CFG, rngs=nnx.Rngs(1)), POLICY))), policy=POLICY)
    f2, f1 = flat(r2), flat(r1)
    out["restore_2_exact"] = all(np.array_equal(saved[k], f2[k]) for k in saved)
    out["restore_1_exact"] = all(np.array_equal(saved[k], f1[k]) for k in saved)
    qv2 = r2.layers[0].mlp.down_proj.qvalue.get_value()
    out["restore_2_devices"] = len(qv2.sharding.device_set)
    out["restore_2_packed_local"] = list(qv2.addressable_shards[0].data.shape)
    out["restore_logits_equal"] = bool(np.array_equal(np.asarray(r1(x)), ref))
  # --- a QAT train state saved on the (4, 2) mesh, restored into a model and optimizers
  # already sharded on 2 devices: the arrays land in those shards, the values bit-exact
  with tempfile.TemporaryDirectory() as d:
    ckpt.save_train_state(d, 3, many, *opts8)
    two = sharding.make_mesh((1, 2), devices=devices[:2])
    fresh = quantize_model(lowbit.Transformer(CFG, rngs=nnx.Rngs(5)), POLICY, learn="scale")
    fopts = make_optimizers(fresh, optax.sgd(0.5), optax.sgd(0.01))
    sharding.shard(fresh, two, sharding.RULES["tp"])
    for o in fopts:
      sharding.shard_like(o, fresh, two, sharding.RULES["tp"])
    step, _ = ckpt.restore_train_state(d, fresh, *fopts)
    a, b = flat(many), flat(fresh)
    out["train_state_restore_exact"] = step == 3 and all(np.array_equal(a[k], b[k]) for k in a)
    k = fresh.layers[0].mlp.up_proj.kernel.get_value()
    out["train_state_restore_devices"] = len(k.sharding.device_set)
    out["train_state_restore_local"] = list(k.addressable_shards[0].data.shape)
  print("RESULT " + json.dumps(out))


if __name__ == "__main__":
  main()
