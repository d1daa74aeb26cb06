"""``HopperW4Tiles(mma="sync")``'s bookkeeping, run by a numpy model of one warpgroup.

:func:`lowbit.kernels._mosaic_gpu.mma_sync_bf16` runs only on a GPU (inline PTX). What it
adds to the ``wgmma`` kernel is index bookkeeping: which ``WGMMA_LAYOUT`` registers form
``mma.sync.m16n8k16``'s A fragment, which shared-memory rows each lane gives
``ldmatrix.x4`` for the B fragments, and where the C fragment lands in the result's
registers. Here every lane of the four warps is modelled: registers placed by Mosaic GPU's
own layout object (its tiling, warp and lane dimensions), the token tile stored as TMA
stores it (8 x 64 tiles, 128-byte swizzle), ``ldmatrix`` and the MMA as the PTX ISA
defines them (``ldmatrix``: lane ``8 i + r`` addresses row ``r`` of matrix ``i``, lane
``L`` receives bytes ``4 (L % 4)..`` of row ``L // 4``; A row-major ``a0..a3``: rows
``g, g + 8``, columns ``2t, 2t + 8``; B column-major ``b0, b1``: rows ``2t, 2t + 8``, column
``g``; C ``c0..c3``: rows ``g, g + 8``, columns ``2t, 2t + 1``), and the kernel's two
accumulator chains; the product must be ``a @ x^T``. A wrong register, offset or order
fails it (planted below).
"""

import ml_dtypes
import numpy as np
import pytest
from jax.experimental.mosaic.gpu import fragmented_array as fa
from lowbit.kernels import _mosaic_gpu as mg

LAYOUT = fa.WGMMA_LAYOUT


def element_of(shape, warp: int, lane: int) -> dict:
  """``{register index: (row, col)}`` of a thread's first element in each register of a
  ``WGMMA_LAYOUT`` array: ``TiledLayout.thread_idxs`` with the thread's indices as ints."""
  rank = LAYOUT.tiled_tiling_rank
  tiled = LAYOUT.tiled_tiling_shape
  contig = tuple(int(np.prod(shape[i + 1:])) for i in range(len(shape)))
  strides = LAYOUT.tiling.tile_strides(contig)
  coords = [0] * rank
  (wd,) = LAYOUT.warp_dims
  coords[wd] = warp
  rest = lane
  for d in reversed(LAYOUT.lane_dims):  # major to minor: the last is the fastest
    coords[d] = rest % tiled[d]
    rest //= tiled[d]
  base = sum(c * s for c, s in zip(coords, strides[-rank:], strict=True))
  out = {}
  for idx in np.ndindex(LAYOUT.registers_shape(shape)):
    lin = base + sum(i * s for i, s in zip(idx, strides, strict=True))
    out[idx] = tuple(lin // c % n for c, n in zip(contig, shape, strict=True))
  return out


def test_layout_model_is_mosaic_gpus():
  # the model above against the facts the kernel's docstrings state: 128 threads, each
  # register a pair of neighbouring columns, every element once
  shape = (128, 64)
  seen = set()
  for w in range(4):
    for lane in range(32):
      g, t = lane // 4, lane % 4
      for idx, (r, c) in element_of(shape, w, lane).items():
        assert (r, c) == (64 * idx[0] + 16 * w + 8 * idx[4] + g, 8 * idx[1] + 2 * t)
        seen |= {(r, c), (r, c + 1)}
  assert len(seen) == 128 * 64


@pytest.mark.parametrize("block,chunk", [(0, 0), (0, 3), (1, 5)])
def test_a_registers_are_ptx_a_fragment(block, chunk):
  for w in range(4):
    for lane in range(32):
      g, t = lane // 4, lane % 4
      where = element_of((128, 128), w, lane)
      got = [where[idx] for idx in mg.mma_sync_a_registers(block, chunk)]
      row = 64 * block + 16 * w + g
      assert got == [(row, 16 * chunk + 2 * t), (row + 8, 16 * chunk + 2 * t),
                     (row, 16 * chunk + 2 * t + 8), (row + 8, 16 * chunk + 2 * t + 8)]


def tma_store(x: np.ndarray) -> np.ndarray:
  """The bytes TMA writes for bf16 ``x [tm, width]`` with ``_tiled(64, 16)``: tiles of
  ``8 x 64`` row-major, each swizzled (byte address bits 4-6 xor bits 7-9)."""
  tm, width = x.shape
  buf = np.zeros(tm * width * 2, np.uint8)
  raw = x.view(np.uint16)
  for r in range(tm):
    for c in range(width):
      lin = ((r // 8) * (width // 64) + c // 64) * 1024 + (r % 8) * 128 + (c % 64) * 2
      phys = lin ^ (((lin >> 7) & 7) << 4)
      buf[phys:phys + 2] = np.frombuffer(raw[r, c].tobytes(), np.uint8)
  return buf


def load_word(buf: np.ndarray, offset: int) -> np.ndarray:
  assert offset % 4 == 0
  return buf[offset:offset + 4].view(np.uint16).view(ml_dtypes.bfloat16).astype(np.float64)


@pytest.mark.parametrize("tm,col0", [(8, 0), (16, 128), (16, 384)])
def test_b_offsets_read_the_tokens_fragment(tm, col0):
  width = 512
  x = np.arange(tm * width, dtype=np.float32).reshape(tm, width).astype(ml_dtypes.bfloat16)
  x = (x.astype(np.float32) % 251).astype(ml_dtypes.bfloat16)  # exact in bf16
  buf = tma_store(x)
  for q in range(tm // 8):
    for chunk in range(8):
      for upper in (0, 1):
        for lane in range(32):
          g, t = lane // 4, lane % 4
          word = load_word(buf, mg.mma_sync_b_offset(g, t, q, chunk, upper, col0, width))
          c = col0 + 16 * chunk + 8 * upper + 2 * t
          np.testing.assert_array_equal(word, x[8 * q + g, c:c + 2].astype(np.float64))


def ldmatrix_x4(buf: np.ndarray, row_offsets) -> np.ndarray:
  """``ldmatrix.sync.aligned.m8n8.x4.shared.b16`` by the PTX ISA: lane ``8 i + r`` gives
  the address of row ``r`` of matrix ``i`` (16 bytes); lane ``L`` receives in register
  ``i`` the 4 bytes ``4 (L % 4) ..`` of row ``L // 4`` of matrix ``i``. Returns
  ``[32, 4, 2]`` (each register as its two bf16)."""
  return np.array([[load_word(buf, row_offsets[8 * i + lane // 4] + 4 * (lane % 4))
                    for i in range(4)] for lane in range(32)])


@pytest.mark.parametrize("tm,col0", [(8, 0), (16, 128)])
def test_ldmatrix_rows_give_the_b_fragments(tm, col0):
  width = 256
  x = (np.arange(tm * width) % 251).reshape(tm, width).astype(ml_dtypes.bfloat16)
  buf = tma_store(x)
  for q in range(tm // 8):
    for pair in range(4):
      got = ldmatrix_x4(buf, [mg.mma_sync_ldmatrix_offset(lane, q, pair, col0, width)
                              for lane in range(32)])
      for lane in range(32):
        g, t = lane // 4, lane % 4
        for i in range(4):
          want = load_word(buf, mg.mma_sync_b_offset(g, t, q, 2 * pair + i // 2, i % 2, col0, width))
          np.testing.assert_array_equal(got[lane, i], want)


def mma_m16n8k16(a_frags, b_frags, c_frags):
  """One warp's ``mma.sync.m16n8k16.row.col`` by the PTX ISA's fragment layouts: per lane
  ``a_frags [32, 4, 2]``, ``b_frags [32, 2, 2]``, ``c_frags [32, 4]`` (f64)."""
  a, b, c = np.zeros((16, 16)), np.zeros((16, 8)), np.zeros((16, 8))
  for lane in range(32):
    g, t = lane // 4, lane % 4
    for i in range(4):
      r, k = g + 8 * (i % 2), 2 * t + 8 * (i // 2)
      a[r, k:k + 2] = a_frags[lane, i]
    for i in range(2):
      b[2 * t + 8 * i:2 * t + 8 * i + 2, g] = b_frags[lane, i]
    for i in range(4):
      c[g + 8 * (i // 2), 2 * t + i % 2] = c_frags[lane, i]
  d = a @ b + c
  return np.array([[d[lane // 4 + 8 * (i // 2), 2 * (lane % 4) + i % 2] for i in range(4)]
                   for lane in range(32)])


def model_mma_sync_bf16(a, x, col0, tm, a_registers=mg.mma_sync_a_registers,
                        row_offset=mg.mma_sync_ldmatrix_offset):
  """What :func:`mma_sync_bf16` computes, lane by lane: ``a [rows, cols]`` in registers as
  Mosaic GPU lays it out, ``x [tm, width]`` in shared memory as TMA stores it."""
  rows, cols = a.shape
  width = x.shape[1]
  buf = tma_store(x.astype(ml_dtypes.bfloat16))
  a = a.astype(ml_dtypes.bfloat16).astype(np.float64)
  out = np.full((rows, tm), np.nan)
  for w in range(4):
    a_where = [element_of(a.shape, w, lane) for lane in range(32)]
    o_where = [element_of((rows, tm), w, lane) for lane in range(32)]
    for blk in range(rows // 64):
      for q in range(tm // 8):
        chains = [np.zeros((32, 4)), np.zeros((32, 4))]
        b = {p: ldmatrix_x4(buf, [row_offset(lane, q, p, col0, width) for lane in range(32)])
             for p in range(cols // 32)}
        for j in range(cols // 16):
          a_frags = np.array([[a[r, c:c + 2] for r, c in (a_where[lane][idx]
                                                          for idx in a_registers(blk, j))]
                              for lane in range(32)])
          b_frags = b[j // 2][:, 2 * (j % 2):2 * (j % 2) + 2]
          chains[j % 2] = mma_m16n8k16(a_frags, b_frags, chains[j % 2])
        d = chains[0] + chains[1]
        for lane in range(32):
          for r8 in (0, 1):
            r, c = o_where[lane][(blk, q, 0, 0, r8, 0, 0, 0, 0)]
            out[r, c:c + 2] = d[lane, 2 * r8:2 * r8 + 2]
  return out


@pytest.mark.parametrize("rows,tm,col0", [(64, 8, 0), (128, 16, 128)])
def test_mma_sync_model_is_the_product(rows, tm, col0):
  rng = np.random.default_rng(rows + tm)
  a = rng.integers(-8, 8, (rows, 128)).astype(np.float64)  # codes: exact in bf16
  x = rng.standard_normal((tm, 256)).astype(ml_dtypes.bfloat16)
  want = a @ x.astype(np.float64)[:, col0:col0 + 128].T
  got = model_mma_sync_bf16(a, x, col0, tm)
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-9)


def test_planted_bookkeeping_bugs_fail():
  rng = np.random.default_rng(0)
  a = rng.integers(-8, 8, (64, 64)).astype(np.float64)
  x = rng.standard_normal((8, 128)).astype(ml_dtypes.bfloat16)
  want = a @ x.astype(np.float64)[:, :64].T
  swapped = lambda blk, j: tuple(reversed(mg.mma_sync_a_registers(blk, j)))  # noqa: E731
  unswizzled = lambda lane, q, p, col0, width: (  # noqa: E731
      (col0 + 32 * p + 8 * (lane // 8)) // 64 * 1024 + q * width // 64 * 1024
      + lane % 8 * 128 + (32 * p + 8 * (lane // 8)) % 64 * 2)
  for kw in (dict(a_registers=swapped), dict(row_offset=unswizzled)):
    got = model_mma_sync_bf16(a, x, 0, 8, **kw)
    assert not np.allclose(got, want), kw
