"""W8A8 on Hopper through Pallas' Mosaic GPU backend (TMA + ``wgmma``).

The Triton kernel (:mod:`lowbit.kernels._pallas`) leaves the int8 tensor cores
of an H100/H200 at about 60% of their rate at M = N = K = 8192
(docs/kernels.md). This kernel is the Hopper design of jax's own
``hopper_matmul_mgpu`` for int8 operands:

* persistent: one CTA per SM walks the output tiles in a snake order
  (``planar_snake``) so neighbouring CTAs share operand tiles in L2;
* warp-specialized: a memory warpgroup streams ``x`` and ``w^T`` tiles into
  shared memory with TMA, ``max_concurrent_steps`` deep; two compute
  warpgroups each own a ``tile_m x tile_n`` int32 accumulator in registers
  and issue ``wgmma`` (both int8 operands K-major, what Hopper's 8-bit
  tensor-core instructions read: the weight is passed as ``w^T [N, K]``);
* the epilogue scales in registers, ``out = acc * sx[m] * sw[n]`` in f32,
  and stores through shared memory with TMA, ``epi_tile`` squares at a time.

Interpret mode (``interpret=True``, the CPU tests) runs the same kernel with
the weight as stored, ``[K, N]``: jax's GPU interpreter cannot apply a
transposed shared-memory view inside ``wgmma``, and the hardware cannot take
an int8 operand that is not K-major, so the two differ only in that view.
The integer sums are exact either way.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

#: Shared memory per SM on Hopper that a kernel may use (227 KiB).
SMEM_BYTES = 227 * 1024


@dataclasses.dataclass(frozen=True)
class HopperTiles:
  """Tiles and schedule of the Mosaic GPU W8A8 kernel.

  Attributes:
    tile_m, tile_n: one compute warpgroup's accumulator (``tile_m`` a multiple
      of 64, ``tile_n`` of ``epi_tile``); a CTA computes two of them, stacked
      along ``wg_dim``.
    tile_k: K-step per pipeline stage (bytes of one operand row in shared
      memory: 128 gives the 128-byte swizzle).
    max_concurrent_steps: pipeline depth (TMA loads in flight).
    epi_tile: the epilogue writes ``epi_tile x epi_tile`` squares.
    grid_minor: ``"m"`` or ``"n"``: the minor axis of the snake order.
    grid_tile_width: width of the snake's bands, in CTA tiles.
    wg_dim: ``"n"``: the two warpgroups split the CTA tile along N; ``"m"``:
      along M.
    num_sms: CTAs launched (persistent); ``None`` is the device's SM count
      (132 on an H100 SXM / H200 when there is no GPU, e.g. lowering on CPU).
  """

  tile_m: int = 128
  tile_n: int = 128
  tile_k: int = 128
  max_concurrent_steps: int = 3
  epi_tile: int = 64
  grid_minor: Literal["m", "n"] = "n"
  grid_tile_width: int = 8
  wg_dim: Literal["m", "n"] = "n"
  num_sms: int | None = None

  def __post_init__(self):
    for f in ("tile_m", "tile_n", "tile_k", "max_concurrent_steps", "epi_tile",
              "grid_tile_width"):
      v = getattr(self, f)
      if not isinstance(v, int) or v < 1:
        raise ValueError(f"HopperTiles.{f}={v!r} must be a positive integer.")
    if self.tile_m % 64:
      raise ValueError(f"HopperTiles.tile_m={self.tile_m}: wgmma needs a multiple of 64.")
    if self.tile_n > 256 or self.tile_m > 256:
      raise ValueError(f"HopperTiles: tile_m={self.tile_m}, tile_n={self.tile_n}: at most 256 "
                       "(wgmma's N and a TMA box side).")
    if self.tile_m % self.epi_tile or self.tile_n % self.epi_tile:
      raise ValueError(f"HopperTiles: tile_m={self.tile_m} and tile_n={self.tile_n} must be "
                       f"multiples of epi_tile={self.epi_tile}.")
    if self.tile_k % 32:
      raise ValueError(f"HopperTiles.tile_k={self.tile_k}: int8 wgmma steps K by 32.")
    if self.grid_minor not in ("m", "n") or self.wg_dim not in ("m", "n"):
      raise ValueError(f"HopperTiles: grid_minor={self.grid_minor!r}, wg_dim={self.wg_dim!r}; "
                       "use 'm' or 'n'.")

  @property
  def cta_m(self) -> int:
    return self.tile_m * (2 if self.wg_dim == "m" else 1)

  @property
  def cta_n(self) -> int:
    return self.tile_n * (2 if self.wg_dim == "n" else 1)

  def smem_bytes(self, out_dtype) -> int:
    """Shared memory the kernel allocates: the pipeline's buffers, two epilogue slots per
    warpgroup, the scale vectors."""
    stages = self.max_concurrent_steps * (self.cta_m + self.cta_n) * self.tile_k
    epi = 2 * 2 * self.epi_tile * self.epi_tile * jnp.dtype(out_dtype).itemsize
    return stages + epi + 2 * 4 * (self.tile_m + self.tile_n)


def default_num_sms() -> int:
  """SMs of the default device on GPU; 132 (H100 SXM / H200) elsewhere."""
  d = jax.devices()[0]
  return int(getattr(d, "core_count", 0) or 132) if d.platform == "gpu" else 132


def check_fit(name: str, k: int, n: int, tiles: HopperTiles, out_dtype) -> None:
  """Raise a ``ValueError`` naming the shape and the fix when the tiles cannot cover it
  (any M: the caller pads it to the CTA tile)."""
  if n % tiles.cta_n:
    raise ValueError(
        f"{name}: N={n} is not a multiple of the CTA tile's {tiles.cta_n} columns "
        f"(HopperTiles tile_n={tiles.tile_n}, wg_dim={tiles.wg_dim!r}); pass other tiles "
        "or use backend='gpu'.")
  if k % tiles.tile_k:
    raise ValueError(f"{name}: K={k} is not a multiple of HopperTiles.tile_k={tiles.tile_k}.")
  need = tiles.smem_bytes(out_dtype)
  if need > SMEM_BYTES:
    raise ValueError(
        f"{name}: {tiles} needs {need} bytes of shared memory, more than Hopper's "
        f"{SMEM_BYTES}; lower max_concurrent_steps or the tiles.")


def w8a8_kernel(xq: jax.Array, xs: jax.Array, w: jax.Array, ws: jax.Array, *,
                tiles: HopperTiles, out_dtype, interpret: bool = False,
                name: str = "lowbit_w8a8_hopper") -> jax.Array:
  """``out[m, n] = xs[m] * ws[n] * sum_k xq[m, k] * w[k, n]``, int32 sums.

  Shapes: ``xq [M, K]`` int8 (M a multiple of ``tiles.cta_m``), ``xs [M]`` f32,
  ``w`` int8 ``[N, K]`` (the weight transposed: K-major), or ``[K, N]`` when
  ``interpret`` (see the module docstring), ``ws [N]`` f32. Returns
  ``[M, N]`` in ``out_dtype``. Assumes :func:`check_fit` passed.
  """
  import jax.experimental.pallas.mosaic_gpu as plgpu

  m, k = xq.shape
  n = w.shape[1] if interpret else w.shape[0]
  t = tiles
  cta_m, cta_n = t.cta_m, t.cta_n
  m_iters, n_iters, k_iters = m // cta_m, n // cta_n, k // t.tile_k
  swizzle = plgpu.find_swizzle(t.tile_k * 8)  # int8 rows of tile_k bytes
  in_tr = (plgpu.TilingTransform((8, swizzle)), plgpu.SwizzleTransform(swizzle))
  out_bits = jnp.dtype(out_dtype).itemsize * 8
  out_swizzle = plgpu.find_swizzle(t.epi_tile * out_bits)
  out_tr = (plgpu.TilingTransform((8, out_swizzle * 8 // out_bits)),
            plgpu.SwizzleTransform(out_swizzle))
  if interpret:  # the interpreter ignores physical layouts: no tiling or swizzle here
    w_spec = plgpu.BlockSpec((t.tile_k, cta_n), lambda kk: (kk, 0), memory_space=plgpu.SMEM)
  else:
    w_spec = plgpu.BlockSpec((cta_n, t.tile_k), lambda kk: (0, kk), transforms=in_tr,
                             memory_space=plgpu.SMEM)
  x_spec = plgpu.BlockSpec((cta_m, t.tile_k), lambda kk: (0, kk), transforms=in_tr,
                           memory_space=plgpu.SMEM)
  minor = 0 if t.grid_minor == "m" else 1

  def kernel(x_gmem, xs_gmem, w_gmem, ws_gmem, out_gmem):
    def pipeline(body, context):
      return plgpu.emit_pipeline_warp_specialized(
          body, grid=(k_iters,), memory_registers=40, in_specs=[x_spec, w_spec],
          wg_axis="wg", num_compute_wgs=2, max_concurrent_steps=t.max_concurrent_steps,
          compute_context=context)

    ignore = lambda *_, **__: None  # noqa: E731 (allocation sizes do not depend on the body)

    @functools.partial(
        pl.run_scoped,
        allocs=pipeline(ignore, ignore).get_allocations(x_gmem, w_gmem),
        out_smem=plgpu.SMEM((2, 2, t.epi_tile, t.epi_tile), out_dtype, transforms=out_tr),
        # Per warpgroup: its tile_m x scales, then its tile_n w scales. One buffer, not two:
        # jax 0.10.2's GPU interpreter deadlocks with two small buffers beside the pipeline's.
        scale_smem=plgpu.SMEM((2, t.tile_m + t.tile_n), jnp.float32),
        scale_bar=plgpu.Barrier(num_barriers=4),  # (x, w) scale copy of each warpgroup
        collective_axes="wg")
    def _scope(allocs, out_smem, scale_smem, scale_bar):
      wg = lax.axis_index("wg")

      @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
      def _tiles(info):
        (lin,) = getattr(info, "index", info)  # NDLoopInfo (jax >= 0.8) or the index tuple
        mi, ni = plgpu.planar_snake(lin, (m_iters, n_iters), minor, t.grid_tile_width)
        cm, cn = pl.ds(mi * cta_m, cta_m), pl.ds(ni * cta_n, cta_n)
        if t.wg_dim == "n":
          wm, wn = slice(None), pl.ds(wg * t.tile_n, t.tile_n)
        else:
          wm, wn = pl.ds(wg * t.tile_m, t.tile_m), slice(None)

        def context(eval_pipeline):
          @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((t.tile_m, t.tile_n), jnp.int32))
          def _acc(acc_ref):
            xs_bar, ws_bar = scale_bar.at[wg], scale_bar.at[2 + wg]
            xs_smem = scale_smem.at[wg, pl.ds(0, t.tile_m)]
            ws_smem = scale_smem.at[wg, pl.ds(t.tile_m, t.tile_n)]
            plgpu.copy_gmem_to_smem(xs_gmem.at[cm].at[wm], xs_smem, xs_bar)
            plgpu.copy_gmem_to_smem(ws_gmem.at[cn].at[wn], ws_smem, ws_bar)
            eval_pipeline(acc_ref)
            plgpu.barrier_wait(xs_bar)
            plgpu.barrier_wait(ws_bar)
            shape = (t.tile_m, t.tile_n)
            y = (acc_ref[...].astype(jnp.float32)
                 * lax.broadcast_in_dim(xs_smem[...], shape, (0,))
                 * lax.broadcast_in_dim(ws_smem[...], shape, (1,))).astype(out_dtype)
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            e = t.epi_tile
            per_row = t.tile_n // e
            for a in range(t.tile_m // e):
              for b in range(per_row):
                em, en = slice(a * e, (a + 1) * e), slice(b * e, (b + 1) * e)
                slot = (a * per_row + b) % 2
                plgpu.wait_smem_to_gmem(1, wait_read_only=True)
                out_smem[wg, slot] = y[em, en]
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(out_smem.at[wg, slot],
                                        out_gmem.at[cm, cn].at[wm, wn].at[em, en])

        def mma(_, x_smem, w_smem, acc_ref):
          if interpret:
            w_tile = w_smem.at[:, wn]
          else:
            w_tile = plgpu.transpose_ref(w_smem.at[wn], (1, 0))
          plgpu.wgmma(acc_ref, x_smem.at[wm], w_tile)
          plgpu.wgmma_wait(0)
          return acc_ref

        w_cta = w_gmem.at[:, cn] if interpret else w_gmem.at[cn, :]
        pipeline(mma, context)(x_gmem.at[cm, :], w_cta, allocations=allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  extra = {}
  if interpret:
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    extra["interpret"] = InterpretGPUParams()
  num_sms = t.num_sms or default_num_sms()
  kernel.__name__ = name  # the kernel's name in profiles and HLO
  f = plgpu.kernel(
      kernel, out_type=jax.ShapeDtypeStruct((m, n), out_dtype), grid=(num_sms,),
      grid_names=("sm",), num_threads=3, thread_name="wg",
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      **extra)
  return f(xq, xs, w, ws)
