"""Tables and plots from ablation ``results.json`` files; nothing typed by hand.

``lowbit report runs/*/results.json --out docs/results/shakespeare.md`` writes
the markdown (every row names the config that made it) and PNG plots beside it.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterable
from typing import Any

# Published findings (LITERATURE.md) and how a results file tests them. Each
# check returns (verdict, evidence) or None when the needed points are missing.
FINDINGS = [
    ("int8 weight-only is near lossless", "1f (torchao, quanto): int8wo within ~0.01 PPL"),
    ("per-channel beats per-tensor at int4", "LLM.int8() table 1; GPTQ 1c"),
    ("groups (128/64/32) recover much of the int4 loss", "GPTQ 1a/1c, auto-round 1d"),
    ("MSE / learned clipping beats absmax at 4 bits, matters little at 8", "AQT, OmniQuant"),
    ("QAT recovers most of what PTQ loses when PTQ hurts", "LLM-QAT 2f; ZeroQuant 2d"),
    ("the 3-bit / 2-bit cliff", "GPTQ 1a (RTN W3 1.3e3 on OPT-125M), GPTQ-for-LLaMa 1c"),
    ("activation quantization hurts more than weight quantization; SmoothQuant helps",
     "SmoothQuant 2a/2b, ZeroQuant-V2 2d"),
]


def _load(paths) -> list[dict[str, Any]]:
  out = []
  for p in paths:
    p = pathlib.Path(p)
    if p.is_dir():
      p = p / "results.json"
    if not p.exists():
      raise ValueError(f"report: {p} does not exist (an incomplete run has no results.json).")
    r = json.loads(p.read_text())
    r["_path"] = str(p)
    out.append(r)
  return out


def _row(results, name):
  for r in results["rows"]:
    if r["point"] == name:
      return r
  return None


def _check(i: int, res) -> tuple[str, str] | None:
  d = lambda n: (_row(res, n) or {}).get("delta_val")  # noqa: E731
  f = lambda v: f"{v:+.4f}"  # noqa: E731
  if i == 0 and d("w8a16") is not None:
    v = d("w8a16")
    return ("reproduced" if abs(v) < 0.01 else "not reproduced", f"W8A16 delta {f(v)} nats/char")
  if i == 1 and None not in (d("w4a16-tensor"), d("w4a16-channel")):
    a, b = d("w4a16-tensor"), d("w4a16-channel")
    return ("reproduced" if b < a else "not reproduced", f"per-tensor {f(a)}, per-channel {f(b)}")
  if i == 2 and d("w4a16-channel") is not None:
    gs = {n: d(n) for n in ("w4a16-g128", "w4a16-g64", "w4a16-g32") if d(n) is not None}
    if not gs:
      return None
    c = d("w4a16-channel")
    best = min(gs.values())
    rec = (c - best) / c if c > 0 else 0.0
    ev = ", ".join(f"{k[6:]} {f(v)}" for k, v in gs.items())
    return ("reproduced" if rec > 0.3 else "not reproduced",
            f"per-channel {f(c)}; {ev}; best recovers {rec:.0%}")
  if i == 3 and None not in (d("w4a16-channel"), d("w4a16-channel-mse")):
    a, b = d("w4a16-channel"), d("w4a16-channel-mse")
    ev = f"int4 absmax {f(a)}, MSE {f(b)}"
    ok = b < a
    if None not in (d("w8a16"), d("w8a16-mse")):
      ev += f"; int8 absmax {f(d('w8a16'))}, MSE {f(d('w8a16-mse'))}"
    return ("reproduced" if ok else "not reproduced", ev)
  if i == 4:
    q = [r for r in res["rows"] if r.get("qat_recovery") is not None]
    if not q:
      return None
    if max(r["ptq_val_loss"] - res["float"]["val_loss"] for r in q) < 0.01:
      return ("not applicable", "PTQ loses < 0.01 nats/char here, nothing for QAT to recover")
    ctrl = [r for r in q if r.get("qat_recovery_controlled") is not None]
    if ctrl:
      ft = res["float"]["finetuned_val_loss"] - res["float"]["val_loss"]
      ev = f"float fine-tuned on the same batches (control) {f(ft)}; " + "; ".join(
          f"{r['point']}: PTQ {r['ptq_val_loss'] - res['float']['val_loss']:+.4f}, after QAT "
          f"{r['qat_gap_vs_float_control']:+.4f} above the control "
          f"({r['qat_recovery_controlled']:.0%} of the PTQ loss recovered)" for r in ctrl)
      best = max(r["qat_recovery_controlled"] for r in ctrl)
      return ("reproduced" if best > 0.5 else "not reproduced", ev)
    ev = "; ".join(f"{r['point']}: PTQ {r['ptq_val_loss'] - res['float']['val_loss']:+.4f} -> "
                   f"QAT {f(r['delta_val'])} ({r['qat_recovery']:.0%} recovered)" for r in q)
    if min(r["delta_val"] for r in q) < 0:
      # QAT ended below the float model: its steps also kept training an
      # under-trained model, so "recovery" mixes the two effects.
      return ("confounded (QAT beats float: the extra steps also train the model; no float "
              "fine-tune control in this grid)", ev)
    return ("reproduced" if max(r["qat_recovery"] for r in q) > 0.5 else "not reproduced", ev)
  if i == 5 and None not in (d("w4a16-channel"), d("w3a16-channel"), d("w2a16-channel")):
    a, b, c = d("w4a16-channel"), d("w3a16-channel"), d("w2a16-channel")
    return ("reproduced" if c > 3 * b > 0 and b > a else "not reproduced",
            f"W4 {f(a)}, W3 {f(b)}, W2 {f(c)}")
  if i == 6 and None not in (d("w8a16"), d("w8a8-tensor")):
    ev = f"W8A16 {f(d('w8a16'))}, W8A8 per-tensor {f(d('w8a8-tensor'))}"
    if d("w8a8") is not None:
      ev += f", W8A8 per-token {f(d('w8a8'))}"
    if d("w8a8-tensor-smoothquant") is not None:
      ev += f", W8A8 per-tensor + SmoothQuant {f(d('w8a8-tensor-smoothquant'))}"
    return ("reproduced" if d("w8a8-tensor") > d("w8a16") else "not reproduced", ev)
  return None


def markdown(results_list: list[dict], plots: dict[str, str]) -> str:
  """The report's markdown: per results file its config, environment and tables, then the
  literature checks and the ``plots`` (title -> image file name)."""
  lines = ["<!-- generated by `lowbit report`; do not edit by hand -->", ""]
  for res in results_list:
    cfg, env, fl = res["config"], res["environment"], res["float"]
    lines += [f"## `{res['config_name']}` ({res['_path']})", "",
              f"Corpus: {res['corpus']}; evaluation: {res['eval_tokens']['val']} validation and "
              f"{res['eval_tokens']['test']} test tokens, the same for every row. Device: "
              f"{env['device']} ({env['platform']}), jax {env['jax']}, lowbit {env['lowbit']}. "
              f"Seeds: {res['seeds']}. Total time {res['seconds_total']:.0f} s.", "",
              "| model | val loss | test loss | val bits/char | bytes | train steps/s | train s |",
              "|---|---|---|---|---|---|---|",
              f"| float ({cfg['n_layers']}L d{cfg['d_model']}, {cfg['steps']} steps) | "
              f"{fl['val_loss']:.4f} | {fl['test_loss']:.4f} | {fl['val_bpc']:.4f} | "
              f"{fl['bytes']:,} | {fl['steps_per_s'] or float('nan'):.1f} | "
              f"{fl['train_seconds'] or float('nan'):.0f} |", ""]
    lines += ["| point | method | val loss | delta val | delta test | KL val | top-1 val | "
              "bits/weight (quantized layers) | model bytes | QAT recovery | config |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
      rec = "" if r.get("qat_recovery") is None else f"{r['qat_recovery']:.0%}"
      lines.append(
          f"| {r['point']} | {r['method']}{'/' + r['learn'] if r.get('learn') else ''} | "
          f"{r['val_loss']:.4f} | {r['delta_val']:+.4f} | {r['delta_test']:+.4f} | "
          f"{r['kl_val']:.4f} | {r['top1_val']:.3f} | {r['quantized_bits']:.2f} | "
          f"{r['bytes']:,} | {rec} | {res['config_name']} |")
    lines.append("")
    lines += ["### Published findings, checked on these numbers", "",
              "| finding | source | verdict | evidence (delta = validation loss - float, nats/char) |",
              "|---|---|---|---|"]
    for i, (claim, source) in enumerate(FINDINGS):
      c = _check(i, res)
      verdict, ev = c if c else ("not measured", "points missing from this config")
      lines.append(f"| {claim} | {source} | {verdict} | {ev} |")
    lines.append("")
    if "sensitivity" in res:
      s = res["sensitivity"]
      lines += ["### Per-layer int4 sensitivity and the searched policies", "",
                f"On {s['eval_tokens']} validation tokens; delta = loss increase when only that "
                "layer is quantized (per-channel RTN).", "",
                "| layer | params | delta int4 | delta int8 |", "|---|---|---|---|"]
      for p in sorted(s["per_layer"], key=lambda p: -p["delta4"]):
        lines.append(f"| {p['layer']} | {p['params']:,} | {p['delta4']:+.4f} | {p['delta8']:+.4f} |")
      lines += ["", "| target bits | code bits | val loss | delta val | KL | int8 layers |",
                "|---|---|---|---|---|---|"]
      for p in s["searched"]:
        lines.append(f"| {p['target_bits']} | {p['avg_code_bits']:.2f} | {p['val_loss']:.4f} | "
                     f"{p['delta_val']:+.4f} | {p['kl']:.4f} | {len(p['int8_layers'])} |")
      lines.append("")
  for title, fname in plots.items():
    lines += [f"![{title}]({fname})", ""]
  return "\n".join(lines)


def _plots(results_list, out_dir: pathlib.Path, stem: str) -> dict[str, str]:
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return {}
  plots = {}
  res = results_list[0]
  rows = sorted(res["rows"], key=lambda r: r["delta_val"])
  fig, ax = plt.subplots(figsize=(8, 0.3 * len(rows) + 1.5))
  ax.barh([r["point"] for r in rows], [max(r["delta_val"], 1e-5) for r in rows], color="tab:blue")
  ax.set_xscale("log")
  ax.set_xlabel("validation loss - float (nats/char, log scale)")
  ax.set_title(f"{res['config_name']}: loss increase per grid point")
  fig.tight_layout()
  name = f"{stem}_delta.png"
  fig.savefig(out_dir / name, dpi=110)
  plt.close(fig)
  plots["loss increase per grid point"] = name
  if "sensitivity" in res:
    fig, ax = plt.subplots(figsize=(6, 4))
    s = res["sensitivity"]["searched"]
    ax.plot([p["avg_code_bits"] for p in s], [p["delta_val"] for p in s], "o-",
            label="searched mixed int4/int8")
    for name_, label, bits in (("w4a16-channel", "uniform int4", 4), ("w8a16", "uniform int8", 8)):
      r = _row(res, name_)
      if r:
        ax.plot([bits], [r["delta_val"]], "s", label=label)
    ax.set_xlabel("average code bits per weight")
    ax.set_ylabel("validation loss - float")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.legend()
    ax.set_title("loss vs bits (per-channel RTN)")
    fig.tight_layout()
    name = f"{stem}_pareto.png"
    fig.savefig(out_dir / name, dpi=110)
    plt.close(fig)
    plots["loss vs average bits"] = name
  return plots


def write_report(paths: Iterable[str | pathlib.Path], out: str | pathlib.Path) -> pathlib.Path:
  """Write the markdown report of ablation ``results.json`` files (or run directories) to
  ``out``, its plots beside it; returns ``out``."""
  results_list = _load(paths)
  out = pathlib.Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  plots = _plots(results_list, out.parent, out.stem)
  out.write_text(markdown(results_list, plots) + "\n")
  return out
