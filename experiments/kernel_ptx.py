"""Which matrix instructions do lowbit's GPU kernels compile to? (GPU only.)

    python experiments/kernel_ptx.py            # K = N = 8192, M in 16, 4096

Compiles each kernel for a few shapes and tile orientations with XLA's dump
switched on, then counts the PTX matrix instructions in every dumped module:
``wgmma`` (Hopper's warpgroup MMA, the fast path for M >= 64), ``mma.sync``
(the Ampere-style MMA) and ``fma`` (vector units). A kernel meant for tensor
cores that shows only ``mma.sync`` on an H100/H200 is on the slow path.
"""

from __future__ import annotations

import collections
import os
import pathlib
import re
import sys
import tempfile

DUMP = pathlib.Path(tempfile.mkdtemp(prefix="lowbit_ptx_"))
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={DUMP}").strip()

import jax  # noqa: E402  (XLA_FLAGS must be set first)
import jax.numpy as jnp  # noqa: E402
from lowbit.kernels import BlockSizes  # noqa: E402

from lowbit import kernels as K  # noqa: E402
from lowbit.quant import QuantSpec, quantize  # noqa: E402

PATTERNS = {"wgmma": r"\bwgmma\.mma_async", "mma.sync": r"\bmma\.sync", "fma": r"\bfma\.rn"}


def count(text: str) -> dict[str, int]:
  return {k: len(re.findall(p, text)) for k, p in PATTERNS.items()}


def main() -> int:
  k = n = 8192
  w = jax.random.normal(jax.random.key(0), (k, n), jnp.float32)
  w8 = quantize(w, QuantSpec(bits=8, channel_axes=(1,), scale_dtype=jnp.bfloat16))
  w4 = quantize(w, QuantSpec(bits=4, channel_axes=(1,), group_size=128, pack=True,
                             scale_dtype=jnp.bfloat16))
  del w
  cases = []
  for m, tiles in ((16, [BlockSizes(bm=16, bn=64, bk=128, split_k=8),
                         BlockSizes(bm=16, bn=128, bk=128, split_k=4, orient="wx")]),
                   (4096, [BlockSizes(bm=128, bn=128, bk=128, num_warps=8),
                           BlockSizes(bm=128, bn=128, bk=128, num_warps=8, orient="wx"),
                           BlockSizes(bm=128, bn=128, bk=128, num_warps=8, k_major=True)])):
    x = jax.random.normal(jax.random.key(m), (m, k), jnp.float32)
    xb, xq = x.astype(jnp.bfloat16), quantize(x, QuantSpec(bits=8, channel_axes=(0,)))
    for bs in tiles:
      for name, fn, a, b in (("w8a8", K.w8a8_matmul, xq, w8), ("w4a16", K.w4a16_matmul, xb, w4),
                             ("w4a8", K.w4a8_matmul, xq, w4)):
        cases.append((f"{name} m={m} {bs.orient}{' k_major' if bs.k_major else ''}",
                      fn, a, b, bs))
  print("| kernel | " + " | ".join(PATTERNS) + " |")
  print("|---|" + "---|" * len(PATTERNS))
  for label, fn, a, b, bs in cases:
    before = set(DUMP.glob("*.ptx"))
    try:
      jax.jit(lambda a, b, fn=fn, bs=bs: fn(a, b, block_sizes=bs)).lower(a, b).compile()
    except Exception as e:  # noqa: BLE001 - report and go on
      print(f"| {label} | compile failed: {type(e).__name__}: {str(e)[:120]} |")
      continue
    new = set(DUMP.glob("*.ptx")) - before
    tot = collections.Counter()
    for p in new:
      tot.update(count(p.read_text(errors="replace")))
    print(f"| {label} | " + " | ".join(str(tot[k]) for k in PATTERNS) + " |"
          + ("" if new else " (no PTX dumped)"), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
