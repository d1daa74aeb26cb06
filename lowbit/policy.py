"""Precision policies: ordered regex rules on module paths, first match wins.

A module path is the '/'-joined path of a layer in the model
(``layers/3/attn/q_proj``). Rules are matched with ``re.fullmatch`` in order;
the first that matches decides the layer's precision; no match means full
precision. This module is the only place a rule is looked up.

>>> import lowbit
>>> policy = lowbit.policy.mixed()
>>> [(i, r.describe()) for i, r in enumerate(policy.rules)]  # doctest: +NORMALIZE_WHITESPACE
[(0, 'float'), (1, 'w8 per-channel / a8 per-token'), (2, 'w4 g128 / a-float')]
>>> policy.lookup("layers/0/attn/q_proj")[0], policy.lookup("layers/0/mlp/up_proj")[0]
(1, 2)
>>> policy.lookup("embed")
(0, PrecisionRule(module_path='embed|lm_head', weight=None, act=None, keep_float=True))
>>> lowbit.PrecisionPolicy.from_json(policy.to_json()) == policy
True
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from typing import Any, Iterable

import jax.numpy as jnp

from lowbit.quant import QuantSpec

FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class PrecisionRule:
  """One rule: layers whose path fully matches ``module_path`` get these specs.

  Attributes:
    module_path: a regex, matched with ``re.fullmatch`` against the
      '/'-joined module path.
    weight: the weight's :class:`QuantSpec`, written for the layer's kernel
      (``[K, N]`` for a linear layer: ``channel_axes=(1,)`` is per output
      channel, ``group_axis=0`` groups along K). ``None``: float weight.
    act: the input activation's spec, written for the input flattened to
      ``[M, K]`` (``channel_axes=(0,)`` is per token). ``None``: float input.
    keep_float: the layer stays in full precision (a rule that stops later
      rules from matching it); ``weight`` and ``act`` must then be ``None``.
  """

  module_path: str
  weight: QuantSpec | None = None
  act: QuantSpec | None = None
  keep_float: bool = False

  def __post_init__(self):
    try:
      re.compile(self.module_path)
    except re.error as e:
      raise ValueError(
          f"PrecisionRule: module_path={self.module_path!r} is not a valid regex ({e}); "
          "escape special characters, e.g. 'layers/\\d+/attn/.*'.") from None
    if self.keep_float and (self.weight is not None or self.act is not None):
      raise ValueError(
          f"PrecisionRule({self.module_path!r}): keep_float=True with a weight or act "
          "spec; a float rule takes no specs.")
    if not self.keep_float and self.weight is None and self.act is None:
      raise ValueError(
          f"PrecisionRule({self.module_path!r}) quantizes nothing: give weight and/or "
          "act specs, or keep_float=True.")

  def matches(self, path: str) -> bool:
    """Whether the rule's regex matches the whole module path (``re.fullmatch``)."""
    return re.fullmatch(self.module_path, path) is not None

  def describe(self) -> str:
    """Short name of the rule's precisions, ``"w4 g128 / a8 per-token"`` or ``"float"``."""
    if self.keep_float:
      return "float"
    return f"{describe_spec(self.weight, 'w')} / {describe_spec(self.act, 'a')}"


def describe_spec(spec: QuantSpec | None, prefix: str) -> str:
  """Short human name of a spec: ``w4 g128 asym``, ``a8 per-token``, ``w-float``."""
  if spec is None:
    return f"{prefix}-float"
  if spec.group_size is not None:
    gran = f"g{spec.group_size}"
  elif spec.channel_axes:
    gran = "per-token" if prefix == "a" else "per-channel"
  else:
    gran = "per-tensor"
  extra = "" if spec.symmetric else (" asym-min" if spec.zero_point_form == "min" else " asym")
  if spec.group_scales == "int":
    extra += " int-scales"
  if spec.calibration != "absmax":
    extra += f" {spec.calibration}"
  return f"{prefix}{spec.bits} {gran}{extra}"


@dataclasses.dataclass(frozen=True)
class PrecisionPolicy:
  """Ordered rules; the first whose regex fully matches a module path wins.

  ``allow_unused``: by default a rule that matches no layer of the model is an
  error when the policy is applied (a typo in a regex should not silently leave
  layers in float); set it to accept such rules.
  """

  rules: tuple[PrecisionRule, ...] = ()
  allow_unused: bool = False

  def __post_init__(self):
    object.__setattr__(self, "rules", tuple(self.rules))
    for r in self.rules:
      if not isinstance(r, PrecisionRule):
        raise ValueError(f"PrecisionPolicy.rules must be PrecisionRule, got {type(r).__name__}.")

  def lookup(self, path: str) -> tuple[int | None, PrecisionRule | None]:
    """``(index, rule)`` of the first rule matching ``path``, or ``(None, None)``."""
    for i, r in enumerate(self.rules):
      if r.matches(path):
        return i, r
    return None, None

  def resolve(self, paths: Iterable[str]) -> dict[str, tuple[int | None, PrecisionRule | None]]:
    """Look up every path; raise on rules that match none (unless ``allow_unused``)."""
    out = {p: self.lookup(p) for p in paths}
    if not out:
      raise ValueError(
          "PrecisionPolicy: the model has no quantizable layer (nnx.Linear, nnx.Einsum, "
          "lowbit QLinear/QEinsum); nothing to apply the policy to.")
    used = {i for i, _ in out.values() if i is not None}
    unused = [i for i in range(len(self.rules)) if i not in used]
    if unused and not self.allow_unused:
      names = ", ".join(f"#{i} {self.rules[i].module_path!r}" for i in unused)
      raise ValueError(
          f"PrecisionPolicy: rule(s) {names} match no layer of this model "
          f"(layer paths: {sorted(out)[:6]}{' ...' if len(out) > 6 else ''}). Fix the "
          "regex, remove the rule, or pass allow_unused=True.")
    return out

  def explain(self, model, *, print_table: bool = True) -> list[dict[str, Any]]:
    """Table of every quantizable layer: path, rule, precisions, params, converted bytes.

    Returns the rows (dicts) and prints them as a table unless told not to.
    """
    from lowbit.nn.surgery import explain_rows
    rows = explain_rows(model, self)
    if print_table:
      print(format_table(rows))
    return rows

  # -- serialization ---------------------------------------------------------

  def to_dict(self) -> dict[str, Any]:
    """The policy as plain JSON types, with ``format_version``; :meth:`from_dict` inverts it."""
    return {"format_version": FORMAT_VERSION, "allow_unused": self.allow_unused,
            "rules": [_rule_to_dict(r) for r in self.rules]}

  def to_json(self, **kw) -> str:
    """:meth:`to_dict` as JSON text (``kw`` go to ``json.dumps``, e.g. ``indent=2``)."""
    return json.dumps(self.to_dict(), **kw)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "PrecisionPolicy":
    """The policy :meth:`to_dict` wrote; another format version or an unknown key raises."""
    v = d.get("format_version")
    if v != FORMAT_VERSION:
      raise ValueError(f"PrecisionPolicy: format_version={v!r}; this lowbit reads {FORMAT_VERSION}.")
    unknown = set(d) - {"format_version", "allow_unused", "rules"}
    if unknown:
      raise ValueError(f"PrecisionPolicy: unknown key(s) {sorted(unknown)}.")
    return cls(tuple(_rule_from_dict(r) for r in d["rules"]), bool(d.get("allow_unused", False)))

  @classmethod
  def from_json(cls, text: str) -> "PrecisionPolicy":
    """The policy :meth:`to_json` wrote (``from_json(p.to_json()) == p``)."""
    return cls.from_dict(json.loads(text))


def _spec_to_dict(spec: QuantSpec | None) -> dict[str, Any] | None:
  if spec is None:
    return None
  d = dataclasses.asdict(spec)
  d["scale_dtype"] = jnp.dtype(spec.scale_dtype).name
  d["channel_axes"] = list(spec.channel_axes)
  return d


def _spec_from_dict(d: dict[str, Any] | None) -> QuantSpec | None:
  if d is None:
    return None
  fields = {f.name for f in dataclasses.fields(QuantSpec)}
  unknown = set(d) - fields
  if unknown:
    raise ValueError(f"QuantSpec: unknown key(s) {sorted(unknown)}; known: {sorted(fields)}.")
  d = dict(d)
  if "channel_axes" in d:
    d["channel_axes"] = tuple(d["channel_axes"])
  if "scale_dtype" in d:
    d["scale_dtype"] = jnp.dtype(d["scale_dtype"])
  return QuantSpec(**d)


def _rule_to_dict(r: PrecisionRule) -> dict[str, Any]:
  return {"module_path": r.module_path, "weight": _spec_to_dict(r.weight),
          "act": _spec_to_dict(r.act), "keep_float": r.keep_float}


def _rule_from_dict(d: dict[str, Any]) -> PrecisionRule:
  unknown = set(d) - {"module_path", "weight", "act", "keep_float"}
  if unknown:
    raise ValueError(f"PrecisionRule: unknown key(s) {sorted(unknown)}.")
  return PrecisionRule(d["module_path"], _spec_from_dict(d.get("weight")),
                       _spec_from_dict(d.get("act")), bool(d.get("keep_float", False)))


def load(path: str | pathlib.Path) -> PrecisionPolicy:
  """Load a policy from ``.json``, ``.yaml``/``.yml`` (same schema), or a ``.py``
  config whose ``get_policy()`` returns a :class:`PrecisionPolicy`."""
  path = pathlib.Path(path)
  if not path.exists():
    raise ValueError(f"policy file {path} does not exist.")
  if path.suffix == ".json":
    return PrecisionPolicy.from_json(path.read_text())
  if path.suffix in (".yaml", ".yml"):
    import yaml
    return PrecisionPolicy.from_dict(yaml.safe_load(path.read_text()))
  if path.suffix == ".py":
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"_lowbit_policy_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not hasattr(mod, "get_policy"):
      raise ValueError(f"{path}: a Python policy config must define get_policy().")
    return mod.get_policy()
  raise ValueError(f"{path}: unknown policy file type {path.suffix!r}; use .json, .yaml or .py.")


def format_table(rows: list[dict[str, Any]]) -> str:
  """The rows of :meth:`PrecisionPolicy.explain` as an aligned text table with a total row."""
  head = ["module path", "rule", "weight", "act", "params", "bytes (converted)"]
  body = [[r["path"], "-" if r["rule"] is None else str(r["rule"]), r["weight"], r["act"],
           f"{r['params']:,}", f"{r['bytes']:,}"] for r in rows]
  tot = ["total", "", "", "", f"{sum(r['params'] for r in rows):,}",
         f"{sum(r['bytes'] for r in rows):,}"]
  widths = [max(len(x) for x in col) for col in zip(head, *body, tot, strict=True)]
  fmt = "  ".join(f"{{:{'<' if i < 4 else '>'}{w}}}" for i, w in enumerate(widths))
  lines = [fmt.format(*head), "  ".join("-" * w for w in widths)]
  lines += [fmt.format(*b) for b in body] + [fmt.format(*tot)]
  return "\n".join(lines)


# -- ready-made policies --------------------------------------------------------

def _w(bits, group=None, **kw) -> QuantSpec:
  return QuantSpec(bits=bits, channel_axes=(1,), group_size=group, pack=bits <= 4,
                   scale_dtype=jnp.bfloat16 if group else jnp.float32, **kw)


A8 = QuantSpec(bits=8, channel_axes=(0,))  # per-token dynamic int8 activations
_HEAD = "embed|lm_head"


def w8a8() -> PrecisionPolicy:
  """int8 per-channel weights, int8 per-token activations; embeddings and head float."""
  return PrecisionPolicy((PrecisionRule(_HEAD, keep_float=True),
                          PrecisionRule(".*", _w(8), A8)), allow_unused=True)


def w4a16(group_size: int | None = 128) -> PrecisionPolicy:
  """int4 weights (group ``group_size``, or per-channel if None), float activations."""
  return PrecisionPolicy((PrecisionRule(_HEAD, keep_float=True),
                          PrecisionRule(".*", _w(4, group_size))), allow_unused=True)


def w4a8(group_size: int | None = None, group_scales: str = "float") -> PrecisionPolicy:
  """int4 weights, int8 per-token activations; ``group_scales="int"`` (with a
  ``group_size``): integer group scales under a channel scale (``QuantSpec.group_scales``),
  all of K summed in int32."""
  return PrecisionPolicy((PrecisionRule(_HEAD, keep_float=True),
                          PrecisionRule(".*", _w(4, group_size, group_scales=group_scales), A8)),
                         allow_unused=True)


def w8a16() -> PrecisionPolicy:
  """int8 per-channel weights, float activations."""
  return PrecisionPolicy((PrecisionRule(_HEAD, keep_float=True),
                          PrecisionRule(".*", _w(8))), allow_unused=True)


def mixed() -> PrecisionPolicy:
  """int8 attention (W8A8), int4 group-128 MLP (W4A16), float embeddings and head."""
  return PrecisionPolicy((PrecisionRule(_HEAD, keep_float=True),
                          PrecisionRule(r".*attn/.*", _w(8), A8),
                          PrecisionRule(r".*mlp/.*", _w(4, 128))), allow_unused=True)


READY_MADE = {"w8a8": w8a8, "w8a16": w8a16, "w4a16": w4a16, "w4a16-channel":
              lambda: w4a16(None), "w4a8": w4a8, "w4a8-g128-int": lambda: w4a8(128, "int"),
              "mixed": mixed}
