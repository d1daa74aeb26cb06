"""Orbax checkpoints of converted (packed) models: small on disk, exact, loud on mismatch.

A checkpoint directory holds two Orbax items:

* ``state``: every array of the model's ``nnx.state``: int4 codes as packed
  uint8, int8 codes as int8, scales in their dtype, the float parameters that
  stay float (norms, embeddings, biases). No float copy of a quantized weight.
* ``meta`` (JSON): ``format_version``, lowbit and jax versions, the policy
  (JSON), and for every tensor its path, shape, dtype and Variable type, plus
  each converted layer's quantization metadata.

Beside them, ``lowbit_files.json`` lists every file the save wrote with its size
and sha256, written (atomically) once Orbax has finished.

:func:`restore` reads ``meta`` first and checks every tensor against the
abstract model (``nnx.eval_shape``), then every file against the list, before
any array is read: a missing, truncated or altered file is named in a
``ValueError`` instead of being read as whatever it now holds. Orbax writes to
a temporary directory and renames it when complete, so an interrupted save
leaves the previous checkpoint intact.

>>> import tempfile, pathlib, jax, jax.numpy as jnp
>>> from flax import nnx
>>> import lowbit
>>> from lowbit.nn import Transformer, TransformerConfig
>>> cfg = TransformerConfig.llama(vocab_size=64, d_model=128, n_layers=1, n_heads=4, d_ff=256)
>>> make = lambda: lowbit.convert(Transformer(cfg, rngs=nnx.Rngs(0)), lowbit.policy.w4a16())
>>> model = make()
>>> path = pathlib.Path(tempfile.mkdtemp()) / "ckpt"
>>> _ = save(path, model, policy=lowbit.policy.w4a16())
>>> restored = restore(path, nnx.eval_shape(make))
>>> tok = jnp.arange(8)[None]
>>> bool(jnp.all(restored(tok) == model(tok)))
True
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

import lowbit
from lowbit.nn.layers import QValue
from lowbit.nn.surgery import flat_variables, quantizable_layers
from lowbit.sharding import partition_specs

if TYPE_CHECKING:
  from lowbit.policy import PrecisionPolicy

FORMAT_VERSION = 1
#: The list of the save's files (relative path -> bytes and sha256), at the checkpoint's root.
FILES = "lowbit_files.json"


def _sha256(f: pathlib.Path) -> str:
  h = hashlib.sha256()
  with f.open("rb") as fh:
    for chunk in iter(lambda: fh.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _files(root: pathlib.Path) -> dict[str, dict[str, Any]]:
  """Every file under ``root`` but the list itself: ``{relative path: {"bytes", "sha256"}}``."""
  return {f.relative_to(root).as_posix(): {"bytes": f.stat().st_size, "sha256": _sha256(f)}
          for f in sorted(root.rglob("*")) if f.is_file() and f != root / FILES}


def _write_files(root: pathlib.Path) -> None:
  """Write ``FILES`` for a finished save (to a temporary name, then renamed)."""
  tmp = root / (FILES + ".tmp")
  tmp.write_text(json.dumps(_files(root), indent=1, sort_keys=True))
  os.replace(tmp, root / FILES)


def verify_files(path: str | pathlib.Path) -> None:
  """Check every file of the checkpoint at ``path`` against the list its save wrote
  (``lowbit_files.json``): present, the same size, the same sha256.

  Raises ``ValueError`` naming the first file that is missing, has another size
  (truncated or appended to) or other bytes, or when the list itself is missing
  (an unfinished save). :func:`restore` calls it unless ``verify=False``.
  """
  path = pathlib.Path(path).absolute()
  listed = path / FILES
  if not listed.exists():
    raise ValueError(f"restore: {path} has no {FILES} (the list of the files its save wrote): "
                     "the save did not finish, or the file was removed.")
  for rel, w in sorted(json.loads(listed.read_text()).items()):
    f = path / rel
    if not f.is_file():
      raise ValueError(f"restore: {f} is missing (the save wrote {w['bytes']} bytes).")
    if f.stat().st_size != w["bytes"]:
      raise ValueError(f"restore: {f} has {f.stat().st_size} bytes, the save wrote "
                       f"{w['bytes']} (truncated or overwritten).")
    if _sha256(f) != w["sha256"]:
      raise ValueError(f"restore: {f} does not hold the bytes the save wrote "
                       "(its sha256 differs): the file changed after the save.")


def _tensor_meta(state: nnx.State) -> dict[str, dict[str, Any]]:
  return {k: {"shape": list(v.get_value().shape), "dtype": jnp.dtype(v.get_value().dtype).name,
              "type": type(v).__name__} for k, v in flat_variables(state).items()}


def _layers_meta(model: nnx.Module) -> dict[str, Any]:
  out = {}
  for path, layer in quantizable_layers(model).items():
    qmeta = getattr(layer, "qmeta", None)
    if qmeta is not None:
      bits, shape, channel_axes, group_axis, group_size, pack_axis, zp_form = qmeta
      out[path] = dict(bits=bits, shape=list(shape), channel_axes=list(channel_axes),
                       group_axis=group_axis, group_size=group_size, pack_axis=pack_axis,
                       zero_point_form=zp_form, mode=layer.mode,
                       weight_layout=getattr(layer, "weight_layout", "kn"))
  return out


def _checkpointer(compression: bool = True) -> ocp.Checkpointer:
  """A checkpointer for one save or restore; use it in ``with`` (closing it stops its
  background threads)."""
  return ocp.Checkpointer(ocp.CompositeCheckpointHandler(
      state=ocp.PyTreeCheckpointHandler(use_compression=compression),
      meta=ocp.JsonCheckpointHandler()))


def save(path: str | pathlib.Path, model: nnx.Module, *, policy: PrecisionPolicy | None = None,
         compression: bool = True, overwrite: bool = False) -> pathlib.Path:
  """Save ``model``'s state and metadata to ``path`` (a directory it creates).

  ``compression`` toggles zstd in the array store (report both: lowbit's size
  claims hold without it). Refuses to overwrite an existing checkpoint unless
  ``overwrite=True``. Returns the absolute path.
  """
  path = pathlib.Path(path).absolute()
  if path.exists() and not overwrite:
    raise ValueError(f"save: {path} exists; pass overwrite=True or choose a new path.")
  for p, layer in quantizable_layers(model).items():
    if getattr(layer, "mode", None) == "fake_quant":
      raise ValueError(
          f"save: {p} is in fake-quant (QAT) mode; convert the model first "
          "(lowbit.convert), or checkpoint training with save_train_state.")
  # Converted layers keep only codes, scales and a static activation scale (if calibrated).
  state = nnx.state(model)
  flat = flat_variables(state)
  meta = {"format_version": FORMAT_VERSION, "lowbit_version": lowbit.__version__,
          "jax_version": jax.__version__, "policy": None if policy is None else policy.to_dict(),
          "tensors": _tensor_meta(state), "layers": _layers_meta(model)}
  arrays = {k: np.asarray(v.get_value()) for k, v in flat.items()}
  meta["files"] = FILES  # restore then insists on the list (older saves have none)
  with _checkpointer(compression) as c:
    c.save(path, args=ocp.args.Composite(state=ocp.args.PyTreeSave(arrays),
                                         meta=ocp.args.JsonSave(meta)), force=overwrite)
  if jax.process_index() == 0:
    _write_files(path)
  return path


def read_meta(path: str | pathlib.Path) -> dict[str, Any]:
  """The checkpoint's metadata (reads no array)."""
  path = pathlib.Path(path).absolute()
  if not (path / "meta").exists():
    raise ValueError(
        f"restore: {path} is not a complete lowbit checkpoint (no 'meta' item); the "
        "save may have been interrupted, or the path is wrong.")
  try:
    with _checkpointer() as c:
      return c.restore(path, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  except Exception as e:  # noqa: BLE001 - re-raised with the path
    raise ValueError(f"restore: cannot read the metadata of {path}: {e}") from e


def restore(path: str | pathlib.Path, abstract_model: nnx.Module, *,
            policy: PrecisionPolicy | None = None,
            mesh: jax.sharding.Mesh | None = None, rules: dict[str, str] | None = None,
            verify: bool = True) -> nnx.Module:
  """Restore into ``abstract_model`` (from ``nnx.eval_shape``); checks before reading.

  With ``mesh`` and ``rules`` (see :mod:`lowbit.sharding`) every array is read
  straight into its shards on that mesh, whatever mesh saved it: the stored
  format (packed int4, scales) does not depend on the mesh.

  Raises ``ValueError`` naming the checkpoint path and the tensor when the
  format version differs, the policy differs (if ``policy`` is given), a
  tensor is missing, extra, or has another shape or dtype, or (``verify``,
  :func:`verify_files`) a file is missing, truncated or altered since the save.
  ``verify=False`` skips hashing the files (Orbax then fails on what it cannot read).
  """
  path = pathlib.Path(path).absolute()
  meta = read_meta(path)
  if meta.get("format_version") != FORMAT_VERSION:
    raise ValueError(
        f"restore: {path} has format_version={meta.get('format_version')!r}; this lowbit "
        f"({lowbit.__version__}) reads format {FORMAT_VERSION}.")
  if policy is not None and meta.get("policy") != policy.to_dict():
    raise ValueError(
        f"restore: {path} was saved with another precision policy than the one given; "
        "rebuild the abstract model with the checkpoint's policy "
        "(lowbit.PrecisionPolicy.from_dict(read_meta(path)['policy'])).")
  saved_layers = meta.get("layers", {})
  for lpath, lm in _layers_meta(abstract_model).items():
    saved = saved_layers.get(lpath, {}).get("weight_layout", "kn")  # format 1 before "nk"
    if lpath in saved_layers and saved != lm["weight_layout"]:
      raise ValueError(
          f"restore: layer {lpath!r} in {path} stores its weight {saved!r}, the model expects "
          f"{lm['weight_layout']!r}; convert the abstract model with "
          f"weight_layout={saved!r}.")
  graphdef, state = nnx.split(abstract_model)
  want = _tensor_meta(state)
  have = meta["tensors"]
  for k in sorted(set(want) | set(have)):
    if k not in have:
      raise ValueError(f"restore: {path} has no tensor {k!r} that the model needs "
                       f"({want[k]['type']} {want[k]['shape']} {want[k]['dtype']}).")
    if k not in want:
      raise ValueError(f"restore: {path} holds tensor {k!r} ({have[k]['type']}) that the "
                       "model does not have: the model's policy or architecture differs.")
    if have[k]["shape"] != want[k]["shape"] or have[k]["dtype"] != want[k]["dtype"]:
      raise ValueError(
          f"restore: tensor {k!r} in {path} is {have[k]['dtype']}{have[k]['shape']}, the model "
          f"expects {want[k]['dtype']}{want[k]['shape']}: the policy or shapes differ.")
  if (mesh is None) != (rules is None):
    raise ValueError("restore: pass both mesh and rules (lowbit.sharding.RULES[...]), or neither.")
  if verify and "files" in meta:
    verify_files(path)
  specs = {}
  if mesh is not None:
    specs = partition_specs(abstract_model, mesh, rules)
  target = {k: jax.ShapeDtypeStruct(
      tuple(v["shape"]), jnp.dtype(v["dtype"]),
      sharding=jax.sharding.NamedSharding(mesh, specs[k]) if mesh is not None else None)
      for k, v in want.items()}
  try:
    with _checkpointer() as c:
      arrays = c.restore(path, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))))["state"]
  except Exception as e:  # noqa: BLE001 - orbax/tensorstore errors, re-raised with the path
    raise ValueError(f"restore: reading the arrays of {path} failed (missing or truncated "
                     f"file?): {type(e).__name__}: {str(e)[:300]}") from e
  flat = flat_variables(state)
  for k, var in flat.items():
    a = arrays[k]
    if tuple(a.shape) != tuple(want[k]["shape"]) or jnp.dtype(a.dtype) != jnp.dtype(want[k]["dtype"]):
      raise ValueError(f"restore: tensor {k!r} read from {path} has shape {a.shape} {a.dtype}.")
    var.set_value(jnp.asarray(a))
  return nnx.merge(graphdef, state)


def _train_tree(model: nnx.Module, optimizers) -> dict[str, Any]:
  tree = {"model": nnx.to_pure_dict(nnx.state(model))}
  for i, opt in enumerate(optimizers):
    if opt is not None:
      tree[f"optimizer_{i}"] = nnx.to_pure_dict(nnx.state(opt))
  return _str_keys(tree)


def _str_keys(tree):
  if isinstance(tree, dict):
    return {str(k): _str_keys(v) for k, v in tree.items()}
  return tree


def _apply_pure(obj: nnx.Module, pure: dict) -> None:
  state = nnx.state(obj)
  flat = flat_variables(state)
  for k, var in flat.items():
    node = pure
    for part in k.split("/"):
      node = node[part]
    var.set_value(jnp.asarray(node))


def save_train_state(root: str | pathlib.Path, step: int, model: nnx.Module, *optimizers,
                     extra: dict[str, Any] | None = None, max_to_keep: int = 3) -> None:
  """Checkpoint a QAT run at ``step``: model (params and quantizer parameters),
  optimizer states and steps, and ``extra`` arrays (e.g. a PRNG key's data), with an
  ``orbax.checkpoint.CheckpointManager`` under ``root`` (atomic per step)."""
  tree = _train_tree(model, optimizers)
  if extra:
    tree["extra"] = _str_keys(extra)
  root = pathlib.Path(root).absolute()
  with ocp.CheckpointManager(root,
                             options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep)) as m:
    m.save(step, args=ocp.args.StandardSave(tree))
    m.wait_until_finished()
  if jax.process_index() == 0:  # the step's files, as save() lists a model's
    _write_files(_step_dir(root, step))


def _step_dir(root: pathlib.Path, step: int) -> pathlib.Path:
  """Where ``orbax.checkpoint.CheckpointManager`` (its default step names) keeps ``step``."""
  return root / ocp.step.standard_name_format().build_name(step)


def restore_train_state(root: str | pathlib.Path, model: nnx.Module, *optimizers,
                        extra: dict[str, Any] | None = None, step: int | None = None):
  """Restore the latest (or ``step``) train state into ``model`` and ``optimizers`` in place.

  ``model`` and the optimizers must be built as for the saved run (the same
  policy and ``learn``); returns ``(step, extra)``. The step's files are checked
  against the sizes and sha256 its save listed (:func:`verify_files`) before any
  array is read; a step saved before the lists is read unchecked.
  """
  root = pathlib.Path(root).absolute()
  with ocp.CheckpointManager(root) as m:
    step = m.latest_step() if step is None else step
    if step is None:
      raise ValueError(f"restore_train_state: no complete checkpoint under {root}.")
    if (_step_dir(root, step) / FILES).exists():  # saves before the lists have none
      verify_files(_step_dir(root, step))
    template = _train_tree(model, optimizers)
    if extra:
      template["extra"] = _str_keys(extra)
    try:
      tree = m.restore(step, args=ocp.args.StandardRestore(template))
    except Exception as e:  # noqa: BLE001
      raise ValueError(f"restore_train_state: {root} step {step} does not match this model "
                       f"and optimizers: {type(e).__name__}: {str(e)[:300]}") from e
  _apply_pure(model, tree["model"])
  for i, opt in enumerate(optimizers):
    if opt is not None:
      _apply_pure(opt, tree[f"optimizer_{i}"])
  return step, tree.get("extra")


def latest(root: str | pathlib.Path) -> pathlib.Path | None:
  """The newest complete checkpoint directly under ``root`` (by name), or None.

  Orbax writes into a temporary directory and renames it when the save is
  complete: an interrupted save leaves only a temporary directory, skipped here,
  or (killed between Orbax's rename and the file list) no ``lowbit_files.json``,
  also skipped (a save from before the lists has none and is taken).
  """
  root = pathlib.Path(root)

  def complete(p: pathlib.Path) -> bool:
    if not (p.is_dir() and ".orbax-checkpoint-tmp" not in p.name and (p / "meta").exists()
            and (p / "state").exists()):
      return False
    if (p / FILES).exists():
      return True
    try:
      return "files" not in read_meta(p)
    except ValueError:
      return False

  done = [p for p in root.iterdir() if complete(p)] if root.exists() else []
  return max(done, key=lambda p: p.name) if done else None


def checkpoint_bytes(path: str | pathlib.Path) -> int:
  """Bytes of every file under ``path``."""
  return sum(f.stat().st_size for f in pathlib.Path(path).rglob("*") if f.is_file())


def quantized_bytes_per_weight(model: nnx.Module) -> float:
  """In-memory bytes of quantized layers' codes + scales per weight (the on-disk floor)."""
  n = b = 0
  for layer in quantizable_layers(model).values():
    if getattr(layer, "mode", None) == "converted" and hasattr(layer, "qvalue"):
      n += int(np.prod(layer.qmeta[1]))
      b += sum(v[...].nbytes for v in jax.tree.leaves(
          nnx.state(layer, QValue), is_leaf=lambda v: isinstance(v, nnx.Variable)))
      b += layer.qscale[...].nbytes + (layer.qzero[...].nbytes if hasattr(layer, "qzero") else 0)
  return b / n
