"""gpt1.runtime: GuardedAdamW clips by the global norm and skips non-finite steps whole, inside DeepSpeed's
ZeRO-2 step (which calls it once per parameter group) as on its own; DeepSpeed config loading."""

import copy
import json
import math
import os
import re
from dataclasses import fields
from types import SimpleNamespace

import pytest
import torch
from helpers import grads_agree, replayed_dropout

from gpt1 import GPT1, GPT1Config
from gpt1.errors import GPT1Error
from gpt1.model import param_groups
from gpt1.runtime import (
    GuardedAdamW,
    build_engine,
    compile_module,
    field_comments,
    init_distributed,
    lean_checks,
    load_ds_config,
    mfu,
    parse_dataclass,
    resolve_ds_config,
    share_cpu_threads,
)

SMALL = dict(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2, embd_pdrop=0.0, attn_pdrop=0.0,
             resid_pdrop=0.0, attn_impl="eager", loss_impl="eager")
LR, WD, CLIP = 1e-2, 0.1, 0.05  # CLIP well below the gradient norm: every step is clipped


def batches(n, B=2, T=8, V=64):
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, V, (B, T + 1), generator=g) for _ in range(n)]


def reference_steps(model, data, norms=None):
    """The same steps with torch's AdamW and clip_grad_norm_: what GuardedAdamW must do. norms (a list) receives
    each step's gradient norm before clipping."""
    opt = torch.optim.AdamW(param_groups(model, WD), lr=LR, betas=(0.9, 0.999), eps=1e-8)
    for w in data:
        opt.zero_grad()
        model(w[:, :-1], labels=w[:, 1:]).loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        if norms is not None:
            norms.append(norm.item())
        opt.step()
    return model


def test_guarded_adamw_alone_matches_clipped_adamw():
    torch.manual_seed(0)
    model, data, norms = GPT1(GPT1Config(**SMALL)), batches(3), []
    ref = reference_steps(copy.deepcopy(model), data, norms)
    opt = GuardedAdamW(param_groups(model, WD), lr=LR, betas=(0.9, 0.999), eps=1e-8, max_grad_norm=CLIP)
    for w in data:
        opt.zero_grad()
        model(w[:, :-1], labels=w[:, 1:]).loss.backward()
        opt.step()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    skipped, longest, grad_norm = opt.read_counters()
    assert (skipped, longest) == (0, 0)
    assert grad_norm == pytest.approx(norms[-1], rel=1e-5)  # the last step's, before clipping


def test_guarded_adamw_keeps_a_loss_scalers_grad_scale():
    """Without clipping the guard leaves the fused kernel's grad_scale as torch's GradScaler sets it (the loss scale
    that the kernel divides the fp16 gradients by); with clipping it is the clipping's, and equals clipping first."""
    torch.manual_seed(0)
    model, data = GPT1(GPT1Config(**SMALL)), batches(2)
    ref = reference_steps(copy.deepcopy(model), data)  # clipped to CLIP
    # a large eps makes the update depend on the gradients' scale (Adam's is otherwise nearly scale-free)
    unscaled = copy.deepcopy(model)
    opt_ref = torch.optim.AdamW(param_groups(unscaled, WD), lr=LR, betas=(0.9, 0.999), eps=1e-2)
    scaled = copy.deepcopy(model)
    opt = GuardedAdamW(param_groups(scaled, WD), lr=LR, betas=(0.9, 0.999), eps=1e-2, max_grad_norm=0.0)
    for w in data:
        for m, o, scale in ((unscaled, opt_ref, 1.0), (scaled, opt, 1024.0)):
            o.zero_grad()
            (m(w[:, :-1], labels=w[:, 1:]).loss * scale).backward()
        opt.grad_scale = torch.tensor(1024.0)  # as GradScaler.step does for a fused optimizer
        opt_ref.step()
        opt.step()
    for (name, p), q in zip(scaled.named_parameters(), unscaled.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert any((p - q).abs().max() > 1e-4 for p, q in zip(scaled.parameters(), ref.parameters()))  # not clipped


@pytest.fixture(scope="module")
def dist_env():
    """One rank over gloo, in this process; afterwards its group is destroyed and the launcher-style variables that
    init_distributed set are removed, so that a later subprocess (a one-rank run, which takes RANK in its environment
    for a launcher's) picks a port of its own rather than this group's."""
    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    before = {k: os.environ.get(k) for k in keys}
    init_distributed()
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_cpu_ranks_share_the_cores(monkeypatch):
    """On a CPU each rank takes cores // local ranks threads unless OMP_NUM_THREADS is set (DeepSpeed's launcher
    sets LOCAL_SIZE, torchrun LOCAL_WORLD_SIZE)."""
    saved = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)), raising=False)
    try:
        for local, threads in (("2", 3), ("4", 1), ("8", 1), ("1", 6)):
            monkeypatch.setenv("LOCAL_SIZE", local)
            assert share_cpu_threads() == threads and torch.get_num_threads() == threads, local
        monkeypatch.delenv("LOCAL_SIZE")
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
        assert share_cpu_threads() == 2 and torch.get_num_threads() == 2
        torch.set_num_threads(5)
        monkeypatch.setenv("OMP_NUM_THREADS", "4")  # the user's choice stands
        assert share_cpu_threads() is None and torch.get_num_threads() == 5
    finally:
        torch.set_num_threads(saved)


def zero2_engine(model):
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": CLIP,
          "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    ds, max_grad_norm = lean_checks(ds, 1)
    assert ds["gradient_clipping"] == 0 and max_grad_norm == CLIP  # the clipping moved into GuardedAdamW
    engine, optimizer, _ = build_engine(model, ds, lr=LR, weight_decay=WD, max_grad_norm=max_grad_norm)
    return engine, optimizer


def test_guard_inside_zero2_clips_by_the_global_norm(dist_env):
    """ZeRO-2 (fp32) steps the two parameter groups one at a time; the clipping still uses the norm over both."""
    torch.manual_seed(0)
    model, data, norms = GPT1(GPT1Config(**SMALL)), batches(3), []
    ref = reference_steps(copy.deepcopy(model), data, norms)
    engine, optimizer = zero2_engine(model)
    for w in data:
        engine.backward(engine(w[:, :-1], labels=w[:, 1:]).loss)
        engine.step()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)
    # the logged norm covers both groups
    assert optimizer.read_counters()[2] == pytest.approx(norms[-1], rel=1e-4)


def test_guard_inside_zero2_skips_the_whole_step(dist_env):
    """A NaN in one bias (the no-decay group, stepped second) leaves the decayed weights (stepped first)
    untouched too, and the skip is counted once."""
    torch.manual_seed(0)
    model = GPT1(GPT1Config(**SMALL))
    engine, optimizer = zero2_engine(model)
    w = batches(1)[0]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    handle = model.h[0].ln_2.bias.register_hook(lambda g: torch.full_like(g, float("nan")))
    engine.backward(engine(w[:, :-1], labels=w[:, 1:]).loss)
    engine.step()
    handle.remove()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert optimizer.read_counters() == (1, 1, None)  # a skipped step's norm is not finite: not logged
    engine.backward(engine(w[:, :-1], labels=w[:, 1:]).loss)
    engine.step()
    assert not torch.equal(model.h[0].attn.c_attn.weight, before["h.0.attn.c_attn.weight"])
    skipped, longest, grad_norm = optimizer.read_counters()
    assert skipped == 1 and math.isfinite(grad_norm) and grad_norm > 0  # not skipped: the count stays


def test_lean_checks_keep_deepspeeds_where_it_needs_them():
    fp16 = {"fp16": {"enabled": True}, "gradient_clipping": 1.0, "zero_optimization": {"stage": 2}}
    zero3 = {"bf16": {"enabled": True}, "gradient_clipping": 1.0, "zero_optimization": {"stage": 3}}
    for ds in (fp16, zero3):  # their checks and clipping stay; DeepSpeed's throughput timer, which syncs twice a
        # step, goes (and on one rank ZeRO-1/2's overlap and bucket, see the next test)
        one_rank = {"overlap_comm": False, "contiguous_gradients": False} if ds is fp16 else {}
        assert lean_checks(ds, 2) == ({**ds, "timers": {"throughput": {"enabled": False}}}, 0.0)
        assert lean_checks(ds, 1) == ({**ds, "timers": {"throughput": {"enabled": False}},
                                       "zero_optimization": {**ds["zero_optimization"], **one_rank}}, 0.0)
    lean, clip = lean_checks({"bf16": {"enabled": True}, "gradient_clipping": 1.0,
                              "zero_optimization": {"stage": 1}}, 1)
    assert clip == 1.0 and lean["bf16"]["check_grad_overflow"] is False
    assert lean["zero_optimization"]["compute_grad_norm"] is False
    kept = {"timers": {"throughput": {"enabled": True}}, "zero_optimization": {"stage": 0}}
    assert lean_checks(kept, 1)[0]["timers"] == kept["timers"]  # a config's own choice stands


def test_lean_checks_turn_overlap_comm_and_contiguous_gradients_off_on_one_rank():
    for stage in (1, 2):
        zo = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True}
        ds = {"bf16": {"enabled": True}, "zero_optimization": zo}
        one = lean_checks(ds, 1)[0]["zero_optimization"]
        assert one["overlap_comm"] is False and one["contiguous_gradients"] is False
        several = lean_checks(ds, 2)[0]["zero_optimization"]  # the config's choices
        assert several["overlap_comm"] is True and several["contiguous_gradients"] is True
        assert ds["zero_optimization"] == zo  # the caller's dict is not changed
    zero3 = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 3, "overlap_comm": True,
                                                               "contiguous_gradients": True}}
    assert lean_checks(zero3, 1)[0]["zero_optimization"] == zero3["zero_optimization"]


def test_one_rank_zero2_engine_runs_without_overlap_comm(dist_env):
    """DeepSpeed's ZeRO-1/2 optimizer synchronizes the device at the end of each backward (on CUDA) when its
    overlap_comm is set (stage_1_and_2.py, independent_gradient_partition_epilogue), and copies every gradient
    into its bucket when contiguous_gradients is: the shipped ZeRO-2 config sets both, the engine built from it
    through lean_checks on one rank runs without either, and takes the very same steps as with the bucket
    (fp32 here: bitwise)."""
    with open("ds_configs/zero2_bf16.json") as f:
        shipped = {**json.load(f), "train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": False}}
    lean = lean_checks(shipped, 1)[0]
    bucketed = {**lean, "zero_optimization": {**lean["zero_optimization"], "contiguous_gradients": True}}
    weights = []
    for ds, overlap, contiguous in ((shipped, True, True), (lean, False, False), (bucketed, False, True)):
        torch.manual_seed(0)
        engine, _, _ = build_engine(GPT1(GPT1Config(**SMALL)), ds, lr=LR)
        assert (engine.optimizer.overlap_comm, engine.optimizer.contiguous_gradients) == (overlap, contiguous)
        w = batches(1)[0]
        before = engine.module.h[0].mlp.c_fc.weight.detach().clone()
        for _ in range(2):
            engine.backward(engine(w[:, :-1], labels=w[:, 1:]).loss)
            engine.step()
        assert not torch.equal(engine.module.h[0].mlp.c_fc.weight, before)
        weights.append({n: p.detach().clone() for n, p in engine.module.named_parameters()})
    for n, p in weights[1].items():
        assert torch.equal(p, weights[2][n]), n


def test_lean_checks_under_torch_autocast():
    """ZeRO-0 under torch_autocast in bf16 hands the gradients to GuardedAdamW as fp32 training does: the
    clipping moves there; in fp16 DeepSpeed's GradScaler needs its own clipping (after unscaling) and keeps it."""
    for stage in (0, 1, 2):
        ds = {"torch_autocast": {"enabled": True, "dtype": "bfloat16"}, "gradient_clipping": 1.0,
              "zero_optimization": {"stage": stage}}
        lean, clip = lean_checks(ds, 1)
        assert clip == 1.0 and lean["gradient_clipping"] == 0.0
        assert ("compute_grad_norm" in lean["zero_optimization"]) == (stage > 0)
    fp16 = {"torch_autocast": {"enabled": True, "dtype": "float16"}, "gradient_clipping": 1.0,
            "zero_optimization": {"stage": 0}}
    assert lean_checks(fp16, 1)[1] == 0.0


def test_parameter_count_and_flops_survive_zero3_partitioning(dist_env, monkeypatch):
    """ZeRO-3 leaves every rank's parameters as empty tensors: the model's count (the training log's, and its
    FLOPs per token for the MFU) still reads the full sizes."""
    # a ZeRO-3 engine replaces F.linear for the whole process (zero3_linear_wrap): put it back for the other tests
    monkeypatch.setattr(torch.nn.functional, "linear", torch.nn.functional.linear)
    model = GPT1(GPT1Config(**SMALL))
    n, flops = model.num_parameters(), model.flops_per_token(16)
    ds = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True}
    engine, _, _ = build_engine(model, ds, lr=LR)
    assert sum(p.numel() for p in engine.module.parameters()) == 0  # partitioned: what a plain count would see
    assert (engine.module.num_parameters(), engine.module.flops_per_token(16)) == (n, flops)


def test_bench_rows_after_a_zero3_row_keep_torchs_linear(dist_env):
    """bench.e2e runs its rows in one process, the ZeRO-3 row before max-autotune's: the F.linear that its engine
    puts in place (DeepSpeed's zero3_linear_wrap) must not be what the later rows compute with."""
    from bench import common, e2e

    recipe = next(r for r in e2e.ROWS if r.zero == 3)
    linear = torch.nn.functional.linear
    row = e2e.bench_row(common.environment(True), recipe, dict(e2e.settings(True), n_layer=1), True,
                        torch.device("cpu"), common.Deadline(0))
    assert row["status"] == "ok", row.get("reason")
    assert torch.nn.functional.linear is linear


def test_mfu_of_a_known_gpu(monkeypatch):
    """MFU = tokens/s per rank x FLOPs per token / the GPU's dense bf16 peak; none off CUDA or on an unknown GPU."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    cuda = torch.device("cuda", 0)
    assert mfu(400_000, 7.5e8, cuda) == pytest.approx(400_000 * 7.5e8 / 989e12)
    assert mfu(400_000, 7.5e8, cuda, world_size=2) == pytest.approx(200_000 * 7.5e8 / 989e12)
    assert mfu(400_000, 7.5e8, torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert mfu(400_000, 7.5e8, cuda) is None


def test_zero0_torch_autocast_is_the_nanogpt_recipe(dist_env):
    """DeepSpeed ZeRO-0 with torch_autocast (bf16) on one rank takes the same steps as plain PyTorch's
    torch.autocast + AdamW + clip_grad_norm_: fp32 weights and gradients, nothing rounded in between (the
    one-rank all-reduce, which would round the gradients to bf16, is skipped)."""
    torch.manual_seed(0)
    model, data = GPT1(GPT1Config(**{**SMALL, "attn_impl": "sdpa"})), batches(3)
    ref = copy.deepcopy(model)
    opt = torch.optim.AdamW(param_groups(ref, WD), lr=LR, betas=(0.9, 0.999), eps=1e-8)
    for w in data:
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = ref(w[:, :-1], labels=w[:, 1:]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP)
        opt.step()
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": CLIP,
          "torch_autocast": {"enabled": True, "dtype": "bfloat16"}, "zero_optimization": {"stage": 0},
          "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    ds, max_grad_norm = lean_checks(ds, 1)
    engine, optimizer, _ = build_engine(model, ds, lr=LR, weight_decay=WD, max_grad_norm=max_grad_norm)
    assert engine.optimizer is optimizer and not engine.enable_backward_allreduce
    for w in data:
        engine.backward(engine(w[:, :-1], labels=w[:, 1:]).loss)
        engine.step()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert p.dtype == torch.float32
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("scale", ["small", "gpt1"])
def test_zero2_bf16_eager_kernels_follow_the_replayed_reference(dist_env, monkeypatch, scale):
    """The conditions of the loss curves' eager run (bench.curves "eager"): DeepSpeed ZeRO-2 in bf16 with
    overlap_comm and contiguous gradients as the config has them, not compiled, our attention (dropout on) and
    fused linear cross-entropy, against the eager reference with the same keep-masks replayed: every parameter's
    gradient (as autograd hands it to ZeRO's hooks) and the loss agree at every step, to bf16 rounding. "gpt1"
    (GPU only): two layers of GPT-1's width, heads and vocabulary at T=512."""
    if scale == "gpt1" and not torch.cuda.is_available():
        pytest.skip("GPT-1 scale runs on a GPU")
    small = scale == "small"
    shape = dict(n_positions=32, n_embd=32, n_layer=2, n_head=2) if small else dict(
        vocab_size=40478, n_positions=512, n_embd=768, n_layer=2, n_head=12)
    cfg = dict(SMALL, **shape, attn_pdrop=0.2, attn_impl="triton")
    B, T = (4, 32) if small else (8, 512)
    data = batches(3, B=B, T=T, V=cfg["vocab_size"])
    ds = {"train_micro_batch_size_per_gpu": B, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
          "bf16": {"enabled": True}, "zero_optimization": {"stage": 2, "overlap_comm": True,
                                                          "contiguous_gradients": True, "reduce_bucket_size": 5e7},
          "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    runs = {}
    for mode in ("ours", "replay"):
        with monkeypatch.context() as mp:
            replayed_dropout(mp, mode)
            torch.manual_seed(0)
            model = GPT1(GPT1Config(**{**cfg, "loss_impl": "triton_linear" if mode == "ours" else "eager"}))
            lean, max_grad_norm = lean_checks(ds, 1)
            engine, _, _ = build_engine(model, lean, lr=1e-3, weight_decay=WD, max_grad_norm=max_grad_norm,
                                        tied_weight=model.tokens_embed.weight)
            grads = []  # per step, per parameter: the gradient that reaches ZeRO's hooks
            for i, p in enumerate(model.parameters()):
                p.register_hook(lambda g, i=i, grads=grads: grads[-1].__setitem__(i, g.detach().float().clone()))
            losses = []
            for w in data:
                w = w.to(engine.device)
                grads.append({})
                loss = engine(w[:, :-1], labels=w[:, 1:]).loss
                engine.backward(loss)
                engine.step()
                losses.append(loss.detach().float())
            runs[mode] = torch.stack(losses), grads
    (ours_l, ours_g), (ref_l, ref_g) = runs["ours"], runs["replay"]
    names = [n for n, _ in model.named_parameters()]
    torch.testing.assert_close(ours_l, ref_l, rtol=0, atol=1e-3 if small else 1e-2)
    for step, (a, b) in enumerate(zip(ours_g, ref_g)):
        assert sorted(a) == sorted(b) == list(range(len(names))), f"step {step}: gradients missing"
        for i, name in enumerate(names):
            if small:
                torch.testing.assert_close(a[i], b[i], rtol=2e-2, atol=2e-3, msg=f"{name}.grad, step {step}")
            else:
                grads_agree(a[i], b[i], f"{name}.grad, step {step}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs are only detectable on CUDA")
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_default_training_step_never_waits_on_the_gpu(dist_env, mode):
    """gpt1.train's default step on a GPU (DeepSpeed ZeRO-0 under torch_autocast bf16, our kernels with dropout,
    compiled; and as CUDA graphs) makes no host sync: torch's sync debug mode turns any (an .item(), a pageable
    host-to-device copy, a synchronize) into an error."""
    cfg = dict(SMALL, n_positions=64, n_embd=64, n_head=2, attn_impl="triton", loss_impl="triton_linear",
               attn_pdrop=0.1, resid_pdrop=0.1, embd_pdrop=0.1)
    ds = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": CLIP,
          "torch_autocast": {"enabled": True, "dtype": "bfloat16"}, "zero_optimization": {"stage": 0},
          "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT1(GPT1Config(**cfg))
    lean, max_grad_norm = lean_checks(ds, 1)
    engine, _, _ = build_engine(model, lean, lr=LR, weight_decay=WD, max_grad_norm=max_grad_norm)
    assert compile_module(engine, True, 0, mode)
    w = batches(1, B=4, T=64)[0].to(engine.device)

    def step():
        loss = engine(w[:, :-1], labels=w[:, 1:]).loss
        engine.backward(loss)
        engine.step()

    for _ in range(3):  # compiles, records the CUDA graphs, builds Triton's kernels
        step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("gas,evaluate", [(1, False), (2, True)], ids=["step", "accumulate-and-evaluate"])
def test_cuda_graphs_train_like_the_default_compile(dist_env, gas, evaluate):
    """--compile-mode reduce-overhead in gpt1.train's default setting (ZeRO-0, torch_autocast bf16, our kernels):
    Inductor replays the forward and backward as CUDA graphs (none skipped), and every step's loss and gradients
    are those of the default compile. Also with gradient accumulation (the gradients that a replay writes are
    added to those of the micro step before, which must not live in memory the next replay overwrites) and with
    gpt1.train's evaluation between steps (an eval-mode forward without gradients: other graphs, the same pool).
    The learning rate is 0, so that every step (Inductor's warm-up run, the recording, then replays) sees the same
    weights in both modes and its gradients can be compared to rounding:
    read after each backward, before the step, where a replay that overwrote memory still in use (a gradient
    held in the graphs' pool) would show as a gradient far off. Not bitwise: cuBLAS may pick other algorithms
    inside a capture. (An earlier version trained at LR 1e-2 and compared the weights after four steps to 1e-5,
    which one Adam step, moving any element whose tiny gradient flips sign by 2 LR, cannot meet; it failed on an
    H200 without saying how.)"""
    from torch._dynamo.utils import counters

    cfg = dict(SMALL, n_positions=64, n_embd=64, n_head=2, attn_impl="triton", loss_impl="triton_linear")  # no dropout
    data = batches(4, B=4, T=64)
    ds = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": gas, "gradient_clipping": CLIP,
          "torch_autocast": {"enabled": True, "dtype": "bfloat16"}, "zero_optimization": {"stage": 0},
          "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    seen = {}
    for mode in ("default", "reduce-overhead"):
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        model = GPT1(GPT1Config(**cfg))
        lean, max_grad_norm = lean_checks(ds, 1)
        engine, _, _ = build_engine(model, lean, lr=0.0, weight_decay=WD, max_grad_norm=max_grad_norm)
        assert compile_module(engine, True, 0, mode)
        losses, grads = [], []
        for i, w in enumerate(data):
            w = w.to(engine.device)
            loss = engine(w[:, :-1], labels=w[:, 1:]).loss
            engine.backward(loss)
            losses.append(loss.item())
            grads.append({n: p.grad.detach().float().clone() for n, p in model.named_parameters()})
            engine.step()
            if evaluate and i == 1:  # as gpt1.train's evaluate: eval mode, no gradients, the logits read
                engine.module.eval()
                with torch.no_grad():
                    losses.append(engine(w[:, :-1]).logits.float().logsumexp(-1).mean().item())
                engine.module.train()
        seen[mode] = losses, grads
        if mode == "reduce-overhead":
            assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    (losses, grads), (ref_losses, ref_grads) = seen["reduce-overhead"], seen["default"]
    assert losses == pytest.approx(ref_losses, rel=1e-3), (losses, ref_losses)
    for step, (g, ref) in enumerate(zip(grads, ref_grads)):
        for name in ref:
            if ref[name].norm() == 0:
                assert g[name].norm() == 0, f"step {step} {name}"
            else:
                grads_agree(g[name], ref[name], f"step {step} {name}")


def test_compile_is_refused_under_zero3():
    engine = SimpleNamespace(device=torch.device("cpu"), module=torch.nn.Linear(2, 2))
    assert compile_module(engine, None, 3) is False and compile_module(engine, False, 2) is False
    with pytest.raises(GPT1Error, match="ZeRO-3"):
        compile_module(engine, True, 3)
    with pytest.raises(GPT1Error, match="ZeRO-3"):
        compile_module(engine, None, 3, "reduce-overhead")


def test_compile_mode_reaches_torch_compile(monkeypatch):
    """--compile-mode is torch.compile's mode ("default" passes none); a mode other than "default" compiles where
    the default would not (a CPU), and is refused with --no-compile or when unknown."""
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(kw) or fn)
    engine = SimpleNamespace(device=torch.device("cpu"), module=torch.nn.Linear(2, 2))
    assert compile_module(engine, None, 0) is False and seen == []
    assert compile_module(engine, True, 2) is True and seen[-1] == dict(fullgraph=True, mode=None)
    assert compile_module(engine, None, 0, "reduce-overhead") is True
    assert seen[-1] == dict(fullgraph=True, mode="reduce-overhead")
    with pytest.raises(GPT1Error, match="needs compiling"):
        compile_module(engine, False, 0, "max-autotune")
    with pytest.raises(GPT1Error, match="must be one of default, reduce-overhead"):
        compile_module(engine, True, 0, "fast")
    assert len(seen) == 2


def test_inline_kernels_reach_the_operators_and_torch_compile(monkeypatch):
    """--inline-kernels turns on the tracing into our operators (kernels.set_inline, with torch's config that
    AOTAutograd's cache keys on); without it both are off again; with --no-compile it is refused."""
    import kernels

    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(kw) or fn)
    # torch's config entry is restored by assignment: monkeypatch would undo it with a delattr, which hides the
    # entry from every later compile in the process under torch 2.11 ("... does not exist")
    decompose = torch._functorch.config.decompose_custom_triton_ops
    engine = SimpleNamespace(device=torch.device("cpu"), module=torch.nn.Linear(2, 2))
    try:
        assert compile_module(engine, True, 0, inline_kernels=True) is True
        assert seen[-1] == dict(fullgraph=True, mode=None)
        assert kernels.inline_enabled() and torch._functorch.config.decompose_custom_triton_ops
        assert compile_module(engine, True, 0) is True
        assert not kernels.inline_enabled() and not torch._functorch.config.decompose_custom_triton_ops
        with pytest.raises(GPT1Error, match="--inline-kernels needs compiling"):
            compile_module(engine, False, 0, inline_kernels=True)
    finally:
        kernels.set_inline(False)
        torch._functorch.config.decompose_custom_triton_ops = decompose


def test_load_ds_config_overrides_and_refuses(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 32, "gradient_accumulation_steps": 2}))
    ds = load_ds_config(str(path), world_size=2)
    assert ds["train_micro_batch_size_per_gpu"] == 8
    ds = load_ds_config(str(path), world_size=2, micro_batch_size=4, gradient_accumulation_steps=1)
    assert (ds["train_batch_size"], ds["gradient_accumulation_steps"]) == (8, 1)
    path.write_text(json.dumps({"train_batch_size": 30, "gradient_accumulation_steps": 4}))
    with pytest.raises(GPT1Error, match="not divisible"):
        load_ds_config(str(path), world_size=2)


@pytest.mark.parametrize("cfg, msg", [
    ([1, 2], "must be a JSON object, got list"),
    ({"train_batch_size": "8"}, "train_batch_size must be a positive integer, got '8'"),
    ({"train_micro_batch_size_per_gpu": 0}, "train_micro_batch_size_per_gpu must be a positive integer, got 0"),
    ({"train_batch_size": 8, "gradient_accumulation_steps": True}, "gradient_accumulation_steps must be a positive"),
    ({"train_batch_size": 8, "bf16": True}, "bf16 must be a JSON object, got True"),
    ({"train_batch_size": 8, "zero_optimization": 2}, "zero_optimization must be a JSON object, got 2"),
])
def test_ds_config_of_wrong_types_is_one_line_error(tmp_path, cfg, msg):
    """Valid JSON of the wrong shape: a one-line error, where it was a TypeError from inside the batch arithmetic."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(GPT1Error, match=re.escape(msg)):
        load_ds_config(str(path), world_size=1)


def test_metrics_rows_past_the_resumed_step_are_dropped(tmp_path):
    """A run killed after its last checkpoint logged rows that the resumed run logs again: they go, and so does a
    line the kill cut."""
    from gpt1.runtime import drop_rows_after, read_rows

    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 1.0 / s} for s in (10, 20, 30)] + [{"step": 20, "val_loss": 2.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 40, "lo')
    assert read_rows(str(path)) == rows
    drop_rows_after(str(path), 20)
    assert read_rows(str(path)) == [rows[0], rows[1], rows[3]]
    assert path.read_text().endswith("\n")


def test_ds_config_names_resolve_from_any_directory(tmp_path, monkeypatch):
    """The default --deepspeed-config (ds_configs/...) and the project's configs by name work outside the checkout;
    a file of that path in the working directory comes first; anything else is a one-line error naming them."""
    monkeypatch.chdir(tmp_path)
    project = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ds_configs")
    expected = os.path.join(project, "zero2_bf16.json")
    for name in ("ds_configs/zero2_bf16.json", "./ds_configs/zero2_bf16.json", "zero2_bf16.json", "zero2_bf16"):
        assert os.path.samefile(resolve_ds_config(name), expected), name
    ds = load_ds_config("ds_configs/zero0_autocast_bf16.json", world_size=1)
    assert ds["zero_optimization"]["stage"] == 0
    (tmp_path / "ds_configs").mkdir()
    (tmp_path / "ds_configs" / "zero2_bf16.json").write_text(json.dumps({"train_batch_size": 6}))
    assert resolve_ds_config("ds_configs/zero2_bf16.json") == "ds_configs/zero2_bf16.json"
    assert load_ds_config("ds_configs/zero2_bf16.json", world_size=1)["train_batch_size"] == 6
    for missing in ("zero9_bf16", "other/zero2_bf16.json"):
        with pytest.raises(GPT1Error, match=f"DeepSpeed config {missing} not found .*zero2_bf16, zero2_fp16"):
            resolve_ds_config(missing)
    with pytest.raises(GPT1Error, match=r"^DeepSpeed config /nonexistent/zero2_bf16.json not found$"):
        resolve_ds_config("/nonexistent/zero2_bf16.json")


def test_each_flags_help_is_its_fields_comment(capsys):
    """--help documents every flag of gpt1.train and gpt1.finetune with its field's comment in the run config's
    source, then its default."""
    from gpt1.finetune import FinetuneConfig
    from gpt1.train import RunConfig

    comments = {}
    for cls in (RunConfig, FinetuneConfig):
        with pytest.raises(SystemExit):
            parse_dataclass(cls, ["--help"], "prog", "about")
        out = " ".join(capsys.readouterr().out.split())
        comments[cls] = field_comments(cls)
        for f in fields(cls):
            assert comments[cls].get(f.name), f"{cls.__name__}.{f.name} has no comment to show"
            assert comments[cls][f.name] in out, f.name
    assert "--lr LR peak learning rate (the paper's) (default: 0.00025)" in " ".join(
        parse_help(RunConfig, capsys).split())
    assert comments[RunConfig]["resume"] == "continue from the newest complete checkpoint in --out"


def parse_help(cls, capsys):
    with pytest.raises(SystemExit):
        parse_dataclass(cls, ["--help"], "prog", "about")
    return capsys.readouterr().out
