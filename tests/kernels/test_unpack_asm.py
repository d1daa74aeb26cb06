"""The GPU kernels' int4-unpack PTX, executed by a small numpy model of its instructions.

The inline assembly in ``lowbit.kernels._pallas`` runs only on a GPU. Here each
shipped string is parsed and run instruction by instruction on every pair of
neighbouring bytes (both orders), and compared with the signed nibbles the
packing stores, so a wrong constant or selector cannot land unnoticed. The
model follows the PTX ISA for the instructions used (``prmt`` default mode,
``lop3`` truth table, ``fma.rn.bf16x2`` exact here since every value is a
small integer).
"""


import ml_dtypes
import numpy as np
from lowbit.kernels import _pallas

U32 = np.uint32


def _bf16x2_to_f32(w):
  lo = (w & U32(0xFFFF)).astype(np.uint16).view(ml_dtypes.bfloat16).astype(np.float32)
  hi = (w >> U32(16)).astype(np.uint16).view(ml_dtypes.bfloat16).astype(np.float32)
  return lo, hi


def _f32_to_bf16x2(lo, hi):
  lo = lo.astype(ml_dtypes.bfloat16).view(np.uint16).astype(U32)
  hi = hi.astype(ml_dtypes.bfloat16).view(np.uint16).astype(U32)
  return lo | (hi << U32(16))


def run_ptx(asm: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Run the straight-line PTX in ``asm`` on uint32 arrays; ``inputs`` names ``$i`` registers."""
  regs = dict(inputs)

  def val(tok):
    tok = tok.strip()
    if tok in regs:
      return regs[tok]
    return np.full_like(next(iter(inputs.values())), U32(int(tok, 0)))

  for line in asm.splitlines():
    line = line.strip().rstrip(";")
    if not line or line in "{}" or line.startswith(".reg"):
      continue
    op, rest = line.split(None, 1)
    if op == "mov.b32" and "{" in rest:  # pack two 16-bit registers, the first low
      dst, pair = rest.split(",", 1)
      lo, hi = (regs[r.strip()] for r in pair.strip(" {}").split(","))
      regs[dst.strip()] = ((lo & U32(0xFFFF)) | (hi & U32(0xFFFF)) << U32(16)).astype(U32)
      continue
    args = [a.strip() for a in rest.split(",")]
    dst, srcs = args[0], [val(a) for a in args[1:]]
    if op == "mov.b32":
      out = srcs[0]
    elif op == "xor.b32":
      out = srcs[0] ^ srcs[1]
    elif op == "and.b32":
      out = srcs[0] & srcs[1]
    elif op == "shl.b32":
      out = srcs[0] << srcs[1]
    elif op == "shr.b32":
      out = srcs[0] >> srcs[1]
    elif op == "prmt.b32":  # bytes of {b, a}: a is 0..3, b is 4..7; selector nibbles
      a, b, sel = srcs
      src = [(a >> U32(8 * i)) & U32(0xFF) for i in range(4)]
      src += [(b >> U32(8 * i)) & U32(0xFF) for i in range(4)]
      out = np.zeros_like(a)
      s = int(sel.flat[0])
      for i in range(4):
        out |= src[(s >> (4 * i)) & 7] << U32(8 * i)
    elif op == "lop3.b32":  # truth table over (a, b, c) = (0xF0, 0xCC, 0xAA)
      a, b, c, lut = srcs
      lut = int(lut.flat[0])
      out = np.zeros_like(a)
      for bit in range(8):
        if lut >> bit & 1:
          ta = a if bit & 4 else ~a
          tb = b if bit & 2 else ~b
          tc = c if bit & 1 else ~c
          out |= ta & tb & tc
    elif op == "mad.lo.u32":
      out = srcs[0] * srcs[1] + srcs[2]  # uint32 wraps: the low 32 bits
    elif op == "fma.rn.bf16x2":
      (a0, a1), (b0, b1), (c0, c1) = (_bf16x2_to_f32(v) for v in srcs)
      out = _f32_to_bf16x2(a0 * b0 + c0, a1 * b1 + c1)
    else:
      raise NotImplementedError(f"no model for PTX instruction {op!r}")
    regs[dst] = out.astype(U32)
  return regs


def all_byte_pairs() -> np.ndarray:
  b0, b1 = (v.ravel().astype(U32) for v in np.meshgrid(np.arange(256), np.arange(256)))
  return np.concatenate([b0 | b1 << U32(8) | b0 << U32(16) | b1 << U32(24),
                         b1 | b0 << U32(8) | b1 << U32(16) | b0 << U32(24)])


def nibbles(words, high: bool) -> np.ndarray:
  """``[n, 4]`` signed nibbles (two's complement), byte i of each word in column i."""
  b = np.stack([(words >> U32(8 * i)) & U32(0xFF) for i in range(4)], -1).astype(np.int64)
  v = (b >> 4) if high else (b & 0xF)
  return (v ^ 8) - 8


def test_int4_to_bf16_asm_gives_the_signed_nibbles():
  words = all_byte_pairs()
  for asm, high in ((_pallas._ASM_I4_TO_BF16_LO, False), (_pallas._ASM_I4_TO_BF16_HI, True)):
    out = run_ptx(asm, {"$2": words})
    got = np.stack([*_bf16x2_to_f32(out["$0"]), *_bf16x2_to_f32(out["$1"])], -1)
    np.testing.assert_array_equal(got, nibbles(words, high))


def test_split_int4_to_bf16_asm_gives_both_nibbles():
  """The Mosaic GPU kernel's one-pass sequence (``HopperW4Tiles(unpack="ptx")``): $0, $1
  the low nibbles of bytes (0, 1) and (2, 3), $2, $3 the high ones."""
  words = all_byte_pairs()
  out = run_ptx(_pallas.i4_to_bf16_asm("both"), {"$4": words})
  for regs, high in ((("$0", "$1"), False), (("$2", "$3"), True)):
    got = np.stack([*_bf16x2_to_f32(out[regs[0]]), *_bf16x2_to_f32(out[regs[1]])], -1)
    np.testing.assert_array_equal(got, nibbles(words, high))


def test_int4_pair_to_bf16_asm_gives_both_nibbles_of_two_bytes():
  """``HopperW4Tiles(unpack="ptx_natural")``: the two bytes of a 2 x 8-bit load in the low
  half of one 32-bit register, whatever its high half holds; $0 the low nibbles of
  (byte 0, byte 1), $1 the high ones. Every pair of bytes, both orders."""
  words = all_byte_pairs()
  junk = np.random.default_rng(0).integers(0, 1 << 16, words.shape, dtype=np.uint32) << U32(16)
  out = run_ptx(_pallas.i4_pair_to_bf16_asm(), {"$2": (words & U32(0xFFFF)) | junk})
  for reg, high in (("$0", False), ("$1", True)):
    got = np.stack(_bf16x2_to_f32(out[reg]), -1)
    np.testing.assert_array_equal(got, nibbles(words, high)[:, :2])


def test_folded_int4_pair_to_bf16_asm_gives_the_nibbles_plus_136():
  """``HopperW4Tiles(offset="folded")``: the same registers without the bf16 FMAs, each
  value ``136 + s`` (exact in bf16), in 4 instructions besides the constants."""
  words = all_byte_pairs()
  junk = np.random.default_rng(1).integers(0, 1 << 16, words.shape, dtype=np.uint32) << U32(16)
  asm = _pallas.i4_pair_to_bf16_asm(folded=True)
  out = run_ptx(asm, {"$2": (words & U32(0xFFFF)) | junk})
  for reg, high in (("$0", False), ("$1", True)):
    got = np.stack(_bf16x2_to_f32(out[reg]), -1)
    np.testing.assert_array_equal(got, nibbles(words, high)[:, :2] + _pallas.FOLDED_OFFSET)
  body = [ln for ln in asm.splitlines() if ln.strip()[:4] in ("prmt", "shr.", "lop3", "fma.")]
  assert len(body) == 4 and "fma" not in asm


def test_int4_to_int8x16_asm_gives_sixteen_times_the_nibbles():
  words = all_byte_pairs()
  for asm, high in ((_pallas._ASM_I4_TO_I8X16_LO, False), (_pallas._ASM_I4_TO_I8X16_HI, True)):
    out = run_ptx(asm, {"$1": words})["$0"]
    got = np.stack([((out >> U32(8 * i)) & U32(0xFF)).astype(np.uint8).view(np.int8)
                    for i in range(4)], -1).astype(np.int64)
    np.testing.assert_array_equal(got, _pallas.I8_UNPACK_SCALE * nibbles(words, high))


def test_scaled_int4_to_int8_asm_gives_the_nibbles_times_their_integer_scales():
  """Integer group scales (``QuantSpec(group_scales="int")``): every byte pair, every pair
  of scales in [1, 16], the bias words from ``int_scale_bias``; 7 instructions a word."""
  from lowbit.quant import INT_GROUP_SCALE_MAX
  words = all_byte_pairs()[::7]  # 18725 words: every nibble in every byte, both orders
  asm = _pallas.ASM_I4_TO_I8_SCALED
  for s_lo in range(1, INT_GROUP_SCALE_MAX + 1):
    for s_hi in (1, 7, 16, 17 - s_lo):
      out = run_ptx(asm, {"$2": words, "$3": np.full_like(words, s_lo),
                          "$4": np.full_like(words, _pallas.int_scale_bias(s_lo)),
                          "$5": np.full_like(words, s_hi),
                          "$6": np.full_like(words, _pallas.int_scale_bias(s_hi))})
      for reg, high, sc in (("$0", False, s_lo), ("$1", True, s_hi)):
        got = np.stack([((out[reg] >> U32(8 * i)) & U32(0xFF)).astype(np.uint8).view(np.int8)
                        for i in range(4)], -1).astype(np.int64)
        np.testing.assert_array_equal(got, sc * nibbles(words, high))
  body = [ln for ln in asm.splitlines() if ln.strip()[:3] in ("and", "xor", "mad", "shr")]
  assert len(body) == 9  # ptxas fuses each and + xor into one lop3: 7 instructions


def test_the_packing_stores_twos_complement_nibbles_low_first():
  """What the two tests above assume of ``lowbit.quant``'s int4 packing."""
  import jax.numpy as jnp

  from lowbit.quant import pack_int4
  codes = np.arange(-8, 8, dtype=np.int8)
  q = np.stack([codes, codes[::-1]])  # [2, 16]: row 0 -> low nibble, row 1 -> high
  p = np.asarray(pack_int4(jnp.asarray(q), 0)).astype(U32)  # [1, 16] uint8
  np.testing.assert_array_equal(nibbles(p.ravel(), False)[:, 0], codes)
  np.testing.assert_array_equal(nibbles(p.ravel(), True)[:, 0], codes[::-1])
