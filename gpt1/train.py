"""Pre-train GPT-1 as a language model through DeepSpeed.

Single process:   python -m gpt1.train --data data/shakespeare --model gpt1-tiny --out runs/tiny
Several ranks:    deepspeed --num_gpus 2 --module gpt1.train --deepspeed_config ds_configs/zero2_bf16.json ...

Reads straight through: run config, distributed init, data, model, deepspeed.initialize, loop.
"""

import argparse
import json
import math
import os
import random
import signal
import socket
import sys
import time
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.distributed as dist

from . import checkpoint
from .config import get_config
from .data import TokenFile, load_meta
from .errors import GPT1Error, cli_errors
from .model import GPT1


@dataclass
class RunConfig:
    data: str = "data/shakespeare"  # a directory written by `gpt1 prepare`
    model: str = "gpt1-mini"  # model preset (gpt1, gpt1-mini, gpt1-tiny)
    out: str = "runs/gpt1"  # run directory: config, metrics, checkpoints, final weights
    deepspeed_config: str = "ds_configs/zero2_bf16.json"  # a complete DeepSpeed JSON config
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
    dropout: float = -1.0  # overrides all three dropout rates when >= 0
    eval_interval: int = 100  # steps between evaluations (and at the end)
    eval_batches: int = 10  # micro-batches per rank in one evaluation
    log_interval: int = 10  # steps between metrics rows
    save_interval: int = 500  # steps between checkpoints (and at the end)
    keep_checkpoints: int = 3  # complete checkpoints kept on disk
    max_nonfinite: int = 5  # consecutive skipped steps after which the run stops
    seed: int = 1337
    resume: bool = False  # continue from the newest complete checkpoint in --out


def parse_dataclass(cls, argv, prog, description):
    """An instance of the dataclass `cls` from command-line flags named after its fields (--max-steps and
    --max_steps), plus the --local_rank / --deepspeed flags that DeepSpeed's launcher passes."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for f in fields(cls):
        flags = [f"--{f.name.replace('_', '-')}"] + ([f"--{f.name}"] if "_" in f.name else [])
        if f.type is bool or f.type == "bool":
            parser.add_argument(*flags, dest=f.name, action="store_true")
        else:
            parser.add_argument(*flags, dest=f.name, type=type(f.default), default=f.default,
                                help=f"default: {f.default!r}")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("--deepspeed", action="store_true", help=argparse.SUPPRESS)  # the launcher's flag
    args = parser.parse_args(argv)
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def parse_args(argv=None):
    return parse_dataclass(RunConfig, argv, "gpt1 train", "Pre-train GPT-1 with DeepSpeed.")


def load_ds_config(run, world_size):
    """The DeepSpeed JSON as a dict, with the batch-size overrides applied and checked."""
    if not os.path.isfile(run.deepspeed_config):
        raise GPT1Error(f"DeepSpeed config {run.deepspeed_config} not found")
    try:
        with open(run.deepspeed_config) as f:
            ds = json.load(f)
    except json.JSONDecodeError as e:
        raise GPT1Error(f"DeepSpeed config {run.deepspeed_config} is not valid JSON: {e}") from None
    if run.micro_batch_size > 0 or run.gradient_accumulation_steps > 0:
        ds.pop("train_batch_size", None)  # recomputed from the overrides below
    if run.micro_batch_size > 0:
        ds["train_micro_batch_size_per_gpu"] = run.micro_batch_size
    if run.gradient_accumulation_steps > 0:
        ds["gradient_accumulation_steps"] = run.gradient_accumulation_steps
    micro, gas = ds.get("train_micro_batch_size_per_gpu"), ds.get("gradient_accumulation_steps", 1)
    total = ds.get("train_batch_size")
    if micro is None and total is None:
        raise GPT1Error(f"{run.deepspeed_config} sets neither train_batch_size nor train_micro_batch_size_per_gpu")
    if micro is None:
        if total % (gas * world_size):
            raise GPT1Error(f"train_batch_size {total} is not divisible by gradient_accumulation_steps {gas} "
                            f"x world size {world_size}")
        micro = ds["train_micro_batch_size_per_gpu"] = total // (gas * world_size)
    if total is not None and total != micro * gas * world_size:
        raise GPT1Error(f"batch sizes don't multiply out: train_batch_size {total} != micro batch {micro} "
                        f"x gradient accumulation {gas} x world size {world_size}")
    ds["train_batch_size"], ds["gradient_accumulation_steps"] = micro * gas * world_size, gas
    if ds.get("fp16", {}).get("enabled") and not torch.cuda.is_available():
        raise GPT1Error(f"{run.deepspeed_config} enables fp16, which DeepSpeed's CPU accelerator does not have; "
                        "use a bf16 config on CPU")
    return ds


def init_distributed():
    """deepspeed.init_distributed, with a one-rank environment when not started by a launcher;
    returns (rank, world size, this rank's device)."""
    import deepspeed

    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    deepspeed.init_distributed(verbose=False)
    device = torch.device(deepspeed.get_accelerator().device_name(), int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def register_tied_head(engine, ds, weight):
    """Under ZeRO-3 the tied LM head reads the token embedding's (partitioned) weight outside the
    embedding's own forward: register it with the top module so that ZeRO gathers it for the whole
    forward and its gradient reaches ZeRO's reduction."""
    import deepspeed

    if ds.get("zero_optimization", {}).get("stage", 0) == 3:
        deepspeed.zero.register_external_parameter(engine.module, weight)


def build_model_config(run, meta):
    overrides = {"vocab_size": meta["vocab_size"]}
    if run.attn_impl:
        overrides["attn_impl"] = run.attn_impl
    if run.loss_impl:
        overrides["loss_impl"] = run.loss_impl
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
        floor = run.min_lr / run.lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def all_reduce(values, device, op=dist.ReduceOp.SUM):
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return t.tolist()


@torch.no_grad()
def evaluate(engine, val, run, micro, device):
    """Loss, perplexity and next-token accuracy on the same val windows at every evaluation."""
    engine.module.eval()
    rng = np.random.default_rng([run.seed, dist.get_rank(), 1])
    loss_sum = correct = count = 0.0
    for _ in range(run.eval_batches):
        w = torch.from_numpy(val.windows(rng, micro, run.seq_len + 1)).to(device)
        logits = engine(w[:, :-1]).logits.float()
        loss_sum += torch.nn.functional.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum")
        correct += (logits.argmax(-1) == w[:, 1:]).sum().item()
        count += w[:, 1:].numel()
    engine.module.train()
    loss_sum, correct, count = all_reduce([float(loss_sum), correct, count], device)
    loss = loss_sum / count
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_acc": correct / count}


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that skips its update, on every rank alike, when any rank's gradient is not finite.

    DeepSpeed calls the step of this inner optimizer on every rank with that rank's (possibly
    partitioned) gradients, after its own fp16 overflow check; this guards bf16 and fp32 too.
    """

    def __init__(self, params, device, **kwargs):
        super().__init__(params, **kwargs)
        self.device, self.skipped = device, 0  # device: where the collective's flag lives

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        finite = torch.ones((), device=self.device)
        for g in grads:
            finite *= torch.isfinite(g).all().to(self.device)
        if dist.is_initialized():
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if finite.item() < 1:
            self.skipped += 1
            return None
        return super().step(closure)


class StopSignal:
    """Remembers a SIGTERM/SIGINT so that the loop can finish its step, save and exit cleanly."""

    def __init__(self):
        self.received = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name


def log_row(path, row):
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


@cli_errors
def main(argv=None):
    import deepspeed
    from tqdm import tqdm

    run = parse_args(argv)
    rank, world, device = init_distributed()
    ds = load_ds_config(run, world)
    meta = load_meta(run.data)
    train_data, val_data = TokenFile(run.data, "train", meta["dtype"]), TokenFile(run.data, "val", meta["dtype"])
    cfg = build_model_config(run, meta)
    checkpoint.check_run_dir(run, cfg, ds, meta, rank)

    seed_everything(run.seed)  # same initial weights on every rank
    model = GPT1(cfg)
    optimizer = GuardedAdamW(model.param_groups(run.weight_decay), device, lr=run.lr, betas=(0.9, 0.999), eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(run))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds)
    register_tied_head(engine, ds, engine.module.tokens_embed.weight)
    micro, gas = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    tokens_per_step = micro * gas * world * run.seq_len

    # each rank draws its own windows; the generator's state is part of every checkpoint
    data_rng = np.random.default_rng([run.seed, rank])
    torch.manual_seed(run.seed + 1 + rank)  # dropout masks differ across ranks
    step = 0
    if run.resume:  # restores the data generator and every RNG as they were at the checkpoint
        step, data_rng = checkpoint.load(engine, run, cfg, rank, data_rng)
        if rank == 0:
            print(f"resumed from step{step:08d} in {checkpoint.checkpoint_root(run)}", flush=True)
    if rank == 0:
        print(f"model {run.model}: {model.num_parameters() / 1e6:.2f}M parameters; {world} rank(s), "
              f"micro batch {micro} x accumulation {gas}, {tokens_per_step} tokens/step; "
              f"{len(train_data)} train / {len(val_data)} val tokens", flush=True)
    metrics = os.path.join(run.out, "metrics.jsonl")
    stop, nonfinite, skipped = StopSignal(), 0, 0
    fp16 = ds.get("fp16", {}).get("enabled", False)
    # fault injection for the tests: a NaN loss on rank 0 at these (1-based) steps
    nan_steps = {int(s) for s in os.environ.get("GPT1_INJECT_NAN_STEPS", "").split(",") if s.strip()}
    bar = tqdm(total=run.max_steps, initial=step, disable=rank != 0, dynamic_ncols=True, file=sys.stdout)
    t0, logged = time.time(), step
    while step < run.max_steps:
        losses = []
        for _ in range(gas):
            w = torch.from_numpy(train_data.windows(data_rng, micro, run.seq_len + 1)).to(device)
            loss = engine(w[:, :-1], labels=w[:, 1:]).loss
            if rank == 0 and step + 1 in nan_steps:
                loss = loss * float("nan")
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        step += 1
        # A non-finite gradient skips the update: DeepSpeed's own overflow check does it under ZeRO 1-3
        # (engine.skipped_steps), GuardedAdamW where DeepSpeed does not check. With fp16 that is the loss
        # scaler at work (it lowers the scale, and gives up itself at its minimum); with bf16 and fp32 a
        # run of skipped steps means training has diverged.
        if optimizer.skipped + engine.skipped_steps > skipped:
            skipped = optimizer.skipped + engine.skipped_steps
            nonfinite = 0 if fp16 else nonfinite + 1
            if nonfinite >= run.max_nonfinite:
                raise GPT1Error(f"stopping at step {step}: {nonfinite} steps in a row had a non-finite loss "
                                f"or gradient and were skipped")
        else:
            nonfinite = 0
        if step % run.log_interval == 0 or step == run.max_steps:
            loss = all_reduce([sum(losses) / len(losses)], device)[0] / world
            dt, t0, n_steps, logged = time.time() - t0, time.time(), step - logged, step
            row = {"step": step, "loss": loss, "lr": scheduler.get_last_lr()[0],
                   "tokens_per_s": tokens_per_step * n_steps / dt, "skipped_steps": skipped}
            if rank == 0:
                log_row(metrics, row)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
        bar.update(1)
        if step % run.eval_interval == 0 or step == run.max_steps:
            row = {"step": step, **evaluate(engine, val_data, run, micro, device)}
            if rank == 0:
                log_row(metrics, row)
                bar.write(f"step {step}: val loss {row['val_loss']:.4f}, ppl {row['val_ppl']:.2f}, "
                          f"acc {row['val_acc']:.4f}")
        stopping = all_reduce([float(stop.received is not None)], device, dist.ReduceOp.MAX)[0] > 0
        if step % run.save_interval == 0 or step == run.max_steps or stopping:
            checkpoint.save(engine, run, cfg, rank, step, data_rng)
        if stopping:
            if rank == 0:
                bar.write(f"received {stop.received or 'a stop signal'}: saved step {step}, exiting")
            break
    bar.close()
    checkpoint.save_weights(engine, run, rank)
    dist.barrier()


if __name__ == "__main__":
    main()
