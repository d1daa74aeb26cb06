"""Render the GPU benchmark JSON files into the generated part of docs/kernels.md.

    python experiments/kernels_report.py docs/device_runs/*.json

Replaces the text between the GENERATED markers of docs/kernels.md; the prose
around it is written by people, the numbers only by this script.
"""

from __future__ import annotations

import json
import pathlib
import re
import sys

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "kernels.md"
BEGIN = "<!-- BEGIN GENERATED: experiments/kernels_report.py -->"
END = "<!-- END GENERATED -->"
TARGETS = [  # (label, M values, K, N, impl, target speedup)
    # What a model converted with weight_layout="nk" gets by default (the wrappers'
    # dispatch: Triton, or a Mosaic GPU kernel where _mosaic_gpu.AUTO says): runs >= 6.
    ("default dispatch: W4A16 g128, weight stored K-major, M <= 16", (1, 16), 8192, 8192,
     "lowbit_w4a16_auto_nk", 3.0),
    ("default dispatch: W8A8, weight stored K-major, M = N = K = 8192", (8192,), 8192, 8192,
     "lowbit_w8a8_auto_nk", 1.6),
    ("default dispatch: W4A8 g128, weight stored K-major, M = 256", (256,), 8192, 8192,
     "lowbit_w4a8_auto_nk", 2.0),
    # Each kernel by name.
    ("W4A16 g128, M <= 16, K = N = 8192", (1, 16), 8192, 8192, "lowbit_w4a16_g128", 3.0),
    ("W4A16 g128 Mosaic GPU (Hopper), weight stored K-major, M <= 16, K = N = 8192", (1, 16),
     8192, 8192, "lowbit_w4a16_hopper_nk", 3.0),
    ("W8A8, M = N = K = 8192", (8192,), 8192, 8192, "lowbit_w8a8", 1.6),
    ("W8A8, K-major weight stored ahead, M = N = K = 8192", (8192,), 8192, 8192,
     "lowbit_w8a8_nk", 1.6),
    ("W8A8 Mosaic GPU (Hopper), M = N = K = 8192", (8192,), 8192, 8192, "lowbit_w8a8_hopper", 1.6),
    ("W8A8 Mosaic GPU, K-major weight stored ahead, M = N = K = 8192", (8192,), 8192, 8192,
     "lowbit_w8a8_hopper_nk", 1.6),
    ("W4A8 g128, M = 256, K = N = 8192", (256,), 8192, 8192, "lowbit_w4a8_g128", 2.0),
    ("W4A8 g128 Mosaic GPU, weight stored K-major, M = 256, K = N = 8192", (256,), 8192, 8192,
     "lowbit_w4a8_hopper_nk", 2.0),
]


def _targets(rows) -> list[str]:
  out = ["| target | M | measured speedup | bound | goal | met |", "|---|---|---|---|---|---|"]
  for label, ms, k, n, impl, goal in TARGETS:
    for m in ms:
      r = [r for r in rows if (r["m"], r["k"], r["n"], r["impl"]) == (m, k, n, impl)]
      if not r and m == 8192:  # older runs stopped at M = 4096
        r = [r for r in rows if (r["m"], r["k"], r["n"], r["impl"]) == (4096, k, n, impl)]
        label, m = label.replace("M = N = K = 8192", "M = 4096 (8192 not reached)"), 4096
      if not r:
        continue
      r = r[0]
      out.append(f"| {label} | {m} | {r['speedup_vs_bf16']:.2f} | {r.get('bound', 0):.2f} | "
                 f"{goal} | {'yes' if r['speedup_vs_bf16'] >= goal else 'no'} |")
  return out


#: The HopperW4Tiles fields whose values the variant table compares (their defaults first).
W4_VARIANTS = {"nibbles": ("interleaved", "split"), "unpack": ("ops", "ptx", "ptx_natural"),
               "nk_scales": ("transpose", "slab"), "int_sums": ("cvt", "magic"),
               "pad_tokens": ("True", "False"), "compute_wgs": ("2", "3", "4"),
               "wg_split": ("n", "k", "steps"), "epilogue": ("xla", "kernel"),
               "halves": ("together", "apart"), "steps_per_wait": ("1", "2"),
               "mma": ("wgmma", "sync"), "pingpong": ("False", "True"),
               "tile_n": ("64", "128"), "tile_m": ("None", "64", "128"),
               "max_concurrent_steps": ("None", "3", "6")}


def _w4_fields(block_sizes: str) -> dict[str, str] | None:
  """The variant fields of a ``HopperW4Tiles(...)`` repr, defaults filled in; None for
  other tiles."""
  if not block_sizes.startswith("HopperW4Tiles("):
    return None
  got = dict(re.findall(r"(\w+)='?(\w+)'?[,)]", block_sizes))
  return {f: got.get(f, vals[0]) for f, vals in W4_VARIANTS.items()}


def _w4_variants(sweeps) -> list[str]:
  """Per (M, kernel), variant field and value other than the field's default: the best
  correct Mosaic GPU int4 candidate with that value against the best with any other value
  of the field (for two-valued fields, the default), and their ratio (the value's speedup)."""
  best = {}
  for s in sweeps:
    fields = _w4_fields(s["block_sizes"])
    if fields is None or not s.get("correct", True):
      continue
    for f, v in fields.items():
      key = (s["m"], s["kernel"], f, v)
      if key not in best or s["us"] < best[key]["us"]:
        best[key] = s
  out = ["| M | kernel | field | best us with another value | best us with this one | "
         "other / this |", "|---|---|---|---|---|---|"]
  for (m, kernel, f, v), s in sorted(best.items()):
    others = [o for (m2, k2, f2, v2), o in best.items()
              if (m2, k2, f2) == (m, kernel, f) and v2 != v]
    if v == W4_VARIANTS[f][0] or not others:
      continue
    d = min(others, key=lambda o: o["us"])
    out.append(f"| {m} | {kernel} | {f}={v!r} | {d['us']:.1f} | {s['us']:.1f} | "
               f"{d['us'] / s['us']:.2f} |")
  return out if len(out) > 2 else []


def _best(sweeps, prefix: str = "") -> dict:
  """``{(M, K, N, kernel): the fastest correct candidate}`` among those whose tiles' repr
  starts with ``prefix``."""
  best = {}
  for s in sweeps:
    if not s["block_sizes"].startswith(prefix) or not s.get("correct", True):
      continue
    key = (s["m"], s["k"], s["n"], s["kernel"])
    if key not in best or s["us"] < best[key]["us"]:
      best[key] = s
  return best


def _auto_check(rows, sweeps) -> list[str]:
  """Per (M, K, N, kernel): the best correct Mosaic GPU candidate of the sweep against the
  row the default dispatch gave in the same run (``lowbit_<kernel>_auto_nk``), their ratio."""
  best = _best(sweeps, "Hopper")
  out = ["| M | K | N | kernel | default dispatch us | best Mosaic GPU us | default / best | "
         "tiles |", "|---|---|---|---|---|---|---|---|"]
  for (m, k, n, kernel), s in sorted(best.items()):
    r = [r for r in rows if (r["m"], r["k"], r["n"], r["impl"]) == (m, k, n, f"lowbit_{kernel}_auto_nk")]
    if r:
      out.append(f"| {m} | {k} | {n} | {kernel} | {r[0]['us']:.1f} | {s['us']:.1f} | "
                 f"{r[0]['us'] / s['us']:.2f} | `{s['block_sizes']}` |")
  return out if len(out) > 2 else []


def _newest_first(path: str) -> list:
  """Sort key, newest run first: the file name's numbers as numbers (run 11 after run 9)."""
  return [int(t) if t.isdigit() else t
          for t in re.split(r"(\d+)", pathlib.Path(path).name)]


def render(paths: list[str], sweep_runs: int = 2) -> str:
  """Targets for every run; all rows only for the newest run; the sweep tables of the
  newest ``sweep_runs`` runs that swept (a run that only timed the defaults leaves them to
  the ones before, and a sweep's evidence stays beside the next one's)."""
  out = []
  runs = [(p, json.loads(pathlib.Path(p).read_text()))
          for p in sorted(paths, key=_newest_first, reverse=True)]
  runs = [(p, d) for p, d in runs if "sweeps" in d]  # bench_kernels.py's files only
  swept = [p for p, d in runs if d["sweeps"]][:sweep_runs]
  for i, (p, d) in enumerate(runs):
    meta, rows = d["meta"], d["rows"]
    cupti = meta.get("timer") == "cupti"
    out.append(f"### {pathlib.Path(p).name}: {meta['device']}, jax {meta['jax']}, {meta['date']}\n")
    floor = meta.get("per_op_floor_us")
    floor = f"{floor:.1f} us" if floor is not None else "not measured in this run"
    timer = ("device time from CUPTI (every kernel a call launches), wall-clock median beside it"
             if cupti else "wall-clock time (includes the host's launch latency)")
    out.append(f"Timer: {timer}. Device copy bandwidth {meta['copy_bandwidth_GBps']:.0f} GB/s "
               f"(read + write); per-op launch floor of the wall clock {floor}; median of "
               f"{meta['reps']}; speedup = t(XLA bf16 dot) / t(impl), same run.\n")
    out.append("Targets:\n")
    out += _targets(rows)
    if i > 0 and p not in swept:
      out.append("")
      continue
    if i == 0:
      out += _all_rows(rows, cupti)
    if p in swept:
      out += _sweep_tables(rows, d["sweeps"])
    out.append("")
  return "\n".join(out)


def _all_rows(rows: list[dict], cupti: bool) -> list[str]:
  """The newest run's table of every row."""
  out = ["\nAll rows:\n"]
  wall = " us wall |" if cupti else ""
  out.append(f"| M | K | N | impl | us |{wall} x bf16 | bound | GB/s | TOP/s | rel err vs XLA |")
  out.append("|---|---|---|---|---|" + ("---|" if cupti else "") + "---|---|---|---|---|")
  for r in rows:
    err = f"{r['rel_err_vs_xla']:.1e}" if "rel_err_vs_xla" in r else ""
    w = f" {r['us_wall']:.1f} |" if cupti else ""
    out.append(f"| {r['m']} | {r['k']} | {r['n']} | {r['impl']} | {r['us']:.1f} |{w} "
               f"{r['speedup_vs_bf16']:.2f} | {r.get('bound', 0):.2f} | {r['GBps']:.0f} | "
               f"{r['TOPs']:.0f} | {err} |")
  return out


def _sweep_tables(rows: list[dict], sweeps: list[dict]) -> list[str]:
  """A swept run's tables: the best tiles per point, the AUTO check, the variant table."""
  best = _best(sweeps)
  n_bad = sum(not s.get("correct", True) for s in sweeps)
  out = [f"\nBest correct BlockSizes of the sweep ({len(sweeps)} candidates timed, "
         f"{n_bad} with a wrong output):\n",
         "| M | K | N | kernel | us | x bf16 | BlockSizes |", "|---|---|---|---|---|---|---|"]
  for key, s in sorted(best.items()):
    out.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {s['us']:.1f} | "
               f"{s['speedup_vs_bf16']:.2f} | `{s['block_sizes']}` |")
  auto = _auto_check(rows, sweeps)
  if auto:
    out.append("\nThe sweep's best Mosaic GPU tiles against what the dispatch takes today "
               "(the `*_auto_nk` row, same run; > 1: `_mosaic_gpu.AUTO` should take "
               "the tiles at this M):\n")
    out += auto
  variants = _w4_variants(sweeps)
  if variants:
    out.append("\nMosaic GPU int4 variants, the best candidate with each value against "
               "the best with the field's other values (> 1: this value is faster):\n")
    out += variants
  return out


def main(argv=None):
  paths = sorted(argv if argv is not None else sys.argv[1:])
  text = DOC.read_text()
  i, j = text.index(BEGIN) + len(BEGIN), text.index(END)
  DOC.write_text(text[:i] + "\n" + render(paths) + "\n" + text[j:])


if __name__ == "__main__":
  main()
