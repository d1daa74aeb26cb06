"""Shard lowbit models over a device mesh with JAX's own machinery (GSPMD).

Every array of a model gets *logical* axes, and a rule set maps logical axes
onto mesh axes; the result is one ``NamedSharding`` per array, applied with
``jax.device_put``. ``jax.jit`` then compiles the sharded program, inserting
the collectives (data parallel, FSDP, tensor parallel, or 2-D mixes).

Where the logical axes come from:

* a lowbit layer's kernel: ``layer.logical_axes`` (the transformer sets
  ``("embed", "heads")`` on ``q_proj``, ``("mlp", "embed")`` on ``down_proj``, ...),
  else :data:`KERNEL_AXES` by path;
* every quantizer array *derived from* that kernel follows it: packed int4
  codes ``[K/2, N]`` take the kernel's ``(K, N)`` axes, scales / zero points /
  learned clips ``[G, N]`` take ``(K axis if G > 1 else None, N axis)``,
  SmoothQuant factors ``[K]`` the K axis, a bias ``[N]`` the N axis, a static
  activation scale is replicated. So a scale shared over a sharded axis
  (per-channel: ``G = 1``) is replicated along it, and group scales are split
  exactly where their groups are;
* embeddings and norms: :data:`OTHER_AXES` by path; anything else is replicated.

A mesh axis is only used where it divides the dimension (else that dimension
is replicated, and :func:`explain` says so). Sharding packed int4 along K
splits the *packed* rows: under ``jax.jit`` XLA unpacks and reshards as needed,
so results are exact on any mesh, and checkpoints keep the one packed format.

>>> import jax
>>> from flax import nnx
>>> import lowbit
>>> cfg = lowbit.TransformerConfig.llama(vocab_size=64, d_model=32, n_layers=1, n_heads=4,
...                                      n_kv_heads=2, d_ff=64, max_len=16)
>>> model = lowbit.Transformer(cfg, rngs=nnx.Rngs(0))
>>> specs = partition_specs(model, make_mesh((1, 1)), RULES["tp"])
>>> tuple(specs["layers/0/mlp/down_proj/kernel"]), tuple(specs["layers/0/attn/q_proj/kernel"])
(('model',), (None, 'model'))
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lowbit.nn.surgery import flat_variables, quantizable_layers

if TYPE_CHECKING:
  from lowbit.quant import QArray, QuantParams, QuantSpec

Axes = tuple[str | None, ...]

KERNEL_AXES: tuple[tuple[str, tuple[str | None, str | None]], ...] = (
    (r"(.*/)?attn/q_proj", ("embed", "heads")),
    (r"(.*/)?attn/[kv]_proj", ("embed", "kv_heads")),
    (r"(.*/)?attn/o_proj", ("heads", "embed")),
    (r"(.*/)?mlp/(gate|up)_proj", ("embed", "mlp")),
    (r"(.*/)?mlp/down_proj", ("mlp", "embed")),
    (r"(.*/)?lm_head", ("embed", "vocab")),
)
"""Kernel ``[K, N]`` logical axes by layer path, for layers without ``logical_axes``."""

OTHER_AXES: tuple[tuple[str, Axes], ...] = (
    (r"(.*/)?embed/embedding", ("vocab", "embed")),
    (r"(.*/)?(pos_embed|type_embed)/embedding", (None, "embed")),
    (r".*norm/(scale|bias)", ("embed",)),
)
"""Logical axes of non-linear arrays, by variable path."""

RULES: dict[str, dict[str, str]] = {
    "dp": {},
    "fsdp": {"embed": "data"},
    "tp": {"heads": "model", "kv_heads": "model", "mlp": "model", "vocab": "model"},
    "fsdp_tp": {"embed": "data", "heads": "model", "kv_heads": "model", "mlp": "model",
                "vocab": "model"},
}
"""Ready-made logical -> mesh rules for a ``("data", "model")`` mesh. ``dp``:
weights replicated (batch split over ``data``); ``fsdp``: weights split over
``data`` along the model width; ``tp``: attention heads, MLP width and vocab
split over ``model`` (Megatron's column / row parallel pairs); ``fsdp_tp``: both."""

# lowbit layer attribute -> which kernel axes its array takes
_DERIVED = {"kernel": "kernel", "qvalue": "kernel", "bias": "out", "qscale": "groups",
            "qzero": "groups", "qchannel": "groups", "w_scale": "groups", "w_zero": "groups",
            "w_clip": "groups", "w_clip_min": "groups", "smooth": "in", "act_scale": "none"}


def _kernel_axes(path: str, layer) -> tuple[str | None, str | None] | None:
  axes = getattr(layer, "logical_axes", None)
  if axes is not None:
    return tuple(axes)
  for rx, a in KERNEL_AXES:
    if re.fullmatch(rx, path):
      return a
  return None


def logical_axes(model: nnx.Module) -> dict[str, Axes]:
  """``{variable path: logical axes}`` for every array of ``model`` (None: replicated)."""
  flat = flat_variables(nnx.state(model))
  out: dict[str, Axes] = {}
  for lpath, layer in quantizable_layers(model).items():
    axes = _kernel_axes(lpath, layer)
    if axes is None or len(axes) != 2:
      continue
    k_ax, n_ax = axes
    for attr, kind in _DERIVED.items():
      key = f"{lpath}/{attr}"
      if key not in flat:
        continue
      shape = flat[key].get_value().shape
      if (attr in ("qvalue", "qscale", "qzero", "qchannel")
          and getattr(layer, "weight_layout", "kn") == "nk"):
        # stored transposed (convert(weight_layout="nk")): the same axes, swapped
        out[key] = {"kernel": (n_ax, k_ax),
                    "groups": (n_ax, k_ax if shape[1] > 1 else None)}[kind]
        continue
      out[key] = {"kernel": (k_ax, n_ax), "out": (n_ax,), "in": (k_ax,), "none": (None,) * len(shape),
                  "groups": ((k_ax if shape[0] > 1 else None, n_ax) if len(shape) == 2
                             else (None,) * len(shape))}[kind]
  for key, var in flat.items():
    if key in out:
      continue
    ndim = len(var.get_value().shape)
    out[key] = next((a for rx, a in OTHER_AXES if re.fullmatch(rx, key) and len(a) == ndim),
                    (None,) * ndim)
  return out


def _to_spec(axes: Axes, shape, mesh: Mesh, rules: Mapping[str, str]) -> tuple[PartitionSpec, list]:
  used, spec, notes = set(), [], []
  for a, d in zip(axes, shape, strict=True):
    m = rules.get(a) if a is not None else None
    if m is not None and (m in used or d % mesh.shape[m]):
      notes.append(f"{a}={d} not split over {m} ({'axis already used' if m in used else 'indivisible'})")
      m = None
    if m is not None:
      used.add(m)
    spec.append(m)
  while spec and spec[-1] is None:
    spec.pop()
  return PartitionSpec(*spec), notes


def _group_conflicts(model: nnx.Module, mesh: Mesh, rules: Mapping[str, str],
                     fsdp_axis: str | None) -> dict[str, str]:
  """Layers whose K axis must stay whole: ``{layer path: reason}``.

  A quantization group along K must not straddle two devices of an axis the
  computation stays split over (every axis but the FSDP one, which is gathered
  before use), else the fake-quant or dequantize reshape forces a gather of
  the full weight.
  """
  out = {}
  for lpath, layer in quantizable_layers(model).items():
    spec = getattr(layer, "weight_spec", None)
    axes = _kernel_axes(lpath, layer)
    if spec is None or axes is None or (spec.group_size is None and not spec.pack):
      continue
    if spec.group_size is not None and spec.group_axis not in (0, -2):  # grouped along K only
      continue
    m = rules.get(axes[0]) if axes[0] is not None else None
    k = int(getattr(layer, "in_features", 0) or 0)
    if m is None or m == fsdp_axis or not k or k % mesh.shape[m]:
      continue
    # packed int4 is half-split along K: each device's packed rows are two blocks of K / 2m
    blocks = mesh.shape[m] * (2 if spec.pack else 1)
    if k % blocks or (spec.group_size and (k // blocks) % spec.group_size):
      what = f"groups of {spec.group_size}" if spec.group_size else "the packed half-blocks"
      out[lpath] = f"K={k} over {m}={mesh.shape[m]} cuts {what}; K kept whole"
  return out


def _layer_of(path: str, conflicts: Mapping[str, str]) -> str | None:
  head, _, attr = path.rpartition("/")
  return head if head in conflicts and attr in _DERIVED else None


def _specs_and_notes(model, mesh, rules, fsdp_axis):
  flat = flat_variables(nnx.state(model))
  conflicts = _group_conflicts(model, mesh, rules, fsdp_axis)
  layers = quantizable_layers(model) if conflicts else {}
  out = {}
  for k, axes in logical_axes(model).items():
    layer = _layer_of(k, conflicts)
    note = []
    if layer is not None:
      k_ax = _kernel_axes(layer, layers[layer])[0]
      axes = tuple(None if a == k_ax else a for a in axes)
      note = [conflicts[layer]]
    spec, notes = _to_spec(axes, flat[k].get_value().shape, mesh, rules)
    out[k] = (axes, spec, note + notes)
  return out


def partition_specs(model: nnx.Module, mesh: Mesh, rules: Mapping[str, str], *,
                    fsdp_axis: str | None = "data") -> dict[str, PartitionSpec]:
  """``{variable path: PartitionSpec}`` under ``rules`` (logical axis -> mesh axis) on ``mesh``.

  A mesh axis splits a dimension only if it divides it, and never cuts a
  quantization group along K on an axis the computation stays split over.
  """
  return {k: spec for k, (_, spec, _) in _specs_and_notes(model, mesh, rules, fsdp_axis).items()}


def explain(model: nnx.Module, mesh: Mesh, rules: Mapping[str, str], *,
            fsdp_axis: str | None = "data") -> list[dict[str, Any]]:
  """One row per array: path, shape, logical axes, PartitionSpec, bytes per device, notes."""
  flat = flat_variables(nnx.state(model))
  rows = []
  for k, (axes, spec, notes) in _specs_and_notes(model, mesh, rules, fsdp_axis).items():
    v = flat[k].get_value()
    split = int(np.prod([mesh.shape[m] for m in spec if m is not None]))
    rows.append(dict(path=k, shape=tuple(v.shape), dtype=str(v.dtype), logical=axes, spec=spec,
                     bytes_per_device=v.size * v.dtype.itemsize // split, notes="; ".join(notes)))
  return rows


def shard(model: nnx.Module, mesh: Mesh, rules: Mapping[str, str], *,
          fsdp_axis: str | None = "data", tp_axis: str = "model",
          per_shard_kernels: bool | None = None) -> nnx.Module:
  """Place every array of ``model`` on ``mesh`` per ``rules`` (in place); returns ``model``.

  FSDP: a lowbit layer whose stored kernel is split over ``fsdp_axis`` gets a
  ``compute_sharding`` without it, so a fake-quant step gathers the weight over
  that axis only (and its gradient is reduce-scattered back), keeping the
  tensor-parallel split; quantization groups along K stay whole on a device.

  ``per_shard_kernels`` (default: on GPU and TPU): converted layers split over
  ``tp_axis`` run their matmul per device on the local block
  (:func:`tp_qmatmul`), as a Pallas kernel must; otherwise XLA partitions the
  converted matmul itself (the CPU path).
  """
  if per_shard_kernels is None:
    per_shard_kernels = jax.default_backend() in ("gpu", "tpu")
  specs = partition_specs(model, mesh, rules, fsdp_axis=fsdp_axis)
  state = nnx.state(model)
  for k, var in flat_variables(state).items():
    var.set_value(jax.device_put(var.get_value(), NamedSharding(mesh, specs[k])))
  nnx.update(model, state)
  for path, layer in quantizable_layers(model).items():
    if not hasattr(layer, "compute_sharding"):
      continue
    spec = specs.get(f"{path}/kernel", PartitionSpec())
    if fsdp_axis is not None and fsdp_axis in tuple(spec):
      layer.compute_sharding = NamedSharding(
          mesh, PartitionSpec(*(None if a == fsdp_axis else a for a in spec)))
    else:
      layer.compute_sharding = None
    if hasattr(layer, "tp"):
      layer.tp = None
      qspec = tuple(specs.get(f"{path}/qvalue", ()))
      if per_shard_kernels and getattr(layer, "mode", None) == "converted" and tp_axis in qspec:
        n_dim = 0 if getattr(layer, "weight_layout", "kn") == "nk" else 1  # where N is stored
        kind = "column" if qspec.index(tp_axis) == n_dim else "row"
        layer.tp = (mesh, tp_axis, kind, fsdp_axis)
  return model


def shard_like(obj: Any, model: nnx.Module, mesh: Mesh, rules: Mapping[str, str]) -> Any:
  """Shard an object whose arrays mirror the model's (an ``nnx.Optimizer``: Adam moments).

  An array whose path ends with a model variable's path and has its shape
  takes that variable's sharding; everything else (step counters) is replicated.
  """
  specs = partition_specs(model, mesh, rules)
  shapes = {k: v.get_value().shape for k, v in flat_variables(nnx.state(model)).items()}
  state = nnx.state(obj)
  for k, var in flat_variables(state).items():
    v = var.get_value()
    if not isinstance(v, jax.Array):
      continue
    match = next((m for m in _suffixes(k) if m in specs and shapes[m] == v.shape), None)
    spec = specs[match] if match else PartitionSpec()
    var.set_value(jax.device_put(v, NamedSharding(mesh, spec)))
  nnx.update(obj, state)
  return obj


def _suffixes(path: str):
  parts = path.split("/")
  return ("/".join(parts[i:]) for i in range(len(parts)))


# --------------------------------------------------------------------------- per-shard kernels


def tp_qmatmul(x: jax.Array, w: QArray, mesh: Mesh, kind: str, *, axis: str = "model",
               batch_axis: str | None = "data", act_spec: QuantSpec | None = None,
               act_params: QuantParams | None = None, implementation: str | None = None,
               out_dtype: jax.typing.DTypeLike | None = None) -> jax.Array:
  """``qmatmul`` with each device running the kernel on its own block of ``w`` (``shard_map``).

  ``kind="column"``: ``w [K, N]`` split along N over ``axis``; every device
  has all of ``x`` and computes its ``N / m`` outputs (no communication).
  ``kind="row"``: ``w`` split along K. Packed int4 is half-split along K, so
  device ``d``'s packed rows hold logical rows ``A_d = [d K/2m, (d+1) K/2m)``
  and ``K/2 + A_d``; it takes exactly those columns of ``x`` (``x`` is
  gathered over ``axis`` first) and the matching group scales, then the
  partial products are summed with ``psum``. Dynamic activation scales are
  computed on the whole ``x`` (so every device quantizes alike). The numbers
  equal the unsharded ``qmatmul`` up to float summation order.

  Shapes: ``x [..., K]``, result ``[..., N]``; the leading dims are split over
  ``batch_axis`` when it divides them.
  """
  from jax.sharding import PartitionSpec as P

  from lowbit import kernels
  from lowbit.quant import QArray, calibrate

  if kind not in ("column", "row"):
    raise ValueError(f"tp_qmatmul: kind={kind!r}; use 'column' or 'row'.")
  m = mesh.shape[axis]
  lead, k = x.shape[:-1], x.shape[-1]
  n = w.shape[1]
  x2 = x.reshape(-1, k)
  b_ax = batch_axis if batch_axis in mesh.shape and x2.shape[0] % mesh.shape[batch_axis] == 0 else None
  if act_spec is not None and act_params is None:
    act_params = calibrate(x2, act_spec)  # on the whole x: per-token scales [M, 1] or one scale
  a_spec = (None if act_params is None else
            P(b_ax if act_params.scale.shape[0] == x2.shape[0] and b_ax else None))
  meta = dict(bits=w.bits, channel_axes=w.channel_axes, group_axis=w.group_axis,
              group_size=w.group_size, pack_axis=w.pack_axis, zero_point_form=w.zero_point_form)
  zero, channel = w.zero_point, w.channel_scale  # channel: [1, N] with integer group scales
  dt = out_dtype or x.dtype

  def act(p):
    return None if p is None else type(act_params)(p, None)

  if kind == "column":
    if n % m:
      raise ValueError(f"tp_qmatmul: N={n} is not a multiple of {axis}={m}.")

    def f(xl, qv, sc, zp, ap, ch):
      wl = QArray(qv, sc, zp, shape=(k, n // m), channel_scale=ch, **meta)
      return kernels.qmatmul(xl, wl, act_spec=act_spec, act_params=act(ap),
                             implementation=implementation, out_dtype=dt)

    w_spec = P(None, axis)
    in_specs = (P(b_ax, None), w_spec, P(None, axis), None if zero is None else P(None, axis), a_spec,
                None if channel is None else P(None, axis))
    out_spec = P(b_ax, axis)
  else:
    blocks = 2 * m if w.packed else m  # packed: two half-blocks of K per device
    if k % blocks or (w.group_size and (k // blocks) % w.group_size):
      raise ValueError(f"tp_qmatmul: K={k} split over {axis}={m} must leave whole groups of "
                       f"{w.group_size} in each of the {blocks} blocks of K "
                       f"({'half-blocks of the packed layout' if w.packed else 'one per device'}).")
    ngroups = w.scale.shape[0]

    def take(a, d, axis_=1):  # the two half-blocks of device d, in local half-split order
      if a.shape[axis_] == 1:
        return a
      size = a.shape[axis_]
      hb = size // (2 * m)
      lo = jax.lax.dynamic_slice_in_dim(a, d * hb, hb, axis_)
      hi = jax.lax.dynamic_slice_in_dim(a, size // 2 + d * hb, hb, axis_)
      return jnp.concatenate([lo, hi], axis_)

    def f(xl, qv, sc, zp, ap, ch):
      d = jax.lax.axis_index(axis)
      xs = take(xl, d) if w.packed else jax.lax.dynamic_slice_in_dim(xl, d * (k // m), k // m, 1)
      if w.packed:
        scl = take(sc, d, 0) if ngroups > 1 else sc
        zpl = None if zp is None else (take(zp, d, 0) if ngroups > 1 else zp)
      else:
        gl = ngroups // m if ngroups > 1 else 1
        scl = jax.lax.dynamic_slice_in_dim(sc, d * gl, gl, 0) if ngroups > 1 else sc
        zpl = None if zp is None else (jax.lax.dynamic_slice_in_dim(zp, d * gl, gl, 0)
                                       if ngroups > 1 else zp)
      wl = QArray(qv, scl, zpl, shape=(k // m, n), channel_scale=ch, **meta)
      y = kernels.qmatmul(xs, wl, act_spec=act_spec, act_params=act(ap),
                          implementation=implementation, out_dtype=jnp.float32)
      return jax.lax.psum(y, axis).astype(dt)

    in_specs = (P(b_ax, None), P(axis, None), P(), None if zero is None else P(), a_spec,
                None if channel is None else P())
    out_spec = P(b_ax, None)
  fn = jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_spec, check_vma=False)
  y = fn(x2, w.qvalue, w.scale, zero, None if act_params is None else act_params.scale, channel)
  return y.reshape(*lead, n)


def make_mesh(shape: tuple[int, ...] = (-1, 1), names: tuple[str, ...] = ("data", "model"),
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A device mesh whose axes are *automatic* (GSPMD propagation), as lowbit's sharding expects.

  ``jax.make_mesh`` defaults to explicit-sharding axes on newer jax, where a
  gather from a sharded embedding needs an explicit output sharding; lowbit
  leaves that to XLA. ``-1`` in ``shape`` takes the remaining devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = tuple(shape)
  if shape.count(-1) > 1:
    raise ValueError(f"make_mesh: at most one -1 in shape {shape}.")
  if -1 in shape:
    rest = int(np.prod([d for d in shape if d != -1]))
    shape = tuple(len(devices) // rest if d == -1 else d for d in shape)
  n = int(np.prod(shape))
  if n > len(devices):
    raise ValueError(f"make_mesh: shape {shape} needs {n} devices, {len(devices)} available.")
  auto = (jax.sharding.AxisType.Auto,) * len(shape)
  return jax.make_mesh(shape, names, axis_types=auto, devices=devices[:n])


def batch_sharding(mesh: Mesh, axis: str = "data") -> NamedSharding:
  """Inputs ``[B, ...]`` split over ``axis`` (the data-parallel axis)."""
  return NamedSharding(mesh, PartitionSpec(axis))


def bytes_per_device(tree: Any) -> dict[str, int]:
  """``{device: bytes}`` that the arrays of ``tree`` (a model, state, or pytree) hold on each device."""
  if isinstance(tree, nnx.Module):
    tree = nnx.state(tree)
  out: dict[str, int] = {}
  for leaf in jax.tree_util.tree_leaves(tree):
    if isinstance(leaf, nnx.Variable):
      leaf = leaf.get_value()
    if not isinstance(leaf, jax.Array):
      continue
    for s in leaf.addressable_shards:
      out[str(s.device)] = out.get(str(s.device), 0) + s.data.nbytes
  return out


__all__ = ["KERNEL_AXES", "OTHER_AXES", "RULES", "batch_sharding", "bytes_per_device", "explain",
           "logical_axes", "make_mesh", "partition_specs", "shard", "shard_like", "tp_qmatmul"]
