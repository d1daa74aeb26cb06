"""The ablation harness end to end on a tiny config and a tiny corpus written here."""

import json
import pathlib
import re

import pytest

from lowbit import ablation, data, harness, report

TEXT = ("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
        "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\n")


def tiny(tmp_path, **kw):
  corpus = tmp_path / "corpus.txt"
  corpus.write_text(TEXT * 60)
  base = dict(name="tiny", data=str(corpus), n_layers=1, d_model=32, n_heads=2, context=16,
              batch_size=4, steps=12, warmup=2, eval_tokens=512, eval_batch=16, calib_batches=2,
              calib_batch_size=4, qat_steps=3,
              grid=("w8a16", "w4a16-channel", "w8a8-tensor-smoothquant", "w4a16-channel-gptq",
                    "w4a16-channel-qat-lsq"),
              sensitivity=True, sensitivity_eval_tokens=256, search_bits=(5.0,),
              runs_root=str(tmp_path / "runs"))
  base.update(kw)
  return ablation.AblationConfig(**base)


@pytest.mark.slow  # ~110 s of CPU: the default suite's budget (tests/test_package.py runs
# the README's ablation command end to end on a tiny budget in the default suite)
def test_smoke_run_writes_everything_and_reruns_bit_identically(tmp_path):
  d1 = ablation.run(tiny(tmp_path, workdir=str(tmp_path / "a")), quiet=True)
  # the rerun (same seed) covers the stochastic parts: training, calibration sampling, GPTQ, QAT
  d2 = ablation.run(tiny(tmp_path, workdir=str(tmp_path / "b"), grid=(
      "w4a16-channel-gptq", "w4a16-channel-qat-lsq"), sensitivity=False), quiet=True)
  for d in (d1, d2):
    assert {p.name for p in d.iterdir()} >= {"config.json", "metrics.jsonl", "results.json",
                                              "float_ckpt"}
  cfg = json.loads((d1 / "config.json").read_text())
  assert cfg["policies"]["w4a16-channel"]["rules"][0]["weight"]["bits"] == 4
  lines = (d1 / "metrics.jsonl").read_text().splitlines()
  steps = [json.loads(x) for x in lines if json.loads(x)["phase"] == "float"]
  assert [s["step"] for s in steps] == list(range(12))
  r1 = json.loads((d1 / "results.json").read_text())
  r2 = json.loads((d2 / "results.json").read_text())
  assert [r["point"] for r in r1["rows"]] == list(tiny(tmp_path).grid)
  strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
  assert strip(r1["rows"][-2:]) == strip(r2["rows"])
  assert r1["float"] == {**r2["float"], "train_seconds": r1["float"]["train_seconds"],
                         "steps_per_s": r1["float"]["steps_per_s"]}
  bits = {r["point"]: r["quantized_bits"] for r in r1["rows"]}
  assert 4 < bits["w4a16-channel"] < 5 < 8 < bits["w8a16"] < 9
  assert r1["sensitivity"]["searched"][0]["avg_code_bits"] <= 5.0
  q = next(r for r in r1["rows"] if r["method"] == "qat")
  assert "ptq_val_loss" in q and "qat_recovery" in q
  # the float control fine-tuned on the same batches, and the gap QAT leaves to it
  assert "finetuned_val_loss" in r1["float"]
  assert q["qat_gap_vs_float_control"] == pytest.approx(
      q["val_loss"] - r1["float"]["finetuned_val_loss"])
  # the table generator reads them
  out = report.write_report([d1, d2 / "results.json"], tmp_path / "docs" / "r.md")
  assert (tmp_path / "docs" / "r_delta.png").exists() and (tmp_path / "docs" / "r_pareto.png").exists()
  text = out.read_text()
  assert "w4a16-channel-gptq" in text and "| tiny |" in text and "Published findings" in text
  # reuse the float checkpoint: same float numbers, no training
  d3 = ablation.run(tiny(tmp_path, workdir=str(tmp_path / "c"), grid=("w8a16",),
                         sensitivity=False, float_ckpt=str(d1 / "float_ckpt")), quiet=True)
  r3 = json.loads((d3 / "results.json").read_text())
  assert r3["float"]["val_loss"] == r1["float"]["val_loss"] and r3["float"]["train_seconds"] is None


def test_bad_input_leaves_no_results(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    ablation.run(tiny(tmp_path, data=str(tmp_path / "missing.txt")), quiet=True)
  with pytest.raises(ValueError, match="sha256"):
    ablation.run(tiny(tmp_path, data_sha256="0" * 64), quiet=True)
  with pytest.raises(ValueError, match="unknown grid point"):
    ablation.run(tiny(tmp_path, grid=("w5a5",)), quiet=True)
  assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("results.json"))
  (tmp_path / "taken").mkdir()
  with pytest.raises(ValueError, match="already exists"):
    ablation.run(tiny(tmp_path, workdir=str(tmp_path / "taken")), quiet=True)
  assert not (tmp_path / "taken" / "results.json").exists()


def test_config_files_and_overrides(tmp_path):
  root = pathlib.Path(__file__).resolve().parents[1]
  cfg = harness.load_config(root / "configs" / "shakespeare_quick.py",
                            ["steps=10", "grid=w8a16,w4a8", "data_sha256=none", "sensitivity=false"])
  assert cfg.steps == 10 and cfg.grid == ("w8a16", "w4a8") and cfg.sensitivity is False
  assert cfg.data_sha256 is None
  with pytest.raises(ValueError, match="unknown config key 'stepz'"):
    harness.load_config(root / "configs" / "shakespeare_quick.py", ["stepz=10"])
  with pytest.raises(ValueError, match="cannot parse"):
    harness.load_config(root / "configs" / "shakespeare_quick.py", ["steps=ten"])
  for name in ("shakespeare_quick.py", "shakespeare_char.py"):
    c = harness.load_config(root / "configs" / name)
    assert all(g in ablation.POINTS for g in c.grid)
    doc = (root / "configs" / name).read_text()
    # the docstring gives the command, the cost and the expected result
    assert "lowbit ablate --config configs/" + name in doc
    assert re.search(r"Cost: (about )?\d+ min", doc) and "Expected:" in doc


def test_tiny_shakespeare_checksum_is_checked(tmp_path):
  f = tmp_path / "t.txt"
  f.write_text("hello world\n" * 10)
  with pytest.raises(ValueError, match="does not match"):
    data.text_file(f, data.TINY_SHAKESPEARE_SHA256)
  c = data.text_file(f)
  assert c.decode(c.encode("hello")) == "hello" and len(c.train) == 108
