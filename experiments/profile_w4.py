"""Where the Mosaic GPU int4 kernel spends a decode step, from Mosaic GPU's own profiler.

    python experiments/profile_w4.py --out /tmp/prof     # on a Hopper GPU (sm_90)

Runs ``lowbit.kernels._mosaic_gpu.w4_matmul`` at M = 1 (``--m 256``: W4A8's tiles for
its M = 256 target), K = N = 8192, group 128
with ``profile_dir`` set: the kernel records its named regions per compute
warpgroup with the SM's clock (``load``: codes from shared memory; ``unpack``:
into wgmma's registers; ``issue`` and ``wait``: the wgmmas; ``scale``: the
group partial sums into the f32 total) and Mosaic GPU writes a Perfetto trace
per call. No
hardware counters are needed, so it works where ``ncu`` cannot read them (the
lent H200s run under gVisor). Prints, per configuration, each region's median
time per step and its share of the warpgroups' span; the rest of the span is
waiting for the TMA warpgroup's loads. Writes the summaries as JSON.

The profiled kernel cannot be lowered on a CPU machine (the profiler dumps
through a host callback), so this script has only run where it says it ran
(docs/kernels.md); :func:`summarize` is tested on CPU.
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_gate


def summarize(trace: dict) -> dict:
  """Per region of a Mosaic GPU profiler trace: count, median and total duration (us), and
  its share of the warpgroups' summed spans (first region start to last region end).

  ``trace`` is the JSON the profiler writes: ``{"traceEvents": [{"name", "ph": "B" | "E",
  "ts" (us), "pid" (SM), "tid" (warpgroup trace)}, ...]}``; regions nest per ``tid``.
  """
  by_tid = collections.defaultdict(list)
  for e in trace["traceEvents"]:
    by_tid[e["tid"]].append(e)
  durations = collections.defaultdict(list)
  spans = []
  for events in by_tid.values():
    events.sort(key=lambda e: e["ts"])
    stack = []
    for e in events:
      if e["ph"] == "B":
        stack.append(e)
      else:
        if not stack or stack[-1]["name"] != e["name"]:
          raise ValueError(f"unbalanced profiler trace at {e['name']!r} (tid {e['tid']})")
        durations[e["name"]].append(e["ts"] - stack.pop()["ts"])
    if stack:
      raise ValueError(f"unbalanced profiler trace: {stack[-1]['name']!r} never ends")
    spans.append(events[-1]["ts"] - events[0]["ts"])
  total_span = sum(spans)
  regions = {name: dict(count=len(d), median_us=statistics.median(d), total_us=sum(d),
                        share=sum(d) / total_span if total_span else 0.0)
             for name, d in sorted(durations.items())}
  return dict(warpgroups=len(spans), median_span_us=statistics.median(spans) if spans else 0.0,
              regions=regions)


def profiled_configs(m: int) -> list:
  """``[(kernel, HopperW4Tiles)]`` profiled at ``m`` tokens."""
  from lowbit import kernels as K
  T, S = K.HopperW4Tiles, functools.partial(K.HopperW4Tiles, nibbles="split")
  if m > 64:  # W4A8's M = 256 target: the int32 -> f32 group sums, the MMA waits
    # (runs 9-10's defaults first, as the stage's timeout may cut the list: W4A8 with slab
    # scales, then with halves apart, W4A16's 128-token tiles with halves apart and the
    # kernel's epilogue; then run 8's W4A8 default and it with the magic sums)
    configs = [("w4a8", S(tile_m=128, unpack="ptx", nk_scales="slab")),
               ("w4a8", S(tile_m=128, unpack="ptx", halves="apart")),
               ("w4a16", S(tile_m=128, unpack="ptx_natural", halves="apart", epilogue="kernel")),
               ("w4a8", S(tile_m=128, unpack="ptx")),
               ("w4a8", S(tile_m=128, unpack="ptx", int_sums="magic"))]
  else:
    # most telling first (the stage's timeout may cut the list): W4A16's decode default
    # since run 9 (the one kernel with warp MMAs and 6 stages, 12.6-12.8 us), it with the
    # offset folded out of the conversion, with the default depth, with wgmmas (run 8's
    # default, 14.1-14.3), W4A8's decode default (the one kernel, 10.8-11.2), then the
    # kernel's default tiles
    one_kernel = dict(pad_tokens=False, wg_split="k", epilogue="kernel", nk_scales="slab")
    configs = [("w4a16", S(unpack="ptx_natural", mma="sync", max_concurrent_steps=6,
                           **one_kernel)),
               # the same with the offset folded out of the conversion (untimed)
               ("w4a16", S(unpack="ptx_natural", mma="sync", max_concurrent_steps=6,
                           offset="folded", **one_kernel)),
               ("w4a16", S(unpack="ptx_natural", mma="sync", **one_kernel)),
               ("w4a16", S(unpack="ptx_natural", **one_kernel)),
               ("w4a8", S(unpack="ptx", int_sums="magic", **one_kernel)),
               ("w4a16", T()),
               ("w4a8", T())]
  return configs


def gated(configs: list, no_hopper: list[str] | None, skip_tiles: list[str]) -> list:
  """``configs`` less those that experiments/bench_gate.py's flags keep out of the GPU run
  (a kernel that hangs would take the rest of the stage with it): see
  :func:`bench_gate.admitted`."""
  from bench_gate import admitted
  return [(kname, tiles) for kname, tiles in configs
          if admitted(kname, tiles, no_hopper, skip_tiles)]


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", default="profile_w4", help="trace folder and summary JSON")
  ap.add_argument("--m", type=int, default=1)
  ap.add_argument("--kn", type=int, default=8192)
  ap.add_argument("--no-hopper", nargs="*", choices=["w8a8", "w4a16", "w4a8"],
                  help="as bench_kernels.py (experiments/bench_gate.py's flags): profile none "
                       "of the kernels named, or nothing with no name")
  ap.add_argument("--skip-tiles", nargs="*", default=[],
                  help="leave out configurations whose tiles' repr contains any of these "
                       "(a+b: both)")
  args = ap.parse_args(argv)

  import jax
  import jax.numpy as jnp
  from lowbit.kernels import _mosaic_gpu

  from lowbit.quant import QuantSpec, quantize
  if not _mosaic_gpu.is_hopper():
    print("profile_w4: needs a Hopper GPU (sm_90); found", jax.devices()[0].device_kind)
    return 2
  k = n = args.kn
  key = jax.random.key(0)
  w = jax.random.normal(key, (k, n), jnp.float32)
  wq = quantize(w, QuantSpec(bits=4, channel_axes=(1,), group_size=128, pack=True,
                             scale_dtype=jnp.bfloat16))
  x = jax.random.normal(jax.random.fold_in(key, 1), (args.m, k), jnp.float32)
  xq = quantize(x, QuantSpec(bits=8, channel_axes=(0,)))
  acts = {"w4a16": x.astype(jnp.bfloat16), "w4a8": xq.qvalue}
  q_nk, s_nk = wq.qvalue.T.copy(), wq.scale.T.copy()  # stored K-major
  configs = gated(profiled_configs(args.m), args.no_hopper, args.skip_tiles)
  out = {}

  def save():  # after every configuration: a run cut short by its timeout keeps the rest
    with open(os.path.join(args.out, "summary.json"), "w") as fh:
      json.dump(dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__,
                     m=args.m, k=k, n=n, configs=out), fh, indent=1)

  for kname, tiles in configs:
    label = f"{kname} {tiles}"
    folder = os.path.join(args.out, f"{kname}-{len(out)}")
    os.makedirs(folder, exist_ok=True)

    # the weight and scales stored K-major ("nk", what a converted model keeps on a GPU):
    # the transposes below cancel those the kernel's operands take, so nothing runs besides it
    def f(a, q_nk, s_nk, tiles=tiles, folder=folder, kname=kname):
      return _mosaic_gpu.w4_matmul(a, q_nk.T, s_nk.T, 128, tiles=tiles, interpret=False,
                                   name=kname, kernel_name=f"lowbit_{kname}_hopper",
                                   weight_layout="nk", profile_dir=folder)
    try:
      fn = jax.jit(f)
      for _ in range(2):  # the second call's trace: compiled, caches warm (each call dumps one)
        fn(acts[kname], q_nk, s_nk).block_until_ready()
      newest = max(glob.glob(os.path.join(folder, "*.json")), key=os.path.getmtime)
      with open(newest) as fh:
        out[label] = summarize(json.load(fh))
      # the profiler's buffer takes shared memory: the plan may have fewer stages than unprofiled
      out[label]["stages"] = _mosaic_gpu.plan_w4(
          kname, args.m, k, n, 128, tiles, act_bytes=acts[kname].dtype.itemsize,
          weight_layout="nk", scale_bytes=s_nk.dtype.itemsize, profiled=True).stages
    except Exception as e:  # noqa: BLE001 - one configuration failing is a result too
      out[label] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
    save()
    s = out[label]
    print(f"\n{label}")
    if "error" in s:
      print("  failed:", s["error"])
      continue
    print(f"  {s['warpgroups']} warpgroup traces, median span {s['median_span_us']:.1f} us, "
          f"{s['stages']} pipeline stages")
    for name, r in s["regions"].items():
      print(f"  {name:8s} x{r['count']:6d}  median {r['median_us'] * 1e3:8.0f} ns  "
            f"share {100 * r['share']:5.1f}%")
  return 0


if __name__ == "__main__":
  sys.exit(main())
