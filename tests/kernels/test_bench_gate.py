"""experiments/bench_gate.py: what the GPU run's benchmark leaves out after its compiled
kernel tests, read from logs in the format ``pytest -v -rfE -n N`` with pytest-timeout's
thread method writes (the hung-worker lines are cut from such a run on this machine)."""

import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).parents[2]
MG = "tests/kernels/test_mosaic_gpu.py"
MK = "tests/kernels/test_matmul_kernels.py"
W4 = f"{MG}::test_w4a16_matches_reference_and_float64"
DEFAULT_W4 = f"{W4}[5x512x256-g64-nk]"
ONE_KERNEL = f"{W4}[5x512x256-g64-nk-split-natural-slab-unpadded-ksplit-final]"
PP = ONE_KERNEL.replace("final]", "final-pp]")
SYNC = f"{W4}[20x1024x256-g128-kn-split-natural-sync]"
NATURAL = f"{W4}[20x1024x256-g128-kn-split-natural]"
SYNC_ALONE = f"{MG}::test_every_case_lowers_for_cuda_with_the_gpu_runs_tiles[w4a16-x-sync]"
W8 = f"{MG}::test_f32_matches_reference_and_float64[100x384x256-kn]"
TRITON = f"{MK}::test_kernel_bf16_output[w8a8-xw]"


@pytest.fixture(scope="module")
def gate():
  spec = importlib.util.spec_from_file_location("bench_gate", ROOT / "experiments" / "bench_gate.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def log(*, passed=(), failed=(), crashed=(), started=(), summary=True) -> str:
  """A -v xdist log: each test's start line, then its result line; ``crashed`` ends as
  pytest-timeout's thread method ends it, ``started`` never ends (the stage was killed)."""
  lines = ["2 workers [9 items]", "", "scheduling tests via LoadScheduling", ""]
  for i, t in enumerate((*passed, *failed, *crashed, *started)):
    lines.append(f"{t} ")
    if t in passed:
      lines.append(f"[gw{i % 2}] [ {10 * i:2d}%] PASSED {t} ")
    elif t in failed:
      lines.append(f"[gw{i % 2}] [ {10 * i:2d}%] FAILED {t} ")
    elif t in crashed:
      lines += [f"[gw{i % 2}] node down: Not properly terminated",
                f"[gw{i % 2}] [ {10 * i:2d}%] FAILED {t} ", "", f"replacing crashed worker gw{i % 2}"]
  if summary and (failed or crashed):
    lines += ["=========================== short test summary info ============================"]
    lines += [f"FAILED {t} - AssertionError: rel 0.3" for t in failed]
    lines += [f"FAILED {t} - worker 'gw1' crashed while running '{t}'" for t in crashed]
  return "\n".join(lines) + "\n"


def test_all_passed_gates_nothing(gate):
  assert gate.bench_flags(log(passed=(DEFAULT_W4, PP, W8, TRITON))) == []


def test_no_test_ran_leaves_out_every_mosaic_gpu_kernel(gate):
  assert gate.bench_flags("ImportError: no module named lowbit\n") == ["--no-hopper"]
  # a log without -v: only the summary's count says the tests ran
  assert gate.bench_flags("....\n4 passed in 52.3s\n") == []


def test_a_failed_opt_in_variant_is_skipped_and_the_kernel_kept(gate):
  """Only the variant no passing test clears is blamed: mma.sync, not the natural unpack
  that the passing case without mma.sync has too."""
  assert gate.bench_flags(log(passed=(DEFAULT_W4, NATURAL, W8), failed=(SYNC,))) == [
      "--skip-tiles", "mma='sync'"]
  # nothing clears the natural unpack: both are left out
  assert gate.bench_flags(log(passed=(DEFAULT_W4, W8), failed=(SYNC,))) == [
      "--skip-tiles", "unpack='ptx_natural'", "mma='sync'"]
  # every variant of the failed test passed elsewhere (flaky, or the combination): the
  # candidates with all of them left out
  assert gate.bench_flags(log(passed=(NATURAL, SYNC_ALONE, W8), failed=(SYNC,))) == [
      "--skip-tiles", "unpack='ptx_natural'+mma='sync'"]


def test_a_failed_combination_leaves_out_only_the_candidates_with_all_of_it(gate):
  """W4A8's decode one kernel (the kernel's epilogue) fails while each of its six variants
  passed in other tests: its combination is skipped, and W4A16's decode default, which has
  four of the six, and W4A8's decode default, which has three, are still timed."""
  from lowbit.kernels import HopperW4Tiles as T
  a8 = f"{MG}::test_w4a8_matches_reference_and_float64"
  one8 = f"{a8}[5x512x256-g64-nk-split-ptx-slab-unpadded-magic-ksplit-final]"
  passed = (ONE_KERNEL, DEFAULT_W4, W8, f"{a8}[5x512x256-g64-nk-split-ptx-slab-magic]",
            f"{a8}[5x512x256-g64-nk-split-slab-unpadded-magic-ksplit]",
            f"{W4}[5x512x256-g64-kn-split-final]")
  # (without the last, the kernel's epilogue is the one variant no passing test clears:
  # it alone is left out, W4A16's decode default with it)
  assert gate.bench_flags(log(passed=passed[:-1], failed=(one8,))) == [
      "--skip-tiles", "epilogue='kernel'"]
  flags = gate.bench_flags(log(passed=passed, failed=(one8,)))
  assert flags == ["--skip-tiles", "nk_scales='slab'+unpack='ptx'+int_sums='magic'+"
                   "pad_tokens=False+wg_split='k'+epilogue='kernel'"]
  one = dict(nibbles="split", nk_scales="slab", pad_tokens=False, wg_split="k")
  assert not gate.admitted("w4a8", T(**one, unpack="ptx", int_sums="magic", epilogue="kernel"),
                           None, flags[1:])
  assert gate.admitted("w4a8", T(**one, unpack="ptx", int_sums="magic"), None, flags[1:])
  assert gate.admitted("w4a16", T(**one, unpack="ptx_natural", epilogue="kernel"), None,
                       flags[1:])


def test_a_crashed_worker_counts_as_a_failure(gate):
  """The decode one kernel with turns hangs (its worker ended by pytest-timeout) while the
  one kernel without turns passed: turns alone are left out."""
  assert gate.bench_flags(log(passed=(DEFAULT_W4, ONE_KERNEL, W8), crashed=(PP,))) == [
      "--skip-tiles", "pingpong=True"]


def test_a_test_cut_off_while_running_counts_as_hung(gate):
  """The stage's timeout killed pytest: no summary, the test's start line and no end."""
  text = log(passed=(DEFAULT_W4, ONE_KERNEL, W8), started=(PP,), summary=False)
  assert gate.outcomes(text)[PP] == "hung"
  assert gate.outcomes(text)[ONE_KERNEL] == "passed"
  assert gate.bench_flags(text) == ["--skip-tiles", "pingpong=True"]


def test_default_tiles_failing_leave_out_their_kernel(gate):
  assert gate.bench_flags(log(passed=(PP, W8), failed=(DEFAULT_W4,))) == ["--no-hopper", "w4a16", "w4a8"]
  assert gate.bench_flags(log(passed=(DEFAULT_W4,), failed=(W8,))) == ["--no-hopper", "w8a8"]
  # a Triton kernel's failure does not gate the Mosaic GPU ones
  assert gate.bench_flags(log(passed=(DEFAULT_W4, W8), failed=(TRITON,))) == []


def test_main_prints_the_flags_space_separated(gate, tmp_path, capsys):
  path = tmp_path / "kernel_tests.log"
  path.write_text(log(passed=(DEFAULT_W4, W8), failed=(SYNC, DEFAULT_W4.replace("nk]", "kn]"))))
  assert gate.main([str(path)]) == 0
  assert capsys.readouterr().out == "--no-hopper w4a16 w4a8 --skip-tiles unpack='ptx_natural' mma='sync'\n"


def test_profile_configs_follow_the_gate(gate):
  """experiments/profile_w4.py takes the same flags: a hung variant is not profiled either."""
  spec = importlib.util.spec_from_file_location("profile_w4", ROOT / "experiments" / "profile_w4.py")
  profile = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(profile)
  configs = profile.profiled_configs(1)
  sync = ONE_KERNEL.replace("final]", "final-sync]")  # the decode default's case
  flags = gate.bench_flags(log(passed=(DEFAULT_W4, ONE_KERNEL, W8), crashed=(sync,)))
  assert flags == ["--skip-tiles", "mma='sync'"]
  kept = profile.gated(configs, None, flags[1:])
  assert any(t.mma == "sync" for _, t in configs)
  assert kept == [(k, t) for k, t in configs if t.mma != "sync"]
  assert profile.gated(configs, None, []) == configs
  assert profile.gated(configs, [], []) == []  # --no-hopper alone: nothing
  assert {k for k, _ in profile.gated(configs, ["w4a16", "w4a8"], [])} == set()
  assert {k for k, _ in profile.gated(configs, ["w8a8"], [])} == {"w4a16", "w4a8"}


def test_a_hung_128_token_case_leaves_out_its_tiles_not_the_decode_unpack(gate):
  """W4A16 with 128-token tiles hangs while the natural unpack (decode) and halves apart
  (W4A8) pass elsewhere: the 128-token tiles are left out, not ``"ptx_natural"``, the
  decode default's own (before the ``tm128`` fragment, nothing but the variants all
  passed elsewhere would be blamed, so the fallback left out both of them)."""
  tm128 = f"{W4}[130x512x256-g64-nk-tm128-split-natural-apart]"
  apart = f"{MG}::test_w4a8_matches_reference_and_float64[5x512x256-g64-kn-split-apart]"
  assert gate.bench_flags(log(passed=(DEFAULT_W4, NATURAL, apart, W8), crashed=(tm128,))) == [
      "--skip-tiles", "tile_m=128"]


def test_every_fragment_names_real_cases_and_candidates(gate):
  """Each fragment the gate reads occurs in a test id that test_mosaic_gpu.py writes, and
  each keyword it skips in the repr of a benchmark candidate or of a tested case's tiles
  (variants a sweep no longer times stay gated for the next one that does): the two files
  and the gate cannot drift apart silently (a fragment no id has gates nothing)."""
  def load(name, path):
    spec = importlib.util.spec_from_file_location(name, ROOT / path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
  mg_tests = load("_gate_mosaic_tests", MG)
  bench = load("_gate_bench", "experiments/bench_kernels.py")
  cases = mg_tests.W4_CASES + mg_tests.W4A8_CASES
  ids = [f"[{mg_tests.case_id(c)}]" for c in cases]
  reprs = [repr(t) for m in (1, 16, 64, 128, 256, 4096) for k in ("w4a16", "w4a8")
           for t in bench.hopper_w4_candidates(m, k)]
  reprs += [repr(mg_tests.K.HopperW4Tiles(**c[4])) for c in cases]
  for frag, kw in gate.OPT_IN.items():
    assert any(frag in i for i in ids), frag
    assert any(kw in r for r in reprs), kw
