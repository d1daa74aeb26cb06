"""Every kernel against its `reference` and a float64 numpy oracle, on fresh inputs.

On CPU the Pallas kernels run interpreted. Set ``LOWBIT_TEST_BACKEND=gpu`` to
run the same checks compiled on a GPU (the device script does).
"""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lowbit.kernels import BlockSizes

from lowbit import kernels as K
from lowbit.quant import QuantSpec, dequantize, quantize

BACKEND = os.environ.get("LOWBIT_TEST_BACKEND", "interpret")
_SEED = [0]


def fresh_key():
  _SEED[0] += 1
  return jax.random.key(int.from_bytes(os.urandom(4), "little") ^ _SEED[0])


def rel(a, b):
  a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
  b = np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def make(m, k, n, *, wbits, group, scale_dtype=jnp.float32, act=True, xdtype=jnp.float32,
         int_scales=False):
  k1, k2 = jax.random.split(fresh_key())
  x = jax.random.normal(k1, (m, k), jnp.float32)
  w = jax.random.normal(k2, (k, n), jnp.float32)
  wspec = QuantSpec(bits=wbits, channel_axes=(1,), group_size=group, pack=wbits == 4,
                    scale_dtype=scale_dtype, group_scales="int" if int_scales else "float")
  wq = quantize(w, wspec)
  xa = quantize(x, QuantSpec(bits=8, channel_axes=(0,))) if act else x.astype(xdtype)
  return xa, wq


def oracle(xa, wq):
  """float64 numpy: dequantize both operands, matmul."""
  xd = np.asarray(dequantize(xa) if not isinstance(xa, jax.Array) else xa.astype(jnp.float32),
                  np.float64)
  return xd @ np.asarray(dequantize(wq), np.float64)


# (m, k, n, block sizes): multiples of the blocks, ragged M (decode and prefill,
# masked in the kernel), split-K; for every case.
SHAPES = [
    (16, 256, 128, BlockSizes(bm=16, bn=64, bk=64)),
    (5, 512, 128, BlockSizes(bm=16, bn=64, bk=64, split_k=2)),
    (1, 256, 64, None),
    (70, 256, 128, BlockSizes(bm=32, bn=64, bk=32)),
]
# The other tile variants: (w^T x^T)^T ("wx"), K-major weights, the shift-based
# int4 unpack; on W8A8, grouped W4A8 and per-channel and grouped W4A16.
VARIANT_SHAPES = [
    (5, 512, 128, BlockSizes(bm=16, bn=64, bk=64, split_k=2, orient="wx")),
    (3, 256, 128, BlockSizes(bm=16, bn=64, bk=32, split_k=4, orient="wx")),
    (70, 256, 128, BlockSizes(bm=64, bn=64, bk=32, orient="wx", k_major=True)),
    (40, 512, 128, BlockSizes(bm=32, bn=128, bk=64, k_major=True)),
    (20, 256, 128, BlockSizes(bm=16, bn=64, bk=64, orient="wx", fast_unpack=False)),
]
VARIANT_CASES = ("w8a8", "w4a8-g64", "w4a16", "w4a16-g128-bf16scale")
ORIENTS = [BlockSizes(bm=16, bn=64, bk=64), BlockSizes(bm=16, bn=64, bk=64, orient="wx"),
           BlockSizes(bm=32, bn=64, bk=64, k_major=True)]


def _bs_id(bs):
  return bs.orient + ("-kmajor" if bs.k_major else "") + ("" if bs.fast_unpack else "-shift")

CASES = [
    ("w8a8", K.w8a8, K.w8a8_matmul, dict(wbits=8, group=None)),
    ("w4a8", K.w4a8, K.w4a8_matmul, dict(wbits=4, group=None)),
    ("w4a8-g64", K.w4a8, K.w4a8_matmul, dict(wbits=4, group=64)),
    ("w4a16", K.w4a16, K.w4a16_matmul, dict(wbits=4, group=None, act=False)),
    ("w4a16-g32", K.w4a16, K.w4a16_matmul, dict(wbits=4, group=32, act=False)),
    ("w4a16-g128-bf16scale", K.w4a16, K.w4a16_matmul,
     dict(wbits=4, group=128, act=False, scale_dtype=jnp.bfloat16)),
    # a group that straddles the two packed halves (K = 256: K/2 = 128 < 256)
    ("w4a8-g256", K.w4a8, K.w4a8_matmul, dict(wbits=4, group=256)),
    # integer group scales under a channel scale (QuantSpec(group_scales="int"))
    ("w4a8-g64-int", K.w4a8, K.w4a8_matmul, dict(wbits=4, group=64, int_scales=True)),
    ("w4a8-g256-int", K.w4a8, K.w4a8_matmul, dict(wbits=4, group=256, int_scales=True)),
    ("w4a16-g64-int", K.w4a16, K.w4a16_matmul,
     dict(wbits=4, group=64, act=False, int_scales=True)),
]


def _shape_id(s):
  return f"{s[0]}x{s[1]}x{s[2]}" + (f"-{_bs_id(s[3])}" if s[3] else "")


def _matrix():
  # integer group scales reach the same kernels as float group scales (the wrapper splits the
  # channel scale off): the split-K and the one-token shapes only
  cases = [(c, sh) for c in CASES for sh in SHAPES
           if not c[0].endswith("-int") or sh[0] in (1, 5)]
  cases += [(c, sh) for c in CASES if c[0] in VARIANT_CASES for sh in VARIANT_SHAPES
            if c[2] is not K.w8a8_matmul or sh[3].fast_unpack]  # nothing to unpack in W8A8
  return cases


@pytest.mark.parametrize("case,shape", _matrix(), ids=lambda v: v[0] if isinstance(v[0], str)
                         else _shape_id(v))
def test_kernel_f32_matches_reference_and_float64(case, shape):
  name, mod, fn, kw = case
  m, k, n, bs = shape
  xa, wq = make(m, k, n, **kw)
  out = fn(xa, wq, out_dtype=jnp.float32, block_sizes=bs, backend=BACKEND)
  assert out.shape == (m, n) and out.dtype == jnp.float32
  ref = mod.reference(xa, wq, out_dtype=jnp.float32)
  assert rel(out, ref) < 1e-5
  assert rel(out, oracle(xa, wq)) < 1e-5
  assert rel(mod.xla(xa, wq, out_dtype=jnp.float32), oracle(xa, wq)) < 1e-5


@pytest.mark.parametrize(
    "case,bs", [(c, ORIENTS[0]) for c in CASES]
    + [(c, bs) for c in CASES if c[0] in VARIANT_CASES for bs in ORIENTS[1:]],
    ids=lambda v: v[0] if isinstance(v, tuple) else _bs_id(v))
def test_kernel_bf16_output(case, bs):
  name, mod, fn, kw = case
  kw = dict(kw)
  if not kw.get("act", True):
    kw["xdtype"] = jnp.bfloat16
  xa, wq = make(24, 256, 128, **kw)
  out = fn(xa, wq, out_dtype=jnp.bfloat16, block_sizes=bs, backend=BACKEND)
  assert out.dtype == jnp.bfloat16
  assert rel(out, oracle(xa, wq)) < 1e-2


@pytest.mark.parametrize("bs", ORIENTS, ids=_bs_id)
@pytest.mark.parametrize("name,fn", [("w8a8", K.w8a8_matmul), ("w4a8", K.w4a8_matmul)])
def test_int32_accumulation_is_exact(name, fn, bs):
  """With unit scales the output is the integer dot product itself, exactly."""
  m, k, n = 9, 512, 128
  rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
  xc = rng.integers(-127, 128, (m, k))
  lim = 127 if name == "w8a8" else 7
  wc = rng.integers(-lim, lim + 1, (k, n))
  xa = quantize(jnp.asarray(xc, jnp.float32), QuantSpec(bits=8, channel_axes=(0,)),
                params=_unit(m, 1))
  wspec = QuantSpec(bits=8 if name == "w8a8" else 4, channel_axes=(1,), pack=name != "w8a8")
  wq = quantize(jnp.asarray(wc, jnp.float32), wspec, params=_unit(1, n))
  out = fn(xa, wq, out_dtype=jnp.float32, block_sizes=bs, backend=BACKEND)
  np.testing.assert_array_equal(np.asarray(out), (xc @ wc).astype(np.float32))


@pytest.mark.parametrize("name,wbits,group", [("w8a8", 8, None), ("w4a16", 4, 64),
                                               ("w4a8", 4, None)])
def test_kernels_take_a_weight_transposed_ahead_of_time(name, wbits, group):
  """``weight_layout="nk"``: ``w.transpose()`` in, the same numbers out, any tiles (the
  Triton kernels read it K-major); qmatmul passes it through."""
  xa, wq = make(40, 512, 128, wbits=wbits, group=group, act=name != "w4a16")
  want = oracle(xa, wq)
  fn = getattr(K, f"{name}_matmul")
  for bs in (BlockSizes(bm=16, bn=64, bk=64), BlockSizes(bm=32, bn=64, bk=64, k_major=True),
             BlockSizes(bm=16, bn=64, bk=64, orient="wx")):
    out = fn(xa, wq.transpose(), out_dtype=jnp.float32, block_sizes=bs, backend=BACKEND,
             weight_layout="nk")
    assert rel(out, want) < 1e-5
  x = xa if name == "w4a16" else dequantize(xa)
  act = None if name == "w4a16" else QuantSpec(bits=8, channel_axes=(0,))
  for impl in ("pallas", "xla", "dequant", "reference"):
    y = K.qmatmul(x, wq.transpose(), act_spec=act, implementation=impl, out_dtype=jnp.float32,
                  weight_layout="nk")
    assert rel(y, np.asarray(K.qmatmul(x, wq, act_spec=act, implementation=impl,
                                      out_dtype=jnp.float32), np.float64)) < 1e-6
  with pytest.raises(ValueError, match="use 'kn' or 'nk'"):
    fn(xa, wq, backend=BACKEND, weight_layout="km")


def _unit(*shape):
  from lowbit.quant import QuantParams
  return QuantParams(jnp.ones(shape, jnp.float32))


def test_bad_shapes_raise_clear_errors():
  xa, wq = make(4, 256, 96, wbits=4, group=None, act=False)
  with pytest.raises(ValueError, match="N=96 is not a multiple of BlockSizes.bn=64"):
    K.w4a16_matmul(xa, wq, block_sizes=BlockSizes(bm=16, bn=64, bk=64), backend=BACKEND)
  xa, wq = make(4, 256, 128, wbits=4, group=None, act=False)
  with pytest.raises(ValueError, match="K must match"):
    K.w4a16_matmul(xa[:, :128], wq, backend=BACKEND)
  with pytest.raises(ValueError, match="int4 packed along K"):
    K.w4a16_matmul(xa, quantize(jnp.ones((256, 128)), QuantSpec(bits=8, channel_axes=(1,))),
                   backend=BACKEND)
  with pytest.raises(ValueError, match="asymmetric"):
    K.w4a16_matmul(xa, quantize(jnp.ones((256, 128)), QuantSpec(
        bits=4, symmetric=False, channel_axes=(1,), pack=True)), backend=BACKEND)
  with pytest.raises(ValueError, match="must be a power of two"):
    BlockSizes(bm=24)
  with pytest.raises(ValueError, match="use 'xw' or 'wx'"):
    BlockSizes(orient="yx")
  with pytest.raises(ValueError, match="at least 16 rows"):
    K.w4a16_matmul(xa, wq, block_sizes=BlockSizes(bm=8, bn=64, bk=64), backend="gpu")
  with pytest.raises(ValueError, match="Mosaic TPU kernel takes orient='xw'"):
    K.w4a16_matmul(xa, wq, block_sizes=BlockSizes(bm=16, bn=128, bk=128, orient="wx"),
                   backend="tpu")


def test_dispatch_picks_kernels_and_matches_reference():
  k1, k2 = jax.random.split(fresh_key())
  x = jax.random.normal(k1, (2, 3, 256), jnp.float32)
  w = jax.random.normal(k2, (256, 128), jnp.float32)
  a8 = QuantSpec(bits=8, channel_axes=(0,))
  cases = [
      (QuantSpec(bits=8, channel_axes=(1,)), a8, "w8a8"),
      (QuantSpec(bits=4, channel_axes=(1,), pack=True, group_size=64), None, "w4a16"),
      (QuantSpec(bits=4, channel_axes=(1,), pack=True), a8, "w4a8"),
      (QuantSpec(bits=8, channel_axes=(1,)), None, None),
      (QuantSpec(bits=4, symmetric=False, channel_axes=(1,), group_size=32, pack=True), None, None),
  ]
  for wspec, aspec, expected in cases:
    wq = quantize(w, wspec)
    assert K.kernel_for(wq, aspec) == expected
    ref = K.qmatmul(x, wq, act_spec=aspec, implementation="reference")
    for impl in ("xla", "dequant") + (("pallas",) if expected else ()):
      y = K.qmatmul(x, wq, act_spec=aspec, implementation=impl)
      assert y.shape == (2, 3, 128)
      assert rel(y, ref) < 1e-5, (wspec, aspec, impl)
    if expected is None:
      with pytest.raises(ValueError, match="no Pallas kernel"):
        K.qmatmul(x, wq, act_spec=aspec, implementation="pallas")


def _dots(hlo: str) -> list[tuple[str, str, str, str]]:
  """``(line, result, lhs, rhs)`` element types of every dot in compiled HLO text."""
  types = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", hlo))
  out = []
  for line in hlo.splitlines():
    found = re.search(r"= (\w+)\[\S* dot\(%([\w.\-]+), %([\w.\-]+)\)", line)
    if found:
      out.append((line, found[1], types.get(found[2]), types.get(found[3])))
  return out


def _arrays(hlo: str, dtypes: str) -> list[tuple[str, str, int]]:
  """``(dtype, shape, elements)`` of every array of the ``|``-separated ``dtypes`` in
  compiled HLO text."""
  return [(dtype, shape, int(np.prod([int(d) for d in shape.split(",")])))
          for dtype, shape in re.findall(rf"\b({dtypes})\[([\d,]+)\]", hlo)]


@pytest.mark.parametrize("layout", ["kn", "nk"])
@pytest.mark.parametrize("name,wbits,group,int_scales", [
    ("w4a8", 4, 64, False), ("w4a8", 4, None, False), ("w8a8", 8, None, False),
    ("w4a8", 4, 64, True)])
def test_cpu_xla_path_runs_2d_int8_dots(name, wbits, group, int_scales, layout):
  """XLA:CPU runs a batched integer dot on a slow generic loop (the grouped W4A8 path took
  578 ms that way at M = 256, K = N = 4096, g128, 20 ms as a loop of 2-D int8 dots, and
  the converted transformer's W4A8 g128 forward went from 9.1x to 0.75x of float), and it
  widens an int8 dot whose operand is a transpose in the same computation to int32 x int32
  (the W8A8 path on a K-major weight transposed inside its jit: 28 ms at M = 1,
  K = N = 4096, against 1.4 ms as a dot on the stored axes). So on CPU every compiled dot
  is 2-D, int8 x int8 -> int32, whatever the layout; the numbers are checked against
  float64 above (g64, and g256 straddling the halves)."""
  if jax.default_backend() != "cpu":
    pytest.skip("the CPU layout of the XLA path")
  xa, wq = make(16, 512, 128, wbits=wbits, group=group, int_scales=int_scales)
  w = wq.transpose() if layout == "nk" else wq
  mod = getattr(K, name)
  out = mod.xla(xa, w, out_dtype=jnp.float32, weight_layout=layout)
  assert rel(out, oracle(xa, wq)) < 1e-5
  hlo = jax.jit(lambda a, b: mod.xla(a, b, weight_layout=layout)).lower(xa, w).compile()
  dots = _dots(hlo.as_text())
  assert dots, hlo.as_text()
  for line, *types in dots:
    assert "batch_dims" not in line and types == ["s32", "s8", "s8"], (types, line)


@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("layout", ["kn", "nk"])
@pytest.mark.parametrize("name,group", [("w4a16", None), ("w4a16", 64), ("w4a8", None),
                                        ("w4a8", 64)])
def test_cpu_int4_path_unpacks_one_slice_at_a_time(name, group, layout, m):
  """On CPU the int4 XLA paths loop over slices of the packed weight as stored
  (``w4a16.cpu_halves_dot``): unpacking the whole weight first wrote it at 4 bytes a code
  (W4A16: 23-28 ms at M = 1, K = N = 4096, against 5-7 ms a slice at a time), and a K-major
  weight viewed as ``[K, N]`` cost a transposing copy a call (104 ms, g128). So no compiled
  array is as large as one unpacked half of the weight, a K-major weight is never copied
  into ``[K/2, N]`` order, and the numbers match float64 (several steps: K/2 = 512 rows of
  bytes in slices of 256 without groups, 64 with)."""
  if jax.default_backend() != "cpu":
    pytest.skip("the CPU layout of the XLA path")
  k, n = 1024, 192
  xa, wq = make(m, k, n, wbits=4, group=group, act=name == "w4a8")
  w = wq.transpose() if layout == "nk" else wq
  mod = getattr(K, name)
  out = mod.xla(xa, w, out_dtype=jnp.float32, weight_layout=layout)
  assert out.shape == (m, n) and rel(out, oracle(xa, wq)) < 1e-5
  assert rel(out, mod.reference(xa, wq, out_dtype=jnp.float32)) < 1e-5
  hlo = jax.jit(lambda a, b: mod.xla(a, b, weight_layout=layout)).lower(xa, w).compile().as_text()
  half = (k // 2) * n
  for dtype, shape, size in _arrays(hlo, "f32|bf16|s8|s32|u8"):
    assert dtype == "u8" or size < half, f"{dtype}[{shape}] in the compiled CPU path"
  if layout == "nk":
    assert f"u8[{k // 2},{n}]" not in hlo  # the stored [N, K/2] bytes, read as stored


@pytest.mark.parametrize("layout", ["kn", "nk"])
@pytest.mark.parametrize("spec", [QuantSpec(bits=4, channel_axes=(1,), group_size=64, pack=True),
                                  QuantSpec(bits=8, channel_axes=(1,))], ids=["w4a16", "w8a16"])
def test_xla_path_from_256_tokens_dequantizes_the_stored_weight(spec, layout):
  """From 256 tokens the CPU paths of weight-only quantization dequantize the weight once,
  in its stored orientation (a K-major one contracted along its minor axis), and take one
  dot: the float64 numbers, in either layout."""
  k1, k2 = jax.random.split(fresh_key())
  x = jax.random.normal(k1, (300, 512), jnp.float32)
  wq = quantize(jax.random.normal(k2, (512, 192), jnp.float32), spec)
  w = wq.transpose() if layout == "nk" else wq
  y = K.qmatmul(x, w, implementation="xla", out_dtype=jnp.float32, weight_layout=layout)
  want = np.asarray(x, np.float64) @ np.asarray(dequantize(wq), np.float64)
  assert y.shape == (300, 192) and rel(y, want) < 1e-5


@pytest.mark.parametrize("layout", ["kn", "nk"])
@pytest.mark.parametrize("spec", [
    QuantSpec(bits=8, channel_axes=(1,)),
    QuantSpec(bits=8, channel_axes=(1,), group_size=64),
    QuantSpec(bits=8, channel_axes=(1,), symmetric=False),
    QuantSpec(bits=8, channel_axes=(1,), group_size=128, symmetric=False, zero_point_form="min"),
    QuantSpec(bits=8)], ids=["channel", "g64", "asym", "g128-asym-min", "tensor"])
def test_cpu_dequant_path_converts_one_slice_at_a_time(spec, layout):
  """Weights without a kernel (W8A16, asymmetric) take ``dequant_dot``, which on CPU below
  256 tokens converts a slice of stored rows at a time (``_pallas.cpu_row_slices``): in
  full, XLA:CPU wrote the whole weight as f32 before the dot read it again (W8A16 one-token
  forward at d = 2048: 6.4x float's time). The numbers match float64 over several slices
  (1024 rows of [K, N], 768 of [N, K]; whole groups and their zero points sliced along),
  and no compiled f32 array is half the size of the weight."""
  if jax.default_backend() != "cpu":
    pytest.skip("the CPU layout of the XLA path")
  k, n = 1024, 768
  k1, k2 = jax.random.split(fresh_key())
  x = jax.random.normal(k1, (3, k), jnp.float32)
  wq = quantize(jax.random.normal(k2, (k, n), jnp.float32), spec)
  w = wq.transpose() if layout == "nk" else wq
  assert K.kernel_for(wq, None) is None  # the path under test, not a kernel's
  y = K.qmatmul(x, w, implementation="xla", out_dtype=jnp.float32, weight_layout=layout)
  want = np.asarray(x, np.float64) @ np.asarray(dequantize(wq), np.float64)
  assert y.shape == (3, n) and rel(y, want) < 1e-5
  hlo = jax.jit(lambda a, b: K.qmatmul(a, b, implementation="xla", weight_layout=layout)
                ).lower(x, w).compile().as_text()
  for _, shape, size in _arrays(hlo, "f32"):
    assert size < k * n // 2, f"f32[{shape}]"


@pytest.mark.parametrize("name,wbits,group", [("w8a8", 8, None), ("w4a8", 4, None),
                                              ("w4a8", 4, 64)])
def test_one_token_integer_dots_take_two_rows_on_cpu(name, wbits, group):
  """XLA:CPU runs a one-row integer dot on a slow path (int8 [1, 4096] x [4096, 4096]: 30 ms,
  two rows 6 ms; W8A8 / W4A8 XLA paths at M = 1 from 29-30 ms to 6-7 ms), so the CPU path
  pads one token to two rows and keeps the first: same sums (checked against float64 at
  M = 1 above), and every compiled integer dot has two rows."""
  if jax.default_backend() != "cpu":
    pytest.skip("the CPU layout of the XLA path")
  xa, wq = make(1, 512, 128, wbits=wbits, group=group)
  mod = getattr(K, name)
  out = mod.xla(xa, wq, out_dtype=jnp.float32)
  assert out.shape == (1, 128) and rel(out, oracle(xa, wq)) < 1e-5
  hlo = jax.jit(lambda a, b: mod.xla(a, b)).lower(xa, wq).compile().as_text()
  dots = [ln for ln in hlo.splitlines() if " dot(" in ln]
  assert dots and all("= s32[2," in ln for ln in dots), dots


def _without_pallas_triton(monkeypatch):
  """Make this process's jax look like one without Pallas' Triton backend (jax 0.12
  deprecates it): importing ``jax.experimental.pallas.triton`` raises."""
  import sys

  import jax.experimental.pallas as pallas
  monkeypatch.setitem(sys.modules, "jax.experimental.pallas.triton", None)
  monkeypatch.delattr(pallas, "triton", raising=False)


def test_lowbit_imports_without_pallas_triton():
  """``import lowbit`` (kernels, layers) must not need the Triton backend: a fresh
  interpreter whose jax has none imports everything and runs a converted layer on CPU."""
  import subprocess
  import sys
  code = (
      "import sys; sys.modules['jax.experimental.pallas.triton'] = None\n"
      "import jax, jax.numpy as jnp, lowbit, lowbit.nn, lowbit.kernels as K\n"
      "from lowbit.kernels import _pallas\n"
      "from lowbit.quant import QuantSpec, quantize\n"
      "assert not _pallas.has_triton()\n"
      "w = quantize(jax.random.normal(jax.random.key(0), (256, 64)),"
      " QuantSpec(bits=4, channel_axes=(1,), group_size=64, pack=True))\n"
      "print(K.qmatmul(jnp.ones((2, 256)), w).shape)\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "(2, 64)"


def test_without_pallas_triton_the_gpu_dispatch_takes_the_xla_path(monkeypatch):
  """On a GPU whose jax has no Triton backend, ``qmatmul``'s default dispatch runs the XLA
  path (the kernels' numbers) with a warning where no Mosaic GPU kernel takes the call; a
  Triton kernel asked for by name raises an ImportError that names the ways out."""
  from lowbit.kernels import _pallas
  k1, k2 = jax.random.split(fresh_key())
  x = jax.random.normal(k1, (3, 256), jnp.float32)
  wq = quantize(jax.random.normal(k2, (256, 128)),
                QuantSpec(bits=4, channel_axes=(1,), group_size=64, pack=True))
  a8 = QuantSpec(bits=8, channel_axes=(0,))
  want = {aspec: K.qmatmul(x, wq, act_spec=aspec, implementation="xla") for aspec in (None, a8)}
  _without_pallas_triton(monkeypatch)
  assert not _pallas.has_triton()
  with pytest.raises(ImportError, match="implementation='xla'"):
    _pallas.triton()
  monkeypatch.setattr(K, "platform", lambda: "gpu")  # the dispatch's view of the platform
  for aspec in (None, a8):
    with pytest.warns(RuntimeWarning, match="no Pallas Triton backend"):
      y = K.qmatmul(x, wq, act_spec=aspec)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(want[aspec]))
  with pytest.raises(ImportError, match="pallas.triton"):  # Triton's compiler parameters
    jax.jit(lambda a: K.w4a16_matmul(a, wq, backend="gpu")).trace(x).lower(
        lowering_platforms=("cuda",))
  # where a Mosaic GPU kernel takes the call (Hopper, K-major weight, bf16 decode), it runs
  import warnings

  from lowbit.kernels import _mosaic_gpu
  calls = []

  def spy(xt, wt, ws, group, *, tiles, **kw):
    calls.append(tiles)
    return jnp.zeros((xt.shape[0], 256), jnp.bfloat16)
  monkeypatch.setattr(_mosaic_gpu, "w4_matmul", spy)
  monkeypatch.setattr(_mosaic_gpu, "is_hopper", lambda: True)
  w2 = quantize(jax.random.normal(k2, (768, 256)),
                QuantSpec(bits=4, channel_axes=(1,), group_size=64, pack=True))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    K.qmatmul(jnp.ones((7, 768), jnp.bfloat16), w2.transpose(), weight_layout="nk")
  assert calls == [_mosaic_gpu.AUTO["w4a16"][0][3]]


def test_dequant_path_rounds_the_weight_to_the_activation_dtype():
  """``implementation="dequant"``: bf16 activations see the weight rounded to bf16."""
  k1, k2 = jax.random.split(fresh_key())
  x = jax.random.normal(k1, (6, 256), jnp.float32).astype(jnp.bfloat16)
  wq = quantize(jax.random.normal(k2, (256, 128)),
                QuantSpec(bits=4, channel_axes=(1,), group_size=64, pack=True))
  y = K.qmatmul(x, wq, implementation="dequant")
  assert y.dtype == jnp.bfloat16
  want = np.asarray(x, np.float64) @ np.asarray(dequantize(wq, jnp.bfloat16), np.float64)
  assert rel(y, want) < 1e-2
  with pytest.raises(ValueError, match="'dequant'"):
    K.qmatmul(x, wq, implementation="fast")


def test_ragged_groups_take_the_xla_path_and_refuse_the_kernel():
  """K = 576 with groups of 128 (SmolLM2's width): the kernels take whole groups only."""
  w = jax.random.normal(jax.random.key(3), (576, 128))
  x = jax.random.normal(jax.random.key(4), (5, 576))
  qw = quantize(w, QuantSpec(bits=4, channel_axes=(1,), group_size=128, ragged=True, pack=True))
  assert K.kernel_for(qw, None) is None
  want = np.asarray(x, np.float64) @ np.asarray(dequantize(qw), np.float64)
  np.testing.assert_allclose(np.asarray(K.qmatmul(x, qw)), want, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="no Pallas kernel takes w"):
    K.qmatmul(x, qw, implementation="pallas")
  with pytest.raises(ValueError, match="ragged last group"):
    K.w4a16_matmul(x, qw)


def test_default_tiles_follow_the_weight_layout():
  """GPU defaults: an int4 weight stored K-major takes one K-step per group of 128 at decode
  (its group scales are read a column per step), K-major tiles everywhere; "kn" keeps the
  tuned tiles; TPU ignores the layout. Divisibility still clamps the tiles."""
  from lowbit.kernels import _pallas
  kn = _pallas.default_block_sizes("w4a16", "gpu", 1, 8192, 8192)
  nk = _pallas.default_block_sizes("w4a16", "gpu", 1, 8192, 8192, "nk")
  assert (kn.bk, kn.k_major) == (64, False)
  assert nk == BlockSizes(bm=16, bn=128, bk=128, split_k=8, num_warps=4, num_stages=3,
                          k_major=True)
  assert _pallas.resolve_block_sizes("w4a8", "gpu", 16, 8192, 8192, None, "nk") == nk
  assert _pallas.resolve_block_sizes("w4a8", "gpu", 64, 8192, 8192, None, "nk").k_major
  assert _pallas.default_block_sizes("w8a8", "gpu", 1, 8192, 8192, "nk").bk == 128
  assert _pallas.default_block_sizes("w4a16", "gpu", 1, 192, 8192, "nk").bk == 32  # K/2 = 96
  assert not _pallas.resolve_block_sizes("w4a16", "tpu", 1, 8192, 8192, None, "nk").k_major


@pytest.mark.parametrize("m", [1, 300])
@pytest.mark.parametrize("layout", ["kn", "nk"])
def test_w4a8_int_group_scales_sum_all_of_k_in_int32(layout, m):
  """Integer group scales: the XLA path's sums over all of K are the exact integers
  ``sum_k x_q[m, k] * q[k, n] * s[k // G, n]`` (CPU loop: the partial sums scaled at 1
  token, the codes at 300; elsewhere one dot),
  scaled once by ``sx[m] * c[n]``; against the float-group-scale form of the same weight
  (``_pallas.split_channel_scale``) and the dispatch's float path, within f32 rounding."""
  xa, wq = make(m, 512, 96, wbits=4, group=64, int_scales=True)
  w = wq.transpose() if layout == "nk" else wq
  out = np.asarray(K.w4a8.xla(xa, w, out_dtype=jnp.float32, weight_layout=layout), np.float64)
  q = np.asarray(wq.codes, np.int64).reshape(8, 64, 96) * np.asarray(wq.scale, np.int64)[:, None]
  ints = np.asarray(xa.qvalue, np.int64) @ q.reshape(512, 96)
  scale = np.asarray(xa.scale, np.float64) * np.asarray(wq.channel_scale, np.float64)
  np.testing.assert_allclose(out, ints * scale, rtol=2e-7, atol=0)
  stripped, c = K._pallas.split_channel_scale(w, layout)
  assert stripped.channel_scale is None and stripped.scale.dtype == jnp.float32
  via_float = K.w4a8.xla(xa, stripped, out_dtype=jnp.float32, weight_layout=layout) * c
  assert rel(via_float, ints * scale) < 1e-6
  with pytest.raises(ValueError, match="integer group scales"):
    K._pallas.weight_operands(wq, "probe", packed=True)


def test_dispatch_takes_int_group_scales_everywhere():
  """qmatmul on a weight with integer group scales: every implementation, both
  pairings, both layouts, against float64."""
  xa, wq = make(6, 256, 64, wbits=4, group=64, int_scales=True)
  x = jax.random.normal(fresh_key(), (6, 256), jnp.float32)
  a8 = QuantSpec(bits=8, channel_axes=(0,))
  want = {"w4a8": oracle(quantize(x, a8), wq), "w4a16": oracle(x, wq)}
  for layout in ("kn", "nk"):
    w = wq.transpose() if layout == "nk" else wq
    for impl in ("pallas", "xla", "dequant", "reference"):
      for name, spec in (("w4a8", a8), ("w4a16", None)):
        assert K.kernel_for(wq, spec) == name
        y = K.qmatmul(x, w, act_spec=spec, implementation=impl, weight_layout=layout)
        assert rel(y, want[name]) < 1e-5, (layout, impl, name)
