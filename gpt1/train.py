"""Pre-train GPT-1 as a language model through DeepSpeed.

Single process:   python -m gpt1.train --data data/shakespeare --model gpt1-tiny --out runs/tiny
Several ranks:    deepspeed --num_gpus 2 --module gpt1.train --deepspeed_config ds_configs/zero2_bf16.json ...

Reads straight through: run config, distributed init, data, model, engine, loop. The step never waits on
the device: the loss and the optimizer's counters are read only at --log-interval (gpt1/runtime.py).
"""

import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from . import checkpoint, runtime
from .config import get_config
from .data import TokenFile, WindowSampler, load_meta
from .errors import GPT1Error, cli_errors
from .model import GPT1


@dataclass
class RunConfig:
    data: str = "data/shakespeare"  # a directory written by `gpt1 prepare`
    model: str = "gpt1-mini"  # model preset (gpt1, gpt1-mini, gpt1-tiny)
    out: str = "runs/gpt1"  # run directory: config, metrics, checkpoints, final weights
    deepspeed_config: str = "ds_configs/zero0_autocast_bf16.json"  # a DeepSpeed JSON config, or a ds_configs/ name
    max_steps: int = 1000  # optimizer steps
    lr: float = 2.5e-4  # peak learning rate (the paper's)
    min_lr: float = 0.0  # the cosine decays to this (the paper anneals to 0)
    warmup_steps: int = -1  # linear warmup; -1 means min(2000, max_steps // 10)
    weight_decay: float = 0.01  # on matrices and embeddings, not biases or LayerNorm gains
    seq_len: int = 0  # tokens per sequence; 0 means the model's n_positions
    micro_batch_size: int = 0  # overrides the config's train_micro_batch_size_per_gpu when > 0
    gradient_accumulation_steps: int = 0  # overrides the config's when > 0
    attn_impl: str = ""  # overrides the model's attention kernel (eager, sdpa, triton, auto)
    loss_impl: str = ""  # overrides the model's loss kernel (eager, triton, triton_linear, auto)
    norm_impl: str = ""  # overrides the model's residual dropout + add + LayerNorm kernel (eager, triton)
    mlp_impl: str = ""  # overrides the model's MLP bias + GELU kernel (eager, triton)
    residual_in_fp32: bool | None = None  # fp32 residual stream under autocast (no: bf16, fewer bytes); default: model
    dropout: float = -1.0  # overrides all three dropout rates when >= 0
    eval_interval: int = 100  # steps between evaluations (and at the end)
    eval_batches: int = 10  # micro-batches per rank in one evaluation
    log_interval: int = 10  # steps between metrics rows
    save_interval: int = 500  # steps between checkpoints (and at the end)
    keep_checkpoints: int = 3  # complete checkpoints kept on disk
    max_nonfinite: int = 5  # consecutive skipped steps after which the run stops
    seed: int = 1337  # initial weights, data order and dropout masks
    dropout_seed: int = -1  # when >= 0, the dropout masks' seed instead (same weights and data, other masks)
    compile: bool | None = None  # torch.compile the model (fullgraph); default: on a CUDA GPU under ZeRO 0-2
    compile_mode: str = "default"  # torch.compile's mode: default, reduce-overhead (CUDA graphs), max-autotune, ...
    inline_kernels: bool = False  # compile through our kernels' operators: Inductor launches their Triton kernels
    resume: bool = False  # continue from the newest complete checkpoint in --out


def parse_args(argv=None):
    run = runtime.parse_dataclass(RunConfig, argv, "gpt1 train", "Pre-train GPT-1 with DeepSpeed.")
    runtime.check_ranges(run, max_steps=(1, None), lr=(0.0, None), min_lr=(0.0, run.lr), warmup_steps=(-1, None),
                         weight_decay=(0.0, None), seq_len=(0, None), micro_batch_size=(0, None),
                         gradient_accumulation_steps=(0, None), eval_interval=(1, None), eval_batches=(1, None),
                         log_interval=(1, None), save_interval=(1, None), keep_checkpoints=(1, None),
                         max_nonfinite=(1, None), seed=(0, 2**32 - 1))  # numpy's global seed's range
    if run.dropout != -1.0:  # -1: the model's own rates
        runtime.check_ranges(run, dropout=(0.0, 1.0))
    if run.dropout_seed != -1:  # -1: from --seed
        runtime.check_ranges(run, dropout_seed=(0, None))
    return run


def build_model_config(run, meta):
    overrides = {"vocab_size": meta["vocab_size"]}
    if run.attn_impl:
        overrides["attn_impl"] = run.attn_impl
    if run.loss_impl:
        overrides["loss_impl"] = run.loss_impl
    if run.norm_impl:
        overrides["norm_impl"] = run.norm_impl
    if run.mlp_impl:
        overrides["mlp_impl"] = run.mlp_impl
    if run.residual_in_fp32 is not None:
        overrides["residual_in_fp32"] = run.residual_in_fp32
    if run.dropout >= 0:
        overrides.update(embd_pdrop=run.dropout, attn_pdrop=run.dropout, resid_pdrop=run.dropout)
    cfg = get_config(run.model, **overrides)
    run.seq_len = run.seq_len or cfg.n_positions
    if run.seq_len > cfg.n_positions:
        raise GPT1Error(f"--seq-len {run.seq_len} is longer than the model's n_positions={cfg.n_positions}")
    return cfg


def lr_lambda(run):
    warmup = run.warmup_steps if run.warmup_steps >= 0 else min(2000, run.max_steps // 10)

    def factor(step):  # multiplier of the peak lr after `step` optimizer steps
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, run.max_steps - warmup))
        floor = run.min_lr / run.lr if run.lr else 0.0
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def to_device(array, device):
    """A numpy batch on the device; on a GPU through pinned memory, without waiting for the copy."""
    t = torch.from_numpy(array)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


@torch.no_grad()
def evaluate(engine, val, run, micro, device):
    """Loss, perplexity and next-token accuracy on the same val windows at every evaluation."""
    engine.module.eval()
    rng = np.random.default_rng([run.seed, dist.get_rank(), 1])
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # summed loss, correct predictions
    for _ in range(run.eval_batches):
        w = to_device(val.windows(rng, micro, run.seq_len + 1), device)
        logits = engine(w[:, :-1]).logits.float()
        sums[0] += torch.nn.functional.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum")
        sums[1] += (logits.argmax(-1) == w[:, 1:]).sum()
    engine.module.train()
    dist.all_reduce(sums)
    count = run.eval_batches * micro * run.seq_len * dist.get_world_size()
    loss, correct = (v / count for v in sums.tolist())
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_acc": correct}


@cli_errors
def main(argv=None):
    from tqdm import tqdm

    run = parse_args(argv)
    rank, world, device = runtime.init_distributed()
    ds = runtime.load_ds_config(run.deepspeed_config, world, run.micro_batch_size, run.gradient_accumulation_steps)
    ds, max_grad_norm = runtime.lean_checks(ds, world)
    meta = load_meta(run.data)
    train_data, val_data = TokenFile(run.data, "train", meta["dtype"]), TokenFile(run.data, "val", meta["dtype"])
    cfg = build_model_config(run, meta)
    for split in (train_data, val_data):  # before the run directory is written, not at the first evaluation
        split.require(run.seq_len + 1)
    runtime.check_kernels(cfg, device)
    runtime.check_compile(run.compile, run.compile_mode, run.inline_kernels)
    checkpoint.check_run_dir(run, cfg, ds, meta, rank)

    runtime.seed_everything(run.seed)  # same initial weights on every rank
    model = GPT1(cfg)
    engine, optimizer, scheduler = runtime.build_engine(
        model, ds, lr=run.lr, weight_decay=run.weight_decay, max_grad_norm=max_grad_norm,
        lr_lambda=lr_lambda(run), tied_weight=model.tokens_embed.weight)
    compiled = runtime.compile_module(engine, run.compile, runtime.zero_stage(ds), run.compile_mode,
                                      run.inline_kernels)
    micro, gas = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    tokens_per_step = micro * gas * world * run.seq_len
    flops_per_token = model.flops_per_token(run.seq_len)  # for the log rows' MFU, on a GPU

    # one global order of windows, read by position: the position is part of every checkpoint
    sampler = WindowSampler(train_data, run.seq_len + 1, run.seed, rank, world)
    # dropout masks differ across ranks; --dropout-seed redraws them alone (bench.curves' noise floor)
    torch.manual_seed((run.seed + 1 if run.dropout_seed < 0 else run.dropout_seed) + rank)
    step = 0
    if run.resume:  # restores the sampler's position and every RNG as they were at the checkpoint
        step = checkpoint.load(engine, run, cfg, rank, sampler)
        if rank == 0:
            runtime.drop_rows_after(os.path.join(run.out, "metrics.jsonl"), step)  # logged again from here
            print(f"resumed from step{step:08d} in {checkpoint.checkpoint_root(run)}", flush=True)
    if rank == 0:
        print(f"model {run.model}: {model.num_parameters() / 1e6:.2f}M parameters; {world} rank(s), "
              f"micro batch {micro} x accumulation {gas}, {tokens_per_step} tokens/step; "
              f"{len(train_data)} train / {len(val_data)} val tokens; compiled: {'yes' if compiled else 'no'}"
              + (f"; {torch.get_num_threads()} CPU thread(s) per rank" if device.type == "cpu" else ""), flush=True)
    metrics = os.path.join(run.out, "metrics.jsonl")
    stop, fp16 = runtime.StopSignal(), runtime.fp16(ds)
    loss_sum = torch.zeros((), device=device)  # summed micro-batch losses since the last log, on the device
    ds_skipped = engine.skipped_steps
    bar = tqdm(total=run.max_steps, initial=step, disable=rank != 0, dynamic_ncols=True, file=sys.stdout)
    timer, start, logged, t_first = runtime.Timer(device), step, step, time.perf_counter()
    while step < run.max_steps:
        lr = scheduler.get_last_lr()[0]  # this step's (the scheduler steps with the optimizer)
        for _ in range(gas):
            w = to_device(sampler.batch(micro), device)
            loss = engine(w[:, :-1], labels=w[:, 1:]).loss
            engine.backward(loss)
            engine.step()
            loss_sum += loss.detach()
        step += 1
        if engine.skipped_steps > ds_skipped:  # DeepSpeed's own overflow check skipped this step
            ds_skipped = engine.skipped_steps
            optimizer.count_skip(device)
        if compiled and step == start + 1 and rank == 0:  # a timing of the host: compiling happens there
            bar.write(f"first step, which compiles the model: {time.perf_counter() - t_first:.1f} s")
        if step % run.log_interval == 0 or step == run.max_steps:
            # the one host sync of the loop: the loss, the skip counters and the clock
            loss = runtime.all_reduce([loss_sum.item() / (gas * (step - logged))], device)[0] / world
            skipped, longest, grad_norm = optimizer.read_counters()
            row = {"step": step, "loss": loss, "lr": lr,
                   "tokens_per_s": tokens_per_step * (step - logged) / timer.lap(), "skipped_steps": skipped}
            if grad_norm is not None:  # where DeepSpeed leaves the gradients alone (runtime.build_engine)
                row["grad_norm"] = grad_norm
            if mfu := runtime.mfu(row["tokens_per_s"], flops_per_token, device, world):
                row["mfu"] = mfu
            loss_sum.zero_()
            logged = step
            if rank == 0:
                runtime.log_row(metrics, row)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{row['tokens_per_s']:.0f}",
                                **({"mfu": f"{row['mfu']:.1%}"} if "mfu" in row else {}))
            # with fp16 a skipped step is the loss scaler at work (it gives up itself at its minimum scale);
            # with bf16 and fp32 a run of them means training has diverged
            if not fp16 and longest >= run.max_nonfinite:
                raise GPT1Error(f"stopping at step {step}: {longest} steps in a row had a non-finite loss "
                                f"or gradient and were skipped")
        bar.update(1)
        if step % run.eval_interval == 0 or step == run.max_steps:
            row = {"step": step, **evaluate(engine, val_data, run, micro, device)}
            if rank == 0:
                runtime.log_row(metrics, row)
                bar.write(f"step {step}: val loss {row['val_loss']:.4f}, ppl {row['val_ppl']:.2f}, "
                          f"acc {row['val_acc']:.4f}")
        stopping = stop.agreed(device)
        if step % run.save_interval == 0 or step == run.max_steps or stopping:
            checkpoint.save(engine, run, cfg, rank, step, sampler)
        if stopping:
            if rank == 0:
                bar.write(f"received {stop.received or 'a stop signal'}: saved step {step}, exiting")
            break
    bar.close()
    checkpoint.save_weights(engine, run, rank)
    dist.barrier()


if __name__ == "__main__":
    main()
