"""Lower each kernel for the platforms it targets, on the CPU machine.

Interpret mode accepts things the real lowerings reject (unsigned or mixed
dots, int8 shifts, slicing Triton cannot express), so a kernel must also lower
through Pallas' Triton backend for cuda and its Mosaic backend for tpu. This
checks Pallas' lowering (kernel -> Triton IR / Mosaic MLIR); the Triton
compiler itself runs only on a GPU (the device script runs the kernels there).
"""

import functools

import jax
import jax.numpy as jnp
import pytest
from lowbit.kernels import BlockSizes

from lowbit import kernels as K
from lowbit.quant import QuantSpec, quantize

M, KD, N = 5, 1024, 512  # M = 5: the last M block is masked


def operands():
  x = jnp.ones((M, KD), jnp.float32)
  w = jnp.ones((KD, N), jnp.float32)
  xq = quantize(x, QuantSpec(bits=8, channel_axes=(0,)))
  w8 = quantize(w, QuantSpec(bits=8, channel_axes=(1,)))
  w4 = quantize(w, QuantSpec(bits=4, channel_axes=(1,), pack=True))
  w4g = quantize(w, QuantSpec(bits=4, channel_axes=(1,), group_size=128, pack=True,
                              scale_dtype=jnp.bfloat16))
  xb = x.astype(jnp.bfloat16)
  return {
      "w8a8": (K.w8a8_matmul, xq, w8),
      "w4a8": (K.w4a8_matmul, xq, w4),
      "w4a8-g128": (K.w4a8_matmul, xq, w4g),
      "w4a16": (K.w4a16_matmul, xb, w4),
      "w4a16-g128": (K.w4a16_matmul, xb, w4g),
  }


#: The device each platform's lowering targets here: Pallas asks the device's kind (Triton
#: for its compute capability from jax 0.11, Mosaic TPU for the chip generation), and a CPU
#: machine has none, so the lowering runs under an abstract mesh of one such device.
TARGETS = {"cuda": dict(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu"),
           "tpu": dict(device_kind="TPU v5 lite", num_cores=1, platform="tpu")}


def on_target(platform: str, device_kind: str | None = None):
  """A context in which lowering for ``platform`` sees the device of ``TARGETS`` (or one
  of ``device_kind``)."""
  from jax.sharding import AbstractDevice, AbstractMesh
  target = TARGETS[platform] | ({"device_kind": device_kind} if device_kind else {})
  device = AbstractDevice(**target)
  return jax.sharding.use_abstract_mesh(AbstractMesh((1,), ("x",), abstract_device=device))


def lower(fn, a, b, backend, platform, bs, device_kind=None, **kw):
  f = jax.jit(lambda a, b: fn(a, b, backend=backend, block_sizes=bs, **kw))
  with on_target(platform, device_kind):
    return f.trace(a, b).lower(lowering_platforms=(platform,)).as_text()


GPU_BLOCKS = {
    "default": None,
    "64x128x64": BlockSizes(bm=64, bn=128, bk=64),
    "splitk4": BlockSizes(bm=16, bn=64, bk=128, split_k=4),
    "wx-splitk2": BlockSizes(bm=16, bn=64, bk=128, split_k=2, orient="wx"),
    "kmajor": BlockSizes(bm=64, bn=128, bk=64, k_major=True),
    "wx-kmajor": BlockSizes(bm=64, bn=128, bk=64, orient="wx", k_major=True),
    "shift-unpack": BlockSizes(bm=64, bn=128, bk=64, fast_unpack=False),
}


@pytest.mark.parametrize("bs", list(GPU_BLOCKS.values()), ids=list(GPU_BLOCKS))
@pytest.mark.parametrize("name", list(operands()))
def test_lowers_for_cuda_through_triton(name, bs):
  fn, a, b = operands()[name]
  txt = lower(fn, a, b, "gpu", "cuda", bs)
  kernel = "lowbit_" + name.split("-")[0]
  assert kernel in txt
  assert "__gpu$xla.gpu.triton" in txt or "triton_kernel_call" in txt


@pytest.mark.parametrize("chip", ["TPU v4", "TPU v5 lite", "TPU v6 lite"])
@pytest.mark.parametrize("name", list(operands()))
def test_lowers_for_tpu_through_mosaic(name, chip):
  fn, a, b = operands()[name]
  # Mosaic asks the TPU generation before lowering the packed-int4 kernels (unsigned loads
  # and int32 shifts): the abstract device of on_target answers it
  txt = lower(fn, a, b, "tpu", "tpu", BlockSizes(bm=16, bn=256, bk=128), device_kind=chip)
  assert "tpu_custom_call" in txt


HOPPER_TILES = {
    "default": None,
    "wg-m-snake-m": K.HopperTiles(tile_m=64, tile_n=128, wg_dim="m", grid_minor="m", num_sms=16),
}


@pytest.mark.parametrize("layout", ["kn", "nk"])
@pytest.mark.parametrize("tiles", list(HOPPER_TILES.values()), ids=list(HOPPER_TILES))
def test_w8a8_lowers_for_cuda_through_mosaic_gpu(tiles, layout):
  """The Hopper kernel, with the K-major weight view that only the hardware path takes;
  Mosaic GPU's layout inference and lowering run here (the cubin is built on the GPU)."""
  _, xq, w8 = operands()["w8a8"]
  w = w8.transpose() if layout == "nk" else w8
  txt = lower(K.w8a8_matmul, xq, w, "mosaic_gpu", "cuda", tiles, weight_layout=layout)
  assert "lowbit_w8a8_hopper" in txt and "mosaic_gpu" in txt


HOPPER_W4_TILES = {
    "default": None,  # tile_m 8 (M = 5), split over K
    "n128-m16-split2-byteload": K.HopperW4Tiles(tile_n=128, tile_m=16, split_k=2, num_sms=16,
                                                wide_load=False),
    "split": K.HopperW4Tiles(nibbles="split"),
    "split-n128-byteload": K.HopperW4Tiles(nibbles="split", tile_n=128, tile_m=16, split_k=2,
                                           num_sms=16, wide_load=False),
    # (compute_wgs=4 is refused compiled: its registers overrun the CTA's, it hung run 8)
    "split-ptx-slab": K.HopperW4Tiles(nibbles="split", unpack="ptx", nk_scales="slab"),
    "split-natural-unpadded": K.HopperW4Tiles(nibbles="split", unpack="ptx_natural",
                                              pad_tokens=False),
    "split-ksplit": K.HopperW4Tiles(nibbles="split", wg_split="k"),  # warpgroups split K
    "split-ksplit-slab": K.HopperW4Tiles(nibbles="split", wg_split="k", nk_scales="slab"),
    "scale-slab": K.HopperW4Tiles(nk_scales="slab"),  # grouped: the scales as stored
    "split-unpadded": K.HopperW4Tiles(nibbles="split", pad_tokens=False),  # M = 5 < 8
}


@pytest.mark.parametrize("name", ["w4a16", "w4a16-g128", "w4a8", "w4a8-g128"])
@pytest.mark.parametrize("tiles", list(HOPPER_W4_TILES.values()), ids=list(HOPPER_W4_TILES))
def test_int4_kernels_lower_for_cuda_through_mosaic_gpu(tiles, name):
  """The Hopper int4 kernel with its hardware operands (int4 codes converted in
  registers as wgmma's A operand, the transposed token tile as B), bf16 and int8 tokens,
  per-channel and grouped."""
  fn, x, w4 = operands()[name]
  txt = lower(fn, x, w4.transpose(), "mosaic_gpu", "cuda", tiles, weight_layout="nk")
  assert f"lowbit_{name.split('-')[0]}_hopper" in txt and "mosaic_gpu" in txt



def _call_ops(tiles, name: str = "w4a16-g128") -> tuple[list[str], list[str]]:
  """The jax primitives of a Mosaic GPU W4A16 (or W4A8) call (grouped weight stored
  K-major, M = 5) applied to the tokens (W4A8: their codes and scales) before the kernel,
  and those after it, reshapes aside: the XLA ops a call runs besides its kernel (the
  weight's transposes cancel: it is stored K-major, and the kernel reads it so)."""
  import jax.extend.core as jex_core
  fn, x, w4 = operands()[name]
  closed = jax.make_jaxpr(lambda a, b: fn(a, b, backend="mosaic_gpu", block_sizes=tiles,
                                          weight_layout="nk"))(x, w4.transpose())
  [call] = closed.jaxpr.eqns  # the public wrapper is jitted
  inner = call.params["jaxpr"].jaxpr
  n_x = len(jax.tree.leaves(x))  # the tokens' leaves come first
  seen, before, after, kernel_seen = set(inner.invars[:n_x]), [], [], False
  for eqn in inner.eqns:
    if not any(v in seen for v in eqn.invars if not isinstance(v, jex_core.Literal)):
      continue
    name = eqn.primitive.name
    seen.update(eqn.outvars)
    if name not in ("jit", "pjit") and any(isinstance(p, jex_core.ClosedJaxpr)
                                           for p in eqn.params.values()):
      kernel_seen = True  # the kernel: it takes the tokens' last value
      continue
    inner_ops = ([e.primitive.name for e in eqn.params["jaxpr"].jaxpr.eqns]
                 if name in ("jit", "pjit") else [name])  # jnp.pad is a jit of its own
    (after if kernel_seen else before).extend(o for o in inner_ops if o != "reshape")
  return before, after


def test_ptx_natural_takes_the_tokens_as_they_are():
  """``unpack="ptx_natural"`` with ``pad_tokens=False``: no XLA op on the tokens before
  the kernel (a reshape is free); ``"ptx"`` reorders them (a transpose), and padded
  tokens take a pad."""
  T = functools.partial(K.HopperW4Tiles, nibbles="split", nk_scales="slab")
  assert _call_ops(T(unpack="ptx_natural", pad_tokens=False))[0] == []
  assert "transpose" in _call_ops(T(unpack="ptx", pad_tokens=False))[0]
  assert "pad" in _call_ops(T(unpack="ptx_natural"))[0]


def test_decode_call_with_the_kernel_epilogue_is_one_kernel():
  """``epilogue="kernel"`` (here with ``wg_split="k"``, so the SMs fill without a K split
  over CTAs) with the tokens as they are: no XLA op before or after the kernel, which
  lowers for cuda; the default epilogue leaves XLA the split-K sum, transpose and cast."""
  T = functools.partial(K.HopperW4Tiles, nibbles="split", nk_scales="slab", pad_tokens=False,
                        unpack="ptx_natural", wg_split="k")
  assert _call_ops(T(epilogue="kernel")) == ([], [])
  before, after = _call_ops(T())
  assert before == [] and {"reduce_sum", "transpose"} <= set(after)
  fn, x, w4 = operands()["w4a16-g128"]
  txt = lower(fn, x, w4.transpose(), "mosaic_gpu", "cuda", T(epilogue="kernel"),
              weight_layout="nk")
  assert "lowbit_w4a16_hopper" in txt


def test_w4a8_call_with_the_kernel_epilogue_scales_tokens_in_the_kernel():
  """W4A8 with ``epilogue="kernel"``: the tokens' scales go into the kernel (a reshape,
  and a convert only if they are not f32) and nothing runs after it; the default epilogue
  leaves XLA the split-K sum, transpose, the tokens' scale and the cast."""
  T = functools.partial(K.HopperW4Tiles, nibbles="split", nk_scales="slab", pad_tokens=False,
                        unpack="ptx", wg_split="k", int_sums="magic")
  before, after = _call_ops(T(epilogue="kernel"), "w4a8-g128")
  assert set(before) <= {"convert_element_type"} and after == []
  before, after = _call_ops(T(), "w4a8-g128")
  assert {"reduce_sum", "transpose", "mul"} <= set(after)
  fn, x, w4 = operands()["w4a8-g128"]
  txt = lower(fn, x, w4.transpose(), "mosaic_gpu", "cuda", T(epilogue="kernel"),
              weight_layout="nk")
  assert "lowbit_w4a8_hopper" in txt


def _experiment(name: str):
  import importlib.util
  import pathlib
  path = pathlib.Path(__file__).parents[2] / "experiments" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(name, path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _lowered_ops():
  return _experiment("lowered_ops")


def cuda_lowering_failures(fn, x, w, candidates, **kw) -> list[str]:
  """Each of ``candidates`` (Mosaic GPU tiles) that does not lower for cuda, with its error."""
  failed = []
  for tiles in candidates:
    try:
      lower(fn, x, w, "mosaic_gpu", "cuda", tiles, **kw)
    except Exception as e:  # noqa: BLE001 - collect them all, then fail
      failed.append(f"{tiles}: {type(e).__name__}: {str(e)[:200]}")
  return failed


@pytest.mark.slow  # the GPU run's own candidates: experiments/gpu_jax_check.sh
@pytest.mark.parametrize("m", [1, 16, 32, 64, 128, 256, 4096])
@pytest.mark.parametrize("name", ["w4a16", "w4a8", "w4a8_int"])
def test_every_int4_sweep_candidate_lowers_for_cuda(name, m):
  """The GPU run's sweep (experiments/bench_kernels.py) at K = N = 8192, bf16 group-128
  scales, weight stored K-major: every candidate lowers, so none spends device time on a
  compile error that a CPU could have shown. ``w4a8_int``: integer group scales, W4A8's
  PTX candidates (the sweep's ``w4a8_int`` kernel)."""
  bench = _experiment("bench_kernels")
  k = n = 8192
  wq = jax.eval_shape(lambda a: quantize(a, QuantSpec(
      bits=4, channel_axes=(1,), group_size=128, pack=True, scale_dtype=jnp.bfloat16,
      group_scales="int" if name == "w4a8_int" else "float")),
      jax.ShapeDtypeStruct((k, n), jnp.float32))
  wt = jax.eval_shape(lambda q: q.transpose(), wq)
  x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
  if name != "w4a16":
    x = jax.eval_shape(lambda a: quantize(a, QuantSpec(bits=8, channel_axes=(0,))),
                       jax.ShapeDtypeStruct((m, k), jnp.float32))
  fn = K.w4a16_matmul if name == "w4a16" else K.w4a8_matmul
  if name == "w4a8_int":
    tiles = [t for t in bench.hopper_w4_candidates(m, "w4a8") if t.unpack == "ptx"]
    assert tiles
  else:
    tiles = [K.HopperW4Tiles()] + bench.hopper_w4_candidates(m, name)
  failed = cuda_lowering_failures(fn, x, wt, tiles, weight_layout="nk")
  assert not failed, "\n".join(failed)


def test_every_w8a8_sweep_candidate_lowers_for_cuda():
  """The GPU run's Mosaic GPU W8A8 sweep at M = K = N = 8192 (weight ``[K, N]``, as the
  benchmark times it) lowers candidate by candidate (run 5 spent device time on one that
  Mosaic's layout inference rejects; it fails here on the CPU too)."""
  bench = _experiment("bench_kernels")
  k = n = m = 8192
  spec8 = lambda axis: QuantSpec(bits=8, channel_axes=(axis,))  # noqa: E731
  w = jax.eval_shape(lambda a: quantize(a, spec8(1)), jax.ShapeDtypeStruct((k, n), jnp.float32))
  x = jax.eval_shape(lambda a: quantize(a, spec8(0)), jax.ShapeDtypeStruct((m, k), jnp.float32))
  failed = cuda_lowering_failures(K.w8a8_matmul, x, w, bench.hopper_candidates(m))
  assert bench.hopper_candidates(m) and not failed, "\n".join(failed)


@pytest.mark.slow  # the GPU run's own candidates: experiments/gpu_jax_check.sh
@pytest.mark.parametrize("m", [1, 256])
def test_profiled_kernels_fit_with_the_profilers_buffer(m):
  """experiments/profile_w4.py's configurations at K = N = 8192 with ``profile_dir``: the
  profiler's shared-memory buffer is reserved in the plan, so Mosaic GPU builds every
  kernel; lowering then stops only at the trace's host callback, which needs a GPU backend
  (with 4096 ranges per warpgroup every configuration overflowed shared memory)."""
  profile = _experiment("profile_w4")
  k = n = 8192
  wq = jax.eval_shape(lambda a: quantize(a, QuantSpec(
      bits=4, channel_axes=(1,), group_size=128, pack=True, scale_dtype=jnp.bfloat16)),
      jax.ShapeDtypeStruct((k, n), jnp.float32))
  q_nk = jax.ShapeDtypeStruct(wq.qvalue.shape[::-1], wq.qvalue.dtype)
  s_nk = jax.ShapeDtypeStruct(wq.scale.shape[::-1], wq.scale.dtype)
  for kname, tiles in profile.profiled_configs(m):
    x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16 if kname == "w4a16" else jnp.int8)

    def f(a, q, s, tiles=tiles, kname=kname):
      return K._mosaic_gpu.w4_matmul(a, q.T, s.T, 128, tiles=tiles, interpret=False, name=kname,
                                     kernel_name=f"lowbit_{kname}_hopper", weight_layout="nk",
                                     profile_dir="/nonexistent")
    with pytest.raises(ValueError, match="different from the lowering platform cuda"):
      jax.jit(f).trace(x, q_nk, s_nk).lower(lowering_platforms=("cuda",))


def test_slab_scales_are_loaded_not_searched():
  """``nk_scales="slab"``: a step reads its column of the scale slab with one scalar load per
  row a thread holds, as the streamed scale rows do; no select over the slab's columns and
  no shuffles beyond those of the same tiles with streamed rows (``"transpose"``)."""
  lo = _lowered_ops()
  counts = {}
  for scales in ("transpose", "slab"):
    [text] = lo.lower_kernel("w4a16", f'nibbles="split", tile_n=128, unpack="ptx", nk_scales="{scales}"',
                             m=1, kn=1024, group=128)
    counts[scales] = lo.count_ops(text)
  slab, rows = counts["slab"], counts["transpose"]
  assert not any(k.startswith(("select", "cmpi")) for k in slab["arith_vector"])
  assert slab["other"]["nvvm.shfl.sync"] == rows["other"]["nvvm.shfl.sync"]
  scalar = "vector<1xbf16>"  # the benchmark's bf16 scales, one per row a thread holds
  assert slab["loads"][scalar] == rows["loads"][scalar] > 0


def test_ptx_unpack_lowers_without_shuffles():
  """``HopperW4Tiles(unpack="ptx")`` keeps what it is for, in the module Mosaic GPU lowers
  to (experiments/lowered_ops.py): a step of one thread at ``tile_n=128`` converts its
  128 bytes in 32 one-pass PTX blocks from 32-bit words, with no warp shuffle or select
  to lay them out for wgmma; the "ops" unpack of the same tiles needs both."""
  lo = _lowered_ops()
  counts = {}
  for unpack in ("ops", "ptx", "ptx_natural"):
    [text] = lo.lower_kernel("w4a16", f'nibbles="split", tile_n=128, unpack="{unpack}"',
                             m=1, kn=1024, group=128)
    counts[unpack] = lo.count_ops(text)
  ptx, ops, nat = counts["ptx"], counts["ops"], counts["ptx_natural"]
  [block] = [k for k in ptx["inline_ptx"] if k.startswith("prmt.b32")]
  assert ptx["inline_ptx"][block] == 32 and block.startswith("prmt.b32 ... (12 instructions")
  # 32 32-bit words: 32 plain loads (jax 0.10), or 8 four-register ldmatrix (jax 0.11)
  assert ptx["loads"]["vector<4xi8>"] + 4 * ptx["loads"]["ldmatrix x4 b16"] == 32
  assert not any(k.startswith("select") for k in ptx["arith_vector"])
  assert ptx["other"]["nvvm.shfl.sync"] < ops["other"]["nvvm.shfl.sync"] - 32
  assert ops["arith_vector"]["select vector<2xbf16>"] > 0
  # ptx_natural: twice the loads (2 bytes each), a 6-instruction block per load that takes
  # the loaded 16 bits as one register (one prmt spreads the bytes: two separate byte
  # operands cost 3 PRMTs in the SASS, experiments/sass_stats.py), the same shuffles as "ptx"
  [block] = [k for k in nat["inline_ptx"] if k.startswith("prmt.b32")]
  assert nat["inline_ptx"][block] == 64 and block.startswith("prmt.b32 ... (6 instructions, 3 mov")
  assert nat["loads"]["vector<2xi8>"] == 64 and "vector<4xi8>" not in nat["loads"]
  assert nat["other"]["nvvm.shfl.sync"] == ptx["other"]["nvvm.shfl.sync"]
