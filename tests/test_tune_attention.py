"""The measured attention launch table (kernels/attention_tuned.json): its lookup by (arch, head dim, dtype class,
T bucket, dropout, kernel) with the fallback to _CONFIGS, its validation, its compile specs, and the tuner that
writes it (bench.tune_attention), whose --smoke run goes through the interpreter here."""

import copy
import json
import types

import pytest
import torch

from bench import common, tune_attention
from kernels import attention

CUDA = torch.device("cuda")  # a device object only: _config_for is told the capability below
ENTRY = dict(arch="sm90", head_dim=64, dtype="16-bit", T_bucket=512, dropout=True, kind="fwd", block_m=64,
             block_n=64, num_warps=4, num_stages=4, gpu="NVIDIA H100 80GB HBM3", triton="3.6.0", ms=0.1,
             default_ms=0.12, default=[128, 64, 8, 3])


def _entry(**changes):
    return dict(ENTRY, **changes)


@pytest.fixture
def tuned(monkeypatch):
    """Installs a table (a list of entries) in kernels.attention on a pretend sm_90 GPU; the config cache is
    cleared before and after, so no lookup made here outlives the test."""
    def install(entries, major=9):
        monkeypatch.setattr(attention, "_TUNED", attention.parse_tuned_table({"entries": entries}))
        monkeypatch.setattr(attention.torch.cuda, "get_device_capability", lambda device=None: (major, 0))
        attention._config_for.cache_clear()

    yield install
    attention._config_for.cache_clear()


def test_t_bucket():
    assert [attention._t_bucket(T) for T in (1, 100, 128, 129, 256, 257, 512, 513, 2048, 2049, 8192)] == \
        [128, 128, 128, 256, 256, 512, 512, 1024, 2048, 2048, 2048]


def _launches(major, D, fp32):
    """A lookup's result without tuned entries: the default table's launches, with the short kernels' (16-bit)."""
    return dict(attention._CONFIGS[(major, D, fp32)],
                short=None if fp32 else attention._SHORT_CONFIGS.get((major, D)))


def test_lookup_picks_the_entry_of_its_bucket_dropout_and_kernel(tuned):
    dkdv = _entry(kind="dkdv", block_m=64, block_n=128, num_warps=8, num_stages=2, T_bucket=2048, dropout=False)
    tuned([ENTRY, dkdv])
    default = _launches(9, 64, False)
    for T in (257, 300, 512):  # the bucket of T <= 512
        assert attention._config_for(CUDA, 64, False, T, True) == dict(default, fwd=(64, 64, 4, 4))  # dq, dkdv: default
    for other in ((CUDA, 64, False, 256, True), (CUDA, 64, False, 513, True), (CUDA, 64, False, 512, False),
                  (CUDA, 64, True, 512, True), (CUDA, 128, False, 512, True)):
        assert attention._config_for(*other) == _launches(9, *other[1:3]), other
    assert attention._config_for(CUDA, 64, False, 8192, False) == dict(default, dkdv=(64, 128, 8, 2))
    # the launchers' key: T (300 -> bucket 512, 5000 -> 2048), the dtype class, the dropout flag
    q = types.SimpleNamespace(device=CUDA, shape=(2, 12, 300, 64), dtype=torch.bfloat16)
    assert attention._config(q, True)["fwd"] == (64, 64, 4, 4) and attention._config(q, False) == default
    q.shape = (1, 12, 5000, 64)
    assert attention._config(q, False)["dkdv"] == (64, 128, 8, 2)
    assert attention._config_for(torch.device("cpu"), 64, False, 512, True) is attention._INTERPRETER_CONFIG


def test_lookup_keeps_an_sm90_entry_off_sm80(tuned):
    tuned([ENTRY], major=8)
    assert attention._config_for(CUDA, 64, False, 512, True) == _launches(8, 64, False)


def test_compile_specs_cover_the_tuned_entries(tuned):
    tuned([])
    untuned = len(attention._compile_specs())
    same_as_default = _entry(T_bucket=2048, block_m=128, block_n=64, num_warps=8, num_stages=3)
    assert attention._CONFIGS[(9, 64, False)]["fwd"] == (128, 64, 8, 3)
    tuned([ENTRY, _entry(T_bucket=1024), same_as_default,
           _entry(kind="dkdv", block_m=32, block_n=64, dropout=False, T_bucket=128)])
    all_specs = attention._compile_specs()
    # one spec per distinct launch (the default's is already there), the 16-bit D=64 forward with dropout twice:
    # reading its mask (MASK_DRAW) and drawing it inline
    assert len(all_specs) == untuned + 3
    specs = {s["name"]: s for s in all_specs}
    fwd = specs["attn_fwd D=64 bf16 causal dropout T<=512,1024 tuned"]
    assert fwd["archs"] == (90,) and (fwd["num_warps"], fwd["num_stages"]) == (4, 4)
    assert (fwd["constexprs"]["BLOCK_M"], fwd["constexprs"]["BLOCK_N"], fwd["constexprs"]["DROPOUT"]) == (64, 64, True)
    assert fwd["signature"]["MASK"] == "*u8:16" and fwd["constexprs"]["DRAW"] is (attention.MASK_DRAW == "inline")
    inline = specs["attn_fwd D=64 bf16 causal dropout T<=512,1024 tuned inline draw"]
    assert inline["constexprs"] == {**fwd["constexprs"], "DRAW": True}
    dkdv = specs["attn_dkdv D=64 bf16 causal T<=128 tuned"]
    assert dkdv["fn"] is attention._attn_bwd_dkdv_kernel and dkdv["constexprs"]["MASK"] is None


BAD_ENTRIES = [
    (dict(block_m=32, block_n=64), "fwd needs BLOCK_M % BLOCK_N == 0, got 32x64"),
    (dict(kind="dq", block_m=32, block_n=64), "dq needs BLOCK_M % BLOCK_N == 0"),
    (dict(kind="dkdv", block_m=64, block_n=32), "dkdv needs BLOCK_N % BLOCK_M == 0, got 64x32"),
    (dict(block_n=24), "BLOCK_N = 24 is not a power of two"),
    (dict(block_n=8), "each must be 16 to 256"),
    (dict(num_warps=6), "num_warps = 6 is not a power of two"),
    (dict(num_stages=0), "num_stages = 0"),
    (dict(head_dim=96), "head_dim 96 is not one of"),
    (dict(arch="sm75"), "arch 'sm75' is not one of"),
    (dict(dtype="bf16"), "dtype 'bf16' is not one of"),
    (dict(T_bucket=300), "T_bucket 300 is not one of"),
    (dict(dropout=0.1), "dropout 0.1 is not true or false"),
    (dict(kind="bwd"), "kind 'bwd' is not one of"),
    (dict(block_size=64), r"unknown fields \['block_size'\]"),
]


@pytest.mark.parametrize("changes,message", BAD_ENTRIES, ids=[m.split(" ")[0] for _, m in BAD_ENTRIES])
def test_validator_names_the_bad_entry(changes, message):
    entries = [_entry(T_bucket=128), _entry(**changes)]
    with pytest.raises(ValueError, match=message) as err:
        attention.parse_tuned_table({"entries": entries}, "table.json")
    assert str(err.value).startswith("table.json: entry 1 (sm")  # the second entry, by index and key fields


def test_validator_rejects_a_missing_field_a_duplicate_and_a_bad_file(tmp_path):
    entry = _entry()
    del entry["num_stages"]
    with pytest.raises(ValueError, match=r"entry 0 .*missing fields \['num_stages'\]"):
        attention.parse_tuned_table({"entries": [entry]})
    with pytest.raises(ValueError, match="entry 1 .*a second entry for the same key"):
        attention.parse_tuned_table({"entries": [ENTRY, _entry(block_m=128)]})
    with pytest.raises(ValueError, match='"entries" list'):
        attention.parse_tuned_table([ENTRY])
    path = tmp_path / "t.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        attention.load_tuned_table(str(path))
    path.write_text(json.dumps({"smoke": True, "entries": [ENTRY]}))
    with pytest.raises(ValueError, match="--smoke, which measures nothing"):
        attention.load_tuned_table(str(path))
    assert attention.load_tuned_table(str(tmp_path / "missing.json")) == {}


def test_committed_table_is_valid():
    with open(attention._TUNED_PATH) as f:
        data = json.load(f)
    assert data.get("about") and not data.get("smoke")
    assert attention.load_tuned_table() == attention._TUNED  # every entry passes the rules (it would raise)
    for e in data["entries"]:
        assert e["arch"] in ("sm80", "sm90") and e["dtype"] == "16-bit", e
        assert {"gpu", "triton", "ms", "default_ms"} <= set(e), f"entry without provenance: {e}"
    for (major, d, fp32), cfg in attention._CONFIGS.items():  # the fallback obeys the same rules
        assert all(attention.block_rule_error(kind, *c) is None for kind, c in cfg.items()), (major, d, fp32)


def test_candidates_respect_the_rules():
    for (major, d, fp32), cfg in attention._CONFIGS.items():
        if fp32:
            continue
        for kind, default in cfg.items():
            cands = tune_attention.candidates(kind, default, wgmma=major == 9)
            assert cands[0] == default and len(set(cands)) == len(cands)
            assert 4 <= len(cands) <= tune_attention.LIMIT, (major, d, kind, cands)
            for c in cands:
                assert attention.block_rule_error(kind, *c) is None, c
                if major == 9:  # wgmma: >= 64 MMA rows (the query block, or the key block for dkdv)
                    assert (c[1] if kind == "dkdv" else c[0]) >= 64, (d, kind, c)
    # a doubled tile keeps each thread's share: 4 warps become 8
    assert tune_attention.candidates("fwd", (32, 16, 4, 1), wgmma=False, limit=2) == [(32, 16, 4, 1), (64, 16, 8, 1)]
    # a config of the committed table comes right after the default, so that a re-run keeps it in the race
    assert tune_attention.candidates("dq", (128, 32, 8, 3), wgmma=True, extra=[[64, 16, 4, 2]])[:2] == \
        [(128, 32, 8, 3), (64, 16, 4, 2)]


@pytest.fixture(scope="module")
def problem():
    x = tune_attention.make_problem(1, 2, 40, 16, 0.1, "cpu")
    return x, tune_attention.reference(x, attention._INTERPRETER_CONFIG)


def test_candidate_checks_reject_wrong_outputs(problem):
    x, ref = problem
    cfg = (64, 16, 4, 1)
    assert tune_attention.try_candidate("fwd", x, cfg, ref["fwd"], smoke=True)["status"] == "ok"
    wrong = copy.deepcopy(ref["fwd"])
    wrong["o"][0, 0, 3, 0] += 0.5
    res = tune_attention.try_candidate("fwd", x, cfg, wrong, smoke=True)
    assert res["status"] == "rejected" and res["reason"].startswith("wrong result: o differs"), res
    res = tune_attention.try_candidate("dq", x, (16, 32, 4, 1), ref["dq"], smoke=True)  # BLOCK_M % BLOCK_N != 0
    assert res["status"] == "rejected" and "does not compile or launch" in res["reason"], res


def test_draw_rows_time_the_mask_kernel_and_the_inline_forward(problem):
    """The mask kernel alone, and the default forward drawing its mask inline, checked against the default
    forward (which read the mask kernel's mask) bit for bit."""
    x, ref = problem
    base = dict(D=16, T=40, dropout=0.1)
    rows = tune_attention.draw_rows(base, x, attention._INTERPRETER_CONFIG["fwd"], ref["fwd"], smoke=True)
    assert [(r["kind"], r["status"]) for r in rows] == [("mask", "ok"), ("fwd inline", "ok")], rows
    assert all(r["ms"] > 0 for r in rows)
    wrong = copy.deepcopy(ref["fwd"])
    wrong["lse"][0, 1, 7] += 1.0
    res = tune_attention.draw_rows(base, x, attention._INTERPRETER_CONFIG["fwd"], wrong, smoke=True)[1]
    assert res["status"] == "error" and res["reason"] == "the inline draw's lse differ from the default's", res
    md = tune_attention.markdown_draw([dict(base, **r) for r in rows] + [dict(base, kind="fwd", status="ok", ms=2.0)])
    assert "| 16 | 40 |" in md and "MASK_DRAW" in md


def test_precompiler_fills_the_cache_in_worker_processes():
    """The compile-ahead pool as on a GPU (spawned workers, jobs by key), here on the CPU under the interpreter."""
    good, bad = (16, 0.0, "fwd", (32, 16, 4, 1)), (16, 0.0, "dq", (16, 32, 4, 1))
    pre = tune_attention.Precompiler([good, bad], 2, enabled=True, dev="cpu")
    try:
        for job in (good, bad):
            pre.wait(job, common.Deadline(0))
        assert pre.futures[good].result() is None
        assert "BLOCK_M % BLOCK_N" in pre.futures[bad].result()
    finally:
        pre.close()


def test_smoke_run_writes_a_table_the_kernels_accept(tmp_path):
    tune_attention.main(["--smoke", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "attention_tuned.json").read_text())
    assert data["smoke"] is True and data["environment"]["commit"]
    table = attention.parse_tuned_table(data)  # the format the kernels read
    assert len(table) == len(data["entries"]) == 6  # --smoke writes every kernel's alternative
    assert {key[5] for key in table} == set(attention.KINDS) and {key[4] for key in table} == {True, False}
    assert all(e["ms"] > 0 and e["default_ms"] > 0 and e["gpu"] for e in data["entries"])
    with pytest.raises(ValueError, match="--smoke"):  # and that kernels/ refuses to load
        attention.load_tuned_table(str(tmp_path / "attention_tuned.json"))
    md = (tmp_path / "attention_tuned.md").read_text()
    for text in ("SMOKE", "## Chosen configs", "## The dropout mask", "| 16 | 40 |", "## Rejected candidates",
                 "## Every candidate", "speed-up"):
        assert text in md, text


def test_budget_stops_cleanly():
    env = common.environment(True)
    rows = tune_attention.run(True, common.Deadline(1e-9), env)
    assert rows and all(r["status"] == "not run" for r in rows)
    data = tune_attention.table(rows, tune_attention.choose(rows, True), env, True)
    assert data["entries"] == []
    assert "not run (time budget)" in tune_attention.markdown(rows, [], data, True)


def test_candidates_climb_from_the_committed_entry():
    """A re-run tries the committed entry's own neighbours too: one step further from the default each run."""
    committed = (64, 64, 4, 3)
    cands = tune_attention.candidates("fwd", (128, 64, 8, 3), wgmma=True, extra=[list(committed)])
    assert cands[:2] == [(128, 64, 8, 3), committed] and len(set(cands)) == len(cands) <= tune_attention.LIMIT
    assert {(64, 64, 4, 4), (64, 64, 4, 2), (64, 32, 4, 3)} <= set(cands)  # the entry's neighbours
