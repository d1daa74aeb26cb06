"""Benchmark lowbit's matmul kernels against XLA's bf16 dot, int8 dot and dequantize-then-dot.

Usage::

    python experiments/bench_kernels.py                  # CPU: XLA paths, small grid
    python experiments/bench_kernels.py --full --sweep   # GPU: every kernel, every shape

Every implementation is a jitted function that multiplies one activation by
``R`` different weight buffers (so the 50-60 MB L2 cache does not hold the
weight between calls); a time is that function's time divided by ``R``.

* On a GPU the time is **device time**: CUPTI records every kernel the function
  launches (``jax.experimental.mosaic.gpu.profiler.measure``), so a call that
  launches a pad, a kernel and a reduction is charged all three, and the host's
  launch latency is not (on the lent VM it is ~18 us per op; the wall-clock
  median is recorded beside it as ``us_wall``). Median over ``--reps``
  iterations.
* On CPU the time is the wall-clock median.

Ratios are to XLA's bf16 ``jnp.dot`` timed the same way in the same run. The
bound is the roofline ratio ``t_floor(bf16) / t_floor(impl)``, each floor the
larger of bytes / bandwidth (bandwidth measured here by a device copy) and
operations / the datasheet peak (H100/H200: 989 TFLOP/s bf16, 1979 TOP/s int8).
On a Hopper GPU (sm_90) the Mosaic GPU kernels (``backend="mosaic_gpu"``) are
timed beside the Triton ones: W8A8 from M = 256 up (``lowbit_w8a8_hopper``),
W4A16 and W4A8 up to M = 256 (``lowbit_w4a16_hopper_nk``,
``lowbit_w4a8_hopper_nk``, the first tiles; ``--sweep`` times their candidates at
every M). Rows ending in ``_nk`` take
the weight stored K-major ahead of time (``weight_layout="nk"``): no transpose
in the call. ``--sweep`` also times ``BlockSizes`` candidates (tiles,
orientation, split-K, K-major weights), ``HopperTiles`` and ``HopperW4Tiles``
candidates at K = N = 8192; every candidate's output is checked against
the XLA path and a wrong one is reported, never ranked. Executables are
compiled in parallel threads first, then timed one at a time. Writes a JSON
file after every point and prints a markdown table at the end.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import functools
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_gate
import jax
import jax.numpy as jnp
from bench_gate import admitted
from lowbit.kernels import BlockSizes, HopperTiles, HopperW4Tiles

from lowbit import kernels as K
from lowbit.quant import QuantSpec, dequantize, quantize

PEAK = {"bf16": 989e12, "int8": 1979e12}
M_ALL = (1, 16, 64, 256, 4096)
KN_ALL = ((8192, 8192), (4096, 4096), (4096, 14336))
GROUP = 128
KERNELS = (("w8a8", K.w8a8_matmul, "int8", "int8", "int8"),
           ("w4a16", K.w4a16_matmul, "int4", "bf16", "bf16"),
           ("w4a8", K.w4a8_matmul, "int4", "int8", "int8"))
XLA_OF = {"w8a8": "xla_int8_dot", "w4a16": "xla_w4a16_g128", "w4a8": "xla_w4a8_g128",
          "w4a8_int": "xla_w4a8_g128_int"}


def xla_of(name: str) -> str:
  """The XLA row a lowbit row or sweep kernel is checked against: the same weight format
  (integer group scales, ``*_int*``, against ``xla_w4a8_g128_int``)."""
  kname = name.removeprefix("lowbit_").split("_")[0]
  return XLA_OF["w4a8_int"] if "_int" in name else XLA_OF[kname]


def wall(fn, args, reps: int) -> float:
  """Median wall seconds of ``fn(*args)`` after >= 0.05 s of warm-up (block_until_ready)."""
  t_end = time.perf_counter() + 0.05
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


def device(fn, args, reps: int):
  """``(median seconds, {kernel name: seconds})`` per call of ``fn`` from CUPTI, or None.

  ``None`` when CUPTI is unavailable (CPU, or a jaxlib without Mosaic GPU).
  """
  if jax.default_backend() != "gpu":
    return None
  try:
    from jax.experimental.mosaic.gpu import profiler
    _, per_iter = profiler.measure(fn, aggregate=False, iterations=reps)(*args)
  except Exception as e:  # noqa: BLE001 - CUPTI refused: the caller falls back to wall time
    print(f"CUPTI timing failed ({type(e).__name__}: {str(e)[:200]}); wall clock instead",
          flush=True)
    return None
  if not per_iter:
    return None
  if isinstance(per_iter[0], tuple):  # one iteration
    per_iter = [per_iter]
  totals = [sum(t for _, t in it) * 1e-3 for it in per_iter]
  parts: dict[str, float] = {}
  for name, t in per_iter[len(per_iter) // 2]:
    parts[name] = parts.get(name, 0.0) + t * 1e-3
  return statistics.median(totals), parts


def n_buffers(weight_bytes: int, platform: str) -> int:
  if platform == "cpu":
    return 2
  return int(min(16, max(2, -(-160 * 2**20 // weight_bytes))))


def copy_bandwidth(platform: str, reps: int) -> float | None:
  if platform == "cpu":
    return None
  a = jnp.ones((512 * 2**20,), jnp.float32)  # 2 GiB read + 2 GiB written
  f = jax.jit(lambda a: a + 1.0)
  d = device(f, (a,), reps)
  t = d[0] if d else wall(f, (a,), reps)
  return 2 * a.nbytes / t


def make_weights(k, n, r, key):
  """R independent weights: bf16, int8 per-channel, int4 packed g128 (bf16 scales), and
  ``int4i``: int4 g128 with integer group scales under bf16 channel scales
  (``QuantSpec(group_scales="int")``)."""
  out = {"bf16": [], "int8": [], "int4": [], "int4i": []}
  for i in range(r):
    w = jax.random.normal(jax.random.fold_in(key, i), (k, n), jnp.float32)
    out["bf16"].append(w.astype(jnp.bfloat16))
    out["int8"].append(quantize(w, QuantSpec(bits=8, channel_axes=(1,), scale_dtype=jnp.bfloat16)))
    for kind, gs in (("int4", "float"), ("int4i", "int")):
      out[kind].append(quantize(w, QuantSpec(bits=4, channel_axes=(1,), group_size=GROUP,
                                             pack=True, scale_dtype=jnp.bfloat16,
                                             group_scales=gs)))
    del w
  for kind in ("int8", "int4", "int4i"):  # stored K-major ahead of time
    out[f"{kind}_nk"] = [q.transpose() for q in out[kind]]
  return out


def many(f):
  return lambda x, ws: [f(x, w) for w in ws]


def baselines():
  """name -> (fn(x, w), weight kind, activation kind, op kind): XLA's paths."""
  return {
      "xla_bf16_dot": (many(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.bfloat16)),
                       "bf16", "bf16", "bf16"),
      "xla_int8_dot": (many(lambda x, w: K.w8a8.xla(x, w, out_dtype=jnp.bfloat16)),
                       "int8", "int8", "int8"),
      "xla_dequant_dot_w4g128": (many(lambda x, w: jnp.dot(x, dequantize(w, x.dtype))),
                                 "int4", "bf16", "bf16"),
      "xla_w4a16_g128": (many(lambda x, w: K.w4a16.xla(x, w, out_dtype=jnp.bfloat16)),
                         "int4", "bf16", "bf16"),
      "xla_w4a8_g128": (many(lambda x, w: K.w4a8.xla(x, w, out_dtype=jnp.bfloat16)),
                        "int4", "int8", "int8"),
      # integer group scales: one int8 dot over all of K, one scale per token and channel
      "xla_w4a8_g128_int": (many(lambda x, w: K.w4a8.xla(x, w, out_dtype=jnp.bfloat16)),
                            "int4i", "int8", "int8"),
  }


def kernel_fn(fn, bs, **kw):
  return many(lambda x, w: fn(x, w, out_dtype=jnp.bfloat16, block_sizes=bs, **kw))


def bytes_of(m, k, n, wkind, akind):
  wkind = wkind.removesuffix("_nk")
  wb = {"bf16": 2 * k * n, "int8": k * n + 2 * n, "int4": k * n // 2 + 2 * n * (k // GROUP),
        "int4i": k * n // 2 + n * (k // GROUP) + 2 * n}[wkind]
  ab = {"bf16": 2 * m * k, "int8": m * k + 4 * m}[akind]
  return wb + ab + 2 * m * n


def floor_time(m, k, n, wkind, akind, op, bw):
  return max(bytes_of(m, k, n, wkind, akind) / bw, 2 * m * k * n / PEAK[op])


def B(bm, bn, bk, split_k=1, num_warps=4, num_stages=3, orient="xw", k_major=False,
      fast_unpack=True):
  return BlockSizes(bm=bm, bn=bn, bk=bk, split_k=split_k, num_warps=num_warps,
                    num_stages=num_stages, orient=orient, k_major=k_major,
                    fast_unpack=fast_unpack)


def candidates(kernel: str, m: int) -> list[BlockSizes]:
  """BlockSizes tried by ``--sweep`` for one kernel at one M: earlier runs' best and
  their neighbours (orientation, tiles, split-K, K-major weights, the int4 unpack)."""
  int4 = kernel != "w8a8"
  if m <= 16:
    out = [B(16, 128, 128, 4, 4, 4), B(16, 64, 128, 8, 4, 3), B(16, 128, 128, 8, 4, 4),
           B(16, 64, 128, 4, 4, 4, "wx"), B(16, 128, 128, 4, 4, 4, "wx"),
           B(16, 128, 64, 8, 4, 4), B(16, 256, 128, 4, 8, 4)]
    if int4:
      out.append(B(16, 128, 128, 4, 4, 4, fast_unpack=False))
    return out
  if m <= 64:
    out = [B(64, 64, 128, 2, 4, 4), B(64, 64, 128, 2, 4, 3, "wx"), B(64, 64, 128, 4, 4, 3, "wx"),
           B(64, 64, 128, 1, 4, 3, "wx"), B(64, 128, 64, 2, 4, 4, "wx"),
           B(16, 128, 128, 4, 4, 4), B(64, 64, 128, 2, 4, 4, k_major=True)]
    if int4:
      out.append(B(64, 64, 128, 2, 4, 3, "wx", fast_unpack=False))
    return out
  if kernel == "w8a8":
    return [B(128, 128, 128, 1, 8, 3, k_major=True), B(128, 128, 128, 1, 8, 4, k_major=True),
            B(128, 128, 128, 1, 4, 4, k_major=True), B(256, 128, 64, 1, 8, 3, k_major=True),
            B(128, 128, 256, 1, 8, 3, k_major=True), B(128, 64, 128, 1, 4, 4, k_major=True),
            B(256, 128, 128, 1, 8, 3, k_major=True), B(128, 256, 128, 1, 8, 4, k_major=True)]
  out = [B(128, 128, 128, 1, 8, 3, "wx"), B(128, 128, 128, 1, 8, 4, "wx"),
         B(256, 128, 64, 1, 8, 3, "wx"), B(128, 64, 128, 1, 4, 4, "wx"),
         B(256, 64, 128, 1, 8, 3, "wx"), B(128, 128, 64, 1, 4, 4, "wx"),
         B(128, 128, 128, 1, 8, 3, "wx", fast_unpack=False)]
  if m <= 256:
    out += [B(64, 128, 128, 2, 4, 3, "wx"), B(128, 64, 128, 2, 4, 3, "wx")]
  return out


def candidates_nk(kernel: str, m: int) -> list[BlockSizes]:
  """Triton tiles tried by ``--sweep`` on a weight stored ``"nk"`` (K-major tiles, no
  transpose of codes or scales per call), at decode (M <= 16): the decode default, the
  weight tile as the MMA's row-major A operand ("wx"), wider or deeper tiles, split-K."""
  if m > 16:
    return []
  kb = functools.partial(B, k_major=True)
  return [kb(16, 128, 64, 8, 4, 4), kb(16, 128, 64, 8, 4, 4, "wx"), kb(16, 64, 128, 8, 4, 4, "wx"),
          kb(16, 128, 128, 4, 4, 4, "wx"), kb(16, 256, 64, 8, 8, 4), kb(16, 128, 64, 16, 4, 4),
          kb(16, 128, 64, 8, 4, 6), kb(16, 64, 64, 16, 4, 4, "wx"), kb(16, 128, 128, 8, 4, 3),
          kb(16, 64, 128, 16, 4, 4)]


def hopper_candidates(m: int) -> list[HopperTiles]:
  """Tiles of the Mosaic GPU W8A8 kernel tried by ``--sweep`` (M >= 1024; run 5: Triton's
  K-major tiles win at M = 256): the default,
  a deeper or shallower pipeline, the other warpgroup split and snake order, band widths."""
  if m < 1024:
    return []
  T = HopperTiles
  # (run 5: max_concurrent_steps=4 with epi_tile=32 failed Mosaic's layout inference)
  return [T(), T(grid_minor="n"), T(max_concurrent_steps=4), T(grid_tile_width=4),
          T(grid_tile_width=16), T(tile_n=64, max_concurrent_steps=4)]


def hopper_w4_candidates(m: int, kname: str = "w4a16") -> list[HopperW4Tiles]:
  """Tiles of the Mosaic GPU int4 kernel tried by ``--sweep`` at ``m`` tokens (each fits
  there; tests/kernels/test_lowering.py lowers them all): the default tiles, then
  :data:`_mosaic_gpu.AUTO`'s and their neighbours (pipeline depth, warp MMAs, token
  tiles, halves apart, the epilogue); what earlier runs timed and lost is in the comments
  and docs/kernels.md. Those that do not fit at ``m`` tokens (the sweep's K = N = 8192,
  groups of 128, weight K-major: shared memory, warp MMAs past 32 tokens) are left out."""
  def fits(t):
    try:
      K._mosaic_gpu.plan_w4(kname, m, 8192, 8192, GROUP, t,
                            act_bytes=1 if kname == "w4a8" else 2, weight_layout="nk")
    except ValueError:
      return False
    return True
  return [t for t in _w4_candidates(m, kname) if fits(t)]


def _w4_candidates(m: int, kname: str) -> list[HopperW4Tiles]:
  T = HopperW4Tiles
  S = functools.partial(T, nibbles="split")
  # nk_scales="slab": the scales read as stored, no per-call transpose (side by side with
  # the default); unpack="ptx": split nibbles converted by inline PTX from 32-bit loads
  # (W4A16: no shuffle, tokens reordered per call).
  P = functools.partial(S, unpack="ptx")
  # unpack="ptx_natural" (W4A16): 2-byte loads in the bf16 operand's layout, no token reorder
  NAT = functools.partial(S, unpack="ptx_natural")
  if m >= 64 and kname == "w4a16":
    # Run 9 (M = 256 and 4096): 128-token tiles with each K-step's halves scaled apart, the
    # output written by the kernel: 53.4 us at M = 256 (0.90x) against Triton's 103.5, the
    # default from M = 129 since. Halves together spill (sass_stats.py) and ran 101 us; slab
    # scales do not fit beside two 80 KiB stages. Run 10 at M = 64 and 128: 64-token tiles
    # with the kernel's epilogue 34.3-35.9 us (the default there since), the 128-token
    # tiles 50.7-52.8 with it and 34.8-37.3 with XLA's.
    A = dict(tile_m=128, halves="apart")
    return [NAT(**A, epilogue="kernel"), NAT(**A), NAT(**A, pingpong=True), P(**A),
            NAT(tile_m=64, halves="apart", epilogue="kernel"), NAT(tile_m=64, epilogue="kernel"),
            NAT(tile_m=64, nk_scales="slab", epilogue="kernel")]
  if m > 256:  # W4A8 prefill (run 9, M = 4096: halves apart 590 us, together 622)
    return [P(tile_m=128, halves="apart"), P(tile_m=128), P(tile_m=128, epilogue="kernel"),
            P(tile_m=128, halves="apart", pingpong=True),
            P(tile_m=128, halves="apart", nk_scales="slab")]  # 2 stages: not yet timed
  if m > 64:  # W4A8's M = 256 target: MMA-bound, token tiles of 64 to 128
    # Runs 9-10 at M = 256 (1.2-1.3x at best): 128-token tiles 39.8-41.9 us whether halves
    # are apart, the scales slab or transposed, the epilogue the kernel's, with turns or 3
    # stages; "magic" sums 42.9-45.8, 64-token tiles 50-52, Mosaic's conversion 49-52, split
    # K 51.9. The default (slab scales, run 10: 24.7 us at M = 128, 39.8 at 256), its
    # neighbours, the 64-token tiles.
    return [P(tile_m=128, nk_scales="slab"), P(tile_m=128, halves="apart"), P(tile_m=128),
            P(tile_m=128, halves="apart", epilogue="kernel"), P(tile_m=64),
            P(tile_m=128, halves="apart", nk_scales="slab")]  # 2 stages: not yet timed
  one = dict(wg_split="k", nk_scales="slab", pad_tokens=False)
  if kname == "w4a8":  # W4A8 has no decode target
    # Run 9: the one kernel (K split over the warpgroups, the output scaled and written by
    # the kernel) 11.2 us at M = 1 (3.03x), 12.1 at M = 16: the default since; then deeper
    # pipelines (10 stages fit at M = 1 only), run 8's tiles, and at M = 64 the 128-token ones
    Q = functools.partial(P, int_sums="magic", **one)
    return ([T(), Q(epilogue="kernel")]
            + [Q(epilogue="kernel", max_concurrent_steps=d) for d in (6, 8, 10)]
            + [P(tile_n=128, nk_scales="slab", int_sums="magic", pad_tokens=False)]
            + ([P(tile_m=128, halves="apart")] if m >= 64 else []))
  # (compute_wgs=4 hangs compiled, run 8: refused by plan_w4; runs 5-8: byte loads, "ops"
  # unpacking and split-K 1 or 4 lose.) Run 9 at M = 1 (16): the one kernel with warp MMAs
  # (mma="sync") and 6 stages 12.7 us (15.4), the default since; with wgmmas 14.1 (15.8);
  # two K-steps per wait, 3 warpgroups taking K-steps in turn, turns at wgmma, split K over
  # CTAs and 3 stages all lose (docs/kernels.md). Its neighbours: 5 and 8 stages (run 10:
  # 13.7, 13.0), 6 with wgmmas (13.9), 4 with warp MMAs (13.3). Between 17 and 63 tokens
  # (Triton's today, not yet compared) also the 64-token tiles of the default at 64-128.
  # offset="folded" (nineteenth session, untimed): the conversion without its two bf16
  # fmas, each group's sum corrected by 136 times its token sums from a ones MMA; the
  # loop 290 SASS instructions a step against 319 (sass_stats.py), right after the default.
  S1 = dict(one, epilogue="kernel")
  return ([T(), NAT(**S1, mma="sync", max_concurrent_steps=6),
           NAT(**S1, mma="sync", max_concurrent_steps=6, offset="folded"),
           NAT(**S1, mma="sync", offset="folded"), NAT(**S1),
           NAT(**S1, mma="sync", max_concurrent_steps=5),
           NAT(**S1, mma="sync", max_concurrent_steps=8),
           NAT(**S1, max_concurrent_steps=6), NAT(**S1, mma="sync")]
          + ([NAT(tile_m=64, epilogue="kernel")] if m > 16 else []))


def hopper_fn(tiles, interpret: bool, weight_layout: str = "kn", kname: str = "w4a16"):
  """The Mosaic GPU kernel that ``tiles`` select (W8A8, or ``kname`` for int4 tiles), as
  a timed function."""
  backend = "mosaic_gpu_interpret" if interpret else "mosaic_gpu"
  if interpret:  # the CPU check of this script: the interpreter runs every SM as threads
    tiles = dataclasses.replace(tiles, num_sms=2)
  if isinstance(tiles, HopperW4Tiles):
    fn = K.w4a8_matmul if kname == "w4a8" else K.w4a16_matmul
  else:
    fn = K.w8a8_matmul
  return kernel_fn(fn, tiles, backend=backend, weight_layout=weight_layout)


def compile_all(jobs, threads: int):
  """``jobs: [(key, fn, args)]`` -> ``{key: compiled or Exception}``, compiled in threads."""
  def one(job):
    key, fn, args = job
    try:
      return key, jax.jit(fn).lower(*args).compile()
    except Exception as e:  # noqa: BLE001 - a rejected candidate is data, not a crash
      return key, e
  with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as ex:
    return dict(ex.map(one, jobs))


def rel_err(a, b) -> float:
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--full", action="store_true", help="every M and (K, N) of the spec")
  ap.add_argument("--sweep", action="store_true", help="also time BlockSizes candidates")
  ap.add_argument("--reps", type=int, default=20)
  ap.add_argument("--out", default="bench_kernels.json")
  ap.add_argument("--m", type=int, nargs="*", help="override the M list")
  ap.add_argument("--kn", type=str, nargs="*", help="override (K, N): e.g. 8192x8192")
  ap.add_argument("--sweep-m", type=int, nargs="*", default=[1, 16, 64, 256, 4096, 8192],
                  help="M values (at K = N = 8192) where --sweep runs")
  ap.add_argument("--sweep-kernels", nargs="*",
                  default=["w8a8", "w4a16", "w4a8", "w4a16_nk", "w4a8_nk", "w8a8_hopper",
                           "w4a16_hopper", "w4a8_hopper", "w4a8_int_hopper"],
                  help="*_nk: Triton tiles on the K-major stored weight (M <= 16); *_hopper: "
                       "the Mosaic GPU kernels' tiles (sm_90; W8A8 at M >= 1024, int4 at every "
                       "M); w4a8_int_hopper: W4A8's PTX tiles on integer group scales")
  ap.add_argument("--no-hopper", nargs="*", choices=["w8a8", "w4a16", "w4a8"],
                  help="leave out the Mosaic GPU kernels named, or all of them with no name "
                       "(e.g. when their tests failed)")
  ap.add_argument("--skip-tiles", nargs="*", default=[],
                  help="leave out sweep candidates whose repr contains any of these strings "
                       "(e.g. \"nk_scales='slab'\" when that variant's compiled tests failed); "
                       "a+b: those whose repr contains both")
  ap.add_argument("--deadline", type=float, default=1e9,
                  help="seconds; no new point starts after this (the JSON so far is kept)")
  ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 2))
  ap.add_argument("--force-kernels", action="store_true",
                  help="time the kernels (interpreted) and sweep on CPU too: tests this script")
  args = ap.parse_args(argv)
  t_start = time.perf_counter()

  platform = jax.default_backend()
  dev = jax.devices()[0]
  ms = tuple(args.m) if args.m else (M_ALL if (args.full or platform != "cpu") else (1, 16, 64, 256))
  if args.kn:
    kns = tuple(tuple(int(v) for v in s.split("x")) for s in args.kn)
  else:
    kns = KN_ALL if (args.full or platform != "cpu") else ((4096, 4096),)
  bw = copy_bandwidth(platform, args.reps)
  tiny = jnp.ones((8, 128), jnp.float32)
  floor = wall(jax.jit(many(lambda x, w: x + w)), (tiny, [tiny] * 8), 20) / 8
  timer = "cupti" if device(jax.jit(lambda a: a + 1.0), (tiny,), 2) else "wall"
  # The Mosaic GPU kernels need Hopper (sm_90: TMA, wgmma); on CPU, --force-kernels runs
  # them interpreted (W8A8 at M >= 64, W4A16 at M <= 16).
  sm90 = K._mosaic_gpu.is_hopper()
  hopper_interp = platform == "cpu" and args.force_kernels
  hopper = {kn: (sm90 or hopper_interp) and admitted(kn, None, args.no_hopper, [])
            for kn in ("w8a8", "w4a16", "w4a8")}
  meta = dict(device=str(dev.device_kind), platform=platform, jax=jax.__version__,
              date=datetime.date.today().isoformat(), copy_bandwidth_GBps=bw and bw / 1e9,
              reps=args.reps, group=GROUP, per_op_floor_us=floor * 1e6, timer=timer)
  print(json.dumps(meta), flush=True)
  rows, sweeps = [], []

  def save():  # after every row: a run killed at its time limit keeps what it measured
    with open(args.out, "w") as f:
      json.dump(dict(meta=meta, rows=rows, sweeps=sweeps), f, indent=1)

  key = jax.random.key(0)
  for k, n in kns:
    r = n_buffers(k * n // 2, platform)
    ws = make_weights(k, n, r, jax.random.fold_in(key, k * n))
    extra = (8192,) if (k, n) == (8192, 8192) and platform == "gpu" and not args.m else ()
    for m in ms + extra:
      if time.perf_counter() - t_start > args.deadline:
        print(f"deadline reached before m={m} k={k} n={n}", flush=True)
        break
      x = jax.random.normal(jax.random.fold_in(key, m), (m, k), jnp.float32)
      xs = {"bf16": x.astype(jnp.bfloat16),
            "int8": quantize(x, QuantSpec(bits=8, channel_axes=(0,)))}
      impls = dict(baselines())
      # The Triton / TPU kernels by name (on GPU backend="gpu": the wrappers' own default
      # takes a Mosaic GPU kernel where _mosaic_gpu.AUTO says, timed as *_auto_nk).
      pallas_backend = "gpu" if platform == "gpu" else None
      if platform in ("gpu", "tpu") or args.force_kernels:
        for kname, fn, wk, ak, op in KERNELS:
          impls[f"lowbit_{kname}" + ("_g128" if wk == "int4" else "")] = (
              kernel_fn(fn, None, backend=pallas_backend), wk, ak, op)
        # the weight stored K-major ahead of time: no transpose per call
        for kname, fn, wk, ak, op in KERNELS:
          impls[f"lowbit_{kname}_nk"] = (
              kernel_fn(fn, None, backend=pallas_backend, weight_layout="nk"), f"{wk}_nk", ak, op)
      # the Mosaic GPU tiles (or None: Triton) the default dispatch takes at this point
      auto_of = {kname: K._mosaic_gpu.auto_tiles(kname, m, k, n,
                                                 None if kname == "w8a8" else GROUP, "nk")
                 for kname, *_ in KERNELS}
      if sm90:  # what a converted model (weight_layout="nk") gets by default on this GPU
        for kname, fn, wk, ak, op in KERNELS:
          # not where the default takes Mosaic GPU tiles that the tests failed (or hung)
          auto = auto_of[kname]
          if auto is not None and not admitted(kname, auto, args.no_hopper, args.skip_tiles):
            print(f"skipped lowbit_{kname}_auto_nk m={m}: its tiles' tests failed: {auto}")
            continue
          impls[f"lowbit_{kname}_auto_nk"] = (kernel_fn(fn, None, weight_layout="nk"),
                                              f"{wk}_nk", ak, op)
        # W4A8 with integer group scales through the same default tiles (its own step)
        if admitted("w4a8", auto_of["w4a8"], args.no_hopper, args.skip_tiles):
          impls["lowbit_w4a8_int_auto_nk"] = (kernel_fn(K.w4a8_matmul, None, weight_layout="nk"),
                                              "int4i_nk", "int8", "int8")
      if hopper["w8a8"] and m >= (64 if hopper_interp else 256):
        impls["lowbit_w8a8_hopper"] = (hopper_fn(HopperTiles(), hopper_interp),
                                       "int8", "int8", "int8")
        impls["lowbit_w8a8_hopper_nk"] = (hopper_fn(HopperTiles(), hopper_interp, "nk"),
                                          "int8_nk", "int8", "int8")
      if hopper["w4a16"] and m <= (16 if hopper_interp else 256):
        impls["lowbit_w4a16_hopper_nk"] = (hopper_fn(HopperW4Tiles(), hopper_interp, "nk"),
                                           "int4_nk", "bf16", "bf16")
      if hopper["w4a8"] and m <= (16 if hopper_interp else 256):
        impls["lowbit_w4a8_hopper_nk"] = (hopper_fn(HopperW4Tiles(), hopper_interp, "nk", "w4a8"),
                                          "int4_nk", "int8", "int8")
      jobs = [(name, fn, (xs[ak], ws[wk])) for name, (fn, wk, ak, _op) in impls.items()]
      sweep_here = args.sweep and m in args.sweep_m and (
          args.force_kernels or (platform == "gpu" and (k, n) == (8192, 8192)))
      if sweep_here:
        for kname, fn, wk, ak, _op in KERNELS:
          if kname not in args.sweep_kernels or (m == 8192 and kname != "w8a8"):
            continue
          for bs in candidates(kname, m):
            jobs.append(((kname, bs), kernel_fn(fn, bs), (xs[ak], ws[wk])))
        for kname, fn, wk, ak, _op in KERNELS:  # Triton tiles on the weight stored K-major
          if f"{kname}_nk" in args.sweep_kernels:
            for bs in candidates_nk(kname, m):
              jobs.append(((kname, bs, "nk"), kernel_fn(fn, bs, weight_layout="nk"),
                           (xs[ak], ws[f"{wk}_nk"])))
        if "w8a8_hopper" in args.sweep_kernels and hopper["w8a8"]:
          for tiles in hopper_candidates(m):
            jobs.append((("w8a8", tiles), hopper_fn(tiles, hopper_interp),
                         (xs["int8"], ws["int8"])))
        for kname, ak in (("w4a16", "bf16"), ("w4a8", "int8")):
          if f"{kname}_hopper" in args.sweep_kernels and hopper[kname] and (
              m <= 16 or not hopper_interp):
            for tiles in hopper_w4_candidates(m, kname):
              if not admitted(kname, tiles, args.no_hopper, args.skip_tiles):
                continue
              jobs.append(((kname, tiles), hopper_fn(tiles, hopper_interp, "nk", kname),
                           (xs[ak], ws["int4_nk"])))
        # integer group scales: the W4A8 candidates that convert by PTX (the ones it takes)
        if "w4a8_int_hopper" in args.sweep_kernels and hopper["w4a8"] and (
            m <= 16 or not hopper_interp):
          for tiles in hopper_w4_candidates(m, "w4a8"):
            if tiles.unpack == "ptx" and admitted("w4a8", tiles, args.no_hopper,
                                                  args.skip_tiles):
              jobs.append((("w4a8_int", tiles), hopper_fn(tiles, hopper_interp, "nk", "w4a8"),
                           (xs["int8"], ws["int4i_nk"])))
      t0 = time.perf_counter()
      compiled = compile_all(jobs, args.threads if platform == "gpu" else 1)
      print(f"m={m} k={k} n={n}: compiled {len(jobs)} in {time.perf_counter() - t0:.1f} s",
            flush=True)
      outs, base = {}, None

      def timeit(job_key, a, with_wall=True, compiled=compiled, r=r):
        c = compiled[job_key]
        if isinstance(c, Exception):
          raise c
        d = device(c, a, args.reps) if timer == "cupti" else None
        t_wall = wall(c, a, max(5, args.reps // 2)) / r if (with_wall or not d) else None
        return (d[0] / r if d else t_wall), t_wall, ({nm: v / r for nm, v in d[1].items()}
                                                    if d else None), c(*a)[0]

      for name, (_fn, wk, ak, op) in impls.items():
        a = (xs[ak], ws[wk])
        try:
          t, t_wall, parts, y = timeit(name, a)
        except Exception as e:  # one failing kernel must not hide the rest
          print(f"FAILED {name} m={m} k={k} n={n}: {type(e).__name__}: {str(e)[:300]}", flush=True)
          continue
        outs[name] = y
        if name == "xla_bf16_dot":
          base = t
        nb = bytes_of(m, k, n, wk, ak)
        row = dict(m=m, k=k, n=n, impl=name, us=t * 1e6, us_wall=t_wall * 1e6,
                   speedup_vs_bf16=base / t, GBps=nb / t / 1e9, TOPs=2 * m * k * n / t / 1e12,
                   kernels_us=parts and {nm: v * 1e6 for nm, v in parts.items()})
        if bw:
          row["bound"] = floor_time(m, k, n, "bf16", "bf16", "bf16", bw) / floor_time(
              m, k, n, wk, ak, op, bw)
        if name.startswith("lowbit_"):
          kname = name.split("_")[1]
          if xla_of(name) in outs:
            row["rel_err_vs_xla"] = rel_err(y, outs[xla_of(name)])
          if "_hopper" in name:
            bs = HopperTiles() if kname == "w8a8" else HopperW4Tiles()
          else:  # the tiles the wrapper resolves for this layout
            layout = "nk" if name.endswith("_nk") else "kn"
            bs = K._pallas.resolve_block_sizes(kname, "gpu", m, k, n, None, layout)
            if "_auto" in name:
              bs = auto_of[kname] or bs
          row["block_sizes"] = str(bs)
        rows.append(row)
        print(json.dumps(row), flush=True)
        save()
      for job_key, _fn, a in jobs:
        if not isinstance(job_key, tuple):
          continue
        kname, bs, *nk = job_key
        try:
          t, t_wall, parts, y = timeit(job_key, a, with_wall=False)
        except Exception as e:  # a candidate the compiler rejects is data, not a crash
          print(f"sweep {kname} m={m} {bs}: {type(e).__name__}: {str(e)[:200]}", flush=True)
          continue
        err = rel_err(y, outs[XLA_OF[kname]]) if XLA_OF[kname] in outs else None  # same format
        s = dict(m=m, k=k, n=n, kernel=kname, block_sizes=str(bs) + (" nk" if nk else ""),
                 us=t * 1e6,
                 us_wall=t_wall and t_wall * 1e6, speedup_vs_bf16=base / t if base else 0.0,
                 rel_err_vs_xla=err, correct=err is not None and err < 1e-2)
        sweeps.append(s)
        print(json.dumps(s), flush=True)
        save()
    del ws
  save()
  print_table(meta, rows, sweeps)


def print_table(meta, rows, sweeps):
  print(f"\n{meta['device']} ({meta['platform']}), jax {meta['jax']}, {meta['date']}; "
        f"timer {meta['timer']}, median of {meta['reps']}; speedup = t(xla bf16 dot) / t(impl)")
  print("| M | K | N | impl | us | us wall | x bf16 | bound | GB/s | TOP/s |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    b = f"{r['bound']:.2f}" if "bound" in r else "-"
    print(f"| {r['m']} | {r['k']} | {r['n']} | {r['impl']} | {r['us']:.1f} | {r['us_wall']:.1f} | "
          f"{r['speedup_vs_bf16']:.2f} | {b} | {r['GBps']:.0f} | {r['TOPs']:.1f} |")
  if sweeps:
    print("\nbest correct BlockSizes per point (sweep):")
    best = {}
    for s in sweeps:
      key = (s["m"], s["k"], s["n"], s["kernel"])
      if s["correct"] and (key not in best or s["us"] < best[key]["us"]):
        best[key] = s
    for key, s in sorted(best.items()):
      print(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {s['us']:.1f} | "
            f"{s['speedup_vs_bf16']:.2f} | {s['block_sizes']} |")
    bad = [s for s in sweeps if not s["correct"]]
    if bad:
      print(f"\n{len(bad)} sweep candidates gave wrong outputs (excluded):")
      for s in bad[:20]:
        print(f"  m={s['m']} {s['kernel']} {s['block_sizes']} rel err {s['rel_err_vs_xla']}")


if __name__ == "__main__":
  sys.exit(main())
