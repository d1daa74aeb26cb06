"""Forward time of a converted transformer vs its float forward, same process.

    python experiments/bench_forward.py              # CPU defaults: d=512, 4 layers, 8x128 tokens

Prints the median time of a jitted forward (``jax.jit`` over the model's state,
split once: no per-call walk of the module on the host) for float and each
ready-made policy (converted), and the ratio to float measured in the same run. On CPU
the converted model runs the XLA paths (int8 x int8 -> int32 dots for W8A8 and
W4A8); on a GPU the Pallas kernels. ``--weight-layouts kn nk`` also times each
policy converted with its weights stored K-major (``lowbit.convert(...,
weight_layout="nk")``, rows ``<policy>-nk``); ``--bf16`` runs the model in
bfloat16 (what a GPU serves), ``--out`` writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

import lowbit
from lowbit.nn import Transformer, TransformerConfig


def timed(f, reps):
  jax.block_until_ready(f())
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(f())
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts)


def policy_of(name: str) -> lowbit.PrecisionPolicy:
  """A ready-made policy by name (``lowbit.policy.READY_MADE``, e.g. ``w4a8-g128-int``:
  integer group scales), or ``w4a8-g<G>``: W4A8 with weight groups of G (the ready-made
  ``w4a8`` is per-channel)."""
  if name in lowbit.policy.READY_MADE:
    return lowbit.policy.READY_MADE[name]()
  if name.startswith("w4a8-g"):
    return lowbit.policy.w4a8(int(name.removeprefix("w4a8-g")))
  return lowbit.policy.READY_MADE[name]()


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--d", type=int, default=512)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=128)
  ap.add_argument("--reps", type=int, default=15)
  ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; best median kept")
  ap.add_argument("--policies", nargs="*", default=["w8a8", "w4a8", "w4a8-g128", "w8a16", "w4a16"],
                  help="ready-made policy names, or w4a8-g<G> (W4A8 with groups of G)")
  ap.add_argument("--weight-layouts", nargs="*", default=["kn"], choices=["kn", "nk"])
  ap.add_argument("--bf16", action="store_true", help="activations and float weights in bf16")
  ap.add_argument("--out", help="write the rows here as JSON")
  args = ap.parse_args(argv)
  cfg = TransformerConfig.llama(vocab_size=256, d_model=args.d, n_layers=args.layers,
                                n_heads=args.d // 64, d_ff=4 * args.d, max_len=args.seq,
                                **(dict(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
                                   if args.bf16 else {}))
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  tok = jax.random.randint(jax.random.key(0), (args.batch, args.seq), 0, cfg.vocab_size)
  models = {"float": model}
  for name in args.policies:
    for layout in args.weight_layouts:
      key = name if layout == "kn" else f"{name}-nk"
      models[key] = lowbit.convert(model, policy_of(name), weight_layout=layout)
  # One jax.jit per model over its state, split once: nnx.jit would walk the module's
  # graph on the host at every call (milliseconds for a large model), which the device
  # time of a decode step does not include.
  calls = {}
  for name, m in models.items():
    graphdef, state = nnx.split(m)
    f = jax.jit(lambda s, t, g=graphdef: nnx.merge(g, s)(t))
    calls[name] = (f, state)
  best = {k: float("inf") for k in models}
  for _ in range(args.rounds):  # interleave so drift hits every variant alike
    for name, (f, state) in calls.items():
      best[name] = min(best[name], timed(lambda f=f, s=state: f(s, tok), args.reps))
  meta = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, d_model=args.d,
              layers=args.layers, tokens=args.batch * args.seq, bf16=args.bf16)
  print(json.dumps(meta))
  print(f"{'model':10s} {'ms':>8s} {'vs float':>9s}")
  for name, t in best.items():
    print(f"{name:10s} {t * 1e3:8.2f} {t / best['float']:8.2f}x")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(dict(meta=meta, rows=[dict(model=k, ms=t * 1e3, vs_float=t / best["float"])
                                      for k, t in best.items()]), f, indent=1)


if __name__ == "__main__":
  main()
