"""The benchmark harness: its FLOP/byte formulas, ratios, statuses, spreads and MFU, and one `run_all --smoke` run
end to end."""

import json
import os
import subprocess
import sys
import tarfile

import pytest

from bench import attention, common, cross_entropy, e2e, layer_norm, run_all

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_attention_flops():
    full = 4 * 2 * 12 * 512 * 512 * 64  # two (T x T x D) matmuls per head, 2 FLOPs per multiply-add
    assert attention.attention_flops(2, 12, 512, 64, causal=False, mode="fwd") == full
    assert attention.attention_flops(2, 12, 512, 64, causal=True, mode="fwd") == full / 2
    assert attention.attention_flops(2, 12, 512, 64, causal=True, mode="bwd") == full / 2 * 2.5
    assert attention.attention_flops(2, 12, 512, 64, causal=True, mode="fwd+bwd") == full / 2 * 3.5


def test_layer_norm_bytes():
    N, C = 1024, 768
    assert layer_norm.ln_bytes(N, C, 2, 2, "fwd") == 3 * N * C * 2  # x, h read, y written
    assert layer_norm.ln_bytes(N, C, 4, 2, "fwd") == N * C * (4 + 2 + 4)  # y in the promoted dtype, fp32
    assert layer_norm.ln_bytes(N, C, 2, 2, "fwd+bwd") == 8 * N * C * 2  # + dy, x, h read, dx, dh written


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
    assert {r["bench"] for r in rows} == {"attention", "cross_entropy", "layer_norm", "e2e"}
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
    for bench, providers in (("attention", ["ours", "eager"]), ("cross_entropy", ["ours", "ours-unfused", "eager"]),
                             ("layer_norm", ["ours", "eager"]),
                             ("e2e", [recipe.name for recipe in e2e.ROWS])):
        for p in providers:
            mine = [r for r in rows if r["bench"] == bench and r["provider"] == p]
            assert mine and all(r["status"] in ("ok", "n/a") for r in mine), (bench, p, mine[:1])
            assert all(r["vs_eager"] > 0 for r in mine if r["status"] == "ok")
    assert any(r.get("vs_best_peer") for r in rows if r["provider"] == "ours")
    assert all(r["tflops"] > 0 and r["host_ms"] > 0 for r in rows if r["bench"] == "attention" and r["status"] == "ok")
    assert all(r["gbps"] > 0 for r in rows if r.get("table", "").startswith("cross-entropy") and r["status"] == "ok")


def test_smoke_gradient_in_forward_is_not_applicable(smoke_run):
    _, rows = smoke_run
    ce = [r for r in rows if r["bench"] == "cross_entropy"]
    for r in ce:
        if r["provider"] in cross_entropy.GRAD_IN_FORWARD and r["mode"] == "bwd":
            assert r["status"] == "n/a", r
        elif r["status"] == "n/a":
            raise AssertionError(r)
    assert any(r["status"] == "n/a" for r in ce)


def test_smoke_e2e_rows(smoke_run):
    _, rows = smoke_run
    e2e_rows = [r for r in rows if r["bench"] == "e2e"]
    assert [r["provider"] for r in e2e_rows] == [recipe.name for recipe in e2e.ROWS]
    ours = {(r["zero"], r["compiled"]) for r in e2e_rows if r["runtime"] == "deepspeed" and r["attn_impl"] == "triton"}
    # our path at every ZeRO stage: compiled under ZeRO 0-2, uncompiled under ZeRO-3 (which refuses --compile)
    assert {(0, True), (1, True), (2, True), (3, False)} <= ours
    for r in e2e_rows:
        assert r["tokens_per_s"] > 0 and r["ms_p20"] <= r["ms"] <= r["ms_p80"], r
        assert r["ops_per_step"] > 0 and r["ops_all_per_step"] >= r["ops_per_step"], r
        assert r["commit"] and r["description"], r
    peer = next(r for r in e2e_rows if r["provider"] == e2e.NANOGPT.name)
    assert peer["vs_nanogpt"] == pytest.approx(1.0)
    assert (peer["runtime"], peer["attn_impl"], peer["loss_impl"], peer["compiled"]) == ("torch", "sdpa", "eager", True)


def test_smoke_files(smoke_run):
    out, rows = smoke_run
    md = (out / "results.md").read_text()
    assert "SMOKE (" in md and "not a speed measurement" in md
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
    assert "ZeRO-2 did not run" in e2e.verdict(rows[:2])[-1]
    failed = e2e.verdict([dict(row(e2e.DEFAULT.name, None), status="error", reason="boom")])
    assert "did not run (error: boom)" in failed[0]


def test_gpu_session_script_packs_its_results(tmp_path):
    """bench/gpu_session.sh in its CPU smoke form: each stage time-boxed, three files in $OUT."""
    env = dict(os.environ, SMOKE="1", OUT=str(tmp_path), PYTHON=sys.executable,
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_session.sh"), "roofline", "profile"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.tgz", "session.log", "summary.md"]
    summary = (tmp_path / "summary.md").read_text()
    for text in ("roofline rc=0", "profile-default rc=0", "profile-nanogpt rc=0", "operators per step:",
                 "torch (autocast bf16, fused AdamW), sdpa/eager, compiled"):
        assert text in summary, text
    with tarfile.open(tmp_path / "results.tgz") as tar:
        names = set(tar.getnames())
    assert {"./roofline.json", "./profile/default.json", "./profile/nanogpt.json", "./stages.txt"} <= names


def _curve_runs(compiled, eager, reference):
    return [{"name": n, "status": "ok", "losses": c} for n, c in
            (("compiled", compiled), ("eager", eager), ("reference", reference))]


def test_curves_tolerance_is_measured():
    """bench.curves: the compiled path agrees with eager when it differs no more than two correct
    implementations do; a curve that drifts away, or one that differs more than the yardstick, does not."""
    from bench import curves

    eager = [10.0 - 0.01 * t for t in range(200)]
    noisy = [x + (0.05 if t % 2 else -0.05) for t, x in enumerate(eager)]  # the yardstick: 0.05 per step
    close = [x + (0.04 if t % 3 else -0.04) for t, x in enumerate(eager)]
    s = curves.compare(_curve_runs(close, eager, noisy))
    assert s["agree"] and s["mean_abs_eager_vs_reference"] == pytest.approx(0.05)
    assert s["bound"] == pytest.approx(curves.TOL_FACTOR * 0.05 + curves.TOL_ABS)
    drifting = [x + 0.002 * t for t, x in enumerate(eager)]  # a growing offset: 0 at first, 0.4 at the end
    assert not curves.compare(_curve_runs(drifting, eager, noisy))["agree"]
    far = [x + (0.2 if t % 2 else -0.2) for t, x in enumerate(eager)]  # no drift, but 4x the yardstick
    assert not curves.compare(_curve_runs(far, eager, noisy))["agree"]
    runs = _curve_runs(close, eager, noisy)
    runs[2] = {"name": "reference", "status": "not run"}
    assert curves.compare(runs) is None and "not decided" in curves.verdict(None)


def test_curves_smoke(tmp_path):
    """bench.curves --smoke: three real gpt1.train runs (gpt1-tiny, our kernels under the interpreter, compiled
    and not, and torch's kernels) on a corpus it prepares; without dropout the compiled and eager curves agree."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "bench.curves", "--smoke", "--dropout", "0", "--steps", "3",
                           "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "results.json").read_text())
    assert [r["status"] for r in result["runs"]] == ["ok"] * 3
    assert all(len(r["losses"]) == 3 for r in result["runs"])
    assert "--attn-impl triton" in result["runs"][0]["flags"] and result["runs"][0]["first_step_s"] > 0
    assert result["summary"]["agree"], result["summary"]
    assert result["summary"]["mean_abs_compiled_vs_eager"] < 1e-3
    assert "agree within the measured tolerance" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_curves_without_a_corpus_says_how_to_make_one(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.curves", "--data", str(tmp_path / "missing"), "--out",
                           str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode != 0 and "gpt1 prepare --out" in proc.stderr
