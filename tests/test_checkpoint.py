"""Resuming on another number of ranks or another ZeRO stage (DeepSpeed universal checkpoints), the sampler
whose one-number position makes that possible, `gpt1 checkpoint info / convert`, and what they refuse.

The training runs go through tests/probe_state.py: gpt1.train that also writes the full fp32 weights and Adam
moments, gathered by DeepSpeed's own accessors, after every save and right after a resume's load."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import free_port
from test_train import BIN, ENV, EXCERPT, ROOT, ds_config, losses, run

PROBE = os.path.join(ROOT, "tests", "probe_state.py")
SEQ, MICRO, STEPS, SAVE = 32, 4, 15, 5  # checkpoints at steps 5, 10, 15; global batch 8; the loss falls
# The first loss after a resume against the same weights' loss on the same batch: on CPU both are computed with
# the same bf16 kernels, so only float32 rounding of the mean may differ (measured: at most 2.4e-7); on a
# GPU the reference, computed here on the CPU, may differ by bf16's spacing at a loss of ~5, 2**-5.
FIRST_LOSS_ATOL = 2**-5 if torch.cuda.is_available() else 1e-5


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from gpt1.data import prepare

    d = tmp_path_factory.mktemp("data") / "shakespeare"
    prepare(str(d), texts=[EXCERPT], vocab_size=512)
    return str(d)


def train(data, out, config, ranks, state_dir, ok=True, **flags):
    """tests/probe_state.py with gpt1.train's flags; the data order and the losses are deterministic
    (dropout off) so that the resumed runs can be compared with the uninterrupted ones."""
    args = {"data": data, "model": "gpt1-tiny", "out": out, "deepspeed_config": config, "seq_len": SEQ,
            "micro_batch_size": MICRO, "max_steps": STEPS, "save_interval": SAVE, "log_interval": 1,
            "eval_interval": 1000, "eval_batches": 1, "warmup_steps": 2, "lr": 2e-3, "dropout": 0.0, **flags}
    argv = [a for k, v in args.items() if v is not False
            for a in ([f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)]))]
    launcher = ([sys.executable] if ranks == 1 else
                [os.path.join(BIN, "deepspeed"), "--num_gpus", str(ranks), "--master_port", free_port()])
    return run(launcher + [PROBE] + argv, ok=ok, env={"GPT1_TEST_STATE_DIR": str(state_dir)})


def original(tmp_path_factory, data, ranks, gas):
    d = tmp_path_factory.mktemp(f"original_{ranks}ranks")
    config = ds_config(d, stage=2)
    train(data, str(d / "run"), config, ranks, d / "states", gradient_accumulation_steps=gas)
    return {"out": str(d / "run"), "states": d / "states", "losses": losses(str(d / "run")), "ranks": ranks,
            "gas": gas}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, data):
    """ZeRO-2 on 2 ranks, micro batch 4."""
    return original(tmp_path_factory, data, ranks=2, gas=1)


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory, data):
    """ZeRO-2 on 1 rank, micro batch 4 x accumulation 2: the same global batch of 8 as two_ranks."""
    return original(tmp_path_factory, data, ranks=1, gas=2)


def digest(d):
    return {f: hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest() for f in sorted(os.listdir(d))}


TAG = f"step{SAVE:08d}"


def copy_at_first_save(orig, tmp_path):
    """The original run directory as it was after its first save, at step SAVE."""
    out = str(tmp_path / "run")
    shutil.copytree(orig["out"], out)
    for step in range(2 * SAVE, STEPS + 1, SAVE):
        shutil.rmtree(os.path.join(out, "checkpoints", f"step{step:08d}"))
    return out


def reference_loss(data, state, stage):
    """The loss the weights saved at step SAVE give on the next step's global batch, computed as the runs
    compute it: in bf16, as the mean of the losses of its micro batches of MICRO samples (however the ranks
    and accumulation steps share them out, each micro batch is MICRO consecutive samples), and under ZeRO-3
    with the F.linear that DeepSpeed puts in its place (matmul, then the bias: it rounds differently)."""
    from deepspeed.runtime.zero.linear import zero3_linear_wrap

    from gpt1.config import get_config
    from gpt1.data import TokenFile, WindowSampler
    from gpt1.model import GPT1

    meta = json.load(open(os.path.join(data, "meta.json")))
    model = GPT1(get_config("gpt1-tiny", vocab_size=meta["vocab_size"], embd_pdrop=0.0, attn_pdrop=0.0,
                            resid_pdrop=0.0, attn_impl="sdpa", loss_impl="eager"))
    model.load_state_dict({n: s["fp32"] for n, s in state["params"].items()})
    model = model.to(torch.bfloat16).eval()
    tokens = TokenFile(data, "train", meta["dtype"])
    starts = WindowSampler(tokens, SEQ + 1, seed=1337).starts(SAVE * 2 * MICRO, 2 * MICRO)
    values, linear = [], torch.nn.functional.linear
    torch.nn.functional.linear = zero3_linear_wrap if stage == 3 else linear
    try:
        with torch.no_grad():
            for m in range(len(starts) // MICRO):
                rows = [tokens.tokens[s:s + SEQ + 1].astype(np.int64) for s in starts[m * MICRO:(m + 1) * MICRO]]
                w = torch.from_numpy(np.stack(rows))
                values.append(model(w[:, :-1], labels=w[:, 1:]).loss.float().item())
    finally:
        torch.nn.functional.linear = linear
    return sum(values) / len(values)


def resume_and_check(data, orig, tmp_path, ranks, stage, gas):
    out = copy_at_first_save(orig, tmp_path)
    ckpt = os.path.join(out, "checkpoints", TAG)
    before = digest(ckpt)
    res = train(data, out, ds_config(tmp_path, stage=stage), ranks, tmp_path / "states", resume=True,
                gradient_accumulation_steps=gas)
    log = res.stdout + res.stderr
    assert (f"checkpoint {TAG} was saved on {orig['ranks']} rank(s) with ZeRO-2, this run has {ranks} with "
            f"ZeRO-{stage}: resuming from its universal checkpoint") in log, log[-3000:]
    assert "(converted now)" in log
    assert digest(ckpt) == before  # the original is only read
    assert os.path.isfile(os.path.join(out, "checkpoints", f"{TAG}.universal", "CONVERTED"))

    # the optimizer state right after the load is the original's gathered fp32 state, elementwise
    saved = torch.load(orig["states"] / f"saved_{TAG}.pt")
    loaded = torch.load(tmp_path / "states" / f"loaded_{TAG}.pt")
    assert sorted(loaded["params"]) == sorted(saved["params"])
    for name, s in saved["params"].items():
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            diff = (loaded["params"][name][key] - s[key]).abs().max().item()
            assert torch.equal(loaded["params"][name][key], s[key]), f"{name} {key}: max abs diff {diff}"
    assert loaded["adam_steps"] == saved["adam_steps"] == [float(SAVE)]
    assert loaded["groups"] == saved["groups"]  # lr of the schedule, each group's own weight decay

    # the first loss after the resume is the loss of the saved weights on the batch at the saved position
    resumed, uninterrupted = losses(out), orig["losses"]
    assert sorted(resumed) == list(range(1, STEPS + 1))
    ref = reference_loss(data, saved, stage)
    assert abs(resumed[SAVE + 1] - ref) <= FIRST_LOSS_ATOL, (resumed[SAVE + 1], ref)
    # the run goes on where the uninterrupted one went: the same batches from the same state, only the reductions
    # (and under ZeRO-3 the linear layers) differ. Measured over 10 steps: 2e-4 (ZeRO-2), 3e-3 (ZeRO-3)
    gaps = [abs(resumed[k] - uninterrupted[k]) for k in range(SAVE + 1, STEPS + 1)]
    assert max(gaps) < 0.02, gaps
    # and training goes on falling
    after = [resumed[k] for k in range(SAVE + 1, STEPS + 1)]
    assert np.mean(after[-3:]) < np.mean(after[:3]) - 0.1, after
    return res


def test_resume_two_ranks_on_one_rank_zero2(data, two_ranks, tmp_path):
    resume_and_check(data, two_ranks, tmp_path, ranks=1, stage=2, gas=2)


def test_resume_one_rank_on_two_ranks_zero2(data, one_rank, tmp_path):
    resume_and_check(data, one_rank, tmp_path, ranks=2, stage=2, gas=1)


def test_resume_zero2_as_zero3_on_two_ranks(data, two_ranks, tmp_path):
    resume_and_check(data, two_ranks, tmp_path, ranks=2, stage=3, gas=1)


def no_space(*args, **kwargs):
    raise OSError(28, "No space left on device")


# gpt1.train whose ds_to_universal fails after it has extracted and merged every shard, before its last file
FAILING_TRAIN = """import sys
from deepspeed.checkpoint import ds_to_universal
from gpt1 import train
def no_space(*args, **kwargs):
    raise OSError(28, "No space left on device")
ds_to_universal._save_optimizer_state = no_space
train.main(sys.argv[1:])
"""


def test_failed_conversion_leaves_the_original_usable_and_says_so(data, two_ranks, tmp_path, monkeypatch, capsys):
    from gpt1 import checkpoint
    from gpt1.cli import main

    out = copy_at_first_save(two_ranks, tmp_path)
    root = os.path.join(out, "checkpoints")
    before, config = digest(os.path.join(root, TAG)), open(os.path.join(out, "config.json")).read()
    expected = (f"error: converting checkpoint {root}/{TAG} to a universal checkpoint failed ([Errno 28] No "
                "space left on device); the original is unchanged and still resumes on 2 rank(s) with ZeRO-2")

    # through --resume on another number of ranks: refused before anything in the run directory is rewritten
    script = tmp_path / "fail_conversion.py"
    script.write_text(FAILING_TRAIN)
    cmd = [sys.executable, str(script), "--data", data, "--model", "gpt1-tiny", "--out", out, "--deepspeed-config",
           ds_config(tmp_path, stage=2), "--seq-len", str(SEQ), "--max-steps", str(STEPS), "--resume"]
    res = run(cmd, ok=False)
    assert res.returncode == 2, res.stderr[-3000:]
    assert res.stderr.strip().splitlines()[-1] == expected, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert sorted(os.listdir(root)) == ["latest", TAG, "zero_to_fp32.py", "zero_to_torch.py"]
    assert digest(os.path.join(root, TAG)) == before
    assert open(os.path.join(out, "config.json")).read() == config

    # through `gpt1 checkpoint convert`, the same
    from deepspeed.checkpoint import ds_to_universal

    monkeypatch.setattr(ds_to_universal, "_save_optimizer_state", no_space)
    with pytest.raises(SystemExit) as exit_:
        main(["checkpoint", "convert", out])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == expected
    assert sorted(t for t in os.listdir(root) if t.startswith("step")) == [TAG]

    # the original is whole, and converts once the disk has room
    monkeypatch.undo()
    record = checkpoint.verify(root, TAG)
    assert checkpoint.convert(root, TAG, record)[1] is True
    assert checkpoint.convert(root, TAG, record)[1] is False  # once
    assert digest(os.path.join(root, TAG)) == before


def test_checkpoint_info_and_convert(two_ranks, tmp_path, capsys):
    from gpt1.cli import main

    out = str(tmp_path / "run")
    shutil.copytree(two_ranks["out"], out)
    res = subprocess.run([sys.executable, "-m", "gpt1.cli", "checkpoint", "info", out], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "3 complete checkpoint(s)" in res.stdout
    assert "  step00000005  step 5  2 rank(s)  ZeRO-2  40 samples" in res.stdout
    assert "newest: step00000015" in res.stdout and "n_embd=128" in res.stdout
    assert "mp_rank_00_model_states.pt" in res.stdout

    def cli(*argv):  # its output, less the warning DeepSpeed prints when it is first imported
        main(["checkpoint", *argv])
        return "".join(line for line in capsys.readouterr().out.splitlines(True) if "[WARNING]" not in line)

    assert cli("convert", out, "--tag", "step00000010").startswith(
        f"wrote {out}/checkpoints/step00000010.universal (step 10, saved on 2 rank(s) with ZeRO-2)")
    assert cli("convert", out, "--tag", "step00000010").startswith("already converted:")
    rows = {r["tag"]: r for r in json.loads(cli("info", out, "--json"))}
    assert rows["step00000010"]["universal"] == f"{out}/checkpoints/step00000010.universal"
    assert rows["step00000015"]["universal"] is None
    assert (rows["step00000015"]["world_size"], rows["step00000015"]["zero_stage"]) == (2, 2)
    # DeepSpeed's converter forks its workers: in a fresh process, which is what the command is
    res = subprocess.run([sys.executable, "-m", "gpt1.cli", "checkpoint", "convert", out, "--workers", "2"], cwd=ROOT,
                         env=ENV, capture_output=True, text=True, check=False, timeout=300)
    assert res.returncode == 0 and f"wrote {out}/checkpoints/step00000015.universal" in res.stdout, res.stderr[-2000:]


def test_checkpoint_cli_refuses_foreign_and_incomplete_checkpoints(two_ranks, tmp_path, capsys):
    from gpt1.cli import main

    out = str(tmp_path / "run")
    shutil.copytree(two_ranks["out"], out)
    root = os.path.join(out, "checkpoints")
    os.remove(os.path.join(root, "step00000015", "COMPLETE"))  # a save that never finished
    with open(os.path.join(root, "step00000010", "COMPLETE"), "w") as f:
        f.write('{"written by": "another trainer"}')  # a checkpoint of another program
    victim = os.path.join(root, "step00000005", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt")
    with open(victim, "r+b") as f:
        f.truncate(1000)

    def error(*argv):
        with pytest.raises(SystemExit) as exit_:
            main(["checkpoint", *argv])
        assert exit_.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        return lines[0]

    assert "is not a run directory (no checkpoints/ in it)" in error("info", str(tmp_path / "nowhere"))
    assert "is not a run directory" in error("convert", str(tmp_path / "nowhere"))
    assert error("info", out) == f"error: {root}/step00000010/COMPLETE is not a checkpoint record (KeyError: 'step')"
    os.remove(os.path.join(root, "step00000010", "COMPLETE"))
    main(["checkpoint", "info", out])
    assert "step00000015  incomplete (no COMPLETE record)" in capsys.readouterr().out
    assert "step00000015 is not complete (no COMPLETE record); complete ones: step00000005" in error(
        "convert", out, "--tag", "step00000015")
    assert "step00000020 does not exist" in error("convert", out, "--tag", "step00000020")
    assert error("convert", out).startswith(f"error: checkpoint file {victim} is truncated or altered (1000 bytes, ")
    assert not [t for t in os.listdir(root) if ".universal" in t]


def test_zero0_checkpoint_cannot_change_stage_and_says_how_it_can_resume(data, tmp_path, capsys):
    from gpt1.cli import main

    out = str(tmp_path / "run")
    train(data, out, ds_config(tmp_path, stage=0, bf16=False), 1, tmp_path / "states", max_steps=2, save_interval=2)
    config = open(os.path.join(out, "config.json")).read()
    res = train(data, out, ds_config(tmp_path, stage=2), 1, tmp_path / "states", ok=False, max_steps=4, resume=True)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == (
        f"error: checkpoint {out}/checkpoints/step00000002 was saved with ZeRO-0, which keeps no ZeRO optimizer "
        "state for DeepSpeed's universal checkpoint to convert; resume it with ZeRO-0 (on any number of ranks)")
    assert open(os.path.join(out, "config.json")).read() == config
    with pytest.raises(SystemExit):
        main(["checkpoint", "convert", out])
    assert "saved with ZeRO-0" in capsys.readouterr().err


def test_sampler_order_does_not_depend_on_ranks_or_split(data):
    """Each optimizer step reads the same global samples whatever the ranks x micro batch x accumulation
    split of the same global batch, and a position saved under one split continues under another."""
    from gpt1.data import TokenFile, WindowSampler

    tokens = TokenFile(data, "train", "uint16")

    def steps(world, micro, gas, n, start=0):
        samplers = [WindowSampler(tokens, SEQ + 1, seed=7, rank=r, world=world) for r in range(world)]
        for s in samplers:
            s.load_state_dict({"samples": start})
        out = []
        for _ in range(n):
            rows = [s.batch(micro) for _ in range(gas) for s in samplers]  # micro step-major, like the ranks
            out.append(np.concatenate(rows))
        assert len({s.samples for s in samplers}) == 1
        return out, samplers[0].state_dict()

    ref, _ = steps(1, 8, 1, 6)
    for world, micro, gas in [(2, 4, 1), (1, 4, 2), (4, 1, 2), (2, 2, 2)]:
        got, _ = steps(world, micro, gas, 6)
        assert all((a == b).all() for a, b in zip(got, ref)), (world, micro, gas)
    first, state = steps(2, 4, 1, 3)  # three steps on two ranks, then three on one with accumulation 2
    rest, _ = steps(1, 4, 2, 3, start=state["samples"])
    assert all((a == b).all() for a, b in zip(first + rest, ref))


def test_sampler_visits_every_window_once_per_epoch_across_a_resume(tmp_path):
    """Two epochs read on 2 ranks, resumed part-way on 3 ranks: every window of each epoch (every start
    position of the file) is read exactly once, no repeat and no skip, each a contiguous slice of the file,
    and the second epoch is shuffled afresh."""
    from gpt1.data import TokenFile, WindowSampler, permute

    flat = np.random.default_rng(0).integers(0, 500, size=1000).astype(np.uint16)
    flat.tofile(tmp_path / "train.bin")
    tokens = TokenFile(str(tmp_path), "train", "uint16")
    n = len(flat) - SEQ  # windows of SEQ + 1 tokens
    assert WindowSampler(tokens, SEQ + 1, seed=3).n == n

    def read(world, micro, start, stop):
        samplers = [WindowSampler(tokens, SEQ + 1, seed=3, rank=r, world=world) for r in range(world)]
        for s in samplers:
            s.load_state_dict({"samples": start})
        rows = []
        while samplers[0].samples < stop:
            rows += [s.batch(micro) for s in samplers]
        return np.concatenate(rows), samplers[0].samples

    cut = 2 * 5 * 37  # samples consumed on 2 ranks x micro 5 when the run stops
    a, pos = read(2, 5, 0, cut)
    b, _ = read(3, 2, pos, 2 * n - cut)
    assert pos == cut
    windows = np.concatenate([a, b])[:2 * n]
    probe = WindowSampler(tokens, SEQ + 1, seed=3)
    for epoch in range(2):
        starts = probe.starts(epoch * n, n)
        assert sorted(starts.tolist()) == list(range(n))  # each window once
        for row, s in zip(windows[epoch * n:(epoch + 1) * n], starts):
            assert (row == flat[s:s + SEQ + 1]).all()
    assert (probe.starts(0, n) != probe.starts(n, n)).any()
    for size in (1, 2, 3, 4, 5, 255, 256, 257, 4097):  # the permutation of awkward sizes, cycle walking included
        keys = np.random.default_rng(size).integers(0, 2**63, size=4, dtype=np.uint64)
        assert sorted(permute(np.arange(size), size, keys).tolist()) == list(range(size))


def test_sampler_refuses_data_shorter_than_a_window(tmp_path):
    from gpt1.data import DataError, TokenFile, WindowSampler

    np.arange(10, dtype=np.uint16).tofile(tmp_path / "train.bin")
    with pytest.raises(DataError, match="fewer than one window of 11"):
        WindowSampler(TokenFile(str(tmp_path), "train", "uint16"), 11, seed=0)
    s = WindowSampler(TokenFile(str(tmp_path), "train", "uint16"), 10, seed=0)
    assert s.n == 1 and (s.batch(2) == np.arange(10)).all()
