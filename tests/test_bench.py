"""The benchmark harness: its FLOP/byte formulas, ratios and MFU, and one `run_all --smoke` run end to end."""

import json
import os
import subprocess
import sys

import pytest

from bench import attention, common, cross_entropy, e2e, run_all

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_attention_flops():
    full = 4 * 2 * 12 * 512 * 512 * 64  # two (T x T x D) matmuls per head, 2 FLOPs per multiply-add
    assert attention.attention_flops(2, 12, 512, 64, causal=False, mode="fwd") == full
    assert attention.attention_flops(2, 12, 512, 64, causal=True, mode="fwd") == full / 2
    assert attention.attention_flops(2, 12, 512, 64, causal=True, mode="bwd") == full / 2 * 2.5
    assert attention.attention_flops(2, 12, 512, 64, causal=True, mode="fwd+bwd") == full / 2 * 3.5


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
    assert {r["bench"] for r in rows} == {"attention", "cross_entropy", "e2e"}
    for r in rows:
        assert r["smoke"] is True
        assert all(r.get(k) for k in ("gpu", "torch", "triton", "deepspeed", "commit")), r
        assert r["status"] in ("ok", "oom", "skipped", "error")
        assert (r["status"] == "ok") == (r.get("ms") is not None), r
        if r["status"] != "ok":
            assert r.get("reason"), r
    # ours and the eager reference run everywhere, in every mode, with the ratios filled in
    for bench, providers in (("attention", ["ours", "eager"]), ("cross_entropy", ["ours", "ours-unfused", "eager"]),
                             ("e2e", list(map(e2e.combo_name, *zip(*e2e.COMBOS))))):
        for p in providers:
            mine = [r for r in rows if r["bench"] == bench and r["provider"] == p]
            assert mine and all(r["status"] == "ok" for r in mine), (bench, p, mine[:1])
            assert all(r["vs_eager"] > 0 for r in mine)
    assert not [r for r in rows if r["status"] == "error"], [r for r in rows if r["status"] == "error"][:2]
    assert any(r.get("vs_best_peer") for r in rows if r["provider"] == "ours")
    assert all(r["tflops"] > 0 for r in rows if r["bench"] == "attention" and r["status"] == "ok")
    assert all(r["gbps"] > 0 for r in rows if r.get("table", "").startswith("cross-entropy") and r["status"] == "ok")
    assert all(r["tokens_per_s"] > 0 for r in rows if r["bench"] == "e2e")


def test_smoke_files(smoke_run):
    out, rows = smoke_run
    md = (out / "results.md").read_text()
    assert "SMOKE (" in md and "not a speed measurement" in md
    for text in ("## Headline", "## Attention", "## Cross-entropy", "## Linear + cross-entropy", "## End to end",
                 "vs eager", "vs best peer", "flops_per_token = 6*N + 12*L*C*T"):
        assert text in md, text
    plots = sorted(p.name for p in out.glob("*.png"))
    assert "e2e.png" in plots and any(p.startswith("attention_") for p in plots)
    assert any(p.startswith("cross_entropy_") for p in plots) and any(p.startswith("linear_") for p in plots)
    assert run_all.headline(rows)[0] == "## Headline"
