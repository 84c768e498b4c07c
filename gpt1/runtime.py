"""What every DeepSpeed entry point shares (gpt1.train, gpt1.finetune, bench.e2e): the command line from a
dataclass, distributed set-up, the DeepSpeed config, the guarded optimizer, compiling, stop signals, logging.

Nothing here waits on the device in the training step: the optimizer's non-finite guard and gradient
clipping run as a handful of kernels whose results stay on the device; the loop reads them (and the loss)
only when it logs.
"""

import argparse
import contextlib
import inspect
import json
import math
import os
import random
import re
import signal
import socket
import time
import tokenize
from dataclasses import fields

import numpy as np
import torch
import torch.distributed as dist

import kernels

from .errors import GPT1Error


def field_comments(cls):
    """{field name: its trailing comment} of a dataclass's source (`name: type = default  # comment`): the one
    place where each flag is documented, shown by --help. Empty when the source cannot be read."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    comments = {}
    for tok in tokenize.generate_tokens(iter(line + "\n" for line in lines).__next__):
        if tok.type == tokenize.COMMENT:
            match = re.match(r"\s*(\w+)\s*:", lines[tok.start[0] - 1])
            if match:
                comments[match.group(1)] = tok.string.lstrip("# ").strip()
    return comments


def parse_dataclass(cls, argv, prog, description):
    """An instance of the dataclass `cls` from command-line flags named after its fields (--max-steps and
    --max_steps), plus the --local_rank / --deepspeed flags that DeepSpeed's launcher passes. A bool field
    is a switch (--resume); an optional bool field (default None: decided at run time) takes --x / --no-x.
    Each flag's help is its field's comment (field_comments) and its default."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    comments = field_comments(cls)
    for f in fields(cls):
        flags = [f"--{f.name.replace('_', '-')}"] + ([f"--{f.name}"] if "_" in f.name else [])
        about = comments.get(f.name, "")
        if f.type in (bool, "bool"):
            parser.add_argument(*flags, dest=f.name, action="store_true", help=about or None)
        elif f.type in (bool | None, "bool | None"):
            parser.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=about or "default: on where it pays (see the README)")
        else:
            parser.add_argument(*flags, dest=f.name, type=type(f.default), default=f.default,
                                help=f"{about + ' ' if about else ''}(default: {f.default!r})")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("--deepspeed", action="store_true", help=argparse.SUPPRESS)  # the launcher's flag
    args = parser.parse_args(argv)
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def check_ranges(run, **ranges):
    """A one-line error for the first flag outside its range, given as (low, high) with either end None (open):
    --max-steps -5 must not pass for "no steps", nor --micro-batch-size -2 for "the config's"."""
    for name, (low, high) in ranges.items():
        value = getattr(run, name)
        if (low is not None and value < low) or (high is not None and value > high) or not math.isfinite(value):
            bounds = f"at least {low}" if high is None else f"at most {high}" if low is None else f"in [{low}, {high}]"
            raise GPT1Error(f"--{name.replace('_', '-')} must be {bounds}, got {value}")


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
    else:
        _unlink_shm_buffer()
        share_cpu_threads()
    return dist.get_rank(), dist.get_world_size(), device


def share_cpu_threads():
    """On a CPU, the ranks on this machine share its cores: unless OMP_NUM_THREADS says how many, each rank's
    torch gets cores // local ranks intra-op threads (at least 1), as torchrun's default of 1 thread per process
    under several does. torch's own default is every core in every process: with DeepSpeed's launcher, which sets
    no thread count, gpt1-tiny's 2-rank step on a 2-core machine ran 6x slower (1,400-1,650 against 9,200 tokens/s),
    the ranks' OpenMP threads spinning against each other. Returns the thread count, None where it is left alone."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    local = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or dist.get_world_size())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // max(1, local))
    torch.set_num_threads(threads)
    return threads


def _unlink_shm_buffer():
    """DeepSpeed's CPU all-reduce (its shm op, used when every rank is on this machine) creates one shared-memory
    file per rank, /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>, maps every rank's, and never
    removes them: each run would leave about 66 MB per rank in /dev/shm (RAM) until the machine restarts. Once
    every rank has mapped them all (inside deepspeed.init_distributed; the barrier waits for the last), each
    rank removes its own name; the mappings stay valid until the processes exit."""
    if os.environ.get("LOCAL_SIZE") != str(dist.get_world_size()):  # DeepSpeed's own test: the op is not in use
        return
    dist.barrier()  # on every rank alike
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name)


# the project's DeepSpeed configs, beside the gpt1 package (a checkout or an editable install)
DS_CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ds_configs")


def resolve_ds_config(path):
    """The file that a --deepspeed-config value names: `path` itself where it is a file; otherwise, for a relative
    path, the project's config of that name in DS_CONFIG_DIR (`ds_configs/zero2_bf16.json`, `zero2_bf16.json` or
    `zero2_bf16`), so that the default works from any directory. Raises GPT1Error naming the project's configs."""
    if os.path.isfile(path):
        return path
    folder, name = os.path.split(path)
    if not os.path.isabs(path) and os.path.normpath(folder) in (".", "ds_configs"):
        for candidate in (name, name + ".json"):
            if os.path.isfile(os.path.join(DS_CONFIG_DIR, candidate)):
                return os.path.join(DS_CONFIG_DIR, candidate)
    known = sorted(f[:-5] for f in os.listdir(DS_CONFIG_DIR) if f.endswith(".json")) if os.path.isdir(
        DS_CONFIG_DIR) else []
    raise GPT1Error(f"DeepSpeed config {path} not found" + (
        f" (nor among the project's: {', '.join(known)})" if known and not os.path.isabs(path) else ""))


def load_ds_config(path, world_size, micro_batch_size=0, gradient_accumulation_steps=0):
    """The DeepSpeed JSON that `path` names (resolve_ds_config) as a dict, with the batch-size overrides (when > 0)
    applied and checked: train_batch_size = micro batch x accumulation x world size."""
    path = resolve_ds_config(path)
    try:
        with open(path) as f:
            ds = json.load(f)
    except json.JSONDecodeError as e:
        raise GPT1Error(f"DeepSpeed config {path} is not valid JSON: {e}") from None
    check_ds_types(ds, path)
    if micro_batch_size > 0 or gradient_accumulation_steps > 0:
        ds.pop("train_batch_size", None)  # recomputed from the overrides below
    if micro_batch_size > 0:
        ds["train_micro_batch_size_per_gpu"] = micro_batch_size
    if gradient_accumulation_steps > 0:
        ds["gradient_accumulation_steps"] = gradient_accumulation_steps
    micro, gas = ds.get("train_micro_batch_size_per_gpu"), ds.get("gradient_accumulation_steps", 1)
    total = ds.get("train_batch_size")
    if micro is None and total is None:
        raise GPT1Error(f"{path} sets neither train_batch_size nor train_micro_batch_size_per_gpu")
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
        raise GPT1Error(f"{path} enables fp16, which DeepSpeed's CPU accelerator does not have; "
                        "use a bf16 config on CPU")
    return ds


def check_ds_types(ds, path):
    """A one-line error where the config is not a JSON object, a batch size is not a positive integer, or a section
    that this project reads is not an object (DeepSpeed would fail later with a traceback)."""
    if not isinstance(ds, dict):
        raise GPT1Error(f"DeepSpeed config {path} must be a JSON object, got {type(ds).__name__}")
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        value = ds.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise GPT1Error(f"DeepSpeed config {path}: {key} must be a positive integer, got {value!r}")
    for key in ("zero_optimization", "fp16", "bf16", "torch_autocast", "optimizer", "scheduler"):
        if key in ds and not isinstance(ds[key], dict):
            raise GPT1Error(f"DeepSpeed config {path}: {key} must be a JSON object, got {ds[key]!r}")


def zero_stage(ds):
    return ds.get("zero_optimization", {}).get("stage", 0)


def lean_checks(ds, world_size):
    """(config, max_grad_norm): the DeepSpeed config without what makes the step wait on the host.

    - DeepSpeed's throughput timer synchronizes the device twice per step: off, unless the config sets it.
    - Under ZeRO-1/2 on one rank, overlap_comm is turned off: there is no communication to overlap, and with
      it DeepSpeed synchronizes the whole device at the end of every backward (its gradient epilogue, on CUDA),
      so the host could never run ahead of the GPU. So is contiguous_gradients: it copies every gradient, as
      the backward makes it, into a bucket laid out for the reduce-scatter (a narrow, a copy and a view per
      parameter; gpt1-tiny's ZeRO-2 step: 1305 operators with it, 798 without), which one rank does not need.
      On several ranks the config's choices stand: there the overlap hides the reduction behind the backward
      and the bucket feeds it.
    - Under ZeRO-1/2 in bf16 or fp32, DeepSpeed's per-gradient overflow check and fp64 norm (a few kernels and
      a host sync per parameter) are turned off and their work (the non-finite guard, clipping to the config's
      gradient_clipping) moves into GuardedAdamW, which does it in O(1) kernels without a host sync.
    - Under ZeRO-0 without DeepSpeed's bf16/fp16 (fp32 weights, or fp32 weights under "torch_autocast" in
      bf16: the nanoGPT recipe's precision), DeepSpeed calls GuardedAdamW directly; its clipping (a norm per
      parameter) moves into GuardedAdamW likewise.
    Elsewhere DeepSpeed keeps its checks and clips itself (max_grad_norm 0): fp16's loss scaler (and
    torch_autocast's GradScaler in fp16) needs them, ZeRO-3 cannot turn them off, and ZeRO-0 in bf16 wraps a
    client optimizer in its unfused mixed-precision optimizer, whose overflow check reads one flag per
    parameter on the host."""
    ds = {**ds, "timers": {"throughput": {"enabled": False}, **ds.get("timers", {})}}
    stage, bf16 = zero_stage(ds), ds.get("bf16", {}).get("enabled", False)
    if stage in (1, 2) and world_size == 1:
        ds["zero_optimization"] = {**ds["zero_optimization"], "overlap_comm": False, "contiguous_gradients": False}
    if fp16(ds) or stage == 3 or (stage == 0 and bf16):
        return ds, 0.0
    max_grad_norm = float(ds.get("gradient_clipping", 0.0))
    ds = {**ds, "gradient_clipping": 0.0}
    if stage in (1, 2):
        ds["zero_optimization"] = {**ds["zero_optimization"], "compute_grad_norm": False}
    if bf16:
        ds["bf16"] = {**ds["bf16"], "check_grad_overflow": False}
    return ds, max_grad_norm


def fp16(ds):
    """Whether the config trains in fp16 (DeepSpeed's fp16 or torch_autocast in fp16): with a loss scaler."""
    return ds.get("fp16", {}).get("enabled", False) or (
        torch_autocast(ds) and ds["torch_autocast"].get("dtype", "bfloat16") in ("float16", "fp16", "half"))


def torch_autocast(ds):
    """Whether the config runs the model under DeepSpeed's torch.autocast (fp32 weights, 16-bit compute)."""
    return bool(ds.get("torch_autocast", {}).get("enabled", False))


def build_engine(model, ds, *, lr, weight_decay=0.01, max_grad_norm=1.0, lr_lambda=None, tied_weight=None):
    """(engine, optimizer, scheduler): GuardedAdamW (betas 0.9, 0.999, eps 1e-8; weight decay on matrices and
    embeddings only) with an optional LambdaLR schedule, wrapped by deepspeed.initialize with the config dict.

    Under ZeRO-3 the tied LM head reads the token embedding's (partitioned) weight outside the embedding's
    own forward: `tied_weight` is registered with the top module so that ZeRO gathers it for the whole
    forward and its gradient reaches ZeRO's reduction."""
    import deepspeed

    from .model import param_groups

    optimizer = GuardedAdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.999), eps=1e-8,
                             max_grad_norm=max_grad_norm)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda) if lr_lambda is not None else None
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds)
    if zero_stage(ds) == 0 and dist.get_world_size() == 1:
        # one rank has nothing to average: skip ZeRO-0's all-reduce, which would still flatten every gradient
        # into a bucket and copy it back (and, under torch_autocast, round it to bf16 on the way)
        engine.enable_backward_allreduce = False
    if tied_weight is not None and zero_stage(ds) == 3:
        deepspeed.zero.register_external_parameter(engine.module, tied_weight)
    # the norm the guard measures is the gradients' own unless DeepSpeed clipped or unscaled them first
    optimizer.attach(engine, zero_stage(ds), raw_norm=not fp16(ds) and not ds.get("gradient_clipping", 0.0))
    return engine, optimizer, scheduler


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's


def check_compile(enabled, mode, inline_kernels=False):
    """Refuse an unknown compile mode, or a mode other than "default" or --inline-kernels with compiling turned off
    (--no-compile)."""
    if mode not in COMPILE_MODES:
        raise GPT1Error(f"--compile-mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    if enabled is False and mode != "default":
        raise GPT1Error(f"--compile-mode {mode} needs compiling; drop --no-compile")
    if enabled is False and inline_kernels:
        raise GPT1Error("--inline-kernels needs compiling; drop --no-compile")


def compiles_by_default(device_type, stage, mode="default"):
    """Whether the model is compiled when --compile / --no-compile is not given: on a CUDA GPU under ZeRO 0-2, and
    wherever a compile mode other than "default" asks for it."""
    return mode != "default" or (device_type == "cuda" and stage < 3)


def compile_module(engine, enabled, stage, mode="default", inline_kernels=False):
    """torch.compile the forward of the engine's module in place when `enabled` (True, False, or None for the
    default: on a CUDA GPU under ZeRO 0-2, and wherever `mode` is not "default"); returns whether it compiled.

    Only `forward` is compiled, not the module call: DeepSpeed's own forward hooks stay eager around it, and
    the model's forward is one graph (fullgraph=True). The state_dict, checkpoints and the optimizer see the
    same module as without compiling. ZeRO-3 gathers parameters in hooks of every submodule, inside the
    forward: dynamo recompiles on their guards and the tied head's backward fails there, so it is refused.

    mode is torch.compile's: "reduce-overhead" replays the forward and the backward graphs as CUDA graphs
    (Inductor's CUDA graph trees), so that their launches, our kernels' included, cost the host one graph
    launch each; the DeepSpeed step around them (optimizer, clipping) stays eager. On a CPU Inductor ignores the
    CUDA graphs and compiles as "default" does.

    inline_kernels (--inline-kernels): AOTAutograd traces into our kernels' operators (kernels.set_inline), so that
    Inductor launches their Triton kernels from its own generated code, beside its own: no operator dispatch and
    none of our launchers' Python per call, which is what makes the compiled step without CUDA graphs host-bound.
    A graph with symbolic shapes (torch.compile's dynamic shapes, after a recompile for a new shape) keeps the
    operators opaque: the launch configurations are chosen from the shapes. Under Triton's interpreter (a CPU) the
    operators stay opaque."""
    check_compile(enabled, mode, inline_kernels)
    if enabled is None:
        enabled = compiles_by_default(engine.device.type, stage, mode)
    if enabled and stage == 3:
        raise GPT1Error("--compile is not supported under ZeRO-3 (DeepSpeed gathers parameters inside the "
                        "forward); use ZeRO-1/2 or --no-compile")
    if enabled:
        kernels.register_inductor_fallbacks()  # else a 12-layer graph of our operators can take minutes to lower
        kernels.set_inline(inline_kernels)
        engine.module.forward = torch.compile(engine.module.forward, fullgraph=True,
                                              mode=None if mode == "default" else mode)
    return bool(enabled)


def check_kernels(cfg, device):
    """Our Triton kernels run on a CUDA GPU, or on a CPU under Triton's interpreter (TRITON_INTERPRET=1,
    set before triton is imported; slow, for tests): refuse them anywhere else before anything starts."""
    wanted = (cfg.attn_impl == "triton" or cfg.loss_impl.startswith("triton") or cfg.norm_impl == "triton"
              or cfg.mlp_impl == "triton")
    if wanted and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise GPT1Error(f"attention {cfg.attn_impl!r} / loss {cfg.loss_impl!r} / norm {cfg.norm_impl!r} / mlp "
                        f"{cfg.mlp_impl!r}: the Triton kernels need a CUDA GPU (or TRITON_INTERPRET=1 on a CPU, which "
                        "is slow); use --attn-impl sdpa --loss-impl eager --norm-impl eager --mlp-impl eager")


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def all_reduce(values, device, op=dist.ReduceOp.SUM):
    """Host floats reduced over the ranks (a collective and a host sync: for logging and evaluation)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return t.tolist()


class GuardedAdamW(torch.optim.AdamW):
    """Fused AdamW with gradient clipping and a non-finite guard, in a few kernels and without a host sync.

    DeepSpeed calls this inner optimizer's step on every rank with that rank's gradients: its fp32 partition
    under ZeRO 1-3 (once per parameter group), the whole averaged gradient under ZeRO-0. Once per step:
    - the global gradient norm: one fused norm over all of this rank's gradients, squared, summed over the
      ranks by one all_reduce when the gradients are partitioned;
    - found_inf = the norm is not finite (a NaN or inf anywhere on any rank makes it so): the same on every
      rank, so every rank skips alike;
    - clipping to max_grad_norm (0: off), folded into the optimizer kernel: torch's fused AdamW divides each
      gradient by its grad_scale tensor (GradScaler's unscaling uses it so), here max(norm / max_grad_norm, 1),
      so the gradients get no pass of their own (they stay unclipped in .grad);
    then torch's fused AdamW kernel with found_inf, which leaves weights, moments and step count untouched
    when found_inf is set. The counters (steps skipped, the longest run of skipped steps) and the last step's
    gradient norm live on the device; `read_counters` fetches them (one sync), which the training loop does when
    it logs.

    ZeRO-1/2 step the groups one at a time, and when the first group is stepped the others' gradients are
    still in DeepSpeed's averaged_gradients: `attach` lets the guard read them there, so that the norm and
    the decision cover the whole step. Elsewhere the guard covers the groups it is called with (ZeRO-0: all
    of them; ZeRO-3 clips and checks in DeepSpeed itself, see lean_checks).
    """

    def __init__(self, params, *, max_grad_norm=0.0, **kwargs):
        super().__init__(params, fused=True, **kwargs)
        self.max_grad_norm = max_grad_norm
        self._engine, self._zero, self._partitioned, self._guarded_step = None, None, False, None
        self._unclip, self._counters = None, None  # counters: skipped, current run, longest run since the last read
        self._norm, self._raw_norm = None, True  # the last step's gradient norm; whether it is the one to log

    def attach(self, engine, stage, raw_norm=True):
        """raw_norm: whether the gradients this optimizer sees are as the backward made them, so that the norm it
        measures is the one to log (not where DeepSpeed clips or unscales them before calling it)."""
        self._engine, self._partitioned = engine, stage >= 1 and dist.get_world_size() > 1
        self._raw_norm = raw_norm
        self._zero = engine.optimizer if stage in (1, 2) else None

    def _waiting_grads(self):
        """The gradients of the groups that ZeRO-1/2 have not stepped yet in this step."""
        if self._zero is None:
            return []
        grads = []
        for group in getattr(self._zero, "averaged_gradients", {}).values():
            flat = getattr(group, "flat_partition", None)
            grads += [flat] if flat is not None else [g for g in group or () if g is not None]
        return grads

    def _guard(self, grads):
        sq = torch.stack(torch._foreach_norm(grads, 2.0)).float().square().sum()
        if self._partitioned:
            dist.all_reduce(sq)
        norm = sq.sqrt()
        self.found_inf = (~torch.isfinite(norm)).float()  # read by the fused AdamW kernel
        # the inverse of clip_grad_norm_'s factor max_norm / (norm + 1e-6), clamped at 1: the kernel divides by it
        self._unclip = ((norm + 1e-6) / self.max_grad_norm).clamp(min=1.0) if self.max_grad_norm > 0 else None
        if self._counters is None:
            self._counters = torch.zeros(3, device=norm.device)
        self._count(self.found_inf)
        self._norm = norm if self._raw_norm else None  # kept, not copied: no work per step

    def _count(self, skipped_now):
        skipped, run, longest = self._counters.unbind()
        run = (run + 1) * skipped_now
        self._counters = torch.stack([skipped + skipped_now, run, torch.maximum(longest, run)])

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return None
        step_id = self._engine.global_steps if self._zero is not None else None
        if step_id is None or step_id != self._guarded_step:
            self._guard(grads + self._waiting_grads())
            self._guarded_step = step_id
        if self._unclip is not None:  # read by torch's AdamW.step and handed to the fused kernel; without clipping
            self.grad_scale = self._unclip  # left alone (torch's GradScaler sets it to unscale fp16 gradients)
        return super().step(closure)

    def count_skip(self, device):
        """Count a step that DeepSpeed skipped itself (its own overflow check) without calling step()."""
        if self._counters is None:
            self._counters = torch.zeros(3, device=device)
        self._count(torch.ones((), device=device))
        self._norm = None  # DeepSpeed skipped the step before the guard saw it

    def read_counters(self):
        """(steps skipped so far, longest run of consecutive skipped steps since the last read, the last step's
        global gradient norm before clipping: None where it was not finite, or not measured, see attach); syncs
        once."""
        if self._counters is None:
            return 0, 0, None
        values = self._counters if self._norm is None else torch.cat([self._counters, self._norm.reshape(1).float()])
        skipped, run, longest, *norm = values.tolist()
        self._counters[2] = run
        return int(skipped), int(longest), norm[0] if norm and math.isfinite(norm[0]) else None


class StopSignal:
    """Remembers a SIGTERM/SIGINT so that the loop can finish its step, save and exit cleanly."""

    def __init__(self):
        self.received, self._pending = None, None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def agreed(self, device):
        """Whether any rank had received a signal one call ago: the ranks' flags are combined by an all_reduce
        that is launched now and read at the next call, so that the step does not wait for it. Every rank
        gets the same answer at the same call."""
        if dist.get_world_size() == 1:
            return self.received is not None
        flag = torch.full((), float(self.received is not None), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        previous, self._pending = self._pending, flag
        return previous is not None and previous.item() > 0


def log_row(path, row):
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def read_rows(path):
    """The rows of a metrics.jsonl. A cut last line (a run killed mid-write) is left out; any other line that
    is not a JSON object is a one-line error naming it."""
    with open(path) as f:
        lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    rows = []
    for i, (n, line) in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1 and not line.endswith("\n"):
                break
            raise GPT1Error(f"{path}, line {n}: not a JSON row ({e.msg})") from None
        if not isinstance(row, dict):
            raise GPT1Error(f"{path}, line {n}: not a JSON object")
        rows.append(row)
    return rows


def drop_rows_after(path, step):
    """Rewrite a metrics.jsonl without its rows past `step`: what a resumed run logs again."""
    from .checkpoint import atomic_write

    if os.path.isfile(path):
        rows = [r for r in read_rows(path) if r.get("step", 0) <= step]

        def write(tmp):
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)

        atomic_write(path, write)


# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, from NVIDIA's datasheets; the first key that is a
# substring of torch.cuda.get_device_name() wins, so the specific names come before the generic ones.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
)


def peak_bf16_tflops(name):
    """The GPU's dense bf16 peak in TFLOP/s, or None for a device not in the table."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops
    return None


def mfu(tokens_per_s, flops_per_token, device, world_size=1):
    """Model FLOPs utilization of one rank (nanoGPT's and PaLM's): its tokens/s (tokens_per_s over world_size
    ranks) x the model's training FLOPs per token over the GPU's dense bf16 peak; None off CUDA or on a GPU not in
    PEAK_BF16_TFLOPS."""
    if device.type != "cuda":
        return None
    peak = peak_bf16_tflops(torch.cuda.get_device_name(device))
    return tokens_per_s / world_size * flops_per_token / (peak * 1e12) if peak else None


class Timer:
    """Wall-clock seconds between laps; the device is synchronized only when a lap is read."""

    def __init__(self, device):
        self.device, self.t0 = device, time.perf_counter()

    def lap(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0, self.t0 = self.t0, time.perf_counter()
        return self.t0 - t0
