"""The ``lowbit`` command.

    lowbit demo     quantize a weight matrix at int8 / int4, print error and bytes
"""

from __future__ import annotations

import argparse
import sys


def demo(args: argparse.Namespace) -> int:
  """Quantize one heavy-tailed [K, N] weight under several schemes; print a table."""
  import jax
  import jax.numpy as jnp

  from lowbit.quant import QuantSpec, dequantize, quantize

  k, n = args.k, args.n
  w = jax.random.t(jax.random.key(args.seed), 5.0, (k, n), jnp.float32) * 0.02
  schemes = {
      "int8 per-channel": QuantSpec(bits=8, channel_axes=(1,), scale_dtype=jnp.bfloat16),
      "int4 per-channel": QuantSpec(bits=4, channel_axes=(1,), pack=True,
                                    scale_dtype=jnp.bfloat16),
      "int4 per-channel, MSE clip": QuantSpec(bits=4, channel_axes=(1,), pack=True,
                                              calibration="mse", scale_dtype=jnp.bfloat16),
      "int4 group 128": QuantSpec(bits=4, channel_axes=(1,), group_size=128, pack=True,
                                  scale_dtype=jnp.bfloat16),
      "int4 group 128, MSE clip": QuantSpec(bits=4, channel_axes=(1,), group_size=128,
                                            pack=True, calibration="mse",
                                            scale_dtype=jnp.bfloat16),
  }
  f32_bytes = w.size * 4
  print(f"weight [{k}, {n}], Student-t(5), float32: {f32_bytes:,} bytes")
  print(f"{'scheme':28s} {'rel. error':>10s} {'bytes':>12s} {'bytes/weight':>13s} {'vs f32':>7s}")
  for name, spec in schemes.items():
    qa = quantize(w, spec)
    err = float(jnp.linalg.norm(dequantize(qa) - w) / jnp.linalg.norm(w))
    print(f"{name:28s} {err:10.4f} {qa.nbytes:12,d} {qa.bytes_per_element:13.4f} "
          f"{f32_bytes / qa.nbytes:6.1f}x")
  return 0


def ablate(args: argparse.Namespace) -> int:
  """Run an ablation config; print where its results are."""
  from lowbit import ablation, harness
  overrides = list(args.set or [])
  if args.data:
    overrides.append(f"data={args.data}")
  if args.workdir:
    overrides.append(f"workdir={args.workdir}")
  if args.float_ckpt:
    overrides.append(f"float_ckpt={args.float_ckpt}")
  cfg = harness.load_config(args.config, overrides)
  run_dir = ablation.run(cfg, quiet=args.quiet)
  print(f"results: {run_dir / 'results.json'}")
  if args.report:
    from lowbit import report
    out = report.write_report([run_dir / "results.json"], args.report)
    print(f"report: {out}")
  return 0


def report_cmd(args: argparse.Namespace) -> int:
  """``lowbit report``: the markdown report and plots of ablation results (exit code 0)."""
  from lowbit import report
  out = report.write_report(args.results, args.out)
  print(f"report: {out}")
  return 0


def main(argv: list[str] | None = None) -> int:
  """The ``lowbit`` command: parse ``argv`` (default ``sys.argv[1:]``), run the subcommand,
  return its exit code."""
  ap = argparse.ArgumentParser(prog="lowbit", description="lowbit: int8/int4 quantization for JAX")
  sub = ap.add_subparsers(dest="cmd", required=True)
  d = sub.add_parser("demo", help="quantize a weight matrix; print error and bytes")
  d.add_argument("--k", type=int, default=4096)
  d.add_argument("--n", type=int, default=1024)
  d.add_argument("--seed", type=int, default=0)
  d.set_defaults(fn=demo)
  a = sub.add_parser("ablate", help="run an int4 vs int8 ablation config")
  a.add_argument("--config", required=True, help="a Python config file (get_config())")
  a.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field")
  a.add_argument("--data", help="a text file to use instead of the config's corpus")
  a.add_argument("--workdir", help="the run directory (must not exist)")
  a.add_argument("--float-ckpt", help="reuse a float checkpoint instead of training")
  a.add_argument("--report", help="also write a markdown report (with plots) to this path")
  a.add_argument("--quiet", action="store_true", help="no progress bars")
  a.set_defaults(fn=ablate)
  r = sub.add_parser("report", help="tables and plots from results.json files")
  r.add_argument("results", nargs="+", help="results.json files or run directories")
  r.add_argument("--out", required=True, help="markdown file to write (PNGs beside it)")
  r.set_defaults(fn=report_cmd)
  args = ap.parse_args(argv)
  return args.fn(args)


if __name__ == "__main__":
  sys.exit(main())
