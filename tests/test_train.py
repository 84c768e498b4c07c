"""Pre-training through DeepSpeed on CPU: it learns, ZeRO stages agree, checkpoints resume exactly,
SIGTERM saves and exits 0, non-finite steps are skipped and then stop the run, bad input is refused."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
from helpers import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXCERPT = os.path.join(ROOT, "tests", "data", "shakespeare")
BIN = os.path.dirname(sys.executable)
ENV = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
INJECT_NAN = os.path.join(ROOT, "tests", "inject_nan.py")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from gpt1.data import prepare

    d = tmp_path_factory.mktemp("data") / "shakespeare"
    prepare(str(d), texts=[EXCERPT], vocab_size=512)
    return str(d)


def ds_config(tmp_path, stage=0, bf16=True, **extra):
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
           "bf16": {"enabled": bf16}, "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
           "steps_per_print": 10**9, **extra}
    path = tmp_path / f"ds_zero{stage}_{'bf16' if bf16 else 'fp32'}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def train_cmd(data, out, config, ranks=1, script=None, **flags):
    """The gpt1.train command line (or that of `script`, a file that runs gpt1.train) on `ranks` ranks."""
    args = {"data": data, "model": "gpt1-tiny", "out": out, "deepspeed_config": config, "seq_len": 32,
            "max_steps": 12, "log_interval": 1, "eval_interval": 1000, "eval_batches": 2, "warmup_steps": 2,
            "lr": 2e-3, **flags}
    argv = []
    for k, v in args.items():
        if v is True:
            argv.append(f"--{k.replace('_', '-')}")
        elif v is not False:
            argv += [f"--{k.replace('_', '-')}", str(v)]
    entry = [script] if script else ["--module" if ranks > 1 else "-m", "gpt1.train"]
    if ranks == 1:
        return [sys.executable, *entry] + argv
    return [os.path.join(BIN, "deepspeed"), "--num_gpus", str(ranks), "--master_port", free_port(), *entry] + argv


def run(cmd, ok=True, env=None):
    res = subprocess.run(cmd, cwd=ROOT, env={**ENV, **(env or {})}, capture_output=True, text=True, check=False)
    if ok:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(out):
    return {r["step"]: r["loss"] for r in metrics(out) if "loss" in r}


def unigram_cross_entropy(data):
    """Cross-entropy (nats/token) of the val split under the train split's add-one unigram distribution."""
    meta = json.load(open(os.path.join(data, "meta.json")))
    train = np.memmap(os.path.join(data, "train.bin"), dtype=meta["dtype"], mode="r")
    val = np.memmap(os.path.join(data, "val.bin"), dtype=meta["dtype"], mode="r")
    counts = np.bincount(train, minlength=meta["vocab_size"]) + 1.0
    return float(-np.log(counts / counts.sum())[val].mean())


def test_learning_beats_the_unigram_baseline(data, tmp_path):
    """gpt1-tiny, a few hundred steps on the excerpt: held-out loss clearly below the unigram model's."""
    out = str(tmp_path / "run")
    run(train_cmd(data, out, ds_config(tmp_path, bf16=False), max_steps=300, seq_len=64, micro_batch_size=8,
                  log_interval=50, eval_interval=300, eval_batches=20, warmup_steps=30, lr=1e-3))
    final = [r for r in metrics(out) if "val_loss" in r][-1]
    baseline = unigram_cross_entropy(data)
    assert final["val_loss"] < baseline - 0.5, (final, baseline)
    train = losses(out)
    assert train[300] < train[50] - 0.5  # the training loss falls too
    from gpt1.train import RunConfig, lr_lambda

    factor = lr_lambda(RunConfig(max_steps=300, warmup_steps=30, lr=1e-3))
    for r in metrics(out):  # the rate each logged step ran at (it was the next step's: 0 at the last)
        if "loss" in r:
            assert r["lr"] == pytest.approx(1e-3 * factor(r["step"] - 1), rel=1e-9, abs=0), r
    assert os.path.isfile(os.path.join(out, "model.pt"))


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_stages_follow_zero0_on_two_ranks(data, tmp_path, stage):
    """2 CPU ranks in bf16: ZeRO-2 and ZeRO-3 follow ZeRO-0's loss curve within 0.1 nats per step over
    12 steps (the curve itself falls by ~0.8). Not bitwise: DeepSpeed's ZeRO-0 bf16 optimizer reduces and
    accumulates gradients in bf16, ZeRO 1-3 in fp32; ZeRO-2 and ZeRO-3 agree with each other to ~1e-3."""
    curves = {}
    for s in (0, stage):
        out = str(tmp_path / f"zero{s}")
        run(train_cmd(data, out, ds_config(tmp_path, stage=s), ranks=2))
        curves[s] = losses(out)
    assert sorted(curves[0]) == list(range(1, 13))
    diffs = [abs(curves[0][k] - curves[stage][k]) for k in curves[0]]
    assert max(diffs) < 0.1, diffs
    assert curves[stage][12] < curves[stage][1] - 0.3


def test_torch_autocast_configs_agree_on_two_ranks(data, tmp_path):
    """The shipped ds_configs/zero{0,2}_autocast_bf16.json (fp32 weights under DeepSpeed's torch_autocast, the
    nanoGPT recipe's precision) on 2 ranks: ZeRO-2 follows ZeRO-0 within 2e-3 per step (measured: 2e-4; both
    keep fp32 weights and gradients, and differ only in where the gradients are averaged)."""
    curves = {}
    for stage in (0, 2):
        out = str(tmp_path / f"zero{stage}")
        run(train_cmd(data, out, os.path.join(ROOT, "ds_configs", f"zero{stage}_autocast_bf16.json"), ranks=2,
                      micro_batch_size=4))
        curves[stage] = losses(out)
    assert sorted(curves[0]) == sorted(curves[2]) == list(range(1, 13))
    diffs = [abs(curves[0][k] - curves[2][k]) for k in curves[0]]
    assert max(diffs) < 2e-3, diffs
    assert curves[2][12] < curves[2][1] - 0.3


def test_no_shared_memory_left_behind(data, tmp_path):
    """DeepSpeed's CPU all-reduce maps a /dev/shm file per rank and never removes it (about 66 MB of RAM per rank
    and run); gpt1.runtime.init_distributed removes them once every rank has mapped them. The files are named
    deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>: only this run's port is looked at, since other tests
    may run DeepSpeed at the same time (pytest -n)."""
    shm = "/dev/shm"
    if not os.path.isdir(shm):
        pytest.skip("no /dev/shm")
    cmd = train_cmd(data, str(tmp_path / "run"), ds_config(tmp_path), ranks=2, max_steps=2)
    port = cmd[cmd.index("--master_port") + 1]
    run(cmd)
    left = [f for f in os.listdir(shm) if f.startswith("deepspeed_allreduce_buffer") and f"_{port}_" in f]
    assert not left, left


def test_cpu_ranks_share_the_cores_under_the_launcher(data, tmp_path):
    """DeepSpeed's launcher sets no thread count: without OMP_NUM_THREADS each of 2 CPU ranks takes half the
    cores (torch's default, every core in every rank, ran the 2-rank demo 6x slower on 2 cores)."""
    env = {k: v for k, v in ENV.items() if k != "OMP_NUM_THREADS"}
    cmd = train_cmd(data, str(tmp_path / "run"), ds_config(tmp_path), ranks=2, max_steps=1)
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    assert f"; {threads} CPU thread(s) per rank" in res.stdout, res.stdout[-2000:]


def wait_for_step(out, step, proc, timeout=300):
    path = os.path.join(out, "metrics.jsonl")
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, "training ended before it could be interrupted"
        if os.path.isfile(path) and any(r.get("step", 0) >= step for r in metrics(out)):
            return
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def test_sigterm_saves_and_resume_is_exact(data, tmp_path):
    """2 ranks, ZeRO-2, bf16, dropout on: SIGTERM part-way makes every rank finish its step, save and exit
    0; --resume then gives, at every later step, bitwise the loss of the run that never stopped."""
    config = ds_config(tmp_path, stage=2)
    full = str(tmp_path / "full")
    run(train_cmd(data, full, config, ranks=2, max_steps=16))
    expected = losses(full)

    cut = str(tmp_path / "cut")
    proc = subprocess.Popen(train_cmd(data, cut, config, ranks=2, max_steps=16, save_interval=1000), cwd=ROOT,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_step(cut, 4, proc)
        ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)
                 if "gpt1.train" in p.cmdline() and "deepspeed.launcher.launch" not in p.cmdline()]
        assert len(ranks) == 2
        for p in ranks:  # what a scheduler does: signal every task of the job
            p.send_signal(signal.SIGTERM)
        log, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, log[-3000:]
    stopped = max(losses(cut))
    assert 4 <= stopped < 16, "the signal arrived too late to test anything"
    assert f"received SIGTERM: saved step {stopped}" in log
    tags = os.listdir(os.path.join(cut, "checkpoints"))
    assert f"step{stopped:08d}" in tags

    run(train_cmd(data, cut, config, ranks=2, max_steps=16, resume=True))
    resumed = losses(cut)
    assert sorted(resumed) == list(range(1, 17))
    assert [resumed[k] for k in range(1, 17)] == [expected[k] for k in range(1, 17)]


def test_checkpoints_are_pruned_and_resume_takes_the_newest_complete(data, tmp_path):
    from gpt1 import checkpoint

    config, out = ds_config(tmp_path, stage=0, bf16=False), str(tmp_path / "run")
    run(train_cmd(data, out, config, max_steps=6, save_interval=1, keep_checkpoints=2))
    root = os.path.join(out, "checkpoints")
    assert sorted(t for t in os.listdir(root) if t.startswith("step")) == ["step00000005", "step00000006"]
    assert open(os.path.join(root, "latest")).read().strip() == "step00000006"
    # a save that crashed midway: its directory exists but was never marked complete
    os.remove(os.path.join(root, "step00000006", "COMPLETE"))
    assert checkpoint.complete_tags(root) == ["step00000005"]
    res = run(train_cmd(data, out, config, max_steps=8, resume=True))
    assert "resumed from step00000005" in res.stdout + res.stderr
    assert max(losses(out)) == 8


def test_truncated_checkpoint_is_reported_and_nothing_is_overwritten(data, tmp_path):
    config, out = ds_config(tmp_path, stage=0, bf16=False), str(tmp_path / "run")
    run(train_cmd(data, out, config, max_steps=3, save_interval=3))
    ckpt = os.path.join(out, "checkpoints", "step00000003")
    victim = max((os.path.join(dp, f) for dp, _, fs in os.walk(ckpt) for f in fs if f.endswith(".pt")),
                 key=os.path.getsize)
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    before = {p: os.path.getmtime(os.path.join(dp, p)) for dp, _, fs in os.walk(out) for p in fs}
    res = run(train_cmd(data, out, config, max_steps=6, resume=True), ok=False)
    assert res.returncode == 2
    err = res.stderr.strip().splitlines()[-1]
    assert err.startswith("error:") and os.path.basename(victim) in err, res.stderr[-2000:]
    after = {p: os.path.getmtime(os.path.join(dp, p)) for dp, _, fs in os.walk(out) for p in fs}
    assert after == before


@pytest.mark.parametrize("stage", [2, 3])
def test_nan_loss_is_skipped_then_stops_the_run(data, tmp_path, stage):
    """A NaN loss on one rank skips the step on every rank: found by GuardedAdamW under ZeRO-2 (DeepSpeed's own
    checks are off there, runtime.lean_checks), by DeepSpeed's overflow check under ZeRO-3; after
    --max-nonfinite skipped steps in a row, the run stops."""
    config = ds_config(tmp_path, stage=stage)
    out = str(tmp_path / "skip")
    # two NaN steps on rank 0 of 2: both ranks skip them, training goes on
    run(train_cmd(data, out, config, ranks=2, max_steps=6, script=INJECT_NAN), env={"GPT1_TEST_NAN_STEPS": "2,3"})
    rows = {r["step"]: r for r in metrics(out) if "loss" in r}
    assert [rows[s]["skipped_steps"] for s in range(1, 7)] == [0, 1, 2, 2, 2, 2]
    assert all(np.isfinite(rows[s]["loss"]) for s in (1, 4, 5, 6))
    # the gradient norm is logged where the guard measures it (ZeRO-2), for the steps it did not skip
    assert [s for s in range(1, 7) if "grad_norm" in rows[s]] == ([1, 4, 5, 6] if stage == 2 else [])
    assert all(np.isfinite(rows[s]["grad_norm"]) and rows[s]["grad_norm"] > 0 for s in rows if "grad_norm" in rows[s])
    # the weights never saw a NaN: the final model is finite
    import torch
    state = torch.load(os.path.join(out, "model.pt"), map_location="cpu", weights_only=True)
    assert all(torch.isfinite(t).all() for t in state.values())

    out = str(tmp_path / "stop")
    res = run(train_cmd(data, out, config, max_steps=10, max_nonfinite=3, script=INJECT_NAN), ok=False,
              env={"GPT1_TEST_NAN_STEPS": "4,5,6,7"})
    assert res.returncode == 2
    assert "stopping at step 6: 3 steps in a row had a non-finite loss" in res.stderr


def bad_input_cases(data, tmp_path):
    good = ds_config(tmp_path, stage=0, bf16=False)
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "ft").mkdir()
    (tmp_path / "ft" / "config.json").write_text(json.dumps({"finetune": {}, "model": {}}))
    (tmp_path / "a_file").write_text("kept")
    return {
        "fine-tuning out": (dict(config=good, out=str(tmp_path / "ft")), "holds a fine-tuning run"),
        "file out": (dict(config=good, out=str(tmp_path / "a_file")), "a_file is a file, not a directory"),
        "batch sizes": (dict(config=ds_config(tmp_path, stage=1, train_batch_size=7)), "multiply out"),
        "unknown preset": (dict(config=good, model="gpt7"), "unknown model preset"),
        "missing ds config": (dict(config=str(tmp_path / "nope.json")), "not found"),
        "broken ds config": (dict(config=str(tmp_path / "broken.json")), "not valid JSON"),
        "seq too long": (dict(config=good, seq_len=129), "n_positions"),
        "missing data": (dict(config=good, data=str(tmp_path / "nodata")), "nodata"),
        "compile mode": (dict(config=good, compile_mode="fast"), "--compile-mode must be one of"),
        "inline uncompiled": (dict(config=good, inline_kernels=True, no_compile=True),
                              "--inline-kernels needs compiling"),
        "negative steps": (dict(config=good, max_steps=-5), "--max-steps must be at least 1, got -5"),
    }


@pytest.mark.parametrize("case", ["fine-tuning out", "file out", "batch sizes", "unknown preset", "missing ds config",
                                  "broken ds config", "seq too long", "missing data", "compile mode",
                                  "inline uncompiled", "negative steps"])
def test_bad_input_is_one_line_error(data, tmp_path, case):
    flags, msg = bad_input_cases(data, tmp_path)[case]
    out = str(tmp_path / "run")
    res = run(train_cmd(**{"data": data, "out": out, **flags}), ok=False)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and msg in last, res.stderr[-2000:]
    assert not os.path.exists(os.path.join(out, "checkpoints"))


def test_train_split_shorter_than_a_window_writes_no_run_dir(data, tmp_path):
    """The train split was checked only when the sampler was built, after config.json and the tokenizer had been
    written into --out (and, with --resume, over the run's own)."""
    short = tmp_path / "short"
    short.mkdir()
    for name in os.listdir(data):
        (short / name).write_bytes(open(os.path.join(data, name), "rb").read())
    (short / "train.bin").write_bytes((short / "train.bin").read_bytes()[:20])  # 10 uint16 tokens
    out = tmp_path / "run"
    res = run(train_cmd(str(short), str(out), ds_config(tmp_path, bf16=False)), ok=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1].endswith("train.bin has 10 tokens, fewer than one window of 33")
    assert not out.exists()


@pytest.mark.parametrize("flags,msg", [
    (["--log-interval", "0"], "--log-interval must be at least 1, got 0"),
    (["--micro-batch-size", "-2"], "--micro-batch-size must be at least 0, got -2"),  # 0: the config's
    (["--gradient-accumulation-steps", "-1"], "--gradient-accumulation-steps must be at least 0"),
    (["--eval-batches", "0"], "--eval-batches must be at least 1"),
    (["--keep-checkpoints", "0"], "--keep-checkpoints must be at least 1"),
    (["--save-interval", "0"], "--save-interval must be at least 1"),
    (["--warmup-steps", "-2"], "--warmup-steps must be at least -1"),  # -1: the default warmup
    (["--dropout", "-0.5"], "--dropout must be in [0.0, 1.0], got -0.5"),  # only -1 means the model's rates
    (["--min-lr", "nan"], "--min-lr must be in [0.0, 0.00025], got nan"),
    (["--min-lr", "1"], "--min-lr must be in [0.0, 0.00025], got 1.0"),  # the cosine would climb to it
    (["--lr", "1e-3", "--min-lr", "2e-3"], "--min-lr must be in [0.0, 0.001], got 0.002"),
    (["--lr", "-1"], "--lr must be at least 0.0, got -1.0"),
    (["--dropout-seed", "-2"], "--dropout-seed must be at least 0, got -2"),  # -1: derived from --seed
    (["--seed", "-1"], "--seed must be in [0, 4294967295], got -1"),  # numpy's error, after config.json was written
    (["--seed", str(2**32)], "--seed must be in [0, 4294967295], got 4294967296"),
])
def test_flags_out_of_range_are_refused(flags, msg):
    """A value outside a flag's range is refused before anything starts, where it used to pass as a sentinel
    (--micro-batch-size -2 as "the config's") or fail later with a traceback (--log-interval 0)."""
    from gpt1.errors import GPT1Error
    from gpt1.train import parse_args

    with pytest.raises(GPT1Error, match=re.escape(msg)):
        parse_args(flags)
    # the sentinels pass
    parse_args(["--dropout", "-1", "--micro-batch-size", "0", "--warmup-steps", "-1", "--dropout-seed", "-1"])


def test_residual_in_fp32_flag_sets_the_model():
    """--no-residual-in-fp32 reaches the model's config (which config.json records); without the flag the
    preset's fp32 residual stream stays; set_impl (what gpt1.finetune calls) switches a built model's LayerNorms."""
    from gpt1 import GPT1
    from gpt1.train import build_model_config, parse_args

    for flags, expected in (([], True), (["--no-residual-in-fp32"], False), (["--residual-in-fp32"], True)):
        cfg = build_model_config(parse_args(["--model", "gpt1-tiny", *flags]), {"vocab_size": 97})
        assert cfg.residual_in_fp32 is expected, flags
    model = GPT1(cfg).set_impl(residual_in_fp32=False)
    assert model.config.residual_in_fp32 is False
    assert {ln.residual_in_fp32 for b in model.h for ln in (b.ln_1, b.ln_2)} == {False}
    assert model.set_impl(norm_impl="triton").config.residual_in_fp32 is False  # None keeps the setting


def test_run_dir_of_another_model_is_refused(data, tmp_path):
    config, out = ds_config(tmp_path, stage=0, bf16=False), str(tmp_path / "run")
    run(train_cmd(data, out, config, max_steps=2))
    before = open(os.path.join(out, "config.json")).read()
    res = run(train_cmd(data, out, config, max_steps=2, model="gpt1-mini", resume=True), ok=False)
    assert res.returncode == 2 and "another model" in res.stderr.strip().splitlines()[-1], res.stderr[-2000:]
    # and a finished run is not silently overwritten by a new one without --resume
    res = run(train_cmd(data, out, config, max_steps=2), ok=False)
    assert res.returncode == 2 and "--resume" in res.stderr.strip().splitlines()[-1], res.stderr[-2000:]
    assert open(os.path.join(out, "config.json")).read() == before


def test_fused_linear_loss_trains_the_tied_head_under_zero3(data, tmp_path):
    """loss_impl=triton_linear reads the tied embedding outside its module; under ZeRO-3 on 2 ranks that
    weight is partitioned. Its gradient must still reach ZeRO's reduction: the ZeRO-3 run with the fused
    loss follows the same run with the eager loss (0.02 nats: only the kernels differ). (That ZeRO-3 trains like
    ZeRO-0 is test_zero_stages_follow_zero0_on_two_ranks's.)"""
    curves = {}
    for name, loss_impl in [("z3_fused", "triton_linear"), ("z3_eager", "eager")]:
        out = str(tmp_path / name)
        run(train_cmd(data, out, ds_config(tmp_path, stage=3), ranks=2, max_steps=8, attn_impl="sdpa",
                      loss_impl=loss_impl))
        curves[name] = [losses(out)[k] for k in range(1, 9)]
    fused, eager = curves["z3_fused"], curves["z3_eager"]
    assert max(abs(a - b) for a, b in zip(fused, eager)) < 0.02, (fused, eager)
    assert fused[-1] < fused[0] - 0.3


def test_compiled_run_follows_the_eager_run(data, tmp_path):
    """--compile (torch.compile of the model's forward, fullgraph, inside the DeepSpeed engine) trains like
    --no-compile: same per-step losses to bf16 noise (0.02 nats), dropout off so that only the kernels'
    fusion differs."""
    config, curves = ds_config(tmp_path, stage=2), {}
    for flag in ("compile", "no_compile"):
        out = str(tmp_path / flag)
        res = run(train_cmd(data, out, config, max_steps=6, dropout=0.0, **{flag: True}))
        curves[flag] = [losses(out)[k] for k in range(1, 7)]
        assert ("first step, which compiles the model" in res.stdout) == (flag == "compile")
    assert max(abs(a - b) for a, b in zip(curves["compile"], curves["no_compile"])) < 0.02, curves


def test_fused_add_layer_norm_trains_like_torchs(data, tmp_path):
    """--norm-impl triton (residual dropout + add + LayerNorm in one kernel) through DeepSpeed ZeRO-3 on 2 ranks
    in bf16, with every LayerNorm weight partitioned (persistence threshold 0, so the kernel reads weights that
    ZeRO must gather), follows --norm-impl eager to bf16 noise (0.02 nats per step; measured 5e-4), dropout off
    so that only the kernel differs."""
    config = ds_config(tmp_path, stage=3, zero_optimization={"stage": 3, "stage3_param_persistence_threshold": 0})
    curves = {}
    for impl in ("eager", "triton"):
        out = str(tmp_path / impl)
        run(train_cmd(data, out, config, ranks=2, max_steps=6, dropout=0.0, attn_impl="sdpa", norm_impl=impl))
        assert json.load(open(os.path.join(out, "config.json")))["model"]["norm_impl"] == impl
        curves[impl] = [losses(out)[k] for k in range(1, 7)]
    assert max(abs(a - b) for a, b in zip(curves["eager"], curves["triton"])) < 0.02, curves
    assert curves["triton"][-1] < curves["triton"][0]


def test_triton_kernels_without_gpu_or_interpreter_are_refused(data, tmp_path):
    out = str(tmp_path / "run")
    res = run(train_cmd(data, out, ds_config(tmp_path), attn_impl="triton"), ok=False, env={"TRITON_INTERPRET": "0"})
    assert res.returncode == 2 and "need a CUDA GPU" in res.stderr.strip().splitlines()[-1], res.stderr[-2000:]
