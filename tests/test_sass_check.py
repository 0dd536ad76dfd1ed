"""scripts/sass_check.py's parsers (CI runs the script; a parser that silently reads nothing would
pass every kernel): ptxas -v lines and cuobjdump SASS lines as CUDA 13.0 prints them, with
the serialisation notes the script must fail on."""
import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("sass_check", ROOT / "scripts" / "sass_check.py")
sass_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sass_check)

FN = "_ZN7attnkit4gdpa18gdpa_fwd_ws_kernelI13__nv_bfloat16Lb1ELb1ELb1EEEvNS0_9FwdParamsE"
OTHER = "_ZN7attnkit4gdpa27gdpa_fwd_ws_schedule_kernelILi128EEEvNS0_9FwdParamsEiPi"

PTXAS = f"""ptxas info    : 0 bytes gmem
ptxas info    : (C7519) warpgroup.arrive is injected in around line 41397 by compiler to allow use of registers in GMMA in function '{FN}'
ptxas info    : (C7519) warpgroup.arrive is injected in around line 41512 by compiler to allow use of registers in GMMA in function '{FN}'
ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized due to non wgmma instructions defining accumulator registers of a wgmma between start and end of the pipeline stage in the function '{FN}'
ptxas info    : Compiling entry function '{FN}' for 'sm_90a'
ptxas info    : Function properties for {FN}
    104 bytes stack frame, 148 bytes spill stores, 192 bytes spill loads
ptxas info    : Used 168 registers, used 16 barriers, 104 bytes cumulative stack size, 176 bytes smem
ptxas info    : Compiling entry function '{OTHER}' for 'sm_90a'
ptxas info    : Function properties for {OTHER}
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 1 barriers, 4224 bytes smem
"""

SASS = f"""\t\tFunction : {FN}
        /*1f40*/                   WARPGROUP.ARRIVE ;                                   /* 0x00000000000079c5 */
        /*1f50*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR20], RZ, !UPT ;  /* 0x01e00000141879f0 */
        /*2240*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR20], R24, gsb0 ; /* 0x01e00000141879f0 */
        /*2260*/                   WARPGROUP.ARRIVE ;                                   /* 0x00000000000079c5 */
        /*2270*/                   HGMMA.64x8x16.F16 RZ, gdesc[URZ], RZ, !UPT, gsb0 ;  /* 0x000000003fff79f0 */
        /*25c0*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;                      /* 0x00008000000079c5 */
\t\tFunction : {OTHER}
        /*0010*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;                        /* 0x0000000000007b1d */
"""


def test_parse_ptxas_reads_each_function_and_its_notes():
    info = sass_check.parse_ptxas(PTXAS)
    assert info[FN]["regs"] == 168
    assert (info[FN]["spill_st"], info[FN]["spill_ld"]) == (148, 192)
    assert info[FN]["notes"] == {"C7519": 2, "C7515": 1}
    assert info[OTHER]["regs"] == 32 and info[OTHER]["notes"] == {}
    assert set(info[FN]["notes"]) & sass_check.SERIALISED == {"C7515"}


def test_parse_sass_counts_products_and_empty_groups():
    counts = sass_check.parse_sass(SASS)
    assert counts[FN] == {"hgmma": 3, "empty": 1, "arrive": 2, "depbar": 1}
    assert counts[OTHER] == {"hgmma": 0, "empty": 0, "arrive": 0, "depbar": 0}


def test_every_kernel_entry_names_an_existing_header():
    for name, (header, inst) in sass_check.KERNELS.items():
        assert (ROOT / "csrc" / header).is_file(), name
        assert inst.startswith("template cudaError_t attnkit::") and inst.endswith(";"), name
