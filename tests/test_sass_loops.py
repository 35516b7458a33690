"""benchmarks/sass_loops.py, the static inner-loop diagnostic: its SASS parser on a hand-written listing, and one
real gate case compiled for sm_90 in a subprocess (the test session runs with TRITON_INTERPRET=1, which replaces
@triton.jit functions)."""

import pathlib
import sys

from conftest import run_benchmark_script

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import sass_loops  # noqa: E402

LISTING = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;                      /* 0x00000a0000017a02 */
        /*0010*/                   ISETP.GE.AND P0, PT, R2, R3, PT ;           /* 0x000000030200720c */
        /*0020*/              @!P0 FFMA R4, R5, R6, R4 ;                       /* 0x0000000605048223 */
        /*0030*/                   MUFU.EX2 R4, R4 ;                           /* 0x0000000400047308 */
        /*0040*/                   FFMA.FTZ R7, R4, R4, R7 ;                   /* 0x0000000404077223 */
        /*0050*/              @!P0 BRA 0x10 ;                                  /* 0xfffffffc00008947 */
        /*0060*/                   BRA 0x70 ;                                  /* 0x0000000000007947 */
        /*0070*/                   EXIT ;                                      /* 0x000000000000794d */
"""


def test_parser_finds_the_backward_branch_and_counts_its_body():
    ((top, addr, ops),) = sass_loops.loops(LISTING)  # the forward BRA 0x70 is no loop
    assert (top, addr) == (0x10, 0x50)
    assert ops == {"ISETP": 1, "FFMA": 2, "MUFU": 1, "BRA": 1}  # predicates and modifiers stripped


def test_reports_a_real_kernel_loop():
    out = run_benchmark_script("sass_loops.py", "attention_fwd-fp16-d32-drop0", "--top", "60")
    loops = [line for line in out.splitlines() if " loop " in line]
    assert loops, out
    assert all("HGMMA" in line and "MUFU" in line for line in loops), out
