"""End-to-end training steps of GPT-1 through DeepSpeed: tokens/s, MFU and peak memory per kernel combination.

    python -m bench.e2e --out DIR [--smoke] [--micro-batch 32] [--steps 10]

The paper's 117M model (12 layers, C=768, 12 heads, V=40478, dropout 0.1) at T=512 in bf16, wrapped by
deepspeed.initialize with ds_configs/zero2_bf16.json (ZeRO-2) on one rank, stepping like gpt1/train.py:
engine(x, labels=y).loss, engine.backward, engine.step. Kernel combinations (attention/loss): eager/eager,
sdpa/eager, triton/triton, triton/triton_linear, and torch.compile of the eager model through DeepSpeed's
engine.compile() (inductor; the first warm-up step pays the compile).

Step time is the median of the timed steps' wall-clock times (each ends with a device synchronize);
tokens/s = B*T / step time; MFU = tokens/s * flops_per_token / peak, with GPT1.flops_per_token
(6*N + 12*L*C*T, N the parameters without position embeddings) and the GPU's dense bf16 peak from
common.PEAK_BF16_TFLOPS. Peak memory is torch.cuda.max_memory_allocated over the timed steps, less what was
allocated before the model was built (weights, gradients, optimizer state and activations).

--smoke: the gpt1-tiny preset with a 512-token vocabulary, T=32, B=1, one warm-up and one timed step on the
CPU under the Triton interpreter, dynamo with backend="eager" for the compile row.
"""

import os
import statistics
import time

from . import common

COMBOS = (("eager", "eager"), ("sdpa", "eager"), ("triton", "triton"), ("triton", "triton_linear"),
          ("compile", "eager"))
SETTINGS = {"preset": "gpt1", "vocab_size": 40478, "seq_len": 512, "micro_batch": 32, "warmup": 3, "steps": 10}
SMOKE_SETTINGS = {"preset": "gpt1-tiny", "vocab_size": 512, "seq_len": 32, "micro_batch": 1, "warmup": 1, "steps": 1}
DS_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ds_configs",
                         "zero2_bf16.json")


def combo_name(attn, loss):
    return "torch.compile(eager/eager)" if attn == "compile" else f"{attn}/{loss}"


def combo_role(attn, loss):
    if attn == "triton":
        return common.OURS
    return common.EAGER if (attn, loss) == ("eager", "eager") else "peer"


def mfu(tokens_per_s, flops_per_token, peak_tflops):
    """Model FLOPs utilization: achieved model FLOP/s over the GPU's dense bf16 peak; None without a peak."""
    if not peak_tflops:
        return None
    return tokens_per_s * flops_per_token / (peak_tflops * 1e12)


def build_engine(attn, loss, s, smoke):
    import deepspeed
    import torch

    from gpt1 import GPT1, get_config
    from gpt1.train import GuardedAdamW, RunConfig, load_ds_config

    cfg = get_config(s["preset"], vocab_size=s["vocab_size"], attn_impl="eager" if attn == "compile" else attn,
                     loss_impl=loss)
    torch.manual_seed(1337)
    model = GPT1(cfg)
    dev = torch.device(common.device(), 0) if torch.cuda.is_available() else torch.device("cpu")
    optimizer = GuardedAdamW(model.param_groups(0.01), dev, lr=2.5e-4, betas=(0.9, 0.999), eps=1e-8)
    run = RunConfig(deepspeed_config=DS_CONFIG, micro_batch_size=s["micro_batch"], gradient_accumulation_steps=1)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=load_ds_config(run, 1))
    if attn == "compile":
        engine.compile(backend="eager" if smoke else "inductor")
    return engine, model, dev


def time_steps(engine, dev, s, smoke):
    """(step times in ms, peak MiB above the pre-model baseline) of the timed steps, after the warm-up ones."""
    import torch

    cuda = dev.type == "cuda"
    x = torch.randint(0, s["vocab_size"], (s["micro_batch"], s["seq_len"] + 1), device=dev)
    times = []
    for i in range(s["warmup"] + s["steps"]):
        if i == s["warmup"] and cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        loss = engine(x[:, :-1], labels=x[:, 1:]).loss
        engine.backward(loss)
        engine.step()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    return times[s["warmup"]:], peak


def bench_combo(base, attn, loss, s, smoke, deadline):
    import torch

    row = dict(base, provider=combo_name(attn, loss), role=combo_role(attn, loss), attn_impl=attn, loss_impl=loss)
    if deadline.passed():
        return dict(row, status="skipped", reason="time budget")
    common.free_memory()
    before = torch.cuda.memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
    engine = model = None
    try:
        engine, model, dev = build_engine(attn, loss, s, smoke)
        times, peak = time_steps(engine, dev, s, smoke)
        ms = statistics.median(times)
        tok_s = s["micro_batch"] * s["seq_len"] / (ms * 1e-3)
        fpt = model.flops_per_token(s["seq_len"])
        row.update(status="ok", ms=ms, ms_p20=min(times), ms_p80=max(times), tokens_per_s=tok_s,
                   flops_per_token=fpt, mfu=mfu(tok_s, fpt, common.peak_bf16_tflops(base["gpu"])),
                   peak_mb=None if peak is None else peak - before)
    except Exception as exc:  # noqa: BLE001 - one combination's failure must not end the run
        row.update(zip(("status", "reason"), common.failure(exc)))
    if engine is not None and hasattr(engine, "destroy"):
        engine.destroy()
    engine = model = None
    common.free_memory()
    return row


def run(smoke, deadline=None, micro_batch=None, steps=None):
    from gpt1.train import init_distributed

    s = dict(SMOKE_SETTINGS if smoke else SETTINGS)
    s["micro_batch"], s["steps"] = micro_batch or s["micro_batch"], steps or s["steps"]
    deadline, env = deadline or common.Deadline(0), common.environment(smoke)
    init_distributed()  # also selects this rank's GPU
    table = (f"{s['preset']} (V={s['vocab_size']}) training step, T={s['seq_len']}, micro batch {s['micro_batch']}, "
             f"bf16, DeepSpeed ZeRO-2, 1 rank")
    base = dict(env, bench="e2e", table=table, x=s["seq_len"], mode="step", seq_len=s["seq_len"],
                micro_batch=s["micro_batch"], steps=s["steps"], warmup_steps=s["warmup"],
                peak_tflops=common.peak_bf16_tflops(env["gpu"]))
    rows = []
    for attn, loss in COMBOS:
        t0 = time.monotonic()
        rows.append(bench_combo(base, attn, loss, s, smoke, deadline))
        print(f"e2e {rows[-1]['provider']}: {rows[-1]['status']} in {time.monotonic() - t0:.0f} s", flush=True)
    print(formula(rows))
    return rows


def formula(rows):
    ok = next((r for r in rows if r.get("flops_per_token")), None)
    if ok is None:
        return "MFU: no combination ran"
    peak = ok["peak_tflops"]
    peak_text = f"{peak:g} TFLOP/s, dense bf16 of {ok['gpu']}" if peak else "unknown for this device, so no MFU"
    return (f"MFU = tokens/s x flops_per_token / peak; flops_per_token = 6*N + 12*L*C*T = "
            f"{ok['flops_per_token'] / 1e6:.1f} MFLOP at T={ok['seq_len']} (N: parameters without position "
            f"embeddings); peak = {peak_text}")


COLUMNS = [("combination (attention/loss)", "provider"), ("step ms", common.value_or_status("ms")),
           ("tokens/s", common.value_or_status("tokens_per_s", 4)), ("MFU", lambda r: f"{r['mfu']:.1%}"
                                                                     if r.get("mfu") else ""),
           ("peak MiB", common.value_or_status("peak_mb", 5)), ("vs eager", common.ratio("vs_eager")),
           ("vs best peer", common.ratio("vs_best_peer")), ("note", "reason")]


def markdown(rows):
    rows = [r for r in rows if r["bench"] == "e2e"]
    note = (f"## End to end\n\n{formula(rows)}.\n\nStep time: median wall-clock of the timed steps after the "
            "warm-up (the compile row's warm-up includes compiling). Peak memory: torch.cuda.max_memory_allocated "
            "over the timed steps less what was allocated before the model was built. Peers: sdpa/eager and "
            "torch.compile; ours: triton/*.")
    return common.tables_markdown(rows, COLUMNS, note) + common.unavailable(rows) + [""]


def plot(rows, out_dir):
    rows = [r for r in rows if r["bench"] == "e2e"]
    if not rows:
        return []
    plt = common.pyplot()
    names = [r["provider"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, key, label in ((axes[0], "ms", "step time (ms)"), (axes[1], "peak_mb", "peak memory (MiB)")):
        values = [r.get(key) or 0.0 for r in rows]
        bars = ax.bar(range(len(rows)), values, color=["tab:red" if common.role(r) == common.OURS else "tab:gray"
                                                        for r in rows])
        for bar, r in zip(bars, rows):
            if r.get("status") != "ok" or r.get(key) is None:
                ax.annotate(r.get("status") if r.get("status") != "ok" else "n/a", (bar.get_x(), 0))
        ax.set_xticks(range(len(rows)), names, rotation=20, ha="right", fontsize=8)
        ax.set(ylabel=label)
        ax.grid(axis="y", alpha=0.3)
    smoke = rows[0].get("smoke")
    fig.suptitle(rows[0]["table"] + ("\nSMOKE run, not a speed measurement" if smoke else ""),
                 fontsize=9)
    fig.tight_layout()
    path = os.path.join(out_dir, "e2e.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def main(argv=None):
    parser = common.cli_parser(__doc__.splitlines()[0])
    parser.add_argument("--micro-batch", type=int, default=None, help="sequences per step (default 32; smoke 2)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per combination (default 10)")
    args = parser.parse_args(argv)
    common.use_interpreter_without_gpu(args.smoke)
    rows = run(args.smoke, common.Deadline(args.budget_s), args.micro_batch, args.steps)
    common.write_outputs(rows, common.out_dir(args), "End-to-end training-step benchmark", [(markdown, plot)])


if __name__ == "__main__":
    main()
