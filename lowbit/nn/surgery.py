"""Apply a precision policy to an NNX model: `quantize_model`, `convert`, explain rows."""

from __future__ import annotations

from typing import Any

import numpy as np
from flax import nnx

from lowbit.nn.layers import FAKE_QUANT, QEinsum, QLinear, converted_bytes
from lowbit.policy import PrecisionPolicy, describe_spec


def quantizable_layers(model: nnx.Module) -> dict[str, nnx.Module]:
  """``{'/'-joined path: layer}`` for every ``nnx.Linear`` / ``nnx.Einsum`` (lowbit's included)."""
  out = {}
  for path, node in nnx.iter_modules(model):
    if path and isinstance(node, (nnx.Linear, nnx.Einsum)):
      out["/".join(str(p) for p in path)] = node
  return out


def flat_variables(state: nnx.State) -> dict[str, nnx.Variable]:
  """``{'a/b/0/c': Variable}`` of a state (the '/'-joined paths lowbit uses everywhere)."""
  return {"/".join(str(p) for p in path): var for path, var in nnx.to_flat_state(state)}


def _set(model: nnx.Module, path: str, new: nnx.Module) -> None:
  parts = [int(p) if p.isdigit() else p for p in path.split("/")]
  parent = model
  for p in parts[:-1]:
    parent = parent[p] if isinstance(p, int) else getattr(parent, p)
  if isinstance(parts[-1], int):
    parent[parts[-1]] = new
  else:
    setattr(parent, parts[-1], new)


def quantize_model(model: nnx.Module, policy: PrecisionPolicy, *, learn: str | None = None,
                   copy: bool = True) -> nnx.Module:
  """Put every layer a rule matches in fake-quant mode at the rule's precision.

  ``nnx.Linear`` / ``nnx.Einsum`` layers become :class:`QLinear` /
  :class:`QEinsum` holding the same parameter arrays; layers no rule matches,
  or a ``keep_float`` rule matches, are left as they are. ``learn`` selects
  learned quantizer parameters (``"scale"``: LSQ step sizes; ``"clip"``: LWC
  clip strengths; ``None``: scales recomputed from the weight each step).
  Every spec is checked against its layer here (a group size that does not
  divide the layer's input features raises a ``ValueError`` naming the path),
  never inside a jitted step. Returns the model (a copy unless ``copy=False``).
  """
  if copy:
    model = nnx.clone(model)
  layers = quantizable_layers(model)
  resolved = policy.resolve(layers)
  for path, (_, rule) in resolved.items():
    if rule is None or rule.keep_float:
      continue
    layer = layers[path]
    if not isinstance(layer, (QLinear, QEinsum)):
      layer = (QLinear.from_linear(layer) if isinstance(layer, nnx.Linear)
               else QEinsum.from_einsum(layer))
      _set(model, path, layer)
    layer.set_precision(rule.weight, rule.act, learn=learn, path=path)
  return model


def convert(model: nnx.Module, policy: PrecisionPolicy | None = None, *,
            copy: bool = True, weight_layout: str = "kn") -> nnx.Module:
  """Fake-quant (or float + ``policy``) -> converted: integer codes and scales only.

  Quantized layers keep no float copy of their weight; their outputs equal the
  fake-quant model's to float rounding. ``weight_layout="nk"`` stores every
  quantized QLinear weight transposed, K-major (see :meth:`QLinear.convert`);
  QEinsum kernels and unquantized weights stay as they are.
  """
  if weight_layout not in ("kn", "nk"):
    raise ValueError(f"convert: weight_layout={weight_layout!r}; use 'kn' or 'nk'.")
  if policy is not None:
    model = quantize_model(model, policy, copy=copy)
  elif copy:
    model = nnx.clone(model)
  n = 0
  for layer in quantizable_layers(model).values():
    if isinstance(layer, (QLinear, QEinsum)) and layer.mode == FAKE_QUANT:
      nk = weight_layout == "nk" and isinstance(layer, QLinear) and layer.weight_spec is not None
      layer.convert("nk" if nk else "kn")
      n += 1
  if n == 0:
    raise ValueError(
        "convert: no layer is in fake-quant mode; apply a policy first "
        "(lowbit.quantize_model(model, policy)) or pass policy=.")
  return model


def set_implementation(model: nnx.Module, implementation: str | None) -> None:
  """Force the matmul implementation (``"pallas"``, ``"xla"``, ``"dequant"``, ``"reference"``; see
  :func:`lowbit.kernels.qmatmul`) of converted QLinears and of QEinsums whose einsum is a
  matmul (``x[..., k] @ w[k, ...]``)."""
  for layer in quantizable_layers(model).values():
    if isinstance(layer, (QLinear, QEinsum)):
      layer.implementation = implementation


def explain_rows(model: nnx.Module, policy: PrecisionPolicy) -> list[dict[str, Any]]:
  """One row per quantizable layer of ``model``: its path, the index of the rule that takes it,
  weight and act precisions, parameter count and bytes once converted
  (:meth:`PrecisionPolicy.explain` prints them)."""
  rows = []
  layers = quantizable_layers(model)
  for path, (idx, rule) in policy.resolve(layers).items():
    layer = layers[path]
    shape = layer.weight_shape if isinstance(layer, (QLinear, QEinsum)) else layer.kernel[...].shape
    wspec = None if rule is None or rule.keep_float else rule.weight
    aspec = None if rule is None or rule.keep_float else rule.act
    if wspec is not None:
      wspec.resolve(tuple(shape), name=f"{path}.kernel")
    bias = layer.bias[...] if layer.bias is not None else None
    bias_bytes = 0 if bias is None else bias.size * bias.dtype.itemsize
    pdtype = layer.param_dtype
    rows.append(dict(
        path=path, rule=idx, weight=describe_spec(wspec, "w"), act=describe_spec(aspec, "a"),
        params=int(np.prod(shape)) + (0 if bias is None else bias.size),
        bytes=converted_bytes(tuple(shape), wspec, pdtype) + bias_bytes))
  return rows
