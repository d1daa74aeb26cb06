"""Experiment plumbing: typed Python configs with overrides, run directories, JSON logs.

A config file is Python with ``get_config()`` returning a frozen dataclass;
``--set key=value`` overrides a field, parsed by the field's type; unknown keys
are errors. Every run gets its own new directory (never overwritten) holding
``config.json``, ``metrics.jsonl`` (one JSON object per line), and
``results.json`` written last and atomically, so a run without
``results.json`` is visibly incomplete.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import json
import os
import pathlib
import platform
import types
import typing
from typing import Any


def load_config(path: str | pathlib.Path, overrides: list[str] | None = None) -> Any:
  """``get_config()`` of a Python config file, with ``key=value`` overrides applied."""
  path = pathlib.Path(path)
  if not path.exists():
    raise ValueError(f"config file {path} does not exist.")
  spec = importlib.util.spec_from_file_location(f"_lowbit_config_{path.stem}", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  if not hasattr(mod, "get_config"):
    raise ValueError(f"{path}: a config file must define get_config().")
  return apply_overrides(mod.get_config(), overrides or [])


def _parse(value: str, typ) -> Any:
  origin = typing.get_origin(typ)
  args = typing.get_args(typ)
  if origin in (typing.Union, types.UnionType):
    if value.lower() in ("none", "null") and type(None) in args:
      return None
    typ = next(a for a in args if a is not type(None))
    origin, args = typing.get_origin(typ), typing.get_args(typ)
  if typ is bool:
    if value.lower() in ("1", "true", "yes"):
      return True
    if value.lower() in ("0", "false", "no"):
      return False
    raise ValueError(f"not a boolean: {value!r}")
  if origin is tuple:
    inner = args[0] if args else str
    return tuple(_parse(v, inner) for v in value.split(",") if v)
  return typ(value)


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
  """``cfg`` (a dataclass) with ``key=value`` items applied, each value parsed as the
  field's annotated type; an unknown key or a value that does not parse raises."""
  hints = typing.get_type_hints(type(cfg))
  changes = {}
  for item in overrides:
    if "=" not in item:
      raise ValueError(f"override {item!r}: write key=value.")
    key, value = item.split("=", 1)
    if key not in hints:
      raise ValueError(f"unknown config key {key!r}; known keys: {sorted(hints)}.")
    try:
      changes[key] = _parse(value, hints[key])
    except (ValueError, StopIteration) as e:
      raise ValueError(f"config key {key!r}: cannot parse {value!r} as {hints[key]}: {e}") from None
  return dataclasses.replace(cfg, **changes)


def new_run_dir(root: str | pathlib.Path, name: str, workdir: str | None = None) -> pathlib.Path:
  """A new directory ``root/name-YYYYmmdd-HHMMSS[-k]``, or exactly ``workdir`` if given
  (which must not exist: runs never overwrite each other)."""
  if workdir:
    d = pathlib.Path(workdir)
    if d.exists():
      raise ValueError(f"work dir {d} already exists; runs never overwrite each other. "
                       "Choose a new --workdir or omit it.")
    d.mkdir(parents=True)
    return d
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  root = pathlib.Path(root)
  for k in range(1000):
    d = root / (f"{name}-{stamp}" + (f"-{k}" if k else ""))
    try:
      d.mkdir(parents=True)
      return d
    except FileExistsError:
      continue
  raise RuntimeError(f"could not create a run directory under {root}")


def environment() -> dict[str, Any]:
  """Versions and machine of this run: lowbit, jax, Python, device kind, platform, host, CPUs."""
  import jax

  import lowbit
  return {"lowbit": lowbit.__version__, "jax": jax.__version__, "python": platform.python_version(),
          "device": jax.devices()[0].device_kind, "platform": jax.default_backend(),
          "host": platform.node(), "cpus": os.cpu_count()}


def write_json(path: pathlib.Path, obj: Any) -> None:
  """Write JSON atomically (temporary file, then rename)."""
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, default=_default))
  tmp.replace(path)


def _default(o):
  if dataclasses.is_dataclass(o):
    return dataclasses.asdict(o)
  if hasattr(o, "tolist"):
    return o.tolist()
  if hasattr(o, "name"):
    return o.name
  return str(o)


class MetricsLog:
  """Appends one JSON object per line to ``metrics.jsonl``."""

  def __init__(self, path: pathlib.Path):
    self.f = open(path, "a", encoding="utf-8")  # noqa: SIM115

  def write(self, **row: Any) -> None:
    """Append ``row`` as one JSON line and flush."""
    self.f.write(json.dumps(row, sort_keys=True, default=_default) + "\n")
    self.f.flush()

  def close(self) -> None:
    """Close the file."""
    self.f.close()
