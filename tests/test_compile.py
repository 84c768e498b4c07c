"""torch.compile over the kernels' operators (the "Operators" part of the docstrings of kernels/attention.py and
kernels/cross_entropy.py).

Every compiled function here uses fullgraph=True, so a graph break is an error: each test also checks that the
three functions trace forward and backward in one graph. Dynamo can also capture a host read of a device value
(.item()) into the graph, which would sync there: the aot_eager backend used here fails on any such read in the
forward or backward graph. Compiled results are compared with eager mode, which runs the same Triton launchers:
under aot_eager (AOTAutograd without Inductor) they agree bitwise, under Inductor up to its own code for the torch
ops around the kernels. On CPU the kernels run in the Triton interpreter, so the shapes are tiny.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
from helpers import assert_close
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.testing import CompileCounterWithBackend

from gpt1 import GPT1, get_config
from kernels import fused_attention, fused_cross_entropy, fused_linear_cross_entropy
from kernels.attention import (
    attention_backward_op,
    attention_op,
    attention_qkv_backward_op,
    attention_qkv_op,
    new_dropout_seed,
)
from kernels.cross_entropy import (
    cross_entropy_loss_op,
    cross_entropy_op_,
    cross_entropy_scale_grad_op_,
    linear_cross_entropy_backward_op,
    linear_cross_entropy_op,
)

FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32
IGNORE = -100


@pytest.fixture(autouse=True)
def fresh_dynamo():
    # a test's lambdas share one code object across its parameters: start each with empty caches and counters
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


HOST_READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default)


def _run_without_host_reads(gm, example_inputs):
    """An AOTAutograd compiler that runs the graph as is (aot_eager's), after checking it reads no device value
    on the host."""
    reads = [str(node) for node in gm.graph.nodes if node.target in HOST_READS]
    assert not reads, f"host reads (syncs) in the compiled graph: {reads}\n{gm.code}"
    return make_boxed_func(gm.forward)


# built as torch's aot_eager is (the min-cut partitioner, as Inductor's, and input mutations kept in the graph)
AOT_EAGER = aot_autograd(fw_compiler=_run_without_host_reads, bw_compiler=_run_without_host_reads,
                         partition_fn=min_cut_rematerialization_partition, keep_inference_input_mutations=True)


def _compile(fn, backend="aot_eager"):
    """fn compiled with fullgraph=True, and the counter of the frames Dynamo compiled for it. "aot_eager" is
    AOTAutograd's eager backend with the host-read check on the forward and backward graphs."""
    counter = CompileCounterWithBackend(AOT_EAGER if backend == "aot_eager" else backend)
    return torch.compile(fn, backend=counter, fullgraph=True), counter


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _assert_equal(actual, expected, name):
    assert_close(actual, expected, atol=0, rtol=0, name=name)


def _inductor_tol(device):
    # Inductor's own code for the surrounding torch ops (tanh, the fused elementwise) rounds differently
    return dict(atol=1e-6, rtol=1e-6) if device == "cpu" else dict(atol=1e-5, rtol=1e-5)


def _output_and_grads(fn, inputs, grad_out, *, seed=None):
    """fn(*fresh leaf copies of inputs) and the gradients of <out, grad_out> wrt those leaves; seed, if given,
    is passed to torch.manual_seed first (the dropout seed is drawn from torch's generator)."""
    leaves = _leaves(*inputs)
    if seed is not None:
        torch.manual_seed(seed)
    out = fn(*leaves)
    return out, torch.autograd.grad(out, leaves, grad_out)


# ---------------------------------------------------------------------------------------------- attention


def _qkv(B, H, T, D, dtype, layout, device):
    """(inputs, make_qkv): "qkv" is the model's layout, three permuted views of one (B, T, 3, H, D) tensor."""
    if layout == "qkv":
        return [torch.randn(B, T, 3, H, D, device=device).to(dtype)], lambda x: x.permute(2, 0, 3, 1, 4).unbind(0)
    return [torch.randn(B, H, T, D, device=device).to(dtype) for _ in range(3)], lambda *qkv: qkv


@pytest.mark.parametrize("dtype,causal,p,layout", [(FP32, True, 0.0, "qkv"), (BF16, False, 0.0, "separate"),
                                                   (FP16, True, 0.2, "qkv")])
def test_attention_compiled_matches_eager(dtype, causal, p, layout, device):
    torch.manual_seed(0)
    B, H, T, D = 1, 2, 19, 16
    inputs, make_qkv = _qkv(B, H, T, D, dtype, layout, device)
    do = torch.randn(B, H, T, D, device=device).to(dtype)
    fn = lambda *x: fused_attention(*make_qkv(*x), causal=causal, dropout_p=p)
    compiled, counter = _compile(fn)
    out, grads = _output_and_grads(fn, inputs, do, seed=1)
    out_c, grads_c = _output_and_grads(compiled, inputs, do, seed=1)
    assert counter.frame_count == 1
    assert out_c.stride() == out.stride() and out_c.transpose(1, 2).is_contiguous()  # the (B, T, H, D) buffer
    _assert_equal(out_c, out, "out")
    for i, (g_c, g) in enumerate(zip(grads_c, grads)):
        _assert_equal(g_c, g, f"grad {i}")


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_dropout_seed_under_compile(backend, device):
    """The seed is a device tensor drawn from torch's generator inside the graph: the same generator state
    gives the same masks, each call draws new ones, and no call recompiles."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 24, 16, device=device) for _ in range(3))
    compiled, counter = _compile(lambda q, k, v: fused_attention(q, k, v, dropout_p=0.5), backend)
    torch.manual_seed(7)
    first, second = compiled(q, k, v), compiled(q, k, v)
    torch.manual_seed(7)
    again = compiled(q, k, v)
    _assert_equal(again, first, "same generator state")
    assert not torch.equal(first, second), "two calls drew the same dropout mask"
    assert counter.frame_count == 1, f"{counter.frame_count} compiles for one function"
    if backend == "aot_eager":  # the seed is drawn by aten.randint, as in eager mode: the very same masks
        torch.manual_seed(7)
        _assert_equal(fused_attention(q, k, v, dropout_p=0.5), first, "eager")


def test_dropout_forward_and_backward_under_inductor(device):
    """Inductor passes the one drawn seed to the forward and both backward kernels: with fallback_random (its
    randint is then aten's) forward and gradients equal eager mode's for the same generator state."""
    torch.manual_seed(0)
    inputs, make_qkv = _qkv(2, 2, 21, 32, FP32, "qkv", device)
    do = torch.randn(2, 2, 21, 32, device=device)
    fn = lambda x: fused_attention(*make_qkv(x), dropout_p=0.3)
    out, grads = _output_and_grads(fn, inputs, do, seed=3)
    with torch._inductor.config.patch(fallback_random=True):
        compiled, counter = _compile(fn, "inductor")
        out_c, grads_c = _output_and_grads(compiled, inputs, do, seed=3)
    assert counter.frame_count == 1
    assert_close(out_c, out, **_inductor_tol(device), name="out")
    assert_close(grads_c[0], grads[0], **_inductor_tol(device), name="dqkv")


# ---------------------------------------------------------------------------------------------- cross-entropy


def _targets(n, v, device):
    target = torch.randint(0, v, (n,), device=device)
    target[::3] = IGNORE
    return target


@pytest.mark.parametrize("dtype,reduction,eps", [(FP32, "mean", 0.0), (FP16, "mean", 0.1), (BF16, "sum", 0.1),
                                                 (FP32, "none", 0.0)])
def test_cross_entropy_compiled_matches_eager(dtype, reduction, eps, device):
    """Logits made inside the graph (as in the model) and logits that are a graph input the kernel overwrites."""
    torch.manual_seed(0)
    n, c, v = 7, 8, 300
    h, w = torch.randn(n, c, device=device).to(dtype), (torch.randn(v, c, device=device) / c**0.5).to(dtype)
    target = _targets(n, v, device)
    grad_out = torch.rand(n, device=device) if reduction == "none" else torch.tensor(0.5, device=device)
    kw = dict(label_smoothing=eps, reduction=reduction)
    fn = lambda h, w: fused_cross_entropy(h @ w.t(), target, **kw)
    compiled, counter = _compile(fn)
    loss, grads = _output_and_grads(fn, (h, w), grad_out)
    loss_c, grads_c = _output_and_grads(compiled, (h, w), grad_out)
    _assert_equal(loss_c, loss, "loss")
    _assert_equal(grads_c[0], grads[0], "grad hidden")
    _assert_equal(grads_c[1], grads[1], "grad weight")
    # logits as a graph input: the op's declared mutation must reach the caller's tensor as in eager mode
    fn = lambda x: fused_cross_entropy(x, target, **kw)
    compiled_in, counter_in = _compile(fn)
    x, x_c = _leaves(h @ w.t(), h @ w.t())
    loss, loss_c = fn(x), compiled_in(x_c)
    _assert_equal(x_c.detach(), x.detach(), "logits buffer after the forward")
    (grad,), (grad_c,) = torch.autograd.grad(loss, x, grad_out), torch.autograd.grad(loss_c, x_c, grad_out)
    _assert_equal(loss_c, loss, "loss")
    _assert_equal(grad_c, grad, "grad logits")
    assert counter.frame_count == counter_in.frame_count == 1


def test_cross_entropy_without_grad_under_compile_leaves_logits_alone(device):
    torch.manual_seed(1)
    x, target = torch.randn(5, 100, device=device), _targets(5, 100, device)
    compiled, _ = _compile(lambda x: fused_cross_entropy(x, target))
    frozen = x.clone()
    _assert_equal(compiled(frozen), fused_cross_entropy(x.clone(), target), "loss")
    _assert_equal(frozen, x, "logits")


def test_bad_target_under_compile_is_nan(device):
    """Under compile the targets are not read on the host: a bad one gives a NaN loss (eager raises instead)."""
    x, target = torch.randn(3, 50, device=device), torch.tensor([0, 50, IGNORE], device=device)
    compiled, _ = _compile(lambda x: fused_cross_entropy(x, target, reduction="none"))
    loss = compiled(x.clone().requires_grad_())
    assert loss[0].isfinite() and loss[1].isnan() and loss[2] == 0
    compiled, _ = _compile(lambda h, w: fused_linear_cross_entropy(h, w, target))
    assert compiled(torch.randn(3, 8, device=device), torch.randn(50, 8, device=device)).isnan()


@pytest.mark.parametrize("dtype,reduction,with_bias,frozen", [
    (FP32, "mean", True, None), (BF16, "sum", False, "weight"), (FP32, "none", True, "hidden")])
def test_linear_cross_entropy_compiled_matches_eager(dtype, reduction, with_bias, frozen, device):
    torch.manual_seed(0)
    n, c, v = 9, 8, 200
    inputs = [torch.randn(n, c, device=device).to(dtype), (torch.randn(v, c, device=device) / c**0.5).to(dtype)]
    if with_bias:
        inputs.append(torch.randn(v, device=device).to(dtype))
    target = _targets(n, v, device)
    grad_out = torch.rand(n, device=device) if reduction == "none" else torch.tensor(2.0, device=device)

    def fn(*leaves):
        h, w, *b = leaves
        h, w = (h.detach() if frozen == "hidden" else h), (w.detach() if frozen == "weight" else w)
        return fused_linear_cross_entropy(h, w, target, bias=b[0] if b else None, reduction=reduction,
                                          label_smoothing=0.1, chunk_size=4)

    compiled, counter = _compile(fn)
    leaves, leaves_c = _leaves(*inputs), _leaves(*inputs)
    loss, loss_c = fn(*leaves), compiled(*leaves_c)
    _assert_equal(loss_c, loss, "loss")
    (loss * grad_out).sum().backward()
    (loss_c * grad_out).sum().backward()
    for name, a, b in zip(("hidden", "weight", "bias"), leaves_c, leaves):
        assert (a.grad is None) == (name == frozen), name
        if a.grad is not None:
            _assert_equal(a.grad, b.grad, f"grad {name}")
    assert counter.frame_count == 1


def test_losses_under_inductor(device):
    """The in-place cross-entropy and the fused linear one with Inductor's own code around them."""
    torch.manual_seed(0)
    n, c, v = 10, 16, 120
    h, w, target = torch.randn(n, c, device=device), torch.randn(v, c, device=device) / 4, _targets(n, v, device)
    for loss_fn in (lambda h, w: fused_cross_entropy(torch.tanh(h) @ w.t() * 2, target, label_smoothing=0.1),
                    lambda h, w: fused_linear_cross_entropy(torch.tanh(h), w * 2, target, chunk_size=4)):
        torch._dynamo.reset()
        compiled, counter = _compile(loss_fn, "inductor")
        one = torch.tensor(1.0, device=device)
        loss, grads = _output_and_grads(loss_fn, (h, w), one)
        loss_c, grads_c = _output_and_grads(compiled, (h, w), one)
        assert counter.frame_count == 1
        assert_close(loss_c, loss, **_inductor_tol(device), name="loss")
        for name, g_c, g in zip(("hidden", "weight"), grads_c, grads):
            assert_close(g_c, g, **_inductor_tol(device), name=f"grad {name}")


# ---------------------------------------------------------------------------------------------- opcheck


def _attention_args(device, dropout):
    torch.manual_seed(0)
    q, k, v = (t.clone().requires_grad_() for t in torch.randn(1, 9, 3, 2, 16, device=device).permute(2, 0, 3, 1, 4))
    return (q, k, v, new_dropout_seed(device) if dropout else None, True, 0.25, 0.2 if dropout else 0.0)


def _attention_backward_args(device):
    q, k, v, seed, *opts = _attention_args(device, True)
    q, k, v = q.detach(), k.detach(), v.detach()
    o, lse, mask = attention_op(q, k, v, seed, *opts)
    return (torch.randn_like(o), q, k, v, o, lse, mask, *opts)


def _attention_qkv_args(device, dropout):
    torch.manual_seed(0)
    qkv = torch.randn(1, 9, 3, 2, 16, device=device, requires_grad=True)
    return (qkv, new_dropout_seed(device) if dropout else None, True, 0.25, 0.2 if dropout else 0.0)


def _attention_qkv_backward_args(device):
    qkv, seed, *opts = _attention_qkv_args(device, True)
    qkv = qkv.detach()
    o, lse, mask = attention_qkv_op(qkv, seed, *opts)
    return (torch.randn_like(o), qkv, o, lse, mask, *opts)


def _linear_args(device, reduction, with_bias, needs):
    torch.manual_seed(0)
    h, w, b = torch.randn(6, 8, device=device), torch.randn(40, 8, device=device), torch.randn(40, device=device)
    h, w, b = (t.requires_grad_(need) for t, need in zip((h, w, b), needs))
    return (h, w, torch.tensor([1, 39, IGNORE, 0, 5, 5], device=device), b if with_bias else None, IGNORE, 0.1,
            reduction, 4, needs[0], needs[1], needs[2] and with_bias)


def _linear_backward_args(device):
    h, w, target, b = (t.detach() for t in _linear_args(device, "none", True, (True, True, True))[:4])
    return (h, w, target, b, torch.rand(6, device=device), IGNORE, 0.1, 4, True, True, True)


def _ce_args(device):
    torch.manual_seed(0)
    return torch.randn(5, 33, device=device), torch.tensor([0, 3, IGNORE, 32, 7], device=device)


OPCHECK_CASES = {  # name: (op, device -> args)
    "attention": (attention_op, lambda d: _attention_args(d, dropout=False)),
    "attention dropout": (attention_op, lambda d: _attention_args(d, dropout=True)),
    "attention_backward": (attention_backward_op, _attention_backward_args),
    "attention_qkv dropout": (attention_qkv_op, lambda d: _attention_qkv_args(d, dropout=True)),
    "attention_qkv_backward": (attention_qkv_backward_op, _attention_qkv_backward_args),
    "cross_entropy_loss": (cross_entropy_loss_op, lambda d: (*_ce_args(d), IGNORE, 0.1)),
    "cross_entropy_": (cross_entropy_op_, lambda d: (*_ce_args(d), torch.tensor(0.25, device=d), IGNORE, 0.1)),
    "cross_entropy_scale_grad_": (cross_entropy_scale_grad_op_, lambda d: (
        torch.randn(5, 33, device=d), torch.rand(5, device=d), torch.tensor(0.5, device=d))),
    "linear_cross_entropy mean": (linear_cross_entropy_op, lambda d: _linear_args(d, "mean", True, (True,) * 3)),
    "linear_cross_entropy sum": (linear_cross_entropy_op,
                                 lambda d: _linear_args(d, "sum", False, (True, False, False))),
    "linear_cross_entropy none": (linear_cross_entropy_op,
                                  lambda d: _linear_args(d, "none", True, (False, True, True))),
    "linear_cross_entropy_backward": (linear_cross_entropy_backward_op, _linear_backward_args),
}


@pytest.mark.parametrize("case", list(OPCHECK_CASES))
def test_opcheck(case, device):
    """torch.library.opcheck: schema (declared mutations, no aliasing), fake implementation (shapes, strides,
    dtypes against the real op), autograd registration, and AOTAutograd with dynamic shapes (forward and
    backward against eager)."""
    op, make_args = OPCHECK_CASES[case]
    torch.library.opcheck(op, make_args(device))


# ---------------------------------------------------------------------------------------------- the model


@pytest.mark.parametrize("loss_impl,autocast", [("triton", False), ("triton_linear", False), ("triton_linear", True)])
def test_gpt1_tiny_compiled_matches_eager(loss_impl, autocast, device):
    """The whole model with our attention and loss (and add-LayerNorm), compiled in one graph, against itself in
    eager mode; under torch.autocast too (fp32 weights and residual stream, bf16 branch copies into the
    sublayers)."""
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        # the triton_linear case also runs the fused residual-dropout-LayerNorm
        norm_impl = "triton" if loss_impl == "triton_linear" else "eager"
        models.append(GPT1(get_config("gpt1-tiny", vocab_size=97, attn_impl="triton", loss_impl=loss_impl,
                                      norm_impl=norm_impl, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)).to(device))
    eager, ours = models
    ids = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(1)).to(device)
    x, y = ids[:, :-1], ids[:, 1:].clone()
    y[1, 3:6] = IGNORE
    compiled, counter = _compile(ours)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        loss = eager(x, labels=y).loss
        loss_c = compiled(x, labels=y).loss
    loss.backward()
    loss_c.backward()
    assert counter.frame_count == 1
    assert_close(loss_c, loss, atol=1e-6, rtol=1e-6, name="loss")
    for (name, p), q in zip(eager.named_parameters(), ours.parameters()):
        assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-5, name=name)
    assert all(p.grad.abs().max() > 0 for p in ours.parameters())


@pytest.mark.parametrize("loss_impl", ["triton_linear", "triton"])
def test_inductor_fallbacks_are_registered_before_compiling(loss_impl, device, monkeypatch):
    """kernels.register_inductor_fallbacks gives each of our operators the fallback lowering and layout constraint
    that Inductor would give it at its first call in a graph, so that Inductor's own registration (whose message
    torch 2.11 formats eagerly, at a cost that grows ~2.6x per layer: see the function) never runs: a model with our
    attention, fused add-LayerNorm, fused bias + GELU and linear (or materializing, in-place) cross-entropy compiles
    through Inductor, forward and backward, and Inductor registers none of them itself."""
    from torch._inductor import lowering
    from torch._library.utils import get_layout_constraint_tag

    import kernels

    ops = [getattr(torch.ops.gpt1_kernels, name).default for name in kernels.OPS]
    for op in ops:  # as in a process that has compiled nothing yet (restored after the test)
        monkeypatch.delitem(lowering.lowerings, op, raising=False)
    assert set(kernels.register_inductor_fallbacks()) == set(ops)
    assert kernels.register_inductor_fallbacks() == []
    for op in ops:
        assert lowering.maybe_layout_constraints(op) is lowering.tag_to_layout_constraint(
            get_layout_constraint_tag(op, with_default=True)), op
    late = []
    make_fallback = lowering.make_fallback
    monkeypatch.setattr(lowering, "make_fallback", lambda op, *a, **k: late.append(op) or make_fallback(op, *a, **k))
    import torch._inductor.graph as inductor_graph

    monkeypatch.setattr(inductor_graph, "make_fallback", lowering.make_fallback)
    torch.manual_seed(0)
    model = GPT1(get_config("gpt1-tiny", n_layer=2, n_embd=32, n_head=2, vocab_size=64, attn_impl="triton",
                            loss_impl=loss_impl, norm_impl="triton", mlp_impl="triton")).to(device)
    ids = torch.randint(0, 64, (1, 17), generator=torch.Generator().manual_seed(1)).to(device)
    loss = torch.compile(model, fullgraph=True)(ids[:, :-1], labels=ids[:, 1:]).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())
    assert not [op for op in late if "gpt1_kernels" in str(op)], late


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_dropout_under_cuda_graphs_draws_anew_at_every_replay():
    """torch.compile(mode="reduce-overhead") replays the attention as a CUDA graph: the seed is drawn inside the
    graph, so every replay has a new mask (not the one captured), and the output is a dropout of the same
    attention (its mean over the replays approaches the output without dropout)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 128, 64, device="cuda", dtype=BF16) for _ in range(3))
    fn = torch.compile(lambda q, k, v: fused_attention(q, k, v, dropout_p=0.5) * 1.0, mode="reduce-overhead",
                       fullgraph=True)
    outs = []
    for _ in range(40):
        torch.compiler.cudagraph_mark_step_begin()
        outs.append(fn(q, k, v).float().clone())
    assert all(not torch.equal(a, b) for a, b in zip(outs[2:], outs[3:]))  # past warm-up and capture: replays
    mean, exact = torch.stack(outs).mean(0), fused_attention(q, k, v).float()
    assert (mean - exact).abs().mean() < 0.25 * (outs[-1] - exact).abs().mean()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs are only detectable on CUDA")
def test_no_host_sync_on_cuda():
    """Eager attention with dropout, and both losses compiled, run forward and backward without a host sync."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 128, 64, device="cuda", dtype=BF16, requires_grad=True) for _ in range(3))
    h = torch.randn(256, 64, device="cuda", requires_grad=True)
    w = torch.randn(1000, 64, device="cuda", requires_grad=True)
    target = torch.randint(0, 1000, (256,), device="cuda")
    ce, _ = _compile(lambda h, w: fused_cross_entropy(h @ w.t(), target), "inductor")
    flce, _ = _compile(lambda h, w: fused_linear_cross_entropy(h, w, target), "inductor")
    steps = [lambda: fused_attention(q, k, v, dropout_p=0.1).sum(), lambda: ce(h, w), lambda: flce(h, w)]
    for step in steps:  # compile (and let Triton build its kernels) outside the check
        step().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in steps:
            step().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ------------------------------------------------------------------------- our operators traced into the graph


@pytest.fixture(scope="module")
def inline_report(tmp_path_factory):
    """tests/inline_kernels.py's report: our operators compiled with and without kernels.set_inline(True), in a
    process of its own where triton.jit makes JIT functions (traceable) and the interpreter runs their launches."""
    out = tmp_path_factory.mktemp("inline") / "report.json"
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "inline_kernels.py")
    proc = subprocess.run([sys.executable, script, str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_inline_kernels_trace_into_the_graph(inline_report):
    """With set_inline(True) (--inline-kernels) each of our operators (attention, packed-qkv attention with dropout,
    also through the short-sequence kernels, add + dropout + LayerNorm with its bf16 copy, bias + GELU) becomes its
    Triton launches in the compiled forward and backward graphs: no operator call left; every result bit for bit
    the eager path's; once Inductor's pass that lets a kernel write its arguments in place has run, no argument
    copied before a launch and no scatter or copy left (the packed-qkv backward writes d qkv itself, not views of
    it); and Inductor's copy of each kernel's source (the kernel with the Triton functions and constants it uses)
    is the kernel's own. Without it the operators stay one opaque call each."""
    cases = [name for name in inline_report if not name.startswith("gpt1-tiny") and "dynamic" not in name]
    assert len(cases) == 10
    for name in cases:
        r = inline_report[name]
        assert r["equal"], name
        if name.endswith("inline=True"):
            assert r["launched"] and not r["ops"], (name, r["ops"])
            assert not r["clones"] and not r["copies"], (name, r["clones"], r["copies"])
            assert all(err is None for err in r["source"].values()), (name, r["source"])
        else:
            assert r["ops"] and not r["launched"], name
    qkv = inline_report["attention_qkv dropout inline=True"]["launched"]
    assert qkv == ["_dropout_mask_kernel", "_attn_fwd_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel"]
    # the short-sequence kernels (a GPU's at T <= 128): one launch each way, d qkv written whole
    short = inline_report["attention_qkv dropout short inline=True"]["launched"]
    assert short == ["_dropout_mask_kernel", "_attn_fwd_short_kernel", "_attn_bwd_short_kernel"]


def test_inline_kernels_keep_symbolic_shapes_opaque(inline_report):
    """A graph compiled for dynamic shapes (symbolic sizes, as after a recompile for a new sequence length) keeps
    our operators opaque also with set_inline(True): their launchers choose launch configurations from the shapes.
    The results are the eager path's."""
    for name in ("attention_qkv dropout dynamic inline=True", "bias_gelu dynamic inline=True"):
        r = inline_report[name]
        assert r["equal"] and r["ops"] and not r["launched"], (name, r)


def test_inline_kernels_in_the_model(inline_report):
    """gpt1-tiny with every fused kernel and dropout, one training step compiled in one graph with
    set_inline(True) and Inductor's partitioner: loss and gradients bit for bit the eager model's; only the linear
    cross-entropy (an opaque operator: its chunk loop writes a shared buffer in place) stays an operator; no forward
    kernel is recomputed in the backward; the graphs copy nothing more than with opaque operators."""
    inline, opaque = inline_report["gpt1-tiny inline=True"], inline_report["gpt1-tiny inline=False"]
    assert inline["equal"] and opaque["equal"]
    assert set(inline["ops"]) == {"gpt1_kernels.linear_cross_entropy.default"}
    assert len(inline["launched"]) == 2 * 12 and not inline["clones"]  # 2 layers: 5 forward, 7 backward launches
    # Inductor's partition recomputes none of our forward kernels in the backward
    assert len(inline["backward_launched"]) == 2 * 7 and not [k for k in inline["backward_launched"]
                                                              if "fwd" in k or "mask" in k], inline["backward_launched"]
    assert sorted(inline["copies"]) == sorted(opaque["copies"])
    assert all(err is None for err in inline["source"].values()), inline["source"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Inductor launches Triton kernels on a GPU")
def test_inline_kernels_under_inductor_on_cuda():
    """On a GPU, with set_inline(True): Inductor's generated code launches our Triton kernels itself (no operator
    of ours left in it but the linear cross-entropy), and a training step of a 2-layer model with every fused kernel
    (dropout off, so that the two compare) gives the loss and gradients of the opaque operators' compile."""
    from helpers import grads_agree
    from torch._inductor.utils import run_and_get_code

    import kernels

    cfg = get_config("gpt1-tiny", n_layer=2, n_embd=128, n_head=2, vocab_size=512, attn_impl="triton",
                     loss_impl="triton_linear", norm_impl="triton", mlp_impl="triton", attn_pdrop=0.0,
                     resid_pdrop=0.0, embd_pdrop=0.0)
    ids = torch.randint(0, 512, (4, 129), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    runs = {}
    try:
        for inline in (False, True):
            torch.manual_seed(0)
            model = GPT1(cfg).cuda()
            torch._dynamo.reset()
            kernels.set_inline(inline)
            compiled = torch.compile(model, fullgraph=True)

            def step(forward):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = forward(ids[:, :-1], labels=ids[:, 1:]).loss
                loss.backward()
                return loss

            loss, code = run_and_get_code(step, compiled)
            runs[inline] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()}, "\n".join(code))
    finally:
        kernels.set_inline(False)
    (loss, grads, code), (ref_loss, ref_grads, ref_code) = runs[True], runs[False]
    for name in ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_add_ln_bwd_kernel", "_bias_gelu_fwd_kernel"):
        assert name in code and name not in ref_code, name
    for op in ("attention_qkv", "add_dropout_layer_norm", "bias_gelu"):
        assert f"gpt1_kernels.{op}" not in code and f"gpt1_kernels.{op}" in ref_code, op
    assert torch.allclose(loss, ref_loss, rtol=1e-3), (loss, ref_loss)
    for name, ref in ref_grads.items():
        grads_agree(grads[name], ref, name)
