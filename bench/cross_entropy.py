"""Cross-entropy, and linear + cross-entropy: our fused kernels against the eager reference and its peers.

    python -m bench.cross_entropy --out DIR [--smoke]

Two tables per vocabulary size V (40478, GPT-1's; 50257, GPT-2's), N = 2k..32k tokens, bf16:

- cross-entropy of given (N, V) logits. Providers: ours (kernels.fused_cross_entropy), eager (torch's own
  F.cross_entropy on the bf16 logits, as a bf16 model calls it), torch.compile of that call, liger
  (Liger-Kernel's cross-entropy). GB/s counts the bytes that must move: the logits read once (fwd), the
  gradient written once (bwd), both for fwd+bwd.
- linear + cross-entropy of (N, C=768) hidden states and the (V, C) tied head. Providers: ours
  (kernels.fused_linear_cross_entropy, chunked), ours-unfused (F.linear, then our fused cross-entropy: the
  model's loss_impl="triton"), eager (F.linear, then F.cross_entropy, in bf16), torch.compile of it, liger
  (Liger's fused linear cross-entropy). TFLOP/s counts the head's matmuls: 2*N*V*C forward, twice that backward.

Ours' linear + cross-entropy fwd+bwd at the first (largest) N also gets its anatomy (bench.profile_step's, the
call profiled as a step): kernel ms by family and its costliest kernels with their launches, under its table in
results.md and as the row's "anatomy" in results.json.

The eager baseline is torch's bf16 call, not kernels/reference.py's fp32 upcast (the tests' reference, and the
model's loss_impl="eager"; under torch.autocast F.cross_entropy runs in fp32 as well): it is the fastest
plain-torch way to call the op on these inputs.

Ours and Liger compute the gradient during the forward and write it into the logits buffer: their "fwd" does
the backward's work and they have no backward of their own to time ("bwd" is n/a), so compare them on
fwd+bwd. Their cost does not depend on the values, so iterations reuse the overwritten buffer rather than
timing a clone of it. N runs from the largest (the headline shape) down, so that a time budget cuts the
small ones.
"""

import functools
import os

from . import common

GRID = {"N": (32768, 16384, 8192, 4096, 2048), "V": (40478, 50257), "C": 768}
SMOKE_GRID = {"N": (16, 24), "V": (300,), "C": 16}
BWD_FACTOR = {"fwd": 1, "bwd": 1, "fwd+bwd": 2}  # logits reads / gradient writes per mode
MATMULS = {"fwd": 1, "bwd": 2, "fwd+bwd": 3}  # (N, V, C) matmuls per mode
GRAD_IN_FORWARD = ("ours", "ours-unfused", "liger")  # they write the gradient during the forward


def ce_bytes(N, V, elem_size=2, mode="fwd+bwd"):
    """Bytes that must move: the (N, V) logits read once and/or their gradient written once."""
    return N * V * elem_size * BWD_FACTOR[mode]


def linear_ce_flops(N, V, C, mode="fwd+bwd"):
    """Matmul FLOPs of the head: logits = h W^T forward; dh = dlogits W and dW = dlogits^T h backward."""
    return 2 * N * V * C * MATMULS[mode]


def ce_providers(smoke):
    import kernels
    from kernels import reference

    return {"ours": kernels.fused_cross_entropy, "eager": torch_cross_entropy,
            "torch.compile": common.compiled(torch_cross_entropy, smoke), "liger": reference.liger_cross_entropy}


def linear_providers(smoke):
    import kernels
    from kernels import reference

    return {"ours": kernels.fused_linear_cross_entropy, "ours-unfused": _linear_then_fused_ce,
            "eager": torch_linear_cross_entropy,
            "torch.compile": common.compiled(torch_linear_cross_entropy, smoke),
            "liger": reference.liger_fused_linear_cross_entropy}


def torch_cross_entropy(logits, target):
    """torch's own cross-entropy on the logits as they are (bf16 here): the eager baseline."""
    import torch.nn.functional as F

    return F.cross_entropy(logits, target)


def torch_linear_cross_entropy(hidden, weight, target):
    import torch.nn.functional as F

    return F.cross_entropy(F.linear(hidden, weight), target)


def _linear_then_fused_ce(hidden, weight, target):
    import torch.nn.functional as F

    import kernels

    return kernels.fused_cross_entropy(F.linear(hidden, weight), target)


def run(smoke, deadline=None):
    import torch

    grid, dev = (SMOKE_GRID if smoke else GRID), common.device()
    deadline, env, rows = deadline or common.Deadline(0), common.environment(smoke), []
    ce, linear = ce_providers(smoke), linear_providers(smoke)
    for V in grid["V"]:
        for N in grid["N"]:
            base = dict(env, bench="cross_entropy", x=N, N=N, V=V, dtype="bf16")
            target = torch.randint(0, V, (N,), device=dev)
            logits = torch.randn(N, V, device=dev, dtype=torch.bfloat16, requires_grad=True)
            for name, fn in ce.items():
                rows += bench_provider(dict(base, table=f"cross-entropy V={V} bf16"), name,
                                       functools.partial(fn, logits, target), [logits], smoke, deadline)
            logits = None
            common.free_memory()
            hidden = torch.randn(N, grid["C"], device=dev, dtype=torch.bfloat16, requires_grad=True)
            weight = (0.02 * torch.randn(V, grid["C"], device=dev, dtype=torch.bfloat16)).requires_grad_()
            for name, fn in linear.items():
                rows += bench_provider(dict(base, table=f"linear + cross-entropy C={grid['C']} V={V} bf16",
                                            C=grid["C"]), name, functools.partial(fn, hidden, weight, target),
                                       [hidden, weight], smoke, deadline)
                if name == "ours" and N == grid["N"][0] and rows[-1]["status"] == "ok":
                    rows[-1]["anatomy"] = linear_anatomy(functools.partial(fn, hidden, weight, target),
                                                         [hidden, weight])
            hidden = weight = None
            common.free_memory()
    return rows


def linear_anatomy(call, inputs, steps=3):
    """Where ours' fwd+bwd of the linear cross-entropy spends its GPU time (bench.profile_step's anatomy of the call
    as a step: kernel ms by family, the costliest kernels with their launches), and its operators; on a CPU the
    operators only."""
    import torch

    from bench.profile_step import anatomy

    def step():
        for t in inputs:
            t.grad = None
        call().backward()

    a = anatomy(step, inputs[0].device, steps=steps, host=False)
    keep = ("wall_ms", "gpu_kernel_ms", "gpu_busy", "kernels_per_step", "families", "top_kernels", "ops_per_step")
    out = {k: a[k] for k in keep if k in a}
    if "families" in out:
        out["families"] = {f: v["ms"] for f, v in out["families"].items() if v["ms"]}
    if inputs[0].is_cuda:
        torch.cuda.synchronize()
    return out


def anatomy_markdown(rows):
    """The linear cross-entropy's anatomy (linear_anatomy), under its table; nothing where none was measured."""
    lines = []
    for r in rows:
        a = r.get("anatomy")
        if not a or "top_kernels" not in a:
            continue
        lines += ["", f"### Where ours' linear + cross-entropy fwd+bwd spends its time (N={r['N']}, V={r['V']}, "
                      f"C={r['C']}, one call profiled)", "",
                  f"{a['wall_ms']:.2f} ms wall, {a['gpu_kernel_ms']:.2f} ms of kernels, {a['kernels_per_step']:.0f} "
                  f"launches; by family: " + ", ".join(f"{f} {ms:.2f}" for f, ms in a["families"].items()), "",
                  "| kernel | ms | launches | family |", "|---|---|---|---|"]
        lines += [f"| `{name[:90]}` | {ms:.3f} | {n:.0f} | {fam} |" for name, ms, n, fam in a["top_kernels"][:12]]
    return lines


def bench_provider(base, name, call, inputs, smoke, deadline):
    if deadline.passed():
        return [dict(base, provider=name, mode=m, **common.NOT_RUN) for m in common.MODES]
    rows = []
    for mode, res in common.time_modes(call, inputs, common.MODES, smoke, name in GRAD_IN_FORWARD).items():
        row = dict(base, provider=name, mode=mode, **res)
        if res["status"] == "ok" and "C" in base:
            row["tflops"] = linear_ce_flops(base["N"], base["V"], base["C"], mode) / (res["ms"] * 1e-3) / 1e12
        elif res["status"] == "ok":
            row["gbps"] = ce_bytes(base["N"], base["V"], 2, mode) / (res["ms"] * 1e-3) / 1e9
        rows.append(row)
    return rows


def _columns(throughput, label):
    return [("N", "N"), ("provider", "provider"), ("ms", common.value_or_status("ms")),
            ("p20-p80", common.spread_cell), ("host ms", common.value_or_status("host_ms")),
            ("graph ms", common.graph_cell), (label, common.value_or_status(throughput)),
            ("peak MiB", common.value_or_status("peak_mb", 5)), ("vs eager", common.ratio("vs_eager")),
            ("vs best peer", common.ratio("vs_best_peer")), ("best peer", "best_peer"),
            ("graph vs best peer", common.graph_ratio_cell), ("note", "reason")]


def markdown(rows):
    rows = [r for r in rows if r["bench"] == "cross_entropy"]
    plain = [r for r in rows if "C" not in r]
    linear = [r for r in rows if "C" in r]
    note = ("## Cross-entropy\n\nGB/s against the bytes that must move: N*V*2 (bf16 logits read once) for fwd, "
            "the same for the gradient written once in bwd, twice that for fwd+bwd. eager is torch's "
            "F.cross_entropy on the bf16 logits. Ours and liger compute the gradient in the forward (written "
            "over the logits), so their fwd includes the backward's work and their bwd is n/a: compare on "
            "fwd+bwd.")
    linear_note = ("## Linear + cross-entropy\n\nTFLOP/s of the head's matmuls: 2*N*V*C forward, x2 backward, x3 "
                   "fwd+bwd. ours = chunked fused linear cross-entropy; ours-unfused = F.linear then our fused "
                   "cross-entropy (the model's loss_impl=\"triton\").")
    return (common.tables_markdown(plain, _columns("gbps", "GB/s"), note)
            + common.tables_markdown(linear, _columns("tflops", "TFLOP/s"), linear_note)
            + anatomy_markdown(linear) + common.unavailable(rows) + [""])


def plot(rows, out_dir):
    rows, paths = [r for r in rows if r["bench"] == "cross_entropy"], []
    for table in dict.fromkeys(r["table"] for r in rows):
        slug = "linear_cross_entropy" if table.startswith("linear") else "cross_entropy"
        V = next(r["V"] for r in rows if r["table"] == table)
        path = os.path.join(out_dir, f"{slug}_V{V}.png")
        paths.append(common.line_plot(rows, "ms", path, f"{table}: ms against N (lower is better)", "N tokens",
                                      "ms", [(table, m) for m in common.MODES]))
    return paths


def main(argv=None):
    args = common.cli_parser(__doc__.splitlines()[0]).parse_args(argv)
    common.use_interpreter_without_gpu(args.smoke)
    rows = run(args.smoke, common.Deadline(args.budget_s))
    common.write_outputs(rows, common.out_dir(args), "Cross-entropy benchmark", [(markdown, plot)])


if __name__ == "__main__":
    main()
