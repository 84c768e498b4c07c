"""GPT-1 (Radford et al., 2018): a post-LayerNorm Transformer decoder with a tied LM head.

Module names follow Hugging Face's OpenAIGPTModel so that gpt1.hf maps weights one to one
(our Linear layers store (out, in) where HF's Conv1D stores (in, out)).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from kernels import reference
from kernels.attention import unpack_qkv

from .config import GPT1Config


@dataclass
class GPT1Output:
    loss: torch.Tensor | None = None  # mean next-token loss over labels != -100
    logits: torch.Tensor | None = None  # (B, T, V); None when a fused loss consumed them


def resolve_attn_impl(impl, device, head_dim):
    """"auto": our kernel on a CUDA GPU for the head dims it has (kernels.attention.HEAD_DIMS), else SDPA."""
    if impl == "auto":
        return "triton" if device.type == "cuda" and head_dim in kernels.attention.HEAD_DIMS else "sdpa"
    return impl


def resolve_loss_impl(impl, device):
    if impl == "auto":
        return "triton_linear" if device.type == "cuda" else "eager"
    return impl


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.attn_pdrop = config.attn_pdrop
        self.attn_impl = config.attn_impl
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x):
        B, T, C = x.shape
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head)
        p = self.attn_pdrop if self.training else 0.0
        impl = resolve_attn_impl(self.attn_impl, x.device, self.c_attn.in_features // self.n_head)
        if impl == "triton":  # reads q, k, v through qkv's strides; its gradient comes back in qkv's layout
            y = kernels.fused_attention_qkv(qkv, causal=True, dropout_p=p)
        else:
            q, k, v = unpack_qkv(qkv)  # three (B, nh, T, hs) views
            if impl == "sdpa":
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
            else:
                y = reference.attention(q, k, v, causal=True, dropout_p=p)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.c_proj(y)  # the residual dropout is the block's, fused with its add and LayerNorm


class LinearGELU(nn.Linear):
    """gelu(x W^T + b), GPT-1's tanh GELU: torch's ops (impl "eager"), or the matmul without its bias and then
    the bias + GELU in one kernel each way (impl "triton"), whose backward sums the bias gradient as it writes the
    matmul's output gradient (torch's is a pass of its own over it). A Linear module (same parameters and
    state_dict keys) whose own forward reads its weights, so that ZeRO-3's parameter gathering sees them used."""

    def __init__(self, n_in, n_out, impl):
        super().__init__(n_in, n_out)
        self.impl = impl

    def forward(self, x):
        if self.impl == "triton":
            return kernels.fused_bias_gelu(F.linear(x, self.weight), self.bias, approximate="tanh")
        return F.gelu(super().forward(x), approximate="tanh")


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = LinearGELU(config.n_embd, config.n_inner, config.mlp_impl)
        self.c_proj = nn.Linear(config.n_inner, config.n_embd)

    def forward(self, x):
        return self.c_proj(self.c_fc(x))


def compute_dtype(dtype, device):
    """The dtype a sublayer computes a `dtype` tensor in: torch.autocast's on `device` when it is on, else dtype."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else dtype


def in_compute_dtype(t):
    """t in its compute dtype: t itself when it is already (not even a no-op `.to` call: the host counts those)."""
    dtype = compute_dtype(t.dtype, t.device)
    return t if t.dtype == dtype else t.to(dtype)


class AddLayerNorm(nn.LayerNorm):
    """ln(x + dropout(h)), the post-LN block's residual add: torch's ops (impl "eager") or one Triton kernel each
    way (impl "triton"). Returns (y, y_branch): y for the next residual add, in the residual stream's dtype (under
    torch.autocast fp32, or the compute dtype without residual_in_fp32), and y in the compute dtype for the next
    sublayer: torch's ops hand y itself where the dtypes agree (autograd then adds the two gradients in a kernel
    of its own), the kernel always writes a second tensor and adds the two gradients as it reads them. A
    LayerNorm module (same parameters and state_dict keys) whose own forward reads its weights, so that module
    hooks such as ZeRO-3's parameter gathering see them used."""

    def __init__(self, n_embd, eps, dropout_p, impl, residual_in_fp32=True):
        super().__init__(n_embd, eps=eps)
        self.dropout_p, self.impl, self.residual_in_fp32 = dropout_p, impl, residual_in_fp32

    def forward(self, x, h):
        if self.impl == "triton":
            p, y_dtype = self.dropout_p if self.training else 0.0, torch.promote_types(x.dtype, h.dtype)
            return kernels.fused_add_dropout_layer_norm(x, h, self.weight, self.bias, dropout_p=p, eps=self.eps,
                                                        branch_dtype=compute_dtype(y_dtype, x.device),
                                                        residual_in_fp32=self.residual_in_fp32)
        y = super().forward(x + F.dropout(h, self.dropout_p, self.training))
        y_branch = in_compute_dtype(y)
        return (y if self.residual_in_fp32 else y_branch), y_branch


class Block(nn.Module):
    """Post-LN block as in the paper's code: LayerNorm after each residual add, the branch's dropout before it.
    Takes and returns the residual stream x with its copy in the compute dtype, x_branch (see AddLayerNorm)."""

    def __init__(self, config):
        super().__init__()
        norm = (config.n_embd, config.layer_norm_epsilon, config.resid_pdrop, config.norm_impl,
                config.residual_in_fp32)
        self.attn = CausalSelfAttention(config)
        self.ln_1 = AddLayerNorm(*norm)
        self.mlp = MLP(config)
        self.ln_2 = AddLayerNorm(*norm)

    def forward(self, x, x_branch):
        x, x_branch = self.ln_1(x, self.attn(x_branch))
        return self.ln_2(x, self.mlp(x_branch))


class GPT1(nn.Module):
    def __init__(self, config: GPT1Config):
        super().__init__()
        self.config = config
        self.tokens_embed = nn.Embedding(config.vocab_size, config.n_embd)
        self.positions_embed = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self, exclude_positions=False):
        n = sum(numel(p) for p in self.parameters())
        return n - numel(self.positions_embed.weight) if exclude_positions else n

    def set_impl(self, attn_impl=None, loss_impl=None, norm_impl=None, residual_in_fp32=None, mlp_impl=None):
        """Switch the attention, loss, add-LayerNorm and bias + GELU kernels, and the residual stream's dtype under
        autocast, of a built model (the weights are unchanged); None keeps a setting."""
        changes = dict(attn_impl=attn_impl, loss_impl=loss_impl, norm_impl=norm_impl, mlp_impl=mlp_impl)
        changes = {k: v for k, v in changes.items() if v}
        if residual_in_fp32 is not None:
            changes["residual_in_fp32"] = residual_in_fp32
        cfg = GPT1Config.from_dict({**self.config.to_dict(), **changes})
        self.config = cfg
        for block in self.h:
            block.attn.attn_impl, block.mlp.c_fc.impl = cfg.attn_impl, cfg.mlp_impl
            for ln in (block.ln_1, block.ln_2):
                ln.impl, ln.residual_in_fp32 = cfg.norm_impl, cfg.residual_in_fp32
        return self

    def hidden_states(self, input_ids):
        """The final hidden states (B, T, C) of the decoder (there is no final LayerNorm)."""
        return self._decode(input_ids)[0]

    def _decode(self, input_ids):
        """The final hidden states in the residual stream's dtype and in the compute dtype (see AddLayerNorm)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
        T = input_ids.shape[1]
        if T > self.config.n_positions:
            raise ValueError(f"sequence length {T} exceeds n_positions={self.config.n_positions}")
        pos = torch.arange(T, device=input_ids.device)
        x = self.drop(self.tokens_embed(input_ids) + self.positions_embed(pos))  # (B, T, C)
        x_branch = in_compute_dtype(x)
        if not self.config.residual_in_fp32:
            x = x_branch
        for block in self.h:
            x, x_branch = block(x, x_branch)
        return x, x_branch

    def lm_logits(self, hidden):
        return F.linear(hidden, self.tokens_embed.weight)  # tied head: (B, T, V)

    def lm_loss(self, hidden, labels):
        """Mean cross-entropy of the tied LM head on `hidden` (..., C) against `labels` (...);
        returns (loss, logits), logits being None when the chosen kernel never materializes them."""
        impl = resolve_loss_impl(self.config.loss_impl, hidden.device)
        flat_h, flat_y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
        if impl == "triton_linear":
            return kernels.fused_linear_cross_entropy(flat_h, self.tokens_embed.weight, flat_y), None
        logits = self.lm_logits(hidden)
        if impl == "triton":
            # the kernel writes the gradient into the logits buffer, so they are not handed back
            loss = kernels.fused_cross_entropy(logits.view(-1, logits.shape[-1]), flat_y)
            return loss, (logits if not torch.is_grad_enabled() else None)
        return reference.cross_entropy(logits.view(-1, logits.shape[-1]), flat_y), logits

    def forward(self, input_ids, labels=None):
        """input_ids (B, T); labels (B, T) are the targets of each position, already shifted
        (labels[:, t] is the token after input_ids[:, t]), -100 where no loss is wanted."""
        hidden = self._decode(input_ids)[1]  # what the head computes with
        if labels is None:
            return GPT1Output(logits=self.lm_logits(hidden))
        loss, logits = self.lm_loss(hidden, labels)
        return GPT1Output(loss=loss, logits=logits)

    def param_groups(self, weight_decay):
        return param_groups(self, weight_decay)

    def flops_per_token(self, seq_len):
        """Training FLOPs per token: 6N for the matmuls plus 12*L*C*T for attention (PaLM appendix B)."""
        c = self.config
        return 6 * self.num_parameters(exclude_positions=True) + 12 * c.n_layer * c.n_embd * seq_len

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None):
        """Sample max_new_tokens after input_ids (B, T); temperature 0 means greedy."""
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be (B, T) with T >= 1, got shape {tuple(input_ids.shape)}")
        if not (isinstance(max_new_tokens, int) and max_new_tokens >= 0):
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        for _ in range(max_new_tokens):
            context = input_ids[:, -self.config.n_positions:]
            logits = self(context).logits[:, -1, :].float()
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                # shifted so that the largest is 0: a tiny temperature then sends the others to -inf, not all to inf
                logits = (logits - logits.amax(-1, keepdim=True)) / temperature
                probs = torch.softmax(filter_logits(logits, top_k, top_p), dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)
            input_ids = torch.cat([input_ids, nxt], dim=1)
        return input_ids


def numel(p):
    """A parameter's element count, also under ZeRO-3, whose partitioned parameters are empty tensors that keep
    their full count in ds_numel."""
    return getattr(p, "ds_numel", p.numel())


def param_groups(module, weight_decay):
    """Optimizer groups of `module`: weight decay on matrices and embeddings, none on biases and LayerNorm gains."""
    decay = [p for p in module.parameters() if p.dim() >= 2]
    no_decay = [p for p in module.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def filter_logits(logits, top_k=None, top_p=None):
    """Keep the top_k largest logits and the smallest set whose probability reaches top_p."""
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), -math.inf)
    return logits
