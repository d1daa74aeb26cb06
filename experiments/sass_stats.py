"""The SASS of a Mosaic GPU kernel's main loop, compiled for an H100 on a CPU machine.

    bash experiments/sass_venv.sh        # once: .venv-sass (jax[cuda12] 0.11.2, ptxas, nvdisasm)
    .venv-sass/bin/python experiments/sass_stats.py w4a16 --tiles 'nibbles="split", unpack="ptx"'
    .venv-sass/bin/python experiments/sass_stats.py w4a16 --sweep      # the benchmark's candidates
    .venv-sass/bin/python experiments/sass_stats.py w4a16 --triton     # the Pallas Triton kernel

``experiments/lowered_ops.py`` counts what Mosaic GPU lowers a kernel to (LLVM with
inline PTX); this goes on to the machine code. XLA compiles for a GPU it does not have
(a deviceless topology from a target description of an H100 SXM, jax's AOT path, with
the CUDA plugin installed and no driver), Mosaic GPU dumps the kernel's PTX, and ptxas
(``-arch=sm_90a``) and nvdisasm from NVIDIA's wheels give its registers, spills and
SASS. For the innermost loop that issues ``HGMMA`` (a compute warpgroup's K-step) it
prints the instruction mix per step and thread and

    codes/thread/step = sum over distinct register A operands of 64 * K_mma / 128
    issue floor [us]  = N K ceil(M / tile_m) / (32 codes/thread/step)
                        * instructions/step / (SMs * 4 schedulers * clock)

the time the SMs' schedulers need just to issue the loop's instructions (one per
scheduler and clock, every warp busy, no stall): a lower bound that the decode kernels'
few warps per scheduler do not reach, and the number an instruction saved moves. At
K = N = 8192, 3x over XLA's bf16 GEMV is 11.3 us on an H200 (docs/kernels.md).
A count, not a timing: ptxas here (the wheel's, CUDA 13) may schedule differently
from the one the GPU machine's jax uses; registers and instruction counts are what
to compare between variants.

``--triton``: the Pallas Triton kernel instead (the default GPU path off Hopper's
Mosaic GPU kernels). jax lowers it to Triton IR (under an abstract H100, as the
lowering tests do) and Triton's own compiler from PyPI turns that into a cubin, in a
subprocess (its MLIR beside jaxlib's): an approximation, since XLA compiles the same
IR with the Triton it bundles, whose version differs. The loop is the one that issues
``HMMA`` (or ``HGMMA``); the codes a thread converts per step come from the tiles
(``bn * bk`` packed rows, two codes a byte, over ``32 num_warps`` threads), and it
counts the plain register moves in the loop (``IMAD.MOV.U32 Rd, RZ, RZ, Rs``).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).parent))  # lowered_ops, bench_kernels

# An H100 SXM as XLA's GPU compiler describes one (xla GpuTargetConfigProto); only the
# compute capability and the SM count matter to what follows.
H100_TARGET = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84929347584
  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
runtime_version { major: 12 minor: 9 patch: 0 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""
SMS, SCHEDULERS, CLOCK_GHZ = 132, 4, 1.98

_INSN = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_GMMA = re.compile(r"[HI]GMMA\.(\d+)x(\d+)x(\d+)\S*\s+\S+,\s*(\S+?),")  # wgmma: bf16 / int8


@dataclasses.dataclass(frozen=True)
class Insn:
  addr: int
  text: str  # predicate, opcode and operands, without the ";"

  @property
  def opcode(self) -> str:
    words = self.text.split()
    return words[1] if words[0].startswith("@") else words[0]

  @property
  def family(self) -> str:
    return self.opcode.split(".")[0]


def parse_sass(text: str) -> tuple[list[Insn], dict[str, int]]:
  """``nvdisasm -c`` text -> its instructions in order and each label's address."""
  insns, labels, pending = [], {}, []
  for line in text.splitlines():
    if m := _LABEL.match(line.strip()):
      pending.append(m.group(1))
    elif m := _INSN.match(line):
      insn = Insn(int(m.group(1), 16), m.group(2))
      for name in pending:
        labels[name] = insn.addr
      pending = []
      insns.append(insn)
  return insns, labels


MMA_FAMILIES = ("HGMMA", "IGMMA", "HMMA", "IMMA")


def hgmma_loop(insns: list[Insn], labels: dict[str, int],
               families: tuple[str, ...] = ("HGMMA", "IGMMA")) -> list[Insn]:
  """The body of the innermost loop (a backward branch's target up to the branch) that
  issues an instruction of ``families`` (wgmma by default): one K-step of a compute
  warpgroup. Of the spans that issue any, the one with the most such instructions, then
  the shortest: a barrier's retry block placed after the kernel's code branches back into
  the middle of the K-step (``HopperW4Tiles(pingpong=True)``'s turn waits), a span
  holding part of the step's MMAs and code that is not in the loop (an ``EXIT``, which
  no loop body holds)."""
  loops = []
  for insn in insns:
    m = re.search(r"BRA\s+`?\(?(\.L_x_\d+)", insn.text)
    if m and labels.get(m.group(1), insn.addr + 1) <= insn.addr:
      body = [i for i in insns if labels[m.group(1)] <= i.addr <= insn.addr]
      mmas = sum(i.family in families for i in body)
      if mmas and not any(i.family == "EXIT" for i in body):
        loops.append((-mmas, len(body), body))
  if not loops:
    raise ValueError(f"no loop issues {' / '.join(families)}: is this a Hopper wgmma kernel?")
  return min(loops, key=lambda t: t[:2])[2]


def codes_per_step(body: list[Insn], m: int) -> tuple[int, int]:
  """``(codes, tile_m)``: weight codes one thread converts per step and the token tile.
  ``wgmma``: distinct register A operands, ``64 K_mma / 128`` codes each, the tile is
  ``HGMMA``'s N. A warp's ``HMMA.16816`` (``HopperW4Tiles(mma="sync")``): 8 codes a
  thread per instruction and 8-token tile, the tile M rounded up to 8 (the kernel's
  default ``tile_m``; register A operands are reused across chunks, so they are not
  counted)."""
  per_a, tile_m, hmma = {}, 0, 0
  for insn in body:
    if m_ := _GMMA.search(insn.text):
      rows, n, k, a = m_.groups()
      tile_m = max(tile_m, int(n))
      if a.startswith("R"):
        per_a[a] = int(rows) * int(k) // 128
    elif insn.opcode.startswith("HMMA.16816"):
      hmma += 1
  if hmma:
    tile_m = min(64, -(-m // 8) * 8)
    return 8 * hmma // (tile_m // 8), tile_m
  return sum(per_a.values()), tile_m


def issue_floor_us(insns_per_step: int, codes: int, m: int, n: int, k: int, tile_m: int) -> float:
  """See the module docstring."""
  warp_steps = n * k * math.ceil(m / tile_m) / (32 * codes)
  return warp_steps * insns_per_step / (SMS * SCHEDULERS * CLOCK_GHZ * 1e3)


def _tool(name: str) -> str:
  """ptxas / nvdisasm: NVIDIA's wheels in this venv (CUDA 13 reads Mosaic GPU's PTX 9.0),
  then PATH."""
  import nvidia  # the wheels' namespace package
  for base in nvidia.__path__:
    for cand in sorted(pathlib.Path(base).glob(f"cu[0-9]*/bin/{name}"), reverse=True):
      return str(cand)
  found = shutil.which(name)
  if not found:
    raise SystemExit(f"{name} not found: run `bash experiments/sass_venv.sh` first")
  return found


@functools.cache
def h100_mesh():
  """A one-device mesh of the deviceless H100 (``H100_TARGET``) the calls compile for."""
  from jax.experimental import topologies
  topo = topologies.get_topology_desc(platform="cuda", target_config=H100_TARGET,
                                      topology="1x1x1")
  return topologies.make_mesh(topo, (1,), ("d",))


def compile_kernel(kernel: str, tiles, m: int, kn: int, group: int | None,
                   out: pathlib.Path, group_scales: str = "float") -> list[pathlib.Path]:
  """Compile the call for an H100 without a GPU; the Mosaic GPU kernels' PTX under ``out``
  (``tiles``, ``group_scales``: as ``lowered_ops.kernel_call`` takes them)."""
  out.mkdir(parents=True, exist_ok=True)
  os.environ.update(MOSAIC_GPU_DUMP_PTX="1", MOSAIC_GPU_DUMP_TO=str(out))
  import jax
  import lowered_ops
  on_gpu = jax.sharding.NamedSharding(h100_mesh(), jax.sharding.PartitionSpec())
  f, x, w = lowered_ops.kernel_call(kernel, tiles, m, kn, group, group_scales=group_scales)
  x, w = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=on_gpu), (x, w))
  f.trace(x, w).lower().compile()
  return sorted(out.glob("*.ptx"))


_TRITON_COMPILE = """
import sys, triton
from triton.backends.compiler import GPUTarget
ttir, warps, stages, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
k = triton.compile(ttir, target=GPUTarget("cuda", 90, 32),
                   options=dict(num_warps=warps, num_stages=stages))
open(out + ".ptx", "w").write(k.asm["ptx"])
open(out + ".cubin", "wb").write(k.asm["cubin"])
"""


def triton_block_sizes(kernel: str, m: int, kn: int, src: str):
  """``BlockSizes(src)``, or what ``w*_matmul`` picks for a K-major weight."""
  from lowbit.kernels import _pallas

  from lowbit import kernels as K
  if src:
    return eval(f"K.BlockSizes({src})", {"K": K})  # noqa: S307 - a command-line literal
  return _pallas.default_block_sizes(kernel, "gpu", m, kn, kn, weight_layout="nk")


def compile_triton(kernel: str, bs, m: int, kn: int, group: int | None,
                   out: pathlib.Path) -> list[pathlib.Path]:
  """Lower the Pallas Triton call (weight stored K-major) for cuda, keep its Triton IR,
  and compile that with PyPI's Triton for sm_90a; the cubins under ``out``."""
  import jax
  import lowered_ops
  from jax._src.pallas.triton import pallas_call_registration as registration
  out.mkdir(parents=True, exist_ok=True)
  modules = []
  original = registration.lowering.lower_jaxpr_to_triton_module

  def capture(*a, **kw):
    result = original(*a, **kw)
    modules.append(str(result.module))
    return result

  f, x, w = lowered_ops.kernel_call(kernel, bs, m, kn, group, backend="gpu")
  registration.lowering.lower_jaxpr_to_triton_module = capture
  try:  # Pallas' Triton lowering asks the (abstract) device for its compute capability
    with jax.sharding.use_abstract_mesh(h100_mesh().abstract_mesh):
      f.trace(x, w).lower(lowering_platforms=("cuda",))
  finally:
    registration.lowering.lower_jaxpr_to_triton_module = original
  cubins = []
  for i, text in enumerate(modules):
    ttir = out / f"triton_{i}.ttir"
    ttir.write_text(text)
    subprocess.run([sys.executable, "-c", _TRITON_COMPILE, str(ttir), str(bs.num_warps),
                    str(bs.num_stages), str(out / f"triton_{i}")], check=True,
                   capture_output=True, text=True)
    cubins.append(out / f"triton_{i}.cubin")
  return cubins


def triton_summary(sass: str, bs, kernel: str, m: int, kn: int) -> dict:
  """The MMA loop of a Triton kernel's SASS: instructions, register moves, the mix, and
  the issue floor with the codes the tiles give a thread per step. Where Triton unrolled
  the K-loop, the whole kernel's counts over its K-steps (prologue and epilogue in)."""
  insns, labels = parse_sass(sass)
  per_byte = 1 if kernel == "w8a8" else 2
  codes = bs.bn * bs.bk * per_byte // (32 * bs.num_warps)
  try:
    body, steps = hgmma_loop(insns, labels, MMA_FAMILIES), 1
  except ValueError:  # a short K-loop Triton unrolled: the whole kernel, per step
    steps = kn // per_byte // max(1, bs.split_k) // bs.bk
    if not any(i.family in MMA_FAMILIES for i in insns) or steps < 1:
      raise
    body = insns
  moves = sum(bool(re.fullmatch(r"(IMAD\.MOV\.U32 R\d+, RZ, RZ|MOV R\d+), R\d+", i.text))
              for i in body)
  tile_m = bs.bm  # token rows per program (orient "wx" too: they are its N)
  per_step = len(body) / steps
  return dict(loop_insns=round(per_step), unrolled_steps=steps if steps > 1 else None,
              register_moves=round(moves / steps), codes_per_step=codes,
              insns_per_8_codes=8 * per_step / codes,
              issue_floor_us=issue_floor_us(per_step, codes, m, kn, kn, tile_m),
              mix={k: round(v / steps) for k, v in
                   collections.Counter(i.family for i in body).most_common() if v >= steps})


def disasm(cubin: pathlib.Path) -> str:
  """``nvdisasm -c`` of a cubin."""
  return subprocess.run([_tool("nvdisasm"), "-c", str(cubin)], capture_output=True, text=True,
                        check=True).stdout


def sass_of(ptx: pathlib.Path) -> tuple[str, str]:
  """``(ptxas -v report, nvdisasm text)`` of one PTX file."""
  cubin = ptx.with_suffix(".cubin")
  report = subprocess.run([_tool("ptxas"), "-arch=sm_90a", "-v", str(ptx), "-o", str(cubin)],
                          capture_output=True, text=True, check=True).stderr
  return report, disasm(cubin)


def summarize(report: str, sass: str, m: int, kn: int) -> dict:
  """Registers, spills and the MMA loop's numbers (see the module docstring)."""
  regs = re.search(r"Used (\d+) registers", report)
  spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
  insns, labels = parse_sass(sass)
  body = hgmma_loop(insns, labels, MMA_FAMILIES)
  codes, tile_m = codes_per_step(body, m)
  mix = collections.Counter(i.family for i in body)
  # ptxas C7511 ("wgmma.mma_async instructions are serialized due to ..."): each wgmma
  # waits for the one before it (a WARPGROUP.DEPBAR after every HGMMA in the loop)
  serialized = re.search(r"wgmma\.mma_async instructions are serialized due to ([^\n]*?) in the",
                         report)
  return dict(registers=int(regs.group(1)) if regs else None,
              wgmma_serialized=serialized.group(1) if serialized else None,
              spill_bytes=sum(map(int, spills.groups())) if spills else None,
              loop_insns=len(body), codes_per_step=codes, tile_m=tile_m,
              insns_per_8_codes=8 * len(body) / codes if codes else None,
              issue_floor_us=issue_floor_us(len(body), codes, m, kn, kn, tile_m) if codes else None,
              mix=dict(mix.most_common()))


def _line(s: dict) -> str:
  serial = f"WGMMA SERIALIZED ({s['wgmma_serialized']}); " if s["wgmma_serialized"] else ""
  head = (f"{serial}{s['registers']} registers, {s['spill_bytes']} bytes spilled; MMA loop: "
          f"{s['loop_insns']} instructions per step and thread")
  if not s["codes_per_step"]:  # both wgmma operands in shared memory (W8A8): no codes
    return head
  return (f"{head}, {s['codes_per_step']} codes ({s['insns_per_8_codes']:.1f} per 8), token "
          f"tile {s['tile_m']}; issue floor {s['issue_floor_us']:.2f} us")


def triton_main(args) -> int:
  """``--triton``: one Pallas Triton kernel's MMA loop."""
  bs = triton_block_sizes(args.kernel, args.m, args.kn, args.block_sizes)
  root = args.keep or pathlib.Path(tempfile.mkdtemp(prefix="sass_"))
  print(f"M = {args.m}, K = N = {args.kn}, group {args.group or 'none'}, weight stored K-major; "
        f"Triton IR compiled by PyPI's Triton for sm_90a")
  for cubin in compile_triton(args.kernel, bs, args.m, args.kn, args.group or None, root):
    sass = disasm(cubin)
    cubin.with_suffix(".sass").write_text(sass)
    s = triton_summary(sass, bs, args.kernel, args.m, args.kn)
    where = (f"no loop (Triton unrolled its {s['unrolled_steps']} K-steps): the whole kernel "
             f"over them" if s["unrolled_steps"] else "MMA loop")
    print(f"{bs}: {where}: {s['loop_insns']} instructions per step and thread "
          f"({s['register_moves']} register moves), {s['codes_per_step']} codes "
          f"({s['insns_per_8_codes']:.1f} per 8); issue floor {s['issue_floor_us']:.2f} us")
    print("  " + ", ".join(f"{k} {v}" for k, v in s["mix"].items()))
  if not args.keep:
    shutil.rmtree(root)
  return 0


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("kernel", choices=["w4a16", "w4a8", "w8a8"])
  ap.add_argument("--tiles", default="", help="HopperW4Tiles / HopperTiles keyword arguments")
  ap.add_argument("--sweep", action="store_true",
                  help="every Mosaic GPU candidate experiments/bench_kernels.py --sweep times "
                       "at this M, a line each")
  ap.add_argument("--m", type=int, default=1)
  ap.add_argument("--kn", type=int, default=8192)
  ap.add_argument("--group", type=int, default=128, help="0: per-channel")
  ap.add_argument("--int-scales", action="store_true",
                  help="W4A8: integer group scales under a channel scale "
                       "(QuantSpec(group_scales='int'))")
  ap.add_argument("--triton", action="store_true", help="the Pallas Triton kernel (see above)")
  ap.add_argument("--block-sizes", default="",
                  help="--triton: BlockSizes keyword arguments (default: the dispatch's tiles)")
  ap.add_argument("--keep", type=pathlib.Path, help="keep the PTX, cubin and SASS here")
  ap.add_argument("--show-loop", action="store_true", help="print the loop's SASS")
  args = ap.parse_args(argv)
  # the CUDA plugin's version check needs a driver; compiling for a deviceless GPU does not
  os.environ["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] = "1"
  if args.triton:
    return triton_main(args)
  if args.sweep:
    import bench_kernels
    candidates = (bench_kernels.hopper_candidates(args.m) if args.kernel == "w8a8" else
                  bench_kernels.hopper_w4_candidates(args.m, args.kernel))
  else:
    candidates = [args.tiles]
  root = args.keep or pathlib.Path(tempfile.mkdtemp(prefix="sass_"))
  print(f"M = {args.m}, K = N = {args.kn}, group {args.group or 'none'}"
        f"{' (integer group scales)' if args.int_scales else ''}; an H100 (sm_90a, "
        f"{SMS} SMs, {CLOCK_GHZ} GHz); ptxas {_tool('ptxas')}")
  for i, tiles in enumerate(candidates):
    try:
      ptxs = compile_kernel(args.kernel, tiles, args.m, args.kn, args.group or None,
                            root / f"{i:02d}", "int" if args.int_scales else "float")
      if not ptxs:
        raise ValueError("no Mosaic GPU kernel was compiled")
      for ptx in ptxs:
        report, sass = sass_of(ptx)
        ptx.with_suffix(".sass").write_text(sass)
        s = summarize(report, sass, args.m, args.kn)
        print(f"{tiles if args.sweep else ptx.stem}: {_line(s)}")
        print("  " + ", ".join(f"{k} {v}" for k, v in s["mix"].items()))
        if args.show_loop:
          insns, labels = parse_sass(sass)
          for insn in hgmma_loop(insns, labels, MMA_FAMILIES):
            print(f"    {insn.addr:05x}  {insn.text}")
    except Exception as e:  # noqa: BLE001 - a sweep reports each candidate
      if not args.sweep:
        raise
      print(f"{tiles}: {type(e).__name__}: {str(e)[:200]}")
    sys.stdout.flush()
  if not args.keep:
    shutil.rmtree(root)
  return 0


if __name__ == "__main__":
  sys.exit(main())
