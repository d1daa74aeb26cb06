"""Int4 vs int8 post-training quantization on real pretrained weights, with Qwix side by side.

    pip install -e ".[eval,peers]"                         # gguf, tokenizers, safetensors; qwix
    python experiments/pretrained.py --full-float          # both models, ~25 min on 2 CPU cores
    python experiments/pretrained.py --only minilm         # ~1 min
    python experiments/pretrained.py --windows 4 --no-qwix # a quick look

* SmolLM2-135M-Instruct (GGUF Q4_1, imported with lowbit.models.gguf_llama):
  perplexity on held-out Shakespeare (the last 10% of tiny-shakespeare by
  characters, the same 512-token windows for every row), KL to the float
  model and top-1 agreement, for weight-only and W8A8 / W4A8 schemes, RTN vs
  MSE clipping vs GPTQ, and the same model quantized by Qwix where both
  libraries have the granularity. The embedding (tied with the output head)
  stays float in every row of both libraries.
* all-MiniLM-L6-v2 (safetensors, lowbit.models.bert): cosine between float and
  quantized sentence embeddings of 256 Shakespeare sentences, and the drift of
  their pairwise similarities.

Writes ``docs/results/data/pretrained.results.json`` and ``docs/results/pretrained.md``
(``--out`` changes the folder). Weights come from pip wheels (lowbit.models.packaged),
checked by sha256; nothing is read from a model hub.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import lowbit
from lowbit import ablation, ptq
from lowbit.data import TINY_SHAKESPEARE_SHA256, sha256
from lowbit.harness import environment, write_json
from lowbit.models import bert, gguf_llama
from lowbit.models.packaged import PACKAGED, fetch
from lowbit.nn import convert, quantize_model
from lowbit.policy import A8, PrecisionPolicy, PrecisionRule
from lowbit.quant import QuantSpec

ROOT = pathlib.Path(__file__).resolve().parents[1]
WINDOW = 512
# DATA.md's first-seen SmolLM2 numbers (weight-only RTN on the linear layers, last 10% of
# tiny-shakespeare, 512-token windows): anchors, not targets.
ANCHORS = {"float": 34.43, "w8a16 per-channel": 34.67, "w4a16 per-channel": 66.81,
           "w4a16 g64": 51.04, "w4a16 g32": 45.08, "w4a16 g32 asym-min fp16": 34.43}


def W(bits: int, group: int | None = None, symmetric: bool = True, calibration: str = "absmax",
      **kw) -> QuantSpec:
  """The ablation harness's weight spec (:func:`lowbit.ablation.W`), with ragged groups:
  SmolLM2's width 576 is not a multiple of 128 (four groups of 128 and one of 64)."""
  spec = ablation.W(bits, group or "channel", symmetric, calibration)
  return dataclasses.replace(spec, ragged=group is not None, **kw)


Q4_1 = W(4, 32, symmetric=False, zero_point_form="min", scale_dtype=jnp.float16)


@dataclasses.dataclass(frozen=True)
class Row:
  name: str
  weight: QuantSpec | None = None
  act: QuantSpec | None = None
  method: str = "rtn"            # rtn | gptq
  policy: PrecisionPolicy | None = None

  def make_policy(self, layer_regex: str) -> PrecisionPolicy:
    if self.policy is not None:
      return self.policy
    return PrecisionPolicy((PrecisionRule(layer_regex, self.weight, self.act),))


ROWS = [
    Row("w8a16 per-channel", W(8)),
    Row("w8a8 per-channel, per-token", W(8), A8),
    Row("w4a16 per-channel", W(4)),
    Row("w4a16 g128", W(4, 128)),
    Row("w4a16 g64", W(4, 64)),
    Row("w4a16 g32", W(4, 32)),
    Row("w4a16 g128 asym", W(4, 128, symmetric=False)),
    Row("w4a16 g64 asym", W(4, 64, symmetric=False)),
    Row("w4a16 g32 asym", W(4, 32, symmetric=False)),
    Row("w4a16 g32 asym-min fp16", Q4_1),
    Row("w4a16 g128 mse", W(4, 128, calibration="mse")),
    Row("w4a16 g32 mse", W(4, 32, calibration="mse")),
    Row("w4a16 g128 gptq", W(4, 128), method="gptq"),
    Row("w4a16 g32 gptq", W(4, 32), method="gptq"),
    Row("w4a8 per-channel, per-token", W(4), A8),
    Row("w4a8 g128, per-token", W(4, 128), A8),
    # integer group scales under a channel scale (QServe's progressive group quantization):
    # what the W4A8 kernels sum over all of K in int32
    Row("w4a16 g128 int-scales", W(4, 128, group_scales="int")),
    Row("w4a16 g32 int-scales", W(4, 32, group_scales="int")),
    Row("w4a8 g128 int-scales, per-token", W(4, 128, group_scales="int"), A8),
    Row("mixed: w8a8 attn, w4a16 g128 mlp", policy=PrecisionPolicy((
        PrecisionRule(r".*attn/.*", W(8), A8), PrecisionRule(r".*mlp/.*", W(4, 128))))),
]
QWIX_ROWS = {  # name -> QuantizationRule keywords; same layers (every linear in the blocks)
    "qwix w8a16 per-channel": dict(weight_qtype="int8"),
    "qwix w8a8 per-channel, per-token": dict(weight_qtype="int8", act_qtype="int8"),
    "qwix w4a16 per-channel": dict(weight_qtype="int4"),
    "qwix w4a16 g128": dict(weight_qtype="int4", tile_size=128),
    "qwix w4a16 g128 asym": dict(weight_qtype="int4", tile_size=128,
                                 weight_calibration_method="minmax"),
    "qwix w4a16 g32": dict(weight_qtype="int4", tile_size=32),
    "qwix w4a16 g32 asym": dict(weight_qtype="int4", tile_size=32, weight_calibration_method="minmax"),
}
# lowbit row comparable to each Qwix row
PAIRS = {"qwix w8a16 per-channel": "w8a16 per-channel",
         "qwix w8a8 per-channel, per-token": "w8a8 per-channel, per-token",
         "qwix w4a16 per-channel": "w4a16 per-channel", "qwix w4a16 g128": "w4a16 g128",
         "qwix w4a16 g128 asym": "w4a16 g128 asym", "qwix w4a16 g32": "w4a16 g32",
         "qwix w4a16 g32 asym": "w4a16 g32 asym"}


def log(*a):
  print(*a, flush=True)


def device_bytes(tree) -> int:
  """Bytes the arrays of ``tree`` occupy on their device (int4 unpacked where XLA unpacks it)."""
  return sum(x.addressable_data(0).on_device_size_in_bytes()
             for x in jax.tree_util.tree_leaves(tree) if isinstance(x, jax.Array))


def linear_bytes(model: nnx.Module) -> int:
  """Device bytes of everything under ``layers/`` except the norms (the linear weights)."""
  state = nnx.state(model)
  total = 0
  for path, var in nnx.to_flat_state(state):
    p = "/".join(str(k) for k in path)
    if p.startswith("layers/") and "norm" not in p and not p.endswith("/bias"):
      total += device_bytes(var.get_value() if hasattr(var, "get_value") else var)
  return total


# --------------------------------------------------------------------------- SmolLM2


def windows(ids: np.ndarray, n: int | None) -> np.ndarray:
  k = len(ids) // WINDOW
  w = ids[: k * WINDOW].reshape(k, WINDOW)
  return w if n is None else w[:n]


@nnx.jit
def _logprobs(model, x):
  return jax.nn.log_softmax(model(x[:, :-1]).astype(jnp.float32), -1)


@jax.jit
def _metrics(lq, lp, y):
  nll = -jnp.take_along_axis(lq, y[..., None], -1)[..., 0]
  kl = (jnp.exp(lp) * (lp - lq)).sum(-1)
  top1 = lq.argmax(-1) == lp.argmax(-1)
  return nll.sum(), kl.sum(), top1.sum()


def eval_lm(model, wins: np.ndarray, ref: list[np.ndarray] | None, batch: int = 4,
            keep: bool = False):
  """Perplexity (and KL / top-1 vs ``ref`` log-probs) over windows; returns (metrics, logprobs)."""
  tot = np.zeros(3)
  kept = []
  for j, i in enumerate(range(0, len(wins), batch)):
    x = jnp.asarray(wins[i:i + batch])
    lq = _logprobs(model, x)
    lp = lq if ref is None else jnp.asarray(ref[j])
    tot += np.array([float(v) for v in _metrics(lq, lp, x[:, 1:])])
    if keep:
      kept.append(np.asarray(lq))
  n = wins.shape[0] * (WINDOW - 1)
  m = dict(nll=tot[0] / n, ppl=float(np.exp(tot[0] / n)), kl=tot[1] / n, top1=tot[2] / n, tokens=n)
  return m, kept


def smollm2(args) -> dict:
  t0 = time.time()
  files = fetch("smollm2-135m-instruct")
  g = gguf_llama.load_gguf(files["model"], max_len=WINDOW)
  text_path = pathlib.Path(args.data)
  if sha256(text_path) != TINY_SHAKESPEARE_SHA256:
    raise SystemExit(f"{text_path}: not tiny-shakespeare (sha256 differs).")
  text = text_path.read_text()
  cut = int(len(text) * 0.9)
  held = np.array(g.tokenizer.encode(text[cut:]).ids, np.int32)
  train = np.array(g.tokenizer.encode(text[:cut]).ids, np.int32)
  eval_wins = windows(held, args.windows)
  all_train = windows(train, None)
  calib = all_train[np.linspace(0, len(all_train) - 1, args.calib_windows).astype(int)]
  log(f"smollm2: loaded in {time.time() - t0:.1f}s; eval {eval_wins.shape}, calib {calib.shape}")

  out = dict(model="SmolLM2-135M-Instruct", source=PACKAGED["smollm2-135m-instruct"].requirement,
             eval=dict(windows=int(eval_wins.shape[0]), window=WINDOW,
                       tokens=int(eval_wins.shape[0] * (WINDOW - 1)),
                       text="tiny-shakespeare, last 10% by characters"),
             calibration=dict(windows=int(calib.shape[0]), text="tiny-shakespeare, first 90%"),
             rows=[])
  t = time.time()
  float_m, ref = eval_lm(g.model, eval_wins, None, keep=True)
  float_bytes = linear_bytes(g.model)
  total_float = device_bytes(nnx.state(g.model))

  def add(name, m, model, t_start, library):
    """Record (and print) one row; ``model``'s linear weights give its bytes."""
    nbytes = linear_bytes(model)
    out["rows"].append(dict(name=name, **m, delta_ppl=m["ppl"] - float_m["ppl"],
                            linear_bytes=nbytes, total_bytes=total_float - float_bytes + nbytes,
                            seconds=time.time() - t_start, library=library))
    log(f"{name:40s} ppl {m['ppl']:8.3f}  kl {m['kl']:.4f}  top1 {m['top1']:.4f}  "
        f"{nbytes / 2**20:.1f} MiB  ({time.time() - t_start:.0f}s)")

  add("float", float_m, g.model, t, "-")
  if args.full_float:
    t = time.time()
    full, _ = eval_lm(g.model, windows(held, None), None)
    out["float_all_windows"] = dict(ppl=full["ppl"], tokens=full["tokens"], seconds=time.time() - t)
    log(f"float ppl over all {full['tokens']} held-out tokens: {full['ppl']:.3f}")

  t = time.time()
  own = gguf_llama.converted_from_gguf(g)
  m, _ = eval_lm(own, eval_wins, ref)
  add("file's own Q4_1 (converted, no requantization)", m, own, t, "lowbit")
  del own

  regex = r"layers/.*"
  stats = None
  for row in ROWS:
    if args.rows and not re.search(args.rows, row.name):
      continue
    t = time.time()
    q = quantize_model(g.model, row.make_policy(regex))
    if row.method == "gptq":
      if stats is None:
        stats = ptq.collect(q, [jnp.asarray(calib[i:i + 4]) for i in range(0, len(calib), 4)],
                            hessian=True, progress=False)
      ptq.gptq(q, stats, act_order=True, progress=False)
    conv = convert(q)
    del q
    m, _ = eval_lm(conv, eval_wins, ref)
    add(row.name, m, conv, t, "lowbit")
    del conv

  if not args.no_qwix:
    try:
      import qwix
      out["qwix_version"] = qwix.__version__
    except ImportError:
      log("qwix is not installed (pip install qwix): its rows are left out")
      qwix = None
    if qwix is not None:
      sample = jnp.asarray(eval_wins[:1, :-1])
      for name, kw in QWIX_ROWS.items():
        if args.rows and not re.search(args.rows, name):
          continue
        t = time.time()
        kw = {k: (jnp.dtype(v) if k.endswith("qtype") else v) for k, v in kw.items()}
        rule = qwix.QuantizationRule(module_path=regex, **kw)
        try:
          qm = qwix.quantize_model(nnx.clone(g.model), qwix.PtqProvider([rule]), sample)
        except Exception as e:  # noqa: BLE001 - recorded as the row's result
          out["rows"].append(dict(name=name, library="qwix", error=f"{type(e).__name__}: {e}"))
          log(f"{name:40s} fails: {type(e).__name__}: {e}")
          continue
        m, _ = eval_lm(qm, eval_wins, ref)
        add(name, m, qm, t, "qwix")
        del qm
  out["seconds"] = time.time() - t0
  return out


# --------------------------------------------------------------------------- MiniLM


def shakespeare_sentences(text: str, n: int, offset: int = 0) -> list[str]:
  """``n`` sentences of 5..40 words, evenly spaced through the text (``offset`` shifts the pick)."""
  flat = re.sub(r"\s+", " ", text)
  cands = [s.strip() for s in re.split(r"(?<=[.!?])\s+", flat)]
  cands = list(dict.fromkeys(s for s in cands if 5 <= len(s.split()) <= 40 and ":" not in s))
  idx = np.linspace(0, len(cands) - 1, 2 * n).astype(int)[offset::2][:n]
  return [cands[i] for i in idx]


def minilm(args) -> dict:
  t0 = time.time()
  f = fetch("all-minilm-l6-v2")
  m = bert.load_bert(f["model"], f["config"], f["tokenizer"])
  text = pathlib.Path(args.data).read_text()
  sents = shakespeare_sentences(text, args.sentences)
  calib = shakespeare_sentences(text, args.sentences, offset=1)
  e_float = bert.embed_sentences(m.model, m.tokenizer, sents)
  s_float = e_float @ e_float.T
  nn_float = np.argsort(-(s_float - 2 * np.eye(len(sents))), axis=1)[:, 0]
  out = dict(model="all-MiniLM-L6-v2", source=PACKAGED["all-minilm-l6-v2"].requirement,
             sentences=len(sents), calibration_sentences=len(calib), rows=[],
             example_sentences=sents[:3])
  float_bytes = linear_bytes(m.model)
  stats = None
  for row in ROWS:
    if row.policy is not None or (args.rows and not re.search(args.rows, row.name)):
      continue
    t = time.time()
    q = quantize_model(m.model, row.make_policy(r"layers/.*"))
    if row.method == "gptq":
      if stats is None:
        batches = [tuple(jnp.asarray(a) for a in bert.tokenize(m.tokenizer, calib[i:i + 64]))
                   for i in range(0, len(calib), 64)]
        stats = ptq.collect(q, batches, lambda mod, b: mod(b[0], b[1]), hessian=True, progress=False)
      ptq.gptq(q, stats, act_order=True, progress=False)
    conv = convert(q)
    e = bert.embed_sentences(conv, m.tokenizer, sents)
    cos = (e * e_float).sum(-1)
    s = e @ e.T
    drift = np.abs(s - s_float)[np.triu_indices(len(sents), 1)]
    nn_q = np.argsort(-(s - 2 * np.eye(len(sents))), axis=1)[:, 0]
    out["rows"].append(dict(name=row.name, cos_mean=float(cos.mean()), cos_min=float(cos.min()),
                            sim_drift_mean=float(drift.mean()), sim_drift_max=float(drift.max()),
                            nn_agreement=float((nn_q == nn_float).mean()),
                            linear_bytes=linear_bytes(conv), float_linear_bytes=float_bytes,
                            seconds=time.time() - t))
    r = out["rows"][-1]
    log(f"minilm {row.name:32s} cos mean {r['cos_mean']:.5f} min {r['cos_min']:.5f}  "
        f"drift {r['sim_drift_mean']:.5f}/{r['sim_drift_max']:.4f}  nn {r['nn_agreement']:.3f}")
  out["seconds"] = time.time() - t0
  return out


# --------------------------------------------------------------------------- report


def _row(results, name):
  return next((r for r in results["rows"] if r["name"] == name), None)


def checks(res: dict) -> list[tuple[str, bool | None, str]]:
  """The issue's targets, evaluated on the measured rows: (claim, passed, numbers)."""
  out = []
  s = res.get("smollm2")
  if s:
    f = _row(s, "float")
    r = lambda n: _row(s, n)  # noqa: E731
    w8 = r("w8a16 per-channel")
    if w8:
      d = w8["ppl"] / f["ppl"] - 1
      out.append(("SmolLM2 W8A16 per-channel perplexity within 1% of float", d <= 0.01,
                  f"{w8['ppl']:.3f} vs {f['ppl']:.3f} ({100 * d:+.2f}%)"))
    rtn, mse, gp = r("w4a16 g32"), r("w4a16 g32 mse"), r("w4a16 g32 gptq")
    if rtn and (mse or gp):
      best = min(x["ppl"] for x in (mse, gp) if x)
      out.append(("SmolLM2 W4A16 g32 symmetric: MSE clipping or GPTQ beats RTN absmax",
                  best < rtn["ppl"], f"RTN {rtn['ppl']:.3f}, MSE {mse['ppl'] if mse else float('nan'):.3f}, "
                  f"GPTQ {gp['ppl'] if gp else float('nan'):.3f}"))
    ident = r("w4a16 g32 asym-min fp16")
    if ident:
      out.append(("SmolLM2 asymmetric g32 (Q4_1's own format) reproduces the float row exactly",
                  ident["ppl"] == f["ppl"] and ident["kl"] == 0.0 and ident["top1"] == 1.0,
                  f"ppl {ident['ppl']:.6f} vs {f['ppl']:.6f}, KL {ident['kl']:.2e}, "
                  f"top-1 {ident['top1']:.4f}"))
    ok_rows = [x for x in s["rows"] if "error" not in x]
    q4 = [x for x in ok_rows if x["library"] == "qwix" and "w4a16" in x["name"]]
    q128 = [x for x in q4 if "g128" in x["name"]]
    l128 = [x for x in ok_rows if x["library"] == "lowbit" and x["name"].startswith("w4a16 g128")]
    failed = [x for x in s["rows"] if "error" in x and "g128" in x["name"]]
    if l128 and (q128 or q4):
      bl = min(l128, key=lambda x: x["ppl"])
      if q128:
        bq = min(q128, key=lambda x: x["ppl"])
        claim = "lowbit's best int4 g128 PTQ perplexity beats Qwix's best g128"
      else:
        bq = min(q4, key=lambda x: x["ppl"])
        claim = ("Qwix cannot run g128 on this model (576 is not a multiple of 128: "
                 f"{failed[0]['error'][:60]}); lowbit's best g128 vs Qwix's best int4 at any granularity")
      out.append((claim, bl["ppl"] < bq["ppl"],
                  f"lowbit {bl['name']} {bl['ppl']:.3f} vs {bq['name']} {bq['ppl']:.3f}"))
    pairs = [(r(a), r(b)) for a, b in (
        ("w4a16 g128", "w4a16 g128 int-scales"), ("w4a16 g32", "w4a16 g32 int-scales"),
        ("w4a8 g128, per-token", "w4a8 g128 int-scales, per-token"))]
    pairs = [(a, b) for a, b in pairs if a and b]
    if pairs:
      out.append(("SmolLM2 int4: integer group scales under a channel scale (QServe's "
                  "progressive format, what W4A8 sums in int32) within 2% perplexity of "
                  "float group scales",
                  all(b["ppl"] <= 1.02 * a["ppl"] for a, b in pairs),
                  ", ".join(f"{b['name']} {b['ppl']:.3f} vs {a['ppl']:.3f} "
                            f"({100 * (b['ppl'] / a['ppl'] - 1):+.1f}%)" for a, b in pairs)))
    for g in ("g128", "g32", "per-channel"):
      lw, qw = r(f"w4a16 {g}"), r(f"qwix w4a16 {g}")
      if lw and qw and "error" not in qw:
        out.append((f"lowbit's converted int4 {g} model holds fewer bytes than Qwix's",
                    lw["linear_bytes"] < qw["linear_bytes"],
                    f"linear weights {lw['linear_bytes'] / 2**20:.1f} MiB vs "
                    f"{qw['linear_bytes'] / 2**20:.1f} MiB on device"))
  mm = res.get("minilm")
  if mm:
    w8 = _row(mm, "w8a16 per-channel")
    if w8:
      out.append(("MiniLM int8 per-channel mean cosine >= 0.999", w8["cos_mean"] >= 0.999,
                  f"{w8['cos_mean']:.5f} (min {w8['cos_min']:.5f})"))
  return out


def write_report(res: dict, path: pathlib.Path) -> None:
  L = ["# Int4 vs int8 PTQ on real pretrained weights", "",
       "Generated by `python experiments/pretrained.py` from "
       "`docs/results/data/pretrained.results.json`; do not edit by hand.", "",
       f"Run: {res['date']}, {res['environment'].get('platform', '')}, jax "
       f"{res['environment'].get('jax', '')}, lowbit {lowbit.__version__}"
       + (f", qwix {res['smollm2'].get('qwix_version')}" if res.get("smollm2", {}).get("qwix_version")
          else "") + ".", ""]
  L += ["## Targets", "", "| claim | result | numbers |", "|---|---|---|"]
  for claim, ok, nums in checks(res):
    L.append(f"| {claim} | {'PASS' if ok else 'FAIL'} | {nums} |")
  s = res.get("smollm2")
  if s:
    e = s["eval"]
    L += ["", "## SmolLM2-135M-Instruct: perplexity on held-out Shakespeare", "",
          f"{e['tokens']} predicted tokens ({e['windows']} windows of {e['window']} tokens, {e['text']}); "
          f"GPTQ calibrated on {s['calibration']['windows']} windows of the first 90%. "
          "The float model is the GGUF file dequantized (its weights are Q4_1). "
          "Every row quantizes the 210 linear layers of the 30 blocks; the tied embedding / "
          "output head stays float (f32, 108 MiB) in every row of both libraries. "
          "`linear MiB` is the device memory of those 210 weights as each library holds them "
          "(Qwix keeps `jnp.int4` at one byte per value on CPU). KL is float || quantized, "
          "per token; top-1 is agreement with float's argmax.", ""]
    if "float_all_windows" in s:
      fa = s["float_all_windows"]
      L += [f"Float perplexity over all {fa['tokens']} held-out tokens: **{fa['ppl']:.2f}** "
            f"(DATA.md's first-seen number: {ANCHORS['float']}).", ""]
    L += ["| scheme | library | ppl | vs float | KL | top-1 | linear MiB | DATA.md anchor ratio |",
          "|---|---|---|---|---|---|---|---|"]
    f = _row(s, "float")
    for r in s["rows"]:
      if "error" in r:
        L.append(f"| {r['name']} | {r['library']} | fails: `{r['error'][:90]}` | | | | | |")
        continue
      anchor = ANCHORS.get(r["name"])
      ratio = f"{anchor / ANCHORS['float']:.3f} (ours {r['ppl'] / f['ppl']:.3f})" if anchor else ""
      L.append(f"| {r['name']} | {r['library']} | {r['ppl']:.3f} | {100 * (r['ppl'] / f['ppl'] - 1):+.2f}% "
               f"| {r['kl']:.4f} | {r['top1']:.4f} | {r['linear_bytes'] / 2**20:.1f} | {ratio} |")
  m = res.get("minilm")
  if m:
    L += ["", "## all-MiniLM-L6-v2: sentence embeddings", "",
          f"{m['sentences']} sentences from tiny-shakespeare (5-40 words, evenly spaced); GPTQ "
          f"calibrated on {m['calibration_sentences']} other sentences. cos: cosine between the "
          "float and the quantized embedding of the same sentence; drift: |change| of the "
          "pairwise cosine similarities; nn: the nearest neighbour of each sentence unchanged. "
          "The embeddings stay float.", "",
          "| scheme | cos mean | cos min | drift mean | drift max | nn agreement | linear MiB |",
          "|---|---|---|---|---|---|---|"]
    for r in m["rows"]:
      L.append(f"| {r['name']} | {r['cos_mean']:.5f} | {r['cos_min']:.5f} | {r['sim_drift_mean']:.5f} "
               f"| {r['sim_drift_max']:.4f} | {r['nn_agreement']:.3f} | {r['linear_bytes'] / 2**20:.2f} |")
    if m["rows"]:
      L.append(f"\nFloat linear weights: {m['rows'][0]['float_linear_bytes'] / 2**20:.2f} MiB.")
  path.write_text("\n".join(L) + "\n")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--only", choices=["smollm2", "minilm"])
  p.add_argument("--windows", type=int, default=16, help="held-out 512-token windows per row")
  p.add_argument("--calib-windows", type=int, default=16)
  p.add_argument("--sentences", type=int, default=256)
  p.add_argument("--full-float", action="store_true", help="also the float ppl over all windows")
  p.add_argument("--no-qwix", action="store_true")
  p.add_argument("--rows", help="regex: only rows whose name matches")
  p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"))
  p.add_argument("--out", default=str(ROOT / "docs" / "results"))
  args = p.parse_args(argv)
  out = pathlib.Path(args.out)
  (out / "data").mkdir(parents=True, exist_ok=True)
  res = dict(date=time.strftime("%Y-%m-%d"), environment=environment(), args=vars(args))
  if args.only in (None, "minilm"):
    res["minilm"] = minilm(args)
  if args.only in (None, "smollm2"):
    res["smollm2"] = smollm2(args)
  write_json(out / "data" / "pretrained.results.json", res)
  write_report(res, out / "pretrained.md")
  for claim, ok, nums in checks(res):
    log(f"{'PASS' if ok else 'FAIL'}  {claim}: {nums}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
