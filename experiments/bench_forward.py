"""Forward time of a converted transformer vs its float forward, same process.

    python experiments/bench_forward.py              # CPU defaults: d=512, 4 layers, 8x128 tokens

Prints the median time of a jitted forward for float and each ready-made
policy (converted), and the ratio to float measured in the same run. On CPU
the converted model runs the XLA paths (int8 x int8 -> int32 dots for W8A8 and
W4A8); on a GPU the Pallas kernels.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
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


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--d", type=int, default=512)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=128)
  ap.add_argument("--reps", type=int, default=15)
  ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; best median kept")
  ap.add_argument("--policies", nargs="*", default=["w8a8", "w4a8", "w8a16", "w4a16"])
  args = ap.parse_args(argv)
  cfg = TransformerConfig.llama(vocab_size=256, d_model=args.d, n_layers=args.layers,
                                n_heads=args.d // 64, d_ff=4 * args.d, max_len=args.seq)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  tok = jax.random.randint(jax.random.key(0), (args.batch, args.seq), 0, cfg.vocab_size)
  fwd = nnx.jit(lambda m, t: m(t))
  models = {"float": model}
  for name in args.policies:
    models[name] = lowbit.convert(model, lowbit.policy.READY_MADE[name]())
  best = {k: float("inf") for k in models}
  for _ in range(args.rounds):  # interleave so drift hits every variant alike
    for name, m in models.items():
      best[name] = min(best[name], timed(lambda m=m: fwd(m, tok), args.reps))
  print(json.dumps(dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                        d_model=args.d, layers=args.layers, tokens=args.batch * args.seq)))
  print(f"{'model':8s} {'ms':>8s} {'vs float':>9s}")
  for name, t in best.items():
    print(f"{name:8s} {t * 1e3:8.2f} {t / best['float']:8.2f}x")


if __name__ == "__main__":
  main()
