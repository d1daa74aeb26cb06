"""W4A16: bf16 (or f32) activations x int4 weights packed two per byte.

``out[m, n] = sum_g s[g, n] * sum_{k in g} x[m, k] * q[k, n]``: the weight is
unpacked in the kernel, each group's partial sum is scaled in f32 (per-channel:
one group spanning K).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from lowbit.kernels import _mosaic_gpu, _pallas
from lowbit.kernels._mosaic_gpu import HopperW4Tiles
from lowbit.kernels._pallas import BlockSizes

from lowbit.quant import QArray, dequantize, unpack_int4_halves


@functools.partial(jax.jit, static_argnames=("out_dtype", "block_sizes", "backend",
                                             "weight_layout"))
def w4a16_matmul(x: jax.Array, w: QArray, *, out_dtype: jnp.dtype | None = None,
                 block_sizes: BlockSizes | HopperW4Tiles | None = None,
                 backend: str | None = None, weight_layout: str = "kn") -> jax.Array:
  """Pallas W4A16 matmul.

  Args:
    x: ``[M, K]`` bf16, f16 or f32 activations (bf16 for the Mosaic GPU kernel).
    w: ``[K, N]`` int4 QArray packed along K as ``[K/2, N]`` uint8, scale
      ``[1, N]`` (per-channel) or ``[K/G, N]`` (group G, G dividing K/2);
      with ``weight_layout="nk"`` that weight transposed once ahead of time,
      ``w.transpose()`` (``[N, K/2]`` bytes), which the Mosaic GPU kernel reads
      without a per-call transpose.
    out_dtype: default ``x.dtype``.
    block_sizes, backend: as in :func:`lowbit.kernels.w8a8_matmul`; a
      :class:`HopperW4Tiles` (or ``backend="mosaic_gpu"``) selects the Hopper
      kernel of :func:`lowbit.kernels._mosaic_gpu.w4_kernel`.
    weight_layout: ``"kn"`` or ``"nk"`` (an ``"nk"`` weight takes K-major Triton tiles:
      no transpose in the call; on TPU it is transposed back).

  Returns:
    ``[M, N]`` in ``out_dtype``.

  A weight with integer group scales (``QuantSpec(group_scales="int")``) runs as one with
  float group scales ``s`` (exact), its output times the channel scales
  (:func:`lowbit.kernels._pallas.split_channel_scale`).
  """
  if isinstance(w, QArray) and w.channel_scale is not None:
    w, c = _pallas.split_channel_scale(w, weight_layout)
    y = w4a16_matmul(x, w, out_dtype=jnp.float32, block_sizes=block_sizes, backend=backend,
                     weight_layout=weight_layout)
    return (y * c).astype(out_dtype or jnp.asarray(x).dtype)
  w = _pallas.logical_weight(w, weight_layout, "w4a16_matmul")
  if backend is None and block_sizes is None:
    # Hopper: the Mosaic GPU kernel where it wins (it multiplies bf16 tokens only)
    block_sizes = _mosaic_gpu.default_tiles("w4a16", x, w, weight_layout)
  backend = _mosaic_gpu.select_backend("w4a16_matmul", backend, block_sizes, HopperW4Tiles)
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"w4a16_matmul: x must be float (bf16/f32), got {x.dtype}.")
  wq, ws, group = _pallas.weight_operands(w, "w4a16_matmul", packed=True)
  (m, k), n = x.shape, w.shape[1]
  if w.shape[0] != k:
    raise ValueError(f"w4a16_matmul: x is [{m}, {k}] but w is {w.shape}; K must match.")
  if backend in ("mosaic_gpu", "mosaic_gpu_interpret"):
    return _hopper(x, wq, ws, group, out_dtype=out_dtype or x.dtype,
                   tiles=block_sizes or HopperW4Tiles(),
                   interpret=backend == "mosaic_gpu_interpret", weight_layout=weight_layout)
  bs = _pallas.resolve_block_sizes("w4a16", backend, m, k, n, block_sizes, weight_layout)
  _pallas.check_block_fit("w4a16_matmul", k, n, True, group, bs, backend)
  return _pallas.run_matmul(x, None, wq, ws, k=k, n=n, packed=True, group=group,
                            int_dot=False, out_dtype=out_dtype or x.dtype, bs=bs,
                            backend=backend, name="lowbit_w4a16")


def _hopper(x, wq, ws, group, *, out_dtype, tiles: HopperW4Tiles, interpret: bool,
            weight_layout: str) -> jax.Array:
  """The Mosaic GPU kernel (:func:`lowbit.kernels._mosaic_gpu.w4_matmul`) on validated
  operands; it multiplies in bf16, so x must be bf16 (no silent rounding of f32)."""
  name = "w4a16_matmul(backend='mosaic_gpu')"
  if x.dtype != jnp.bfloat16:
    raise ValueError(f"{name}: x is {x.dtype}; the kernel multiplies in bf16 (the int4 codes "
                     "become bf16 for wgmma). Cast x to bfloat16 or use backend='gpu'.")
  y = _mosaic_gpu.w4_matmul(x, wq, ws, group, tiles=tiles, interpret=interpret, name=name,
                            kernel_name="lowbit_w4a16_hopper", weight_layout=weight_layout,
                            out_dtype=out_dtype)
  return y.astype(out_dtype)  # a no-op for epilogue="kernel", which wrote out_dtype


def grouped_halves_dot(x: jax.Array, wq: jax.Array, ws: jax.Array, group: int | None,
                       dot_dtype: jax.typing.DTypeLike,
                       acc_dtype: jax.typing.DTypeLike) -> jax.Array:
  """``sum_g s[g] * (x_g @ q_g)`` over both packed halves, in f32: ``[M, N]``.

  ``x [M, K]``, ``wq [K/2, N]`` packed, ``ws [K/G or 1, N]``. The half-split
  layout means ``x @ q == x[:, :K/2] @ lo + x[:, K/2:] @ hi``: no interleave.
  Groups take batched dots (XLA on GPU and TPU); on CPU see :func:`cpu_halves_dot`.
  """
  m, k = x.shape
  h = k // 2
  lo, hi = unpack_int4_halves(wq, dot_dtype)
  ws = ws.astype(jnp.float32)
  # f32 operands: full f32 products (GPUs default to TF32 otherwise).
  prec = lax.Precision.HIGHEST if jnp.dtype(dot_dtype) == jnp.float32 else None
  xs = (x[:, :h].astype(dot_dtype), x[:, h:].astype(dot_dtype))
  if group is None:
    acc = sum(lax.dot(a, b, precision=prec, preferred_element_type=acc_dtype)
              for a, b in zip(xs, (lo, hi), strict=False))
    return acc.astype(jnp.float32) * ws
  if h % group:  # a group straddles the halves: regroup the full K axis
    q = jnp.concatenate([lo, hi], axis=0)
    g = k // group
    part = jnp.einsum("mgk,gkn->mgn", x.astype(dot_dtype).reshape(m, g, group),
                      q.reshape(g, group, -1), precision=prec, preferred_element_type=acc_dtype)
    return jnp.einsum("mgn,gn->mn", part.astype(jnp.float32), ws, precision=lax.Precision.HIGHEST)
  g = h // group
  out = 0.0
  for half, (a, b) in enumerate(zip(xs, (lo, hi), strict=False)):
    part = jnp.einsum("mgk,gkn->mgn", a.reshape(m, g, group), b.reshape(g, group, -1),
                      precision=prec, preferred_element_type=acc_dtype)
    out = out + jnp.einsum("mgn,gn->mn", part.astype(jnp.float32), ws[half * g:(half + 1) * g],
                           precision=lax.Precision.HIGHEST)
  return out


def int_scaled_halves_dot(x: jax.Array, wq: jax.Array, s: jax.Array, group: int) -> jax.Array:
  """``sum_k x[m, k] * (q[k, n] * s[k // G, n])`` in int32, ``[M, N]``: integer group scales
  (``QuantSpec(group_scales="int")``) applied to the codes, one int8 dot over all of K.

  ``x [M, K]`` int8, ``wq [K/2, N]`` packed, ``s [K/G, N]`` int8 in ``[1, 16]`` (``q * s``
  stays in int8). Exact: the caller scales the int32 sums once per token and channel.
  """
  k = x.shape[1]
  h = k // 2
  lo, hi = unpack_int4_halves(wq, jnp.int8)
  rep = jnp.repeat(s.astype(jnp.int8), group, axis=0)  # [K, N]: each code's group scale
  if h % group:  # a group straddles the halves: the full K axis at once
    q = jnp.concatenate([lo, hi], axis=0) * rep
    return lax.dot(x, q, preferred_element_type=jnp.int32)
  return (lax.dot(x[:, :h], lo * rep[:h], preferred_element_type=jnp.int32)
          + lax.dot(x[:, h:], hi * rep[h:], preferred_element_type=jnp.int32))


def _cpu_chunk(h: int, m: int, group: int | None) -> int:
  """Packed rows per step of :func:`cpu_halves_dot`: ``G`` with groups; else the largest
  divisor of ``K/2`` up to ``_pallas.CPU_ROWS`` that is a multiple of 32 (``K/2`` itself
  when there is none, or from ``_pallas.CPU_WHOLE_M`` tokens)."""
  if group is not None:
    return group
  if m >= _pallas.CPU_WHOLE_M:
    return h
  return _pallas.slice_size(h, _pallas.CPU_ROWS, 32)


def cpu_takes_loop(k: int, group: int | None) -> bool:
  """Whether :func:`cpu_halves_dot` takes a ``[K, N]`` weight with groups ``group``: a
  group must not straddle the packed halves (``(K/2) % G == 0``)."""
  return group is None or (k // 2) % group == 0


def cpu_halves_dot(x: jax.Array, wq: jax.Array, ws: jax.Array, group: int | None, *,
                   k_major: bool, dot_dtype: jax.typing.DTypeLike,
                   acc_dtype: jax.typing.DTypeLike, int_scales: bool = False) -> jax.Array:
  """``sum_g s[g] * (x_g @ q_g)`` in f32, ``[M, N]``, as a loop over slices of packed rows:
  the form XLA:CPU runs fast.

  ``x [M, K]``; ``wq`` the packed bytes as stored, ``[K/2, N]``, or ``[N, K/2]`` when
  ``k_major`` (``weight_layout="nk"``: the dots contract its minor axis, no transpose);
  ``ws [K/G or 1, N]`` the scales of :func:`lowbit.kernels._pallas.weight_operands`.
  Step ``i`` unpacks packed rows ``[i C, (i + 1) C)``, which hold ``k`` in that range (low
  nibbles) and ``k + K/2`` (high), and adds ``(x_lo @ lo) s_lo + (x_hi @ hi) s_hi``:
  ``C = G`` with groups (each step's two partial sums are whole groups, scaled in f32, the
  kernels' arithmetic); without groups up to ``_pallas.CPU_ROWS`` rows below
  ``_pallas.CPU_WHOLE_M`` tokens and all ``K/2`` rows from there (:func:`_cpu_chunk`), the
  sums accumulated in ``acc_dtype`` and scaled once. Needs :func:`cpu_takes_loop`.
  ``int_scales`` (W4A8 with integer group scales, ``ws`` int8 ``[K/G, N]``): each step's
  codes times their group's scale in int8 from ``G`` tokens on; below, each step's int32
  partial sums times the scales (the same integers, less work at decode), all of K summed
  in int32, returned as f32 with no scale applied (:func:`int_scaled_halves_dot`'s
  numbers, exactly). 2 cores, K = N = 4096, weight K-major, interleaved medians of 15:
  7.45 / 7.33 ms at M = 1 / 16 against float group scales' 7.18 / 5.97.

  Why (2 cores, jax 0.10.2, K = N = 4096): unpacking the whole weight first (W4A16: 4 bytes
  a code, written, then read again by the dot) took 23-28 ms at M = 1 against 4-7 ms a
  slice at a time, each slice staying in cache; XLA:CPU runs a batched integer dot (one per
  group) on a slow generic loop (W4A8 g128 at M = 256: 578 ms, this loop 14-20 ms); a
  K-major weight viewed as ``[K, N]`` cost a transposing copy per call (W4A16 g128 at
  M = 1: 104 ms, this loop 8-10 ms).
  """
  m, k = x.shape
  h = k // 2
  if not cpu_takes_loop(k, group):
    raise ValueError(f"cpu_halves_dot: group {group} straddles the packed halves (K = {k}).")
  chunk = _cpu_chunk(h, m, group)
  axis = 1 if k_major else 0
  dims = (((1,), (axis,)), ((), ()))
  prec = lax.Precision.HIGHEST if jnp.dtype(dot_dtype) == jnp.float32 else None
  x = x.astype(dot_dtype)
  if int_scales and (group is None or ws.dtype != jnp.int8):
    raise ValueError("cpu_halves_dot(int_scales=True) takes int8 group scales and a group.")
  s_int, ws = ws, ws.astype(jnp.float32)

  def halves(i, scales=None):
    lo, hi = unpack_int4_halves(lax.dynamic_slice_in_dim(wq, i * chunk, chunk, axis),
                                dot_dtype)
    if scales is not None:  # each half's group scale row [1, N], on the codes
      lo, hi = ((q * (r.T if k_major else r)) for q, r in zip((lo, hi), scales, strict=True))
    return [lax.dot_general(lax.dynamic_slice_in_dim(x, start, chunk, 1), q, dims,
                            precision=prec, preferred_element_type=acc_dtype)
            for start, q in ((i * chunk, lo), (h + i * chunk, hi))]

  n = ws.shape[1]
  if int_scales:
    on_codes = x.shape[0] >= group  # fewer tokens than codes a group: scale the int32 sums

    def int_step(i, acc):
      rows = [lax.dynamic_slice_in_dim(s_int, r, 1, 0) for r in (i, i + h // group)]
      if on_codes:
        return acc + sum(halves(i, rows))
      return acc + sum(p * r.astype(jnp.int32) for p, r in zip(halves(i), rows, strict=True))
    acc = lax.fori_loop(0, h // group, int_step, jnp.zeros((x.shape[0], n), jnp.int32))
    return acc.astype(jnp.float32)
  if group is not None:
    def step(i, acc):
      s_lo = lax.dynamic_slice_in_dim(ws, i, 1, 0)
      s_hi = lax.dynamic_slice_in_dim(ws, i + h // group, 1, 0)
      lo, hi = halves(i)
      return acc + lo.astype(jnp.float32) * s_lo + hi.astype(jnp.float32) * s_hi
    return lax.fori_loop(0, h // group, step, jnp.zeros((m, n), jnp.float32))
  if chunk == h:
    acc = sum(halves(0))
  else:
    acc = lax.fori_loop(0, h // chunk, lambda i, acc: acc + sum(halves(i)),
                        jnp.zeros((m, n), acc_dtype))
  return acc.astype(jnp.float32) * ws


@functools.partial(jax.jit, static_argnames=("out_dtype", "weight_layout"))
def xla(x: jax.Array, w: QArray, *, out_dtype: jnp.dtype | None = None,
        weight_layout: str = "kn") -> jax.Array:
  """The XLA path: unpack the halves to ``x.dtype``, dots, group scales on f32 partial sums.

  ``weight_layout`` as in :func:`w4a16_matmul`. On CPU below ``_pallas.CPU_WHOLE_M``
  tokens a loop over slices of the packed weight (:func:`cpu_halves_dot`), unpacked to f32,
  and from there the weight dequantized to f32 and one dot; elsewhere the whole weight
  unpacked to ``x.dtype``, two dots (batched over groups). Integer group scales: as in
  :func:`w4a16_matmul`.
  """
  if w.channel_scale is not None:
    w, c = _pallas.split_channel_scale(w, weight_layout)
    y = xla(x, w, out_dtype=jnp.float32, weight_layout=weight_layout)
    return (y * c).astype(out_dtype or x.dtype)
  wq, ws, group = _pallas.weight_operands(
      _pallas.logical_weight(w, weight_layout, "w4a16.xla"), "w4a16.xla", packed=True)
  dot_dtype = _pallas.float_dot_dtype(x.dtype)
  if _pallas.platform() == "cpu":
    if x.shape[0] >= _pallas.CPU_WHOLE_M or not cpu_takes_loop(x.shape[1], group):
      # Many tokens share one conversion: dequantize, then one dot (the group scales on the
      # codes: exact for bf16 / f16 scales, one f32 rounding for f32 scales). The loop ran
      # 14-51% slower at M = 256 and 1024 with K, N in 512-1536, within 13% either way at
      # K = N = 4096 (2 cores, interleaved in one process).
      return _pallas.dequant_dot(x, w, weight_layout).astype(out_dtype or x.dtype)
    out = cpu_halves_dot(x, w.qvalue, ws, group, k_major=weight_layout == "nk",
                         dot_dtype=dot_dtype, acc_dtype=jnp.float32)
  else:
    out = grouped_halves_dot(x, wq, ws, group, dot_dtype, jnp.float32)
  return out.astype(out_dtype or x.dtype)


def reference(x: jax.Array, w: QArray, *, out_dtype: jnp.dtype | None = None) -> jax.Array:
  """Dequantize the weight to f32, ``jnp.dot`` at highest precision."""
  out = jnp.dot(x.astype(jnp.float32), dequantize(w), precision=lax.Precision.HIGHEST)
  return out.astype(out_dtype or x.dtype)
