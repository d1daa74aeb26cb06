"""Backend plumbing shared by lowbit's Pallas matmul kernels.

One kernel body (:func:`matmul_body`) serves the three kernels and both
accelerator backends: a ``(M/bm, N/bn, split_k)`` grid of programs, each
looping over its share of K inside the kernel (the Triton style; on TPU the
same body runs under Mosaic with full-K blocks in VMEM). Per-kernel files build
it with their dtypes and scales and hold the public wrapper and ``reference``.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

Backend = Literal["gpu", "tpu", "interpret"]


Orient = Literal["xw", "wx"]


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes and tile orientation of a matmul kernel.

  Attributes:
    bm: rows of x per program (the last block of M is masked on GPU and in
      interpret mode, padded on TPU).
    bn: columns of the output per program (must divide N).
    bk: K-step inside the program, counted in rows of the weight array as
      stored (packed int4: one row holds two K positions, K/2 rows in all).
      Grouped scales need ``bk`` to divide the group size (lowbit lowers it to
      the group size when larger).
    split_k: programs that share one output tile, each summing a slice of K;
      their f32 partial sums are added after the kernel (for small M, where
      ``M/bm * N/bn`` programs cannot fill the GPU).
    num_warps, num_stages: Triton compiler parameters (GPU only).
    orient: how a program's tile is computed.
      ``"xw"``: ``x_tile [bm, bk] @ w_tile [bk, bn]`` (tokens are the MMA's rows);
      ``"wx"``: ``w_tile^T [bn, bk] @ x_tile^T [bk, bm]``, transposed once at the
      end (the weight is the MMA's A operand, straight from registers after the
      int4 unpack; the tokens are its N). On an H200 "wx" wins for int4 weights
      at M >= 64, "xw" at decode and for int8 weights (docs/kernels.md). A
      vector-unit GEMV (no MMA, one token per program) was measured too and ran
      2-3x slower than a 16-row MMA tile at M = 1, so it is not offered.
    k_major: transpose the weight to ``[N, K]`` (K contiguous) before the kernel,
      one XLA pass over the weight per call, so both MMA operands are K-major
      (what Hopper's 8-bit tensor-core instructions read). Pays only when M is
      large enough to amortize the pass.
    fast_unpack: unpack packed int4 with bit tricks (:func:`unpack_tile_fast`:
      PTX over 4 bytes at a time on GPU) instead of int32 shifts and an
      int->float conversion per value. Same numbers either way; the TPU
      kernel always shifts in int32.
  """

  bm: int = 64
  bn: int = 128
  bk: int = 64
  split_k: int = 1
  num_warps: int = 4
  num_stages: int = 3
  orient: Orient = "xw"
  k_major: bool = False
  fast_unpack: bool = True

  def __post_init__(self):
    for f in ("bm", "bn", "bk", "split_k", "num_warps", "num_stages"):
      v = getattr(self, f)
      if not isinstance(v, int) or v < 1:
        raise ValueError(f"BlockSizes.{f}={v!r} must be a positive integer.")
    for f in ("bm", "bn", "bk"):
      v = getattr(self, f)
      if v & (v - 1):
        raise ValueError(f"BlockSizes.{f}={v} must be a power of two (Triton tiles are).")
    if self.orient not in ("xw", "wx"):
      raise ValueError(f"BlockSizes.orient={self.orient!r}: use 'xw' or 'wx'.")


def default_block_sizes(kernel: str, backend: Backend, m: int, k: int, n: int,
                        weight_layout: str = "kn") -> BlockSizes:
  """Tuned defaults per backend (GPU numbers from ``experiments/bench_kernels.py``).

  ``kernel`` is ``"w8a8"``, ``"w4a16"`` or ``"w4a8"``; ``k`` the logical K;
  ``weight_layout`` how the weight is stored (``"nk"``: K-major tiles off TPU).
  The tuned tile is halved (down to 16) until it divides N and the stored K rows.
  """
  bs = _tuned_block_sizes(kernel, backend, m, weight_layout == "nk" and backend != "tpu")
  rows = k // 2 if kernel != "w8a8" else k
  floor = 128 if backend == "tpu" else 16
  bn, bk = bs.bn, bs.bk
  while n % bn and bn > floor:
    bn //= 2
  while rows % bk and bk > floor:
    bk //= 2
  return dataclasses.replace(bs, bn=bn, bk=bk)


def _tuned_block_sizes(kernel: str, backend: Backend, m: int, k_major: bool) -> BlockSizes:
  if backend == "tpu":
    return BlockSizes(bm=128 if m > 64 else max(8, _pow2_at_least(m)), bn=256, bk=256)
  if k_major and m <= 16 and kernel != "w8a8":
    # int4 stored K-major, decode: K-major group scales are read a column per K-step, so
    # one step per group of 128 (run 7: W4A16 21.8 us vs 24.0 with bk = 64; W4A8 16.2 vs 22.1)
    return BlockSizes(bm=16, bn=128, bk=128, split_k=8, num_warps=4, num_stages=3, k_major=True)
  # GPU: the best correct candidate of `experiments/bench_kernels.py --sweep` on
  # an H200, jax 0.11.2, 2026-11-27 (docs/device_runs/2026-11-27-h200-run4.json;
  # device time from CUPTI, K = N = 8192).
  if m <= 16:  # decode: memory-bound on the weight; spread K over programs
    if kernel == "w8a8":
      return BlockSizes(bm=16, bn=128, bk=128, split_k=4, num_warps=4, num_stages=4)
    return BlockSizes(bm=16, bn=128, bk=64, split_k=8, num_warps=4, num_stages=4)
  if m <= 64:
    if kernel == "w8a8":
      return BlockSizes(bm=64, bn=64, bk=128, split_k=4, num_warps=4, num_stages=3, orient="wx")
    return BlockSizes(bm=64, bn=64, bk=128, split_k=2, num_warps=4, num_stages=3, orient="wx")
  if kernel == "w8a8":  # int8 tensor cores read K-major operands: transpose the weight once
    bk = 256 if m <= 256 else 128
    return BlockSizes(bm=128, bn=128, bk=bk, num_warps=8, num_stages=3, k_major=True)
  # int4: the unpacked weight is the MMA's A operand, straight from registers
  if m <= 256 and kernel == "w4a8":
    return BlockSizes(bm=128, bn=64, bk=128, split_k=2, num_warps=4, num_stages=3, orient="wx")
  return BlockSizes(bm=128, bn=128, bk=128, num_warps=8, num_stages=3, orient="wx")


def _pow2_at_least(v: int) -> int:
  p = 1
  while p < v:
    p *= 2
  return p


def triton() -> types.ModuleType:
  """jax's Pallas Triton module (``jax.experimental.pallas.triton``), imported on first use.

  The Triton kernels (GPU, and their interpreted runs) need it; jax 0.12 deprecates the
  backend, so lowbit imports it only when one runs, and ``import lowbit`` works on a jax
  without it. Raises an ``ImportError`` that names the paths still open.
  """
  try:
    from jax.experimental.pallas import triton as pltriton
  except ImportError as e:
    raise ImportError(
        f"lowbit's Triton kernels need jax.experimental.pallas.triton, which jax "
        f"{jax.__version__} does not have (jax 0.12 deprecated Pallas' Triton backend). Use "
        "implementation='xla' (the kernels' numbers) or 'dequant', or on a Hopper GPU the "
        "Mosaic GPU kernels (block_sizes=HopperTiles / HopperW4Tiles).") from e
  return pltriton


def has_triton() -> bool:
  """Whether this jax has Pallas' Triton backend (:func:`triton` imports)."""
  try:
    triton()
  except ImportError:
    return False
  return True


def platform() -> str:
  """The default JAX backend's platform: ``"cpu"``, ``"gpu"`` or ``"tpu"``."""
  return jax.default_backend()


def widen_single_row(xq: jax.Array) -> jax.Array:
  """``xq [M, K]`` int8 tokens, with a zero row appended on CPU when ``M == 1``.

  XLA:CPU runs a one-row integer dot on a slow path: int8 ``[1, 4096] x [4096, 4096]``
  took 30 ms against 6 ms for two rows (2 cores, jax 0.10.2). The caller slices its
  result back to ``M`` rows: the same integer sums, a decode step 5x faster.
  """
  if xq.shape[0] == 1 and platform() == "cpu":
    return jnp.pad(xq, ((0, 1), (0, 0)))
  return xq


def float_dot_dtype(dtype) -> jnp.dtype:
  """dtype for a float dot on the XLA path: XLA:CPU has no bf16 x bf16 -> f32 dot, so f32 there."""
  dtype = jnp.dtype(dtype)
  if platform() == "cpu" and dtype in (jnp.bfloat16, jnp.float16):
    return jnp.dtype(jnp.float32)
  return dtype


def compiler_params(backend: Backend, bs: BlockSizes, n_grid: int):
  if backend == "gpu":
    return triton().CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages)
  if backend == "tpu":
    from jax.experimental.pallas import tpu as pltpu
    return pltpu.CompilerParams(dimension_semantics=("parallel",) * n_grid)
  return None


def unpack_tile(p: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Signed nibbles of a packed uint8 tile, as int32: ``(p<<28)>>28``, ``(p<<24)>>28``."""
  w = p.astype(jnp.int32)
  return (lax.shift_right_arithmetic(lax.shift_left(w, 28), 28),
          lax.shift_right_arithmetic(lax.shift_left(w, 24), 28))


# Packed int4 -> bf16 with no int->float conversion (those run at a quarter of
# the ALU rate on Hopper), 4 bytes per instance: move bytes (0, 1) and (2, 3) into
# the two halves of a word, then one lop3 per word computes (w & 0x000F000F) ^
# 0x43084308, which flips the nibble s to offset binary (u = s + 8) and places it in
# the mantissa of the bf16 128.0 (0x4300 | u == 128 + u, exact), and one bf16x2 FMA
# subtracts 136; the high nibbles the same after a 4-bit shift.
def _bf16_tail(a: str, b: str, out0: str, out1: str, fma: bool = True) -> str:
  """The lop3 + FMA of that conversion for the words ``a``, ``b`` (nibbles in bits 0-3 and
  16-19) into the bf16 pairs ``out0``, ``out1``; lop3 0x6A is ``(a & b) ^ c``. Without
  ``fma`` the lop3s alone: the pairs hold ``136 + s`` (:data:`FOLDED_OFFSET`)."""
  code = (f"lop3.b32 {out0}, {a}, 0x000F000F, 0x43084308, 0x6A;\n"
          f"lop3.b32 {out1}, {b}, 0x000F000F, 0x43084308, 0x6A;\n")
  if fma:
    code += (f"fma.rn.bf16x2 {out0}, {out0}, lbone, lboff;\n"
             f"fma.rn.bf16x2 {out1}, {out1}, lbone, lboff;\n")
  return code


_BF16_CONSTANTS = "mov.b32 lbone, 0x3F803F80;\nmov.b32 lboff, 0xC308C308;\n"


def i4_to_bf16_asm(halves: Literal["lo", "hi", "both"]) -> str:
  """The PTX of that conversion for ``halves`` ``"lo"``, ``"hi"`` (one instance per half:
  Pallas' Triton inline assembly has a single result; ``$0, $1`` the four values,
  ``$2`` the four bytes) or ``"both"`` (the Mosaic GPU kernel: ``$0, $1`` the low
  nibbles of bytes (0, 1), (2, 3), ``$2, $3`` the high ones, ``$4`` the bytes; the
  ``prmt``s shared, 12 instructions besides the constant moves: 2 ``prmt``, 2 ``shr``,
  4 ``lop3``, 4 ``fma``). "lo" is 6 instructions, "hi" 8."""
  if halves not in ("lo", "hi", "both"):
    raise ValueError(f"i4_to_bf16_asm: halves={halves!r}; use 'lo', 'hi' or 'both'.")
  src = "$4" if halves == "both" else "$2"
  # The input is read only by the prmts, before any output is written: "=r" outputs may
  # share the input's register.
  code = ("{\n.reg .b32 lba, lbb, lbha, lbhb, lbz, lbone, lboff;\n"
          "mov.b32 lbz, 0;\n" + _BF16_CONSTANTS +
          f"prmt.b32 lba, {src}, lbz, 0x4140;\nprmt.b32 lbb, {src}, lbz, 0x4342;\n")
  if halves != "lo":
    code += "shr.b32 lbha, lba, 4;\nshr.b32 lbhb, lbb, 4;\n"
  if halves == "lo":
    code += _bf16_tail("lba", "lbb", "$0", "$1")
  elif halves == "hi":
    code += _bf16_tail("lbha", "lbhb", "$0", "$1")
  else:
    code += _bf16_tail("lba", "lbb", "$0", "$1") + _bf16_tail("lbha", "lbhb", "$2", "$3")
  return code + "}"


#: What :func:`i4_pair_to_bf16_asm` with ``folded=True`` adds to each code: the bf16 it
#: gives is ``FOLDED_OFFSET + s`` (``128 + (s + 8)``, exact in bf16), the offset left for
#: the caller to take off a sum (``HopperW4Tiles(offset="folded")``).
FOLDED_OFFSET = 136


def i4_pair_to_bf16_asm(folded: bool = False) -> str:
  """The same conversion for two bytes in the low half of ``$2`` (a 32-bit register: a
  16-bit shared-memory load; its high half is not read): one ``prmt`` spreads them into
  the halves of a word (the first ``prmt`` of ``"both"``), then ``$0`` the low nibbles
  of (byte 0, byte 1), ``$1`` the high ones, as bf16 pairs; 6 instructions besides the
  constant moves (the Mosaic GPU kernel's ``unpack="ptx_natural"``). The two bytes given
  as one register, not as two zero-extended ones, save the kernel two ``PRMT``s per
  load in the SASS (experiments/sass_stats.py): ptxas does not merge the byte
  extractions and the ``mov.b32`` pack that two 16-bit operands need.

  ``folded``: without the two ``fma``s, 4 instructions: each value is
  ``FOLDED_OFFSET + s`` (``0x4300 | (n ^ 8)`` is the bf16 ``128 + s + 8``); a dot with
  them is the dot with the codes plus ``FOLDED_OFFSET`` times the sum of the other
  operand, for the caller to subtract."""
  regs, constants = ("", "") if folded else (", lbone, lboff", _BF16_CONSTANTS)
  return (f"{{\n.reg .b32 lba, lbh, lbz{regs};\nmov.b32 lbz, 0;\n" + constants +
          "prmt.b32 lba, $2, lbz, 0x4140;\nshr.b32 lbh, lba, 4;\n"
          + _bf16_tail("lba", "lbh", "$0", "$1", fma=not folded) + "}")


_ASM_I4_TO_BF16_LO = i4_to_bf16_asm("lo")
_ASM_I4_TO_BF16_HI = i4_to_bf16_asm("hi")

# Packed int4 -> int8 * 16 in 1 or 2 instructions per 4 values: the low nibble
# shifted into the high half of its byte, the high nibble masked in place; each
# byte is then the signed nibble times 16 (its sign bit is the byte's).
_ASM_I4_TO_I8X16_LO = "{\nshl.b32 $0, $1, 4;\nand.b32 $0, $0, 0xF0F0F0F0;\n}"
_ASM_I4_TO_I8X16_HI = "{\nand.b32 $0, $1, 0xF0F0F0F0;\n}"

#: The factor by which :func:`unpack_tile_fast`'s int8 values exceed the codes.
I8_UNPACK_SCALE = 16

#: Packed int4 -> int8 times integer group scales (``QuantSpec(group_scales="int")``), 7
#: instructions per 8 codes: ``$0`` the low nibbles ``q`` of ``$2``'s 4 bytes times ``$3``,
#: ``$1`` the high ones times ``$5``, each an int8 ``q * s`` (``s`` in ``[1, 16]``); ``$4``
#: and ``$6`` are :func:`int_scale_bias` of ``$3`` and ``$5``. Per byte, ``u = q + 8`` in
#: ``[0, 15]``, then one 32-bit ``mad`` ``u * s + (128 - 8 s)`` gives ``q * s + 128`` in
#: ``[0, 240]`` in every byte at once (no byte carries into the next), and flipping each
#: byte's top bit gives the two's complement ``q * s``.
ASM_I4_TO_I8_SCALED = """{
.reg .b32 isl, ish;
and.b32 isl, $2, 0x0F0F0F0F;
xor.b32 isl, isl, 0x08080808;
mad.lo.u32 isl, isl, $3, $4;
xor.b32 $0, isl, 0x80808080;
shr.b32 ish, $2, 4;
and.b32 ish, ish, 0x0F0F0F0F;
xor.b32 ish, ish, 0x08080808;
mad.lo.u32 ish, ish, $5, $6;
xor.b32 $1, ish, 0x80808080;
}"""


def int_scale_bias(s: int) -> int:
  """The bias word of :data:`ASM_I4_TO_I8_SCALED` for scale ``s``: ``128 - 8 s`` in every
  byte, ``0x80808080 - s * 0x08080808`` (no byte borrows for ``s <= 16``)."""
  return (0x80808080 - s * 0x08080808) & 0xFFFFFFFF


def unpack_tile_fast(p: jax.Array, dtype: jnp.dtype, backend: Backend) -> tuple[jax.Array, jax.Array]:
  """Both halves of a packed uint8 tile, ready for the dot, in few instructions.

  ``dtype`` int8: returns ``(16 * lo, 16 * hi)`` as int8 (``lo = (p << 4) &
  0xF0``, ``hi = p & 0xF0`` read as signed bytes): the caller divides the
  int32 product by :data:`I8_UNPACK_SCALE`, exactly. A float ``dtype``: the
  codes themselves (bf16 bit tricks on GPU, then cast to ``dtype``). On GPU
  both are PTX inline assembly over 4 bytes at a time; interpreted, the same
  values from jnp.
  """
  def asm(code, constraints, out_dtype):
    [y] = triton().elementwise_inline_asm(
        code, args=[p], constraints=constraints, pack=4,
        result_shape_dtypes=[jax.ShapeDtypeStruct(p.shape, out_dtype)])
    return y

  if jnp.dtype(dtype) == jnp.int8:
    if backend == "gpu":
      return (asm(_ASM_I4_TO_I8X16_LO, "=r,r", jnp.int8),
              asm(_ASM_I4_TO_I8X16_HI, "=r,r", jnp.int8))
    return (lax.bitcast_convert_type(lax.shift_left(p, jnp.uint8(4)), jnp.int8),
            lax.bitcast_convert_type(p & jnp.uint8(0xF0), jnp.int8))
  if backend == "gpu":
    lo = asm(_ASM_I4_TO_BF16_LO, "=r,=r,r", jnp.bfloat16)
    hi = asm(_ASM_I4_TO_BF16_HI, "=r,=r,r", jnp.bfloat16)
  else:
    lo, hi = (v.astype(jnp.bfloat16) for v in unpack_tile(p))
  return lo.astype(dtype), hi.astype(dtype)


def matmul_body(x_ref, xs_ref, w_ref, ws_ref, o_ref, *, m: int, k: int, bk: int, steps: int,
                packed: bool, group: int | None, int_dot: bool, split: bool, orient: Orient,
                k_major: bool, masked: bool, fast_unpack: bool, backend: Backend, precision):
  """One program's tile of ``out = (x * xs) @ dequant(w)``.

  Refs: ``x_ref [bm, K]`` (float or int8), ``xs_ref [bm, 1]`` f32 per-token
  scale or ``None``, ``w_ref [K or K/2, bn]`` int8 or packed uint8 (``[bn, K or
  K/2]`` when ``k_major``), ``ws_ref [K/group or 1, bn]`` weight scale (grouped
  and ``k_major``: ``[bn, K/group]``),
  ``o_ref [bm, bn]`` (or ``[1, bm, bn]`` with split-K, holding f32 partial sums).

  For each K-step the packed tile gives ``lo`` (rows ``k0:k0+bk``) and ``hi``
  (rows ``K/2+k0 : K/2+k0+bk``) of the weight; each is multiplied with its
  slice of x, accumulating in int32 (int8 x) or f32. Grouped scales multiply
  each partial sum in f32 before it is added (``bk`` divides the group, so a
  tile lies in one group); per-channel scales multiply the total once at the
  end. ``orient`` (see :class:`BlockSizes`) picks ``x @ w`` or ``(w^T x^T)^T``;
  ``masked`` guards the rows of the last M block.
  """
  half = k // 2
  s = pl.program_id(2) if split else 0
  bm, bn = (o_ref.shape[-2], o_ref.shape[-1])
  fold = orient == "wx"  # the accumulator is [bn, bm]: the tile transposed
  acc_dtype = jnp.int32 if (int_dot and group is None) else jnp.float32
  dot_dtype = jnp.int8 if int_dot else x_ref.dtype
  part_dtype = jnp.int32 if int_dot else jnp.float32
  if masked:
    row_ok = (pl.program_id(0) * bm + jnp.arange(bm, dtype=jnp.int32))[:, None] < m

  def load_x(x0):
    if not masked:
      return x_ref[:, pl.ds(x0, bk)]
    return triton().load(x_ref.at[:, pl.ds(x0, bk)], mask=jnp.broadcast_to(row_ok, (bm, bk)),
                         other=0)

  def load_w(r0):
    return w_ref[:, pl.ds(r0, bk)] if k_major else w_ref[pl.ds(r0, bk), :]

  def product(xt, wt):
    """``xt [bm, bk]`` times the weight tile, in the accumulator's orientation."""
    wt = wt.astype(dot_dtype)
    wk = 1 if k_major else 0  # the weight tile's K axis
    if fold:
      dims = (((wk,), (1,)), ((), ()))
      return lax.dot_general(wt, xt, dims, precision=precision, preferred_element_type=part_dtype)
    dims = (((1,), (wk,)), ((), ()))
    return lax.dot_general(xt, wt, dims, precision=precision, preferred_element_type=part_dtype)

  def group_scale(x0):
    if k_major:  # the scales K-major too, [bn, groups]: read a column
      sc = ws_ref[:, pl.ds(x0 // group, 1)].astype(jnp.float32)  # [bn, 1]
      return sc if fold else jnp.transpose(sc)
    sc = ws_ref[pl.ds(x0 // group, 1), :].astype(jnp.float32)  # [1, bn]
    return jnp.transpose(sc) if fold else sc

  def body(t, acc):
    r0 = (s * steps + t) * bk
    if packed:
      p = load_w(r0)
      lo, hi = unpack_tile_fast(p, dot_dtype, backend) if fast_unpack else unpack_tile(p)
      parts = ((r0, lo), (half + r0, hi))
    else:
      parts = ((r0, load_w(r0)),)
    for x0, wt in parts:
      d = product(load_x(x0), wt)
      if group is not None:
        acc = acc + d.astype(jnp.float32) * group_scale(x0)
      else:
        acc = acc + d
    return acc

  acc_shape = (bn, bm) if fold else (bm, bn)
  acc = lax.fori_loop(0, steps, body, jnp.zeros(acc_shape, acc_dtype))
  out = acc.astype(jnp.float32)
  if packed and fast_unpack and int_dot:
    out = out * (1.0 / I8_UNPACK_SCALE)  # exact: a power of two
  if fold:
    out = jnp.transpose(out)
  if group is None:
    out = out * ws_ref[...].astype(jnp.float32)
  if xs_ref is not None:
    out = out * xs_ref[...].astype(jnp.float32)
  out = out.astype(o_ref.dtype)
  if masked:
    mask = jnp.broadcast_to(row_ok, (bm, bn))
    if split:
      out, mask = out[None], mask[None]
    triton().store(o_ref, out, mask=mask)
  elif split:
    o_ref[0] = out
  else:
    o_ref[...] = out


def run_matmul(x, xs, w, ws, *, k: int, n: int, packed: bool, group: int | None,
               int_dot: bool, out_dtype, bs: BlockSizes, backend: Backend, name: str):
  """Build the grid and BlockSpecs, call :func:`matmul_body`; returns ``[M, N]``.

  Shapes: ``x [M, K]``, ``xs [M, 1] | None``, ``w [K or K/2, N]``,
  ``ws [groups, N]``. With ``bs.k_major`` the weight is transposed here (an
  XLA pass) and the kernel reads ``[N, K or K/2]``, and grouped scales
  ``[N, groups]``: for a weight stored ``"nk"`` both transposes fold into the
  stored arrays (no per-call pass over the codes or the scales). The last M block is masked
  inside the kernel on GPU and interpreted (no padding op), padded on TPU.
  Assumes the caller validated divisibility (:func:`check_block_fit`).
  """
  m = x.shape[0]
  bm, bn, bk = bs.bm, bs.bn, bs.bk
  if group is not None and bk > group:
    bk = group
  w_rows = k // 2 if packed else k
  masked = backend != "tpu" and m % bm != 0
  m_grid = -(-m // bm)
  if backend == "tpu" and m % bm:
    m_pad = m_grid * bm
    x = jnp.pad(x, ((0, m_pad - m), (0, 0)))
    if xs is not None:
      xs = jnp.pad(xs, ((0, m_pad - m), (0, 0)), constant_values=1.0)
  m_out = x.shape[0]
  if bs.k_major:
    w = w.T
    if group is not None:
      ws = ws.T
  split_k = bs.split_k
  while split_k > 1 and (w_rows // bk) % split_k:
    split_k //= 2
  steps = w_rows // bk // split_k
  split = split_k > 1
  grid = (m_grid, n // bn) + ((split_k,) if split else ())
  nd = len(grid)

  def im(f):
    return (lambda i, j, s: f(i, j)) if split else f

  in_specs = [pl.BlockSpec((bm, k), im(lambda i, j: (i, 0)))]
  args = [x]
  if xs is not None:
    in_specs.append(pl.BlockSpec((bm, 1), im(lambda i, j: (i, 0))))
    args.append(xs)
  if bs.k_major:
    in_specs.append(pl.BlockSpec((bn, w_rows), im(lambda i, j: (j, 0))))
  else:
    in_specs.append(pl.BlockSpec((w_rows, bn), im(lambda i, j: (0, j))))
  if bs.k_major and group is not None:
    in_specs.append(pl.BlockSpec((bn, ws.shape[1]), im(lambda i, j: (j, 0))))
  else:
    in_specs.append(pl.BlockSpec((ws.shape[0], bn), im(lambda i, j: (0, j))))
  args += [w, ws]
  if split:
    out_shape = jax.ShapeDtypeStruct((split_k, m_out, n), jnp.float32)
    out_spec = pl.BlockSpec((1, bm, bn), lambda i, j, s: (s, i, j))
  else:
    out_shape = jax.ShapeDtypeStruct((m_out, n), out_dtype)
    out_spec = pl.BlockSpec((bm, bn), lambda i, j: (i, j))
  precision = lax.Precision.HIGHEST if (not int_dot and x.dtype == jnp.float32) else None
  # int8 * 16 codes: |x| <= 128, |16 q| <= 128 keeps the int32 sum exact for K < 2^17.
  fast_unpack = bs.fast_unpack and backend != "tpu" and not (int_dot and k >= 2**17)

  has_xs = xs is not None

  def kernel(*refs):
    if not has_xs:
      x_ref, w_ref, ws_ref, o_ref = refs
      xs_ref = None
    else:
      x_ref, xs_ref, w_ref, ws_ref, o_ref = refs
    matmul_body(x_ref, xs_ref, w_ref, ws_ref, o_ref, m=m, k=k, bk=bk, steps=steps,
                packed=packed, group=group, int_dot=int_dot, split=split, orient=bs.orient,
                k_major=bs.k_major, masked=masked, precision=precision, backend=backend,
                fast_unpack=fast_unpack)

  out = pl.pallas_call(
      kernel, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_spec,
      compiler_params=compiler_params(backend, bs, nd),
      interpret=backend == "interpret", name=name)(*args)
  if split:
    out = out.sum(axis=0).astype(out_dtype)
  return out[:m]


def check_block_fit(name: str, k: int, n: int, packed: bool, group: int | None,
                    bs: BlockSizes, backend: Backend) -> None:
  """Raise a ``ValueError`` naming the shape and the fix when tiles cannot cover it."""
  w_rows = k // 2 if packed else k
  bk = min(bs.bk, group) if group is not None else bs.bk
  if n % bs.bn:
    raise ValueError(
        f"{name}: N={n} is not a multiple of BlockSizes.bn={bs.bn}; pass "
        "block_sizes with a bn that divides N, or implementation='xla'.")
  if w_rows % bk:
    raise ValueError(
        f"{name}: the weight's {w_rows} stored K rows (K={k}{', packed' if packed else ''}) "
        f"are not a multiple of the K-step bk={bk}; pass block_sizes with a bk "
        "that divides them, or implementation='xla'.")
  if group is not None:
    # Tiles start at multiples of bk in both halves; with bk | group each
    # tile lies inside one group (the group need not divide K/2).
    if group % bk:
      raise ValueError(f"{name}: group size {group} is not a multiple of bk={bk}.")
  if backend == "tpu" and (bs.orient != "xw" or bs.k_major):
    raise ValueError(
        f"{name}: the Mosaic TPU kernel takes orient='xw', k_major=False (got "
        f"orient={bs.orient!r}, k_major={bs.k_major}).")
  if backend != "tpu" and bs.bm < 16:
    raise ValueError(
        f"{name}: BlockSizes.bm={bs.bm}: Triton's dot needs tiles of at least 16 rows "
        "(the last M block is masked, so decode with M = 1 uses bm=16).")
  if backend == "tpu" and (bk % 128 or bs.bn % 128):
    raise ValueError(
        f"{name}: Mosaic TPU needs bk and bn to be multiples of 128 (got bk={bk}, "
        f"bn={bs.bn}); groups smaller than 128 run with implementation='xla' on TPU.")


def resolve_backend(backend: str | None) -> Backend:
  """``None`` picks the platform's Pallas backend; CPU runs the kernel interpreted."""
  if backend is None:
    p = platform()
    return "interpret" if p == "cpu" else p  # type: ignore[return-value]
  if backend not in ("gpu", "tpu", "interpret"):
    raise ValueError(f"backend={backend!r}: use 'gpu', 'tpu', 'interpret' or None.")
  return backend  # type: ignore[return-value]


def resolve_block_sizes(kernel: str, backend: Backend, m: int, k: int, n: int,
                        block_sizes: BlockSizes | None, weight_layout: str) -> BlockSizes:
  """``block_sizes``, or :func:`default_block_sizes`; a weight stored ``"nk"`` (K-major)
  takes K-major tiles off TPU, so the kernel reads it as stored (no transpose per call)."""
  bs = block_sizes or default_block_sizes(kernel, backend, m, k, n, weight_layout)
  if weight_layout == "nk" and backend != "tpu" and not bs.k_major:
    bs = dataclasses.replace(bs, k_major=True)
  return bs


def logical_weight(w, weight_layout: str, name: str):
  """The ``[K, N]`` view of a weight given as stored: ``"kn"`` as is, ``"nk"`` (a weight
  transposed once ahead of time, ``w.transpose()``) transposed back; a kernel that reads
  it K-major transposes again and XLA folds the pair."""
  from lowbit.quant import QArray
  if weight_layout not in ("kn", "nk"):
    raise ValueError(f"{name}: weight_layout={weight_layout!r}; use 'kn' or 'nk'.")
  if weight_layout == "kn":
    return w
  if not isinstance(w, QArray) or w.ndim != 2:
    raise ValueError(f"{name}: weight_layout='nk' takes the 2-D QArray w.transpose().")
  return w.transpose()


def split_channel_scale(w, weight_layout: str = "kn"):
  """``(w', c)`` for a weight with integer group scales (``QuantSpec(group_scales="int")``):
  ``w'`` the same weight with its group scales ``s`` as f32 (exact) and no channel scale,
  ``c`` the channel scales as f32 ``[1, N]`` of the logical ``[K, N]`` weight, so that
  ``x @ dequantize(w) == (x @ dequantize(w')) * c`` up to f32 rounding (the kernels'
  group sums scaled by ``s``, then each channel by ``c``). ``w`` as stored
  (``weight_layout="nk"``: ``[N, K]``, channel scales ``[N, 1]``)."""
  c = w.channel_scale.astype(jnp.float32)
  c = c.T if weight_layout == "nk" else c
  return dataclasses.replace(w, scale=w.scale.astype(jnp.float32), channel_scale=None), c


def weight_operands(w, name: str, packed: bool):
  """``(values, scale [groups or 1, N], group)`` of a ``[K, N]`` weight QArray, validated."""
  from lowbit.quant import QArray
  if not isinstance(w, QArray):
    raise ValueError(f"{name}: w must be a lowbit.quant.QArray, got {type(w).__name__}.")
  if w.channel_scale is not None:  # the public kernels split it off first
    raise ValueError(
        f"{name}: w has integer group scales under a channel scale; this path takes float "
        "group scales. Call it through lowbit.kernels.qmatmul, w4a16_matmul or w4a8_matmul, "
        "which handle them (_pallas.split_channel_scale).")
  if w.ndim != 2:
    raise ValueError(f"{name}: w must be a [K, N] matrix, got shape {w.shape}.")
  if w.zero_point is not None:
    raise ValueError(
        f"{name}: w is asymmetric (has a zero point); the Pallas kernels take "
        "symmetric weights. Use implementation='xla' or a symmetric spec.")
  if packed:
    if w.pack_axis != 0 or w.bits > 4:
      raise ValueError(
          f"{name}: w must be int4 packed along K (QuantSpec(bits=4, pack=True, "
          f"pack_axis=0)); got bits={w.bits}, pack_axis={w.pack_axis}.")
  elif w.packed:
    raise ValueError(f"{name}: w is packed int4; call w4a16_matmul or w4a8_matmul.")
  if w.channel_axes not in ((), (1,)):
    raise ValueError(
        f"{name}: w's scale must be per-output-channel (channel_axes=(1,)) or "
        f"per-tensor, got channel_axes={w.channel_axes}.")
  k, n = w.shape
  group = None
  scale = w.scale
  if w.group_axis is not None:
    if w.group_axis != 0:
      raise ValueError(f"{name}: w must be grouped along K (group_axis=0), got {w.group_axis}.")
    group = w.group_size
    if k % group:
      raise ValueError(f"{name}: w has a ragged last group (K={k}, group_size={group}); the Pallas "
                       "kernels take whole groups. Use implementation='xla'.")
  scale = jnp.broadcast_to(scale, (scale.shape[0], n))
  return w.qvalue, scale, group


def act_operands(x, name: str):
  """``(int8 codes [M, K], f32 scale [M, 1])`` of a per-token (or per-tensor) int8 QArray."""
  from lowbit.quant import QArray
  if not isinstance(x, QArray):
    raise ValueError(
        f"{name}: x must be an int8 lowbit.quant.QArray (per-token scales), got "
        f"{type(x).__name__}; quantize it with QuantSpec(bits=8, channel_axes=(0,)).")
  if x.ndim != 2 or x.packed or x.zero_point is not None or x.group_axis is not None:
    raise ValueError(
        f"{name}: x must be a symmetric, unpacked, ungrouped [M, K] QArray; got "
        f"shape={x.shape}, packed={x.packed}, zero_point={x.zero_point is not None}, "
        f"group_size={x.group_size}.")
  if x.channel_axes not in ((), (0,)):
    raise ValueError(
        f"{name}: x's scale must be per-token (channel_axes=(0,)), got {x.channel_axes}.")
  m = x.shape[0]
  return x.qvalue, jnp.broadcast_to(x.scale.astype(jnp.float32), (m, 1))


def dequant_dot(x: jax.Array, w, weight_layout: str = "kn") -> jax.Array:
  """The generic XLA path: ``x [M, K] @ dequantize(w) [K, N]``, f32 accumulation.

  ``w`` a ``[K, N]`` QArray, or with ``weight_layout="nk"`` that weight as stored
  transposed (``w.transpose()``, ``[N, K]``). Symmetric per-channel weights multiply the
  codes and scale the product once; anything else (groups, zero points) dequantizes first.
  Float operands are f32 on CPU (see :func:`float_dot_dtype`) and multiplied at full f32
  precision. On CPU, below :data:`CPU_WHOLE_M` tokens, an unpacked weight is converted a
  slice of stored rows at a time (:func:`cpu_row_slices`).
  """
  from lowbit.quant import dequantize
  logical = logical_weight(w, weight_layout, "dequant_dot")
  dt = float_dot_dtype(x.dtype)
  prec = lax.Precision.HIGHEST if dt == jnp.float32 else None
  x = x.astype(dt)
  codes_only = (logical.group_axis is None and logical.zero_point is None
                and logical.channel_axes in ((), (1,)))

  def dot(xs, ws, k_axis):
    values = ws.codes.astype(dt) if codes_only else dequantize(ws, dt)
    return lax.dot_general(xs, values, (((1,), (k_axis,)), ((), ())), precision=prec,
                           preferred_element_type=jnp.float32)

  k_major = weight_layout == "nk"
  if platform() == "cpu" and not w.packed and x.shape[0] < CPU_WHOLE_M:
    acc = cpu_row_slices(x, w, dot, k_major=k_major)
  else:  # the weight as stored: a K-major one contracted along its minor axis
    acc = dot(x, w, 1 if k_major else 0)
  return acc * logical.scale.astype(jnp.float32) if codes_only else acc


# Below this many tokens, XLA:CPU paths convert weights a slice of rows at a time (decode).
CPU_WHOLE_M = 256
# The most stored rows one such slice holds (rows of codes; of packed bytes for int4).
CPU_ROWS = 256


def slice_size(total: int, most: int, multiple: int) -> int:
  """The largest divisor of ``total`` that is a multiple of ``multiple`` and at most
  ``max(most, multiple)``; ``total`` when there is none."""
  top = max(multiple, most - most % multiple)
  return next((c for c in range(top, 0, -multiple) if total % c == 0), total)


def cpu_row_slices(x: jax.Array, w, dot, *, k_major: bool) -> jax.Array:
  """``x [M, K] @ w`` as ``[M, N]`` f32 from a loop over slices of up to :data:`CPU_ROWS`
  stored rows of the unpacked QArray ``w`` (scales and zero points sliced with them).

  ``w`` as stored: ``[K, N]``, the partial products of row slices summed; or ``[N, K]``
  (``k_major``), each slice of rows giving its columns of the output. ``dot(x, w_slice,
  k_axis)`` returns the f32 product contracting ``x``'s axis 1 with the slice's ``k_axis``.

  XLA:CPU converts a weight operand to float in full before the dot: at M = 1 that pass,
  4 bytes a code written and read again, was most of the time (W8A16 one-token forward,
  d = 2048, 2 cores: 6.4x float's time; K = N = 4096 at M = 1: 31 ms, in slices 5.6-6 ms).
  A slice (whole groups) stays in cache.
  """
  rows_total = w.shape[0]
  # stored rows per row of a scale or zero point: 1 (one per row), G (groups) or all
  per = [rows_total // a.shape[0] for a in (w.scale, w.zero_point, w.channel_scale)
         if a is not None and a.shape[0] > 1]
  size = slice_size(rows_total, CPU_ROWS, max(per, default=1))
  if size == rows_total:
    return dot(x, w, 1 if k_major else 0)

  def rows(a, i):
    if a is None or a.shape[0] == 1:
      return a
    r = size * a.shape[0] // rows_total
    return lax.dynamic_slice_in_dim(a, i * r, r, 0)

  def piece(i):
    return dataclasses.replace(w, qvalue=rows(w.qvalue, i), scale=rows(w.scale, i),
                               zero_point=rows(w.zero_point, i),
                               channel_scale=rows(w.channel_scale, i), shape=(size, w.shape[1]))

  m = x.shape[0]
  if k_major:  # slice i holds output columns [i size, (i + 1) size)
    def body(i, out):
      return lax.dynamic_update_slice_in_dim(out, dot(x, piece(i), 1), i * size, 1)
    return lax.fori_loop(0, rows_total // size, body, jnp.zeros((m, rows_total), jnp.float32))

  def body(i, acc):
    return acc + dot(lax.dynamic_slice_in_dim(x, i * size, size, 1), piece(i), 0)
  return lax.fori_loop(0, rows_total // size, body, jnp.zeros((m, w.shape[1]), jnp.float32))
