"""The package as a newcomer gets it: a wheel that imports, and the README's commands."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_non_editable_wheel_imports_lowbit_and_kernels(tmp_path):
  wheels = tmp_path / "wheels"
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                  "-q", "-w", str(wheels), str(ROOT)], check=True, cwd=tmp_path)
  (whl,) = wheels.glob("lowbit-*.whl")
  site = tmp_path / "site"
  subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                  str(site), str(whl)], check=True, cwd=tmp_path)
  subs = sorted(p.parent.name for p in (ROOT / "lowbit").glob("*/__init__.py"))
  assert subs, "no subpackages found"
  code = ("import importlib, lowbit, lowbit.kernels, lowbit.quant; "
          "print(lowbit.__file__); print(lowbit.kernels.__file__); "
          "print(lowbit.kernels.w4a16_matmul.__name__); "
          f"print(*[importlib.import_module('lowbit.' + s).__file__ for s in {subs!r}])")
  env = dict(os.environ, PYTHONPATH=str(site))
  boot = "import site, sys; sys.path.insert(0, %r); site.main(); " % str(site)
  out = subprocess.run([sys.executable, "-S", "-c", boot + code],
                       check=True, capture_output=True, text=True, cwd=tmp_path, env=env).stdout
  lines = out.split()
  assert lines[0].startswith(str(site)) and lines[1].startswith(str(site)), out
  assert lines[1].endswith(os.path.join("lowbit", "kernels", "__init__.py"))
  assert lines[2] == "w4a16_matmul"
  # every subpackage comes from the wheel, not from the source tree
  assert len(lines) == 3 + len(subs) and all(f.startswith(str(site)) for f in lines[3:]), out


def readme_commands():
  blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
  return [b.strip() for b in blocks]


def test_readme_has_the_two_commands_and_ci_runs_the_test_one():
  main_cmd, test_cmd = readme_commands()[:2]
  assert "pip install" in main_cmd and "lowbit ablate" in main_cmd
  assert "pytest" in test_cmd
  assert test_cmd in (ROOT / ".ci" / "run").read_text()


def _lowbit_exe():
  exe = pathlib.Path(sys.executable).parent / "lowbit"
  return [str(exe)] if exe.exists() else [sys.executable, "-m", "lowbit.cli"]


def _main_args():
  main_cmd = readme_commands()[0]
  tail = main_cmd.split("&&")[-1].strip()   # ".venv/bin/lowbit ablate --config ... --report ..."
  args = tail.split()[1:]
  assert args[:3] == ["ablate", "--config", "configs/shakespeare_quick.py"], args
  return args


def test_readme_main_command_runs_on_a_tiny_budget(tmp_path):
  """The README's main command, with overrides that shrink it to seconds."""
  args = _main_args()
  args[args.index("--report") + 1] = str(tmp_path / "report.md")
  corpus = tmp_path / "c.txt"
  corpus.write_text("Now is the winter of our discontent\nMade glorious summer by this sun of York;\n"
                    * 50)
  small = ["--data", str(corpus), "--workdir", str(tmp_path / "run"), "--quiet",
           "--set", "steps=5", "--set", "warmup=1", "--set", "grid=w8a16,w4a16-channel",
           "--set", "sensitivity=false", "--set", "eval_tokens=512", "--set", "calib_batches=1",
           "--set", "n_layers=1", "--set", "d_model=32", "--set", "n_heads=2"]
  out = subprocess.run(_lowbit_exe() + args + small, check=True, capture_output=True, text=True,
                       timeout=600, cwd=ROOT).stdout
  assert "results:" in out and (tmp_path / "run" / "results.json").exists()
  assert "w4a16-channel" in (tmp_path / "report.md").read_text()


@pytest.mark.slow
def test_readme_main_command_full(tmp_path):
  """The README's main command exactly as written (about 10 minutes): `pytest -m slow`."""
  args = _main_args()
  args[args.index("--report") + 1] = str(tmp_path / "report.md")
  subprocess.run(_lowbit_exe() + args + ["--workdir", str(tmp_path / "run"), "--quiet"],
                 check=True, timeout=3600, cwd=ROOT)
  assert (tmp_path / "run" / "results.json").exists()


def test_demo_command_runs():
  out = subprocess.run(_lowbit_exe() + ["demo", "--k", "512", "--n", "128"], check=True,
                       capture_output=True, text=True, timeout=300).stdout
  rows = {ln.split("  ")[0]: ln.split() for ln in out.splitlines() if ln.startswith("int")}
  assert set(rows) >= {"int8 per-channel", "int4 group 128"}
  err8 = float(rows["int8 per-channel"][2])
  err4 = float(rows["int4 group 128"][3])
  bpw4 = float(rows["int4 group 128"][5])
  assert err8 < 0.05 and err4 < 0.3 and bpw4 <= 0.52
