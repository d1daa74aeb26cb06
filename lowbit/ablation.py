"""The int4 vs int8 ablation on a char-level GPT trained here.

``lowbit ablate --config configs/shakespeare_quick.py`` trains nanoGPT's
"baby GPT" (or reuses a float checkpoint), then evaluates every grid point of
the config against the same float model on the same validation and test
tokens, and writes ``config.json``, ``metrics.jsonl``, ``results.json`` and the
float checkpoint into a new run directory. ``lowbit report`` turns
``results.json`` files into tables and plots.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import lowbit
from lowbit import ckpt, data, harness, ptq
from lowbit.nn import Transformer, TransformerConfig
from lowbit.policy import PrecisionPolicy, PrecisionRule
from lowbit.qat import make_optimizers, make_train_step
from lowbit.quant import QuantSpec

try:
  from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
  def tqdm(x, **_):
    return x


@dataclasses.dataclass(frozen=True)
class AblationConfig:
  """Everything one ablation run depends on (see ``configs/shakespeare_*.py``)."""

  name: str = "shakespeare_char"
  data: str = "shakespeare"          # "shakespeare" (complete works, split by play) or a file path
  data_sha256: str | None = None     # checked when data is a file path
  # nanoGPT's CPU baby GPT
  n_layers: int = 4
  n_heads: int = 4
  d_model: int = 128
  context: int = 64
  batch_size: int = 12
  steps: int = 2000
  lr: float = 1e-3
  min_lr: float = 1e-4
  warmup: int = 100
  weight_decay: float = 0.1
  beta2: float = 0.99
  grad_clip: float = 1.0
  seed: int = 0
  # evaluation: the same tokens for every row
  eval_tokens: int = 65536
  eval_batch: int = 128
  # PTQ / QAT
  calib_batches: int = 8
  calib_batch_size: int = 32
  qat_steps: int = 200
  qat_lr: float = 1e-4
  qat_quant_lr: float = 1e-3
  grid: tuple[str, ...] = ("w8a16", "w4a16-channel")
  sensitivity: bool = False
  search_bits: tuple[float, ...] = (4.5, 5.0, 6.0)
  sensitivity_eval_tokens: int = 16384
  # I/O
  runs_root: str = "runs"
  workdir: str | None = None
  float_ckpt: str | None = None


# --------------------------------------------------------------------------- grid

def W(bits: int, gran: str | int = "channel", symmetric: bool = True,
      calibration: str = "absmax") -> QuantSpec:
  """A weight spec for a ``[K, N]`` kernel: ``gran`` is 'tensor', 'channel' or a group size."""
  channel = () if gran == "tensor" else (1,)
  group = gran if isinstance(gran, int) else None
  return QuantSpec(bits=bits, symmetric=symmetric, channel_axes=channel, group_size=group,
                   calibration=calibration, pack=bits <= 4, percentile=99.9,
                   scale_dtype=jnp.bfloat16 if group else jnp.float32)


A8_TOKEN = QuantSpec(bits=8, channel_axes=(0,))
A8_TENSOR = QuantSpec(bits=8)


@dataclasses.dataclass(frozen=True)
class Point:
  """One grid point: a policy and a method (rtn, gptq, smoothquant, qat, qat_fixed)."""

  name: str
  weight: QuantSpec | None
  act: QuantSpec | None
  method: str = "rtn"
  learn: str | None = None
  rules: tuple[PrecisionRule, ...] | None = None

  def policy(self) -> PrecisionPolicy:
    """The point's policy: its ``rules``, else one rule ``.*`` with its weight and act specs."""
    rules = self.rules or (PrecisionRule(".*", self.weight, self.act),)
    return PrecisionPolicy(rules, allow_unused=True)


def _points() -> dict[str, Point]:
  P = {}

  def add(name, weight, act=None, **kw):
    P[name] = Point(name, weight, act, **kw)

  add("w8a16", W(8))
  add("w8a16-tensor", W(8, "tensor"))
  add("w8a16-mse", W(8, calibration="mse"))
  add("w8a8", W(8), A8_TOKEN)
  add("w8a8-tensor", W(8), A8_TENSOR)
  add("w8a8-tensor-smoothquant", W(8), A8_TENSOR, method="smoothquant")
  for g in ("tensor", "channel", 128, 64, 32):
    add(f"w4a16-{g if isinstance(g, str) else f'g{g}'}", W(4, g))
  add("w4a16-channel-asym", W(4, symmetric=False))
  add("w4a16-g32-asym", W(4, 32, symmetric=False))
  add("w4a16-channel-pct", W(4, calibration="percentile"))
  add("w4a16-channel-mse", W(4, calibration="mse"))
  add("w4a16-g32-mse", W(4, 32, calibration="mse"))
  add("w4a16-channel-gptq", W(4), method="gptq")
  add("w4a16-channel-gptq-mse", W(4, calibration="mse"), method="gptq")
  add("w4a8", W(4), A8_TOKEN)
  add("w4a8-g128", W(4, 128), A8_TOKEN)
  add("w4a16-channel-qat-lsq", W(4), method="qat", learn="scale")
  add("w4a16-channel-qat-lwc", W(4), method="qat", learn="clip")
  add("w4a16-channel-qat-fixed", W(4), method="qat", learn=None)
  add("w8a16-qat-lsq", W(8), method="qat", learn="scale")
  for b in (3, 2):
    add(f"w{b}a16-channel", W(b))
    add(f"w{b}a16-g32", W(b, 32))
    add(f"w{b}a16-g32-mse", W(b, 32, calibration="mse"))
  add("mixed", None, None, rules=(
      PrecisionRule(r".*attn/.*", W(8), A8_TOKEN),
      PrecisionRule(r".*mlp/.*", W(4, 128))))
  return P


POINTS = _points()


# --------------------------------------------------------------------------- data and model

def load_corpus(cfg: AblationConfig) -> data.CharCorpus:
  """The run's corpus: the complete Shakespeare (downloaded, checksummed) or ``cfg.data``'s file."""
  if cfg.data == "shakespeare":
    return data.shakespeare_complete()
  return data.text_file(cfg.data, cfg.data_sha256)


def model_config(cfg: AblationConfig, vocab: int) -> TransformerConfig:
  """The float model the run trains, sized by ``cfg`` (nanoGPT's choices, below)."""
  # nanoGPT: LayerNorm, exact GELU, learned positions, tied embeddings, no biases
  return TransformerConfig.gpt2(vocab_size=vocab, d_model=cfg.d_model, n_layers=cfg.n_layers,
                                n_heads=cfg.n_heads, max_len=cfg.context, use_bias=False,
                                tie_embeddings=True)


def eval_windows(tokens: np.ndarray, n_tokens: int, context: int) -> np.ndarray:
  """Non-overlapping windows of ``context + 1`` tokens from the start: ``[W, context+1]``."""
  w = min(n_tokens, len(tokens) - 1) // context
  return np.stack([tokens[i * context: i * context + context + 1] for i in range(w)])


def batches_of(windows: np.ndarray, size: int) -> Iterator[tuple[jax.Array, jax.Array]]:
  """``(inputs, targets)`` of ``size`` windows at a time: ``windows[:, :-1]``, ``windows[:, 1:]``."""
  for i in range(0, len(windows), size):
    w = jnp.asarray(windows[i:i + size])
    yield w[:, :-1], w[:, 1:]


def train_batch(tokens: np.ndarray, key: jax.Array, batch: int,
                context: int) -> tuple[jax.Array, jax.Array]:
  """``batch`` random windows of ``context + 1`` tokens: inputs and next-token targets, int32
  ``[batch, context]`` each."""
  ix = jax.random.randint(key, (batch,), 0, len(tokens) - context - 1)
  idx = ix[:, None] + jnp.arange(context + 1)[None]
  w = jnp.asarray(tokens)[idx]
  return w[:, :-1], w[:, 1:]


def lm_loss(model: nnx.Module, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
  """Mean next-token cross-entropy, ``-mean(log softmax(model(x))[y])`` (nats per token)."""
  x, y = batch
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def train_float(cfg: AblationConfig, corpus: data.CharCorpus, log: harness.MetricsLog,
                quiet: bool) -> tuple[nnx.Module, float]:
  """Train the float model (AdamW, warmup then cosine decay, clipped gradients), logging
  each step's loss; returns the model and the training time in seconds."""
  model = Transformer(model_config(cfg, corpus.vocab_size), rngs=nnx.Rngs(cfg.seed))
  sched = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr)
  tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                   optax.adamw(sched, b1=0.9, b2=cfg.beta2, weight_decay=cfg.weight_decay))
  w, _ = make_optimizers(model, tx)
  step = make_train_step(lm_loss)
  key = jax.random.key(cfg.seed + 1)
  t0 = time.perf_counter()
  for i in tqdm(range(cfg.steps), desc="train float", disable=quiet):
    key, sub = jax.random.split(key)
    loss = step(model, w, None, train_batch(corpus.train, sub, cfg.batch_size, cfg.context))
    log.write(phase="float", step=i, loss=float(loss), lr=float(sched(i)))
  elapsed = time.perf_counter() - t0
  log.write(phase="float_done", steps=cfg.steps, seconds=elapsed, steps_per_s=cfg.steps / elapsed)
  return model, elapsed


# --------------------------------------------------------------------------- one grid point

def quantize_point(point: Point, fmodel: nnx.Module, cfg: AblationConfig, corpus: data.CharCorpus,
                   log: harness.MetricsLog, quiet: bool,
                   val: np.ndarray) -> tuple[nnx.Module, dict]:
  """PTQ (and QAT) for one point; returns the fake-quant model and extra metrics."""
  policy = point.policy()
  extra: dict[str, Any] = {}
  learn = point.learn if point.method == "qat" else None
  qm = lowbit.quantize_model(fmodel, policy, learn=learn)
  calib = [train_batch(corpus.train, jax.random.key(10_000 + i), cfg.calib_batch_size,
                       cfg.context)[0] for i in range(cfg.calib_batches)]
  static_act = any(r.act is not None and not r.act.channel_axes
                   for r in policy.rules if not r.keep_float)
  if static_act or point.method in ("gptq", "smoothquant"):
    stats = ptq.collect(qm, calib, hessian=point.method == "gptq", progress=not quiet)
    if point.method == "smoothquant":
      ptq.smooth_quant(qm, stats, alpha=0.5)
      stats = ptq.collect(qm, calib, progress=not quiet)  # the inputs the quantizer now sees
    ptq.calibrate_activations(qm, stats)
    if point.method == "gptq":
      ptq.gptq(qm, stats, progress=not quiet)
  if point.method == "qat":
    extra["ptq_val_loss"] = evaluate(qm, fmodel, val, cfg.eval_batch, quiet)["loss"]
    fine_tune(qm, cfg, corpus, log, quiet, point.name, learn is not None)
  return qm, extra


def fine_tune(model: nnx.Module, cfg: AblationConfig, corpus: data.CharCorpus,
              log: harness.MetricsLog, quiet: bool, name: str, learn_quant: bool) -> None:
  """``cfg.qat_steps`` steps on the training text, the same batches for every caller
  (so QAT and the float fine-tune control see identical data)."""
  w, q = make_optimizers(model, optax.adamw(cfg.qat_lr, weight_decay=0.0),
                         optax.adam(cfg.qat_quant_lr) if learn_quant else None)
  step = make_train_step(lm_loss)
  key = jax.random.key(cfg.seed + 2)
  for i in tqdm(range(cfg.qat_steps), desc=f"fine-tune {name}", disable=quiet):
    key, sub = jax.random.split(key)
    loss = step(model, w, q, train_batch(corpus.train, sub, cfg.batch_size, cfg.context))
    log.write(phase="qat", point=name, step=i, loss=float(loss))


def evaluate(model: nnx.Module, reference: nnx.Module, windows: np.ndarray, batch: int,
             quiet: bool) -> dict:
  """``model``'s loss on ``windows`` and its KL divergence from ``reference``'s predictions
  (:func:`lowbit.ptq.compare`), ``batch`` windows a call."""
  fwd = nnx.jit(lambda m, x: m(x))
  return ptq.compare(model, reference, list(batches_of(windows, batch)),
                     logits_fn=lambda m, b: fwd(m, b[0]), progress=not quiet)


def model_bytes(model: nnx.Module) -> int:
  """Bytes of every array in the model's state (packed int4 counted as stored)."""
  return int(sum(v.get_value().nbytes for _, v in nnx.to_flat_state(nnx.state(model))))


def quantized_bits(converted: nnx.Module, policy: PrecisionPolicy) -> float:
  """Stored bits per weight of the quantized layers, ``8 * bytes / params`` (scales
  included; 32.0 when no layer is quantized)."""
  rows = policy.explain(converted, print_table=False)
  q = [r for r in rows if r["weight"] != "w-float"]
  return 8 * sum(r["bytes"] for r in q) / max(sum(r["params"] for r in q), 1) if q else 32.0


# --------------------------------------------------------------------------- sensitivity

def sensitivity_and_search(fmodel: nnx.Module, cfg: AblationConfig, corpus: data.CharCorpus,
                           log: harness.MetricsLog, quiet: bool, float_val: float,
                           val: np.ndarray) -> dict:
  """Int4 sensitivity per layer, then greedy mixed policies for average-bit targets.

  Sensitivity of a layer = validation loss increase when it alone is int4
  per-channel (RTN), on ``sensitivity_eval_tokens`` tokens. The search starts
  from all-int4 and upgrades to int8 the layers with the largest loss saving per
  added bit until the average bits per weight would exceed the target.
  """
  windows = eval_windows(corpus.val, cfg.sensitivity_eval_tokens, cfg.context)
  base = evaluate(fmodel, fmodel, windows, cfg.eval_batch, True)["loss"]
  paths = sorted(lowbit.nn.quantizable_layers(fmodel))
  sizes = {p: int(np.prod(lowbit.nn.quantizable_layers(fmodel)[p].kernel[...].shape))
           for p in paths}
  sens = {}
  for p in tqdm(paths, desc="sensitivity", disable=quiet):
    for bits in (4, 8):
      pol = PrecisionPolicy((PrecisionRule(p, W(bits)),))
      m = lowbit.quantize_model(fmodel, pol)
      sens[(p, bits)] = evaluate(m, fmodel, windows, cfg.eval_batch, True)["loss"] - base
    log.write(phase="sensitivity", layer=p, delta4=sens[(p, 4)], delta8=sens[(p, 8)])
  total = sum(sizes.values())
  searched = []
  for target in cfg.search_bits:
    bits = {p: 4 for p in paths}
    order = sorted(paths, key=lambda p: -(sens[(p, 4)] - sens[(p, 8)]) / (4 * sizes[p]))
    for p in order:
      new_avg = (sum(bits[q] * sizes[q] for q in paths) + 4 * sizes[p]) / total
      if new_avg <= target + 1e-9:
        bits[p] = 8
    rules = tuple(PrecisionRule(p, W(bits[p])) for p in paths)
    pol = PrecisionPolicy(rules)
    m = lowbit.quantize_model(fmodel, pol)
    res = evaluate(m, fmodel, val, cfg.eval_batch, quiet)
    avg = sum(bits[p] * sizes[p] for p in paths) / total
    searched.append(dict(target_bits=target, avg_code_bits=avg, val_loss=res["loss"],
                         delta_val=res["loss"] - float_val, kl=res["kl"],
                         int8_layers=sorted(p for p in paths if bits[p] == 8),
                         policy=pol.to_dict()))
  return dict(per_layer=[dict(layer=p, params=sizes[p], delta4=sens[(p, 4)],
                              delta8=sens[(p, 8)]) for p in paths], searched=searched,
              eval_tokens=int(windows.shape[0] * cfg.context))


# --------------------------------------------------------------------------- the run

def run(cfg: AblationConfig, *, quiet: bool = False) -> pathlib.Path:
  """The whole ablation: train (or restore) the float model, then every grid point's PTQ /
  QAT, evaluation, conversion and bytes, the sensitivity search if asked; writes
  ``config.json``, ``metrics.jsonl`` and the results into a new run directory, returned."""
  unknown = [g for g in cfg.grid if g not in POINTS]
  if unknown:
    raise ValueError(f"unknown grid point(s) {unknown}; known: {sorted(POINTS)}.")
  corpus = load_corpus(cfg)   # fails before a run directory exists
  run_dir = harness.new_run_dir(cfg.runs_root, cfg.name, cfg.workdir)
  env = harness.environment()
  harness.write_json(run_dir / "config.json", dict(
      config=dataclasses.asdict(cfg), environment=env, corpus=corpus.source,
      policies={g: POINTS[g].policy().to_dict() for g in cfg.grid},
      methods={g: dict(method=POINTS[g].method, learn=POINTS[g].learn) for g in cfg.grid}))
  log = harness.MetricsLog(run_dir / "metrics.jsonl")
  t_start = time.perf_counter()
  val = eval_windows(corpus.val, cfg.eval_tokens, cfg.context)
  test = eval_windows(corpus.test, cfg.eval_tokens, cfg.context)
  mcfg = model_config(cfg, corpus.vocab_size)
  train_seconds = None
  if cfg.float_ckpt:
    fmodel = ckpt.restore(cfg.float_ckpt, nnx.eval_shape(lambda: Transformer(mcfg, rngs=nnx.Rngs(0))))
  else:
    fmodel, train_seconds = train_float(cfg, corpus, log, quiet)
  ckpt.save(run_dir / "float_ckpt", fmodel)
  fval = evaluate(fmodel, fmodel, val, cfg.eval_batch, quiet)
  ftest = evaluate(fmodel, fmodel, test, cfg.eval_batch, quiet)
  float_row = dict(val_loss=fval["loss"], test_loss=ftest["loss"],
                   val_bpc=fval["loss"] / math.log(2), test_bpc=ftest["loss"] / math.log(2),
                   bytes=model_bytes(fmodel), train_seconds=train_seconds,
                   steps_per_s=(cfg.steps / train_seconds) if train_seconds else None)
  if any(POINTS[g].method == "qat" for g in cfg.grid):
    # Control for QAT: the float model fine-tuned on the same batches, unquantized.
    # QAT's own steps also keep training the model; only the gap to this control
    # is the quantization penalty left after QAT.
    ft = nnx.clone(fmodel)
    fine_tune(ft, cfg, corpus, log, quiet, "float-control", False)
    float_row["finetuned_val_loss"] = evaluate(ft, fmodel, val, cfg.eval_batch, quiet)["loss"]
  log.write(phase="float_eval", **float_row)
  rows = []
  for name in cfg.grid:
    point = POINTS[name]
    t0 = time.perf_counter()
    qm, extra = quantize_point(point, fmodel, cfg, corpus, log, quiet, val)
    rv = evaluate(qm, fmodel, val, cfg.eval_batch, quiet)
    rt = evaluate(qm, fmodel, test, cfg.eval_batch, quiet)
    converted = lowbit.convert(qm)
    row = dict(point=name, method=point.method, learn=point.learn,
               policy=[r.describe() for r in point.policy().rules],
               val_loss=rv["loss"], test_loss=rt["loss"], delta_val=rv["loss"] - fval["loss"],
               delta_test=rt["loss"] - ftest["loss"], val_bpc=rv["loss"] / math.log(2),
               val_ppl=rv["ppl"], kl_val=rv["kl"], top1_val=rv["top1_agreement"],
               kl_test=rt["kl"], top1_test=rt["top1_agreement"],
               bytes=model_bytes(converted), quantized_bits=quantized_bits(converted, point.policy()),
               seconds=time.perf_counter() - t0, **extra)
    if "ptq_val_loss" in extra:
      gap = extra["ptq_val_loss"] - fval["loss"]
      row["qat_recovery"] = (extra["ptq_val_loss"] - rv["loss"]) / gap if gap > 0 else None
      # the penalty left after QAT, against the equally trained float control
      row["qat_gap_vs_float_control"] = rv["loss"] - float_row["finetuned_val_loss"]
      row["qat_recovery_controlled"] = (1 - row["qat_gap_vs_float_control"] / gap
                                        if gap > 0 else None)
    rows.append(row)
    log.write(phase="point", **{k: v for k, v in row.items() if k != "seconds"})
  results = dict(config_name=cfg.name, config=dataclasses.asdict(cfg), environment=env,
                 corpus=corpus.source, eval_tokens=dict(val=int(val.size - len(val)),
                                                        test=int(test.size - len(test))),
                 seeds=dict(model=cfg.seed, data=cfg.seed + 1, qat=cfg.seed + 2, calib=10_000),
                 float=float_row, rows=rows)
  if cfg.sensitivity:
    results["sensitivity"] = sensitivity_and_search(fmodel, cfg, corpus, log, quiet, fval["loss"],
                                                    val)
  results["seconds_total"] = time.perf_counter() - t_start
  log.close()
  harness.write_json(run_dir / "results.json", results)
  return run_dir
