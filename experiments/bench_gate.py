"""Which Mosaic GPU kernels and opt-in tiles the GPU run's benchmark may time, read from the
log of its compiled kernel tests (``experiments/device_check.sh``).

    python experiments/bench_gate.py KERNEL_TESTS_LOG   # prints bench_kernels.py flags

A kernel that hangs on the GPU takes the rest of the benchmark with it, so a Mosaic GPU
kernel is benchmarked only where its compiled tests passed:

- ``--no-hopper`` (no Mosaic GPU kernel at all) when no test passed (the tests did not run);
- ``--no-hopper w4a16 w4a8`` when an int4 test with default tiles failed (one kernel: both
  rows), ``--no-hopper w8a8`` when a W8A8 one did;
- ``--skip-tiles KW ...``: the opt-in variants (:data:`OPT_IN`, named in the test ids) to
  blame for a failed test, left out of the sweep: those of its variants that no passing test
  with only variants of its own has (the decode one kernel with turns failing while the one
  kernel without them passed blames ``pingpong`` alone); when every one of them passed
  somewhere, their combination, ``KW1+KW2+...``: the candidates that have all of them (a
  flaky failure still keeps a possible hang out, and a failure of W4A8's one kernel no
  longer takes W4A16's decode default, which shares four of its six variants, with it).

A test "failed" if the log's summary says FAILED or ERROR (pytest-timeout's ``thread``
method ends a hung test's worker; xdist reports the test as FAILED, "worker crashed"), or
if ``-v`` logged its start and never its end: the stage's own time limit (``timeout``)
cut the run short while it hung. Tests that never started gate nothing.
"""

from __future__ import annotations

import re
import sys

#: Test-id fragment -> the ``HopperW4Tiles`` keyword of that opt-in variant (as
#: ``bench_kernels.py --skip-tiles`` matches candidate reprs).
OPT_IN = {
    "slab": "nk_scales='slab'", "ptx": "unpack='ptx'", "natural": "unpack='ptx_natural'",
    "magic": "int_sums='magic'", "unpadded": "pad_tokens=False", "ksplit": "wg_split='k'",
    "final": "epilogue='kernel'", "pw2": "steps_per_wait=2", "sync": "mma='sync'",
    "steps": "wg_split='steps'", "wgs3": "compute_wgs=3", "-pp]": "pingpong=True",
    "apart": "halves='apart'", "tm128": "tile_m=128", "folded": "offset='folded'",
}
#: Id fragments of opt-in variants (``split`` too: split nibbles; ``wgs4``: 4 compute
#: warpgroups, refused compiled), whose failure leaves the default tiles' rows in.
OPT_IN_IDS = ("split", "wgs4", *OPT_IN)
INT4_IDS = ("w4a16", "w4a8", "hopper_w4")

_START = re.compile(r"^(\S+::\S+)\s*$")  # -v with xdist: the id alone when a test starts
_END = re.compile(r"^\[gw\d+\] \[\s*\d+%\] (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (\S+::\S+)")
_SUMMARY = re.compile(r"^(FAILED|ERROR) (\S+::\S+)")


def outcomes(log: str) -> dict[str, str]:
  """``{test id: outcome}`` from a ``pytest -v -rfE -n N`` log: ``"passed"``, ``"failed"``
  (FAILED or ERROR, from a result line or the summary), ``"skipped"``, or ``"hung"``
  (started, never ended)."""
  started, out = [], {}
  for line in log.splitlines():
    if m := _END.match(line):
      word, nodeid = m.groups()
      out[nodeid] = ("failed" if word in ("FAILED", "ERROR") else
                     "skipped" if word == "SKIPPED" else "passed")
    elif m := _SUMMARY.match(line):
      out[m.group(2)] = "failed"
    elif m := _START.match(line):
      started.append(m.group(1))
  for nodeid in started:
    out.setdefault(nodeid, "hung")
  return out


def fragments(test_id: str) -> set[str]:
  """The opt-in variants (keys of :data:`OPT_IN`) a test id names."""
  return {f for f in OPT_IN if f in test_id}


def bench_flags(log: str) -> list[str]:
  """The ``bench_kernels.py`` arguments that keep failed or hung Mosaic GPU kernels and
  variants out of the benchmark (see the module docstring); ``[]`` when all passed."""
  res = outcomes(log)
  if "passed" not in res.values() and not re.search(r"\b\d+ passed\b", log):
    return ["--no-hopper"]  # (a log without -v has only the summary's count)
  bad = [t for t, o in res.items() if "test_mosaic_gpu" in t and o in ("failed", "hung")]
  off = []
  if any(any(k in t for k in INT4_IDS) and not any(v in t for v in OPT_IN_IDS) for t in bad):
    off += ["w4a16", "w4a8"]
  if any(not any(k in t for k in INT4_IDS) for t in bad):
    off.append("w8a8")
  ok = [fragments(t) for t, o in res.items() if "test_mosaic_gpu" in t and o == "passed"]
  blamed, combos = set(), []
  for t in bad:
    mine = fragments(t)
    covered = set().union(*(f for f in ok if f <= mine))
    if mine - covered:
      blamed |= mine - covered
    elif mine:  # each variant passed elsewhere: the combination is to blame
      combo = "+".join(kw for frag, kw in OPT_IN.items() if frag in mine)
      combos += [combo] if combo not in combos else []
  skip = [kw for frag, kw in OPT_IN.items() if frag in blamed]
  skip += [c for c in combos if not any(kw in skip for kw in c.split("+"))]
  return (["--no-hopper", *off] if off else []) + (["--skip-tiles", *skip] if skip else [])


def admitted(kname: str, tiles: object, no_hopper: list[str] | None,
             skip_tiles: list[str]) -> bool:
  """Whether the flags let a run time or profile Mosaic GPU kernel ``kname`` with ``tiles``
  (``None``: the kernel at all): ``no_hopper`` ``None`` (flag absent), ``[]`` (every
  kernel off) or the kernels off; ``skip_tiles`` strings of the tiles' repr that leave
  them out, ``a+b``: tiles whose repr has both. bench_kernels.py and profile_w4.py both
  read their flags so."""
  if no_hopper is not None and (not no_hopper or kname in no_hopper):
    return False
  r = repr(tiles)
  return tiles is None or not any(all(part in r for part in s.split("+")) for s in skip_tiles)


def main(argv: list[str] | None = None) -> int:
  """Print :func:`bench_flags` of the log file named in ``argv``, space-separated (no flag
  has a space: device_check.sh passes them on unquoted, the single quotes literal)."""
  (path,) = sys.argv[1:] if argv is None else argv
  with open(path, encoding="utf-8", errors="replace") as f:
    print(" ".join(bench_flags(f.read())))
  return 0


if __name__ == "__main__":
  sys.exit(main())
