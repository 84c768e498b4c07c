"""The benchmark harness: its FLOP/byte formulas, ratios, statuses, spreads and MFU, and one `run_all --smoke` run
end to end."""

import json
import os
import subprocess
import sys
import tarfile

import pytest

from bench import attention, common, cross_entropy, e2e, gelu, layer_norm, run_all

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_attention_flops():
    full = 4 * 2 * 12 * 512 * 512 * 64  # two (T x T x D) matmuls per head, 2 FLOPs per multiply-add
    assert attention.attention_flops(2, 12, 512, 64, causal=False, mode="fwd") == full
    assert attention.attention_flops(2, 12, 512, 64, causal=True, mode="fwd") == full / 2
    assert attention.attention_flops(2, 12, 512, 64, causal=True, mode="bwd") == full / 2 * 2.5
    assert attention.attention_flops(2, 12, 512, 64, causal=True, mode="fwd+bwd") == full / 2 * 3.5


def test_gelu_bytes():
    N, C = 16384, 3072
    assert gelu.gelu_bytes(N, C, 2, "fwd") == 2 * N * C * 2  # x read, y written
    assert gelu.gelu_bytes(N, C, 2, "bwd") == 3 * N * C * 2  # dy, x read, dx written
    assert gelu.gelu_bytes(N, C, 4) == 5 * N * C * 4


def test_layer_norm_bytes():
    N, C = 1024, 768
    assert layer_norm.ln_bytes(N, C, 2, 2, "fwd") == 3 * N * C * 2  # x, h read, y (also the bf16 branch) written
    assert layer_norm.ln_bytes(N, C, 4, 2, "fwd") == N * C * (4 + 2 + 4 + 2)  # y fp32, y_branch bf16
    assert layer_norm.ln_bytes(N, C, 2, 2, "fwd+bwd") == 9 * N * C * 2  # + dy, dy_branch, x, h read, dx, dh written
    assert layer_norm.ln_bytes(N, C, 4, 2, "bwd") == N * C * (4 + 2 + 2 * 4 + 2 * 2)


def test_cross_entropy_bytes_and_flops():
    N, V, C = 32768, 40478, 768
    assert cross_entropy.ce_bytes(N, V, 2, "fwd") == N * V * 2  # bf16 logits read once
    assert cross_entropy.ce_bytes(N, V, 2, "fwd+bwd") == 2 * N * V * 2  # ... and the gradient written once
    assert cross_entropy.linear_ce_flops(N, V, C, "fwd") == 2 * N * V * C
    assert cross_entropy.linear_ce_flops(N, V, C, "fwd+bwd") == 6 * N * V * C


def test_peak_table_and_mfu():
    assert common.peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert common.peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert common.peak_bf16_tflops("NVIDIA H200") == 989.0
    assert common.peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert common.peak_bf16_tflops("cpu (x86_64, 2 cores)") is None
    assert e2e.mfu(100_000, 1e9, 989.0) == pytest.approx(1e14 / 989e12)
    assert e2e.mfu(100_000, 1e9, None) is None
    assert common.gpu_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_ratios():
    def row(provider, ms, status="ok", x=1):
        return {"bench": "b", "table": "t", "x": x, "mode": "fwd", "provider": provider, "ms": ms, "status": status}

    rows = common.add_ratios([row("ours", 0.5), row("eager", 2.0), row("peer-a", 1.0), row("peer-b", 4.0),
                              row("peer-c", None, "oom"), row("ours", 1.0, x=2), row("eager", 3.0, x=2)])
    ours, eager, peer_a, peer_b, oom, ours2, _ = rows
    assert ours["vs_eager"] == 4.0 and ours["vs_best_peer"] == 2.0 and ours["best_peer"] == "peer-a"
    assert eager["vs_eager"] == 1.0 and peer_a["vs_best_peer"] == 1.0 and peer_b["vs_best_peer"] == 0.25
    assert "vs_eager" not in oom
    assert ours2["vs_eager"] == 3.0 and ours2["vs_best_peer"] is None  # no peer ran at x=2
    assert common.role({"provider": "ours-unfused"}) == common.OURS
    assert common.role({"provider": "triton/triton", "role": "ours"}) == common.OURS


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "bench.run_all", "--smoke", "--out", str(out)], cwd=ROOT, env=env,
                          check=False, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "results.json") as f:
        return out, json.load(f)


def test_smoke_rows(smoke_run):
    _, rows = smoke_run
    assert {r["bench"] for r in rows} == {"attention", "cross_entropy", "layer_norm", "gelu", "e2e"}
    for r in rows:
        assert r["smoke"] is True
        assert all(r.get(k) for k in ("gpu", "torch", "triton", "deepspeed", "commit")), r
        assert r["status"] in common.STATUSES
        assert (r["status"] == "ok") == (r.get("ms") is not None), r
        if r["status"] != "ok":
            assert r.get("reason"), r
    # any failure of ours or of the harness is an error, and there is none; a skip is a missing package or a
    # backend's documented refusal, nothing else
    errors = [(r["bench"], r["provider"], r["mode"], r["reason"]) for r in rows if r["status"] == "error"]
    assert not errors, errors[:3]
    for r in rows:
        if r["status"] == "skipped":
            assert r["reason"].startswith(("not installed", "refused by the backend")), r
    # ours and the eager reference run everywhere, in every mode that applies, with the ratios filled in
    for bench, providers in (("attention", ["ours", attention.TILED, "eager"]),
                             ("cross_entropy", ["ours", "ours-unfused", "eager"]),
                             ("layer_norm", ["ours", "eager"]), ("gelu", ["ours", "eager"]),
                             ("e2e", [recipe.name for recipe in e2e.ROWS])):
        for p in providers:
            mine = [r for r in rows if r["bench"] == bench and r["provider"] == p]
            assert mine and all(r["status"] in ("ok", "n/a") for r in mine), (bench, p, mine[:1])
            assert all(r["vs_eager"] > 0 for r in mine if r["status"] == "ok")
    assert any(r.get("vs_best_peer") for r in rows if r["provider"] == "ours")
    assert all(r["tflops"] > 0 and r["host_ms"] > 0 for r in rows if r["bench"] == "attention" and r["status"] == "ok")
    assert all(r["gbps"] > 0 for r in rows if r.get("table", "").startswith("cross-entropy") and r["status"] == "ok")


def test_tiled_attention_provider_turns_the_short_kernels_off():
    """`ours (tiled)` runs our attention with the short-sequence kernels off for its call, and leaves the launchers'
    config lookup as it was, also when the call fails."""
    import torch

    from kernels import attention as kernel

    q = torch.zeros(1, 1, 8, 16)
    lookup, seen = kernel._config, []

    def probe(fail):
        seen.append(kernel._config(q, False))
        if fail:
            raise RuntimeError("boom")

    attention.tiled(probe)(False)
    with pytest.raises(RuntimeError):
        attention.tiled(probe)(True)
    assert [c["short"] for c in seen] == [None, None] and kernel._config is lookup


def test_smoke_gradient_in_forward_is_not_applicable(smoke_run):
    _, rows = smoke_run
    ce = [r for r in rows if r["bench"] == "cross_entropy"]
    for r in ce:
        if r["provider"] in cross_entropy.GRAD_IN_FORWARD and r["mode"] == "bwd":
            assert r["status"] == "n/a", r
        elif r["status"] == "n/a":
            raise AssertionError(r)
    assert any(r["status"] == "n/a" for r in ce)


def test_smoke_linear_cross_entropy_anatomy(smoke_run):
    """Ours' linear cross-entropy at the grid's first N (the headline's) carries its anatomy (on a CPU its operators
    only)."""
    _, rows = smoke_run
    mine = [r for r in rows if r["bench"] == "cross_entropy" and "C" in r and r["provider"] == "ours"
            and r["mode"] == "fwd+bwd"]
    first = cross_entropy.SMOKE_GRID["N"][0]
    assert [r["N"] for r in mine if "anatomy" in r] == [first]
    assert next(r for r in mine if r["N"] == first)["anatomy"]["ops_per_step"] > 0


def test_linear_cross_entropy_anatomy_markdown():
    top = [["_cross_entropy_kernel", 3.1, 22, "loss"], ["sm90_xmma_gemm_bf16", 2.5, 44, "gemm"]]
    row = {"N": 32768, "V": 40478, "C": 768, "anatomy": {"wall_ms": 16.8, "gpu_kernel_ms": 16.1, "kernels_per_step": 90,
                                                         "families": {"loss": 3.1, "gemm": 11.0}, "top_kernels": top}}
    lines = cross_entropy.anatomy_markdown([row, {"N": 8, "anatomy": {"ops_per_step": 40}}, {"N": 8}])
    text = "\n".join(lines)
    assert "16.80 ms wall, 16.10 ms of kernels, 90 launches; by family: loss 3.10, gemm 11.00" in text
    assert "| `_cross_entropy_kernel` | 3.100 | 22 | loss |" in text and text.count("### Where") == 1


def test_smoke_e2e_rows(smoke_run):
    _, rows = smoke_run
    e2e_rows = [r for r in rows if r["bench"] == "e2e"]
    assert [r["provider"] for r in e2e_rows] == [recipe.name for recipe in e2e.ROWS]
    ours = {(r["zero"], r["compiled"]) for r in e2e_rows if r["runtime"] == "deepspeed" and r["attn_impl"] == "triton"}
    # our path at every ZeRO stage: compiled under ZeRO 0-2, uncompiled under ZeRO-3 (which refuses --compile)
    assert {(0, True), (1, True), (2, True), (3, False)} <= ours
    # a row that differs from another by its compile mode or kernel inlining alone would repeat its step: dynamo's
    # eager backend has no modes and does not trace into operators
    moot = [recipe.name for recipe in e2e.ROWS if recipe.compile_mode != "default" or recipe.inline]
    assert [r["provider"] for r in e2e_rows if r["status"] == "n/a"] == moot
    for r in e2e_rows:
        assert r["commit"] and r["description"], r
        if r["status"] == "n/a":
            assert "changes nothing" in r["reason"], r
            continue
        assert r["tokens_per_s"] > 0 and r["ms_p20"] <= r["ms"] <= r["ms_p80"], r
        assert r["ops_per_step"] > 0 and r["ops_all_per_step"] >= r["ops_per_step"], r
    peer = next(r for r in e2e_rows if r["provider"] == e2e.NANOGPT.name)
    assert peer["vs_nanogpt"] == pytest.approx(1.0)
    assert (peer["runtime"], peer["attn_impl"], peer["loss_impl"], peer["compiled"]) == ("torch", "sdpa", "eager", True)


def test_smoke_files(smoke_run):
    out, rows = smoke_run
    md = (out / "results.md").read_text()
    assert "SMOKE (" in md and "not a speed measurement" in md
    # the host that the host-bound rows ran on, carried by every row and named in the header
    assert all(r["host_cpu"] and r["host_cores"] >= 1 and r["host_dispatch_us"] > 0 for r in rows)
    assert common.host_line(rows[0]) in md and f"{rows[0]['host_cores']} cores" in md
    for text in ("## Headline", "## Attention", "## Cross-entropy", "## Linear + cross-entropy", "## Add + dropout",
                 "## End to end",
                 "vs eager", "vs best peer", "flops_per_token = 6*N + 12*L*C*T", "host ms", "p20-p80", "vs nanoGPT",
                 "GPU busy", "kernels/step", "Against the targets"):
        assert text in md, text
    plots = sorted(p.name for p in out.glob("*.png"))
    assert "e2e.png" in plots and any(p.startswith("attention_") for p in plots)
    assert any(p.startswith("cross_entropy_") for p in plots) and any(p.startswith("linear_") for p in plots)
    assert run_all.headline(rows)[0] == "## Headline"


def test_failure_statuses():
    missing = ModuleNotFoundError("No module named 'flash_attn'", name="flash_attn")
    assert common.failure(missing)[0] == "skipped"
    ours = ModuleNotFoundError("No module named 'kernels.nope'", name="kernels.nope")
    assert common.failure(ours)[0] == "error"  # a module of ours that does not import is our bug
    assert common.failure(ImportError("cannot import name 'x' from 'gpt1.train'"))[0] == "error"
    assert common.failure(RuntimeError("one of the variables needed for gradient computation has been "
                                       "modified by an inplace operation"))[0] == "error"
    assert common.failure(ValueError("bad shape"))[0] == "error"
    assert common.failure(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"))[0] == "oom"

    def refuses():
        raise RuntimeError("No available kernel.  Aborting execution.")

    def crashes():
        raise RuntimeError("an illegal memory access was encountered")

    with pytest.raises(common.Unavailable) as refused:
        common.refusable(refuses)()
    status, reason = common.failure(refused.value)
    assert status == "skipped" and "No available kernel" in reason
    with pytest.raises(RuntimeError) as crashed:
        common.refusable(crashes)()
    assert common.failure(crashed.value)[0] == "error"
    status, reason = common.failure(RuntimeError("Unsupported method call\n  Explanation: Dynamo cannot trace x\n"))
    assert status == "error" and "Explanation: Dynamo cannot trace x" in reason


def test_spread_is_real_quantiles():
    times = [float(t) for t in range(1, 31)]  # 30 steps: 1..30 ms
    ms, p20, p80 = common.spread(times)
    assert ms == 15.5 and p20 == pytest.approx(6.8) and p80 == pytest.approx(24.2)
    assert p20 > min(times) and p80 < max(times)  # not min/max
    assert common.spread([4.0]) == (4.0, 4.0, 4.0)


def test_time_modes_grad_in_forward():
    import torch

    x = torch.randn(8, requires_grad=True)
    res = common.time_modes(lambda: (x * 2).sum(), [x], common.MODES, smoke=True, grad_in_forward=True)
    assert res["bwd"]["status"] == "n/a" and "forward" in res["bwd"]["reason"]
    assert res["fwd"]["status"] == res["fwd+bwd"]["status"] == "ok"
    assert res["fwd"]["host_ms"] > 0


def test_time_modes_with_two_outputs():
    """A provider that returns a tuple (the add-LayerNorm's y and y_branch) is timed with a gradient for each
    output, both reaching the inputs."""
    import torch

    x = torch.randn(8, requires_grad=True)
    fn = lambda: (x * 2, (x * 3).to(torch.bfloat16))
    res = common.time_modes(fn, [x], common.MODES, smoke=True)
    assert all(r["status"] == "ok" for r in res.values()), res
    x.grad = None
    common._forward_backward(fn, [torch.ones(8), torch.ones(8, dtype=torch.bfloat16)])
    assert torch.equal(x.grad, torch.full((8,), 5.0))


def test_time_modes_graph_timing_on_the_cpu():
    """--smoke rows carry graph_ms None with the reason (no CUDA graphs on a CPU); their table cell says "-"."""
    import torch

    x = torch.randn(8, requires_grad=True)
    res = common.time_modes(lambda: x * 2, [x], common.MODES, smoke=True)
    for r in res.values():
        assert r["graph_ms"] is None and "without a GPU" in r["graph_reason"]
        assert common.graph_cell(dict(r, status="ok")) == "-"
    assert "graph_ms" not in common.measure_ms(lambda: x * 2, smoke=True)  # only where asked (time_modes asks)


def test_graph_ratios_compare_graph_times_only():
    """vs_best_peer_graph compares graph ms with the fastest peer's graph ms, which may be another peer than the
    fastest by ms; a peer that could not be captured is left out, and an uncaptured row of ours gets none."""
    def row(provider, ms, graph):
        return {"bench": "attention", "table": "t", "x": 128, "mode": "fwd+bwd", "provider": provider,
                "status": "ok", "ms": ms, "graph_ms": graph, **({} if graph else {"graph_reason": "not capturable"})}

    rows = common.add_ratios([row("ours", 0.5, 0.2), row("sdpa-cudnn", 0.3, 0.25), row("flash-attn", 0.4, 0.1),
                              row("liger", 0.35, None), row("eager", 1.0, 0.9)])
    ours, cudnn, flash, liger = rows[:4]
    assert ours["best_peer"] == "sdpa-cudnn" and ours["vs_best_peer"] == pytest.approx(0.6)
    assert ours["best_peer_graph"] == "flash-attn" and ours["vs_best_peer_graph"] == pytest.approx(0.5)
    assert flash["vs_best_peer_graph"] == pytest.approx(1.0) and "vs_best_peer_graph" not in liger
    assert common.graph_ratio_cell(ours) == "0.50x (flash-attn)" and common.graph_cell(liger) == "-"
    assert common.graph_cell(cudnn) == "0.25"


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graph_ms_on_cuda():
    """On a GPU: a capturable forward + backward gets a graph time no larger than its do_bench time (which adds
    the launch gaps and an L2 clear), fresh gradients per captured call; a call that syncs with the host is
    reported as not capturable, and the GPU keeps working after the failed capture."""
    import torch

    x = torch.randn(4096, 1024, device="cuda", requires_grad=True)
    res = common.time_modes(lambda: torch.nn.functional.gelu(x * 2).sum(1), [x], common.MODES, smoke=False)
    for mode, r in res.items():
        assert r["status"] == "ok" and 0 < r["graph_ms_p20"] <= r["graph_ms"] <= r["graph_ms_p80"], (mode, r)
        assert r["graph_ms"] <= 1.2 * r["ms"], (mode, r)
    x.grad = None
    common.graph_ms(lambda: (x * 3).sum().backward(), [x], 0.1)
    assert x.grad is None  # the graph's gradients are not left behind
    out = common.measure_ms(lambda: (x * 2).sum().item(), smoke=False, graph=True)
    assert out["graph_ms"] is None and out["graph_reason"].startswith("not capturable") and out["ms"] > 0
    assert torch.equal((torch.ones(3, device="cuda") * 2).cpu(), torch.full((3,), 2.0))


def test_headline_shows_short_sequences_and_host_time():
    def row(provider, T, ms, host):
        return {"bench": "attention", "table": "attention H=12 D=64", "x": T, "T": T, "D": 64, "mode": "fwd+bwd",
                "provider": provider, "status": "ok", "ms": ms, "host_ms": host}

    rows = common.add_ratios([row(p, T, ms, host) for T in (128, 256, 512, 1024)
                              for p, ms, host in (("ours", 0.1, 0.3), ("sdpa-flash", 0.2, 0.25), ("eager", 1.0, 1.1))])
    lines = "\n".join(run_all.headline(rows))
    for T in (128, 256, 512):
        assert f"x={T}" in lines
    assert "x=1024" not in lines and "ours host ms" in lines and "| 0.3 |" in lines
    assert "graph speed-up" in lines and all(line.count("|") == 13 for line in lines.splitlines() if "|" in line)


def test_budgets_renormalize():
    b = run_all.budgets(["attention", "cross_entropy"], 140, smoke=False)
    assert sum(b.values()) == pytest.approx(140) and b["attention"] > b["cross_entropy"]
    assert run_all.budgets(["e2e"], 100, smoke=True) == {"e2e": 0}


def test_e2e_verdict():
    def row(name, ms, **kw):
        return dict({"bench": "e2e", "provider": name, "status": "ok", "ms": ms}, **kw)

    rows = e2e.add_vs_nanogpt([row(e2e.NANOGPT.name, 60.0), row(e2e.DEFAULT.name, 50.0, gpu_busy=0.95,
                                                                 kernels_per_step=900),
                               row(e2e.ZERO2.name, 55.0), row("ours ZeRO-1", 45.0)])
    lines = "\n".join(e2e.verdict(rows))
    assert "1.20x (meets the target, >= 1.2x)" in lines
    assert "GPU busy: 95.0% (meets" in lines and "kernels per step: 900 (meets" in lines
    assert "fastest row (ours ZeRO-1): +22.2% step time (BEHIND" in lines
    assert "Our fastest row is not the default: ours ZeRO-1, 45.00 ms per step against 50.00, 1.33x the" in lines
    assert "ZeRO-2 did not run" in e2e.verdict(rows[:2])[-1]
    assert not any("fastest row is not" in line for line in e2e.verdict(rows[:3]))
    failed = e2e.verdict([dict(row(e2e.DEFAULT.name, None), status="error", reason="boom")])
    assert "did not run (error: boom)" in failed[0]


def test_e2e_host_table():
    """The rows' host time by package and their top functions (bench.profile_step's cProfile anatomy)."""
    timed = {"bench": "e2e", "provider": "ours", "status": "ok", "host_ms_per_step": 12.5, "host_load": 0.5,
             "host_by_package": {"deepspeed": 1.25, "triton launcher": 4.0, "other": 0.5},
             "host_top_functions": [["jit.py:600(run)", 3.0, 60.0], ["{built-in method torch.mm}", 1.5, 300.0]]}
    lines = "\n".join(e2e.host_lines([timed, {"bench": "e2e", "provider": "untimed", "status": "not run"}]))
    header = "| row | host ms/step | load/core | " + " | ".join(e2e.HOST_PACKAGE_NAMES) + " |"
    assert header in lines and "| ours | 12.5 | 0.5 | 1.25 | 4 | 0 |" in lines and "untimed" not in lines
    assert "- ours: `jit.py:600(run)` 3.00 (60); `{built-in method torch.mm}` 1.50 (300)" in lines
    assert e2e.host_lines([{"bench": "e2e", "provider": "x"}]) == []
    traced = dict(timed, runtime_calls=[["cudaLaunchKernel", 800.0, 4.5], ["cudaMemcpyAsync", 2.0, 3.25]])
    assert "- ours: `cudaLaunchKernel` 800, 4.50; `cudaMemcpyAsync` 2, 3.25" in "\n".join(e2e.host_lines([traced]))


def test_gpu_session_script_packs_its_results(tmp_path):
    """bench/gpu_session.sh in its CPU smoke form: each stage time-boxed, three files in $OUT."""
    env = dict(os.environ, SMOKE="1", OUT=str(tmp_path), PYTHON=sys.executable,
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_session.sh"), "roofline", "profile", "tune_ce",
                           "ncu"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.tgz", "session.log", "summary.md"]
    summary = (tmp_path / "summary.md").read_text()
    for text in ("roofline rc=0", "profile-default rc=0", "profile-nanogpt rc=0", "operators per step:",
                 "torch (autocast bf16, fused AdamW), sdpa/eager, compiled", "tune_ce rc=0",
                 "## cross-entropy tuning (bench.tune_cross_entropy)", "ncu rc=0"):
        assert text in summary, text
    with tarfile.open(tmp_path / "results.tgz") as tar:
        names = set(tar.getnames())
    assert {"./roofline.json", "./profile/default.json", "./profile/nanogpt.json", "./stages.txt",
            "./tune_ce/cross_entropy_tuned.json"} <= names
    # a --smoke table never reaches kernels/ (the kernels would refuse it)
    assert not os.path.exists(os.path.join(ROOT, "kernels", "cross_entropy_tuned.json"))


NCU_HEADER = ("ID", "Process ID", "Process Name", "Host Name", "Kernel Name", "Context", "Stream", "Block Size",
              "Grid Size", "Device", "CC", "Section Name", "Metric Name", "Metric Unit", "Metric Value")
NCU_METRICS = (  # (ID, kernel, grid, section, metric, unit, value), as ncu --csv --page details reports them
    ("0", "_dropout_mask_kernel", "(16, 384, 1)", "GPU Speed Of Light Throughput", "Duration", "us", "14.21"),
    ("0", "_dropout_mask_kernel", "(16, 384, 1)", "GPU Speed Of Light Throughput", "Compute (SM) Throughput", "%",
     "71.5"),
    ("0", "_dropout_mask_kernel", "(16, 384, 1)", "Launch Statistics", "Registers Per Thread", "register/thread", "26"),
    ("0", "_dropout_mask_kernel", "(16, 384, 1)", "Launch Statistics", "Shared Memory Configuration Size", "Kbyte",
     "8.19"),
    ("1", "_attn_fwd_kernel", "(8, 384, 1)", "GPU Speed Of Light Throughput", "Duration", "us", "1,071.30"),
    ("1", "_attn_fwd_kernel", "(8, 384, 1)", "Occupancy", "Achieved Occupancy", "%", "11.8"),
    ("1", "_attn_fwd_kernel", "(8, 384, 1)", "Warp State Statistics", "Warp Cycles Per Issued Instruction", "cycle",
     "7.9"),
)


def _ncu_csv():
    import csv
    import io

    out = io.StringIO()
    out.write("==PROF== Disconnected from process 1\n")
    writer = csv.writer(out, quoting=csv.QUOTE_ALL)
    writer.writerow(NCU_HEADER)
    for i, kernel, grid, section, metric, unit, value in NCU_METRICS:
        writer.writerow((i, "1", "python3", "h", kernel, "1", "7", "(128, 1, 1)", grid, "0", "9.0", section, metric,
                         unit, value))
    return out.getvalue()


def test_ncu_summary_reads_the_details_csv():
    """bench.ncu's table from ncu's `--csv --page details`: one row per launch in launch order, the chosen metrics
    with their units, the others (shared memory configuration) left out, and what ncu did not report blank."""
    from bench import ncu

    rows = ncu.summarize(_ncu_csv())
    assert [r["kernel"] for r in rows] == ["_dropout_mask_kernel", "_attn_fwd_kernel"]
    assert rows[0] == {"kernel": "_dropout_mask_kernel", "block": "(128, 1, 1)", "grid": "(16, 384, 1)",
                       "duration": "14.21 us", "SM %": "71.5 %", "registers": "26 register/thread"}
    assert rows[1]["duration"] == "1,071.30 us" and rows[1]["cycles per issue"] == "7.9 cycle"
    table = ncu.markdown(rows, "header")
    assert "| _attn_fwd_kernel | (128, 1, 1) | (8, 384, 1) | 1,071.30 us |  |  |  | 11.8 % |" in table
    assert "(no launch profiled)" in ncu.markdown([], "header")


def test_ncu_command_profiles_our_kernels_only():
    from bench import ncu

    cmd = ncu.ncu_command("ncu", "/tmp/r")
    assert cmd[cmd.index("-k") + 1] == "regex:^_" and cmd[cmd.index("--clock-control") + 1] == "none"
    assert cmd[-3:] == ["-m", "bench.ncu", "--workload"] and cmd.count("--section") == len(ncu.SECTIONS)


def _curve_runs(reference, **ours):
    return [{"name": n, "status": "ok", "losses": c} for n, c in (("reference", reference), *ours.items())]


def _offset(curve, offsets):
    return [x + d for x, d in zip(curve, offsets)]


def test_curves_criterion_anchors_on_the_reference():
    """bench.curves: each run of ours against the reference, per half: a run whose second half sits 0.09 nats off
    (the H100's eager run) fails; one 0.006 off with a per-step std of 0.003 (the H100's compiled run) agrees."""
    from bench import curves

    ref = [10.0 - 0.01 * t for t in range(200)]
    noise = [0.003 if t % 2 else -0.003 for t in range(200)]
    good = _offset(ref, [0.006 + e for e in noise])
    bad = _offset(ref, [e + (0.09 if t >= 100 else 0.0) for t, e in enumerate(noise)])
    s = curves.compare(_curve_runs(ref, compiled=good, eager=bad))
    assert list(s["runs"]) == ["compiled", "eager"] and not s["agree"] and s["not_compared"] == {}
    c, e = s["runs"]["compiled"], s["runs"]["eager"]
    assert c["agree"] and c["second_half"]["mean"] == pytest.approx(0.006)
    assert c["second_half"]["std"] == pytest.approx(0.003, rel=0.01) and c["max_abs"] == pytest.approx(0.009)
    assert c["second_half"]["bound"] == pytest.approx(curves.TOL_ABS + 3 * 0.003 / 10, rel=0.01)
    assert e["first_half"]["agree"] and not e["second_half"]["agree"] and not e["agree"]
    assert e["second_half"]["mean"] == pytest.approx(0.09)
    lines = curves.verdict(s)
    assert lines[0].startswith("compiled agrees with the reference: mean difference +0.0060 nats (second half) "
                               "within the tolerance 0.0209")
    assert lines[1].startswith("eager DOES NOT agree with the reference: mean difference +0.0900 nats (second half)")
    assert curves.compare(_curve_runs(ref, compiled=good))["agree"]


def test_curves_criterion_allows_for_the_noise_of_the_mean():
    """The same mean offset (0.03 nats) fails on a quiet pair and passes on a noisy one, whose mean is that
    uncertain: the bound is TOL_ABS + 3 standard errors."""
    from bench import curves

    ref = [5.0] * 200
    quiet = _offset(ref, [0.03 + (0.003 if t % 2 else -0.003) for t in range(200)])
    noisy = _offset(ref, [0.03 + (0.1 if t % 2 else -0.1) for t in range(200)])  # SE 0.01: bound 0.05
    s = curves.compare(_curve_runs(ref, quiet=quiet, noisy=noisy))
    assert not s["runs"]["quiet"]["agree"] and s["runs"]["noisy"]["agree"]
    assert s["runs"]["noisy"]["first_half"]["bound"] == pytest.approx(curves.TOL_ABS + 0.03, rel=0.01)


def test_curves_summary_without_the_reference_or_a_run():
    from bench import curves

    ref = [10.0 - 0.01 * t for t in range(20)]
    runs = _curve_runs(ref, compiled=ref, eager=ref)
    runs[2] = {"name": "eager", "status": "not run", "reason": "time budget spent"}
    s = curves.compare(runs)
    assert list(s["runs"]) == ["compiled"] and s["agree"]
    assert s["not_compared"] == {"eager": "not run: time budget spent"}
    assert curves.verdict(s)[-1] == "eager: not compared (not run: time budget spent)"
    runs[0] = {"name": "reference", "status": "error", "reason": "boom"}
    assert curves.compare(runs) is None and "not decided" in curves.verdict(None)[0]


def test_curves_says_how_far_a_stopped_run_got(tmp_path):
    """A run that its time box stops keeps, in its row, the last step it logged, the compile's time and its last
    output line (the H200's compiled-graphs-ln run left only "time budget spent after 218 s")."""
    import json

    from bench import curves

    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step in (1, 2, 3):
            f.write(json.dumps({"step": step, "loss": 9.0, "tokens_per_s": 1000.0 * step}) + "\n")
        f.write(json.dumps({"step": 3, "val_loss": 8.0}) + "\n")
    said = subprocess.TimeoutExpired(["x"], 5, output=b"first step, which compiles the model: 41.5 s\n 1%|  | 3/200\r",
                                     stderr=b"")
    assert curves.progress(str(tmp_path), said) == \
        " (logged step 3 at 3000 tokens/s; first step 41.5 s; last output: 1%|  | 3/200)"
    assert curves.progress(str(tmp_path / "none"), subprocess.TimeoutExpired(["x"], 5)) == " (no step logged)"


def test_curves_run_selection():
    """--runs: names from RUNS, the reference always run and first (a budget cut keeps the anchor)."""
    from bench import curves

    assert curves.parse_args([]).runs == ["reference", "compiled", "eager", "compiled-graphs-ln"]
    assert curves.parse_args(["--runs", "eager-attn,eager,eager-attn"]).runs == ["reference", "eager-attn", "eager"]
    assert curves.parse_args(["--runs", "eager,reference, compiled"]).runs == ["reference", "eager", "compiled"]
    proc = subprocess.run([sys.executable, "-m", "bench.curves", "--runs", "eager,bogus"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode != 0 and proc.stderr.count("\n") == 1, proc.stderr
    assert "unknown run(s) bogus" in proc.stderr and "eager-loss" in proc.stderr
    with pytest.raises(SystemExit):
        curves.parse_args(["--steps", "0"])  # not the default's sentinel: a curve needs two steps


@pytest.mark.parametrize("module,args,msg", [
    ("bench.e2e", ["--only", "nanoGPT recipe,bogus"], "--only: unknown row(s) 'bogus'; rows: 'nanoGPT recipe'"),
    ("bench.run_all", ["--only", "attention,bogus"], "--only: unknown bench(es) bogus; benches: attention"),
])
def test_only_names_an_unknown_row_or_bench(module, args, msg):
    """A misspelt --only name is an error naming the known ones (it used to run nothing, or raise a KeyError),
    on a CPU as on a GPU: checked before the GPU is."""
    proc = subprocess.run([sys.executable, "-m", module, "--smoke", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 2 and msg in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_curves_run_flags_under_smoke():
    """--smoke names our kernels for what a run leaves to "auto", and never replaces torch's where a run names them."""
    import argparse

    from bench import curves

    smoke, gpu = argparse.Namespace(smoke=True), argparse.Namespace(smoke=False)
    flags = {name: curves.run_flags(smoke, f) for name, f in curves.RUNS.items()}
    assert flags["compiled"] == ["--compile", "--attn-impl", "triton", "--loss-impl", "triton_linear"]
    assert flags["eager-attn"] == curves.RUNS["eager-attn"] + ["--attn-impl", "triton"]
    assert flags["eager-loss"] == curves.RUNS["eager-loss"] + ["--loss-impl", "triton_linear"]
    assert flags["reference"] == curves.RUNS["reference"]
    assert flags["reference-2"] == curves.RUNS["reference"] + ["--dropout-seed", "2"]  # torch's kernels, other masks
    assert flags["compiled-reference"] == curves.RUNS["compiled-reference"]
    assert flags["compiled-graphs"] == curves.RUNS["compiled-graphs"] + ["--attn-impl", "triton", "--loss-impl",
                                                                         "triton_linear"]
    assert flags["compiled-ln"] == ["--compile", "--norm-impl", "triton", "--attn-impl", "triton", "--loss-impl",
                                    "triton_linear"]
    assert flags["compiled-graphs-ln"] == curves.RUNS["compiled-graphs-ln"] + ["--attn-impl", "triton",
                                                                               "--loss-impl", "triton_linear"]
    assert all(curves.run_flags(gpu, f) == f for f in curves.RUNS.values())


def test_curves_smoke(tmp_path):
    """bench.curves --smoke: four real gpt1.train runs (gpt1-tiny; torch's kernels, then ours under the
    interpreter, compiled and not, then torch's with --dropout-seed) on a corpus it prepares; without dropout each
    agrees with the reference, and the reseeded reference is the reference itself: --dropout-seed changes neither
    the initial weights nor the batches."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "bench.curves", "--smoke", "--dropout", "0", "--steps", "3",
                           "--runs", "compiled,eager,reference-2", "--out", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "results.json").read_text())
    assert [r["name"] for r in result["runs"]] == ["reference", "compiled", "eager", "reference-2"]
    assert [r["status"] for r in result["runs"]] == ["ok"] * 4
    assert all(len(r["losses"]) == 3 for r in result["runs"])
    assert result["runs"][3]["losses"] == result["runs"][0]["losses"]
    assert "--dropout-seed 2" in result["runs"][3]["flags"]
    # ZeRO-0 under autocast: our guard clips, so every step's gradient norm is logged; none was skipped
    assert all(len(r["grad_norms"]) == 3 and min(r["grad_norms"]) > 0 and r["skipped_steps"] == 0
               for r in result["runs"])
    compiled = result["runs"][1]
    assert "--attn-impl triton" in compiled["flags"] and compiled["first_step_s"] > 0
    s = result["summary"]
    assert s["agree"] and list(s["runs"]) == ["compiled", "eager", "reference-2"], s
    assert all(p["max_abs"] < 2e-3 for p in s["runs"].values()), s
    md = (tmp_path / "results.md").read_text()
    assert "compiled agrees with the reference" in md and "eager agrees with the reference" in md
    assert "Gradient norm before clipping" in md and "x) |" in md  # the ratio to the reference's
    assert "compiled agrees with the reference" in proc.stdout
    assert (tmp_path / "curves.png").stat().st_size > 0
    log = (tmp_path / "logs" / "compiled.log").read_text()  # each run's output, kept
    assert "first step, which compiles the model" in log and "==== stderr" in log


def test_curves_without_a_corpus_says_how_to_make_one(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.curves", "--data", str(tmp_path / "missing"), "--out",
                           str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode != 0 and "gpt1 prepare --out" in proc.stderr


def test_host_path_bench(tmp_path):
    """bench.host_path: each case's host time with the launches stubbed, and how many launches a call makes (the
    attention's forward and two backward kernels, with dropout its mask kernel too, also as a compiled graph calls
    its operator and as the launcher alone, the add-LayerNorm's forward,
    backward and parameter-gradient sum, the bias + GELU's forward and backward, the cross-entropy's kernel and its
    backward scaling, the linear cross-entropy's one chunk)."""
    from bench import host_path

    out = tmp_path / "host.json"
    host_path.main(["--smoke", "--json", str(out)])
    rows = {r["case"]: r for r in json.loads(out.read_text())["rows"]}
    assert len(rows) == 10 and all(r["us_per_call"] > 0 for r in rows.values())
    launches = {name: r["launches_per_call"] for name, r in rows.items()}
    assert launches == {"attention forward, dropout 0.1": 2, "attention forward + backward, dropout 0.1": 4,
                        "attention forward + backward, no dropout": 3,
                        "attention (packed qkv) forward + backward, dropout 0.1": 4,
                        "attention (packed qkv) forward as a compiled graph calls it, dropout 0.1": 2,
                        "attention (packed qkv) forward launcher alone, dropout 0.1": 2,
                        "add + dropout + LayerNorm forward + backward": 3, "bias + GELU forward + backward": 2,
                        "cross-entropy forward + backward": 2,
                        "linear + cross-entropy forward + backward": 1}, launches
    from triton.runtime import jit

    assert jit.JITFunction.run.__name__ != "no_launch"  # the launches are restored


def test_e2e_row_names_can_be_listed():
    """--only (and gpu_session.sh's E2E_ONLY) take comma-separated row names: no name holds a comma."""
    names = [r.name for r in e2e.ROWS]
    assert len(set(names)) == len(names) and not [n for n in names if "," in n]


def test_curves_runs_are_gpt1_train_flags():
    """Every bench.curves run is a valid gpt1.train command line (a typo would surface only on the GPU)."""
    from bench import curves
    from gpt1 import train

    runs = {name: train.parse_args(flags) for name, flags in curves.RUNS.items()}
    assert runs["compiled-inline-fused"].inline_kernels and runs["compiled-inline-fused"].compile
    assert runs["compiled-graphs-inline-fused"].compile_mode == "reduce-overhead"
    assert not runs["compiled"].inline_kernels


def test_bench_flags_are_checked_before_any_work(tmp_path):
    """A negative or infinite budget, and an --out under a file, are usage errors at parse time (the out folder
    used to be made after the whole run); a good --out is created."""
    from bench import common

    (tmp_path / "afile").write_text("")
    for argv in (["--budget-s", "-5"], ["--budget-s", "inf"], ["--out", str(tmp_path / "afile" / "sub")],
                 ["--out", str(tmp_path / "afile")]):
        with pytest.raises(SystemExit) as e:
            common.cli_parser("x").parse_args(argv)
        assert e.value.code == 2
    common.cli_parser("x").parse_args(["--out", str(tmp_path / "new" / "dir")])
    assert (tmp_path / "new" / "dir").is_dir()
    assert "--out" not in common.cli_parser("x", out=False, budget=False).format_help()


def test_included_rows_get_their_sections_under_this_runs_header(smoke_run, tmp_path):
    """run_all --include (the GPU session's ops stage adds the e2e rows so): the included bench gets its section
    and plot, and the header describes this run, not the included rows' (here: a commit they do not carry)."""
    _, rows = smoke_run
    e2e = [dict(r, commit="0" * 40) for r in rows if r["bench"] == "e2e"]
    (tmp_path / "e2e.json").write_text(json.dumps(e2e))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "bench.run_all", "--smoke", "--only", "gelu", "--include", str(tmp_path / "e2e.json"),
           "--out", str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, check=False, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    md = (tmp_path / "out" / "results.md").read_text()
    assert "## End to end" in md and "SMOKE" in md and "commit " + "0" * 40 not in md.split("## ")[0]
    bad = subprocess.run(cmd[:-4] + ["--include", str(tmp_path / "missing.json")], cwd=ROOT, env=env, check=False,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "missing.json" in bad.stderr.strip().splitlines()[-1]


def test_json_files_get_their_folder_and_curves_refuses_an_empty_batch(tmp_path):
    from bench import common, curves

    with common.open_for_writing(str(tmp_path / "new" / "rows.json")) as f:
        f.write("[]")
    assert (tmp_path / "new" / "rows.json").read_text() == "[]"
    with pytest.raises(SystemExit) as e:
        curves.parse_args(["--smoke", "--micro-batch-size", "0"])  # it used to mean the default, silently
    assert e.value.code == 2
