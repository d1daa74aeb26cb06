"""`QLinear` and `QEinsum`: drop-in `nnx.Linear` / `nnx.Einsum` with a precision.

Each layer is in one of three modes, set for the whole model by
:func:`lowbit.quantize_model` and :func:`lowbit.convert`, and branched on once
per call from a static attribute:

* ``float``: exactly ``nnx.Linear`` / ``nnx.Einsum`` (the parent's ``__call__``);
* ``fake_quant`` (QAT): ``y = fq_a(x) @ fq_w(W) + b`` with
  :func:`lowbit.quant.fake_quant`; learned quantizer parameters live in
  :class:`QuantState` Variables so optimizers can select them;
* ``converted`` (inference): only integer codes (int4 packed) and scales are
  kept, no float weight; the matmul runs through :func:`lowbit.kernels.qmatmul`.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lowbit import kernels
from lowbit.quant import (
  LearnedClip,
  QArray,
  QuantParams,
  QuantSpec,
  dequantize,
  fake_quant,
  init_learned_clip,
  init_learned_scale,
  learned_clip_params,
  quantize,
)

FLOAT, FAKE_QUANT, CONVERTED = "float", "fake_quant", "converted"
Learn = Literal["scale", "clip"] | None


class QuantState(nnx.Variable):
  """Base type of learned quantizer parameters (select them with this type)."""


class WeightScale(QuantState):
  """Learned weight step size (LSQ), shaped like the weight spec's scale."""


class WeightZeroPoint(QuantState):
  """Learned weight zero point (asymmetric LSQ)."""


class WeightClip(QuantState):
  """Learned clip strength logits (OmniQuant LWC): gamma (max), beta (min)."""


class ActScale(QuantState):
  """Static activation step size: calibrated by PTQ, learned by QAT (LSQ)."""


class InputSmoothing(nnx.Variable):
  """SmoothQuant's per-input-channel factors ``s``: the layer computes ``(x / s) @ (s W)``."""


class QValue(nnx.Variable):
  """Integer codes of a converted weight: int8, or uint8 packed two per byte."""


class QScale(nnx.Variable):
  """Scales (and zero points) of a converted weight."""


def converted_bytes(kernel_shape: tuple[int, ...], spec: QuantSpec | None,
                    param_dtype: jax.typing.DTypeLike = jnp.float32) -> int:
  """Bytes a kernel takes once converted: codes (packed if ``spec.pack``) + scales + zero
  points; with integer group scales, one byte a group and the channel scales."""
  n = int(np.prod(kernel_shape))
  if spec is None:
    return n * jnp.dtype(param_dtype).itemsize
  layout = spec.resolve(tuple(kernel_shape))
  codes = n // 2 if layout.pack_axis is not None else n
  entries = int(np.prod(layout.scale_shape))
  if spec.group_scales == "int":
    channels = entries // layout.scale_shape[layout.group_axis]
    return codes + entries + channels * jnp.dtype(spec.scale_dtype).itemsize
  scales = entries * jnp.dtype(spec.scale_dtype).itemsize
  return codes + scales * (1 if spec.symmetric else 2)


class _QuantMixin:
  """State and conversion shared by QLinear and QEinsum."""

  def _init_quant(self):
    self.observer = None  # PTQ calibration hook (eager only); see lowbit.ptq
    self.mode = FLOAT
    self.weight_spec: QuantSpec | None = None
    self.act_spec: QuantSpec | None = None
    self.learn: Learn = None
    self.qmeta: tuple | None = None
    # how a converted weight is stored: "kn" ([K, N], as the kernel) or "nk" (transposed once at
    # convert time, K-major: what the K-major GPU kernels read, see convert()).
    self.weight_layout = "kn"
    # logical axes of the kernel, e.g. ("embed", "mlp"); lowbit.sharding maps them (and every
    # quantizer array derived from the kernel) onto a device mesh. None: by path, or replicated.
    self.logical_axes: tuple[str | None, ...] | None = None
    # where the fake-quant weight is computed (set by lowbit.sharding.shard for FSDP: the
    # stored kernel is split over the data axis, the computation gathers only that axis).
    self.compute_sharding = None
    # converted mode under tensor parallelism: (mesh, axis, "column" | "row", batch_axis) makes
    # each device run the matmul on its own block (lowbit.sharding.tp_qmatmul, shard_map).
    self.tp: tuple | None = None

  # -- set up --------------------------------------------------------------
  def set_precision(self, weight: QuantSpec | None, act: QuantSpec | None, *,
                    learn: Learn = None, path: str = "") -> None:
    """Enter fake-quant mode with these specs (validated against the kernel's shape)."""
    if self.mode == CONVERTED:
      raise ValueError(f"{path or type(self).__name__}: already converted; quantize from float.")
    name = f"{path or type(self).__name__}.kernel"
    kernel = self.kernel[...]
    if weight is not None:
      weight.resolve(kernel.shape, name=name)
      if weight.pack and weight.pack_axis % kernel.ndim != self._contract_axis():
        raise ValueError(
            f"{name}: pack_axis={weight.pack_axis} is not the contraction axis "
            f"{self._contract_axis()} of the kernel {kernel.shape}; int4 is packed along K.")
    if learn not in (None, "scale", "clip"):
      raise ValueError(f"{name}: learn={learn!r}; use None, 'scale' or 'clip'.")
    if learn is not None and weight is not None and weight.group_scales == "int":
      raise ValueError(
          f"{name}: learn={learn!r} with QuantSpec(group_scales='int'): integer group scales "
          "are calibrated, not learned; use learn=None, or group_scales='float' to learn them.")
    self._check_act_spec(act, path)
    self.weight_spec, self.act_spec, self.learn = weight, act, learn
    self.mode = FAKE_QUANT
    if weight is not None and learn == "scale":
      p = init_learned_scale(kernel, weight)
      self.w_scale = WeightScale(p.scale)
      if p.zero_point is not None:
        self.w_zero = WeightZeroPoint(p.zero_point)
    elif weight is not None and learn == "clip":
      c = init_learned_clip(kernel, weight)
      self.w_clip = WeightClip(c.gamma)
      if c.beta is not None:
        self.w_clip_min = WeightClip(c.beta)

  def set_act_scale(self, scale: jax.Array) -> None:
    """Use a static (calibrated, then learnable) activation scale instead of dynamic ones."""
    if self.act_spec is None:
      raise ValueError("set_act_scale: this layer has no activation spec.")
    if self.act_spec.channel_axes or self.act_spec.group_size is not None:
      raise ValueError(
          f"set_act_scale: a static scale needs a per-tensor activation spec "
          f"(channel_axes=()), this layer's is {self.act_spec}; per-token scales are "
          "dynamic by nature.")
    self.act_scale = ActScale(jnp.asarray(scale, jnp.float32))

  def _weight_params(self):
    if self.learn == "scale":
      return QuantParams(self.w_scale[...],
                         self.w_zero[...] if hasattr(self, "w_zero") else None)
    if self.learn == "clip":
      return LearnedClip(self.w_clip[...],
                         self.w_clip_min[...] if hasattr(self, "w_clip_min") else None)
    return None

  def _act_params(self):
    if getattr(self, "act_scale", None) is not None:
      return QuantParams(self.act_scale[...])
    return None

  def quantized_weight(self) -> QArray:
    """The weight as a QArray in the kernel's own layout (``[K, N]`` for QLinear),
    whatever layout conversion stored it in (an ``"nk"`` weight is transposed back:
    under ``jit`` that transpose cancels against a K-major kernel's own)."""
    if self.mode == CONVERTED:
      stored = self.stored_weight()
      return stored.transpose() if self.weight_layout == "nk" else stored
    kernel = self.kernel[...]
    params = self._weight_params()
    if isinstance(params, LearnedClip):
      params = learned_clip_params(kernel, self.weight_spec, params)
    elif params is not None:
      params = QuantParams(params.scale.astype(self.weight_spec.scale_dtype),
                           None if params.zero_point is None
                           else params.zero_point.astype(self.weight_spec.scale_dtype))
    return quantize(kernel, self.weight_spec, params)

  def stored_weight(self) -> QArray:
    """A converted weight as stored: ``[K, N]``, or ``[N, K]`` when ``weight_layout="nk"``."""
    values, scale, zp = self.qvalue[...], self.qscale[...], (
        self.qzero[...] if hasattr(self, "qzero") else None)
    channel = self.qchannel[...] if hasattr(self, "qchannel") else None
    return QArray(values, scale, zp, *self.qmeta, channel_scale=channel)

  @property
  def weight_shape(self) -> tuple[int, ...]:
    """The kernel's shape (``[K, N]`` for QLinear) in every mode and stored layout."""
    if self.mode == CONVERTED and self.qmeta is not None:
      shape = tuple(self.qmeta[1])
      return shape[::-1] if self.weight_layout == "nk" else shape
    return tuple(self.kernel[...].shape)

  def convert(self, weight_layout: str = "kn") -> None:
    """Fake-quant -> converted: keep codes and scales, drop the float kernel.

    ``weight_layout="nk"`` (QLinear only) stores the weight transposed, ``[N, K]``
    (int4 stays packed along K: ``[N, K/2]`` bytes), once: the layout Hopper's int8
    tensor-core instructions and lowbit's Mosaic GPU int4 kernels read, so a call
    under ``jit`` moves no weight before the kernel (a ``"kn"`` weight costs those
    kernels one transpose per call). Same numbers either way; ``quantized_weight``
    gives ``[K, N]`` back.
    """
    if self.mode != FAKE_QUANT:
      raise ValueError(f"convert: layer is in mode {self.mode!r}; set a precision first.")
    if weight_layout not in ("kn", "nk"):
      raise ValueError(f"convert: weight_layout={weight_layout!r}; use 'kn' or 'nk'.")
    if weight_layout == "nk" and (not isinstance(self, QLinear) or self.weight_spec is None):
      raise ValueError("convert: weight_layout='nk' is for QLinear layers with a quantized "
                       "weight (a 2-D [K, N] kernel); QEinsum stores its kernel as is.")
    if self.weight_spec is not None:
      qa = self.quantized_weight()
      if weight_layout == "nk":
        qa = qa.transpose()
      self.weight_layout = weight_layout
      self.qvalue = QValue(qa.qvalue)
      self.qscale = QScale(qa.scale)
      if qa.zero_point is not None:
        self.qzero = QScale(qa.zero_point)
      if qa.channel_scale is not None:  # integer group scales: each channel's float scale
        self.qchannel = QScale(qa.channel_scale)
      self.qmeta = (qa.bits, qa.shape, qa.channel_axes, qa.group_axis, qa.group_size,
                    qa.pack_axis, qa.zero_point_form)
      del self.kernel
    for name in ("w_scale", "w_zero", "w_clip", "w_clip_min"):
      if hasattr(self, name):
        delattr(self, name)
    self.mode = CONVERTED

  def _weight_for_fake_quant(self) -> jax.Array:
    kernel = self.kernel[...]
    if self.compute_sharding is not None:
      kernel = jax.lax.with_sharding_constraint(kernel, self.compute_sharding)
    if self.weight_spec is None:
      return kernel
    return fake_quant(kernel, self.weight_spec, self._weight_params()).astype(kernel.dtype)


class QLinear(_QuantMixin, nnx.Linear):
  """``nnx.Linear`` with a precision: same constructor and parameter names.

  ``y = q_a(x) @ dq(q_w(kernel)) + bias``, shapes ``x [..., K]``, ``kernel
  [K, N]``, ``y [..., N]``. Float mode calls ``nnx.Linear.__call__`` itself.

  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from lowbit.quant import QuantSpec
  >>> layer = QLinear(256, 64, rngs=nnx.Rngs(0))
  >>> layer.set_precision(QuantSpec(bits=4, channel_axes=(1,), group_size=128, pack=True), None)
  >>> y_fq = layer(jnp.ones((2, 256)))
  >>> layer.convert()
  >>> layer.qvalue[...].dtype, layer.qvalue[...].shape, hasattr(layer, "kernel")
  (dtype('uint8'), (128, 64), False)
  >>> bool(jnp.allclose(layer(jnp.ones((2, 256))), y_fq, rtol=1e-5, atol=1e-5))
  True
  """

  def __init__(self, in_features: int, out_features: int, **kwargs):
    super().__init__(in_features, out_features, **kwargs)
    self._init_quant()
    self.implementation: str | None = None

  @classmethod
  def from_linear(cls, lin: nnx.Linear) -> "QLinear":
    """A float QLinear holding ``lin``'s own parameter arrays (no re-initialization)."""
    kernel = lin.kernel[...]
    bias = lin.bias[...] if lin.bias is not None else None
    q = cls(lin.in_features, lin.out_features, use_bias=lin.use_bias, dtype=lin.dtype,
            param_dtype=lin.param_dtype, precision=lin.precision,
            kernel_init=lambda *_: kernel,
            bias_init=(lambda *_: bias) if bias is not None else nnx.initializers.zeros,
            dot_general=lin.dot_general, promote_dtype=lin.promote_dtype,
            preferred_element_type=lin.preferred_element_type, rngs=nnx.Rngs(0))
    q.logical_axes = getattr(lin, "logical_axes", None)
    return q

  def _contract_axis(self) -> int:
    return 0

  def _check_act_spec(self, act, path):
    if act is not None:
      act.resolve((2, self.in_features), name=f"{path or 'QLinear'} input [M, K]")

  def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
    if getattr(self, "smooth", None) is not None:  # SmoothQuant: (x / s) @ (s W)
      inputs = (inputs / self.smooth[...]).astype(inputs.dtype)
    if self.observer is not None:  # sees what the activation quantizer sees
      self.observer(inputs)
    if self.mode == FLOAT:
      return super().__call__(inputs, out_sharding)
    bias = self.bias[...] if self.bias is not None else None
    if self.mode == FAKE_QUANT:
      kernel = self._weight_for_fake_quant()
      inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
      if self.act_spec is not None:
        k = inputs.shape[-1]
        x2 = fake_quant(inputs.reshape(-1, k), self.act_spec, self._act_params())
        inputs = x2.reshape(inputs.shape)
      y = self.dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())),
                           precision=self.precision)
    else:
      dtype = self.dtype or inputs.dtype
      x = inputs.astype(dtype)
      if self.weight_spec is None:  # activation-only quantization
        x2 = fake_quant(x.reshape(-1, x.shape[-1]), self.act_spec, self._act_params())
        y = jnp.dot(x2.reshape(x.shape), self.kernel[...].astype(dtype), precision=self.precision)
      elif self.tp is not None:
        from lowbit.sharding import tp_qmatmul
        mesh, axis, kind, batch_axis = self.tp
        y = tp_qmatmul(x, self.quantized_weight(), mesh, kind, axis=axis, batch_axis=batch_axis,
                       act_spec=self.act_spec, act_params=self._act_params(),
                       implementation=self.implementation, out_dtype=dtype)
      else:
        y = kernels.qmatmul(x, self.stored_weight(), act_spec=self.act_spec,
                            act_params=self._act_params(), implementation=self.implementation,
                            out_dtype=dtype, weight_layout=self.weight_layout)
      if bias is not None:
        bias = bias.astype(dtype)
    if bias is not None:
      y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    return y


class QEinsum(_QuantMixin, nnx.Einsum):
  """``nnx.Einsum`` with a precision: same constructor and parameter names.

  The weight spec's axes refer to the kernel's axes; int4 packs along the
  kernel's first contracted axis. Activations may be quantized per-tensor.
  In converted mode an einsum that is a matmul, ``x[..., k] @ w[k, ...]``
  (e.g. ``"btk,khd->bthd"``), goes through :func:`lowbit.kernels.qmatmul`
  with the kernel as a ``[K, H*D]`` matrix (:meth:`QArray.as_matrix`): the
  Pallas kernels on GPU / TPU, ``implementation`` as in QLinear; any other
  einsum dequantizes the kernel and runs the einsum.
  """

  def __init__(self, einsum_str: str, kernel_shape, bias_shape=None, **kwargs):
    super().__init__(einsum_str, kernel_shape, bias_shape, **kwargs)
    self._init_quant()
    self.implementation: str | None = None

  def _as_matmul(self, einsum_str: str, x_ndim: int) -> bool:
    """Whether ``einsum_str`` is ``x[..., k] @ w[k, ...]``: the input's last axis is the
    kernel's first and only contracted one, and the output is the input's other axes
    then the kernel's, in order (e.g. ``"btk,khd->bthd"``)."""
    lhs, out = einsum_str.split("->")
    xs, ws = lhs.split(",")
    return (len(xs) == x_ndim and "." not in einsum_str and len(ws) >= 2 and xs[-1] == ws[0]
            and ws[0] not in out and out == xs[:-1] + ws[1:]
            and len(set(xs[:-1]) | set(ws[1:])) == len(xs) - 1 + len(ws) - 1)

  @classmethod
  def from_einsum(cls, e: nnx.Einsum) -> "QEinsum":
    """A float-mode QEinsum with ``e``'s equation, shapes, dtypes and current weights."""
    kernel = e.kernel[...]
    bias = e.bias[...] if e.bias is not None else None
    return cls(e.einsum_str, kernel.shape, None if bias is None else bias.shape,
               dtype=e.dtype, param_dtype=e.param_dtype, precision=e.precision,
               kernel_init=lambda *_: kernel,
               bias_init=(lambda *_: bias) if bias is not None else nnx.initializers.zeros,
               promote_dtype=e.promote_dtype, einsum_op=e.einsum_op,
               preferred_element_type=e.preferred_element_type, rngs=nnx.Rngs(0))

  def _contract_axis(self) -> int:
    lhs, rhs = self.einsum_str.split("->")[0].split(",")
    for i, c in enumerate(rhs):
      if c in lhs:
        return i
    raise ValueError(f"QEinsum {self.einsum_str!r}: the kernel shares no axis with the input.")

  def _check_act_spec(self, act, path):
    if act is not None and (act.channel_axes or act.group_size is not None):
      raise ValueError(
          f"{path or 'QEinsum'}: QEinsum quantizes activations per-tensor only "
          f"(channel_axes=(), no group); got {act}.")

  def __call__(self, inputs: jax.Array, einsum_str: str | None = None,
               out_sharding=None) -> jax.Array:
    if self.mode == FLOAT:
      return super().__call__(inputs, einsum_str, out_sharding)
    einsum_str = (einsum_str or self.einsum_str).replace(" ", "")
    bias = self.bias[...] if self.bias is not None else None
    if self.mode == FAKE_QUANT:
      kernel = self._weight_for_fake_quant()
    elif self.weight_spec is not None and self._as_matmul(einsum_str, inputs.ndim):
      # a matmul in einsum's clothes: the kernel as a [K, H*D...] matrix through the
      # dispatch (the Pallas kernels on GPU / TPU, the integer XLA paths on CPU)
      dtype = self.dtype or inputs.dtype
      w = self.quantized_weight()
      y = kernels.qmatmul(inputs.astype(dtype), w.as_matrix(), act_spec=self.act_spec,
                          act_params=self._act_params(), implementation=self.implementation,
                          out_dtype=dtype)
      y = y.reshape(*inputs.shape[:-1], *w.shape[1:])
      if bias is not None:  # nnx's own bias broadcast (it reads the kernel's shape only)
        shape = self._infer_broadcasted_bias_shape(einsum_str, inputs,
                                                   jax.ShapeDtypeStruct(w.shape, dtype))
        y = y + jnp.reshape(bias.astype(dtype), shape)
      return y
    else:
      kernel = (dequantize(self.quantized_weight()) if self.weight_spec is not None
                else self.kernel[...])
    inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
    if self.act_spec is not None:
      inputs = fake_quant(inputs, self.act_spec, self._act_params())
    y = self.einsum_op(einsum_str, inputs, kernel, precision=self.precision)
    if bias is not None:
      y = y + jnp.reshape(bias, self._infer_broadcasted_bias_shape(einsum_str, inputs, kernel))
    return y
