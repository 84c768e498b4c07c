"""Ahead-of-time compile report: every kernel configuration compiled for sm_80 and sm_90 on a machine without GPU.

    python -m bench.compile_report [--arch 80 90] [--filter attn_fwd] [--jobs N] [--json out.json] [--markdown out.md]

The Triton interpreter cannot show what the compiler does with a kernel, so this compiles each kernel
configuration of the GPT-1 shapes with `triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, ...))`
(no GPU needed) and reads the cubin with the `cuobjdump -res-usage` that ships in triton's nvidia backend.
It prints one row per (kernel, configuration, arch): registers per thread, shared memory (dynamic, as the
launch needs it), local memory (the stack frame plus local arrays: register spills land there), the spill
traffic in the SASS (`cuobjdump -sass`: STL stores / LDL loads to local memory), on sm_90 whether the
kernel uses wgmma (Hopper's warpgroup MMA: wgmma.mma_async in the PTX, HGMMA instructions in the SASS; the
SASS count is what the hardware runs), and the instruction mix: SASS instructions in all (static: a loop body
counts once, so compare variants of one kernel, not kernels), in each loop body (per key or query block: the
closest static measure of the time), the shared-memory stores / loads and barriers, where a tile changing
register layout makes its round trip, and the global loads / stores with, in brackets, those that move 16 bytes
(a bandwidth-bound kernel wants all of its loop's accesses among them). Must run WITHOUT TRITON_INTERPRET=1.
--markdown writes the same table as Markdown (bench/gpu_session.sh keeps it beside the GPU results).

Registry format. A kernel module takes part by defining a module-level list `COMPILE_SPECS`; the modules
listed in `SPEC_MODULES` are imported (a missing module is skipped). Each entry is a dict

    {"name": ..., "fn": ..., "signature": ..., "constexprs": ..., "num_warps": ..., "num_stages": ...,
     "archs": (80, 90)}                                                   # "archs" optional, default both

- name: str, the row label, e.g. "attn_fwd D=64 bf16 causal dropout".
- fn: the @triton.jit kernel (the function object, not a launcher).
- signature: dict {argument name: type} for every argument that is not in constexprs; types as in
  triton/tools/compile.py: "*fp16", "*bf16", "*fp32", "*i32", "*i64", "*i8", "i32", "i64", "fp32".
  A ":16" suffix ("*bf16:16", "i32:16") promises 16-byte alignment / divisibility by 16, as the JIT
  specializes for the actual GPT-1 tensors (torch allocations are aligned; strides like 768 divide by 16).
- constexprs: dict {argument name: value} for every tl.constexpr argument, plus integer arguments the
  JIT would turn into constants (an argument equal to 1, e.g. the innermost stride).
- num_warps, num_stages: the launch options of that configuration.
- archs: the compute capabilities the configuration is for (a table entry for Hopper only: (90,)).
"""

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

from . import common

SPEC_MODULES = ("kernels.attention", "kernels.cross_entropy", "kernels.layer_norm", "kernels.gelu")
ARCHS = (80, 90)


_FIELDS = ("name", "fn", "signature", "constexprs", "num_warps", "num_stages", "archs")


def _normalize(spec):
    """The spec dict with "archs" filled in; a missing or unknown field is an error here, not a bad row."""
    unknown, missing = set(spec) - set(_FIELDS), set(_FIELDS[:6]) - set(spec)
    if unknown or missing:
        raise ValueError(f"COMPILE_SPECS entry {spec.get('name')!r}: unknown fields {sorted(unknown)}, "
                         f"missing {sorted(missing)}")
    return {"archs": ARCHS, **spec}


def load_specs(modules=SPEC_MODULES):
    """[(module, index, spec dict)] for every COMPILE_SPECS entry of the modules that exist."""
    out = []
    for mod_name in modules:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name != mod_name:
                raise
            continue
        for i, spec in enumerate(getattr(mod, "COMPILE_SPECS", [])):
            out.append((mod_name, i, _normalize(spec)))
    return out


def _ast_source(fn, signature, constexprs):
    from triton.compiler import ASTSource

    # triton 3.6 and 3.9 both want every argument in the signature (constexprs as "constexpr") and
    # divisibility hints as attrs keyed by (argument index,)
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        if name not in signature:
            raise KeyError(f"{fn.__name__}: argument {name!r} is in neither signature nor constexprs")
        ty, _, hint = signature[name].partition(":")
        sig[name] = ty
        if hint == "16":
            attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn=fn, signature=sig, constexprs=dict(constexprs), attrs=attrs)


def _cuobjdump():
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _cuobjdump_out(cubin, flag):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_cuobjdump(), flag, f.name], capture_output=True, text=True, check=True).stdout


def _res_usage(cubin):
    """REG, SHARED, STACK, LOCAL of the (single) function in a cubin, from cuobjdump -res-usage."""
    fields = dict(re.findall(r"\b(REG|SHARED|STACK|LOCAL):(\d+)", _cuobjdump_out(cubin, "-res-usage")))
    return {k.lower(): int(v) for k, v in fields.items()}


# a SASS instruction: /*0a50*/ [@P0 |@!P0 ] OPCODE.MODIFIERS operands ;
_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)([^;]*);")


def _instructions(sass):
    """[(address, opcode, operands)] of the SASS, in address order."""
    return [(int(a, 16), op, rest) for a, op, rest in _SASS_LINE.findall(sass)]


def _moves_16_bytes(opcode_and_modifiers):
    """Whether a global access (LDG.E.128, STG.E.128: yes; LDG.E.U16: no) moves 16 bytes."""
    return opcode_and_modifiers.endswith(".128")


def _loops(lines):
    """The instructions of each loop of the parsed SASS (_instructions), in address order: a loop is a backward
    branch (BRA to a lower address) and runs the instructions from its target to itself."""
    index = {addr: i for i, (addr, _, _) in enumerate(lines)}
    found = []
    for i, (addr, op, rest) in enumerate(lines):
        target = re.search(r"0x([0-9a-f]+)", rest) if op == "BRA" else None
        if target and int(target.group(1), 16) < addr:
            found.append(lines[index[int(target.group(1), 16)]:i + 1])
    return found


def sass_counts(sass):
    """{"STL", "LDL", "HGMMA", "HMMA", "STS", "LDS", "BAR", "LDG", "STG", "LDG128", "STG128", "total",
    "loop_instructions", "loop_narrow_global", "loop_barriers"}, from one parse of the SASS: local-memory stores /
    loads (spills), tensor-core instructions, shared-memory stores / loads and barriers (a layout conversion between
    register layouts goes through shared memory: one STS/LDS pair and barriers per converted tile), global loads /
    stores in all and those moving 16 bytes (.128: what a bandwidth-bound loop needs; a 2-byte LDG.E.U16 moves an
    eighth as much per instruction), the number of instructions (static: a loop body counts once), the number in
    each loop body (the kernels' loops over key or query blocks are where their time goes, so these, not the total,
    say what a change costs per block), the global accesses inside loops that move less than 16 bytes, and the
    barriers inside loops (a reduction across a program's warps goes through shared memory between two barriers:
    in a bandwidth-bound loop each one stalls every warp of the program until all have arrived)."""
    lines = _instructions(sass)
    ops = [op for _, op, _ in lines]
    counts = {op: ops.count(op) for op in ("STL", "LDL", "HGMMA", "HMMA", "STS", "LDS", "BAR", "LDG", "STG")}
    for op in ("LDG", "STG"):
        counts[op + "128"] = sum(o == op and _moves_16_bytes(rest.split(None, 1)[0]) for _, o, rest in lines)
    bodies = _loops(lines)
    narrow = sum(op in ("LDG", "STG") and not _moves_16_bytes(rest.split(None, 1)[0])
                 for body in bodies for _, op, rest in body)
    barriers = sum(op == "BAR" for body in bodies for _, op, _ in body)
    return {**counts, "total": len(ops), "loop_instructions": [len(b) for b in bodies], "loop_narrow_global": narrow,
            "loop_barriers": barriers}


def compile_one(mod_name, index, arch):
    """Compile COMPILE_SPECS[index] of mod_name for sm_<arch>; returns a report row (dict)."""
    import triton
    from triton.backends.compiler import GPUTarget

    spec = _normalize(importlib.import_module(mod_name).COMPILE_SPECS[index])
    name, fn, signature, constexprs, num_warps, num_stages = (spec[k] for k in _FIELDS[:6])
    row = dict(kernel=name, fn=fn.__name__, arch=arch, num_warps=num_warps, num_stages=num_stages,
               config=_config_label(constexprs, num_warps, num_stages))
    try:
        kernel = triton.compile(_ast_source(fn, signature, constexprs),
                                target=GPUTarget("cuda", arch, 64 if arch >= 90 else 32),
                                options=dict(num_warps=num_warps, num_stages=num_stages))
    except Exception as e:  # noqa: BLE001 -- report it, the table goes on
        return dict(row, ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
    usage = _res_usage(kernel.asm["cubin"])
    sass = sass_counts(_cuobjdump_out(kernel.asm["cubin"], "-sass"))
    return dict(row, ok=True, registers=usage.get("reg"), shared=kernel.metadata.shared,
                local=usage.get("stack", 0) + usage.get("local", 0), spill_stores=sass["STL"],
                spill_loads=sass["LDL"], wgmma="wgmma.mma_async" in kernel.asm["ptx"], hgmma=sass["HGMMA"],
                hmma=sass["HMMA"], instructions=sass["total"], smem_stores=sass["STS"], smem_loads=sass["LDS"],
                barriers=sass["BAR"], global_loads=sass["LDG"], global_loads_128=sass["LDG128"],
                global_stores=sass["STG"], global_stores_128=sass["STG128"],
                loop_instructions=sass["loop_instructions"], loop_narrow_global=sass["loop_narrow_global"],
                loop_barriers=sass["loop_barriers"])


def _config_label(constexprs, num_warps, num_stages):
    blocks = "x".join(str(v) for k, v in constexprs.items() if k.startswith("BLOCK"))
    return f"{blocks} w{num_warps} s{num_stages}"


def _jobs(specs, archs):
    for mod_name, i, spec in specs:
        for arch in spec["archs"]:
            if arch in archs:
                yield mod_name, i, arch


def run(archs=ARCHS, name_filter=None, jobs=None):
    specs = [s for s in load_specs() if not name_filter or name_filter in s[2]["name"]]
    work = list(_jobs(specs, archs))
    with ProcessPoolExecutor(max_workers=jobs or os.cpu_count()) as pool:
        return list(pool.map(compile_one, *zip(*work))) if work else []


HEAD = ("kernel", "config", "arch", "regs", "smem", "local", "STL/LDL", "wgmma", "instrs", "loop instrs",
        "STS/LDS/BAR", "loop BAR", "LDG/STG (16 B)")


def _cells(r):
    if not r["ok"]:
        return [r["kernel"], r["config"], f"sm_{r['arch']}", "FAILED", r["error"]]
    wgmma = "-" if r["arch"] < 90 else "no" if not (r["wgmma"] or r["hgmma"]) else f"yes ({r['hgmma']} HGMMA)"
    return [r["kernel"], r["config"], f"sm_{r['arch']}", str(r["registers"]), str(r["shared"]), str(r["local"]),
            f"{r['spill_stores']}/{r['spill_loads']}", wgmma, str(r["instructions"]),
            "/".join(map(str, r["loop_instructions"])) or "-", f"{r['smem_stores']}/{r['smem_loads']}/{r['barriers']}",
            str(r["loop_barriers"]),
            f"{r['global_loads']} ({r['global_loads_128']})/{r['global_stores']} ({r['global_stores_128']})"]


def format_table(rows):
    widths = (44, 18, 5, 5, 7, 6, 8, 16, 6, 12, 11, 8, 14)
    lines = [" ".join(f"{h:<{w}}" for h, w in zip(HEAD, widths)).rstrip()]
    for r in rows:
        lines.append(" ".join(f"{c:<{w}}" for c, w in zip(_cells(r), widths)).rstrip())
    return "\n".join(lines)


def format_markdown(rows):
    lines = ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in _cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), help="compute capabilities")
    parser.add_argument("--filter", default=None, help="only kernels whose name contains this")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: CPU count)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--markdown", default=None, help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("compile_report: unset TRITON_INTERPRET, the interpreter does not compile")
    common.check_at_least(parser, args, jobs=1)
    unknown = sorted(set(args.arch) - set(ARCHS))
    if unknown:
        parser.error(f"--arch: no compile target for {unknown}; targets: {list(ARCHS)}")
    rows = run(tuple(args.arch), args.filter, args.jobs)
    if not rows:
        parser.error(f"--filter {args.filter!r}: no kernel's name contains it")
    print(format_table(rows))
    if args.json:
        with common.open_for_writing(args.json) as f:
            json.dump(rows, f, indent=1)
    bad = [r for r in rows if not r["ok"] or r["local"] or r["spill_stores"]]
    summary = (f"{len(rows)} compiled, {sum(not r['ok'] for r in rows)} failed, "
               f"{sum(r['ok'] and (r['local'] > 0 or r['spill_stores'] > 0) for r in rows)} with local memory "
               "(spills)")
    if args.markdown:
        with open(args.markdown, "w") as f:
            import triton

            f.write(f"# Compile report (triton {triton.__version__})\n\n{format_markdown(rows)}\n\n{summary}\n")
    print(f"\n{summary}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
