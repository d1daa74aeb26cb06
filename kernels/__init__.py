"""lowbit.kernels: Pallas int8 / int4 matmuls, their references and one dispatch.

Kernels (one file each, each with ``reference`` and an ``xla`` path):

* :func:`w8a8_matmul`: int8 x int8 -> int32, per-token x per-channel scales;
* :func:`w4a16_matmul`: float x int4 packed, per-channel or group scales;
* :func:`w4a8_matmul`: int8 x int4 packed (unpacked to int8 in the kernel).

All three also have Hopper kernels in Pallas' Mosaic GPU backend (TMA,
``wgmma``, warp specialization), selected by their tiles:
``w8a8_matmul(..., block_sizes=HopperTiles(...))``, and
``w4a16_matmul`` / ``w4a8_matmul(..., block_sizes=HopperW4Tiles(...))``; with
neither ``backend`` nor ``block_sizes`` a Hopper GPU takes them where the GPU runs
put them ahead (``_mosaic_gpu.AUTO``: W8A8 from M = 2048; with weights stored
K-major and group scales, W4A8 at any M and W4A16 with bf16 tokens at M <= 16 and
M >= 64).

:func:`qmatmul` picks the kernel from the operands and the backend from the
platform (GPU: Pallas Triton, or Mosaic GPU as above; TPU: Pallas Mosaic; CPU:
the XLA path), with an ``implementation=`` override.
"""

from __future__ import annotations

import warnings
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax
from lowbit.kernels import _mosaic_gpu, _pallas, w4a8, w4a16, w8a8
from lowbit.kernels._mosaic_gpu import HopperTiles, HopperW4Tiles
from lowbit.kernels._pallas import BlockSizes, default_block_sizes, dequant_dot, platform
from lowbit.kernels.w4a8 import w4a8_matmul
from lowbit.kernels.w4a16 import w4a16_matmul
from lowbit.kernels.w8a8 import w8a8_matmul

from lowbit.quant import QArray, QuantParams, QuantSpec, dequantize, quantize

Implementation = Literal["pallas", "xla", "dequant", "reference"]


def kernel_for(w: QArray, act_spec: QuantSpec | None) -> str | None:
  """Name of the Pallas kernel that handles this weight / activation pairing, or None."""
  if w.ndim != 2 or w.zero_point is not None or w.channel_axes not in ((), (1,)):
    return None
  if w.group_axis not in (None, 0) or (w.group_size and w.shape[0] % w.group_size):
    return None  # ragged groups: the XLA path (same numbers)
  a8 = (act_spec is not None and act_spec.bits <= 8 and act_spec.symmetric
        and act_spec.group_size is None and not act_spec.pack
        and tuple(a % 2 for a in act_spec.channel_axes) in ((), (0,)))
  if act_spec is not None and not a8:
    return None
  if w.packed and w.pack_axis == 0 and w.bits <= 4:
    return "w4a8" if a8 else "w4a16"
  if not w.packed and a8 and w.group_size is None:
    return "w8a8"
  return None


def qmatmul(x: jax.Array, w: QArray, *, act_spec: QuantSpec | None = None,
            act_params: QuantParams | None = None,
            implementation: Implementation | None = None,
            out_dtype: jax.typing.DTypeLike | None = None,
            block_sizes: BlockSizes | HopperTiles | HopperW4Tiles | None = None,
            weight_layout: str = "kn") -> jax.Array:
  """``y = q_a(x) @ dequantize(w)`` through the fastest correct path.

  ``x [..., K]`` float; ``w [K, N]`` QArray; ``act_spec`` (optional) quantizes
  ``x`` dynamically, on ``x`` flattened to ``[M, K]`` (``channel_axes=(0,)``
  is per-token; ``act_params`` gives a static scale instead). Returns
  ``[..., N]`` in ``out_dtype`` (default ``x.dtype``).

  ``implementation``: ``None`` uses the Pallas kernel on GPU/TPU when one
  handles the pairing and the XLA path otherwise (and always on CPU; on a GPU
  whose jax has no Pallas Triton backend, also where no Mosaic GPU kernel takes the
  call, with a ``RuntimeWarning``);
  ``"pallas"`` forces the kernel (interpreted on CPU) and raises a
  ``ValueError`` when none applies; ``"xla"`` the XLA path (same numbers as the
  kernel: int32 sums, group scales on f32 partial sums); ``"dequant"`` one
  float dot in ``x``'s dtype with f32 accumulation, the path weights without a
  kernel take (:func:`lowbit.kernels._pallas.dequant_dot`: grouped weights are
  dequantized to that dtype first, so they differ from the kernels by about its
  rounding); on an H200 it beats the W4A16 kernel from M = 256 up (0.94x of
  bf16 against 0.33x at M = 4096, docs/kernels.md), so choose it for long
  prefills; ``"reference"`` dequantize-then-dot in f32 at highest precision.

  ``block_sizes``: tiles of the Pallas kernel; a :class:`HopperTiles` selects
  the Mosaic GPU W8A8 kernel and a :class:`HopperW4Tiles` the Mosaic GPU int4
  kernel (W4A16 or W4A8; Hopper GPUs, jax's GPU interpreter on CPU), with
  ``implementation="pallas"`` and the pairing they serve.

  ``weight_layout="nk"``: ``w`` is stored transposed, ``w.transpose()`` of the
  ``[K, N]`` weight (what ``lowbit.convert(..., weight_layout="nk")`` keeps); the
  Pallas kernels then read it K-major (Triton ``k_major`` tiles, the Mosaic GPU
  kernels) with no transpose in the call, as do the XLA and ``"dequant"`` paths;
  ``"reference"`` transposes it back.
  """
  x = jnp.asarray(x)
  out_dtype = out_dtype or x.dtype
  w_stored, w = w, _pallas.logical_weight(w, weight_layout, "qmatmul")
  lead, k = x.shape[:-1], x.shape[-1]
  if w.ndim != 2 or w.shape[0] != k:
    raise ValueError(f"qmatmul: x has K={k} but w has shape {w.shape}; expected [{k}, N].")
  x2 = x.reshape(-1, k)
  xq = quantize(x2, act_spec, act_params) if act_spec is not None else None
  name = kernel_for(w, act_spec)
  impl = implementation
  if impl is None:
    impl = "pallas" if (name is not None and platform() in ("gpu", "tpu")) else "xla"
    if (impl == "pallas" and platform() == "gpu" and block_sizes is None
        and not _pallas.has_triton()
        and _mosaic_gpu.default_tiles(name, x2 if name == "w4a16" else xq, w, weight_layout,
                                      jnp.float32) is None):
      warnings.warn(
          f"qmatmul: this jax ({jax.__version__}) has no Pallas Triton backend, which the "
          f"{name.upper()} kernel needs on this GPU for this shape; running the XLA path (the "
          "kernels' numbers: integer sums, group scales on f32 partial sums), slower. Pass "
          "implementation='xla' to silence this.", RuntimeWarning, stacklevel=2)
      impl = "xla"
  if impl not in ("pallas", "xla", "dequant", "reference"):
    raise ValueError(f"qmatmul: implementation={impl!r}; use 'pallas', 'xla', 'dequant', "
                     "'reference' or None.")
  if impl == "pallas" and name is None:
    raise ValueError(
        f"qmatmul: no Pallas kernel takes w (bits={w.bits}, packed={w.packed}, "
        f"group_size={w.group_size}, symmetric={w.symmetric}) with act_spec={act_spec}; "
        "use implementation='xla'.")
  for tiles_cls, names in ((HopperTiles, ("w8a8",)), (HopperW4Tiles, ("w4a16", "w4a8"))):
    if isinstance(block_sizes, tiles_cls) and (impl != "pallas" or name not in names):
      what = " / ".join(n.upper() for n in names)
      raise ValueError(
          f"qmatmul: {tiles_cls.__name__} select the Mosaic GPU {what} kernel; they need "
          f"implementation='pallas' and that pairing (got implementation={impl!r}, kernel "
          f"{name!r}).")
  if impl in ("reference", "dequant") or (impl == "xla" and name is None):
    xin = dequantize(xq) if xq is not None else x2
    if impl == "reference":
      y = jnp.dot(xin.astype(jnp.float32), dequantize(w), precision=lax.Precision.HIGHEST)
    else:
      y = dequant_dot(xin.astype(x.dtype), w_stored, weight_layout)
  elif impl == "pallas":  # the stored weight: the kernels read an "nk" one K-major
    fn = {"w8a8": w8a8.w8a8_matmul, "w4a8": w4a8.w4a8_matmul, "w4a16": w4a16.w4a16_matmul}[name]
    y = fn(x2 if name == "w4a16" else xq, w_stored, out_dtype=jnp.float32,
           block_sizes=block_sizes, weight_layout=weight_layout)
  else:
    fn = {"w8a8": w8a8.xla, "w4a8": w4a8.xla, "w4a16": w4a16.xla}[name]
    y = fn(x2 if name == "w4a16" else xq, w_stored, out_dtype=jnp.float32,
           weight_layout=weight_layout)
  return y.astype(out_dtype).reshape(*lead, w.shape[1])


__all__ = [
    "BlockSizes", "HopperTiles", "HopperW4Tiles", "default_block_sizes", "kernel_for", "qmatmul",
    "w4a8", "w4a8_matmul", "w4a16", "w4a16_matmul", "w8a8", "w8a8_matmul",
]
