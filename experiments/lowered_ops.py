"""What a Mosaic GPU kernel lowers to, counted on a CPU machine (no GPU needed).

    python experiments/lowered_ops.py w4a16 --tiles 'nibbles="split", tile_n=128, unpack="ptx"'
    python experiments/lowered_ops.py w4a8 --m 256 --tiles 'nibbles="split", tile_m=128'

Mosaic GPU lowers a kernel to LLVM with inline PTX when the jitted call is
lowered for the ``cuda`` platform, which works on CPU. This script lowers one
``w4a16_matmul`` / ``w4a8_matmul`` / ``w8a8_matmul`` call with the given tiles
(weight stored K-major, K = N = 8192 by default, group 128) and prints, for
the kernel module: the inline-PTX blocks by their first instruction, the
``wgmma`` instructions, warp shuffles, shared-memory loads by type, and the
vector arithmetic ops by operand type. The step loop is not unrolled, so
counts inside it are per step (and per thread: the module is one thread's
program). It is how docs/kernels.md counts instructions per step; it says
nothing about time.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys


def count_ops(module_text: str) -> dict[str, collections.Counter]:
  """Op counts of a Mosaic GPU kernel module's text (see the module docstring)."""
  asm = collections.Counter()
  for body in re.findall(r'llvm\.inline_asm[^"]*"(.*?)", "', module_text, flags=re.S):
    lines = [ln.strip() for ln in body.replace("\\0A", "\n").splitlines()]
    lines = [ln for ln in lines if ln and ln not in "{}" and not ln.startswith((".reg", "//"))]
    if any("wgmma.mma_async" in ln for ln in lines):
      key = "wgmma " + re.search(r"wgmma\.mma_async\S*", body).group(0).split(".", 3)[-1]
    else:  # by the first instruction that is not a constant move (ptxas hoists those)
      ops = [ln.split()[0] for ln in lines]
      work = [o for o in ops if o != "mov.b32"] or ops
      key = f"{work[0]} ... ({len(work)} instructions, {len(ops) - len(work)} mov)" if work else "(empty)"
    asm[key] += 1
  arith = collections.Counter(
      f"{op} {ty}" for op, ty in re.findall(r"= arith\.(\w+) [^\n]*?: (vector<[^>]+>)(?:\n| )",
                                            module_text))
  loads = collections.Counter(re.findall(r"llvm\.load [^\n]*-> ([^\n]+)", module_text))
  # jax 0.11 loads 8-bit wgmma operand fragments with ldmatrix (num 32-bit registers each)
  loads.update(f"ldmatrix x{n} {t}" for n, t in re.findall(
      r"nvvm\.ldmatrix [^\n]*?num = (\d+)[^\n]*?element_type = <(\w+)>", module_text))
  other = collections.Counter(
      n for n in re.findall(r"(nvvm\.shfl\.sync|nvvm\.wgmma\.wait\.group\.sync\.aligned|"
                            r"nvvm\.wgmma\.fence\.aligned|nvvm\.mbarrier\.try_wait\.parity|"
                            r"cp\.async\.bulk\.tensor)", module_text))
  return dict(inline_ptx=asm, arith_vector=arith, loads=loads, other=other)


def kernel_call(kernel: str, tiles, m: int, kn: int, group: int | None, *,
                backend: str = "mosaic_gpu", group_scales: str = "float"):
  """``(f, x, w)``: the jitted call of ``kernel`` with ``tiles`` (``HopperW4Tiles`` /
  ``HopperTiles`` keyword arguments as text, or the tiles themselves: a ``BlockSizes``
  with ``backend="gpu"``, the Pallas Triton kernel), weight stored K-major (``[kn, kn]``,
  group ``group``; ``group_scales="int"``: integer group scales under a channel scale),
  and abstract ``x [m, kn]`` and ``w`` to trace it with."""
  import jax
  import jax.numpy as jnp

  from lowbit import kernels as K
  from lowbit.quant import QuantSpec, quantize
  if isinstance(tiles, str):  # a command-line literal
    cls = K.HopperTiles if kernel == "w8a8" else K.HopperW4Tiles
    tiles = eval(f"cls({tiles})", {"cls": cls})  # noqa: S307
  w = jax.ShapeDtypeStruct((kn, kn), jnp.float32)
  # int4: bf16 scales, as the benchmark and the profile time them (f32 until 2026-11-28)
  spec = (QuantSpec(bits=8, channel_axes=(1,)) if kernel == "w8a8" else
          QuantSpec(bits=4, channel_axes=(1,), group_size=group, pack=True,
                    scale_dtype=jnp.bfloat16, group_scales=group_scales))
  wq = jax.eval_shape(lambda a: quantize(a, spec).transpose(), w)
  xf = jax.ShapeDtypeStruct((m, kn), jnp.float32)
  if kernel == "w4a16":
    x, fn = jax.ShapeDtypeStruct((m, kn), jnp.bfloat16), K.w4a16_matmul
  else:
    x = jax.eval_shape(lambda a: quantize(a, QuantSpec(bits=8, channel_axes=(0,))), xf)
    fn = K.w4a8_matmul if kernel == "w4a8" else K.w8a8_matmul
  f = jax.jit(lambda a, b: fn(a, b, backend=backend, block_sizes=tiles, weight_layout="nk"))
  return f, x, wq


def lower_kernel(kernel: str, tiles_src: str, m: int, kn: int, group: int | None):
  """The text of each Mosaic GPU module that lowering the call produces."""
  from jax.experimental.mosaic.gpu import core
  f, x, wq = kernel_call(kernel, tiles_src, m, kn, group)
  captured = []
  original = core._run_serde_pass

  def capture(module, *a, serialize=True, **kw):
    if serialize:
      captured.append(str(module))
    return original(module, *a, serialize=serialize, **kw)

  core._run_serde_pass = capture
  try:
    f.trace(x, wq).lower(lowering_platforms=("cuda",))
  finally:
    core._run_serde_pass = original
  return captured


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("kernel", choices=["w4a16", "w4a8", "w8a8"])
  ap.add_argument("--tiles", default="", help="HopperW4Tiles / HopperTiles keyword arguments")
  ap.add_argument("--m", type=int, default=1)
  ap.add_argument("--kn", type=int, default=8192)
  ap.add_argument("--group", type=int, default=128, help="0: per-channel")
  args = ap.parse_args(argv)
  modules = lower_kernel(args.kernel, args.tiles, args.m, args.kn, args.group or None)
  for text in modules:
    for section, counts in count_ops(text).items():
      print(f"{section}:")
      for key, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        print(f"  {n:5d}  {key}")
  return 0 if modules else 1


if __name__ == "__main__":
  sys.exit(main())
