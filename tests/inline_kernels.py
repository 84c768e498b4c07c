"""Our operators decomposed into torch.compile's graph (--inline-kernels), on a CPU: run by
tests/test_compile.py::test_inline_kernels_trace_into_the_graph as `python tests/inline_kernels.py OUT.json`.

Where Triton compiles, the operators are torch.library.triton_ops, and AOTAutograd replaces each call with the
allocations, views and Triton launches of its function (kernels._common.kernel_op). Under the interpreter
triton.jit makes functions that torch cannot trace, so this process makes JIT functions as a GPU machine does
(Triton's interpreter switched off while kernels is imported), runs every launch of them through the interpreter,
and answers Triton's "current target" with sm_90 for torch's analysis of which arguments a kernel writes (it
compiles the kernel to TTIR). torch.compile then runs with the aot_eager backend: everything a GPU's Inductor
gets, but executed eagerly. Written to OUT.json, per case: whether the compiled outputs and gradients equal the
eager path's bit for bit, the kernels launched in the forward and backward graphs, our operators left in them, the
kernel arguments torch would copy before a launch (the analysis of writes: a kernel's inputs must not be among
them), and whether Inductor's copy of each kernel's source (the kernel with the Triton functions and constants it
uses) compiles for sm_90.
"""

import contextlib
import copy
import importlib.util
import inspect
import json
import os
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"  # Triton's own library (tl.sum, ...) made of JIT functions, as on a GPU
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import triton  # noqa: E402
from torch._higher_order_ops import triton_kernel_wrap  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction, _patch_lang  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402


class _JitKnobs:
    """Triton's knobs as triton.jit reads them, but for the interpreter switch: the kernels are JIT functions, while
    the environment (which kernels._common reads) still says that the interpreter runs them."""

    class runtime:  # noqa: N801 - the knobs' own name
        def __getattr__(self, name):
            return False if name == "interpret" else getattr(triton.knobs.runtime, name)

    runtime = runtime()

    def __getattr__(self, name):
        return getattr(triton.knobs, name)


os.environ["TRITON_INTERPRET"] = "1"  # what kernels._common reads: the interpreter runs the launches
triton.runtime.jit.knobs = _JitKnobs()
import kernels  # noqa: E402
from kernels import _common  # noqa: E402

triton.runtime.jit.knobs = triton.knobs
assert _common.TRACEABLE and _common.INTERPRET

_INTERPRETED = {}


def _interpreted(jit_fn):
    """The interpreter's function for a JIT function (by id: a JIT function's hash compiles its dependencies)."""
    fn = _INTERPRETED.get(id(jit_fn))
    if fn is None:
        fn = _INTERPRETED[id(jit_fn)] = InterpretedFunction(jit_fn.fn)
    return fn


def _run_interpreted(self, *args, grid, warmup, **kwargs):  # a launch
    return _interpreted(self).run(*args, grid=grid, warmup=warmup, **kwargs)


def _call_interpreted(self, *args, **kwargs):  # a Triton function called by a kernel
    fn = _interpreted(self)
    # as InterpretedFunction.__call__, but putting triton.language back afterwards, as a launch does: torch's
    # analysis of a kernel's writes compiles it with the real one
    scope = _patch_lang(fn.fn)
    try:  # Triton's own functions (tl.sum, ...) as plain Python: the interpreter's rewrite refuses some of them
        return (fn.fn if self.fn.__module__.startswith("triton.") else fn.rewrite())(*args, **kwargs)
    finally:
        scope.restore()


class _Sm90:
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


# triton.language as imported: a launch under the interpreter swaps functions of its modules and classes for its own,
# and does not always put them back (tl.core.program_id stays the interpreter's after a launch)
_LANGUAGE = [(owner, dict(vars(owner))) for name, module in list(sys.modules.items())
             if name.startswith("triton.language") and module is not None
             for owner in [module, *(c for c in vars(module).values() if isinstance(c, type) and c.__module__ == name)]]


def _compiling(fn):
    """fn with Triton's interpreter switched off and triton.language as imported while it runs: torch's analysis of a
    kernel's writes compiles it."""

    def wrapper(*args, **kwargs):
        for owner, attrs in _LANGUAGE:
            for name, value in attrs.items():
                if vars(owner).get(name) is not value and not name.startswith("__"):
                    setattr(owner, name, value)
        os.environ["TRITON_INTERPRET"] = "0"
        try:
            return fn(*args, **kwargs)
        finally:
            os.environ["TRITON_INTERPRET"] = "1"

    return wrapper


triton_kernel_wrap.generate_ttir = _compiling(triton_kernel_wrap.generate_ttir)
JITFunction.run = _run_interpreted
JITFunction.__call__ = _call_interpreted
triton.runtime.driver.set_active(_Sm90())

def graph_report(graphs):
    """Kernels launched and our operators called in the graphs; then, after Inductor's pass that lets a kernel write
    its arguments in place (reinplace_inplaceable_ops), the kernel arguments still copied before a launch and the
    scatter / copy operators left (a kernel that writes a view of a tensor gets both: at GPT-1's shapes a copy of
    25-75 MB per layer)."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from torch._inductor.fx_passes.reinplace import reinplace_inplaceable_ops
    from torch._inductor.fx_utils import FakeTensorUpdater
    from torch._inductor.virtualized import V

    launched, ops, clones, copies, kernels_seen = [], [], [], [], []
    for gm in graphs:
        gm = copy.deepcopy(gm)
        fake_mode = next(n.meta["val"].fake_mode for n in gm.graph.nodes
                         if isinstance(n.meta.get("val"), torch._subclasses.FakeTensor))
        with V.set_fake_mode(fake_mode):  # the updater takes the module (torch 2.13) or its graph (2.11)
            updater = FakeTensorUpdater(gm.graph if "graph" in inspect.signature(FakeTensorUpdater).parameters else gm)
            reinplace_inplaceable_ops(updater, gm.graph)
        for node in gm.graph.nodes:
            if node.op != "call_function":
                continue
            name = str(node.target)
            if name.startswith("gpt1_kernels."):
                ops.append(name)
            if "scatter" in name or "copy" in name or "clone" in name:
                copies.append(name)
            if node.target is torch.ops.higher_order.triton_kernel_wrapper_functional:
                kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
                kernel = kernel.fn if isinstance(kernel, Autotuner) else kernel  # launch options make an Autotuner
                launched.append(kernel.fn.__name__)
                kernels_seen.append(kernel)
                clones += [f"{kernel.fn.__name__}.{arg}" for arg in node.kwargs["tensors_to_clone"]]
    return launched, ops, clones, copies, kernels_seen


def inductor_source_compiles(kernel, directory):
    """Inductor's copy of the kernel (its source with the Triton functions and globals it uses), written as a module
    of its own and imported under the compiler: None when that gives the kernel's own source back, or the error."""
    from torch._inductor.codegen.wrapper import user_defined_triton_kernel_transitive_closure_source_code

    name = kernel.fn.__name__
    path = os.path.join(directory, f"inductor_copy{name}.py")
    with open(path, "w") as f:
        f.write("import triton\nimport triton.language as tl\n\n@triton.jit\n")
        f.write(user_defined_triton_kernel_transitive_closure_source_code(kernel))
    spec = importlib.util.spec_from_file_location(f"inductor_copy{name}", path)
    module = importlib.util.module_from_spec(spec)
    triton.runtime.jit.knobs = _JitKnobs()
    try:
        spec.loader.exec_module(module)
        copy = getattr(module, name)
        return None if isinstance(copy, JITFunction) and copy.src == kernel.src else "the copy differs"
    except Exception as exc:  # noqa: BLE001 - reported to the test
        return f"{type(exc).__name__}: {exc}"
    finally:
        triton.runtime.jit.knobs = triton.knobs


def run_case(fn, inputs, inline, dynamic=None):
    """Eager, then compiled (aot_eager, graphs recorded), each on fresh copies of the inputs, the same draws from
    torch's generator: the results and the report."""
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    def call(f):
        args = [a.detach().clone().requires_grad_(a.requires_grad) for a in inputs]
        torch.manual_seed(0)
        out = f(*args)
        outs = out if isinstance(out, tuple) else (out,)
        sum((o.float() * torch.randn_like(o.float())).sum() for o in outs).backward()
        return [o.detach() for o in outs] + [a.grad for a in args if a.requires_grad]

    eager = call(fn)
    torch._dynamo.reset()
    kernels.set_inline(inline)
    backend = AotEagerAndRecordGraphs()
    compiled = call(torch.compile(fn, backend=backend, fullgraph=True, dynamic=dynamic))
    launched, ops, clones, copies, seen = graph_report(backend.fw_graphs + backend.bw_graphs)
    return {
        "equal": len(eager) == len(compiled) and all(torch.equal(a, b) for a, b in zip(eager, compiled)),
        "launched": launched,
        "ops": ops,
        "clones": clones,
        "copies": copies,
        "source": {k.fn.__name__: inductor_source_compiles(k, tempfile.mkdtemp()) for k in seen},
    }


def cases():
    g = torch.Generator().manual_seed(0)

    def t(*shape, dtype=torch.float32, grad=True):
        return torch.randn(*shape, generator=g).to(dtype).requires_grad_(grad)

    seed = torch.tensor([1234], dtype=torch.int64)
    return {
        "attention_qkv dropout": (
            lambda qkv: kernels.fused_attention_qkv(qkv, dropout_p=0.1, _seed=seed), [t(1, 24, 3, 2, 16)]),
        "attention no dropout": (
            lambda q, k, v: kernels.fused_attention(q, k, v, causal=False), [t(1, 2, 24, 16) for _ in range(3)]),
        "add_dropout_layer_norm branch": (
            lambda x, h, w, b: kernels.fused_add_dropout_layer_norm(x, h, w, b, dropout_p=0.1,
                                                                    branch_dtype=torch.bfloat16),
            [t(6, 40), t(6, 40, dtype=torch.bfloat16), t(40), t(40)]),
        "bias_gelu": (lambda x, b: kernels.fused_bias_gelu(x, b), [t(5, 48, dtype=torch.bfloat16), t(48)]),
    }


def run_model(inline):
    """gpt1-tiny (2 layers) with every fused kernel of ours and dropout 0.1, a training step's forward and backward
    compiled in one graph (partitioned as Inductor partitions it) against eager mode: the loss and every
    parameter's gradient, and the report, with the kernels launched in the backward graph alone."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    from gpt1 import GPT1, get_config

    graphs = {"forward": [], "backward": []}

    def recorder(kind):
        def compiler(gm, _):
            graphs[kind].append(gm)
            return make_boxed_func(gm.forward)

        return compiler

    # Inductor's partition of the joint graph, which may recompute forward operators in the backward
    backend = aot_autograd(fw_compiler=recorder("forward"), bw_compiler=recorder("backward"),
                           partition_fn=min_cut_rematerialization_partition)

    cfg = get_config("gpt1-tiny", n_layer=2, n_embd=32, n_head=2, vocab_size=64, attn_impl="triton",
                     loss_impl="triton_linear", norm_impl="triton", mlp_impl="triton")
    ids = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(1))
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = GPT1(cfg)
        torch._dynamo.reset()
        kernels.set_inline(inline)
        forward = torch.compile(model, backend=backend, fullgraph=True) if compiled else model
        torch.manual_seed(1)
        loss = forward(ids[:, :-1], labels=ids[:, 1:]).loss
        loss.backward()
        results.append([loss.detach()] + [p.grad for p in model.parameters()])
    launched, ops, clones, copies, seen = graph_report(graphs["forward"] + graphs["backward"])
    return {
        "equal": all(torch.equal(a, b) for a, b in zip(*results)),
        "backward_launched": graph_report(graphs["backward"])[0],
        "launched": launched,
        "ops": ops,
        "clones": clones,
        "copies": copies,
        "source": {k.fn.__name__: inductor_source_compiles(k, tempfile.mkdtemp()) for k in seen},
    }


@contextlib.contextmanager
def short_kernels():
    """Every attention launch config with a short-sequence entry (a GPU's at T <= 128; the interpreter's has none),
    for as long as the block runs."""
    from kernels import attention

    with attention.short_configs(dict(fwd=((128, 4, 1, 2),), bwd=((128, 4, 1, 2),))):
        yield


def main(out):
    results = {}
    for name, (fn, inputs) in cases().items():
        for inline in (True, False):
            results[f"{name} inline={inline}"] = run_case(fn, inputs, inline)
    fn, inputs = cases()["attention_qkv dropout"]
    for inline in (True, False):
        with short_kernels():
            results[f"attention_qkv dropout short inline={inline}"] = run_case(fn, inputs, inline)
    for name in ("attention_qkv dropout", "bias_gelu"):  # symbolic shapes: the operators stay opaque
        fn, inputs = cases()[name]
        results[f"{name} dynamic inline=True"] = run_case(fn, inputs, True, dynamic=True)
    for inline in (True, False):
        results[f"gpt1-tiny inline={inline}"] = run_model(inline)
    with open(out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
