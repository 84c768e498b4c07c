"""Pieces shared by the Triton kernel files: the exp2/log2 constants, bit-exact rounding of fp32 values to
bf16 or TF32, whether Triton's CPU interpreter runs the kernels (TRITON_INTERPRET=1; it then patches triton.language
once per launch, and its tiles grow with the input: interpreter_block and interpreter_rows), host integer helpers, the
argument checks, torch.autocast's cast of a matmul's inputs, and the dropout draws (Philox, in groups of 8
columns) with their device seeds."""

import functools
import json
import os

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode

# Global constexprs, so that @triton.jit code may read them; `.value` is the plain float for host code.
LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): exp(x) = exp2(x * LOG2E)
LN2 = tl.constexpr(0.6931471805599453)  # ln(2): ln(x) = log2(x) * LN2

# Triton's CPU interpreter truncates fp32 -> bf16 where the GPU rounds to nearest even (and multiplies bf16
# dot operands as raw integers), so the kernels round by hand there to show the GPU's numerics.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _patch_language_once_per_launch():
    """Make Triton's interpreter patch triton.language's modules once per launch, not at every helper call.

    The interpreter swaps triton.language's builtins for its own when a kernel launches (and puts them back after),
    and again at every call of a @triton.jit helper inside the kernel, scanning the modules with inspect.getmembers
    each time: about half of a cross-entropy launch went there (our kernels call many small helpers, per program). A
    helper's call needs it only where the helper's module sees a language module (triton.language, or its core, as
    triton.language.standard's tl.zeros does) that the launch has not patched yet, and the interpreter leaves a
    helper's patches in place for the rest of the launch anyway. So inside a launch a helper whose modules are all
    patched runs at once; the others are patched as before. The same results bit for bit (every test runs through
    it), in about half the time for the cross-entropy, 0.7x for the attention. Installed only where the
    interpreter has the pieces it wraps (triton 3.6-3.9)."""
    import functools
    import inspect

    from triton.runtime import interpreter

    executor, function = getattr(interpreter, "GridExecutor", None), getattr(interpreter, "InterpretedFunction", None)
    if (executor is None or function is None or not hasattr(function, "rewrite")
            or not hasattr(interpreter, "_patch_lang") or getattr(function, "_gpt1_patched", False)):
        return
    launch_call, helper_call = executor.__call__, function.__call__
    patched = []  # per launch in progress: ids of the language modules patched so far
    languages = {}  # id(a module's globals) -> ids of the language modules it sees

    def languages_of(fn):
        key = id(fn.__globals__)
        if key not in languages:
            languages[key] = frozenset(id(v) for v in fn.__globals__.values()
                                       if inspect.ismodule(v) and v in (tl, tl.core))
        return languages[key]

    @functools.wraps(launch_call)
    def launch(self, *args, **kwargs):
        patched.append(set(languages_of(self.fn)))
        try:
            return launch_call(self, *args, **kwargs)
        finally:
            patched.pop()

    @functools.wraps(helper_call)
    def helper(self, *args, **kwargs):
        seen = languages_of(self.fn)
        if not patched or not seen <= patched[-1]:
            if patched:
                patched[-1] |= seen
            return helper_call(self, *args, **kwargs)
        try:
            return self.rewrite()(*args, **kwargs)
        except Exception as e:  # as the interpreter reports a helper's error
            raise interpreter.InterpreterError(repr(e)) from e

    executor.__call__, function.__call__ = launch, helper
    function._gpt1_patched = True


def _index_through_squeeze():
    """Make Triton's interpreter turn a scalar into a Python int (a kernel's range bounds, an index) by squeezing
    its one-element array first, as triton 3.9 does: triton 3.6 calls int() on the array itself, which numpy 2.4
    refuses ("only 0-dimensional arrays can be converted to Python scalars"), so without this every kernel fails
    under triton 3.6's interpreter with a current numpy (the GPU machines run tests/inline_kernels.py that way)."""
    from triton.runtime import interpreter

    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None or getattr(patch_tensor, "_gpt1_patched", False):
        return

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched._gpt1_patched = True
    interpreter._patch_lang_tensor = patched


if INTERPRET:
    _patch_language_once_per_launch()
    _index_through_squeeze()


@triton.jit
def round_fp32(x, DROP_BITS: tl.constexpr):
    """fp32 x rounded to nearest-even with its low DROP_BITS mantissa bits cleared (16: bf16, 13: tf32),
    still as fp32. Infinities stay infinite; values past the format's largest round to infinity."""
    bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
    if DROP_BITS == 16:
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    else:
        tl.static_assert(DROP_BITS == 13)
        bits = (bits + 0xFFF + ((bits >> 13) & 1)) & 0xFFFFE000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def stored(x, DTYPE: tl.constexpr, RTNE_BF16: tl.constexpr):
    """fp32 x converted for a store to a DTYPE tensor, rounded to nearest also under the interpreter (RTNE_BF16:
    pass INTERPRET)."""
    if RTNE_BF16 and DTYPE == tl.bfloat16:
        x = round_fp32(x, 16)
    return x.to(DTYPE)


def as_rows(t):
    """t (..., C) as (N, C) with unit column stride (a view when the leading dims allow it)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def unit_stride(t):
    """A (C,) parameter (weight, bias) as the kernels read it, `P + cols`: itself when its stride is 1 (a copy
    otherwise: a column of a matrix, an expanded scalar); None passes through."""
    return t if t is None or t.stride(0) == 1 else t.contiguous()


def cdiv(a, b):
    """ceil(a / b) of host ints. triton.cdiv and triton.next_power_of_2 are Triton constexpr functions, which
    unwrap their arguments on every call: ~2-5 us each on the host, nine of them per attention forward and backward
    (triton 3.6 and 3.9)."""
    return -(-a // b)


def next_power_of_2(n):
    """The smallest power of 2 >= n (1 for n <= 1), of a host int (see cdiv)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def interpreter_block(n, smallest, parts, largest):
    """A tile's extent along a dimension of extent n under the Triton interpreter: `smallest`, or for a larger n the
    largest power of two that still cuts n into `parts` tiles or more, up to `largest` (a power of two, which bounds
    the interpreter's arrays). The interpreter runs every program, and every tile that a program visits, in Python,
    at a cost per tile that barely depends on the tile's size: the kernel tests' small shapes keep small tiles
    (several tiles, a partial one, several programs), and the model-sized inputs of the training tests take a few
    large ones (the add-LayerNorm backward of gpt1-tiny's 4 x 32 tokens visited 64 tiles of 2 rows, 0.87 s a call;
    now 9 of 16)."""
    k = n // parts
    return max(smallest, min(largest, 1 << (k.bit_length() - 1) if k else 0))


# the most elements of a (rows, columns) tile under the interpreter (interpreter_rows)
INTERPRETER_TILE_ELEMENTS = 1 << 16


def interpreter_rows(n, cols, smallest, parts):
    """interpreter_block for the rows of (rows, cols) tiles: at most INTERPRETER_TILE_ELEMENTS elements a tile (or
    `smallest` rows)."""
    return interpreter_block(n, smallest, parts, max(1, INTERPRETER_TILE_ELEMENTS // cols))


def check_tensors(prefix="", **tensors):
    """A TypeError naming the first argument that is not a torch.Tensor (a bias may be None), checked before
    anything reads an attribute of it; prefix: the public function's name, as its other errors carry it."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) and not (name == "bias" and t is None):
            raise TypeError(f"{prefix}{name} must be a torch.Tensor, got {type(t).__name__}")


def first_order(name):
    """The decorator of a backward (an autograd.Function's, or register_autograd's) that is not itself
    differentiable: our kernels compute the gradients in place of the ops that torch would differentiate again. Asked
    for a graph of the gradients (create_graph=True, as a gradient penalty asks; the only way grad mode is on in a
    backward), it raises a one-line error: the gradients it returned there had no graph, so a second derivative came
    back silently without our ops' terms. torch's once_differentiable would not do: it refuses only where an
    incoming gradient requires grad (not after loss.backward()), and only when the error node lies on the second
    backward's path (not for torch.autograd.grad(..., inputs))."""

    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            if torch.is_grad_enabled():
                raise RuntimeError(f"{name}: double backward (create_graph=True) is not supported: the kernels' "
                                   "backward is not differentiable")
            return backward(ctx, *grads)

        return wrapper

    return decorate


def is_number(v):
    """Whether v is an int or a float, not a bool (which Python counts as an int): the check of a numeric option."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def autocast_inputs(*tensors):
    """The tensors as torch.autocast hands them to a matmul (F.linear, SDPA): floating ones cast to the
    autocast dtype when autocast is on for their device type; unchanged otherwise (None passes through).
    Without it an fp32 input under autocast (a LayerNorm's output, an fp32 master weight) would run the
    kernels and their matmuls in fp32. The cast is differentiable: its gradient returns in the input's dtype."""
    device_type = next(t.device.type for t in tensors if t is not None)
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


# ----------------------------------------------------------------------------------------------------
# Dropout: Philox draws in groups of 8 columns, device seeds
# ----------------------------------------------------------------------------------------------------


# Philox-4x32 rounds per call: 7, as FlashAttention-2's dropout runs it. 10 (Triton's default, Random123's and
# C++26's philox4x32) is a safety margin above the fewest rounds that pass TestU01's BigCrush (Salmon et al.,
# "Parallel random numbers: as easy as 1, 2, 3", SC 2011); no statistical defect is known at 7.
PHILOX_ROUNDS = tl.constexpr(7)


@triton.jit
def dropout_words(SEED, STREAM, rows, col_start, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """The dropout draws of the elements rows x (col_start + [0, BLOCK_C)) of one stream (the attention's
    b*H + h, a head's probabilities), col_start a multiple of 8: four (BLOCK_R, BLOCK_C // 8) uint32 words.
    One Philox-4x32 call (PHILOX_ROUNDS), counter (j // 8, i, stream, seed) with a fixed key, gives four 32-bit words =
    eight 16-bit draws u for the columns j = 8*(j // 8) + [0, 8) of row i: column 8g + 2k + h is the low
    (h = 0) or high (h = 1) half of word k. Element (i, j) is kept iff its u >= DROP_THRESHOLD =
    round(p * 65536). The draws are a function of (seed, stream, i, j) alone, whatever the block sizes; 1/8 of
    one Philox call per element (tl.rand spends a whole call, 4 words, on each element).
    seed is the low 32 bits of the int64 at SEED (see new_dropout_seed), read here, per tile. Held for the whole
    loop, or used as the Philox key (whose round keys then are loop-invariant registers rather than
    immediates), it made the tightest configurations spill (sm_90 fp32 D=128 dq, sm_80 16-bit D=64 dkdv)."""
    tl.static_assert(BLOCK_C % 8 == 0, "the dropout draws come in groups of 8 columns")
    zero = tl.zeros([BLOCK_R, BLOCK_C // 8], dtype=tl.uint32)
    group = (col_start // 8 + tl.arange(0, BLOCK_C // 8)).to(tl.uint32)
    c0 = zero + group[None, :]
    c1 = zero + rows.to(tl.uint32)[:, None]
    return tl.philox(0, c0, c1, zero + STREAM.to(tl.uint32), zero + tl.load(SEED).to(tl.uint32), PHILOX_ROUNDS)


@triton.jit
def keep_from_words(r0, r1, r2, r3, DROP_THRESHOLD, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """The (BLOCK_R, BLOCK_C) keep-mask of dropout_words' draws."""
    # join stacks on a new last axis, so (R, C/8, 2, 2)[i, j] holds word 2i + j: word k at flat index k; then
    # its low and high halves: (R, C/8, 2, 2, 2), flat index 2k + half within the group, which the row-major
    # reshape turns into column 8g + 2k + half
    words = tl.join(tl.join(r0, r2), tl.join(r1, r3))
    draws = tl.join(words & 0xFFFF, words >> 16)
    return tl.reshape(draws, [BLOCK_R, BLOCK_C]) >= DROP_THRESHOLD


@triton.jit
def bits_from_words(r0, r1, r2, r3, DROP_THRESHOLD):
    """The same keep-mask packed, one uint8 per group of 8 columns: bit b of group g is column 8g + b."""
    bits = (r0 & 0xFFFF) >= DROP_THRESHOLD
    bits = bits.to(tl.uint32) | (((r0 >> 16) >= DROP_THRESHOLD).to(tl.uint32) << 1)
    bits |= (((r1 & 0xFFFF) >= DROP_THRESHOLD).to(tl.uint32) << 2) | (((r1 >> 16) >= DROP_THRESHOLD).to(tl.uint32) << 3)
    bits |= (((r2 & 0xFFFF) >= DROP_THRESHOLD).to(tl.uint32) << 4) | (((r2 >> 16) >= DROP_THRESHOLD).to(tl.uint32) << 5)
    bits |= (((r3 & 0xFFFF) >= DROP_THRESHOLD).to(tl.uint32) << 6) | (((r3 >> 16) >= DROP_THRESHOLD).to(tl.uint32) << 7)
    return bits.to(tl.uint8)


def dropout_args(dropout_p):
    """(DROP_THRESHOLD, DROPOUT_SCALE): an element is dropped when its 16-bit draw is below the threshold, so
    the dropout rate is p rounded to a multiple of 1/65536 (at most 7.6e-6 away); kept elements are scaled
    by 1/(1 - p), the exact p, as the eager reference does."""
    return min(round(dropout_p * 65536), 65535), 1.0 / (1.0 - dropout_p)


def seed_tensor(seed, device):
    """The seed as the kernels read it, a 1-element int64 tensor on the inputs' device; an int (tests,
    replays) is copied there. None (no dropout) stays None."""
    if seed is None or isinstance(seed, torch.Tensor):
        return seed
    return torch.tensor([seed], dtype=torch.int64, device=device)


def new_dropout_seed(device):
    """A 32-bit dropout seed (the kernels read the low 32 bits of an int64) drawn with torch.randint on `device`,
    i.e. from that device's default generator: torch.manual_seed reproduces it, it never leaves the device (no
    host sync), and under torch.compile it is a tensor in the graph (no recompile per value; CUDA graphs
    replay fresh draws)."""
    return torch.randint(0, 2**32, (1,), dtype=torch.int64, device=device)


# The arch field of the measured launch tables (kernels/*_tuned.json) -> the CUDA compute capability's major version
# whose entries it holds (sm_100 and later read sm90's)
TUNED_ARCHS = {"sm80": 8, "sm90": 9}


def read_tuned_json(path, tuner):
    """The JSON object of a measured launch table written by `python -m bench.<tuner>`, or None when there is no
    such file (the kernels then run their fixed configurations); ValueError for a file that is not JSON or that a
    --smoke run wrote."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON: {exc}") from None
    if isinstance(data, dict) and data.get("smoke"):
        raise ValueError(f"{path}: written by bench.{tuner} --smoke, which measures nothing")
    return data


# ----------------------------------------------------------------------------------------------------
# Operators whose launches torch.compile can see
# ----------------------------------------------------------------------------------------------------

# Whether triton.jit made JIT functions, which torch's tracing can capture (wrap_triton): everywhere Triton compiles
# the kernels, and not under the interpreter, whose functions it cannot trace
TRACEABLE = isinstance(dropout_words, triton.runtime.jit.JITFunction)


_INLINE = {"enabled": False}


def set_inline(enabled):
    """Whether torch.compile traces into our operators (see kernel_op) from now on: off by default. Sets torch's
    `torch._functorch.config.decompose_custom_triton_ops` to the same value, which AOTAutograd's cache keys on, so
    that a graph compiled one way is not loaded from the cache for the other. Compiled functions keep the way they
    were compiled; call it before compiling. Takes effect where Triton compiles the kernels (TRACEABLE); under the
    interpreter the operators stay opaque."""
    _INLINE["enabled"] = bool(enabled)
    torch._functorch.config.decompose_custom_triton_ops = bool(enabled)


def inline_enabled():
    return _INLINE["enabled"]


def kernel_op(name, *, mutates_args=()):
    """The decorator of an operator that runs our kernels: torch.library.triton_op where the kernels compile
    (TRACEABLE), torch.library.custom_op under the interpreter. Both are called the same way, take the same
    register_fake and register_autograd, and run the decorated function eagerly.

    Under torch.compile, and once `set_inline(True)` asked for it, a triton_op is decomposed when AOTAutograd
    traces it: its function runs on the graph's tensors, its allocations and views become graph operators, and each
    launch made through `launchable` becomes a call of that Triton kernel, which Inductor emits in its own generated
    code beside its own kernels, with the launch arguments worked out at compile time; the host then pays Inductor's
    launcher per kernel and nothing per operator (its dispatch, checks, config lookups and allocations ran once,
    while tracing). Otherwise the operator is one opaque call in the graph, as a custom_op is; and so it is where a
    tensor's shape is symbolic (a graph compiled for dynamic shapes, e.g. after a recompile for a new sequence
    length): the launchers choose their configurations from the shapes, so they trace only static ones."""

    def decorate(fn):
        if not TRACEABLE:
            return torch.library.custom_op(name, mutates_args=mutates_args)(fn)
        op = torch.library.triton_op(name, mutates_args=mutates_args)(fn)

        def functional(mode, func, types, args, kwargs):  # as triton_op's own rule, but only when inlining
            if not (_INLINE["enabled"] and torch._functorch.config.decompose_custom_triton_ops) or _symbolic(args):
                return mode.__torch_dispatch__(func, types, args, kwargs)
            if any(t not in (torch.Tensor, FunctionalTensor) and not issubclass(t, FakeTensor) for t in types):
                return NotImplemented
            with mode:
                return fn(*args, **kwargs)

        op.register_torch_dispatch(FunctionalTensorMode, functional)
        return op

    return decorate


def _symbolic(args):
    """Whether any tensor among an operator's arguments has a symbolic size or stride."""
    return any(isinstance(d, torch.SymInt)
               for a in args if isinstance(a, torch.Tensor) for d in (*a.shape, *a.stride()))


def launchable(kernel, like):
    """kernel, ready for `kernel[grid](...)`: as itself, except while torch traces an operator's function (its
    tensors, e.g. `like`, are functional or fake ones), where it is wrapped (torch.library.wrap_triton) so that the
    launch enters the graph instead of running."""
    if TRACEABLE and isinstance(like, (FakeTensor, FunctionalTensor)):
        return torch.library.wrap_triton(kernel)
    return kernel
