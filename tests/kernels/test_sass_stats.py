"""experiments/sass_stats.py's reading of nvdisasm and ptxas output (the compile itself
needs the CUDA plugin's venv, ``bash experiments/sass_venv.sh``; not in this suite).

The SASS below is cut from the W4A16 kernel's own (nvdisasm -c of its sm_90a cubin),
with an outer loop, a loop without wgmma and a retry stub that branches back added
around the K-step loop.
"""

import importlib.util
import pathlib
import sys

import pytest

SASS = """
        .text.lowbit_w4a16_hopper_mosaic_gpu_kernel:
.L_x_0:
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_1:
        /*0010*/                   UIADD3 UR5, UR5, 0x1, URZ ;
        /*0020*/                   SYNCS.ARRIVE.TRANS64 RZ, [UR48+0x2e018], R12 ;
        /*0030*/              @P1 BRA `(.L_x_1) ;
.L_x_15:
        /*0040*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR6], R21 ;
        /*0050*/              @!P0 BRA `(.L_x_14) ;
.L_x_27:
        /*0060*/                   LDS.U16 R26, [R47+0x8] ;
        /*0070*/                   PRMT R42, R26, 0x4140, RZ ;
        /*0080*/                   WARPGROUP.ARRIVE ;
        /*0090*/                   HGMMA.64x8x16.F32.BF16 R28, R92, gdesc[UR12], RZ, !UPT ;
        /*00a0*/                   HGMMA.64x8x16.F32.BF16 R28, R32, gdesc[UR12], R28 ;
        /*00b0*/                   HGMMA.64x8x16.F32.BF16 R24, R92, gdesc[UR16], RZ, !UPT, gsb0 ;
        /*00c0*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*00d0*/                   FFMA R33, R28, R21.reuse, R12 ;
        /*00e0*/               @P0 BRA `(.L_x_15) ;
        /*00f0*/                   BAR.SYNC.DEFER_BLOCKING R0, 0x80 ;
        /*0100*/               @P2 BRA `(.L_x_0) ;
        /*0110*/                   EXIT ;
.L_x_14:
        /*0120*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR6], R21 ;
        /*0130*/              @!P0 NANOSLEEP.SYNCS 0x989680 ;
        /*0140*/                   BRA `(.L_x_27) ;
"""

REPORT = """ptxas info    : Compiling entry function 'k' for 'sm_90a'
ptxas info    : Function properties for k
    0 bytes stack frame, 40 bytes spill stores, 36 bytes spill loads
ptxas info    : Used 168 registers, used 16 barriers, 1 bytes smem
ptxas info    : (C7511) Potential Performance Loss: wgmma.mma_async instructions are \
serialized due to insufficient register resources for the wgmma pipeline in the function 'k' \
in line 3103
"""


@pytest.fixture(scope="module")
def ss():
  path = pathlib.Path(__file__).parents[2] / "experiments" / "sass_stats.py"
  spec = importlib.util.spec_from_file_location("sass_stats", path)
  mod = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = mod  # its dataclass looks its module up while being defined
  spec.loader.exec_module(mod)
  return mod


def test_the_k_step_loop_is_the_innermost_one_that_issues_wgmma(ss):
  insns, labels = ss.parse_sass(SASS)
  assert len(insns) == 21 and labels[".L_x_27"] == 0x60
  body = ss.hgmma_loop(insns, labels)
  # .L_x_15 (0x40) to its back branch (0xe0): not the outer loop, not the TMA-like loop
  # without wgmma, not the retry stub's branch back into the body
  assert [i.addr for i in body] == list(range(0x40, 0xF0, 0x10))
  assert [i.family for i in body][3:7] == ["PRMT", "WARPGROUP", "HGMMA", "HGMMA"]
  assert body[0].opcode == "SYNCS.PHASECHK.TRANS64.TRYWAIT" and body[-1].opcode == "BRA"


# HopperW4Tiles(pingpong=True, halves="apart"): a turn barrier waited on between the two
# halves' wgmmas, its retry stub placed after the loop (before the outer loop's end) and
# branching back into the step: a shorter span than the step's that holds one of its MMAs.
_STEP3 = "        /*00b0*/                   HGMMA.64x8x16.F32.BF16 R24, R92, gdesc[UR16], RZ, "
_BAR = "        /*00f0*/                   BAR.SYNC.DEFER_BLOCKING R0, 0x80 ;\n"
TURN = SASS.replace(_STEP3, ".L_x_30:\n" + _STEP3).replace(
    _BAR, _BAR + "        /*00f8*/                   BRA `(.L_x_30) ;\n")


def test_a_retry_stub_into_the_step_is_not_taken_for_the_loop(ss):
  insns, labels = ss.parse_sass(TURN)
  body = ss.hgmma_loop(insns, labels)
  assert [i.addr for i in body] == list(range(0x40, 0xF0, 0x10))  # the step, all 3 HGMMAs
  # the rule it replaced (the shortest span with any wgmma) took the stub's
  stub = [i for i in insns if labels[".L_x_30"] <= i.addr <= 0xF8]
  assert len(stub) < len(body) and sum(i.family == "HGMMA" for i in stub) == 1


def test_codes_count_each_register_a_operand_once(ss):
  insns, labels = ss.parse_sass(SASS)
  body = ss.hgmma_loop(insns, labels)
  # R92 and R32: two A fragments of 64 x 16 bf16, 8 per thread each
  assert ss.codes_per_step(body, 1) == (16, 8)
  int8 = [ss.Insn(0, "IGMMA.64x8x32.S8.S8 R24, R40, gdesc[UR12], RZ, !UPT"),
          ss.Insn(16, "IGMMA.64x8x32.S8.S8 R24, R48, gdesc[UR36], R24"),
          ss.Insn(32, "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24")]  # A in shared memory
  assert ss.codes_per_step(int8, 1) == (32, 128)


def test_warp_mmas_count_8_codes_each_per_token_tile(ss):
  # HopperW4Tiles(mma="sync"): each HMMA.16816 is 16 x 16 codes of a warp (8 a thread)
  # against one 8-token tile; A registers are reused across chunks, so instructions count
  hmma = [ss.Insn(16 * i, f"HMMA.16816.F32.BF16 R{4 * i}, R24, R{40 + 2 * i}, RZ") for i in range(4)]
  assert ss.codes_per_step(hmma, 1) == (32, 8)
  assert ss.codes_per_step(hmma, 16) == (16, 16)  # two token tiles: each A twice
  insns, labels = ss.parse_sass(SASS.replace("HGMMA", "HMMA"))
  assert ss.hgmma_loop(insns, labels, ss.MMA_FAMILIES)  # the loop a warp-MMA kernel has


def test_issue_floor_is_warp_instructions_over_the_schedulers(ss):
  # K = N = 8192, M = 1: 16384 warp-steps of 128 codes a thread, 400 instructions each,
  # over 132 SMs x 4 schedulers at 1.98 GHz
  us = ss.issue_floor_us(400, 128, 1, 8192, 8192, 8)
  assert us == pytest.approx(16384 * 400 / (132 * 4 * 1.98e3))
  # two token tiles twice the steps; twice the codes per step half of them
  assert ss.issue_floor_us(400, 128, 9, 8192, 8192, 8) == pytest.approx(2 * us)
  assert ss.issue_floor_us(400, 256, 1, 8192, 8192, 8) == pytest.approx(us / 2)


def test_summary_reads_registers_spills_and_serialized_wgmma(ss):
  s = ss.summarize(REPORT, SASS, m=1, kn=8192)
  assert s["registers"] == 168 and s["spill_bytes"] == 76
  assert s["wgmma_serialized"] == "insufficient register resources for the wgmma pipeline"
  assert s["loop_insns"] == 11 and s["codes_per_step"] == 16
  assert s["insns_per_8_codes"] == pytest.approx(5.5)
  assert s["mix"]["HGMMA"] == 3
  clean = ss.summarize(REPORT.replace("40 bytes spill stores, 36", "0 bytes spill stores, 0")
                       .splitlines()[2], SASS, m=1, kn=8192)
  assert clean["spill_bytes"] == 0 and clean["wgmma_serialized"] is None


def test_a_kernel_without_wgmma_is_refused(ss):
  insns, labels = ss.parse_sass(SASS.replace("HGMMA", "HMMA"))
  with pytest.raises(ValueError, match="no loop issues HGMMA"):
    ss.hgmma_loop(insns, labels)


TRITON_UNROLLED = """
        /*0000*/                   LDSM.16.M88.4 R4, [R2+UR4] ;
        /*0010*/                   IMAD.MOV.U32 R8, RZ, RZ, R4 ;
        /*0020*/                   HMMA.16816.F32.BF16 R12, R8, R16, R12 ;
        /*0030*/                   HMMA.16816.F32.BF16 R12, R8, R18, R12 ;
        /*0040*/                   IMAD.MOV.U32 R9, RZ, RZ, R5 ;
        /*0050*/                   IMAD.MOV.U32 R9, RZ, RZ, 0x1 ;
        /*0060*/                   LOP3.LUT R20, R21, 0xf000f, R22, 0x6a, !PT ;
        /*0070*/                   HMMA.16816.F32.BF16 R24, R8, R20, R24 ;
        /*0080*/                   HMMA.16816.F32.BF16 R24, R8, R22, R24 ;
        /*0090*/                   LOP3.LUT R22, R21, 0xf000f, R22, 0x6a, !PT ;
        /*00a0*/                   LOP3.LUT R23, R21, 0xf000f, R22, 0x6a, !PT ;
        /*00b0*/                   EXIT ;
"""


def test_triton_counts_register_moves_and_unrolled_k_steps(ss):
  from lowbit.kernels import BlockSizes
  bs = BlockSizes(bm=16, bn=128, bk=128, split_k=8, num_warps=4, num_stages=3, k_major=True)
  # no loop: Triton unrolled K / 2 / split_k / bk = 4 steps; the whole kernel over them
  s = ss.triton_summary(TRITON_UNROLLED, bs, "w4a16", m=1, kn=8192)
  assert s["unrolled_steps"] == 4 and s["loop_insns"] == 3  # 12 instructions / 4
  assert s["codes_per_step"] == 128 * 128 * 2 // 128
  # plain register moves only (not a constant into a register): 2 over 4 steps
  assert s["register_moves"] == round(2 / 4)
  assert s["mix"] == {"HMMA": 1}  # the families found at least once a step
  looped = TRITON_UNROLLED.replace("EXIT ;", "@P0 BRA `(.L_x_3) ;").replace(
      "        /*0000*/", ".L_x_3:\n        /*0000*/")
  s = ss.triton_summary(looped, bs, "w4a16", m=1, kn=8192)
  assert s["unrolled_steps"] is None and s["loop_insns"] == 12 and s["register_moves"] == 2
  with pytest.raises(ValueError, match="no loop issues"):
    ss.triton_summary(TRITON_UNROLLED.replace("HMMA", "HFMA2"), bs, "w4a16", m=1, kn=8192)
