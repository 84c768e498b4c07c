"""Model configuration: GPT-1's hyper-parameters under Hugging Face's field names, and named presets."""

from dataclasses import asdict, dataclass, fields
from numbers import Integral, Real

ATTN_IMPLS = ("auto", "eager", "sdpa", "triton")
LOSS_IMPLS = ("auto", "eager", "triton", "triton_linear")
NORM_IMPLS = ("eager", "triton")
MLP_IMPLS = ("eager", "triton")


@dataclass
class GPT1Config:
    vocab_size: int = 40478  # 40,000 BPE merges + base symbols + special tokens in the paper
    n_positions: int = 512  # context length; position embeddings are learned
    n_embd: int = 768  # model width
    n_layer: int = 12  # decoder blocks
    n_head: int = 12  # attention heads, each n_embd // n_head wide
    n_inner: int | None = None  # MLP width; None means 4 * n_embd (3072 in the paper)
    embd_pdrop: float = 0.1  # dropout on token + position embeddings
    attn_pdrop: float = 0.1  # dropout on the attention probabilities
    resid_pdrop: float = 0.1  # dropout on each residual branch before the add
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02  # std of the N(0, std) init of weights
    attn_impl: str = "auto"  # eager | sdpa | triton | auto (triton on a CUDA GPU, else sdpa)
    loss_impl: str = "auto"  # eager | triton | triton_linear | auto (triton_linear on a CUDA GPU, else eager)
    norm_impl: str = "eager"  # eager | triton (one kernel for residual dropout + add + LayerNorm, each way)
    # under torch.autocast: the residual stream (the embeddings' sum and every LayerNorm's output) in fp32, as
    # autocast's layer_norm returns it; False keeps it in the autocast dtype (Megatron-LM's and flash-attention's
    # default), which halves the bytes the add-LayerNorms move. No effect without autocast.
    residual_in_fp32: bool = True
    mlp_impl: str = "eager"  # eager | triton (the MLP's bias + GELU in one kernel each way, with the bias gradient)

    def __post_init__(self):
        if self.n_inner is None and isinstance(self.n_embd, Integral):
            self.n_inner = 4 * self.n_embd
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner"):
            value = getattr(self, name)
            if not isinstance(value, Integral) or isinstance(value, bool):
                raise ValueError(f"{name} must be an int, got {value!r}")
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        for name in ("embd_pdrop", "attn_pdrop", "resid_pdrop", "layer_norm_epsilon", "initializer_range"):
            value = getattr(self, name)
            if not isinstance(value, Real) or isinstance(value, bool):
                raise ValueError(f"{name} must be a number, got {value!r}")
        if not 0.0 < self.layer_norm_epsilon < float("inf"):
            raise ValueError(f"layer_norm_epsilon must be positive, got {self.layer_norm_epsilon}")
        if not 0.0 <= self.initializer_range < float("inf"):  # the init's std: torch refuses it only at build
            raise ValueError(f"initializer_range must be >= 0 and finite, got {self.initializer_range}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {self.attn_impl!r}")
        if self.loss_impl not in LOSS_IMPLS:
            raise ValueError(f"loss_impl must be one of {LOSS_IMPLS}, got {self.loss_impl!r}")
        if self.norm_impl not in NORM_IMPLS:
            raise ValueError(f"norm_impl must be one of {NORM_IMPLS}, got {self.norm_impl!r}")
        if self.mlp_impl not in MLP_IMPLS:
            raise ValueError(f"mlp_impl must be one of {MLP_IMPLS}, got {self.mlp_impl!r}")
        if not isinstance(self.residual_in_fp32, bool):
            raise ValueError(f"residual_in_fp32 must be true or false, got {self.residual_in_fp32!r}")
        for name in ("embd_pdrop", "attn_pdrop", "resid_pdrop"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def architecture(self):
        """The fields that fix the weights' shapes and meaning (not the kernel choice or dropout)."""
        keys = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner")
        return {k: getattr(self, k) for k in keys}


PRESETS = {
    "gpt1": dict(n_positions=512, n_embd=768, n_layer=12, n_head=12),  # the paper's 117M model
    "gpt1-mini": dict(n_positions=256, n_embd=384, n_layer=6, n_head=6),  # ~1/10 scale, for a quick CPU run
    "gpt1-tiny": dict(n_positions=128, n_embd=128, n_layer=4, n_head=4),  # for tests and the CPU demo
}


def get_config(name, **overrides):
    """The preset `name` as a GPT1Config, with any field overridden by keyword."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return GPT1Config(**{**PRESETS[name], **overrides})
