"""Post-training quantization: calibration over batches, SmoothQuant, GPTQ, quality metrics.

The flow on a float model::

    qmodel = lowbit.quantize_model(model, policy)          # fake-quant, specs checked
    stats = lowbit.ptq.collect(qmodel, batches, hessian=True)   # float activations
    lowbit.ptq.smooth_quant(qmodel, stats, alpha=0.5)      # optional, for A8;
    stats = lowbit.ptq.collect(qmodel, batches)            # then collect the smoothed inputs
    lowbit.ptq.calibrate_activations(qmodel, stats)        # static activation scales
    lowbit.ptq.gptq(qmodel, stats)                         # optional, weights
    converted = lowbit.convert(qmodel)

Statistics are collected eagerly through each lowbit layer's ``observer``
hook, with the layers in float mode (the activations a float model produces).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lowbit.nn.layers import FAKE_QUANT, FLOAT, InputSmoothing, QLinear, WeightScale, WeightZeroPoint
from lowbit.nn.surgery import quantizable_layers
from lowbit.quant import QuantParams, QuantSpec, calibrate, code_zero_point
from lowbit.quant.quantize import _Tracer

try:
  from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
  def tqdm(x, **_):
    return x


@dataclasses.dataclass
class LayerStats:
  """Input statistics of one linear layer over the calibration batches.

  ``channel_absmax [K]``: ``max |x[:, k]|``; ``xtx [K, K]``: ``sum x^T x`` (for
  GPTQ; float64); ``samples``: up to ``max_samples`` input values kept at
  random (for percentile and MSE activation scales); ``n``: rows seen.
  """

  channel_absmax: np.ndarray
  xtx: np.ndarray | None
  samples: np.ndarray
  n: int = 0
  smoothed: bool = False  # collected after smooth_quant (inputs already divided by s)


class _Observer:
  def __init__(self, k: int, hessian: bool, max_samples: int, seed: int):
    self.stats = LayerStats(np.zeros(k), np.zeros((k, k)) if hessian else None,
                            np.zeros((0,), np.float32))
    self.max_samples = max_samples
    self.rng = np.random.default_rng(seed)

  def __call__(self, x):
    if isinstance(x, _Tracer):
      raise ValueError("PTQ statistics are collected eagerly; call the model outside jit.")
    x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    st = self.stats
    st.channel_absmax = np.maximum(st.channel_absmax, np.abs(x).max(0))
    if st.xtx is not None:
      st.xtx += x.T @ x
    st.n += x.shape[0]
    take = min(x.size, self.max_samples)
    new = self.rng.choice(x.ravel(), take, replace=False).astype(np.float32)
    pool = np.concatenate([st.samples, new])
    if pool.size > self.max_samples:
      pool = self.rng.choice(pool, self.max_samples, replace=False)
    st.samples = pool


def collect(model: nnx.Module, batches: Iterable[Any],
            forward: Callable[[nnx.Module, Any], Any] = lambda m, b: m(b), *,
            hessian: bool = False, max_samples: int = 1 << 16, progress: bool = True,
            seed: int = 0) -> dict[str, LayerStats]:
  """Run ``batches`` through ``model`` (lowbit layers in float mode); per-layer input stats.

  Returns ``{module path: LayerStats}`` for every :class:`QLinear` that has a
  precision. Layers are returned to their previous mode.
  """
  layers = {p: m for p, m in quantizable_layers(model).items()
            if isinstance(m, QLinear) and (m.weight_spec is not None or m.act_spec is not None)}
  if not layers:
    raise ValueError("ptq.collect: no lowbit layer with a precision; apply "
                     "lowbit.quantize_model(model, policy) first.")
  modes = {p: m.mode for p, m in layers.items()}
  obs = {}
  try:
    for i, (p, m) in enumerate(layers.items()):
      m.mode = FLOAT
      obs[p] = m.observer = _Observer(m.in_features, hessian, max_samples, seed + i)
      obs[p].stats.smoothed = getattr(m, "smooth", None) is not None
    for b in tqdm(batches, desc="calibration", disable=not progress):
      forward(model, b)
  finally:
    for p, m in layers.items():
      m.observer = None
      m.mode = modes[p]
  return {p: o.stats for p, o in obs.items()}


def calibrate_activations(model: nnx.Module, stats: dict[str, LayerStats]) -> None:
  """Static per-tensor activation scales from the collected samples, per each layer's
  ``act_spec.calibration`` (absmax uses the true running max, not the sample)."""
  for p, layer in quantizable_layers(model).items():
    if p not in stats or not isinstance(layer, QLinear) or layer.act_spec is None:
      continue
    spec = layer.act_spec
    if spec.channel_axes or spec.group_size is not None:
      continue  # per-token scales are dynamic
    st = stats[p]
    if (getattr(layer, "smooth", None) is not None) != st.smoothed:
      raise ValueError(
          f"calibrate_activations: {p}'s statistics were collected "
          f"{'after' if st.smoothed else 'before'} smoothing but the layer is "
          f"{'not ' if st.smoothed else ''}smoothed; call ptq.collect again after smooth_quant.")
    if spec.calibration == "absmax":
      amax = float(st.channel_absmax.max())
      data = jnp.asarray([amax, -amax], jnp.float32)
    else:
      data = jnp.asarray(st.samples, jnp.float32)
    scale = calibrate(data.reshape(-1, 1), spec).scale
    layer.set_act_scale(jnp.reshape(scale.astype(jnp.float32), (1, 1)))


def smooth_quant(model: nnx.Module, stats: dict[str, LayerStats], alpha: float = 0.5,
                 paths: Iterable[str] | None = None) -> None:
  """Migrate activation outliers into the weights (Xiao et al. 2023).

  For each layer with an activation spec: ``s_k = max|X_k|^alpha /
  max_n |W_kn|^(1-alpha)``, then ``W <- diag(s) W`` and the layer divides its
  input by ``s`` (:class:`InputSmoothing`; a deployment can fold ``1/s`` into
  the preceding norm). The product ``(x/s) (sW)`` equals ``x W``.
  """
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"smooth_quant: alpha={alpha} must be in [0, 1].")
  layers = quantizable_layers(model)
  for p in (paths if paths is not None else stats):
    layer = layers[p]
    if not isinstance(layer, QLinear) or layer.act_spec is None or layer.mode != FAKE_QUANT:
      continue
    if stats[p].smoothed or getattr(layer, "smooth", None) is not None:
      raise ValueError(f"smooth_quant: {p} is already smoothed; smooth a layer once.")
    if getattr(layer, "learn", None) is not None:
      raise ValueError(f"smooth_quant: {p} has learned quantizer parameters; smooth before "
                       "quantize_model(..., learn=...) or use learn=None.")
    w = np.asarray(layer.kernel[...], np.float64)
    xmax = np.maximum(stats[p].channel_absmax, 1e-5)
    wmax = np.maximum(np.abs(w).max(1), 1e-5)
    s = xmax ** alpha / wmax ** (1 - alpha)
    layer.kernel.set_value(jnp.asarray(w * s[:, None], layer.kernel[...].dtype))
    layer.smooth = InputSmoothing(jnp.asarray(s, jnp.float32))


def gptq_quantize(w: np.ndarray, h: np.ndarray, spec: QuantSpec, *, damp: float = 0.01,
                  act_order: bool = False) -> tuple[np.ndarray, QuantParams]:
  """GPTQ (Frantar et al. 2023) for a ``[K, N]`` weight with input Hessian ``h = X^T X``.

  Quantizes one input row ``k`` at a time (in ``diag(h)``-descending order with
  ``act_order``) and spreads its error over the rows not yet quantized:
  ``W[j] -= (w_k - q(w_k)) * Hinv[k, j] / Hinv[k, k]`` with ``Hinv`` the upper
  Cholesky factor of ``(h + damp * mean(diag h) I)^-1``. Scales are chosen by
  the spec's calibration from the original weight (per group when grouped:
  "static groups", so act-order keeps the group layout). Returns the weight on
  the quantization grid ``[K, N]`` and its :class:`QuantParams`.
  """
  w = np.array(w, np.float64)
  k, n = w.shape
  if spec.channel_axes not in ((1,), (-1,)) or spec.group_axis not in (0, -2):
    raise ValueError(f"gptq: spec must be per-output-channel (channel_axes=(1,)), got {spec}.")
  if spec.group_scales == "int":
    raise ValueError(
        "gptq: QuantSpec(group_scales='int') is not supported yet (GPTQ's weight would need "
        "its integer group scales fixed with it); use group_scales='float' for GPTQ.")
  params = calibrate(jnp.asarray(w, jnp.float32), spec)
  s = np.asarray(params.scale, np.float64)                     # [G, N]
  z = (np.zeros_like(s) if params.zero_point is None
       else np.asarray(code_zero_point(params.scale, params.zero_point, spec.bits,
                                       spec.zero_point_form), np.float64))
  group = spec.group_size or k
  h = np.array(h, np.float64)
  dead = np.diag(h) == 0
  h[dead, dead] = 1.0
  w[dead] = 0.0
  perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
  w, h = w[perm], h[np.ix_(perm, perm)]
  h += damp * np.mean(np.diag(h)) * np.eye(k)
  hinv = np.linalg.cholesky(np.linalg.inv(h)).T                # upper
  q = np.zeros_like(w)
  for i in range(k):
    g = perm[i] // group
    col = w[i]
    code = np.clip(np.round(col / s[g]) + z[g], spec.qmin, spec.qmax)
    q[i] = (code - z[g]) * s[g]
    err = (col - q[i]) / hinv[i, i]
    w[i + 1:] -= np.outer(hinv[i, i + 1:], err)
  out = np.empty_like(q)
  out[perm] = q
  return out, params


def gptq(model: nnx.Module, stats: dict[str, LayerStats], *, damp: float = 0.01,
         act_order: bool = False, progress: bool = True) -> None:
  """Replace each quantized layer's weight by its GPTQ solution (needs ``collect(hessian=True)``).

  The layer then holds the GPTQ weight (on the grid) and its scales as learned
  scale parameters, so fake-quant and conversion reproduce the GPTQ codes exactly.
  """
  layers = quantizable_layers(model)
  for p in tqdm(list(stats), desc="gptq", disable=not progress):
    layer = layers[p]
    if not isinstance(layer, QLinear) or layer.weight_spec is None:
      continue
    if stats[p].xtx is None:
      raise ValueError("gptq: statistics have no Hessian; collect(..., hessian=True).")
    spec = layer.weight_spec
    w = np.asarray(layer.kernel[...], np.float64)
    wq, params = gptq_quantize(w, stats[p].xtx / max(stats[p].n, 1), spec, damp=damp,
                               act_order=act_order)
    layer.kernel.set_value(jnp.asarray(wq, layer.kernel[...].dtype))
    for name in ("w_scale", "w_zero", "w_clip", "w_clip_min"):
      if hasattr(layer, name):
        delattr(layer, name)
    layer.learn = "scale"
    layer.w_scale = WeightScale(params.scale.astype(jnp.float32))
    if params.zero_point is not None:
      layer.w_zero = WeightZeroPoint(params.zero_point.astype(jnp.float32))


def compare(model: nnx.Module, reference: nnx.Module, batches: Iterable[Any],
            logits_fn: Callable[[nnx.Module, Any], jax.Array] = lambda m, b: m(b[0]),
            targets_fn: Callable[[Any], jax.Array] = lambda b: b[1], *,
            progress: bool = True) -> dict[str, float]:
  """Quality of ``model`` against ``reference`` on the same batches.

  Per token, with ``p`` the reference's and ``q`` the model's distribution:
  ``loss`` (cross-entropy of the targets), ``loss_ref``, ``delta_loss``,
  ``ppl = exp(loss)``, ``kl = sum p (log p - log q)`` (mean over tokens) and
  ``top1_agreement`` (argmax equal).
  """
  tot = dict(loss=0.0, loss_ref=0.0, kl=0.0, top1=0.0)
  count = 0
  for b in tqdm(batches, desc="evaluate", disable=not progress):
    lq = jax.nn.log_softmax(logits_fn(model, b).astype(jnp.float32), -1)
    lp = jax.nn.log_softmax(logits_fn(reference, b).astype(jnp.float32), -1)
    y = targets_fn(b)
    nll_q = -jnp.take_along_axis(lq, y[..., None], -1)[..., 0]
    nll_p = -jnp.take_along_axis(lp, y[..., None], -1)[..., 0]
    tot["loss"] += float(nll_q.sum())
    tot["loss_ref"] += float(nll_p.sum())
    tot["kl"] += float((jnp.exp(lp) * (lp - lq)).sum())
    tot["top1"] += float((lq.argmax(-1) == lp.argmax(-1)).sum())
    count += y.size
  out = {k: v / count for k, v in tot.items()}
  return dict(loss=out["loss"], loss_ref=out["loss_ref"], delta_loss=out["loss"] - out["loss_ref"],
              ppl=float(np.exp(out["loss"])), ppl_ref=float(np.exp(out["loss_ref"])),
              kl=out["kl"], top1_agreement=out["top1"], tokens=count)
