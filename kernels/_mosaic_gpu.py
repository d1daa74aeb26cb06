"""Hopper kernels in Pallas' Mosaic GPU backend (TMA + ``wgmma``): W8A8
(:func:`w8a8_kernel`, for large M) and int4 decode, W4A16 and W4A8
(:func:`w4_kernel`, the int4 codes as ``wgmma``'s register operand; see its
docstring and docs/kernels.md). Both ran compiled on an H200 (jax 0.11.2,
2026-11-27); :data:`AUTO` says where the wrappers take them by default.

W8A8: the Triton kernel (:mod:`lowbit.kernels._pallas`) leaves the int8 tensor cores
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
from typing import TYPE_CHECKING, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

if TYPE_CHECKING:
  from lowbit.quant import QArray

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
  grid_minor: Literal["m", "n"] = "m"
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


def is_hopper() -> bool:
  """Whether the default device is a Hopper GPU (sm_90: TMA and ``wgmma``)."""
  d = jax.devices()[0]
  return d.platform == "gpu" and str(getattr(d, "compute_capability", "")).startswith("9")


def select_backend(name: str, backend: str | None, block_sizes, tiles_cls: type) -> str:
  """The backend of a kernel that also has a Mosaic GPU variant: tiles of ``tiles_cls``
  name that variant (compiled on GPU, jax's GPU interpreter elsewhere); otherwise the
  platform's Pallas backend (:func:`lowbit.kernels._pallas.resolve_backend`)."""
  from lowbit.kernels import _pallas
  hopper = isinstance(block_sizes, tiles_cls)
  if backend is None and hopper:
    return "mosaic_gpu" if _pallas.platform() == "gpu" else "mosaic_gpu_interpret"
  if backend in ("mosaic_gpu", "mosaic_gpu_interpret"):
    if block_sizes is not None and not hopper:
      raise ValueError(f"{name}(backend={backend!r}): block_sizes must be a {tiles_cls.__name__}, "
                       f"got {type(block_sizes).__name__}.")
    return backend
  if hopper:
    raise ValueError(f"{name}: {tiles_cls.__name__} are the tiles of backend='mosaic_gpu'; pass "
                     "that backend, or BlockSizes for the Triton / TPU kernels.")
  return _pallas.resolve_backend(backend)


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


def _tiled(cols: int, bits: int) -> tuple:
  """Shared-memory transforms of a tile with rows of ``cols`` elements of ``bits``: 8-row
  tiles and the widest swizzle the row allows (what TMA and wgmma want)."""
  import jax.experimental.pallas.mosaic_gpu as plgpu
  sw = plgpu.find_swizzle(cols * bits)
  return (plgpu.TilingTransform((8, sw * 8 // bits)), plgpu.SwizzleTransform(sw))


#: Profiler ranges (named regions) one warpgroup may record in a profiled call
#: (``profile_dir``): a work item records ~5 per K-step, and a decode or M = 256 call runs
#: one work item of at most 32 K-steps per CTA.
PROFILE_EVENTS = 512


def _wgmma_row_layout():
  """The layout of a ``[rows]`` vector of the wgmma accumulator's rows (jax 0.10: the
  WGMMA layout reduced over columns; older releases named it ``WGMMA_ROW``)."""
  import jax.experimental.pallas.mosaic_gpu as plgpu
  wgmma = plgpu.Layout.WGMMA
  return wgmma.reduce(1) if hasattr(wgmma, "reduce") else plgpu.Layout.WGMMA_ROW


def profile_smem_bytes(warpgroups: int) -> int:
  """Shared memory Mosaic GPU's profiler takes (``profile_dir``): per warpgroup (the TMA
  one too) ``PROFILE_EVENTS`` ranges of two events of two 32-bit words."""
  return warpgroups * PROFILE_EVENTS * 2 * 2 * 4


def load_slab_column(slab_smem, slab_set, h: int, col) -> jax.Array:
  """``slab_smem[slab_set, h, :, col]``, ``[tile_n]`` in the wgmma row layout: one
  scalar shared-memory load per row a thread holds.

  The column is strided in shared memory (stride: the slab's width), and Mosaic GPU's
  layout inference rejects a strided shared-memory ref from jax 0.11.2 on ("We cannot
  apply swizzle to non-contiguous refs"), so the load is written at the lane level
  (``plgpu.inline_mgpu``) on the whole, untransformed slab buffer: inference sees that
  buffer and the result's layout, not the strided view."""
  import jax.experimental.mosaic.gpu as mgpu
  import jax.experimental.pallas.mosaic_gpu as plgpu
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith

  layout = _wgmma_row_layout()
  tn = slab_smem.shape[2]
  index = lambda v: arith.index_cast(ir.IndexType.get(), v.registers.item())  # noqa: E731

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), layout, layout),
                     return_type=plgpu.ShapeDtypeStruct((tn,), slab_smem.dtype, layout=layout))
  def load(ctx, ref, set_, col_):
    del ctx
    column = mgpu.utils.memref_slice(ref, (index(set_), h, slice(None), index(col_)))
    signed = True if jnp.issubdtype(slab_smem.dtype, jnp.integer) else None  # int8 scales
    return mgpu.FragmentedArray.load_untiled(column, layout=layout.to_mgpu(), optimized=False,
                                             is_signed=signed)

  return load(slab_smem, jnp.asarray(slab_set, jnp.int32), jnp.asarray(col, jnp.int32))


#: Registers the warp-specialized pipeline leaves the TMA warpgroup
#: (``plgpu.emit_pipeline_warp_specialized(memory_registers=...)``), as both kernels pass it.
MEMORY_REGISTERS = 40


def register_split(compute_wgs: int, memory_registers: int = MEMORY_REGISTERS) -> dict:
  """How a CTA of ``compute_wgs`` compute warpgroups and one TMA warpgroup shares the
  register file once jax's warp-specialized pipeline has run ``setmaxnreg``.

  ptxas launches every thread of a ``T = 128 (compute_wgs + 1)``-thread CTA with
  ``launch = min(255, 8 floor(65536 / (8 T)))`` registers; the pipeline then lowers the
  TMA warpgroup to ``memory_registers`` and raises each compute warpgroup to
  ``compute = 8 floor(min(256, (512 - memory_registers) / compute_wgs) / 8)`` (jax 0.10 to
  0.12, ``pipeline._compute_registers``: as if the CTA held all 512 registers a thread-slot
  of one warpgroup can have). ``setmaxnreg.inc`` takes registers only from those its CTA
  gave back, and waits for them otherwise: the kernel hangs unless
  ``compute_wgs * compute + memory_registers <= (compute_wgs + 1) * launch``.

  >>> register_split(2)
  {'launch': 168, 'compute': 232, 'memory': 40, 'fits': True}
  >>> register_split(4)  # 4 x 112 + 40 = 488 > 5 x 96 = 480: setmaxnreg.inc never returns
  {'launch': 96, 'compute': 112, 'memory': 40, 'fits': False}
  """
  threads = 128 * (compute_wgs + 1)
  launch = min(255, 65536 // threads // 8 * 8)
  compute = int(min(256.0, (512 - memory_registers) / compute_wgs) // 8 * 8)
  fits = compute_wgs * compute + memory_registers <= (compute_wgs + 1) * launch
  return dict(launch=launch, compute=compute, memory=memory_registers, fits=fits)


def _launch(kernel, out_type, num_sms: int, name: str, interpret: bool,
            profile_dir: str | None = None, compute_wgs: int = 2):
  """The persistent launch both kernels share: one CTA per SM (grid axis ``"sm"``), a TMA
  warpgroup and ``compute_wgs`` compute warpgroups (axis ``"wg"``), warpgroup lowering semantics;
  ``interpret`` runs it in jax's GPU interpreter. ``profile_dir``: Mosaic GPU's own
  profiler records the kernel's ``jax.named_scope`` regions per warpgroup (clock
  stamps, no hardware counters) and writes a Perfetto trace there after each call."""
  import jax.experimental.pallas.mosaic_gpu as plgpu
  extra = {}
  if interpret:
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    extra["interpret"] = InterpretGPUParams()
  prof = dict(profile_space=PROFILE_EVENTS, profile_dir=profile_dir) if profile_dir else {}
  kernel.__name__ = name  # the kernel's name in profiles and HLO
  return plgpu.kernel(
      kernel, out_type=out_type, grid=(num_sms,), grid_names=("sm",),
      num_threads=compute_wgs + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup,
                                           **prof),
      **extra)


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
  in_tr = _tiled(t.tile_k, 8)  # int8 rows of tile_k bytes
  out_tr = _tiled(t.epi_tile, jnp.dtype(out_dtype).itemsize * 8)
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
          body, grid=(k_iters,), memory_registers=MEMORY_REGISTERS, in_specs=[x_spec, w_spec],
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
        (lin,) = info.index
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
            w_tile = w_smem.at[wn].transpose((1, 0))
          plgpu.wgmma(acc_ref, x_smem.at[wm], w_tile)
          plgpu.wgmma_wait(0)
          return acc_ref

        w_cta = w_gmem.at[:, cn] if interpret else w_gmem.at[cn, :]
        pipeline(mma, context)(x_gmem.at[cm, :], w_cta, allocations=allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  return _launch(kernel, jax.ShapeDtypeStruct((m, n), out_dtype), t.num_sms or default_num_sms(),
                 name, interpret)(xq, xs, w, ws)


# ---------------------------------------------------------------------------------------
# W4A16 / W4A8: the int4 weight as wgmma's A operand, from registers (decode)
# ---------------------------------------------------------------------------------------

def fragment_order(k: int) -> jax.Array:
  """``sigma``: the K order in which :func:`split_int4_ptx`'s bf16 registers feed ``wgmma``.

  A thread's 32-bit shared-memory load of the packed bytes (``WGMMA_LAYOUT_8BIT``:
  lane ``4 i + c`` holds bytes ``4c .. 4c + 3`` of each 16-byte block of its
  rows) converts to two bf16 pairs that ``WGMMA_LAYOUT`` places at columns
  ``2c, 2c + 1`` and ``2c + 8, 2c + 9`` of the block. Declaring them so (no
  shuffle to restore the natural order) makes ``wgmma``'s column ``16 b + j``
  hold code ``16 b + sigma(j)``, ``sigma(j) = 4 ((j mod 8) div 2) + 2 (j div 8)
  + j mod 2``; the tokens are reordered the same way (``x[:, fragment_order(K)]``,
  :func:`reorder_tokens`), which leaves every dot product unchanged.
  Returns int32 ``[k]``, ``k`` a multiple of 16: :func:`reorder_tokens` of ``0 .. k-1``.
  """
  return reorder_tokens(jnp.arange(k, dtype=jnp.int32)[None])[0]


def bf16_register_index(idx: tuple[int, ...], pair: int) -> tuple[int, ...]:
  """Where :func:`split_int4_ptx` puts bf16 pair ``pair`` (0: bytes ``4c, 4c + 1``; 1:
  ``4c + 2, 4c + 3``) of the ``WGMMA_LAYOUT_8BIT`` register ``idx``: the same
  register of ``WGMMA_LAYOUT``, in its 8-column block ``2 b + pair`` for the
  register's 16-byte block ``b`` (register index 1 in both layouts)."""
  return (idx[0], 2 * idx[1] + pair, *idx[2:])


def reorder_tokens(x: jax.Array) -> jax.Array:
  """``x[:, fragment_order(K)]`` as a reshape and a transpose (XLA fuses it with the
  token tile's padding: no extra kernel): ``x [M, K]``, ``K`` a multiple of 16, each
  16-column block's position ``4c + 2a + b`` moved to ``8a + 2c + b``."""
  m, k = x.shape
  return x.reshape(m, k // 16, 4, 2, 2).transpose(0, 1, 3, 2, 4).reshape(m, k)


def int8_row_register(idx: tuple[int, ...]) -> tuple[int, ...]:
  """The register of a ``[rows]`` vector in the wgmma row layout (:func:`_wgmma_row_layout`,
  registers ``(rows / 64, 1, 2, 1, 1)``) that holds the row of register ``idx`` of a
  ``[rows, cols]`` array in ``WGMMA_LAYOUT_8BIT`` (registers ``(rows / 64, cols / 16, 1, 1,
  2, 1, 1, 1, 1)``): both give a thread rows ``64 a + 16 warp + 8 h + lane / 4``, ``a``
  and ``h`` the register's indices 0 and 4 (tests/kernels/test_mosaic_gpu.py checks the
  layouts)."""
  return (idx[0], 0, idx[4], 0, 0)


def split_int4_ptx(w: jax.Array, act: jnp.dtype, natural: bool = False,
                   folded: bool = False, scales: tuple[jax.Array, jax.Array] | None = None
                   ) -> tuple[jax.Array, jax.Array]:
  """The codes of both packed halves of the bytes ``w`` (int8 ``[rows, cols]`` in
  ``plgpu.Layout.WGMMA_LAYOUT_8BIT``, or ``WGMMA_LAYOUT`` when ``natural``), ready
  for ``wgmma`` with no shuffle (inside a Mosaic GPU kernel only:
  ``plgpu.inline_mgpu``).

  ``act`` bf16 (W4A16): ``(lo, hi)`` bf16 ``[rows, cols]`` in ``WGMMA_LAYOUT``.
  Not ``natural``: one ``_pallas.i4_to_bf16_asm("both")`` per 32-bit register, its
  four bf16 pairs placed in :func:`fragment_order` (the tokens must be reordered to
  match). ``natural``: ``w`` already in the bf16 operand's own layout (a thread's
  register holds the bytes of columns ``2c, 2c + 1`` or ``2c + 8, 2c + 9`` of a
  16-column block: one 2 x 8-bit load), one ``_pallas.i4_pair_to_bf16_asm()`` per
  register gives the lo and the hi bf16 pair at that same register: the codes in
  their K order, the tokens as they are; ``folded`` (natural only): each value
  ``_pallas.FOLDED_OFFSET + s``, without the conversion's two ``fma``s
  (``HopperW4Tiles(offset="folded")``).
  ``act`` int8 (W4A8): ``(16 lo, 16 hi)`` int8 in ``WGMMA_LAYOUT_8BIT`` itself,
  the natural order either way: ``(q << 4) & 0xF0F0F0F0`` and ``q & 0xF0F0F0F0``
  (lowbit.kernels._pallas' ``_ASM_I4_TO_I8X16_*``), 3 instructions per 8 codes.
  ``scales`` (W4A8 with integer group scales): int32 ``[rows]`` vectors ``(s_lo, s_hi)``
  in the wgmma row layout, each row's group scale of each half; then ``(lo s_lo, hi
  s_hi)`` int8, the codes times their scales (``_pallas.ASM_I4_TO_I8_SCALED``, 7
  instructions per 8 codes, the bias words computed once per row).
  """
  import jax.experimental.pallas.mosaic_gpu as plgpu
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import llvm
  from jax.experimental.mosaic import gpu as mgpu
  from lowbit.kernels import _pallas
  src = plgpu.Layout.WGMMA_8BIT
  if scales is not None:
    if jnp.dtype(act) != jnp.int8:
      raise ValueError("split_int4_ptx(scales=...) multiplies int8 codes (W4A8) only.")
    return _split_int4_scaled(w, *scales)
  if jnp.dtype(act) == jnp.int8:
    out = plgpu.ShapeDtypeStruct(w.shape, jnp.int8, src)

    @plgpu.inline_mgpu(arg_types=(src,), return_type=(out, out))
    def convert8(_, fa):
      i32 = ir.IntegerType.get_signless(32)
      halves = (np.empty_like(fa.registers), np.empty_like(fa.registers))
      for idx, reg in np.ndenumerate(fa.registers):
        word = mgpu.utils.bitcast(reg, i32)
        for dst, asm in zip(halves, (_pallas._ASM_I4_TO_I8X16_LO, _pallas._ASM_I4_TO_I8X16_HI),
                            strict=True):
          dst[idx] = mgpu.utils.bitcast(llvm.inline_asm(i32, [word], asm, "=r,r"), reg.type)
      return tuple(mgpu.FragmentedArray(_registers=r, _layout=fa.layout, _is_signed=True)
                   for r in halves)
    return convert8(w)

  dst_layout = plgpu.Layout.WGMMA
  out = plgpu.ShapeDtypeStruct(w.shape, jnp.bfloat16, dst_layout)
  bf16x2 = lambda: ir.VectorType.get((2,), ir.BF16Type.get())  # noqa: E731 (needs a context)

  if natural:
    @plgpu.inline_mgpu(arg_types=(dst_layout,), return_type=(out, out))
    def convert_pairs(_, fa):
      i16, i32 = (ir.IntegerType.get_signless(b) for b in (16, 32))
      result = llvm.StructType.get_literal([i32] * 2)
      asm = _pallas.i4_pair_to_bf16_asm(folded=folded)
      lo, hi = np.empty_like(fa.registers), np.empty_like(fa.registers)
      for idx, reg in np.ndenumerate(fa.registers):  # vector<2xi8>: bytes 2c, 2c + 1
        word = llvm.zext(i32, mgpu.utils.bitcast(reg, i16))  # the 16-bit load as it is
        r = llvm.inline_asm(result, [word], asm, "=r,=r,r")
        lo[idx], hi[idx] = (mgpu.utils.bitcast(llvm.extractvalue(i32, r, (j,)), bf16x2())
                            for j in (0, 1))
      return tuple(mgpu.FragmentedArray(_registers=r, _layout=dst_layout.to_mgpu(),
                                        _is_signed=None) for r in (lo, hi))
    return convert_pairs(w)

  if folded:
    raise ValueError("split_int4_ptx(folded=True) converts natural-order pairs only: "
                     "pass natural=True (HopperW4Tiles(unpack='ptx_natural')).")

  @plgpu.inline_mgpu(arg_types=(src,), return_type=(out, out))
  def convert16(_, fa):
    i32 = ir.IntegerType.get_signless(32)
    result = llvm.StructType.get_literal([i32] * 4)
    asm = _pallas.i4_to_bf16_asm("both")
    shape = list(fa.registers.shape)  # twice the column blocks, half as wide
    shape[1] *= 2
    lo, hi = np.empty(shape, object), np.empty(shape, object)
    for idx, reg in np.ndenumerate(fa.registers):
      word = mgpu.utils.bitcast(reg, i32)
      r = llvm.inline_asm(result, [word], asm, "=r,=r,=r,=r,r")
      v = [mgpu.utils.bitcast(llvm.extractvalue(i32, r, (j,)), bf16x2()) for j in range(4)]
      for dst, pairs in ((lo, v[:2]), (hi, v[2:])):
        for j in (0, 1):
          dst[bf16_register_index(idx, j)] = pairs[j]
    return tuple(mgpu.FragmentedArray(_registers=r, _layout=dst_layout.to_mgpu(), _is_signed=None)
                 for r in (lo, hi))
  return convert16(w)


def _split_int4_scaled(w: jax.Array, s_lo: jax.Array, s_hi: jax.Array
                       ) -> tuple[jax.Array, jax.Array]:
  """:func:`split_int4_ptx` with integer group scales (``scales=(s_lo, s_hi)``)."""
  import jax.experimental.pallas.mosaic_gpu as plgpu
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith, llvm
  from jax.experimental.mosaic import gpu as mgpu
  from lowbit.kernels import _pallas
  src, row = plgpu.Layout.WGMMA_8BIT, _wgmma_row_layout()
  out = plgpu.ShapeDtypeStruct(w.shape, jnp.int8, src)

  @plgpu.inline_mgpu(arg_types=(src, row, row), return_type=(out, out))
  def convert_scaled(_, fa, lo_s, hi_s):
    i32 = ir.IntegerType.get_signless(32)
    result = llvm.StructType.get_literal([i32] * 2)
    rows = fa.registers.shape
    if len(rows) != 9 or lo_s.registers.shape != (rows[0], 1, rows[4], 1, 1):
      raise ValueError(f"split_int4_ptx(scales=...): registers {rows} of the codes and "
                       f"{lo_s.registers.shape} of the scales are not the layouts "
                       "int8_row_register maps (this jax's Mosaic GPU changed them).")

    def const(v):
      return arith.constant(i32, ir.IntegerAttr.get(i32, v - (1 << 32) if v >= 1 << 31 else v))
    cache = {}

    def scale_and_bias(fs, h, r):  # each row's scale and bias word, computed once
      if (h, r) not in cache:
        s = mgpu.utils.bitcast(fs.registers[r], i32)
        bias = arith.subi(const(0x80808080), arith.muli(s, const(0x08080808)))
        cache[h, r] = (s, bias)
      return cache[h, r]

    lo, hi = np.empty_like(fa.registers), np.empty_like(fa.registers)
    for idx, reg in np.ndenumerate(fa.registers):
      r = int8_row_register(idx)
      word = mgpu.utils.bitcast(reg, i32)
      operands = [word, *scale_and_bias(lo_s, 0, r), *scale_and_bias(hi_s, 1, r)]
      res = llvm.inline_asm(result, operands, _pallas.ASM_I4_TO_I8_SCALED, "=r,=r,r,r,r,r,r")
      lo[idx], hi[idx] = (mgpu.utils.bitcast(llvm.extractvalue(i32, res, (j,)), reg.type)
                          for j in (0, 1))
    return tuple(mgpu.FragmentedArray(_registers=r, _layout=fa.layout, _is_signed=True)
                 for r in (lo, hi))
  return convert_scaled(w, s_lo, s_hi)


def mma_sync_a_registers(block: int, chunk: int) -> tuple[tuple[int, ...], ...]:
  """The ``WGMMA_LAYOUT`` registers of a bf16 ``[rows, cols]`` array that form the A
  fragment of ``mma.sync.m16n8k16`` for 64-row block ``block`` and K-chunk ``chunk``
  (columns ``16 chunk ..``), in PTX's order ``a0 .. a3``.

  A thread (warp ``w``, lane ``4 g + t``) holds in register ``(b, c8, 0, 0, r8, 0, 0, 0,
  0)`` the pair at row ``64 b + 16 w + 8 r8 + g``, columns ``8 c8 + 2t, 8 c8 + 2t + 1``
  (the layout's tiling: ``tests/kernels/test_mma_sync.py`` checks it against Mosaic
  GPU's). PTX's A fragment of a warp's ``16 x 16`` slice: ``a0`` row ``g`` columns
  ``2t, 2t + 1``; ``a1`` row ``g + 8``; ``a2`` row ``g``, columns ``+ 8``; ``a3`` row
  ``g + 8``, columns ``+ 8``: the warp's 16 rows of the block are its ``m16`` tile.

  >>> [(r[1], r[4]) for r in mma_sync_a_registers(0, 1)]  # (8-column block, row half)
  [(2, 0), (2, 1), (3, 0), (3, 1)]
  """
  return tuple((block, 2 * chunk + i // 2, 0, 0, i % 2, 0, 0, 0, 0) for i in range(4))


def mma_sync_b_parts(tile: int, chunk: int, upper: int, width: int) -> tuple[int, int]:
  """``(bytes, chunk16)``: the lane-independent parts of :func:`mma_sync_b_offset` (with
  ``col0 = 0``): the byte offset of the 1024-byte tile and the 16-byte chunk of a row that
  the word's unswizzled position falls in."""
  col = 16 * chunk + 8 * upper
  return tile * (width // 64) * 1024 + col // 64 * 1024, col % 64 // 8


def mma_sync_b_offset(g: int, t: int, tile: int, chunk: int, upper: int, col0: int,
                      width: int) -> int:
  """Byte offset, in a token tile's shared-memory buffer, of the 32-bit word a lane
  (``g = lane // 4``, ``t = lane % 4``) loads as register ``upper`` (``b0``: 0,
  ``b1``: 1) of the B fragment of ``mma.sync.m16n8k16`` for token tile ``tile``
  (tokens ``8 tile ..``) and K-chunk ``chunk`` of the K-step at column ``col0``.

  The word holds ``x[r, c], x[r, c + 1]``, ``r = 8 tile + g``, ``c = col0 + 16 chunk
  + 8 upper + 2t`` (PTX's B fragment, ``B[k, n] = x[n, k]``: ``b0`` rows ``k = 2t,
  2t + 1`` of column ``n = g``, ``b1`` rows ``k + 8``). The buffer, bf16
  ``[tm, width]``, is stored as TMA writes it for the ``wgmma`` kernel: ``8 x 64``
  tiles of 1024 bytes, row-major over ``(tm / 8, width / 64)``, each with the 128-byte
  swizzle (16-byte chunk ``j`` of row ``i`` at chunk ``j ^ i``). ``col0`` a multiple
  of 64. :func:`mma_sync_bf16` computes the same sum from :func:`mma_sync_b_parts`.

  >>> [mma_sync_b_offset(g, 0, 0, 0, 0, 0, 256) for g in range(3)]  # chunk 0 of rows 0-2
  [0, 144, 288]
  """
  tile_bytes, chunk16 = mma_sync_b_parts(tile, chunk, upper, width)
  return col0 // 64 * 1024 + tile_bytes + g * 128 + (chunk16 ^ g) * 16 + 4 * t


def mma_sync_ldmatrix_offset(lane: int, tile: int, pair: int, col0: int, width: int) -> int:
  """Byte offset of the 16-byte row that ``lane`` gives ``ldmatrix.m8n8.x4`` (matrix ``i =
  lane // 8``, row ``lane % 8``) so that it returns the B fragments of K-chunks ``2 pair``
  and ``2 pair + 1``: matrix ``i`` is chunk ``2 pair + i // 2``'s ``b{i % 2}`` for the 8
  tokens of ``tile``, and ``ldmatrix`` hands lane ``(g, t)`` elements ``2t, 2t + 1`` of
  row ``g`` of each, the words :func:`mma_sync_b_offset` names.

  >>> [mma_sync_ldmatrix_offset(lane, 0, 0, 0, 256) for lane in (0, 1, 8, 16)]
  [0, 144, 16, 32]
  """
  i = lane // 8
  return mma_sync_b_offset(lane % 8, 0, tile, 2 * pair + i // 2, i % 2, col0, width)


def mma_sync_bf16(a: jax.Array, x_ref, col0, tm: int, sums: bool = False):
  """``a @ x[:, col0 : col0 + cols]^T`` by ``mma.sync.m16n8k16`` (f32 sums), inside a
  Mosaic GPU kernel (``plgpu.inline_mgpu``): ``a`` bf16 ``[rows, cols]`` in
  ``WGMMA_LAYOUT`` (rows 64 or 128, cols a multiple of 16), ``x_ref`` the token
  tile's shared-memory buffer, bf16 ``[tm, width]`` as :func:`mma_sync_b_offset`
  reads it, ``col0`` an int32 scalar. Returns f32 ``[rows, tm]`` in ``WGMMA_LAYOUT``.

  Each warp multiplies its own 16 rows of each 64-row block (its A registers as they
  are: :func:`mma_sync_a_registers`) by every 8-token tile, loading the tokens' B
  fragments itself (one ``ldmatrix.x4`` per two chunks and token tile,
  :func:`mma_sync_ldmatrix_offset`; each warp loads the same words); two accumulator
  chains per output tile (even and odd chunks), added at the end. The accumulators come
  out in PTX's C fragment order, which is the ``WGMMA_LAYOUT`` of the ``[rows, tm]``
  result: ``c0, c1`` row ``g``, ``c2, c3`` row ``g + 8``, columns ``2t, 2t + 1`` of the
  token tile. No warpgroup fence or wait: the MMAs are per warp and their results
  scoreboarded like any register.

  ``sums``: also ``ones @ x[:, col0 : col0 + cols]^T``, each token's sum over the columns
  in every row (f32 ``[rows, tm]``, the same layout), from the same B fragments: one more
  MMA per K-chunk and token tile, its A operand the constant bf16 1.0 (no registers
  loaded or converted), once per warp whatever ``rows``; returns ``(product, sums)``
  (``HopperW4Tiles(offset="folded")``)."""
  import jax.experimental.mosaic.gpu as mgpu
  import jax.experimental.pallas.mosaic_gpu as plgpu
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith, llvm, nvvm, vector

  rows, cols = a.shape
  chunks, blocks, tiles = cols // 16, rows // 64, tm // 8
  layout = plgpu.Layout.WGMMA
  out = plgpu.ShapeDtypeStruct((rows, tm), jnp.float32, layout)

  @plgpu.inline_mgpu(arg_types=(layout, plgpu.RefType(_tiled(64, 16)), _wgmma_row_layout()),
                     return_type=(out, out) if sums else out)
  def run(_, fa, ref, col):
    i32, f32 = ir.IntegerType.get_signless(32), ir.F32Type.get()
    c = lambda v: mgpu.utils.c(v, i32)  # noqa: E731
    width = ir.MemRefType(ref.type).shape[1] * 64  # the tiled buffer: [tm/8, width/64, 8, 64]
    lane = arith.andi(mgpu.utils.thread_idx(), c(31))
    row, mat = arith.andi(lane, c(7)), arith.shrui(lane, c(3))
    i8 = ir.IntegerType.get_signless(8)
    base = mgpu.utils.getelementptr(  # the K-step's first 1024-byte tile
        mgpu.utils.memref_ptr(ref), [arith.muli(arith.shrui(col.registers.item(), c(6)), c(1024))],
        i8)
    # mma_sync_ldmatrix_offset: for chunk pair p, 16-byte chunk (2p mod 8) + mat of the row,
    # swizzled (xor the row), in the pair's 1024-byte tile (the pair never crosses one)
    row128 = arith.muli(row, c(128))
    swizzled = {lo: arith.addi(row128, arith.shli(arith.xori(arith.addi(mat, c(lo)), row), c(4)))
                for lo in (0, 4)}
    x4 = ir.Attribute.parse("#nvvm.ld_st_matrix_shape<m=8, n=8>")

    def b_words(tile, pair):
      """The B fragments ``(b0, b1)`` of chunks ``2 pair`` and ``2 pair + 1``: one
      ``ldmatrix.x4`` (a 16-byte row per lane)."""
      tile_bytes, chunk16 = mma_sync_b_parts(tile, 2 * pair, 0, width)
      offset = arith.addi(swizzled[chunk16], c(tile_bytes)) if tile_bytes else swizzled[chunk16]
      ptr = mgpu.utils.getelementptr(base, [offset], i8)
      got = nvvm.ldmatrix(ptr, layout=nvvm.MMALayout.row, num=4, shape=x4,
                          elt_type=nvvm.LdStMatrixEltType.B16)
      return [llvm.extractvalue(i32, got, [k]) for k in range(4)]

    asm = ("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {$0,$1,$2,$3}, "
           "{$4,$5,$6,$7}, {$8,$9}, {$10,$11,$12,$13};")
    acc_t = llvm.StructType.get_literal([f32] * 4)
    zero = arith.constant(f32, 0.0)
    bwords = {}
    for q in range(tiles):
      for pair in range(chunks // 2):
        w = b_words(q, pair)
        for k in range(4):
          bwords[q, 2 * pair + k // 2, k % 2] = w[k]
    vec2 = ir.VectorType.get((2,), f32)

    def product(a_words, q):
      """The ``[16, 8]`` product of a warp's A words (per chunk) and token tile ``q``, as
      the two register pairs of rows ``g`` and ``g + 8``."""
      chains = [[zero] * 4, [zero] * 4]
      for j in range(chunks):
        acc = chains[j % 2]
        r = llvm.inline_asm(acc_t, [*a_words[j], bwords[q, j, 0], bwords[q, j, 1], *acc], asm,
                            "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f")
        chains[j % 2] = [llvm.extractvalue(f32, r, (i,)) for i in range(4)]
      d = [arith.addf(e, o) for e, o in zip(*chains, strict=True)]
      return [vector.from_elements(vec2, d[2 * r8:2 * r8 + 2]) for r8 in (0, 1)]

    shape = layout.to_mgpu().registers_shape((rows, tm))
    regs = np.empty(shape, object)
    for blk in range(blocks):
      a_words = [[mgpu.utils.bitcast(fa.registers[idx], i32) for idx in mma_sync_a_registers(blk, j)]
                 for j in range(chunks)]
      for q in range(tiles):
        for r8, v in enumerate(product(a_words, q)):
          regs[blk, q, 0, 0, r8, 0, 0, 0, 0] = v
    result = mgpu.FragmentedArray(_registers=regs, _layout=layout.to_mgpu(), _is_signed=None)
    if not sums:
      return result
    one = c(0x3F803F80)  # bf16 pair (1.0, 1.0): every A register of the ones tile
    total = np.empty(shape, object)
    for q in range(tiles):
      pairs = product([[one] * 4] * chunks, q)  # rows alike: once, for every block
      for blk in range(blocks):
        for r8, v in enumerate(pairs):
          total[blk, q, 0, 0, r8, 0, 0, 0, 0] = v
    return result, mgpu.FragmentedArray(_registers=total, _layout=layout.to_mgpu(),
                                        _is_signed=None)

  return run(a, x_ref, jnp.asarray(col0, jnp.int32))


def store_transposed(z: jax.Array, ref, m: int, scale=None, row_scale=None) -> None:
  """``ref[j, i] = z[i, j]`` for ``j < m``: ``z`` ``[rows, cols]`` in ``WGMMA_LAYOUT``
  (a warpgroup's sums, weight rows by tokens), ``ref`` a global ``[>= m, rows]`` slice
  of the output (inside a Mosaic GPU kernel only). Each thread stores its own elements,
  one scalar store each, skipping tokens past ``m``: no shared memory, no TMA (whose
  boxes cannot write a transposed tile), a handful of stores per thread at decode.
  ``scale``: a global f32 ``[>= m]`` ref of the tokens' scales; then ``z`` is f32 and
  ``ref[j, i] = cast(z[i, j] * scale[j])`` in ``ref``'s dtype (round to nearest even,
  what ``astype`` does), each scale read by the threads that hold its token.
  ``row_scale`` (with ``scale``): a global f32 ``[rows]`` ref, each weight row's scale
  (integer group scales' channel scale): ``cast(z[i, j] * scale[j] * row_scale[i])``."""
  import jax.experimental.pallas.mosaic_gpu as plgpu
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith, memref, scf

  def body(out, sc, rs, value, idx):
    row, col = idx
    keep = scf.IfOp(arith.cmpi(arith.CmpIPredicate.ult, col, arith.constant(
        ir.IndexType.get(), m)))
    with ir.InsertionPoint(keep.then_block):
      if sc is not None:
        value = arith.mulf(value, memref.load(sc, [col]))
        if rs is not None:
          value = arith.mulf(value, memref.load(rs, [row]))
        out_type = ir.MemRefType(out.type).element_type
        if out_type != value.type:
          value = arith.truncf(out_type, value)
      memref.store(value, out, [col, row])
      scf.yield_([])

  if row_scale is not None and scale is None:
    raise ValueError("store_transposed: row_scale needs the tokens' scale too.")
  refs = (ref,) + tuple(r for r in (scale, row_scale) if r is not None)

  @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA, *[plgpu.RefType()] * len(refs)))
  def store(_, fa, out, sc=None, rs=None):
    fa.foreach(functools.partial(body, out, sc, rs))
  store(z, *refs)


@dataclasses.dataclass(frozen=True)
class HopperW4Tiles:
  """Tiles and schedule of the Mosaic GPU int4 kernel (:func:`w4_kernel`: W4A16, W4A8).

  The kernel computes ``out^T = w^T x^T``: a weight tile is ``wgmma``'s A
  operand (``tile_n`` rows of N, converted int4 -> bf16 in registers) and a
  token tile its B operand (``tile_m`` tokens, in shared memory), so a decode
  step with M = 1 pads the tokens to 8, not to wgmma's 64 rows.

  Attributes:
    tile_n: weight rows (of N) per compute warpgroup, 64 or 128; a CTA owns
      ``compute_wgs * tile_n``.
    tile_m: tokens per tile, a multiple of 8 up to 256; ``None``: M rounded
      up to 8, at most 64.
    tile_k: int4 codes of K per pipeline step (even, a multiple of 64);
      ``None``: ``2 * group_size`` for grouped weights (one group of each
      packed half per step), 256 per-channel. Grouped weights need
      ``tile_k == 2 * group_size``.
    split_k: work items per output tile along K (partial sums added in f32 by
      XLA); ``None``: as many as keep every SM busy.
    max_concurrent_steps: pipeline depth; ``None``: the most (up to 4; with
      ``wg_split="steps"`` up to ``4 compute_wgs``) that fit in shared memory.
    num_sms: CTAs launched (persistent); ``None``: the device's SM count.
    wide_load: W4A16: load the int4 codes 8 per 32-bit shared-memory access
      (the layout Mosaic GPU makes for 4 -> 16-bit upcasts, then a relayout
      with one warp shuffle per register); ``False`` leaves the load's layout
      to Mosaic's inference, which reads one byte at a time (checked in the
      lowered module) and needs no shuffle. W4A8 always takes the inferred
      layout (16-bit loads, no shuffle).
    compute_wgs: compute warpgroups per CTA, 2 to 4 (a CTA owns
      ``compute_wgs * tile_n`` weight rows): more warps to hide the latency of
      the conversion and of each step's wgmma, fewer registers each. 4 runs
      interpreted only: compiled, jax's pipeline splits the registers of a
      640-thread CTA into more than it is launched with and the kernel hangs
      (:func:`register_split`; H200 run 8), so :func:`plan_w4` refuses it.
    nibbles: how a byte's two codes reach ``wgmma``. ``"split"``: the bytes
      are loaded as int8 and split in registers, ``16 * lo = byte << 4`` and
      ``16 * hi = byte & 0xF0`` (exact in int8 and bf16; the ``1/16`` goes
      into the f32 scaling), so each packed half is its own ``wgmma`` over
      its own tokens: no zero padding, half the MMA work, and the tokens are
      read from ``x`` as they are (no spread copy). ``"interleaved"``: the
      bytes viewed as ``int4 [N, K]`` (codes of the two halves alternate
      along K), converted by Mosaic's int4 sequences; grouped weights then
      need one ``wgmma`` per half against tokens zeroed in the other half.
    nk_scales: group scales of a weight stored K-major (``weight_layout="nk"``,
      scales ``[N, K/G]``). ``"slab"``: the kernel reads them as stored, each
      work item one ``[tile_n, W]`` slab per packed half (``W`` its K-steps,
      rounded up to 8) into shared memory with TMA, and each step takes its
      column in registers; ``"transpose"`` (the default until a GPU run times
      the slab): XLA transposes them to ``[K/G, N]`` per call (one more kernel
      launch, about 2 us at K = N = 8192 on an H200) and the pipeline streams
      one row per step, as for a ``"kn"`` weight.
    unpack: with ``nibbles="split"``: ``"ops"`` splits the bytes with bitwise
      jnp operations and lets Mosaic GPU convert int8 -> bf16 and lay the result
      out for ``wgmma`` (W4A16, in the lowered module per step and thread at
      ``tile_n=128``: ~670 instructions and 64 warp shuffles); ``"ptx"`` loads
      the bytes in the 8-bit ``wgmma`` operand layout (32-bit loads) and
      converts each register with inline PTX (:func:`split_int4_ptx`): W4A16
      12 instructions per 8 codes, the true codes (no 1/16 factor), no
      shuffle, the tokens reordered per call to the registers' K order
      (:func:`fragment_order`; one more XLA op per call unless it fuses with
      the op making ``x``); W4A8 3 instructions per 8 codes.
      ``"ptx_natural"`` (W4A16; W4A8 takes it as ``"ptx"``): the bytes loaded 2 at
      a time straight into the bf16 operand's layout, each pair converted by 6
      PTX instructions into its lo and hi bf16 pairs at that same place: the K
      order is the natural one, so the tokens go to the kernel as they are (with
      ``pad_tokens=False`` no XLA op before the kernel), at twice the loads of
      ``"ptx"``. Interpreted, all run jnp in the natural order (same numbers).
    int_sums: W4A8 with grouped weights: how each step's int32 group sums
      become f32 before their scale. ``"cvt"``: ``cvt.rn.f32.s32``, which Hopper
      runs at 16 per clock and SM, an eighth of the f32 rate: at M = 256 with
      128-token tiles a step's two ``[tile_n, 128]`` conversions take longer
      than its MMAs (1024 vs 512 clocks per warpgroup, counted from the
      instruction rates). ``"magic"``: an integer add of ``0x4B400000``, a
      bitcast and an f32 subtract of ``1.5 * 2**23`` (full-rate operations),
      exact for ``|sum| < 2**22``; the kernel's group sums are at most ``2**21``
      (128 codes of ``|16 c| <= 128`` times ``|x| <= 128``).
    pad_tokens: ``False``, with ``nibbles="split"`` and fewer tokens than one
      token tile (decode): the tokens go to the kernel as they are and TMA
      fills the tile's rows past M with zeros (out-of-bounds reads are defined
      for TMA and only reach output columns that are dropped), instead of an
      XLA pad per call (a kernel launch of its own, ~1 us of device time at
      decode). GPU only: interpreted, the tokens are padded either way.
    wg_split: how a CTA's compute warpgroups share its work item. ``"n"``: each
      its own ``tile_n`` weight rows (a CTA owns ``compute_wgs * tile_n``).
      ``"k"`` (``nibbles="split"``): all the same ``tile_n`` rows, warpgroup
      ``w`` taking K-step ``w`` of every ``compute_wgs`` (one pipeline step
      carries ``compute_wgs`` K-steps), their partial sums added in shared
      memory at the end of the work item: ``compute_wgs`` times more work items
      for the same warps, so a decode call fills the SMs without splitting K
      over CTAs (which leaves XLA a reduction to run). ``"steps"``: the same
      sharing of rows, but a pipeline step carries one K-step (``steps_per_wait``)
      and warpgroup ``w`` takes the steps ``t = w mod compute_wgs`` (the others pass
      them by): any count of K-steps, so 3 compute warpgroups (3 warps a scheduler
      where 2 leave the decode kernel latency-bound; 4 hang) divide K = 8192's 32.
    epilogue: ``"xla"``: the kernel writes f32 partial sums ``[split_k, N, M]``
      and XLA adds the K-splits, transposes and casts (one small fusion per
      call). ``"kernel"`` (grouped weights, no K split across CTAs: ``split_k``
      1, which ``None`` then means): the kernel writes the final ``[M, N]`` in
      the output dtype itself, each element stored transposed from registers
      (rows past M skipped; W4A8 multiplies each by its token's scale there,
      ``out = round(y * sx[m])`` as XLA's fusion does), so with
      ``unpack="ptx_natural"``, ``pad_tokens=False`` and ``nk_scales="slab"``
      a W4A16 decode call is that one kernel and nothing else; with several
      token tiles the output has whole tiles' rows and XLA slices off the
      padding (nothing when M is a multiple of ``tile_m``).
    steps_per_wait: K-steps a compute warpgroup converts and issues before it
      waits for their ``wgmma``s (``nibbles="split"``): a pipeline step carries
      ``steps_per_wait`` K-steps per warpgroup (times ``compute_wgs`` with
      ``wg_split="k"``), each converted right before its ``wgmma``s are issued,
      so a K-step's conversion overlaps the previous one's MMAs and the wait's
      latency is paid once per ``steps_per_wait`` K-steps; grouped weights then
      scale each K-step's group sums after that one wait (``2 steps_per_wait``
      accumulators: at decode, 4 registers a thread each).
    mma: the tensor-core instruction (W4A16, ``unpack="ptx_natural"``, tokens in tiles
      of at most 32). ``"wgmma"``: Hopper's warpgroup MMA, ``m64n8k16`` with the
      converted codes from registers, issued by the warpgroup, then waited for.
      ``"sync"``: each warp issues ``mma.sync.m16n8k16`` (Ampere's warp MMA, which
      Hopper runs too) on its 16 rows of the same registers, against the tokens'
      fragments it loads from the token tile itself (:func:`mma_sync_bf16`): the
      instruction Marlin's decode kernels use. At decode every ``wgmma`` is a
      ``64 x 8 x 16`` product whatever M is, and run 8's profile timed their issue at
      ~46 clocks each (0.75 us for a step's 32); whether the warp MMAs are cheaper
      there is what the next GPU run's sweep times. Interpreted, both are the same
      ``jnp.dot``.
    halves: grouped weights: how a K-step's two packed halves go through ``wgmma``.
      ``"together"``: both halves' wgmmas issued, one wait, then both group sums
      scaled into the f32 total (two sums live beside it). ``"apart"``: each half's
      issued, waited for and scaled before the next half's, so one group sum is
      live at a time: at 128-token tiles (W4A8's M = 256 tiles) a warpgroup's
      two ``[tile_n, 128]`` int32 sums and the f32 total no longer fit its
      registers together, and every such candidate spilled inside the K-step
      loop (76-108 bytes, 2-5 spill loads a step; ``experiments/sass_stats.py``);
      with ``"apart"`` none do, for the same instructions, at the cost of a wait
      per half instead of per step.
    pingpong: the compute warpgroups take turns at the tensor cores (CUTLASS's
      "pingpong" order, per K-step here): warpgroup ``w`` converts its codes, waits for
      its turn, issues its ``wgmma``s, waits for them and passes the turn to warpgroup
      ``w + 1`` (mod ``compute_wgs``) before it scales its group sums, so one
      warpgroup's scaling runs while the next one's MMAs do. Without it the warpgroups
      issue together and the tensor cores share out both sets of MMAs, so both wait for
      both, then both scale while the tensor cores idle: run 8's profile of W4A8 at
      M = 256 (128-token tiles) has ``issue`` + ``wait`` ~0.53 us a step, what two
      warpgroups' ``m64n128k32`` MMAs take at the int8 rate, then ``scale`` 0.66 us.
      The numbers are the same either way (each warpgroup's own sums, in its own
      order); only when MMAs run changes.
    offset: W4A16 with ``mma="sync"`` and group scales: where the codes' offset goes.
      ``"fma"``: each code converted to its bf16 value ``s`` (6 instructions per 4 codes:
      ``prmt``, ``shr``, two ``lop3``, two bf16x2 ``fma``s that subtract 136).
      ``"folded"``: without the ``fma``s (4 instructions per 4 codes), each code enters
      the MMA as ``136 + s`` (exact in bf16), and each warp also multiplies a ``16 x 16``
      tile of ones by the same token fragments it loaded, one MMA per K-chunk, for each
      group's token sums ``X[g, m]``; the group's f32 sum becomes ``acc - 136 X`` before
      its scale: ``y = sum_g scale[g] (sum_k (136 + s_k) x_k - 136 sum_k x_k)``. Run 9's
      profile put the conversion first in the decode step; the default kernel's loop is
      319 SASS instructions a step and thread, 64 of them those ``fma``s
      (``experiments/sass_stats.py``). The subtraction costs f32 precision where
      ``136 |X|`` dwarfs the sum: about ``2**-24 * 136 |X| / |acc - 136 X|`` relative.
  """

  tile_n: int = 64
  tile_m: int | None = None
  tile_k: int | None = None
  split_k: int | None = None
  max_concurrent_steps: int | None = None
  num_sms: int | None = None
  wide_load: bool = True
  nibbles: Literal["split", "interleaved"] = "interleaved"
  compute_wgs: int = 2
  nk_scales: Literal["slab", "transpose"] = "transpose"
  unpack: Literal["ops", "ptx", "ptx_natural"] = "ops"
  int_sums: Literal["cvt", "magic"] = "cvt"
  pad_tokens: bool = True
  wg_split: Literal["n", "k", "steps"] = "n"
  epilogue: Literal["xla", "kernel"] = "xla"
  halves: Literal["together", "apart"] = "together"
  steps_per_wait: int = 1
  mma: Literal["wgmma", "sync"] = "wgmma"
  pingpong: bool = False
  offset: Literal["fma", "folded"] = "fma"

  def __post_init__(self):
    if self.wg_split not in ("n", "k", "steps"):
      raise ValueError(f"HopperW4Tiles.wg_split={self.wg_split!r}: use 'n', 'k' or 'steps'.")
    if self.wg_split != "n" and self.nibbles != "split":
      raise ValueError(f"HopperW4Tiles(wg_split={self.wg_split!r}) splits K over the "
                       "compute warpgroups for split nibbles only: pass nibbles='split'.")
    if self.halves not in ("together", "apart"):
      raise ValueError(f"HopperW4Tiles.halves={self.halves!r}: use 'together' or 'apart'.")
    if self.epilogue not in ("xla", "kernel"):
      raise ValueError(f"HopperW4Tiles.epilogue={self.epilogue!r}: use 'xla' or 'kernel'.")
    if self.int_sums not in ("cvt", "magic"):
      raise ValueError(f"HopperW4Tiles.int_sums={self.int_sums!r}: use 'cvt' or 'magic'.")
    if self.unpack not in ("ops", "ptx", "ptx_natural"):
      raise ValueError(f"HopperW4Tiles.unpack={self.unpack!r}: use 'ops', 'ptx' or "
                       "'ptx_natural'.")
    if self.unpack != "ops" and (self.nibbles != "split" or not self.wide_load):
      raise ValueError(f"HopperW4Tiles(unpack={self.unpack!r}) converts split nibbles from "
                       "vector loads: pass nibbles='split' and wide_load=True.")
    if self.nk_scales not in ("slab", "transpose"):
      raise ValueError(f"HopperW4Tiles.nk_scales={self.nk_scales!r}: use 'slab' or 'transpose'.")
    if not isinstance(self.steps_per_wait, int) or self.steps_per_wait < 1:
      raise ValueError(f"HopperW4Tiles.steps_per_wait={self.steps_per_wait!r} must be a "
                       "positive integer.")
    if self.mma not in ("wgmma", "sync"):
      raise ValueError(f"HopperW4Tiles.mma={self.mma!r}: use 'wgmma' or 'sync'.")
    if not isinstance(self.pingpong, bool):
      raise ValueError(f"HopperW4Tiles.pingpong={self.pingpong!r}: use True or False.")
    if self.pingpong and (self.mma != "wgmma" or self.wg_split == "steps"):
      raise ValueError(
          "HopperW4Tiles(pingpong=True) orders the warpgroups' wgmmas within each pipeline "
          f"step, which every warpgroup takes: use mma='wgmma' (got {self.mma!r}) and "
          f"wg_split 'n' or 'k' (got {self.wg_split!r}).")
    if self.mma == "sync" and self.unpack != "ptx_natural":
      raise ValueError("HopperW4Tiles(mma='sync') multiplies the bf16 codes of "
                       "unpack='ptx_natural' (W4A16): pass nibbles='split', "
                       "unpack='ptx_natural'.")
    if self.offset not in ("fma", "folded"):
      raise ValueError(f"HopperW4Tiles.offset={self.offset!r}: use 'fma' or 'folded'.")
    if self.offset == "folded" and (self.mma != "sync" or self.halves != "together"):
      raise ValueError("HopperW4Tiles(offset='folded') takes each group's token sums from "
                       "the warp MMAs' own token fragments: pass mma='sync' (and "
                       f"halves='together'); got mma={self.mma!r}, halves={self.halves!r}.")
    if self.steps_per_wait > 1 and self.nibbles != "split":
      raise ValueError("HopperW4Tiles(steps_per_wait > 1) issues several K-steps' wgmmas "
                       "before one wait for split nibbles only: pass nibbles='split'.")
    if self.compute_wgs not in (2, 3, 4):
      raise ValueError(f"HopperW4Tiles.compute_wgs={self.compute_wgs!r}: use 2, 3 or 4.")
    if self.nibbles not in ("split", "interleaved"):
      raise ValueError(f"HopperW4Tiles.nibbles={self.nibbles!r}: use 'split' or 'interleaved'.")
    for f in ("tile_n", "tile_m", "tile_k", "split_k", "max_concurrent_steps", "num_sms"):
      v = getattr(self, f)
      if v is not None and (not isinstance(v, int) or v < 1):
        raise ValueError(f"HopperW4Tiles.{f}={v!r} must be a positive integer or None.")
    if self.tile_n not in (64, 128):
      raise ValueError(f"HopperW4Tiles.tile_n={self.tile_n}: use 64 or 128 (wgmma's M).")
    if self.tile_m is not None and (self.tile_m % 8 or self.tile_m > 256):
      raise ValueError(f"HopperW4Tiles.tile_m={self.tile_m}: a multiple of 8, at most 256 "
                       "(wgmma's N).")
    if self.tile_k is not None and self.tile_k % 64:
      raise ValueError(f"HopperW4Tiles.tile_k={self.tile_k}: a multiple of 64 int4 codes.")


@dataclasses.dataclass(frozen=True)
class W4Plan:
  """:class:`HopperW4Tiles` resolved for one ``(M, K, N, group)``: every field set."""

  tile_n: int
  tile_m: int
  tile_k: int
  split_k: int
  stages: int
  num_sms: int
  grouped: bool
  wide_load: bool = True
  act_bytes: int = 2  # bf16 tokens (W4A16) or int8 (W4A8)
  split: bool = False  # HopperW4Tiles.nibbles == "split"
  wgs: int = 2  # compute warpgroups
  slab: int = 0  # nk_scales="slab": columns W of each half's scale slab; 0: a row per step
  scale_bytes: int = 4
  ptx: bool = False  # HopperW4Tiles.unpack "ptx" or "ptx_natural"
  natural: bool = False  # HopperW4Tiles.unpack == "ptx_natural" (W4A16: no token reorder)
  magic: bool = False  # HopperW4Tiles.int_sums == "magic"
  ksplit: bool = False  # HopperW4Tiles.wg_split "k" or "steps": the warpgroups share rows
  rr: bool = False  # HopperW4Tiles.wg_split == "steps": warpgroup w takes steps w mod wgs
  final: bool = False  # HopperW4Tiles.epilogue == "kernel": the kernel writes [M, N]
  apart: bool = False  # HopperW4Tiles.halves == "apart": one half's group sums at a time
  per_wait: int = 1  # HopperW4Tiles.steps_per_wait: K-steps a warpgroup issues per wait
  sync: bool = False  # HopperW4Tiles.mma == "sync": warp MMAs (mma.sync), not wgmma
  pingpong: bool = False  # HopperW4Tiles.pingpong: the warpgroups take turns at wgmma
  folded: bool = False  # HopperW4Tiles.offset == "folded": codes as 136 + s, sums corrected
  int_scales: bool = False  # integer group scales: codes times them, all of K in int32

  @property
  def cta_n(self) -> int:
    """Weight rows a work item covers."""
    return self.tile_n if self.ksplit else self.wgs * self.tile_n

  @property
  def k_in_step(self) -> bool:
    """``wg_split="k"``: a pipeline step carries a K-step (``per_wait``) per warpgroup."""
    return self.ksplit and not self.rr

  @property
  def substeps(self) -> int:
    """K-steps (``tile_k`` codes each) per pipeline step: ``per_wait``, for each
    warpgroup with ``wg_split="k"``."""
    return (self.wgs if self.k_in_step else 1) * self.per_wait

  @property
  def tiles_out(self) -> int:
    """f32 ``[tile_n, tile_m]`` output tiles in shared memory that TMA writes out: one per
    warpgroup, none with ``epilogue="kernel"`` (the kernel stores from registers)."""
    return 0 if self.final else self.wgs

  @property
  def out_sets(self) -> int:
    """f32 ``[tile_n, tile_m]`` tiles of the kernel's one output allocation:
    :attr:`tiles_out`, then with ``wg_split="k"`` two sets of the warpgroups' partial sums
    (work items alternate between them)."""
    return self.tiles_out + (2 * self.wgs if self.ksplit else 0)

  @property
  def slab_sets(self) -> int:
    """Scale slabs in shared memory: one per warpgroup, or one shared with
    ``wg_split="k"`` (the warpgroups read the same rows)."""
    return 1 if self.ksplit else self.wgs

  def smem_bytes(self) -> int:
    """Pipeline buffers (weight codes, token tiles, scales), the scale slabs and the
    epilogue tiles (with ``wg_split="k"`` also the warpgroups' partial sums, two sets)."""
    if self.split:  # one token tile per half, half as wide
      parts = 1
    else:
      parts = 2 if self.grouped else 1
    step = (self.cta_n * self.tile_k // 2 + parts * self.tile_m * self.tile_k * self.act_bytes)
    if self.grouped and not self.slab:
      step += 2 * self.cta_n * self.scale_bytes  # one scale row per half
    step *= self.substeps
    slabs = 2 * self.slab_sets * self.tile_n * self.slab * self.scale_bytes
    outs = self.out_sets * self.tile_n * self.tile_m * 4
    barriers = 1024  # the pipeline's and the kernel's mbarriers, alignment (64 B measured)
    return self.stages * step + slabs + outs + barriers


def plan_w4(name: str, m: int, k: int, n: int, group: int | None,
            tiles: HopperW4Tiles, act_bytes: int = 2, weight_layout: str = "kn",
            scale_bytes: int = 4, profiled: bool = False, interpret: bool = False,
            int_scales: bool = False) -> W4Plan:
  """Resolve ``tiles`` for the problem, or raise a ``ValueError`` naming the misfit.

  A grouped ``"nk"`` weight reads its scales as stored (``nk_scales="slab"``) when
  the slab, ``W = 8 * ceil(steps / 8)`` columns for a work item's ``steps``
  K-steps (``W`` a multiple of 16 for int8 scales), is no wider than the weight's ``K/G``
  groups and a row of scales is a whole number of 16 bytes (TMA's stride unit);
  otherwise XLA transposes them.
  ``profiled`` (a call with ``profile_dir``): the pipeline leaves room for the
  profiler's buffer (:func:`profile_smem_bytes`), with fewer stages where it must.
  Compiled for a GPU (``interpret`` False), the CTA's warpgroups must fit the register
  file as the pipeline splits it (:func:`register_split`: ``compute_wgs=4`` does not).
  ``int_scales``: W4A8 with integer group scales (int8 ``[K/G, N]``, ``scale_bytes`` 1):
  each K-step's codes are multiplied by their group's scale in registers and every
  K-step's ``wgmma`` accumulates into one int32 accumulator; needs split nibbles
  converted by PTX (``unpack="ptx"``). ``halves`` and ``int_sums`` do not apply (there
  are no group sums to scale).
  """
  if k % 2:
    raise ValueError(f"{name}: K={k} must be even (two int4 codes per byte).")
  if group is not None and ((k // 2) % group or group % 32 or group > 128):
    raise ValueError(
        f"{name}: group_size={group} with K={k}: the Mosaic GPU kernel takes groups of 32, 64 "
        "or 128 that divide K/2 (one group of each packed half per step); use backend='gpu'.")
  tile_k = tiles.tile_k or (2 * group if group is not None else 256)
  if group is not None and tile_k != 2 * group:
    raise ValueError(f"{name}: HopperW4Tiles.tile_k={tile_k} must be 2 * group_size = "
                     f"{2 * group} for grouped weights.")
  if k % tile_k:
    raise ValueError(f"{name}: K={k} is not a multiple of the K-step tile_k={tile_k}.")
  ksplit, rr = tiles.wg_split != "n", tiles.wg_split == "steps"
  cta_n = tiles.tile_n if ksplit else tiles.compute_wgs * tiles.tile_n
  if n % cta_n:
    raise ValueError(f"{name}: N={n} is not a multiple of the CTA's {cta_n} weight rows "
                     f"(HopperW4Tiles tile_n={tiles.tile_n}, compute_wgs={tiles.compute_wgs}, "
                     f"wg_split={tiles.wg_split!r}); pass tiles whose "
                     f"{'' if ksplit else 'compute_wgs * '}tile_n divides N, or use backend='gpu'.")
  tile_m = tiles.tile_m or min(64, -(-m // 8) * 8)
  num_sms = tiles.num_sms or default_num_sms()
  steps = k // tile_k
  k_in_step = tiles.wg_split == "k"  # W4Plan.k_in_step; sub is W4Plan.substeps
  sub = (tiles.compute_wgs if k_in_step else 1) * tiles.steps_per_wait
  if steps % sub:
    per_step = ([f"compute_wgs={tiles.compute_wgs}"] if k_in_step else []) + (
        [f"steps_per_wait={tiles.steps_per_wait}"] if tiles.steps_per_wait > 1 else [])
    raise ValueError(f"{name}: the {steps} K-steps (K={k}, tile_k={tile_k}) need to be a "
                     f"multiple of {' x '.join(per_step)}, the K-steps of a pipeline step.")
  mt = -(-m // tile_m)
  items = (n // cta_n) * mt
  final = tiles.epilogue == "kernel"
  if final and (group is None or tiles.split_k not in (None, 1)):
    raise ValueError(
        f"{name}: HopperW4Tiles(epilogue='kernel') writes the final output of group-scaled "
        f"weights with no K split over CTAs (got group_size={group}, "
        f"split_k={tiles.split_k}); use epilogue='xla'.")
  if tiles.mma == "sync" and (act_bytes != 2 or tile_k % 128 or tile_m > 32):
    raise ValueError(
        f"{name}: HopperW4Tiles(mma='sync') multiplies bf16 tokens (W4A16) in tiles of at "
        f"most 32, K-steps of a multiple of 128 codes (the 128-byte swizzle its loads "
        f"assume); got {'int8' if act_bytes == 1 else 'bf16'} tokens, tile_m={tile_m}, "
        f"tile_k={tile_k}. Use mma='wgmma'.")
  if int_scales and (group is None or act_bytes != 1 or tiles.nibbles != "split"
                     or tiles.unpack != "ptx"):
    raise ValueError(
        f"{name}: integer group scales are applied to int8 codes converted by PTX: "
        f"HopperW4Tiles(nibbles='split', unpack='ptx') with int8 tokens (W4A8) and "
        f"groups; got nibbles={tiles.nibbles!r}, unpack={tiles.unpack!r}, "
        f"{'int8' if act_bytes == 1 else 'bf16'} tokens, group_size={group}.")
  if tiles.halves == "apart" and group is None:
    raise ValueError(f"{name}: HopperW4Tiles(halves='apart') scales each half's group sums "
                     "on its own; per-channel weights keep one accumulator per half over all "
                     "of K: use halves='together'.")
  split = tiles.split_k
  if split is None:
    split = 1 if final else max(
        s for s in range(1, steps // sub + 1)
        if (steps // sub) % s == 0 and (s == 1 or items * s <= num_sms))
  if steps % (split * sub):
    what = f"pipeline steps of {sub} K-steps" if sub > 1 else "K-steps"
    raise ValueError(f"{name}: split_k={split} does not divide the {steps // sub} {what} "
                     f"(K={k}, tile_k={tile_k}).")
  slab = 0
  if group is not None and weight_layout == "nk" and tiles.nk_scales == "slab":
    unit = max(8, 16 // scale_bytes)  # 16 bytes at least: TMA's narrowest box row
    slab = -(-(steps // split) // unit) * unit
    # TMA also needs the slab inside the array and a row stride of whole 16 bytes.
    slab = slab if slab <= k // group and (k // group * scale_bytes) % 16 == 0 else 0
  # pipeline depth: up to 4 steps; wg_split="steps" carries one K-step a step where "k"
  # carries compute_wgs, so it takes up to 4 compute_wgs for the same K-steps in flight
  depth = tiles.max_concurrent_steps or 4 * (tiles.compute_wgs if rr else 1)
  plan = W4Plan(tiles.tile_n, tile_m, tile_k, split, depth, num_sms,
                group is not None, tiles.wide_load, act_bytes, tiles.nibbles == "split",
                tiles.compute_wgs, slab, scale_bytes, ptx=tiles.unpack != "ops",
                magic=tiles.int_sums == "magic", natural=tiles.unpack == "ptx_natural",
                ksplit=ksplit, rr=rr, final=final,
                apart=tiles.halves == "apart" and not int_scales,
                per_wait=tiles.steps_per_wait, sync=tiles.mma == "sync",
                pingpong=tiles.pingpong, folded=tiles.offset == "folded",
                int_scales=int_scales)
  if plan.folded and not plan.grouped:
    raise ValueError(f"{name}: HopperW4Tiles(offset='folded') corrects each group's sum "
                     "before its scale: it needs group scales (group_size set); use "
                     "offset='fma' for per-channel weights.")
  if plan.grouped and not plan.slab and cta_n > 256:
    raise ValueError(
        f"{name}: {tiles} streams a row of {cta_n} group scales per K-step, more than TMA's "
        f"256 elements per box dimension; lower compute_wgs * tile_n to 256 or read the "
        f"scales as a slab (weight_layout='nk', nk_scales='slab').")
  # profiled (profile_dir): the profiler's buffer, per warpgroup, shares the memory
  reserved_smem = profile_smem_bytes(tiles.compute_wgs + 1) if profiled else 0
  room = SMEM_BYTES - reserved_smem
  if tiles.max_concurrent_steps is None:
    while plan.stages > 2 and plan.smem_bytes() > room:
      plan = dataclasses.replace(plan, stages=plan.stages - 1)
  if plan.smem_bytes() > room:
    raise ValueError(f"{name}: {tiles} needs {plan.smem_bytes()} bytes of shared memory at "
                     f"M={m}, more than Hopper's {SMEM_BYTES}"
                     + (f" less {reserved_smem} for the profiler" if reserved_smem else "")
                     + "; lower tile_m or tile_k.")
  regs, wgs = register_split(tiles.compute_wgs), tiles.compute_wgs
  if not interpret and not regs["fits"]:
    raise ValueError(
        f"{name}: HopperW4Tiles(compute_wgs={wgs}) hangs on a GPU: jax's warp-specialized "
        f"pipeline raises each compute warpgroup to {regs['compute']} registers a thread and "
        f"leaves the TMA warpgroup {regs['memory']}, {wgs} x {regs['compute']} + "
        f"{regs['memory']} = {wgs * regs['compute'] + regs['memory']}, more than the "
        f"{wgs + 1} x {regs['launch']} = {(wgs + 1) * regs['launch']} its "
        f"{128 * (wgs + 1)}-thread CTA is launched with, so setmaxnreg.inc waits forever "
        "(seen on an H200, jax 0.11.2). Use compute_wgs=2 or 3 (4 runs interpreted only).")
  return plan


def w4_kernel(xs: tuple[jax.Array, ...], w4: jax.Array, ws: jax.Array | None, *,
              plan: W4Plan, interpret: bool = False,
              name: str = "lowbit_w4a16_hopper", profile_dir: str | None = None,
              m: int | None = None, out_dtype=None,
              token_scale: jax.Array | None = None,
              channel_scale: jax.Array | None = None) -> jax.Array:
  """``out[s, n, m] = sum_{steps t of split s} sum_h ws[t + h G', n] sum_{k in t} w_h[n, k] x_h[m, k]``.

  ``h`` runs over the two packed halves of K: byte ``j`` of a weight row holds
  row ``j`` of K (low nibble, ``h = 0``) and row ``K/2 + j`` (high nibble). A
  K-step of ``tile_k`` codes covers ``tile_k / 2`` rows of each half, so with
  ``group = tile_k / 2`` it holds exactly one group of each half, scaled in
  f32 by the weight's own group scales ``ws [K/G, N]`` (bf16 or f32; step ``t``
  takes row ``t`` for the lo half and row ``t + G'``, ``G' = K/(2G)``, for the
  hi half: no copy). Per-channel (``ws`` None): accumulators over all of K; the
  caller applies the scale. ``plan.slab`` (``HopperW4Tiles.nk_scales="slab"``):
  ``ws`` is ``[N, K/G]``, the scales of a K-major weight as stored; each work
  item loads a ``[tile_n, W]`` slab of them per half (columns ``start_h`` to
  ``start_h + W``, clamped to the array) and step ``t`` selects its column
  ``h G' + s steps + t - start_h`` in registers (a masked row sum: no
  strided shared-memory read, which Mosaic GPU's layout inference refuses).

  ``plan.split`` (``HopperW4Tiles.nibbles="split"``): ``w4`` is the bytes, int8
  ``[N, K/2]``; each step loads them once and splits them in registers into
  the codes of the low and of the high nibble (exact), each half one ``wgmma``
  against its own tokens: ``xs = (x,)``, the lo half's tile read from columns
  ``[0, K/2)`` of ``x``, the hi half's from ``[K/2, K)``. Mosaic GPU has only
  bitwise operations on 8-bit registers, so W4A16 takes
  ``lo = bf16((byte & 0xF) ^ 8) - 8`` and ``bf16(16 * hi)``, W4A8 ``16 * lo``
  shifted in 16 bits; the 1/16 goes into each half's f32 scale
  (per-channel: one accumulator per half, combined at the end).

  Otherwise (``"interleaved"``): ``w4`` is the bytes viewed as ``int4 [N, K]``
  (code ``2j`` row ``j``, ``2j + 1`` row ``K/2 + j``); ``xs = (x_lo, x_hi)`` the
  tokens spread over that interleaved K with the other half's positions zero
  (grouped: one ``wgmma`` per half), or ``(x',)``, both halves (per-channel).

  The tokens' dtype picks the MMA: bf16 (W4A16: codes -> bf16, f32 sums) or
  int8 (W4A8: codes -> int8, exact int32 sums, each group's converted to f32
  before its scale; the per-token scale is the caller's).

  Shapes: ``xs[p]`` bf16 or int8 ``[M/tile_m, tile_m, K]`` (``[M/tile_m, K, tile_m]``
  when ``interpret``: the interpreter has no transposed operand in ``wgmma``), or
  ``[1, M, K]`` with ``M < tile_m`` (``pad_tokens=False``: TMA zero-fills the rest).
  Returns f32 ``[split_k, N, M]``: the caller adds the splits and transposes; with
  ``plan.final`` (``HopperW4Tiles.epilogue="kernel"``) the output itself in
  ``out_dtype``, ``[m, N]`` with one token tile (``m`` the true token count), else
  ``[M, N]`` (whole tiles), each token's row times ``token_scale[m]`` (W4A8: f32
  ``[M]``, ``[m]`` with one token tile). ``plan.ksplit`` (``wg_split="k"``):
  a pipeline step holds ``compute_wgs`` K-steps, warpgroup ``w`` computes step
  ``w`` of each for all of the work item's rows, and warpgroup 0 adds the
  warpgroups' sums (in shared memory, after a barrier) before writing them.
  In interpret mode each ``wgmma`` is a ``jnp.dot`` of the same register and
  shared-memory operands (the interpreter's ``wgmma`` takes no register operand).
  ``plan.int_scales`` (W4A8, integer group scales: ``ws`` int8 in ``[1, 16]``): each
  K-step's codes become ``q * s`` in int8 as they are converted (``split_int4_ptx``'s
  ``scales``; interpreted, jnp), both halves' ``wgmma``s accumulate into one int32
  accumulator over all of K, and the sums are converted to f32 once; with ``plan.final``
  each output element is then times its token's scale and ``channel_scale[n]`` (f32
  ``[N]``), otherwise the caller applies both.
  ``profile_dir``: see :func:`_launch`; each step's regions are ``load`` (codes from
  shared memory), ``unpack`` (to wgmma's registers), ``issue``, ``wait`` (the
  wgmmas), ``scale_load`` and ``scale`` (grouped: reading the step's scales, applying
  them; run 8's profiles had one ``scale`` region for both) and ``turn`` (``pingpong``:
  waiting for this warpgroup's turn at wgmma).
  """
  import jax.experimental.pallas.mosaic_gpu as plgpu
  from lowbit.kernels import _pallas

  p = plan
  n = w4.shape[0]
  s_dtype = ws.dtype if ws is not None else jnp.float32
  k_total = xs[0].shape[1 if interpret else 2]
  mt = xs[0].shape[0]
  tn, tm, tk, cta_n, sub = p.tile_n, p.tile_m, p.tile_k, p.cta_n, p.substeps
  act = jnp.dtype(xs[0].dtype)
  acc_dtype = jnp.int32 if act == jnp.int8 else jnp.float32
  n_iters = n // cta_n
  steps = k_total // tk // p.split_k // sub  # pipeline steps per split
  # Along K per step: tokens and weight columns (split: bytes, tk / 2 of each half).
  tx = tw = tk // 2 if p.split else tk
  w_bits = 8 if p.split else 4
  # Split: the partial sums of each half times these are true (16 * hi; W4A8 16 * lo too;
  # W4A16 through PTX: the codes themselves).
  if not p.split or (p.ptx and act == jnp.bfloat16):
    factors = (1.0, 1.0)
  else:
    factors = ((1 / 16 if act == jnp.int8 else 1.0), 1 / 16)
  n_acc = 2 if p.split else 1  # per-channel accumulators

  smem = plgpu.SMEM
  # wg_split="k": a pipeline step carries `sub` K-steps side by side, each tiled (and
  # swizzled) as one K-step is, so warpgroup w's columns [w tx, (w + 1) tx) are whole tiles.
  if interpret:
    x_spec = plgpu.BlockSpec((sub * tx, tm), lambda t: (t, 0), memory_space=smem)
    w_spec = plgpu.BlockSpec((cta_n, sub * tw), lambda t: (0, t), memory_space=smem)
  else:
    # pad_tokens=False: the token tile overhangs x's M < tile_m rows. From jax 0.12 on, a
    # ref slice whose start is a known constant is checked against the ref's bounds, which
    # rejects that overhang; a start computed from the step index is not checked, and TMA
    # zero-fills the rows past M as before.
    overhang = xs[0].shape[1] < tm
    x_spec = plgpu.BlockSpec((tm, sub * tx), lambda t: (t * 0 if overhang else 0, t),
                             transforms=_tiled(tx, act.itemsize * 8), memory_space=smem)
    w_spec = plgpu.BlockSpec((cta_n, sub * tw), lambda t: (0, t), transforms=_tiled(tw, w_bits),
                             memory_space=smem)
  n_x = 2 if p.split else len(xs)  # token operands per step
  specs = [x_spec] * n_x + [w_spec]
  rows = p.grouped and not p.slab  # scales streamed a row per step
  if rows:  # the lo half's group row, then the hi half's
    specs += [plgpu.BlockSpec((sub, cta_n), lambda t: (t, 0), memory_space=smem)] * 2

  def kernel(*refs):
    *x_gmem, w_gmem = refs[:len(xs) + 1]
    s_gmem = refs[len(xs) + 1] if p.grouped else None
    extra = list(refs[len(xs) + 1 + p.grouped:-1])  # the epilogue's scales, in order
    ts_gmem = extra.pop(0) if token_scale is not None else None
    cs_gmem = extra.pop(0) if channel_scale is not None else None
    out_gmem = refs[-1]

    def x_at(ref, mi, ks):
      return ref.at[mi, ks, :] if interpret else ref.at[mi, :, ks]

    def operands(mi, s, cn):
      span, k_steps = steps * sub * tx, steps * sub  # per split: K columns, K-steps
      if p.split:  # one x, read at the lo half's columns and at the hi half's
        ops = [x_at(x_gmem[0], mi, pl.ds(h * k_total // 2 + s * span, span)) for h in (0, 1)]
      else:
        ops = [x_at(r, mi, pl.ds(s * span, span)) for r in x_gmem]
      ops.append(w_gmem.at[cn, pl.ds(s * k_steps * tw, k_steps * tw)])
      if rows:
        g = s_gmem.shape[0] // 2  # groups per half: one per K-step
        ops += [s_gmem.at[pl.ds(s * k_steps, k_steps), cn],
                s_gmem.at[pl.ds(g + s * k_steps, k_steps), cn]]
      return ops

    def pipeline(body, context):
      return plgpu.emit_pipeline_warp_specialized(
          body, grid=(steps,), memory_registers=MEMORY_REGISTERS, in_specs=specs, wg_axis="wg",
          num_compute_wgs=p.wgs, max_concurrent_steps=p.stages, compute_context=context)

    ignore = lambda *_, **__: None  # noqa: E731 (allocation sizes do not depend on the body)

    # W4Plan.out_sets: output tiles, then the partial sums. One allocation: the GPU
    # interpreter has deadlocked here with the partials in an allocation of their own.
    extra_allocs = {}
    if p.out_sets:
      extra_allocs["out_smem"] = plgpu.SMEM((p.out_sets, tn, tm), jnp.float32,
                                            transforms=() if interpret else _tiled(tm, 32))
    if p.slab:  # each half's [tn, W] scales and their barrier: per compute warpgroup, or
      # one set the warpgroups share when they split K over the same rows (wg_split="k")
      extra_allocs.update(slab_smem=plgpu.SMEM((p.slab_sets, 2, tn, p.slab), s_dtype),
                          slab_bar=plgpu.Barrier(num_arrivals=2, num_barriers=p.slab_sets))
    if p.ksplit:  # the warpgroups meet to add their partial sums
      extra_allocs.update(part_bar=plgpu.Barrier(num_arrivals=p.wgs))
    if p.pingpong:  # warpgroup w's turn at the tensor cores: one barrier each
      extra_allocs.update(turn_bar=plgpu.Barrier(num_arrivals=1, num_barriers=p.wgs))

    @functools.partial(
        pl.run_scoped,
        allocs=pipeline(ignore, ignore).get_allocations(*operands(0, 0, pl.ds(0, cta_n))),
        **extra_allocs,
        collective_axes="wg")
    def _scope(allocs, out_smem=None, slab_smem=None, slab_bar=None, part_bar=None,
               turn_bar=None):
      wg = lax.axis_index("wg")
      if p.pingpong:  # warpgroup 0 has the first turn: the last one hands it over
        pl.when(wg == p.wgs - 1)(lambda: plgpu.barrier_arrive(turn_bar.at[0]))

      def take_turn():
        """HopperW4Tiles.pingpong: wait until the previous warpgroup's MMAs are done."""
        if p.pingpong:
          with jax.named_scope("turn"):
            plgpu.barrier_wait(turn_bar.at[wg])

      def pass_turn():
        if p.pingpong:
          plgpu.barrier_arrive(turn_bar.at[(wg + 1) % p.wgs])
      wn = pl.ds(0, tn) if p.ksplit else pl.ds(wg * tn, tn)  # this warpgroup's rows of cta_n
      # and the first of its p.per_wait K-steps in each pipeline step
      wk = wg * p.per_wait if p.k_in_step else 0
      slab_set = 0 if p.ksplit else wg  # the scale slab it reads

      def my_step(idx):
        """``wg_split="steps"``: whether pipeline step ``idx`` is this warpgroup's."""
        return idx[0] % p.wgs == wg

      @plgpu.nd_loop((p.split_k * n_iters * mt,), collective_axes="sm")
      def _items(info):
        (lin,) = info.index
        local = info.local_index  # this CTA's work items so far
        # Token tiles innermost: CTAs running at once share a weight tile in L2.
        s, rest = lin // (n_iters * mt), lin % (n_iters * mt)
        ni, mi = rest // mt, rest % mt
        cn = pl.ds(ni * cta_n, cta_n)

        def mma(pairs, acc_refs):
          """``acc += a() @ b`` for each ``(a, b_smem)`` of ``pairs`` into its ref of
          ``acc_refs`` (refs may repeat): each A operand converted right before its
          wgmma is issued (so converting the next overlaps the MMA in flight), then one
          wait for all. ``pingpong``: issued in this warpgroup's turn (the caller took
          it, :func:`in_turn`), which passes on once they are done."""
          for (a, b), acc_ref in zip(pairs, acc_refs, strict=True):
            a = a()
            with jax.named_scope("issue"):
              plgpu.wgmma(acc_ref, a, b.transpose((1, 0)))
          with jax.named_scope("wait"):
            plgpu.wgmma_wait(0)
          pass_turn()

        def in_turn(pairs):
          """``pairs`` with their A operands converted, once this warpgroup has the turn
          (``pingpong``; converted first, so not while holding it); as they are
          otherwise."""
          if not p.pingpong:
            return pairs
          codes = [a() for a, _ in pairs]
          take_turn()
          return [(lambda c=c: c, b) for c, (_, b) in zip(codes, pairs, strict=True)]

        def dots(pairs):
          """``[a() @ b for (a, b_smem) in pairs]``, f32 or int32 (``mma="sync"``: ``b`` is
          ``(token buffer, K-step column)``, :func:`mma_sync_bf16`). ``offset="folded"``:
          ``[(a() @ b, ones @ b)]``, each token's sum over the K-step's columns beside."""
          if interpret:  # the same turns, around the dots
            out = []
            for a, b in in_turn(pairs):
              codes, xb = a(), b[...]
              prod = jnp.dot(codes, xb, preferred_element_type=acc_dtype)
              out.append((prod, jnp.dot(jnp.ones_like(codes), xb,
                                        preferred_element_type=acc_dtype))
                         if p.folded else prod)
            pass_turn()
            return out
          if p.sync:
            codes = [a() for a, _ in pairs]
            with jax.named_scope("issue"):
              return [mma_sync_bf16(c, ref, col0, tm, sums=p.folded)
                      for c, (_, (ref, col0)) in zip(codes, pairs, strict=True)]

          # the turn taken before the accumulators are allocated: their zeros then go
          # straight into the first wgmma (its scale-d = 0), as without turns; taken
          # between the two, ptxas zeroes them with 64 CS2R a step (W4A8, 128 tokens)
          pairs = in_turn(pairs)

          def acc_scope(*acc_refs):
            mma(pairs, acc_refs)
            return [r[...] for r in acc_refs]
          return pl.run_scoped(acc_scope, *[plgpu.ACC((tn, tm), acc_dtype) for _ in pairs])

        sync = p.sync and not interpret  # token tiles as (whole buffer, K-step column)

        def my_tiles(x_refs, w_smem):
          """``[(token tiles, weight tile, column)]``: this warpgroup's K-steps of a
          pipeline step, ``wk + j`` for ``j < per_wait`` (columns ``[(wk + j) tx, ..)``
          of each token tile and ``[(wk + j) tw, ..)`` of the weight tile, whole swizzle
          tiles; ``mma="sync"`` compiled: the token buffers whole, the column beside);
          the step itself when it is one K-step."""
          if sub == 1:
            return [(x_refs, w_smem, 0)]
          out = []
          for j in range(p.per_wait):
            xk, wk_cols = pl.ds((wk + j) * tx, tx), pl.ds((wk + j) * tw, tw)
            xs = x_refs if sync else [x.at[xk, :] if interpret else x.at[:, xk] for x in x_refs]
            out.append((xs, w_smem.at[:, wk_cols], (wk + j) * tx))
          return out

        def my_pairs(x_refs, w_smem, scales=None):
          """``pairs_of`` each of this warpgroup's K-steps, in K order; ``scales`` (integer
          group scales): ``step_scales``' list, two per K-step."""
          out = []
          for j, (xs, w, col0) in enumerate(my_tiles(x_refs, w_smem)):
            sc = None if scales is None else scales[2 * j:2 * j + 2]
            out += [(a, (x, col0) if sync else x) for a, x in pairs_of(xs, w, sc)]
          return out

        def pairs_of(x_refs, w_smem, scales=None):
          """``[(A operand thunk, token tile)]`` of one step: this warpgroup's weight rows
          in wgmma's register layout, in the tokens' dtype. Interleaved: the int4 codes
          converted once, against each token tile; split: each half's codes (times 16
          where ``factors`` has 1/16) converted when its wgmma is issued, or with
          ``unpack="ptx"`` both at once (:func:`split_int4_ptx`).
          ``HopperW4Tiles.wide_load``: 32-bit shared-memory loads, then a relayout
          (none for ``"ptx"``)."""
          wide = p.wide_load and not interpret
          with jax.named_scope("load"):
            w = w_smem[wn, :]
            if wide and p.split:  # 4 bytes per thread and load: the layout that upcasts
              # (ptx: the 8-bit wgmma operand's own layout, whatever the tokens)
              # (ptx_natural, W4A16: the bf16 operand's layout, 2 bytes a load)
              bf16 = act == jnp.bfloat16
              w = plgpu.layout_cast(w, plgpu.Layout.WGMMA_UPCAST_2X if bf16 and not p.ptx
                                    else plgpu.Layout.WGMMA if bf16 and p.natural
                                    else plgpu.Layout.WGMMA_8BIT)
            elif wide and act == jnp.bfloat16:
              # int8 tokens: inference's layout already reads 16 bits a time; Mosaic has no
              # cheaper relayout to the 8-bit wgmma operand (the casts tried are refused).
              w = plgpu.layout_cast(w, plgpu.Layout.WGMMA_UPCAST_4X)
          if not p.split:
            with jax.named_scope("unpack"):
              if wide and act == jnp.bfloat16:
                w = plgpu.layout_cast(w, plgpu.Layout.WGMMA)
              codes = w.astype(act)
            return [(lambda: codes, x) for x in x_refs]

          if p.ptx and not interpret:  # both halves in one pass over the registers, no shuffle
            with jax.named_scope("unpack"):
              codes = split_int4_ptx(w, act, natural=p.natural, folded=p.folded,
                                     scales=scales)
            return [(lambda c=c: c, x) for c, x in zip(codes, x_refs, strict=True)]
          if p.int_scales:  # interpreted: the same int8 q * s of each half
            with jax.named_scope("unpack"):
              codes = (lax.shift_right_arithmetic(lax.shift_left(w, jnp.int8(4)), jnp.int8(4)),
                       lax.shift_right_arithmetic(w, jnp.int8(4)))
            return [(lambda c=c, sc=sc: (c.astype(jnp.int32) * sc[:, None]).astype(jnp.int8), x)
                    for c, sc, x in zip(codes, scales, x_refs, strict=True)]
          if p.ptx and act == jnp.bfloat16:  # interpreted: the same codes (natural order)
            with jax.named_scope("unpack"):
              codes = (lax.shift_right_arithmetic(lax.shift_left(w, jnp.int8(4)), jnp.int8(4)),
                       lax.shift_right_arithmetic(w, jnp.int8(4)))
            offset = jnp.asarray(_pallas.FOLDED_OFFSET if p.folded else 0, act)  # exact
            return [(lambda c=c: c.astype(act) + offset, x)
                    for c, x in zip(codes, x_refs, strict=True)]

          def half(h):
            """Mosaic GPU does no arithmetic on 8-bit registers, only bitwise operations."""
            with jax.named_scope("unpack"):
              if h == 1:
                c = w & jnp.int8(-16)  # byte & 0xF0 = 16 * hi
              elif act == jnp.int8:  # 16 * lo = byte << 4, shifted in 16 bits
                return (w.astype(jnp.int16) << 4).astype(jnp.int8)
              else:
                c = (w & jnp.int8(15)) ^ jnp.int8(8)  # lo + 8, in [0, 16)
              if act == jnp.int8:
                return c
              c = c.astype(act) - 8 if h == 0 else c.astype(act)  # (lo + 8) - 8, exact
              return plgpu.layout_cast(c, plgpu.Layout.WGMMA) if wide else c
          return [(functools.partial(half, h), x) for h, x in enumerate(x_refs)]

        def emit(z, row0):
          """Write ``z``, f32 ``[tn, tm]``, the sums of weight rows ``row0 ..`` for this
          work item's tokens: f32 partials to ``out [s, N, M]`` by TMA, or with
          ``epilogue="kernel"`` the output itself, ``out [M, N]``."""
          rows_n = pl.ds(row0, tn)
          if p.final:  # one token tile: [m, N] (rows past m skipped); else whole tiles
            rows_m, bound = (slice(None), m) if mt == 1 else (pl.ds(mi * tm, tm), tm)
            ts = None if ts_gmem is None else ts_gmem.at[rows_m]
            cs = None if cs_gmem is None else cs_gmem.at[rows_n]
            if interpret:
              zs = z if ts is None else z * ts[...][None, :]
              zs = zs if cs is None else zs * cs[...][:, None]
              out_gmem[rows_m, rows_n] = zs.astype(out_dtype).T[:bound]
            elif ts is None:
              store_transposed(z.astype(out_dtype), out_gmem.at[rows_m, rows_n], bound)
            else:
              store_transposed(z, out_gmem.at[rows_m, rows_n], bound, scale=ts, row_scale=cs)
            return
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)
          out_smem[wg] = z
          plgpu.commit_smem()
          plgpu.copy_smem_to_gmem(out_smem.at[wg], out_gmem.at[s, rows_n, pl.ds(mi * tm, tm)])

        def store(y):
          """This warpgroup's sums of the work item, ``[tn, tm]`` f32, to ``emit``;
          ``wg_split="k"``: added over the warpgroups in shared memory first."""
          if not p.ksplit:
            emit(y, ni * cta_n + wg * tn)
            return
          # a warpgroup may run a work item ahead: alternate the two sets of partials
          first = p.tiles_out + (local % 2) * p.wgs
          out_smem[first + wg] = y
          plgpu.barrier_arrive(part_bar)
          plgpu.barrier_wait(part_bar)

          @pl.when(wg == 0)
          def _():
            def part(w):
              v = out_smem[first + w]
              return v if interpret else plgpu.layout_cast(v, plgpu.Layout.WGMMA)
            z = part(0)
            for w in range(1, p.wgs):
              z = z + part(w)
            emit(z, ni * cta_n)

        def group_sum_f32(part):
          """A step's group sums in f32 (int32 ones exactly: see ``HopperW4Tiles.int_sums``)."""
          if part.dtype != jnp.int32 or not p.magic:
            return part.astype(jnp.float32)
          biased = lax.bitcast_convert_type(part + jnp.int32(0x4B400000), jnp.float32)
          return biased - jnp.float32(1.5 * 2**23)

        if p.grouped:
          g_total = s_gmem.shape[1] if p.slab else 0
          # Slab mode: the first column of each half's slab, kept inside the array.
          starts = ([jnp.minimum(h * g_total // 2 + s * steps * sub, g_total - p.slab)
                     for h in (0, 1)] if p.slab else None)

          def context(eval_pipeline):
            if p.slab:  # this slab set's rows of both halves' scales, one TMA each
              def copy_slab():
                for h in (0, 1):
                  plgpu.copy_gmem_to_smem(
                      s_gmem.at[pl.ds(ni * cta_n + slab_set * tn, tn), pl.ds(starts[h], p.slab)],
                      slab_smem.at[slab_set, h], slab_bar.at[slab_set])
              # wg_split="k": one set for the warpgroups' shared rows, copied by warpgroup 0.
              # All of them passed the previous item's partial-sum barrier, so none still
              # reads the slab this overwrites.
              if p.ksplit:
                pl.when(wg == 0)(copy_slab)
              else:
                copy_slab()
              plgpu.barrier_wait(slab_bar.at[slab_set])
            if not p.int_scales:
              store(eval_pipeline(jnp.zeros((tn, tm), jnp.float32)))
            elif interpret:  # integer group scales: one int32 sum over all of K
              store(eval_pipeline(jnp.zeros((tn, tm), jnp.int32)).astype(jnp.float32))
            else:
              def _acc(acc_ref):
                eval_pipeline(acc_ref)
                store(acc_ref[...].astype(jnp.float32))
              pl.run_scoped(_acc, plgpu.ACC((tn, tm), jnp.int32))

          def step_scales(t, s_refs):
            """Each half's f32 scales, ``[tn]``, times its factor, for each of this
            warpgroup's K-steps of pipeline step ``t`` (the order of ``my_pairs``);
            integer group scales: the int32 scales themselves."""
            def ready(v, h):
              if p.int_scales:
                return v.astype(jnp.int32)
              return v.astype(jnp.float32) * factors[h]
            out = []
            for j in range(p.per_wait):
              if not p.slab:
                out += [ready(r[wk + j, wn], h) for h, r in enumerate(s_refs)]
                continue
              for h in (0, 1):
                col = h * g_total // 2 + (s * steps + t) * sub + wk + j - starts[h]
                if interpret:
                  sl = slab_smem[slab_set, h, :, col]
                else:
                  sl = load_slab_column(slab_smem, slab_set, h, col)
                out.append(ready(sl, h))
            return out

          def body(idx, *refs):
            *x_refs, w_smem = refs[:n_x + 1]
            s_refs, y = refs[n_x + 1:-1], refs[-1]
            if p.int_scales and not interpret:  # y: the int32 accumulator's ref
              def issue():
                with jax.named_scope("scale_load"):
                  scales = step_scales(idx[0], s_refs)
                pairs = my_pairs(x_refs, w_smem, scales)
                mma(in_turn(pairs), [y] * len(pairs))
              pl.when(my_step(idx))(issue) if p.rr else issue()
              return y
            if p.rr:  # wg_split="steps": this warpgroup's steps only, the others passed by
              return lax.cond(my_step(idx),
                              lambda y: step(idx, x_refs, w_smem, s_refs, y), lambda y: y, y)
            return step(idx, x_refs, w_smem, s_refs, y)

          def step(idx, x_refs, w_smem, s_refs, y):
            """``y`` plus this warpgroup's K-steps of pipeline step ``idx``, scaled
            (integer group scales, interpreted: the int32 products of ``q * s``)."""
            if p.int_scales:
              pairs = my_pairs(x_refs, w_smem, step_scales(idx[0], s_refs))
              return y + sum(dots(pairs))
            # Decode-sized token tiles with the PTX unpack read the step's scales before
            # issuing its wgmmas, so their shared-memory loads wait behind the MMAs, not
            # after them. Elsewhere the registers held across the MMAs put spill loads
            # into the loop (128-token tiles; "ops" with 4 warpgroups at 96 registers:
            # experiments/sass_stats.py), so the scales are read after.
            # halves="apart" reads them first too (its single live group sum leaves room).
            def scaled(y, parts, scales):
              with jax.named_scope("scale"):
                for part, sc in zip(parts, scales, strict=True):
                  if p.folded:  # (sum of (136 + s) x, sum of x): the codes' sum
                    part, xsum = part
                    part = part - jnp.float32(_pallas.FOLDED_OFFSET) * xsum
                  y = y + group_sum_f32(part) * lax.broadcast_in_dim(sc, (tn, tm), (0,))
              return y

            early = p.apart or (tm <= 16 and p.ptx)
            if early:  # (profile region "scale_load": run 8's "scale" held it too)
              with jax.named_scope("scale_load"):
                scales = step_scales(idx[0], s_refs)
            pairs = my_pairs(x_refs, w_smem)
            if p.apart:  # one half's wgmmas, wait and scaling, then the other's
              for pair, sc in zip(pairs, scales, strict=True):
                y = scaled(y, dots([pair]), [sc])
              return y
            parts = dots(pairs)
            if not early:
              with jax.named_scope("scale_load"):
                scales = step_scales(idx[0], s_refs)
            return scaled(y, parts, scales)
        else:  # one accumulator per half (split: their factors differ) for all of K
          def finish(accs):
            store(sum(a.astype(jnp.float32) * f for a, f in zip(accs, factors, strict=False)))

          def context(eval_pipeline):
            if interpret or p.sync:  # sums as values (mma="sync": in registers, no wgmma)
              finish(eval_pipeline((jnp.zeros((tn, tm), acc_dtype),) * n_acc))
              return

            def _accs(*acc_refs):
              eval_pipeline(acc_refs)
              finish([r[...] for r in acc_refs])
            pl.run_scoped(_accs, *[plgpu.ACC((tn, tm), acc_dtype) for _ in range(n_acc)])

          def body(idx, *refs):
            *x_refs, w_smem, accs = refs
            if interpret or p.sync:  # wg_split="steps": this warpgroup's steps only
              def add(accs):
                sums = dots(my_pairs(x_refs, w_smem))  # per K-step, a pair per accumulator
                return tuple(a + sum(sums[i::n_acc]) for i, a in enumerate(accs))
              return lax.cond(my_step(idx), add, lambda accs: accs, accs) if p.rr else add(accs)

            def issue():
              mma(in_turn(my_pairs(x_refs, w_smem)), list(accs) * p.per_wait)
            pl.when(my_step(idx))(issue) if p.rr else issue()
            return accs

        pipeline(body, context)(*operands(mi, s, cn), allocations=allocs)

      if p.pingpong:  # warpgroup 0 takes the last turn handed to it: every phase observed
        pl.when(wg == 0)(take_turn)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  out_type = (jax.ShapeDtypeStruct((m if mt == 1 else mt * tm, n), out_dtype) if p.final else
              jax.ShapeDtypeStruct((p.split_k, n, mt * tm), jnp.float32))
  args = ((*xs, w4) + ((ws,) if p.grouped else ())
          + ((token_scale,) if token_scale is not None else ())
          + ((channel_scale,) if channel_scale is not None else ()))
  return _launch(kernel, out_type, p.num_sms, name, interpret, profile_dir, p.wgs)(*args)


def w4_matmul(x: jax.Array, wq: jax.Array, ws: jax.Array, group: int | None, *,
              tiles: HopperW4Tiles, interpret: bool, name: str, kernel_name: str,
              weight_layout: str = "kn", profile_dir: str | None = None,
              out_dtype=None, token_scale: jax.Array | None = None,
              channel_scale: jax.Array | None = None) -> jax.Array:
  """``sx[m] * sum_g ws[g, n] * sum_{k in g} x[m, k] q[k, n]`` in f32 ``[M, N]`` through
  :func:`w4_kernel`, from validated operands: ``x [M, K]`` bf16 (W4A16) or int8
  codes (W4A8), ``wq [K/2, N]`` packed, ``ws [K/G or 1, N]``, ``token_scale`` ``sx``
  f32 ``[M, 1]`` or ``None`` (1). With ``HopperW4Tiles(epilogue="kernel")`` the result
  is already in ``out_dtype``.

  Builds the kernel's operands: the bytes K-major (``wq.T``, free for a weight
  stored ``"nk"``), as int8 (``nibbles="split"``) or viewed as ``int4 [N, K]``
  (``"interleaved"``: its K order interleaves the halves, code ``2j`` row
  ``j``, ``2j + 1`` row ``K/2 + j``, so the tokens are spread over that order,
  per group-scaled half with zeros elsewhere, or both halves at once); the
  tokens padded to the token tile; the group scales as ``[K/G, N]``, or for a
  weight stored ``"nk"`` (``weight_layout``) in slab mode as stored, ``ws.T``
  ``[N, K/G]`` (under ``jit`` that transpose cancels the one that gave
  ``[K/G, N]``: no copy). Adds the
  K-splits, transposes back and applies a per-channel scale in f32: one small
  XLA fusion over ``[N, M]``. With ``HopperW4Tiles(epilogue="kernel")`` the kernel
  writes the ``[M, N]`` result in ``out_dtype`` itself and nothing follows it.

  ``channel_scale`` (W4A8 with integer group scales, ``ws`` int8 ``[K/G, N]``): f32
  ``[1, N]``; the result is ``sx[m] * c[n] * sum_k x[m, k] (q[k, n] s[k // G, n])``, the
  sum exact in int32 (``plan_w4(int_scales=True)``).
  """
  (m, k), n = x.shape, wq.shape[1]
  int_scales = channel_scale is not None
  if int_scales and (ws.dtype != jnp.int8 or token_scale is None):
    raise ValueError(f"{name}: a channel_scale goes with int8 group scales and int8 tokens "
                     f"with their scales (W4A8); got scales {ws.dtype}.")
  plan = plan_w4(name, m, k, n, group, tiles, act_bytes=jnp.dtype(x.dtype).itemsize,
                 weight_layout=weight_layout, scale_bytes=jnp.dtype(ws.dtype).itemsize,
                 profiled=bool(profile_dir), interpret=interpret, int_scales=int_scales)
  tm, h = plan.tile_m, k // 2
  mp = -(-m // tm) * tm
  # HopperW4Tiles.pad_tokens=False: one partial token tile read as it is (TMA fills zeros).
  unpadded = plan.split and not tiles.pad_tokens and m < tm and not interpret
  if not unpadded:
    x = jnp.pad(x, ((0, mp - m), (0, 0)))

  def tiled(a):  # [M, K] -> per token tile (K-major rows, or [K, tile_m] to interpret)
    a = a.reshape(1, m, k) if unpadded else a.reshape(mp // tm, tm, k)
    return a.transpose(0, 2, 1) if interpret else a

  if plan.split:
    if plan.ptx and not plan.natural and not interpret and x.dtype == jnp.bfloat16:
      # the codes' register order
      x = reorder_tokens(x)
    xs, w = (tiled(x),), lax.bitcast_convert_type(wq.T, jnp.int8)
  else:
    lo, hi = x[:, :h], x[:, h:]
    spread = lambda a, b: tiled(jnp.stack([a, b], axis=-1))  # noqa: E731
    zero = jnp.zeros_like(lo)
    xs = (spread(lo, hi),) if group is None else (spread(lo, zero), spread(zero, hi))
    w = lax.bitcast_convert_type(wq.T, jnp.int4).reshape(n, k)
  s = None if group is None else (ws.T if plan.slab else ws)
  ts = None
  if plan.final and token_scale is not None:  # the kernel scales each token's row
    ts = token_scale.astype(jnp.float32).reshape(m)
    if not unpadded:  # whole tiles of rows (a token tile read as it is reads m scales)
      ts = jnp.pad(ts, (0, mp - m))
  cs = None
  if plan.final and int_scales:  # and each weight row's channel scale
    cs = channel_scale.astype(jnp.float32).reshape(n)
  out = w4_kernel(xs, w, s, plan=plan, interpret=interpret, name=kernel_name,
                  profile_dir=profile_dir, m=m, out_dtype=out_dtype or jnp.float32,
                  token_scale=ts, channel_scale=cs)
  if plan.final:  # HopperW4Tiles(epilogue="kernel"): already [M, N] in out_dtype
    return out if out.shape[0] == m else out[:m]
  y = out.sum(axis=0).T[:m]
  y = y * ws.astype(jnp.float32) if group is None else y
  y = y if token_scale is None else y * token_scale.astype(jnp.float32)
  return y * channel_scale.astype(jnp.float32) if int_scales else y


#: Where a wrapper called with neither ``backend`` nor ``block_sizes`` takes a Mosaic GPU
#: kernel on a Hopper GPU: ``kernel -> [(least M, most M, weight layouts, tiles)]``, from
#: the measured GPU runs (docs/kernels.md); elsewhere, and for shapes the tiles cannot
#: take, the Triton kernel. The integer kernels' sums are exact either way.
AUTO: dict[str, list[tuple]] = {
    # H200 runs 5-6 (K = N = 8192): 1.53x / 1.96x of bf16 (kn / nk) at M = 2048, 1.70-1.89x
    # at M = 4096-8192, where Triton's best is 1.23-1.58x; at M = 256 Triton's K-major
    # tiles win (1.33x vs 1.06x).
    "w8a8": [(2048, None, ("kn", "nk"), HopperTiles())],
    # Run 8 (weight stored K-major, bf16 tokens, group scales): the call is one kernel, the
    # warpgroups splitting each step's K, codes converted by PTX from 16-bit loads, the
    # scales read as stored, the output written by the kernel: 14.2 us at M = 1 (2.41x)
    # against Triton's 21.3 (K-major tiles) in the same run. Runs 9-10: the same with warp
    # MMAs (mma="sync") and 6 pipeline stages, 12.7-12.8 us at M = 1 (2.66x; 14.1-14.3 as
    # run 8 took it), 15.4-15.6 at M = 16 (15.8-15.9). Taken for M <= 16 (the token tile the
    # kernel writes whole).
    # Run 10, M = 64 and 128: 64-token tiles, the output written by the kernel, 34.9 / 35.9
    # us against Triton's 39.2 / 106 (the 128-token tiles below took 50.7 / 52.8 there with
    # the kernel's epilogue, 37.3 / 36.6 with XLA's). From 129 tokens: 128-token tiles, each
    # K-step's halves scaled apart (together they spill), the kernel's epilogue: 53.4-53.6
    # us at M = 256 (0.89-1.00x) and 845-896 at M = 4096 (0.75-0.79x) against Triton's
    # 103.5-103.9 / 1680-1690. (M = 17-63: Triton, not yet compared.)
    "w4a16": [(1, 16, ("nk",), HopperW4Tiles(
                  nibbles="split", unpack="ptx_natural", wg_split="k", nk_scales="slab",
                  pad_tokens=False, epilogue="kernel", mma="sync", max_concurrent_steps=6)),
              (64, 128, ("nk",), HopperW4Tiles(
                  nibbles="split", unpack="ptx_natural", tile_m=64, epilogue="kernel")),
              (129, None, ("nk",), HopperW4Tiles(
                  nibbles="split", unpack="ptx_natural", tile_m=128, halves="apart",
                  epilogue="kernel"))],
    # Runs 9-10, weight stored K-major: decode as one kernel (the warpgroups splitting K, the
    # output scaled and written by the kernel, PTX-converted split nibbles, slab scales,
    # full-rate group-sum conversion), 11.0-11.2 us at M = 1 (3.0x), 12.1-12.2 at M = 16
    # and 18.0 at M = 64 (2.3x), against run 8's default's 12.9 / 14.4 and Triton's 16.3 /
    # 17.8 / 20.3. From 65 tokens: 128-token tiles, the scales read as stored, 24.7 us at
    # M = 128 and 39.8-40.0 at M = 256 (1.2-1.3x) against Triton's 28.7 / 56.9; from 257,
    # each K-step's halves scaled apart (scales transposed per call; with the slab, which
    # fits in 2 stages, not yet timed), 590-631 us at M = 4096 (1.05-1.14x) against
    # Triton's 842-845.
    "w4a8": [(1, 64, ("nk",), HopperW4Tiles(
                 nibbles="split", unpack="ptx", wg_split="k", nk_scales="slab",
                 int_sums="magic", pad_tokens=False, epilogue="kernel")),
             (65, 256, ("nk",), HopperW4Tiles(nibbles="split", unpack="ptx", tile_m=128,
                                              nk_scales="slab")),
             (257, None, ("nk",), HopperW4Tiles(nibbles="split", unpack="ptx", tile_m=128,
                                                halves="apart"))],
}


def default_tiles(kernel: str, x: jax.Array | QArray, w: QArray, weight_layout: str,
                  out_dtype: jax.typing.DTypeLike = jnp.bfloat16
                  ) -> HopperTiles | HopperW4Tiles | None:
  """The Mosaic GPU tiles a wrapper called with neither ``backend`` nor ``block_sizes``
  takes for tokens ``x [M, K]`` (an array, or the int8 ``QArray`` of W8A8 / W4A8) and the
  logical ``[K, N]`` weight ``w`` (:func:`auto_tiles`), or ``None``: the Triton kernel.
  W4A16 takes them for bf16 tokens only (the kernel multiplies in bf16)."""
  if kernel == "w4a16" and jnp.result_type(x) != jnp.bfloat16:
    return None
  group = None if kernel == "w8a8" else w.group_size
  return auto_tiles(kernel, x.shape[0], *w.shape, group, weight_layout, out_dtype)


def auto_tiles(kernel: str, m: int, k: int, n: int, group: int | None,
               weight_layout: str, out_dtype=jnp.bfloat16):
  """The tiles of the Mosaic GPU kernel that :data:`AUTO` names for this problem on this
  device (a :class:`HopperTiles` or :class:`HopperW4Tiles`), or ``None``: the Triton kernel.
  Where the named tiles' pipeline depth does not fit this problem's shared memory (int4
  slab scales grow with K), the same tiles at their default depth, if those fit: the same
  kernel and arithmetic, fewer weight bytes in flight."""
  if not is_hopper():
    return None
  for lo, hi, layouts, tiles in AUTO.get(kernel, ()):
    if m < lo or (hi is not None and m > hi) or weight_layout not in layouts:
      continue
    tries = [tiles]
    if isinstance(tiles, HopperW4Tiles) and tiles.max_concurrent_steps is not None:
      tries.append(dataclasses.replace(tiles, max_concurrent_steps=None))
    for t in tries:
      try:
        if kernel == "w8a8":
          check_fit(kernel, k, n, t, out_dtype)
        else:
          plan_w4(kernel, m, k, n, group, t, act_bytes=1 if kernel == "w4a8" else 2,
                  weight_layout=weight_layout)
      except ValueError:
        continue
      return t
    return None
  return None
