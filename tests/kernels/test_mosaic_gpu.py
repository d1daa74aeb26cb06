"""The Mosaic GPU (Hopper) W8A8 kernel against `w8a8.reference` and a float64 oracle.

On CPU it runs in jax's GPU interpreter (``backend="mosaic_gpu_interpret"``:
the weight tile as stored, see ``lowbit.kernels._mosaic_gpu``), on a few SMs;
with ``LOWBIT_TEST_BACKEND=gpu`` (the device script) compiled for the GPU,
with the K-major weight and every SM. Lowering for cuda is checked in
test_lowering.py.
"""

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lowbit.kernels import HopperTiles, w8a8
from lowbit.kernels import _mosaic_gpu as mg

from lowbit import kernels as K
from lowbit.quant import QuantParams, QuantSpec, dequantize, quantize

ON_GPU = os.environ.get("LOWBIT_TEST_BACKEND", "interpret") == "gpu"
BACKEND = "mosaic_gpu" if ON_GPU else "mosaic_gpu_interpret"


def tiles(**kw) -> HopperTiles:
  """Test tiles: small, and off GPU one SM unless a case names more (``num_sms=2``).

  The interpreter runs every warpgroup of every SM as a thread; on the 2-core CI machine a
  case with 3 SMs took ~2.4x as long as with one (the decode one-kernel case: 6.6 s against
  2.7 s a call), for the same work items, run in turn by one CTA's persistent loop instead.
  The cases with ``num_sms=2`` keep CTAs sharing a call's work items."""
  kw = {"tile_m": 64, "tile_n": 64, **kw}
  return HopperTiles(**kw) if ON_GPU else HopperTiles(num_sms=kw.pop("num_sms", 1), **kw)


def operands(m, k, n, *, seed, act_channel=(0,)):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((k, n)) * rng.uniform(0.1, 2.0, (1, n)), jnp.float32)
  return (quantize(x, QuantSpec(bits=8, channel_axes=act_channel)),
          quantize(w, QuantSpec(bits=8, channel_axes=(1,))))


def oracle(xa, wq) -> np.ndarray:
  xd = np.asarray(xa.qvalue, np.float64) * np.asarray(xa.scale, np.float64)
  wd = np.asarray(wq.qvalue, np.float64) * np.asarray(wq.scale, np.float64)
  return xd @ wd


def rel(a, b) -> float:
  a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# (M, K, N, tiles, activation scale axes, weight layout): ragged M (padded to the CTA
# tile), both warpgroup splits, both snake orders, the default 128 x 128 warpgroup tiles,
# a shallow pipeline with a small K-step, per-token and per-tensor activation scales, the
# weight as stored and transposed ahead of time (weight_layout="nk").
CASES = [
    (100, 384, 256, dict(), (0,), "kn"),
    (130, 256, 256, dict(tile_m=128, tile_n=128, wg_dim="m", grid_minor="n",
                         grid_tile_width=2, num_sms=2), (), "kn"),
    (64, 512, 256, dict(tile_n=128, tile_k=64, max_concurrent_steps=2, num_sms=1), (0,), "nk"),
]


@pytest.mark.parametrize("m,k,n,kw,act,layout", CASES,
                         ids=[f"{c[0]}x{c[1]}x{c[2]}-{c[5]}" for c in CASES])
def test_f32_matches_reference_and_float64(m, k, n, kw, act, layout):
  xa, wq = operands(m, k, n, seed=m + k + n, act_channel=act)
  w = wq.transpose() if layout == "nk" else wq
  out = K.w8a8_matmul(xa, w, out_dtype=jnp.float32, backend=BACKEND, block_sizes=tiles(**kw),
                      weight_layout=layout)
  assert out.shape == (m, n) and out.dtype == jnp.float32
  assert rel(out, np.asarray(w8a8.reference(xa, wq), np.float64)) < 1e-5
  assert rel(out, oracle(xa, wq)) < 1e-5


def test_int32_sums_are_exact_and_bf16_output_rounds_once():
  """Unit scales: the output is the integer dot product itself, rounded once to bf16."""
  m, k, n = 70, 512, 128
  rng = np.random.default_rng(7)
  xc, wc = rng.integers(-127, 128, (m, k)), rng.integers(-127, 128, (k, n))
  xa = quantize(jnp.asarray(xc, jnp.float32), QuantSpec(bits=8, channel_axes=(0,)),
                params=QuantParams(jnp.ones((m, 1), jnp.float32)))
  wq = quantize(jnp.asarray(wc, jnp.float32), QuantSpec(bits=8, channel_axes=(1,)),
                params=QuantParams(jnp.ones((1, n), jnp.float32)))
  exact = xc @ wc  # |sum| <= 512 * 127^2 < 2^24: exact in the f32 epilogue
  out = K.w8a8_matmul(xa, wq, out_dtype=jnp.bfloat16, backend=BACKEND, block_sizes=tiles())
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(out), np.asarray(jnp.asarray(exact, jnp.bfloat16)))


def test_qmatmul_takes_hopper_tiles_for_w8a8_only():
  rng = np.random.default_rng(11)
  x = jnp.asarray(rng.standard_normal((2, 3, 256)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((256, 128)), jnp.float32)
  a8 = QuantSpec(bits=8, channel_axes=(0,))
  w8 = quantize(w, QuantSpec(bits=8, channel_axes=(1,)))
  y = K.qmatmul(x, w8, act_spec=a8, implementation="pallas", block_sizes=tiles())
  ref = K.qmatmul(x, w8, act_spec=a8, implementation="reference")
  assert y.shape == (2, 3, 128)
  assert rel(y, np.asarray(ref, np.float64)) < 1e-5
  w4 = quantize(w, QuantSpec(bits=4, channel_axes=(1,), pack=True))
  with pytest.raises(ValueError, match="HopperTiles select the Mosaic GPU W8A8 kernel"):
    K.qmatmul(x, w4, act_spec=a8, implementation="pallas", block_sizes=tiles())
  with pytest.raises(ValueError, match="HopperTiles select the Mosaic GPU W8A8 kernel"):
    K.qmatmul(x, w8, act_spec=a8, implementation="xla", block_sizes=tiles())


def test_errors_name_the_problem():
  xa, wq = operands(16, 256, 192, seed=1)
  with pytest.raises(ValueError, match="N=192 is not a multiple of the CTA tile's 128"):
    K.w8a8_matmul(xa, wq, backend=BACKEND, block_sizes=HopperTiles(tile_m=64, tile_n=64))
  xa, wq = operands(16, 256, 256, seed=2)
  with pytest.raises(ValueError, match="more than Hopper's"):
    K.w8a8_matmul(xa, wq, backend=BACKEND, block_sizes=HopperTiles(max_concurrent_steps=6))
  with pytest.raises(ValueError, match="K=256 is not a multiple of HopperTiles.tile_k=512"):
    K.w8a8_matmul(xa, wq, backend=BACKEND, block_sizes=HopperTiles(tile_k=512))
  with pytest.raises(ValueError, match="HopperTiles are the tiles of backend='mosaic_gpu'"):
    K.w8a8_matmul(xa, wq, backend="interpret", block_sizes=HopperTiles())
  with pytest.raises(ValueError, match="block_sizes must be a HopperTiles"):
    K.w8a8_matmul(xa, wq, backend=BACKEND, block_sizes=K.BlockSizes())
  with pytest.raises(ValueError, match="wgmma needs a multiple of 64"):
    HopperTiles(tile_m=32)
  with pytest.raises(ValueError, match="at most 256"):
    HopperTiles(tile_n=512)
  with pytest.raises(ValueError, match="use 'm' or 'n'"):
    HopperTiles(wg_dim="k")


# --- Int4: the codes as wgmma's register operand (lowbit.kernels._mosaic_gpu.w4_kernel)


def w4_tiles(**kw) -> K.HopperW4Tiles:
  """Int4 test tiles, off GPU on one SM unless a case names more (see :func:`tiles`)."""
  return K.HopperW4Tiles(**kw) if ON_GPU else K.HopperW4Tiles(num_sms=kw.pop("num_sms", 1), **kw)


def hangs_compiled(kw) -> bool:
  """Tiles whose warpgroups overrun the register file as jax's pipeline splits it
  (``mg.register_split``): compiled, the kernel would hang, so it is refused."""
  return not mg.register_split(kw.get("compute_wgs", 2))["fits"]


def w4_operands(m, k, n, group, *, seed, scale_dtype=jnp.float32, group_scales="float"):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((k, n)) * rng.uniform(0.1, 2.0, (1, n)), jnp.float32)
  spec = QuantSpec(bits=4, channel_axes=(1,), group_size=group, pack=True, scale_dtype=scale_dtype,
                   group_scales=group_scales)
  return x, quantize(w, spec)


def w4_oracle(x, wq) -> np.ndarray:
  from lowbit.quant import dequantize
  return np.asarray(x, np.float64) @ np.asarray(dequantize(wq), np.float64)


# (M, K, N, group, tiles, weight layout): decode M (padded to 8 tokens), group 64 and
# 32, per-channel (with byte loads of the codes: a GPU-only difference), two token
# tiles with K split in two (partials added by XLA), the 128-row warpgroup tile; the
# weight as stored and transposed ahead of time.
W4_CASES = [
    (5, 512, 256, 64, dict(), "kn"),
    (20, 1024, 256, 128, dict(tile_m=16, split_k=2), "nk"),  # bf16 scales
    (9, 512, 256, None, dict(wide_load=False), "nk"),
    (3, 256, 256, 32, dict(tile_n=128, num_sms=2), "kn"),
    # nibbles="split": the bytes split in registers, one wgmma per half on x as it is
    (5, 512, 256, 64, dict(nibbles="split"), "nk"),
    (20, 1024, 256, 128, dict(nibbles="split", tile_m=16, split_k=2), "kn"),  # bf16 scales
    (9, 512, 256, None, dict(nibbles="split", wide_load=False), "nk"),
    (4, 256, 256, 32, dict(nibbles="split", compute_wgs=4), "nk"),  # 4 compute warpgroups
    # unpack="ptx": both nibbles of a register in one PTX sequence (interpreted: jnp), the
    # true codes (no 1/16 factor); grouped, the nk scales read as a slab, and per-channel
    (5, 512, 256, 64, dict(nibbles="split", unpack="ptx", nk_scales="slab"), "nk"),
    # the tokens unpadded (on a GPU TMA zero-fills the tile; interpreted, padded anyway)
    (3, 512, 256, 64, dict(nibbles="split", unpack="ptx", pad_tokens=False), "nk"),
    (9, 512, 256, None, dict(nibbles="split", unpack="ptx", tile_n=128, num_sms=2), "kn"),
    # the sweep's decode candidates with 4 compute warpgroups: everything opt-in at once
    (4, 512, 256, 64, dict(nibbles="split", unpack="ptx", compute_wgs=4, nk_scales="slab",
                           pad_tokens=False), "nk"),
    # unpack="ptx_natural": 2-byte loads in the bf16 operand's layout, the tokens as they are
    (1, 512, 256, 64, dict(nibbles="split", unpack="ptx_natural", tile_n=128, num_sms=2,
                           nk_scales="slab", pad_tokens=False), "nk"),
    (20, 1024, 256, 128, dict(nibbles="split", unpack="ptx_natural", tile_m=16, split_k=2),
     "kn"),  # bf16 scales, two token tiles
    (9, 512, 256, None, dict(nibbles="split", unpack="ptx_natural", compute_wgs=4), "nk"),
    # wg_split="k": the warpgroups share a CTA's rows and split each step's K, adding their
    # sums in shared memory; 4 work items over 3 CTAs (one runs two: the partial-sum sets
    # alternate), grouped (slab scales), per-channel, two token tiles with K split in two
    (3, 512, 256, 64, dict(nibbles="split", wg_split="k", nk_scales="slab"), "nk"),
    (9, 1024, 256, None, dict(nibbles="split", wg_split="k", compute_wgs=4), "kn"),
    (20, 1024, 256, 128, dict(nibbles="split", wg_split="k", tile_m=16, split_k=2), "kn"),
    # epilogue="kernel": the kernel writes [M, N] itself (no XLA after it), with each way of
    # sharing the rows; with everything opt-in a decode call is that kernel alone
    (5, 512, 256, 64, dict(nibbles="split", epilogue="kernel"), "kn"),
    (1, 512, 256, 64, dict(nibbles="split", wg_split="k", compute_wgs=4, epilogue="kernel",
                           unpack="ptx_natural", pad_tokens=False, nk_scales="slab"), "nk"),
    (1, 512, 256, 64, dict(nibbles="split", wg_split="k", epilogue="kernel",
                           unpack="ptx", pad_tokens=False, nk_scales="slab"), "nk"),
    # run 8's W4A16 decode default (_mosaic_gpu.AUTO until run 9), 5 tokens in a tile of 8
    (5, 512, 256, 64, dict(nibbles="split", unpack="ptx_natural", wg_split="k", nk_scales="slab",
                           pad_tokens=False, epilogue="kernel"), "nk"),
    # halves="apart": each half's wgmmas issued, waited for and scaled on their own
    # (interleaved: the same converted codes against each half's spread tokens)
    (3, 512, 256, 32, dict(halves="apart"), "nk"),
    # steps_per_wait=2: two K-steps' wgmmas per wait, in the one-kernel decode tiles (8
    # K-steps, 2 pipeline steps of 2 x 2), per-channel, and with streamed scale rows
    (1, 1024, 256, 64, dict(nibbles="split", unpack="ptx_natural", wg_split="k", nk_scales="slab",
                            pad_tokens=False, epilogue="kernel", steps_per_wait=2), "nk"),
    (9, 1024, 256, None, dict(nibbles="split", unpack="ptx", steps_per_wait=2), "kn"),
    (20, 1024, 256, 128, dict(nibbles="split", tile_m=16, split_k=2, steps_per_wait=2), "kn"),
    # mma="sync": each warp's mma.sync on the same registers, its token fragments loaded by
    # itself (interpreted: the same jnp.dot; tests/kernels/test_mma_sync.py models the
    # lanes): the decode default so, two token tiles (16) with K split, per-channel with
    # 128-row tiles, and two K-steps per pipeline step and warpgroup
    (5, 512, 256, 64, dict(nibbles="split", unpack="ptx_natural", wg_split="k", nk_scales="slab",
                           pad_tokens=False, epilogue="kernel", mma="sync"), "nk"),
    (20, 1024, 256, 128, dict(nibbles="split", unpack="ptx_natural", tile_m=16, split_k=2,
                              mma="sync"), "kn"),
    (9, 512, 256, None, dict(nibbles="split", unpack="ptx_natural", tile_n=128, num_sms=2,
                             mma="sync"), "nk"),
    (1, 1024, 256, 64, dict(nibbles="split", unpack="ptx_natural", wg_split="k", nk_scales="slab",
                            pad_tokens=False, epilogue="kernel", steps_per_wait=2, mma="sync"),
     "nk"),
    # the W4A16 decode default (_mosaic_gpu.AUTO, run 9) as it is: 6 stages, 8 pipeline steps
    (5, 4096, 256, 128, dict(nibbles="split", unpack="ptx_natural", wg_split="k",
                             nk_scales="slab", pad_tokens=False, epilogue="kernel", mma="sync",
                             max_concurrent_steps=6), "nk"),
    # offset="folded": the codes as 136 + s, each group's sum less 136 times its token sums
    # (from a ones tile against the same fragments): the decode default so, and two token
    # tiles (16) with K split over CTAs
    (5, 512, 256, 64, dict(nibbles="split", unpack="ptx_natural", wg_split="k", nk_scales="slab",
                           pad_tokens=False, epilogue="kernel", mma="sync", offset="folded"),
     "nk"),
    (20, 1024, 256, 128, dict(nibbles="split", unpack="ptx_natural", tile_m=16, split_k=2,
                              mma="sync", offset="folded"), "kn"),
    # wg_split="steps": warpgroup w takes pipeline steps w mod compute_wgs (one K-step each),
    # so 3 warpgroups divide K's 8 K-steps too: grouped with 2, per-channel with 3, the
    # decode one kernel with 3 (and with mma="sync"), K-steps 3, 3 and 2
    (5, 1024, 256, 64, dict(nibbles="split", wg_split="steps"), "kn"),
    (9, 1024, 256, None, dict(nibbles="split", wg_split="steps", compute_wgs=3), "kn"),
    (5, 1024, 256, 64, dict(nibbles="split", unpack="ptx_natural", wg_split="steps", compute_wgs=3,
                            nk_scales="slab", pad_tokens=False, epilogue="kernel"), "nk"),
    (1, 2048, 256, 128, dict(nibbles="split", unpack="ptx_natural", wg_split="steps",
                             compute_wgs=3, nk_scales="slab", pad_tokens=False, epilogue="kernel",
                             mma="sync"), "nk"),
    # pingpong: the warpgroups take turns at wgmma; the decode default's tiles (K split over
    # the warpgroups), and a ring of 3 (per-channel: jax 0.10's interpreter runs it)
    (5, 512, 256, 64, dict(nibbles="split", unpack="ptx_natural", wg_split="k", nk_scales="slab",
                           pad_tokens=False, epilogue="kernel", pingpong=True), "nk"),
    (9, 512, 384, None, dict(nibbles="split", compute_wgs=3, pingpong=True), "kn"),
    # W4A16 past decode (bench_kernels.py's candidates above M = 64): 128-token tiles, two
    # of them (the second 2 tokens), halves apart, with turns, and with both halves' sums
    # live (the loop spills compiled, sass_stats.py)
    (130, 512, 256, 64, dict(nibbles="split", unpack="ptx_natural", tile_m=128, halves="apart"),
     "nk"),
    (130, 512, 256, 64, dict(nibbles="split", unpack="ptx_natural", tile_m=128, halves="apart",
                             pingpong=True), "nk"),
    (130, 512, 256, 64, dict(nibbles="split", unpack="ptx_natural", tile_m=128), "nk"),
    # the W4A16 default at 64-128 tokens (_mosaic_gpu.AUTO, run 10): 64-token tiles, the
    # output written by the kernel, two tiles (the second 6 tokens)
    (70, 512, 256, 64, dict(nibbles="split", unpack="ptx_natural", tile_m=64, epilogue="kernel"),
     "nk"),
    # and the output written by the kernel, two tiles of rows (the 126 past M sliced off)
    (130, 512, 256, 64, dict(nibbles="split", unpack="ptx_natural", tile_m=128, halves="apart",
                             epilogue="kernel"), "nk"),
]


def case_id(c) -> str:
  kw = c[4]
  return (f"{c[0]}x{c[1]}x{c[2]}-g{c[3]}-{c[5]}" + ("-tm128" if kw.get("tile_m") == 128 else "")
          + ("-split" if kw.get("nibbles") == "split" else "")
          + ("-ptx" if kw.get("unpack") == "ptx" else "")
          + ("-natural" if kw.get("unpack") == "ptx_natural" else "")
          + ("-slab" if kw.get("nk_scales") == "slab" else "")
          + ("-unpadded" if kw.get("pad_tokens") is False else "")
          + ("-magic" if kw.get("int_sums") == "magic" else "")
          + (f"-wgs{kw['compute_wgs']}" if kw.get("compute_wgs", 2) != 2 else "")
          + ("-ksplit" if kw.get("wg_split") == "k" else "")
          + ("-steps" if kw.get("wg_split") == "steps" else "")
          + ("-final" if kw.get("epilogue") == "kernel" else "")
          + ("-apart" if kw.get("halves") == "apart" else "")
          + (f"-pw{kw['steps_per_wait']}" if kw.get("steps_per_wait", 1) > 1 else "")
          + ("-sync" if kw.get("mma") == "sync" else "")
          + ("-folded" if kw.get("offset") == "folded" else "")
          + ("-pp" if kw.get("pingpong") else ""))


#: Cases whose interpreted run repeats what another case already checks, the opt-in variant
#: combined with other tiles or shapes (each variant keeps at least one case in the default
#: suite): marked ``slow`` on CPU, where the interpreter takes 3-20 s a case. On a GPU they
#: all run compiled, every case lowers for cuda in the default suite, and
#: experiments/gpu_jax_check.sh runs the slow ones too before device time.
INTERPRETED_ONCE = {
    "w4a16": {"9x512x256-gNone-nk-split", "20x1024x256-g128-kn-split", "4x256x256-g32-nk-split-wgs4",
              "3x512x256-g64-nk-split-ptx-unpadded", "9x512x256-gNone-kn-split-ptx",
              "4x512x256-g64-nk-split-ptx-slab-unpadded-wgs4",
              "20x1024x256-g128-kn-split-natural", "9x512x256-gNone-nk-split-natural-wgs4",
              "9x1024x256-gNone-kn-split-wgs4-ksplit", "20x1024x256-g128-kn-split-ksplit",
              "5x512x256-g64-kn-split-final",
              # interpreted, unpack="ptx" runs the jnp of its ptx_natural twin above
              "1x512x256-g64-nk-split-ptx-slab-unpadded-ksplit-final",
              # 4 compute warpgroups run interpreted only (refused compiled): in the slow set
              "1x512x256-g64-nk-split-natural-slab-unpadded-wgs4-ksplit-final",
              "20x1024x256-g128-kn-split-pw2",
              # mma="sync" interpreted is its wgmma twin's jnp (the default suite keeps its
              # lowering for cuda and tests/kernels/test_mma_sync.py's lane-level model)
              "5x512x256-g64-nk-split-natural-slab-unpadded-ksplit-final-sync",
              "20x1024x256-g128-kn-split-natural-sync", "9x512x256-gNone-nk-split-natural-sync",
              "1x1024x256-g64-nk-split-natural-slab-unpadded-ksplit-final-pw2-sync",
              # wg_split="steps": the per-channel case with 3 warpgroups stays in the suite
              "5x1024x256-g64-kn-split-steps",
              # a slow day (2026-11-28: the suite took 11 min): variants another default
              # case covers (ptx + slab in the W4A8 and W4A16 defaults' own tiles, split
              # nibbles, the K split with slab scales, 3 warpgroups taking steps by mma.sync)
              "5x512x256-g64-nk-split-ptx-slab",
              "20x1024x256-g128-nk", "5x512x256-g64-nk-split", "3x512x256-g64-nk-split-slab-ksplit",
              "1x2048x256-g128-nk-split-natural-slab-unpadded-wgs3-steps-final-sync",
              # (CI's pytest 10:49 on 2026-11-28 07:20 UTC) the first tiles' interleaved
              # grouped path, which 3x256x256-g32-kn keeps in the suite (the bf16 output
              # check: the decode default's g64 case)
              "5x512x256-g64-kn",
              # 128-token tiles: the halves-apart case stays; turns and halves together
              # (each ~3 s interpreted) run on purpose and on the GPU
              "130x512x256-g64-nk-tm128-split-natural-apart-pp", "130x512x256-g64-nk-tm128-split-natural",
              # the kernel's epilogue over two token tiles: W4A8's case stays (5 s)
              "130x512x256-g64-nk-tm128-split-natural-final-apart"},
    # (One SM a case since 2026-11-28, 08:30 UTC: the file's default cases from 139 to 90 s
    # alone. Back in the default suite then: two K-steps a wait, halves apart and 3
    # warpgroups taking steps, each in its cheapest case, 2.6-3.9 s; and the decode one
    # kernel with turns and with two K-steps a wait, the likeliest next decode defaults, ~7 s
    # each.)
    "w4a8": {"20x1024x256-gNone-nk-split", "5x512x256-g64-nk-split-unpadded",
             "20x1024x256-g128-nk-slab", "5x512x256-g64-kn-split", "20x1024x256-gNone-kn",
             "5x512x256-g64-nk-split-ptx-slab-magic",
             "20x1024x256-gNone-kn-split-ptx", "130x512x256-g64-nk-tm128-split-ptx-magic",
             "130x512x256-g64-nk-tm128-split-ptx-magic-apart", "130x512x256-g64-nk-tm128-split-ptx",
             # pingpong: the small default-tile case stays; two turns a step (apart) and
             # the 128-token tiles run on purpose
             "130x512x256-g64-nk-tm128-split-ptx-pp", "5x512x256-g64-kn-split-apart-pp",
             # the slow day above: two K-steps a wait, K split over the warpgroups and
             # halves apart (still lowered for cuda by the default suite, and run
             # interpreted by experiments/gpu_jax_check.sh before device time)
             "5x1024x256-g128-nk-split-ptx-slab-unpadded-magic-pw2",
             "5x512x256-g64-nk-split-slab-unpadded-magic-ksplit", "5x512x256-g64-kn-split-apart"},
}


#: jax 0.10's GPU interpreter deadlocks on group-scaled weights with 3 compute warpgroups
#: (two threads wait at barriers forever, whatever wg_split; per-channel runs, except with
#: the warpgroups taking turns, pingpong=True, which passes the turn by barriers): such cases
#: run interpreted from jax 0.11 on (experiments/gpu_jax_check.sh, the GPU's jax), lower
#: for cuda under either, and run compiled on the GPU.
INTERPRETER_DEADLOCKS = (not ON_GPU and jax.__version_info__ < (0, 11)
                         and "interpreter deadlocks under jax 0.10 (3 warpgroups, group scales)")


def interpreted(kernel: str, cases: list) -> list:
  """``cases`` as parameters, those of ``INTERPRETED_ONCE`` marked slow unless on a GPU."""
  unknown = INTERPRETED_ONCE[kernel] - {case_id(c) for c in cases}
  assert not unknown, f"INTERPRETED_ONCE names no {kernel} case {sorted(unknown)}"
  slow = set() if ON_GPU else INTERPRETED_ONCE[kernel]

  def marks(c):
    out = [pytest.mark.slow] if case_id(c) in slow else []
    if (INTERPRETER_DEADLOCKS and c[4].get("compute_wgs") == 3
        and (c[3] is not None or c[4].get("pingpong"))):
      out.append(pytest.mark.skip(reason=INTERPRETER_DEADLOCKS))
    return out
  return [pytest.param(*c, id=case_id(c), marks=marks(c)) for c in cases]


@pytest.mark.parametrize("m,k,n,group,kw,layout", interpreted("w4a16", W4_CASES))
def test_w4a16_matches_reference_and_float64(m, k, n, group, kw, layout):
  x, wq = w4_operands(m, k, n, group, seed=m + k + n,
                      scale_dtype=jnp.bfloat16 if group == 128 else jnp.float32)
  w = wq.transpose() if layout == "nk" else wq
  if ON_GPU and hangs_compiled(kw):  # interpreted only: compiled, it would hang the GPU
    with pytest.raises(ValueError, match="hangs on a GPU"):
      K.w4a16_matmul(x, w, backend=BACKEND, block_sizes=w4_tiles(**kw), weight_layout=layout)
    return
  out = K.w4a16_matmul(x, w, out_dtype=jnp.float32, backend=BACKEND, block_sizes=w4_tiles(**kw),
                       weight_layout=layout)
  assert out.shape == (m, n) and out.dtype == jnp.float32
  assert rel(out, np.asarray(K.w4a16.reference(x, wq, out_dtype=jnp.float32), np.float64)) < 1e-5
  assert rel(out, w4_oracle(x, wq)) < 1e-5
  if group == 64 and (layout == "kn" or kw.get("epilogue") == "kernel"):
    # bf16 output (the cast is the same in all; epilogue="kernel" casts in the kernel)
    out16 = K.w4a16_matmul(x, w, backend=BACKEND, block_sizes=w4_tiles(**kw),
                           weight_layout=layout)
    assert out16.dtype == jnp.bfloat16 and rel(out16, w4_oracle(x, wq)) < 1e-2


def test_qmatmul_takes_hopper_w4_tiles_for_w4a16_and_w4a8():
  x, wq = w4_operands(6, 256, 128, 64, seed=3)
  x3 = x.reshape(2, 3, 256)
  a8 = QuantSpec(bits=8, channel_axes=(0,))
  for act in (None, a8):
    y = K.qmatmul(x3, wq, act_spec=act, implementation="pallas", block_sizes=w4_tiles())
    ref = K.qmatmul(x3, wq, act_spec=act, implementation="reference")
    assert y.shape == (2, 3, 128) and y.dtype == jnp.bfloat16
    assert rel(y, np.asarray(ref, np.float64)) < 1e-2
  w8 = quantize(jnp.ones((256, 128)), QuantSpec(bits=8, channel_axes=(1,)))
  with pytest.raises(ValueError, match="HopperW4Tiles select the Mosaic GPU W4A16 / W4A8 kernel"):
    K.qmatmul(x3, w8, act_spec=a8, implementation="pallas", block_sizes=w4_tiles())


# W4A8 through the same kernel: int8 tokens, int4 codes -> int8 in registers, int32 sums.
W4A8_CASES = [
    (5, 512, 256, 64, dict(), "nk"),
    (20, 1024, 256, None, dict(tile_m=16, split_k=2), "kn"),
    (5, 512, 256, 64, dict(nibbles="split"), "kn"),
    (20, 1024, 256, None, dict(nibbles="split", tile_m=16, split_k=2), "nk"),
    # an "nk" weight's group scales read as stored, a slab per work item (default: XLA
    # transposes them, a row per step)
    (20, 1024, 256, 128, dict(tile_m=16, split_k=2, nk_scales="slab"), "nk"),
    (5, 512, 256, 64, dict(nibbles="split", pad_tokens=False), "nk"),  # tokens unpadded
    # unpack="ptx" (16 lo, 16 hi by shl/and on whole registers; interpreted: jnp), with the
    # group sums to f32 by the magic number, per-channel, and the M = 256 candidates' token tile
    (5, 512, 256, 64, dict(nibbles="split", unpack="ptx", int_sums="magic", nk_scales="slab"),
     "nk"),
    (20, 1024, 256, None, dict(nibbles="split", unpack="ptx", tile_m=16, split_k=2), "kn"),
    (130, 512, 256, 64, dict(nibbles="split", unpack="ptx", int_sums="magic", tile_m=128), "nk"),
    (5, 512, 256, 64, dict(nibbles="split", wg_split="k", nk_scales="slab", int_sums="magic",
                           pad_tokens=False), "nk"),  # K split over the warpgroups
    # halves="apart" (one half's int32 group sums live at a time), and with the M = 256
    # candidates' 128-token tile (where "together" spills)
    (5, 512, 256, 64, dict(nibbles="split", halves="apart"), "kn"),
    (130, 512, 256, 64, dict(nibbles="split", unpack="ptx", int_sums="magic", tile_m=128,
                             halves="apart"), "nk"),
    # run 8's W4A8 defaults: decode, and 128-token tiles
    (5, 512, 256, 64, dict(nibbles="split", unpack="ptx", tile_n=128, nk_scales="slab",
                           int_sums="magic", pad_tokens=False), "nk"),
    (130, 512, 256, 64, dict(nibbles="split", unpack="ptx", tile_m=128), "nk"),
    (130, 512, 256, 64, dict(nibbles="split", unpack="ptx", tile_m=128, halves="apart"), "nk"),
    (130, 512, 256, 64, dict(nibbles="split", unpack="ptx", tile_m=128, nk_scales="slab"), "nk"),
    # steps_per_wait=2 (W4A8's decode tiles, two K-steps per wait, 4 K-steps)
    (5, 1024, 256, 128, dict(nibbles="split", unpack="ptx", int_sums="magic", nk_scales="slab",
                             pad_tokens=False, steps_per_wait=2), "nk"),
    # pingpong (the warpgroups take turns at wgmma): with the M = 256 default's tiles, small
    # and as they are, and with two turns a step (halves="apart")
    (3, 256, 128, 64, dict(nibbles="split", unpack="ptx", pingpong=True), "nk"),
    (130, 512, 256, 64, dict(nibbles="split", unpack="ptx", tile_m=128, pingpong=True), "nk"),
    (5, 512, 256, 64, dict(nibbles="split", halves="apart", pingpong=True), "kn"),
    # epilogue="kernel": each token's row scaled and rounded by the kernel itself (no XLA
    # after it): the K split over the warpgroups at decode (one CTA a work item, no split-K),
    # and the M = 256 default's tiles (two token tiles, rows past M sliced off)
    (5, 512, 256, 64, dict(nibbles="split", unpack="ptx", wg_split="k", nk_scales="slab",
                           int_sums="magic", pad_tokens=False, epilogue="kernel"), "nk"),
    (130, 512, 256, 64, dict(nibbles="split", unpack="ptx", tile_m=128, epilogue="kernel"), "nk"),
]


@pytest.mark.parametrize("m,k,n,group,kw,layout", interpreted("w4a8", W4A8_CASES))
def test_w4a8_matches_reference_and_float64(m, k, n, group, kw, layout):
  x, wq = w4_operands(m, k, n, group, seed=m + k + n + 1)
  xa = quantize(x.astype(jnp.float32), QuantSpec(bits=8, channel_axes=(0,)))
  w = wq.transpose() if layout == "nk" else wq
  if ON_GPU and hangs_compiled(kw):  # interpreted only: compiled, it would hang the GPU
    with pytest.raises(ValueError, match="hangs on a GPU"):
      K.w4a8_matmul(xa, w, backend=BACKEND, block_sizes=w4_tiles(**kw), weight_layout=layout)
    return
  out = K.w4a8_matmul(xa, w, out_dtype=jnp.float32, backend=BACKEND, block_sizes=w4_tiles(**kw),
                      weight_layout=layout)
  assert out.shape == (m, n) and out.dtype == jnp.float32
  assert rel(out, np.asarray(K.w4a8.reference(xa, wq), np.float64)) < 1e-5
  from lowbit.quant import dequantize
  oracle64 = np.asarray(dequantize(xa), np.float64) @ np.asarray(dequantize(wq), np.float64)
  assert rel(out, oracle64) < 1e-5
  if kw.get("epilogue") == "kernel":
    # bf16 rounded in the kernel: the XLA epilogue's numbers (both round y * sx to nearest)
    tiles = w4_tiles(**kw)
    out16 = K.w4a8_matmul(xa, w, backend=BACKEND, block_sizes=tiles, weight_layout=layout)
    xla16 = K.w4a8_matmul(xa, w, backend=BACKEND, weight_layout=layout,
                          block_sizes=dataclasses.replace(tiles, epilogue="xla"))
    assert out16.dtype == jnp.bfloat16 and rel(out16, oracle64) < 1e-2
    assert rel(out16, np.asarray(xla16, np.float64)) <= 2.0**-8


# W4A8 with integer group scales (QuantSpec(group_scales="int")): codes times their scale
# in registers, one int32 accumulator over all of K. The decode default's tiles (K split over
# the warpgroups, the kernel's epilogue with each row's channel scale, slab scales: K = 1024,
# g64: 16 groups, the 16-column int8 slab), the M = 256 default's 128-token tiles (scale rows
# streamed), the K split over CTAs (XLA's epilogue); slow: the kernel's epilogue over two
# token tiles with halves="apart" (ignored), turns at wgmma, 3 warpgroups taking steps.
W4A8_INT_CASES = [
    (5, 1024, 256, 64, dict(nibbles="split", unpack="ptx", wg_split="k", nk_scales="slab",
                            pad_tokens=False, epilogue="kernel"), "nk"),
    (130, 512, 256, 64, dict(nibbles="split", unpack="ptx", tile_m=128), "nk"),
    pytest.param(130, 512, 256, 64, dict(nibbles="split", unpack="ptx", tile_m=128,
                                         epilogue="kernel", halves="apart"), "nk",
                 marks=pytest.mark.slow),  # the decode case keeps the kernel's epilogue
    (20, 1024, 256, 128, dict(nibbles="split", unpack="ptx", tile_m=16, split_k=2), "kn"),
    pytest.param(3, 256, 128, 64, dict(nibbles="split", unpack="ptx", pingpong=True), "nk",
                 marks=pytest.mark.slow),
    pytest.param(5, 1536, 256, 64, dict(nibbles="split", unpack="ptx", compute_wgs=3,
                                        wg_split="steps"), "kn", marks=pytest.mark.slow),
]


def _int_case_id(c):
  return "int-" + case_id(c.values if hasattr(c, "values") else c)


@pytest.mark.parametrize("m,k,n,group,kw,layout", W4A8_INT_CASES,
                         ids=[_int_case_id(c) for c in W4A8_INT_CASES])
def test_w4a8_int_group_scales_match_reference_and_float64(m, k, n, group, kw, layout):
  if INTERPRETER_DEADLOCKS and kw.get("compute_wgs") == 3:
    pytest.skip(INTERPRETER_DEADLOCKS)
  x, wq = w4_operands(m, k, n, group, seed=m + k + n + 2, group_scales="int")
  assert wq.scale.dtype == jnp.int8 and wq.channel_scale is not None
  xa = quantize(x.astype(jnp.float32), QuantSpec(bits=8, channel_axes=(0,)))
  w = wq.transpose() if layout == "nk" else wq
  tiles = w4_tiles(**kw)
  plan = mg.plan_w4("t", m, k, n, group, tiles, act_bytes=1, weight_layout=layout,
                    scale_bytes=1, interpret=not ON_GPU, int_scales=True)
  assert plan.int_scales and not plan.apart
  if kw.get("nk_scales") == "slab":
    assert plan.slab == 16  # 16 int8 columns: TMA's narrowest box row
  out = K.w4a8_matmul(xa, w, out_dtype=jnp.float32, backend=BACKEND, block_sizes=tiles,
                      weight_layout=layout)
  assert out.shape == (m, n) and out.dtype == jnp.float32
  oracle64 = np.asarray(dequantize(xa), np.float64) @ np.asarray(dequantize(wq), np.float64)
  assert rel(out, np.asarray(K.w4a8.reference(xa, wq), np.float64)) < 1e-5
  assert rel(out, oracle64) < 1e-5
  # the XLA path's numbers: the same int32 sums, scaled once per token and channel
  assert rel(out, np.asarray(K.w4a8.xla(xa, w, out_dtype=jnp.float32, weight_layout=layout),
                             np.float64)) < 1e-6
  if kw.get("epilogue") == "kernel":
    out16 = K.w4a8_matmul(xa, w, backend=BACKEND, block_sizes=tiles, weight_layout=layout)
    assert out16.dtype == jnp.bfloat16 and rel(out16, oracle64) < 1e-2


def test_w4a8_int_group_scales_need_the_ptx_conversion():
  x, wq = w4_operands(5, 512, 256, 64, seed=1, group_scales="int")
  xa = quantize(x.astype(jnp.float32), QuantSpec(bits=8, channel_axes=(0,)))
  for kw in (dict(), dict(nibbles="split"), dict(nibbles="split", unpack="ptx_natural")):
    with pytest.raises(ValueError, match="integer group scales are applied to int8 codes"):
      K.w4a8_matmul(xa, wq, backend=BACKEND, block_sizes=w4_tiles(**kw))
  with pytest.raises(ValueError, match="channel_scale goes with int8 group scales"):
    mg.w4_matmul(xa.qvalue, wq.qvalue, wq.scale.astype(jnp.float32), 64, tiles=w4_tiles(),
                 interpret=True, name="t", kernel_name="t", token_scale=xa.scale,
                 channel_scale=wq.channel_scale)


def test_int8_row_register_maps_a_code_register_to_its_rows_scale():
  """``int8_row_register``: each ``WGMMA_LAYOUT_8BIT`` register of a thread holds 4 codes
  of one weight row, and the wgmma row layout's register it names holds that row."""
  from jax.experimental.mosaic.gpu import fragmented_array as fa
  rows, cols = 128, 64
  codes = _thread_registers(fa.WGMMA_LAYOUT_8BIT, (rows, cols))
  row_layout = mg._wgmma_row_layout().to_mgpu()
  pos = _positions(row_layout, (rows,))
  nd = pos.ndim
  warp = [d % nd for d in row_layout.warp_dims]
  lane = [d % nd for d in row_layout.lane_dims if isinstance(d, int)]  # the rest replicate
  vec = row_layout.vector_dim % nd
  held = {}  # (warp, lane): {register: row}
  for full in np.ndindex(pos.shape):
    reg = tuple(0 if d in (*warp, *lane, vec) else v for d, v in enumerate(full))
    held.setdefault((tuple(full[d] for d in warp), tuple(full[d] for d in lane)), {})[reg] = pos[full]
  for (w_, lanes), regs in codes.items():
    mine = held[(w_, (lanes[0],))]  # lanes of the codes' layout: (row in 8, column quad)
    for idx, positions in regs.items():
      r = {p // cols for p in positions}
      assert r == {mine[mg.int8_row_register(idx)]}, (w_, lanes, idx)


LOWERING_CASES = ([("w4a16",) + c for c in W4_CASES] + [("w4a8",) + c for c in W4A8_CASES])


@pytest.mark.skipif(ON_GPU, reason="on a GPU the cases above compile for real")
@pytest.mark.parametrize("kernel,m,k,n,group,kw,layout", LOWERING_CASES,
                         ids=[f"{c[0]}-{case_id(c[1:])}" for c in LOWERING_CASES])
def test_every_case_lowers_for_cuda_with_the_gpu_runs_tiles(kernel, m, k, n, group, kw, layout):
  """Each case above, lowered for cuda with the tiles and operands the device script
  compiles it with: a case only the interpreter accepts would fail there and take its
  variant out of the benchmark's sweep (f32 scale slabs of 8 columns once did)."""
  import jax
  x, wq = w4_operands(m, k, n, group, seed=0, scale_dtype=jnp.bfloat16
                      if kernel == "w4a16" and group == 128 else jnp.float32)
  if kernel == "w4a8":
    x = quantize(x.astype(jnp.float32), QuantSpec(bits=8, channel_axes=(0,)))
  fn = K.w4a16_matmul if kernel == "w4a16" else K.w4a8_matmul
  w = wq.transpose() if layout == "nk" else wq
  f = jax.jit(lambda a, b: fn(a, b, out_dtype=jnp.float32, backend="mosaic_gpu",
                              block_sizes=K.HopperW4Tiles(**kw), weight_layout=layout))
  if hangs_compiled(kw):  # refused before lowering, with the registers it would need
    with pytest.raises(ValueError, match=r"4 x 112 \+ 40 = 488, more than the 5 x 96 = 480"):
      f.trace(x, w)
    return
  text = f.trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
  assert f"lowbit_{kernel}_hopper" in text


INT_LOWERING = [c.values if hasattr(c, "values") else c for c in W4A8_INT_CASES] + [
    (256, 8192, 8192, 128, dict(nibbles="split", unpack="ptx", tile_m=128, nk_scales="slab"), "nk")]


@pytest.mark.skipif(ON_GPU, reason="on a GPU the cases above compile for real")
@pytest.mark.parametrize("m,k,n,group,kw,layout", INT_LOWERING,
                         ids=[_int_case_id(c) for c in INT_LOWERING])
def test_int_group_scale_cases_lower_for_cuda(m, k, n, group, kw, layout):
  """The integer-group-scale cases (and the M = 256 shape with slab scales, K = N = 8192),
  lowered for cuda as the device script compiles them (int8 slab columns once failed only
  there: Mosaic GPU's loads need the signedness of an integer type)."""
  x, wq = w4_operands(m, k, n, group, seed=0, group_scales="int")
  xa = quantize(x.astype(jnp.float32), QuantSpec(bits=8, channel_axes=(0,)))
  w = wq.transpose() if layout == "nk" else wq
  f = jax.jit(lambda a, b: K.w4a8_matmul(a, b, backend="mosaic_gpu", weight_layout=layout,
                                         block_sizes=K.HopperW4Tiles(**kw)))
  if hangs_compiled(kw):
    pytest.skip("refused compiled (register_split)")
  text = f.trace(xa, w).lower(lowering_platforms=("cuda",)).as_text()
  assert "lowbit_w4a8_hopper" in text


@pytest.mark.parametrize("nibbles,int_sums", [
    pytest.param("interleaved", "cvt", marks=pytest.mark.slow),
    pytest.param("split", "cvt", marks=pytest.mark.slow),
    ("split", "magic")])  # split + cvt: W4A8's 128-token default, compiled on the GPU
# (interleaved, the first tiles' path, to the slow set on a slow day: 2026-11-28 the suite took
# 10 min in CI; its sums are the same integer products, and the default suite keeps W4A8's
# decode default, split + magic)
def test_w4a8_int32_group_sums_are_exact(nibbles, int_sums):
  """Unit scales: every group's int32 sum (and their f32 total, < 2^24) is the integer
  product itself (split: sums of 16 * codes, times 1/16 exactly)."""
  m, k, n = 9, 512, 128
  rng = np.random.default_rng(8)
  xc, wc = rng.integers(-127, 128, (m, k)), rng.integers(-7, 8, (k, n))
  xa = quantize(jnp.asarray(xc, jnp.float32), QuantSpec(bits=8, channel_axes=(0,)),
                params=QuantParams(jnp.ones((m, 1), jnp.float32)))
  wq = quantize(jnp.asarray(wc, jnp.float32),
                QuantSpec(bits=4, channel_axes=(1,), group_size=64, pack=True),
                params=QuantParams(jnp.ones((k // 64, n), jnp.float32)))
  out = K.w4a8_matmul(xa, wq, out_dtype=jnp.float32, backend=BACKEND,
                      block_sizes=w4_tiles(nibbles=nibbles, int_sums=int_sums))
  np.testing.assert_array_equal(np.asarray(out), (xc @ wc).astype(np.float32))


def test_w4a8_split_magic_int_sums_are_exact_at_the_largest_group_sums():
  """``int_sums="magic"`` at the largest group sums the quantizers make: groups of 128
  codes -7 (split: 16 * -7 each; symmetric int4 is [-7, 7]) against tokens +-127: sums of
  +-1820672 (the bound's 2^22 allows codes -8 too), converted exactly."""
  m, k, n = 3, 512, 128
  xc = np.stack([np.full(k, 127), np.full(k, -127), np.resize([127, -127], k)])
  wc = np.full((k, n), -7)
  xa = quantize(jnp.asarray(xc, jnp.float32), QuantSpec(bits=8, channel_axes=(0,)),
                params=QuantParams(jnp.ones((m, 1), jnp.float32)))
  wq = quantize(jnp.asarray(wc, jnp.float32),
                QuantSpec(bits=4, channel_axes=(1,), group_size=128, pack=True),
                params=QuantParams(jnp.ones((k // 128, n), jnp.float32)))
  assert np.asarray(xa.qvalue).min() == -127 and np.asarray(xa.qvalue).max() == 127
  np.testing.assert_array_equal(np.asarray(dequantize(wq)), wc)
  out = K.w4a8_matmul(xa, wq, out_dtype=jnp.float32, backend=BACKEND,
                      block_sizes=w4_tiles(nibbles="split", int_sums="magic"))
  np.testing.assert_array_equal(np.asarray(out), (xc @ wc).astype(np.float32))


def test_hopper_w4_nk_scales_slab_where_tma_can_take_it():
  """``plan_w4`` with ``nk_scales="slab"``: a grouped "nk" weight's scales as stored,
  ``W`` = the work item's K-steps
  rounded up to 8, unless the slab would pass the array's end or a row of scales is not
  whole 16 bytes; per-channel, "kn" and ``nk_scales="transpose"`` stream rows."""
  T = K.HopperW4Tiles

  def slab(k, group, layout="nk", scale_bytes=4, **kw):
    kw = {"nk_scales": "slab", **kw}
    return mg.plan_w4("t", 1, k, 8192, group, T(tile_n=128, num_sms=132, **kw), act_bytes=1,
                      weight_layout=layout, scale_bytes=scale_bytes).slab

  assert slab(8192, 128) == 8  # 32 K-steps, split 4 over 132 SMs: 8 per work item
  assert slab(8192, 128, split_k=2) == 16 and slab(8192, 128, split_k=8) == 8  # 4 -> 8
  assert slab(8192, 128, layout="kn") == 0 and slab(8192, None) == 0
  assert slab(8192, 128, nk_scales="transpose") == 0
  assert slab(1024, 128, split_k=1) == 8  # 4 steps: W = 8, the whole K/G = 8
  assert slab(512, 128, split_k=1) == 0  # K/G = 4 < 8
  assert slab(1536, 128, split_k=1, scale_bytes=2) == 0  # rows of 12 bf16 = 24 bytes
  assert slab(1536, 128, split_k=1) == 8  # rows of 12 f32 = 48 bytes


def test_warpgroups_splitting_k_share_one_scale_slab():
  """wg_split="k": the warpgroups read the same rows' scales, so the plan holds one slab (not
  one per warpgroup). With 4 warpgroups (interpreted only) the one-kernel decode tiles keep 4
  pipeline stages at M = 1 with bf16 scales, and fit at M = 16 with f32 scales (they did
  not with 4 slabs)."""
  one_kernel = K.HopperW4Tiles(nibbles="split", unpack="ptx_natural", wg_split="k", compute_wgs=4,
                               nk_scales="slab", pad_tokens=False, epilogue="kernel")
  plan4 = functools.partial(mg.plan_w4, "w4a16", weight_layout="nk", interpret=True)
  plan = plan4(1, 8192, 8192, 128, one_kernel, scale_bytes=2)
  assert plan.slab_sets == 1 and plan.stages == 4 and plan.smem_bytes() <= mg.SMEM_BYTES
  assert plan4(16, 8192, 8192, 128, one_kernel, scale_bytes=4).stages == 2
  per_wg = dataclasses.replace(one_kernel, wg_split="n", epilogue="xla")
  assert plan4(1, 8192, 8192, 128, per_wg).slab_sets == 4
  # the 2-warpgroup one-kernel tiles (what a K-major W4A16 decode call takes on Hopper)
  two = dataclasses.replace(one_kernel, compute_wgs=2)
  plan = mg.plan_w4("w4a16", 1, 8192, 8192, 128, two, weight_layout="nk", scale_bytes=2)
  assert plan.slab_sets == 1 and plan.substeps == 2 and plan.smem_bytes() <= mg.SMEM_BYTES


def test_register_split_mirrors_jax_pipeline_and_refuses_what_would_hang():
  """``register_split`` reproduces the registers jax's warp-specialized pipeline asks for
  (its private ``_compute_registers``, where this jax has it) and ptxas' launch count;
  4 compute warpgroups ask for more than a 640-thread CTA holds, which hung the H200 (run
  8), so compiled tiles with them are refused before anything is lowered, interpreted
  ones are not."""
  from jax._src.pallas.mosaic_gpu import pipeline
  for wgs in (2, 3, 4):
    split = mg.register_split(wgs)
    if hasattr(pipeline, "_compute_registers"):
      assert split["compute"] == pipeline._compute_registers(mg.MEMORY_REGISTERS, wgs)
    assert split["fits"] == (wgs != 4)
  assert mg.register_split(2)["launch"] == 168  # 384 threads: what ptxas reported (SASS)
  assert mg.register_split(4)["launch"] == 96  # 640 threads
  tiles4 = K.HopperW4Tiles(compute_wgs=4)
  with pytest.raises(ValueError, match=r"compute_wgs=4\) hangs on a GPU.*Use compute_wgs=2 or 3"):
    mg.plan_w4("w4a16", 1, 8192, 8192, 128, tiles4, weight_layout="nk")
  assert mg.plan_w4("w4a16", 1, 8192, 8192, 128, tiles4, weight_layout="nk", interpret=True)
  mg.plan_w4("w4a16", 1, 8192, 3072, 128, K.HopperW4Tiles(compute_wgs=3),
             weight_layout="nk")  # 3 x 152 + 40 = 496 <= 4 x 128: compiles


def test_w4a16_errors_name_the_problem():
  x, wq = w4_operands(4, 512, 256, 128, seed=5)
  with pytest.raises(ValueError, match="Cast x to bfloat16"):
    K.w4a16_matmul(x.astype(jnp.float32), wq, backend=BACKEND, block_sizes=w4_tiles())
  with pytest.raises(ValueError, match="tile_k=512 must be 2 \\* group_size = 256"):
    K.w4a16_matmul(x, wq, backend=BACKEND, block_sizes=w4_tiles(tile_k=512))
  with pytest.raises(ValueError, match="N=192 is not a multiple of the CTA's 256"):
    xs, w192 = w4_operands(4, 512, 192, 128, seed=6)
    K.w4a16_matmul(xs, w192, backend=BACKEND, block_sizes=w4_tiles(tile_n=128))
  with pytest.raises(ValueError, match="split_k=3 does not divide the 2 K-steps"):
    K.w4a16_matmul(x, wq, backend=BACKEND, block_sizes=w4_tiles(split_k=3))
  with pytest.raises(ValueError, match="more than Hopper's"):
    K.w4a16_matmul(jnp.zeros((256, 512), jnp.bfloat16), wq, backend=BACKEND,
                   block_sizes=w4_tiles(tile_m=256, max_concurrent_steps=4))
  x2, w256 = w4_operands(4, 1024, 256, 256, seed=7)
  with pytest.raises(ValueError, match="groups of 32, 64 or 128"):
    K.w4a16_matmul(x2, w256, backend=BACKEND, block_sizes=w4_tiles())
  with pytest.raises(ValueError, match="HopperW4Tiles are the tiles of backend='mosaic_gpu'"):
    K.w4a16_matmul(x, wq, backend="interpret", block_sizes=K.HopperW4Tiles())
  with pytest.raises(ValueError, match="use 64 or 128"):
    K.HopperW4Tiles(tile_n=32)
  with pytest.raises(ValueError, match="a multiple of 8, at most 256"):
    K.HopperW4Tiles(tile_m=12)
  with pytest.raises(ValueError, match="compute_wgs \\* tile_n divides N"):
    K.w4a16_matmul(xs, w192, backend=BACKEND, block_sizes=w4_tiles(compute_wgs=4))
  with pytest.raises(ValueError, match="row of 512 group scales per K-step, more than TMA"):
    x5, w512 = w4_operands(4, 512, 512, 128, seed=9)
    K.w4a16_matmul(x5, w512, backend=BACKEND, block_sizes=w4_tiles(compute_wgs=4, tile_n=128))
  # wg_split="k" and epilogue="kernel": what they take, and the fix when they cannot
  with pytest.raises(ValueError, match="for split nibbles only: pass nibbles='split'"):
    K.HopperW4Tiles(wg_split="k")
  with pytest.raises(ValueError, match="wg_split='steps'.*pass nibbles='split'"):
    K.HopperW4Tiles(wg_split="steps")
  with pytest.raises(ValueError, match="use 'n', 'k' or 'steps'"):
    K.HopperW4Tiles(nibbles="split", wg_split="m")
  with pytest.raises(ValueError, match="K-steps .* to be a multiple of compute_wgs=4"):
    K.w4a16_matmul(x, wq, backend=BACKEND,  # K = 512, group 128: 2 K-steps
                   block_sizes=w4_tiles(nibbles="split", wg_split="k", compute_wgs=4))
  with pytest.raises(ValueError, match="N=192 is not a multiple of the CTA's 128 .* tile_n divides"):
    K.w4a16_matmul(xs, w192, backend=BACKEND,
                   block_sizes=w4_tiles(nibbles="split", wg_split="k", tile_n=128))
  final = functools.partial(w4_tiles, nibbles="split", epilogue="kernel")
  xp, wp = w4_operands(4, 512, 256, None, seed=8)
  for args, tiles, why in (((xp, wp), final(), "group_size=None"),
                           ((x, wq), final(split_k=2), "split_k=2")):
    with pytest.raises(ValueError, match=f"epilogue='kernel'.*{why}.*use epilogue='xla'"):
      K.w4a16_matmul(*args, backend=BACKEND, block_sizes=tiles)
  xa = quantize(xp.astype(jnp.float32), QuantSpec(bits=8, channel_axes=(0,)))
  with pytest.raises(ValueError, match="epilogue='kernel'.*group_size=None"):
    K.w4a8_matmul(xa, wp, backend=BACKEND, block_sizes=final())
  with pytest.raises(ValueError, match="use 2, 3 or 4"):
    K.HopperW4Tiles(compute_wgs=1)
  with pytest.raises(ValueError, match="use 'split' or 'interleaved'"):
    K.HopperW4Tiles(nibbles="packed")
  with pytest.raises(ValueError, match="pass nibbles='split' and wide_load=True"):
    K.HopperW4Tiles(unpack="ptx")
  with pytest.raises(ValueError, match="use 'slab' or 'transpose'"):
    K.HopperW4Tiles(nk_scales="rows")
  with pytest.raises(ValueError, match="use 'cvt' or 'magic'"):
    K.HopperW4Tiles(int_sums="round")
  with pytest.raises(ValueError, match="use 'together' or 'apart'"):
    K.HopperW4Tiles(halves="split")
  with pytest.raises(ValueError, match="halves='apart'.*per-channel weights.*use halves='together'"):
    K.w4a16_matmul(xp, wp, backend=BACKEND, block_sizes=w4_tiles(halves="apart"))
  # mma="sync": bf16 codes of unpack="ptx_natural", bf16 tokens, token tiles <= 32,
  # K-steps of whole 128-byte swizzle rows
  with pytest.raises(ValueError, match="use 'wgmma' or 'sync'"):
    K.HopperW4Tiles(mma="hmma")
  with pytest.raises(ValueError, match="mma='sync'.*pass nibbles='split', unpack='ptx_natural'"):
    K.HopperW4Tiles(nibbles="split", unpack="ptx", mma="sync")
  sync = functools.partial(w4_tiles, nibbles="split", unpack="ptx_natural", mma="sync")
  with pytest.raises(ValueError, match="mma='sync'.*got int8 tokens"):
    K.w4a8_matmul(xa, wq, backend=BACKEND, block_sizes=sync())
  with pytest.raises(ValueError, match="mma='sync'.*tile_m=64.*Use mma='wgmma'"):
    K.w4a16_matmul(jnp.zeros((64, 512), jnp.bfloat16), wq, backend=BACKEND, block_sizes=sync())
  x32, w32 = w4_operands(4, 512, 256, 32, seed=10)
  with pytest.raises(ValueError, match="mma='sync'.*tile_k=64"):
    K.w4a16_matmul(x32, w32, backend=BACKEND, block_sizes=sync())
  # offset="folded": the token sums come from the warp MMAs' fragments, per group
  with pytest.raises(ValueError, match="offset='nope': use 'fma' or 'folded'"):
    K.HopperW4Tiles(offset="nope")
  with pytest.raises(ValueError, match="offset='folded'.*pass mma='sync'.*got mma='wgmma'"):
    K.HopperW4Tiles(nibbles="split", unpack="ptx_natural", offset="folded")
  with pytest.raises(ValueError, match="offset='folded'.*halves='apart'"):
    K.HopperW4Tiles(nibbles="split", unpack="ptx_natural", mma="sync", offset="folded",
                    halves="apart")
  xp8, wp8 = w4_operands(4, 512, 256, None, seed=12)
  with pytest.raises(ValueError, match="offset='folded'.*needs group scales.*offset='fma'"):
    K.w4a16_matmul(xp8, wp8, backend=BACKEND, block_sizes=sync(offset="folded"))
  with pytest.raises(ValueError, match="folded=True.*pass natural=True"):
    mg.split_int4_ptx(jnp.zeros((64, 64), jnp.int8), jnp.bfloat16, folded=True)
  # pingpong: turns at wgmma, within pipeline steps that every warpgroup takes
  with pytest.raises(ValueError, match="pingpong=1: use True or False"):
    K.HopperW4Tiles(pingpong=1)
  with pytest.raises(ValueError, match="pingpong=True.*use mma='wgmma' \\(got 'sync'\\)"):
    K.HopperW4Tiles(nibbles="split", unpack="ptx_natural", mma="sync", pingpong=True)
  with pytest.raises(ValueError, match="pingpong=True.*wg_split 'n' or 'k' \\(got 'steps'\\)"):
    K.HopperW4Tiles(nibbles="split", wg_split="steps", pingpong=True)


# --- Default dispatch: the Mosaic GPU kernels where the GPU runs put them ahead


def test_auto_tiles_follow_the_measured_table(monkeypatch):
  from lowbit.kernels import _mosaic_gpu
  auto = _mosaic_gpu.auto_tiles
  monkeypatch.setattr(_mosaic_gpu, "is_hopper", lambda: False)
  assert auto("w8a8", 8192, 8192, 8192, None, "kn") is None  # not a Hopper GPU: Triton
  monkeypatch.setattr(_mosaic_gpu, "is_hopper", lambda: True)
  assert auto("w8a8", 8192, 8192, 8192, None, "kn") == HopperTiles()
  assert auto("w8a8", 2048, 4096, 14336, None, "nk") == HopperTiles()
  assert auto("w8a8", 256, 8192, 8192, None, "nk") is None  # Triton's K-major tiles win
  assert auto("w8a8", 8192, 8192, 8000, None, "kn") is None  # N not a multiple of 256
  # runs 9-10's fastest: W4A8 and W4A16 decode as one kernel, 64-token tiles for W4A16 at
  # 64-128 tokens, 128-token tiles past them (W4A8 from 65: slab scales, halves apart past 256)
  P = functools.partial(K.HopperW4Tiles, nibbles="split", unpack="ptx")
  NAT = functools.partial(K.HopperW4Tiles, nibbles="split", unpack="ptx_natural")
  w4a8_decode = P(wg_split="k", nk_scales="slab", int_sums="magic", pad_tokens=False,
                  epilogue="kernel")
  one_kernel = NAT(wg_split="k", nk_scales="slab", pad_tokens=False, epilogue="kernel",
                   mma="sync", max_concurrent_steps=6)
  assert auto("w4a8", 1, 8192, 8192, 128, "nk") == w4a8_decode
  assert auto("w4a8", 64, 4096, 14336, 128, "nk") == w4a8_decode
  assert auto("w4a8", 65, 8192, 8192, 128, "nk") == P(tile_m=128, nk_scales="slab")
  assert auto("w4a8", 256, 14336, 4096, 128, "nk") == P(tile_m=128, nk_scales="slab")
  assert auto("w4a8", 257, 8192, 8192, 128, "nk") == P(tile_m=128, halves="apart")
  assert auto("w4a8", 4096, 8192, 8192, 128, "nk") == P(tile_m=128, halves="apart")
  assert auto("w4a8", 16, 8192, 8192, 128, "kn") is None  # would transpose per call
  assert auto("w4a8", 16, 8192, 8192, 256, "nk") is None  # group 256: the kernel cannot
  assert auto("w4a16", 1, 8192, 8192, 128, "nk") == one_kernel
  assert auto("w4a16", 16, 4096, 14336, 128, "nk") == one_kernel
  # 6 stages beside K = 14336's slab of scales exceed shared memory: the default depth
  assert auto("w4a16", 16, 14336, 4096, 128, "nk") == dataclasses.replace(
      one_kernel, max_concurrent_steps=None)
  assert auto("w4a16", 17, 8192, 8192, 128, "nk") is None  # not yet compared: Triton
  assert auto("w4a16", 63, 8192, 8192, 128, "nk") is None
  assert auto("w4a16", 64, 8192, 8192, 128, "nk") == NAT(tile_m=64, epilogue="kernel")
  assert auto("w4a16", 128, 4096, 14336, 128, "nk") == NAT(tile_m=64, epilogue="kernel")
  assert auto("w4a16", 129, 8192, 8192, 128, "nk") == NAT(tile_m=128, halves="apart",
                                                           epilogue="kernel")
  assert auto("w4a16", 8192, 4096, 14336, 128, "nk") == NAT(tile_m=128, halves="apart",
                                                            epilogue="kernel")
  assert auto("w4a16", 1, 8192, 8192, 128, "kn") is None
  assert auto("w4a16", 1, 8192, 8192, None, "nk") is None  # per-channel: no kernel epilogue
  assert auto("w4a16", 1, 8448, 8192, 128, "nk") is None  # 33 K-steps: 2 warpgroups cannot
  # every default's tiles, as they are, among the cases compiled on a GPU
  for kernel, cases in (("w4a16", W4_CASES), ("w4a8", W4A8_CASES)):
    for *_, tiles in _mosaic_gpu.AUTO[kernel]:
      assert any(K.HopperW4Tiles(**c[4]) == tiles for c in cases), (kernel, tiles)


def test_wrappers_take_the_auto_tiles_only_without_backend_or_tiles(monkeypatch):
  from lowbit.kernels import _mosaic_gpu
  calls = []

  def spy(x, wq, ws, group, *, tiles, interpret, name, kernel_name, weight_layout, **kw):
    calls.append(tiles)
    assert weight_layout == "nk"
    return jnp.zeros((x.shape[0], wq.shape[1]), jnp.float32)
  monkeypatch.setattr(_mosaic_gpu, "w4_matmul", spy)
  monkeypatch.setattr(_mosaic_gpu, "is_hopper", lambda: True)
  x, wq = w4_operands(7, 768, 256, 64, seed=11)  # shapes of this test only: fresh traces
  xa = quantize(x.astype(jnp.float32), QuantSpec(bits=8, channel_axes=(0,)))
  K.w4a8_matmul(xa, wq.transpose(), weight_layout="nk")
  w4a8_tiles = _mosaic_gpu.AUTO["w4a8"][0][3]
  assert calls == [w4a8_tiles]
  out = K.w4a8_matmul(xa, wq.transpose(), weight_layout="nk", backend="interpret")
  assert calls == [w4a8_tiles]  # a named backend is kept
  ref = K.w4a8.reference(xa, wq, out_dtype=jnp.float32)
  assert rel(out, np.asarray(ref, np.float64)) < 1e-2
  # W4A16: bf16 tokens take the one-kernel tiles; f32 tokens stay off the bf16-only kernel
  K.w4a16_matmul(x.astype(jnp.bfloat16), wq.transpose(), weight_layout="nk")
  assert calls == [w4a8_tiles, _mosaic_gpu.AUTO["w4a16"][0][3]]
  out = K.w4a16_matmul(x.astype(jnp.float32), wq.transpose(), weight_layout="nk")
  assert len(calls) == 2 and out.dtype == jnp.float32
  ref = K.w4a16.reference(x.astype(jnp.float32), wq, out_dtype=jnp.float32)
  assert rel(out, np.asarray(ref, np.float64)) < 1e-5


def test_profile_summary_of_a_trace():
  """experiments/profile_w4.py's reading of Mosaic GPU's profiler trace (the profiled
  kernel runs only on a GPU): nested regions per warpgroup, medians, shares of the span."""
  import importlib.util
  import pathlib
  path = pathlib.Path(__file__).parents[2] / "experiments" / "profile_w4.py"
  spec = importlib.util.spec_from_file_location("profile_w4", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)

  def region(name, t0, t1, tid):
    return [dict(name=name, ph="B", ts=t0, pid=1, tid=tid),
            dict(name=name, ph="E", ts=t1, pid=1, tid=tid)]
  ev = []
  for tid, base in ((1, 0.0), (2, 100.0)):  # two warpgroups, two steps each
    for step in range(2):
      t = base + 10.0 * step
      ev += region("unpack", t, t + 4.0, tid) + region("mma", t + 4.0, t + 7.0, tid)
  ev.append(dict(name="unpack", ph="B", ts=5.0, pid=1, tid=3))  # nested regions
  ev += region("mma", 6.0, 7.0, 3)
  ev.append(dict(name="unpack", ph="E", ts=9.0, pid=1, tid=3))
  s = mod.summarize({"traceEvents": ev})
  assert s["warpgroups"] == 3 and s["median_span_us"] == 17.0
  assert s["regions"]["unpack"]["count"] == 5 and s["regions"]["unpack"]["median_us"] == 4.0
  assert s["regions"]["mma"]["total_us"] == 13.0
  assert abs(s["regions"]["unpack"]["share"] - 20.0 / 38.0) < 1e-12
  with pytest.raises(ValueError, match="unbalanced"):
    mod.summarize({"traceEvents": region("mma", 0.0, 1.0, 1)[:1]})


# --- unpack="ptx": the registers' K order, checked against Mosaic GPU's own layouts


def _positions(layout, shape):
  """``[tiled shape]`` array of the logical (row-major) positions that ``layout``'s
  tiling gives each tiled index, built from the layout's own tiles."""
  pos = np.arange(np.prod(shape)).reshape(shape)
  for tile in layout.tiling.tiles:
    lead, n = pos.shape[:-len(tile)], len(tile)
    pos = pos.reshape(lead + sum(((d // t, t) for d, t in zip(pos.shape[-n:], tile, strict=True)), ()))
    k = len(lead)
    pos = pos.transpose(list(range(k)) + [k + 2 * i for i in range(n)] + [k + 2 * i + 1 for i in range(n)])
  assert pos.shape == tuple(layout.tiling.tile_shape(shape))
  return pos


def _thread_registers(layout, shape):
  """``{(warp, lanes...): {register index: logical positions of its vector}}``."""
  pos = _positions(layout, shape)
  nd = pos.ndim
  warp, lanes = [d % nd for d in layout.warp_dims], [d % nd for d in layout.lane_dims]
  vec = layout.vector_dim % nd
  out = {}
  for full in np.ndindex(pos.shape):
    if full[vec]:
      continue
    thread = (tuple(full[d] for d in warp), tuple(full[d] for d in lanes))
    reg = tuple(0 if d in (*warp, *lanes, vec) else v for d, v in enumerate(full))
    out.setdefault(thread, {})[reg] = [pos[full[:vec] + (v,) + full[vec + 1:]] for v in range(pos.shape[vec])]
  return out


def test_hopper_w4_split_register_order_matches_the_token_reorder():
  """Each thread's 4 bytes of a ``WGMMA_LAYOUT_8BIT`` register, split into two bf16 pairs
  placed at :func:`bf16_register_index` of ``WGMMA_LAYOUT``, put code ``16 b + sigma(j)``
  in wgmma's column ``16 b + j``: sigma is :func:`fragment_order`, the tokens' reorder."""
  from jax.experimental.mosaic.gpu import fragmented_array as fa
  rows, cols = 128, 64
  src = _thread_registers(fa.WGMMA_LAYOUT_8BIT, (rows, cols))
  dst = _thread_registers(fa.WGMMA_LAYOUT, (rows, cols))
  assert src.keys() == dst.keys() and len(src) == 128  # the same 128 threads
  sigma = np.asarray(mg.fragment_order(cols))
  assert sorted(sigma[:16]) == list(range(16)) and sigma[16] == 16  # a permutation per block
  seen = 0
  for thread, regs in src.items():
    for idx, byte_pos in regs.items():
      assert len(byte_pos) == 4
      for pair in (0, 1):
        col_pos = dst[thread][mg.bf16_register_index(idx, pair)]
        for p_byte, p_col in zip(byte_pos[2 * pair:2 * pair + 2], col_pos, strict=True):
          assert p_byte // cols == p_col // cols  # same weight row
          assert sigma[p_col % cols] == p_byte % cols  # column j holds code sigma(j)
          seen += 1
  assert seen == rows * cols  # every code placed once
  x = np.arange(3 * 64).reshape(3, 64)
  np.testing.assert_array_equal(np.asarray(mg.reorder_tokens(jnp.asarray(x))), x[:, sigma])


def test_hopper_w4_split_variant_table_of_the_report():
  """experiments/kernels_report.py: per variant field and value other than the default, the
  best correct candidate with that value against the best with any other value (fields a
  repr leaves out are the defaults; other tiles and wrong outputs are ignored)."""
  import importlib.util
  import pathlib
  path = pathlib.Path(__file__).parents[2] / "experiments" / "kernels_report.py"
  spec = importlib.util.spec_from_file_location("kernels_report", path)
  kr = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(kr)
  T = K.HopperW4Tiles
  cands = [(T(), 20.0, True), (T(nibbles="split"), 22.0, True),
           (T(nibbles="split", unpack="ptx"), 16.0, True),
           (T(nibbles="split", unpack="ptx", nk_scales="slab"), 8.0, False),  # wrong output
           (T(nibbles="split", unpack="ptx", int_sums="magic"), 15.0, True),
           (T(nibbles="split", unpack="ptx", compute_wgs=4), 12.0, True)]
  sweeps = [dict(m=1, kernel="w4a8", block_sizes=repr(t), us=us, correct=ok) for t, us, ok in cands]
  sweeps.append(dict(m=1, kernel="w4a8", block_sizes="BlockSizes(bm=16)", us=1.0, correct=True))
  rows = {r.split("|")[3].strip(): r for r in kr._w4_variants(sweeps)[2:]}
  assert set(rows) == {"nibbles='split'", "unpack='ptx'", "int_sums='magic'",
                       "compute_wgs='4'"}  # no slab: its one candidate is wrong
  assert "| 20.0 | 12.0 | 1.67 |" in rows["nibbles='split'"]
  assert "| 20.0 | 12.0 | 1.67 |" in rows["unpack='ptx'"]  # default "ops": T() at 20.0
  assert "| 12.0 | 15.0 | 0.80 |" in rows["int_sums='magic'"]  # a variant can lose
  assert "| 15.0 | 12.0 | 1.25 |" in rows["compute_wgs='4'"]
  # the decode levers of the next sweep each get their row, a third value its own
  d = dict(nibbles="split", unpack="ptx_natural", wg_split="k", nk_scales="slab",
           pad_tokens=False, epilogue="kernel")
  cands = [(T(**d), 14.0), (T(**d, mma="sync"), 11.0), (T(**d, steps_per_wait=2), 15.0),
           (T(**{**d, "wg_split": "steps"}, compute_wgs=3), 12.0), (T(**d, halves="apart"), 16.0),
           (T(**d, pingpong=True), 13.0)]
  sweeps = [dict(m=1, kernel="w4a16", block_sizes=repr(t), us=us) for t, us in cands]
  rows = {r.split("|")[3].strip(): r for r in kr._w4_variants(sweeps)[2:]}
  assert "| 12.0 | 11.0 | 1.09 |" in rows["mma='sync'"]
  assert "| 11.0 | 15.0 | 0.73 |" in rows["steps_per_wait='2'"]
  assert "| 11.0 | 12.0 | 0.92 |" in rows["wg_split='steps'"]  # against "k" at 11.0
  assert "| 12.0 | 11.0 | 1.09 |" in rows["wg_split='k'"]  # against "steps": no "n" here
  assert "| 11.0 | 12.0 | 0.92 |" in rows["compute_wgs='3'"]
  assert "| 11.0 | 16.0 | 0.69 |" in rows["halves='apart'"]
  assert "| 11.0 | 13.0 | 0.85 |" in rows["pingpong='True'"]  # turns: their own row too
  # token tiles and pipeline depth (W4A8 at M = 256), each value against the others
  P = functools.partial(T, nibbles="split", unpack="ptx")
  cands = [(P(tile_m=128), 40.0), (P(tile_m=64), 50.0), (P(tile_m=128, max_concurrent_steps=3), 38.0)]
  sweeps = [dict(m=256, kernel="w4a8", block_sizes=repr(t), us=us) for t, us in cands]
  rows = {r.split("|")[3].strip(): r for r in kr._w4_variants(sweeps)[2:]}
  assert "| 38.0 | 50.0 | 0.76 |" in rows["tile_m='64'"]
  assert "| 50.0 | 38.0 | 1.32 |" in rows["tile_m='128'"]
  assert "| 40.0 | 38.0 | 1.05 |" in rows["max_concurrent_steps='3'"]


def test_report_sets_the_sweeps_best_mosaic_tiles_against_the_default_dispatch():
  """kernels_report's AUTO check: per point the best correct Mosaic GPU candidate (Triton
  tiles and wrong outputs left out) against the ``*_auto_nk`` row of the same run."""
  import importlib.util
  import pathlib
  path = pathlib.Path(__file__).parents[2] / "experiments" / "kernels_report.py"
  spec = importlib.util.spec_from_file_location("kernels_report", path)
  kr = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(kr)
  T = K.HopperW4Tiles
  pt = dict(m=4096, k=8192, n=8192, kernel="w4a16")
  sweeps = [dict(pt, block_sizes=repr(T(tile_m=128)), us=600.0),
            dict(pt, block_sizes=repr(T(tile_m=64)), us=500.0, correct=False),
            dict(pt, block_sizes="BlockSizes(bm=128)", us=100.0),
            dict(pt, m=1, block_sizes=repr(T()), us=20.0)]  # no auto row at M = 1: no line
  rows = [dict(m=4096, k=8192, n=8192, impl="lowbit_w4a16_auto_nk", us=1500.0)]
  table = kr._auto_check(rows, sweeps)
  assert len(table) == 3 and "| 4096 | 8192 | 8192 | w4a16 | 1500.0 | 600.0 | 2.50 |" in table[2]
  assert "tile_m=128" in table[2]
  assert kr._auto_check([], sweeps) == []


def test_report_orders_runs_by_number_and_keeps_the_sweeps_tables(tmp_path):
  """kernels_report.render: run 11 is newer than run 9 (numbers compared as numbers, not
  as text), all rows for the newest run alone, and the sweep tables for the newest two
  runs that swept even when the newest only timed the defaults."""
  import importlib.util
  import json
  import pathlib
  path = pathlib.Path(__file__).parents[2] / "experiments" / "kernels_report.py"
  spec = importlib.util.spec_from_file_location("kernels_report", path)
  kr = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(kr)
  meta = dict(device="H200", jax="0.11.2", date="2026-11-28", copy_bandwidth_GBps=4300.0,
              reps=10, timer="cupti", per_op_floor_us=18.0)
  row = dict(m=1, k=8192, n=8192, impl="xla_bf16_dot", us=34.0, us_wall=60.0,
             speedup_vs_bf16=1.0, GBps=3900.0, TOPs=4.0)
  sweep = [dict(m=1, k=8192, n=8192, kernel="w4a16", block_sizes=repr(K.HopperW4Tiles()),
                us=14.0, speedup_vs_bf16=2.4)]
  paths = []
  for run, sweeps in (("run8", sweep), ("run9", sweep), ("run10", sweep), ("run11", [])):
    p = tmp_path / f"2026-11-28-h200-{run}.json"
    p.write_text(json.dumps(dict(meta=meta, rows=[row], sweeps=sweeps)))
    paths.append(str(p))
  text = kr.render(paths)
  heads = [ln.split(".json")[0].split("-")[-1] for ln in text.splitlines() if ln.startswith("### ")]
  assert heads == ["run11", "run10", "run9", "run8"]
  sections = text.split("### ")[1:]
  assert ["All rows" in s for s in sections] == [True, False, False, False]
  assert ["Best correct BlockSizes" in s for s in sections] == [False, True, True, False]
