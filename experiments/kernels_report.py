"""Render the GPU benchmark JSON files into the generated part of docs/kernels.md.

    python experiments/kernels_report.py docs/device_runs/*.json

Replaces the text between the GENERATED markers of docs/kernels.md; the prose
around it is written by people, the numbers only by this script.
"""

from __future__ import annotations

import json
import pathlib
import sys

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "kernels.md"
BEGIN = "<!-- BEGIN GENERATED: experiments/kernels_report.py -->"
END = "<!-- END GENERATED -->"
TARGETS = [  # (label, M values, K, N, impl, target speedup)
    ("W4A16 g128, M <= 16, K = N = 8192", (1, 16), 8192, 8192, "lowbit_w4a16_g128", 3.0),
    ("W8A8, M = N = K = 8192", (8192,), 8192, 8192, "lowbit_w8a8", 1.6),
    ("W8A8, M = 4096, K = N = 8192 (M = 8192 not reached)", (4096,), 8192, 8192,
     "lowbit_w8a8", 1.6),
    ("W4A8 g128, M = 256, K = N = 8192", (256,), 8192, 8192, "lowbit_w4a8_g128", 2.0),
]


def render(paths: list[str]) -> str:
  out = []
  for p in paths:
    d = json.loads(pathlib.Path(p).read_text())
    meta, rows = d["meta"], d["rows"]
    out.append(f"### {pathlib.Path(p).name}: {meta['device']}, jax {meta['jax']}, {meta['date']}\n")
    floor = meta.get("per_op_floor_us")
    floor = f"{floor:.1f} us" if floor is not None else "not measured in this run"
    out.append(f"Device copy bandwidth {meta['copy_bandwidth_GBps']:.0f} GB/s (read + write); "
               f"per-op floor of the harness {floor}; median of {meta['reps']} "
               f"calls; speedup = t(XLA bf16 dot) / t(impl), same run.\n")
    out.append("Targets:\n")
    out.append("| target | M | measured speedup | bound | goal | met |")
    out.append("|---|---|---|---|---|---|")
    for label, ms, k, n, impl, goal in TARGETS:
      for m in ms:
        r = [r for r in rows if (r["m"], r["k"], r["n"], r["impl"]) == (m, k, n, impl)]
        if not r:
          continue
        r = r[0]
        out.append(f"| {label} | {m} | {r['speedup_vs_bf16']:.2f} | {r.get('bound', 0):.2f} | "
                   f"{goal} | {'yes' if r['speedup_vs_bf16'] >= goal else 'no'} |")
    out.append("\nAll rows:\n")
    out.append("| M | K | N | impl | us | x bf16 | bound | GB/s | TOP/s | rel err vs XLA |")
    out.append("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
      err = f"{r['rel_err_vs_xla']:.1e}" if "rel_err_vs_xla" in r else ""
      out.append(f"| {r['m']} | {r['k']} | {r['n']} | {r['impl']} | {r['us']:.1f} | "
                 f"{r['speedup_vs_bf16']:.2f} | {r.get('bound', 0):.2f} | {r['GBps']:.0f} | "
                 f"{r['TOPs']:.0f} | {err} |")
    if d.get("sweeps"):
      best = {}
      for s in d["sweeps"]:
        key = (s["m"], s["k"], s["n"], s["kernel"])
        if key not in best or s["us"] < best[key]["us"]:
          best[key] = s
      out.append("\nBest BlockSizes of the sweep:\n")
      out.append("| M | K | N | kernel | us | x bf16 | BlockSizes |")
      out.append("|---|---|---|---|---|---|---|")
      for key, s in sorted(best.items()):
        out.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {s['us']:.1f} | "
                   f"{s['speedup_vs_bf16']:.2f} | `{s['block_sizes']}` |")
    out.append("")
  return "\n".join(out)


def main(argv=None):
  paths = sorted(argv if argv is not None else sys.argv[1:])
  text = DOC.read_text()
  i, j = text.index(BEGIN) + len(BEGIN), text.index(END)
  DOC.write_text(text[:i] + "\n" + render(paths) + "\n" + text[j:])


if __name__ == "__main__":
  main()
