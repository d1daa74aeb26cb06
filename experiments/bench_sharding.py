"""QAT step time on 1 vs 8 devices, and bytes per device of a converted model under TP.

    python experiments/bench_sharding.py            # 8 simulated CPU devices unless real ones exist
    python experiments/bench_sharding.py --json out.json

On a CPU-only machine the 8 devices are simulated (``--xla_force_host_platform_device_count``)
and share its cores, so the step-time ratios measure sharding overhead, not speed-up; on a
multi-GPU host the same script measures the real thing. Medians of ``--steps`` steps after
two warm-up steps, all layouts in one run.
"""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import lowbit  # noqa: E402
from lowbit import sharding  # noqa: E402
from lowbit.nn import convert, quantize_model  # noqa: E402
from lowbit.policy import A8, PrecisionPolicy, PrecisionRule  # noqa: E402
from lowbit.qat import make_optimizers, make_train_step  # noqa: E402
from lowbit.quant import QuantSpec  # noqa: E402

CFG = lowbit.TransformerConfig.llama(vocab_size=1024, d_model=512, n_layers=4, n_heads=8,
                                     n_kv_heads=8, d_ff=2048, max_len=128)
POLICY = PrecisionPolicy((
    PrecisionRule(r".*attn/.*", QuantSpec(bits=8, channel_axes=(1,)), A8),
    PrecisionRule(r".*mlp/.*", QuantSpec(bits=4, channel_axes=(1,), group_size=128, pack=True,
                                         scale_dtype=jnp.bfloat16)),
))
LAYOUTS = [("1 device", None, None), ("dp 8x1", (8, 1), "dp"), ("fsdp 8x1", (8, 1), "fsdp"),
           ("fsdp_tp 4x2", (4, 2), "fsdp_tp"), ("tp 1x8", (1, 8), "tp")]


def loss_fn(model, batch):
  logits = model(batch[:, :-1]).astype(jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


def qat_step_times(batch_size: int, steps: int) -> list[dict]:
  rows = []
  base = quantize_model(lowbit.Transformer(CFG, rngs=nnx.Rngs(0)), POLICY, learn="scale")
  data = np.random.default_rng(0).integers(0, CFG.vocab_size, (batch_size, CFG.max_len + 1))
  for name, shape, rules in LAYOUTS:
    model = nnx.clone(base)
    opts = make_optimizers(model, optax.adamw(1e-3), optax.adam(1e-4))
    batch = jnp.asarray(data, jnp.int32)
    if shape is not None:
      mesh = sharding.make_mesh(shape)
      sharding.shard(model, mesh, sharding.RULES[rules])
      for o in opts:
        sharding.shard_like(o, model, mesh, sharding.RULES[rules])
      batch = jax.device_put(batch, sharding.batch_sharding(mesh))
    else:
      batch = jax.device_put(batch, jax.devices()[0])
    step = make_train_step(loss_fn)
    for _ in range(2):
      float(step(model, *opts, batch))
    times = []
    for _ in range(steps):
      t = time.perf_counter()
      float(step(model, *opts, batch))
      times.append(time.perf_counter() - t)
    rows.append(dict(layout=name, median_s=statistics.median(times), min_s=min(times)))
    print(f"QAT step  {name:12s} median {rows[-1]['median_s'] * 1e3:8.1f} ms", flush=True)
  for r in rows:
    r["vs_1_device"] = r["median_s"] / rows[0]["median_s"]
  return rows


def converted_bytes() -> dict:
  model = convert(quantize_model(lowbit.Transformer(CFG, rngs=nnx.Rngs(0)), POLICY))
  total = sum(int(np.asarray(v.get_value()).nbytes) for _, v in nnx.to_flat_state(nnx.state(model)))
  mesh = sharding.make_mesh((1, 8))
  rows = sharding.explain(model, mesh, sharding.RULES["tp"])
  replicated = sum(r["bytes_per_device"] for r in rows if not any(tuple(r["spec"])))
  sharding.shard(model, mesh, sharding.RULES["tp"])
  per = sharding.bytes_per_device(model)
  out = dict(total=total, per_device_max=max(per.values()), per_device_min=min(per.values()),
             replicated=replicated, ideal=replicated + (total - replicated) / 8,
             devices=len(per))
  out["fraction"] = out["per_device_max"] / total
  print(f"converted model: {total / 2**20:.2f} MiB in all; per device under TP over 8: "
        f"{out['per_device_max'] / 2**20:.3f} MiB ({100 * out['fraction']:.1f}%), of which "
        f"replicated {replicated / 2**20:.3f} MiB; 1/8 + replicated = {out['ideal'] / 2**20:.3f} MiB")
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--json")
  args = p.parse_args(argv)
  print(f"jax {jax.__version__}, {len(jax.devices())} x {jax.devices()[0].device_kind}, "
        f"{os.cpu_count()} CPU cores; model d={CFG.d_model} L={CFG.n_layers} ff={CFG.ff}, "
        f"batch {args.batch}x{CFG.max_len}", flush=True)
  res = dict(jax=jax.__version__, devices=len(jax.devices()), device=jax.devices()[0].device_kind,
             cpus=os.cpu_count(), qat=qat_step_times(args.batch, args.steps), bytes=converted_bytes())
  print("\n| layout | QAT step (median) | vs 1 device |\n|---|---|---|")
  for r in res["qat"]:
    print(f"| {r['layout']} | {r['median_s'] * 1e3:.1f} ms | {r['vs_1_device']:.2f}x |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(res, f, indent=1)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
