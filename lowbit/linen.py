"""Linen layers that obey the same :class:`~lowbit.policy.PrecisionPolicy`.

``QDense`` is ``flax.linen.Dense`` plus ``policy`` and ``mode``: at call time it
looks itself up by its own module path (``'/'.join(scope.path)``, e.g.
``'Block_0/mlp'``) and runs in ``float``, ``fake_quant`` or ``converted``
mode. A converted model's params hold ``qvalue`` (int8 or packed uint8) and
``qscale`` (and ``qzero``; ``qchannel`` with integer group scales) instead of
``kernel``: make them from trained float
params with :func:`convert_params`.

>>> import jax, jax.numpy as jnp, flax.linen as nn
>>> import lowbit
>>> class MLP(nn.Module):
...   policy: lowbit.PrecisionPolicy | None = None
...   mode: str = "float"
...   @nn.compact
...   def __call__(self, x):
...     h = nn.relu(QDense(256, policy=self.policy, mode=self.mode, name="up")(x))
...     return QDense(64, policy=self.policy, mode=self.mode, name="down")(h)
>>> x = jnp.ones((4, 64))
>>> params = MLP().init(jax.random.key(0), x)
>>> policy = lowbit.policy.w4a16(group_size=64)
>>> y_fq = MLP(policy, "fake_quant").apply(params, x)
>>> qparams = convert_params(params, policy)
>>> sorted(qparams["params"]["up"]), qparams["params"]["up"]["qvalue"].dtype
(['bias', 'qscale', 'qvalue'], dtype('uint8'))
>>> bool(jnp.allclose(MLP(policy, "converted").apply(qparams, x), y_fq, rtol=1e-5, atol=1e-5))
True
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from lowbit import kernels
from lowbit.policy import PrecisionPolicy
from lowbit.quant import QArray, QuantSpec, fake_quant, quantize

MODES = ("float", "fake_quant", "converted")


def _specs(policy: PrecisionPolicy | None, path: str) -> tuple[QuantSpec | None, QuantSpec | None]:
  if policy is None:
    return None, None
  _, rule = policy.lookup(path)
  if rule is None or rule.keep_float:
    return None, None
  return rule.weight, rule.act


class QDense(nn.Module):
  """``nn.Dense`` with a precision from ``policy`` (looked up by this module's path)."""

  features: int
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros_init()
  policy: PrecisionPolicy | None = None
  mode: str = "float"
  implementation: str | None = None

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    if self.mode not in MODES:
      raise ValueError(f"QDense.mode={self.mode!r}; use one of {MODES}.")
    path = "/".join(self.scope.path)
    wspec, aspec = _specs(self.policy, path) if self.mode != "float" else (None, None)
    k, n = inputs.shape[-1], self.features
    if wspec is not None:
      layout = wspec.resolve((k, n), name=f"{path}.kernel")
    bias = (self.param("bias", self.bias_init, (n,), self.param_dtype)
            if self.use_bias else None)
    if self.mode == "converted" and wspec is not None:
      qshape = (k // 2, n) if layout.pack_axis is not None else (k, n)
      qvalue = self.param("qvalue", nn.initializers.zeros_init(), qshape,
                          jnp.uint8 if layout.pack_axis is not None else jnp.int8)
      int_scales = wspec.group_scales == "int"  # int8 group scales, a float one per channel
      qscale = self.param("qscale", nn.initializers.ones_init(), layout.scale_shape,
                          jnp.int8 if int_scales else wspec.scale_dtype)
      qzero = (None if wspec.symmetric else
               self.param("qzero", nn.initializers.zeros_init(), layout.scale_shape,
                          wspec.scale_dtype))
      qchannel = (self.param("qchannel", nn.initializers.ones_init(),
                             layout.channel_scale_shape, wspec.scale_dtype)
                  if int_scales else None)
      w = QArray(qvalue, qscale, qzero, wspec.bits, (k, n), layout.channel_axes,
                 layout.group_axis, layout.group_size, layout.pack_axis,
                 "integer" if wspec.symmetric else wspec.zero_point_form, qchannel)
      dtype = self.dtype or inputs.dtype
      y = kernels.qmatmul(inputs.astype(dtype), w, act_spec=aspec,
                          implementation=self.implementation, out_dtype=dtype)
    else:
      kernel = self.param("kernel", self.kernel_init, (k, n), self.param_dtype)
      if wspec is not None:
        kernel = fake_quant(kernel, wspec).astype(kernel.dtype)
      inputs, kernel, bias = nn.dtypes.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
      if aspec is not None:
        inputs = fake_quant(inputs.reshape(-1, k), aspec).reshape(inputs.shape)
      y = lax.dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())),
                          precision=self.precision)
    if bias is not None:
      y = y + jnp.reshape(bias.astype(y.dtype), (1,) * (y.ndim - 1) + (-1,))
    return y


def convert_params(variables: dict, policy: PrecisionPolicy) -> dict:
  """Float Linen variables -> converted: each matched ``kernel`` becomes codes + scales.

  Paths are the '/'-joined keys under ``params`` (what ``QDense`` looks up).
  """
  def walk(tree, path):
    if not isinstance(tree, dict):
      return tree
    if "kernel" in tree and getattr(tree["kernel"], "ndim", 0) == 2:
      wspec, _ = _specs(policy, "/".join(path))
      if wspec is not None:
        qa = quantize(tree["kernel"], wspec)
        out = {k: v for k, v in tree.items() if k != "kernel"}
        out["qvalue"], out["qscale"] = qa.qvalue, qa.scale
        if qa.zero_point is not None:
          out["qzero"] = qa.zero_point
        if qa.channel_scale is not None:
          out["qchannel"] = qa.channel_scale
        return out
    return {k: walk(v, path + (k,)) for k, v in tree.items()}

  out = dict(variables)
  out["params"] = walk(dict(variables["params"]), ())
  return out
