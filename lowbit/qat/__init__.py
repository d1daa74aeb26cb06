"""Quantization-aware training on optax and ``nnx.Optimizer``.

Weights (``nnx.Param``) and quantizer parameters (:class:`lowbit.nn.QuantState`:
learned scales, zero points, clips, activation scales) get separate optax
transformations, each an ``nnx.Optimizer`` selecting its Variable type; either
group can be frozen. Start from a float model, apply a policy with
``lowbit.quantize_model(model, policy, learn="scale" | "clip")`` (quantizer
parameters start at the spec's calibration, e.g. MSE clipping), optionally
warm up in float with :func:`set_quant_enabled`, then train.

>>> import jax, jax.numpy as jnp, optax
>>> from flax import nnx
>>> import lowbit
>>> model = lowbit.quantize_model(_Toy(nnx.Rngs(0)), lowbit.policy.w4a16(None), learn="scale")
>>> opts = make_optimizers(model, optax.adamw(1e-2), optax.adam(1e-3))
>>> step = make_train_step(lambda m, b: jnp.mean((m(b[0]) - b[1]) ** 2))
>>> x = jax.random.normal(jax.random.key(0), (32, 16)); y = x[:, :4]
>>> losses = [float(step(model, *opts, (x, y))) for _ in range(30)]
>>> losses[-1] < losses[0]
True
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax
from flax import nnx

from lowbit.nn.layers import FAKE_QUANT, FLOAT, QEinsum, QLinear, QuantState
from lowbit.nn.surgery import quantizable_layers


class _Toy(nnx.Module):  # doctest helper
  def __init__(self, rngs):
    self.fc = nnx.Linear(16, 4, rngs=rngs)

  def __call__(self, x):
    return self.fc(x)


def make_optimizers(model: nnx.Module, weight_tx: optax.GradientTransformation | None,
                    quant_tx: optax.GradientTransformation | None = None, *,
                    freeze_weights: bool = False, freeze_quant: bool = False
                    ) -> tuple[nnx.Optimizer | None, nnx.Optimizer | None]:
  """``(weights_optimizer, quant_optimizer)``; ``None`` for a frozen or absent group.

  ``weight_tx`` updates ``nnx.Param`` (e.g. ``optax.adamw``); ``quant_tx``
  updates :class:`QuantState` (typically a smaller learning rate and no weight
  decay: a decayed step size shrinks toward zero). ``quant_tx=None`` freezes
  the quantizer parameters, as does ``freeze_quant``.
  """
  w = None if (freeze_weights or weight_tx is None) else nnx.Optimizer(model, weight_tx,
                                                                       wrt=nnx.Param)
  has_q = bool(jax.tree.leaves(nnx.state(model, QuantState)))
  q = None if (freeze_quant or quant_tx is None or not has_q) else nnx.Optimizer(
      model, quant_tx, wrt=QuantState)
  return w, q


def make_train_step(loss_fn: Callable[[nnx.Module, Any], jax.Array]) -> Callable[..., jax.Array]:
  """A jitted ``step(model, weights_opt, quant_opt, batch) -> loss``.

  Gradients are taken only for the groups whose optimizer is given; each
  optimizer applies its own transformation to its own Variable type.
  """

  @nnx.jit
  def step(model, weights_opt, quant_opt, batch):
    types = [t for t, o in ((nnx.Param, weights_opt), (QuantState, quant_opt)) if o is not None]
    if not types:
      raise ValueError("train step: both groups are frozen; nothing to train.")
    wrt = nnx.Any(*types)
    loss, grads = nnx.value_and_grad(lambda m: loss_fn(m, batch),
                                     argnums=nnx.DiffState(0, wrt))(model)
    for opt in (weights_opt, quant_opt):
      if opt is not None:
        opt.update(model, grads)
    return loss

  return step


def set_quant_enabled(model: nnx.Module, enabled: bool) -> None:
  """Switch every layer with a precision between fake-quant and float (float warm-up).

  The quantizer parameters are kept; the jitted step retraces once on a switch.
  """
  for layer in quantizable_layers(model).values():
    if isinstance(layer, (QLinear, QEinsum)) and (layer.weight_spec or layer.act_spec):
      if layer.mode not in (FLOAT, FAKE_QUANT):
        raise ValueError("set_quant_enabled: the model is converted; QAT runs before conversion.")
      layer.mode = FAKE_QUANT if enabled else FLOAT
