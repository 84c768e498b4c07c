"""The host's cost of one call of our kernels' public functions, with every Triton launch stubbed out.

    python -m bench.host_path [--calls N] [--json FILE]

What a call costs the host besides the launches themselves: the argument checks, the launch-config lookup, the
dropout seed draw, the allocations, autograd, the launchers' own arithmetic (issue 11's lean host path). The
launches are no-ops (triton's JITFunction.run, and InterpretedFunction.run under TRITON_INTERPRET=1), so it runs
on a CPU too, on tiny tensors: the host path does not depend on the sizes. On a GPU machine the tensors are CUDA
ones, so the seed draw and the allocations are the device's. Triton's own launcher (its specialization key and the
driver call) comes on top, once per launch counted. Each case: the median over 5 repeats of --calls calls.

Under torch.compile our kernels run as custom operators that the compiled graph calls through torch's dispatcher
(grad mode off: the graph's own autograd does the rest); two rows time the attention forward that way and its
launcher called directly, so that the operator's own cost per call shows (what CUDA graphs take off the host).
"""

import contextlib
import json
import statistics
import time

from . import common


def cases(dev):
    """{name: (fn, note)}: each fn makes one call (forward, or forward and backward) on fresh-gradient inputs."""
    import torch

    from kernels import (
        fused_add_dropout_layer_norm,
        fused_attention,
        fused_attention_qkv,
        fused_bias_gelu,
        fused_cross_entropy,
        fused_linear_cross_entropy,
    )

    def leaf(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, device=dev, dtype=dtype, requires_grad=True)

    q, k, v, qkv = leaf(1, 2, 32, 64), leaf(1, 2, 32, 64), leaf(1, 2, 32, 64), leaf(1, 32, 3, 2, 64)
    x, h, w, b = leaf(8, 64, dtype=torch.float32), leaf(8, 64), leaf(64, dtype=torch.float32), leaf(
        64, dtype=torch.float32)
    logits, hidden, weight = leaf(8, 96), leaf(8, 64), leaf(96, 64)
    target = torch.randint(0, 96, (8,), device=dev)

    def add_ln():
        y, y_branch = fused_add_dropout_layer_norm(x, h, w, b, dropout_p=0.1, branch_dtype=torch.bfloat16)
        return y.sum() + y_branch.float().sum()

    # the forward as a compiled graph runs it: the custom operator through the dispatcher, grad mode off, on
    # tensors that need no gradient; and the same launcher called directly (the difference: the operator's cost)
    from kernels._common import new_dropout_seed
    from kernels.attention import _forward, unpack_qkv

    qkv_graph, seed = qkv.detach(), new_dropout_seed(dev)
    scale = qkv.shape[-1] ** -0.5

    def op_call():
        with torch.no_grad():
            torch.ops.gpt1_kernels.attention_qkv.default(qkv_graph, seed, True, scale, 0.1)

    def launcher_call():
        with torch.no_grad():
            _forward(*unpack_qkv(qkv_graph), True, scale, 0.1, seed)

    return {
        "attention forward, dropout 0.1":
            (lambda: fused_attention(q, k, v, dropout_p=0.1), "B, H, T, D = 1, 2, 32, 64"),
        "attention forward + backward, dropout 0.1":
            (lambda: fused_attention(q, k, v, dropout_p=0.1).sum().backward(), ""),
        "attention forward + backward, no dropout": (lambda: fused_attention(q, k, v).sum().backward(), ""),
        "attention (packed qkv) forward + backward, dropout 0.1":
            (lambda: fused_attention_qkv(qkv, dropout_p=0.1).sum().backward(), "the model's path"),
        "attention (packed qkv) forward as a compiled graph calls it, dropout 0.1":
            (op_call, "torch.ops.gpt1_kernels.attention_qkv: the custom operator's dispatch included"),
        "attention (packed qkv) forward launcher alone, dropout 0.1":
            (launcher_call, "what the operator wraps; the difference is the operator's own host cost"),
        "add + dropout + LayerNorm forward + backward": (lambda: add_ln().backward(), "N, C = 8, 64"),
        "bias + GELU forward + backward": (lambda: fused_bias_gelu(h, b).sum().backward(), "N, C = 8, 64"),
        "cross-entropy forward + backward": (lambda: fused_cross_entropy(logits, target).backward(), "N, V = 8, 96"),
        "linear + cross-entropy forward + backward":
            (lambda: fused_linear_cross_entropy(hidden, weight, target).backward(), "one chunk"),
    }


@contextlib.contextmanager
def stubbed_launches():
    """Every Triton launch a no-op inside (JITFunction.run, and InterpretedFunction.run under TRITON_INTERPRET=1);
    yields a one-element list that counts the launches."""
    from triton.runtime import interpreter, jit

    launches = [0]

    def no_launch(self, *args, **kwargs):
        launches[0] += 1

    saved = jit.JITFunction.run, interpreter.InterpretedFunction.run
    jit.JITFunction.run = interpreter.InterpretedFunction.run = no_launch
    try:
        yield launches
    finally:
        jit.JITFunction.run, interpreter.InterpretedFunction.run = saved


def measure(calls, dev):
    """[{"case", "us_per_call", "launches_per_call", "note"}], launches stubbed while it runs."""
    rows = []
    with stubbed_launches() as launches:
        for name, (fn, note) in cases(dev).items():
            for _ in range(max(3, calls // 10)):  # warm-up: first-call caches, the allocator's pools
                fn()
            launches[0] = 0
            fn()
            per_call = launches[0]
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                if dev == "cuda":
                    import torch

                    torch.cuda.synchronize()
                times.append((time.perf_counter() - t0) / calls * 1e6)
            rows.append({"case": name, "us_per_call": statistics.median(times), "launches_per_call": per_call,
                         "note": note})
    return rows


def markdown(rows, env):
    smoke = " - SMOKE (5 calls a repeat), not a measurement" if env["smoke"] else ""
    lines = [f"Host path per call, Triton launches stubbed ({env['gpu']}; torch {env['torch']}, triton "
             f"{env['triton']}; commit {env['commit']}){smoke}", "",
             "| case | us per call | launches stubbed per call | note |", "|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['us_per_call']:.1f} | {r['launches_per_call']} | {r['note']} |" for r in rows]
    return "\n".join(lines)


def main(argv=None):
    parser = common.cli_parser(__doc__.splitlines()[0], out=False, budget=False)
    parser.add_argument("--calls", type=int, default=200, help="calls per repeat (default 200; --smoke 5)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    common.check_at_least(parser, args, calls=1)
    env, dev = common.environment(args.smoke), common.device()
    rows = measure(5 if args.smoke else args.calls, dev)
    print(markdown(rows, env))
    if args.json:
        with common.open_for_writing(args.json) as f:
            json.dump({"environment": env, "device": dev, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
