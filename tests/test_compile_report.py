"""bench.compile_report: every kernel configuration compiles ahead of time for sm_80 and sm_90, without
spilling (no local memory, no STL/LDL in the SASS), and the sm_90 attention kernels use wgmma (HGMMA in the
SASS). Runs in a subprocess: the tests' interpreter mode (TRITON_INTERPRET=1, set by conftest.py) does not
compile."""

import json
import os
import re
import subprocess
import sys

import pytest

from kernels.attention import _CONFIGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile_report") / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "bench.compile_report", "--json", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1500, check=False)
    assert out.exists(), f"compile_report wrote no rows:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(out.read_text())


def test_everything_compiles_without_spills(rows):
    assert rows
    failed = [(r["kernel"], r["arch"], r["error"]) for r in rows if not r["ok"]]
    assert not failed, failed
    spilled = [(r["kernel"], r["config"], r["arch"], r["local"], r["spill_stores"], r["spill_loads"]) for r in rows
               if r["local"] or r["spill_stores"] or r["spill_loads"]]
    assert not spilled, f"local memory (spills): {spilled}"
    for r in rows:
        assert r["registers"] <= 255 and r["shared"] <= (227 if r["arch"] == 90 else 163) * 1024, r


def test_every_attention_config_is_compiled_for_its_arch(rows):
    compiled = {(r["kernel"], r["arch"], r["config"]) for r in rows}
    for (major, d, fp32), cfg in _CONFIGS.items():
        for kind, (block_m, block_n, warps, stages) in cfg.items():
            name = f"attn_{kind} D={d} {'fp32' if fp32 else 'bf16'} causal dropout"
            assert (name, major * 10, f"{block_m}x{block_n} w{warps} s{stages}") in compiled, name
    assert {r["arch"] for r in rows} == {80, 90}


def test_cross_entropy_loops_move_16_bytes_per_access(rows):
    """The cross-entropy passes are bandwidth-bound: every global load and store in their loops is a 16-byte
    access, also on rows of V = 40478 that start off a 16-byte boundary (2-byte ones before the rows were
    walked in aligned groups)."""
    ce_rows = [r for r in rows if r["fn"] in ("_cross_entropy_kernel", "_scale_grad_kernel")]
    assert len(ce_rows) >= 8
    assert all(r["loop_narrow_global"] == 0 and r["global_loads_128"] > 0 for r in ce_rows), \
        [(r["kernel"], r["arch"], r["loop_narrow_global"]) for r in ce_rows if r["loop_narrow_global"]]


def test_cross_entropy_fits_two_programs_per_sm(rows):
    """The cross-entropy kernel is bound by the bytes its loads have in flight, one 16-byte load per thread and
    block: its registers (allocated per warp in steps of 8 a thread, 64K per SM) must let at least two programs,
    1024 threads, share an SM. At 32 warps and 8192 columns it held 49-64 registers, one program per SM. The
    default launch only: the tuner's candidates (named _unroll, and _row: the row read once, which holds it in
    registers, one program per SM) are there for bench.tune_cross_entropy to measure."""
    ce_rows = [r for r in rows if r["fn"] == "_cross_entropy_kernel" and not re.search("_unroll|_row$", r["kernel"])]
    assert len(ce_rows) >= 8

    def programs_per_sm(r):
        return 65536 // (-(-r["registers"] // 8) * 8 * 32 * r["num_warps"])

    assert all(programs_per_sm(r) >= 2 for r in ce_rows), \
        [(r["kernel"], r["arch"], r["registers"], r["num_warps"]) for r in ce_rows if programs_per_sm(r) < 2]


def test_cross_entropy_statistics_loop_has_no_barrier(rows):
    """The first pass keeps per-lane running statistics and combines them once per row: no reduction across the
    program's warps, hence no barrier, inside any loop of the kernel (6 per block before, three reductions), except
    with label smoothing, whose sum of x is reduced per block."""
    ce_rows = [r for r in rows if r["fn"] == "_cross_entropy_kernel" and "smoothing" not in r["kernel"]]
    assert len(ce_rows) >= 6
    assert all(r["loop_barriers"] == 0 for r in ce_rows), \
        [(r["kernel"], r["arch"], r["loop_barriers"]) for r in ce_rows if r["loop_barriers"]]


def test_sm90_attention_uses_wgmma(rows):
    # the fp32 specs compile exact fp32 dots (torch's default matmul precision), which run on the FMA units
    matmul_rows = [r for r in rows if r["arch"] == 90 and r["fn"] in
                   ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel") and "fp32" not in r["kernel"]]
    assert matmul_rows
    assert all(r["wgmma"] for r in matmul_rows), [(r["kernel"], r["config"]) for r in matmul_rows if not r["wgmma"]]
    # what the hardware runs: the PTX's wgmma became HGMMA instructions in the SASS
    assert all(r["hgmma"] > 0 for r in matmul_rows), [(r["kernel"], r["config"]) for r in matmul_rows if not r["hgmma"]]


def test_sass_counts():
    from bench.compile_report import sass_counts

    sass = """        /*0a50*/                   STL.64 [R1+0x8], R4 ;
        /*0a60*/              @!P0 LDL R6, [R1+0x8] ;
        /*0a70*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0a80*/                   HMMA.16816.F32.BF16 R8, R12, R16, R8 ;
        /*0a90*/                   STS.U8 [R3], R2 ;
        /*0aa0*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0ab0*/              @P1  LDS.U8 R5, [R3] ;
        /*0ac0*/                   LDSM.16.M88.4 R8, [R9] ;
        /*0ad0*/                   LDG.E.128 R12, desc[UR4][R2.64] ;
        /*0ae0*/              @!P2 LDG.E.U16 R7, desc[UR4][R4.64] ;
        /*0af0*/                   STG.E.128 desc[UR4][R2.64], R12 ;"""
    assert sass_counts(sass) == {"STL": 1, "LDL": 1, "HGMMA": 1, "HMMA": 1, "STS": 1, "LDS": 1, "BAR": 1, "LDG": 2,
                                 "STG": 1, "LDG128": 1, "STG128": 1, "total": 11, "loop_instructions": [],
                                 "loop_narrow_global": 0, "loop_barriers": 0}


def test_loop_bodies():
    from bench.compile_report import sass_counts

    sass = """        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   IMAD R2, R3, R4, R5 ;
        /*0018*/                   LDG.E.128 R12, desc[UR4][R2.64] ;
        /*0020*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0028*/              @!P1 STG.E.U16 desc[UR4][R4.64], R7 ;
        /*002c*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0030*/              @P0  BRA 0x10 ;
        /*0040*/                   BRA 0x60 ;
        /*0050*/                   LDG.E.U16 R7, desc[UR4][R4.64] ;
        /*0060*/                   EXIT ;"""
    counts = sass_counts(sass)
    assert counts["loop_instructions"] == [6]  # 0x10-0x30; the forward branch is no loop
    assert counts["loop_narrow_global"] == 1  # the 2-byte store in the loop; not the 2-byte load after it
    assert counts["loop_barriers"] == 1


def test_compile_specs_are_dicts_naming_every_argument():
    import importlib

    from bench.compile_report import SPEC_MODULES, _normalize

    for mod_name in SPEC_MODULES:
        for spec in importlib.import_module(mod_name).COMPILE_SPECS:
            assert isinstance(spec, dict), (mod_name, spec)
            spec = _normalize(spec)
            assert set(spec["signature"]) | set(spec["constexprs"]) == set(spec["fn"].arg_names), spec["name"]
    with pytest.raises(ValueError, match="missing"):
        _normalize({"name": "x", "fn": None})


@pytest.mark.parametrize("argv, msg", [(["--filter", "nosuchkernel"], "no kernel's name contains it"),
                                       (["--arch", "75"], "no compile target for [75]"),
                                       (["--jobs", "0"], "--jobs must be at least 1")])
def test_flags_that_select_nothing_are_usage_errors(argv, msg):
    """It used to print "0 compiled, 0 failed" and exit 0, as if every kernel had passed."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "bench.compile_report", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=False, timeout=600)
    assert proc.returncode == 2 and msg in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]
