"""Benchmark lowbit's matmul kernels against XLA's bf16 dot, int8 dot and dequantize-then-dot.

Usage::

    python experiments/bench_kernels.py                  # CPU: XLA paths, small grid
    python experiments/bench_kernels.py --full --sweep   # GPU: every kernel, every shape

All timings of one run share a process and a device; each is the median over
``--reps`` calls of a jitted function that multiplies by ``R`` different weight
buffers (so the L2 cache does not hold the weight), divided by ``R``. Ratios
are to XLA's bf16 ``jnp.dot`` measured in the same run. The bound is the
roofline ratio ``t_floor(bf16) / t_floor(impl)``, each floor the larger of
bytes / bandwidth (bandwidth measured here by a device copy) and operations /
the datasheet peak (H100/H200: 989 TFLOP/s bf16, 1979 TOP/s int8).
Writes a JSON file with every row and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from lowbit.kernels import BlockSizes, default_block_sizes

from lowbit import kernels as K
from lowbit.quant import QuantSpec, dequantize, quantize

PEAK = {"bf16": 989e12, "int8": 1979e12}
M_ALL = (1, 16, 64, 256, 4096)
KN_ALL = ((4096, 4096), (8192, 8192), (4096, 14336))
GROUP = 128


def timed(fn, args, reps: int) -> float:
  """Median wall seconds of ``fn(*args)`` after warm-up (block_until_ready)."""
  t_end = time.perf_counter() + 0.3  # warm up (compile, clocks) for >= 0.3 s
  while True:
    jax.block_until_ready(fn(*args))
    if time.perf_counter() > t_end:
      break
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts)


def n_buffers(weight_bytes: int, platform: str) -> int:
  if platform == "cpu":
    return 2
  return int(min(16, max(2, -(-256 * 2**20 // weight_bytes))))


def copy_bandwidth(platform: str) -> float | None:
  if platform == "cpu":
    return None
  a = jnp.ones((512 * 2**20,), jnp.float32)  # 2 GiB
  f = jax.jit(lambda a: a * 1.0)
  t = timed(f, (a,), 10)
  return 2 * a.nbytes / t


def make_weights(k, n, r, key):
  """R independent weights: bf16, int8 per-channel, int4 packed g128 (bf16 scales)."""
  out = {"bf16": [], "int8": [], "int4": []}
  for i in range(r):
    w = jax.random.normal(jax.random.fold_in(key, i), (k, n), jnp.float32)
    out["bf16"].append(w.astype(jnp.bfloat16))
    out["int8"].append(quantize(w, QuantSpec(bits=8, channel_axes=(1,), scale_dtype=jnp.bfloat16)))
    out["int4"].append(quantize(w, QuantSpec(bits=4, channel_axes=(1,), group_size=GROUP,
                                             pack=True, scale_dtype=jnp.bfloat16)))
    del w
  return out


def impls(platform: str, m: int, k: int, n: int, bs_override=None):
  """name -> (callable(x, w), weight kind, activation kind, op kind)."""
  def many(f):
    return jax.jit(lambda x, ws: [f(x, w) for w in ws])

  out = {
      "xla_bf16_dot": (many(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.bfloat16)),
                       "bf16", "bf16", "bf16"),
      "xla_f32_dot": (many(lambda x, w: jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32))),
                      "bf16", "bf16", "bf16"),
      "xla_int8_dot": (many(lambda x, w: K.w8a8.xla(x, w, out_dtype=jnp.bfloat16)),
                       "int8", "int8", "int8"),
      "xla_dequant_dot_w4g128": (many(lambda x, w: jnp.dot(x, dequantize(w, x.dtype))),
                                 "int4", "bf16", "bf16"),
      "xla_w4a16_g128": (many(lambda x, w: K.w4a16.xla(x, w, out_dtype=jnp.bfloat16)),
                         "int4", "bf16", "bf16"),
      "xla_w4a8_g128": (many(lambda x, w: K.w4a8.xla(x, w, out_dtype=jnp.bfloat16)),
                        "int4", "int8", "int8"),
  }
  if platform in ("gpu", "tpu"):
    def kern(fn, kind, bs):
      return many(lambda x, w: fn(x, w, out_dtype=jnp.bfloat16, block_sizes=bs))
    for name, fn, wk, ak, op, kname in (
        ("lowbit_w8a8", K.w8a8_matmul, "int8", "int8", "int8", "w8a8"),
        ("lowbit_w4a16_g128", K.w4a16_matmul, "int4", "bf16", "bf16", "w4a16"),
        ("lowbit_w4a8_g128", K.w4a8_matmul, "int4", "int8", "int8", "w4a8")):
      bs = (bs_override or {}).get(kname)
      out[name] = (kern(fn, wk, bs), wk, ak, op)
  return out


def bytes_of(m, k, n, wkind, akind):
  wb = {"bf16": 2 * k * n, "int8": k * n + 2 * n, "int4": k * n // 2 + 2 * n * (k // GROUP)}[wkind]
  ab = {"bf16": 2 * m * k, "int8": m * k + 4 * m}[akind]
  return wb + ab + 2 * m * n


def floor_time(m, k, n, wkind, akind, op, bw):
  return max(bytes_of(m, k, n, wkind, akind) / bw, 2 * m * k * n / PEAK[op])


SWEEP_SMALL_M = [
    BlockSizes(bm=16, bn=32, bk=256, split_k=1, num_warps=4, num_stages=4),
    BlockSizes(bm=16, bn=64, bk=256, split_k=1, num_warps=4, num_stages=4),
    BlockSizes(bm=16, bn=64, bk=128, split_k=4, num_warps=4, num_stages=4),
    BlockSizes(bm=16, bn=64, bk=256, split_k=2, num_warps=4, num_stages=4),
    BlockSizes(bm=16, bn=128, bk=128, split_k=4, num_warps=4, num_stages=4),
    BlockSizes(bm=16, bn=32, bk=256, split_k=4, num_warps=2, num_stages=4),
    BlockSizes(bm=16, bn=64, bk=128, split_k=8, num_warps=4, num_stages=3),
    BlockSizes(bm=16, bn=128, bk=256, split_k=8, num_warps=8, num_stages=3),
]
SWEEP_MID_M = [
    BlockSizes(bm=64, bn=64, bk=128, split_k=2, num_warps=4, num_stages=4),
    BlockSizes(bm=64, bn=128, bk=64, num_warps=4, num_stages=4),
    BlockSizes(bm=128, bn=128, bk=64, num_warps=8, num_stages=3),
    BlockSizes(bm=64, bn=128, bk=128, split_k=2, num_warps=4, num_stages=3),
]
SWEEP_LARGE_M = [
    BlockSizes(bm=128, bn=128, bk=64, num_warps=4, num_stages=4),
    BlockSizes(bm=128, bn=256, bk=64, num_warps=8, num_stages=3),
    BlockSizes(bm=128, bn=128, bk=128, num_warps=8, num_stages=3),
    BlockSizes(bm=128, bn=256, bk=128, num_warps=8, num_stages=3),
    BlockSizes(bm=64, bn=256, bk=64, num_warps=4, num_stages=4),
]


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--full", action="store_true", help="every M and (K, N) of the spec")
  ap.add_argument("--sweep", action="store_true", help="also time BlockSizes candidates")
  ap.add_argument("--reps", type=int, default=20)
  ap.add_argument("--out", default="bench_kernels.json")
  ap.add_argument("--m", type=int, nargs="*", help="override the M list")
  ap.add_argument("--sweep-m", type=int, nargs="*", default=[1, 16, 64, 256, 4096, 8192],
                  help="M values (at K = N = 8192) where --sweep runs")
  args = ap.parse_args(argv)

  platform = jax.default_backend()
  dev = jax.devices()[0]
  if args.m:
    ms = tuple(args.m)
  elif args.full or platform != "cpu":
    ms = M_ALL
  else:
    ms = (1, 16, 64, 256)
  kns = KN_ALL if (args.full or platform != "cpu") else ((4096, 4096),)
  bw = copy_bandwidth(platform)
  # The per-op floor of this harness: R tiny dependent-free ops in one jitted call.
  tiny = jnp.ones((8, 128), jnp.float32)
  floor = timed(jax.jit(lambda x, ws: [x + w for w in ws]), (tiny, [tiny] * 8), 20) / 8
  meta = dict(device=str(dev.device_kind), platform=platform, jax=jax.__version__,
              date=datetime.date.today().isoformat(), copy_bandwidth_GBps=bw and bw / 1e9,
              reps=args.reps, group=GROUP, per_op_floor_us=floor * 1e6)
  print(json.dumps(meta), flush=True)
  rows, sweeps = [], []
  key = jax.random.key(0)
  for k, n in kns:
    r = n_buffers(k * n // 2, platform)
    ws = make_weights(k, n, r, jax.random.fold_in(key, k * n))
    for m in ms + ((8192,) if (k, n) == (8192, 8192) and platform == "gpu" else ()):
      x = jax.random.normal(jax.random.fold_in(key, m), (m, k), jnp.float32)
      xs = {"bf16": x.astype(jnp.bfloat16),
            "int8": quantize(x, QuantSpec(bits=8, channel_axes=(0,)))}
      base = None
      outs = {}
      for name, (fn, wk, ak, op) in impls(platform, m, k, n).items():
        try:
          t = timed(fn, (xs[ak], ws[wk]), args.reps) / r
          outs[name] = fn(xs[ak], ws[wk])[0].astype(jnp.float32)
        except Exception as e:  # report and go on: one failing kernel must not hide the rest
          print(f"FAILED {name} m={m} k={k} n={n}: {type(e).__name__}: {str(e)[:300]}", flush=True)
          continue
        if name == "xla_bf16_dot":
          base = t
        nb = bytes_of(m, k, n, wk, ak)
        row = dict(m=m, k=k, n=n, impl=name, us=t * 1e6, speedup_vs_bf16=base / t,
                   GBps=nb / t / 1e9, TOPs=2 * m * k * n / t / 1e12)
        if bw:
          row["bound"] = floor_time(m, k, n, "bf16", "bf16", "bf16", bw) / floor_time(
              m, k, n, wk, ak, op, bw)
        if name.startswith("lowbit_"):
          kname = name.split("_")[1]
          ref = outs.get("xla_" + ("int8_dot" if kname == "w8a8" else name[len("lowbit_"):]))
          if ref is not None:
            row["rel_err_vs_xla"] = float(jnp.linalg.norm(outs[name] - ref) / jnp.linalg.norm(ref))
          row["block_sizes"] = str(default_block_sizes(kname, "gpu", m, k, n))
        rows.append(row)
        print(json.dumps(row), flush=True)
      if args.sweep and platform == "gpu" and (k, n) == (8192, 8192) and m in args.sweep_m:
        cands = SWEEP_SMALL_M if m <= 16 else SWEEP_MID_M if m <= 256 else SWEEP_LARGE_M
        for kname, fn, wk, ak in (("w8a8", K.w8a8_matmul, "int8", "int8"),
                                  ("w4a16", K.w4a16_matmul, "int4", "bf16"),
                                  ("w4a8", K.w4a8_matmul, "int4", "int8")):
          for bs in cands:
            f = jax.jit(lambda x, ws, bs=bs, fn=fn: [
                fn(x, w, out_dtype=jnp.bfloat16, block_sizes=bs) for w in ws])
            try:
              t = timed(f, (xs[ak], ws[wk]), max(5, args.reps // 2)) / r
            except Exception as e:  # a candidate the compiler rejects is data, not a crash
              print(f"sweep {kname} m={m} {bs}: {type(e).__name__}: {str(e)[:200]}", flush=True)
              continue
            s = dict(m=m, k=k, n=n, kernel=kname, block_sizes=str(bs), us=t * 1e6,
                     speedup_vs_bf16=base / t)
            sweeps.append(s)
            print(json.dumps(s), flush=True)
      with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows, sweeps=sweeps), f, indent=1)
    del ws
  print_table(meta, rows, sweeps)


def print_table(meta, rows, sweeps):
  print(f"\n{meta['device']} ({meta['platform']}), jax {meta['jax']}, {meta['date']}; "
        f"median of {meta['reps']}; speedup = t(xla bf16 dot) / t(impl)")
  print("| M | K | N | impl | us | x bf16 | bound | GB/s | TOP/s |")
  print("|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    b = f"{r['bound']:.2f}" if "bound" in r else "-"
    print(f"| {r['m']} | {r['k']} | {r['n']} | {r['impl']} | {r['us']:.1f} | "
          f"{r['speedup_vs_bf16']:.2f} | {b} | {r['GBps']:.0f} | {r['TOPs']:.1f} |")
  if sweeps:
    print("\nbest BlockSizes per point (sweep):")
    best = {}
    for s in sweeps:
      key = (s["m"], s["k"], s["n"], s["kernel"])
      if key not in best or s["us"] < best[key]["us"]:
        best[key] = s
    for key, s in sorted(best.items()):
      print(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {s['us']:.1f} | "
            f"{s['speedup_vs_bf16']:.2f} | {s['block_sizes']} |")


if __name__ == "__main__":
  sys.exit(main())
