"""Hugging Face interop: our weights as an `OpenAIGPTLMHeadModel` directory, and back.

HF's GPT-1 stores its projections as Conv1D, (in, out); ours are nn.Linear, (out, in). HF's "gelu"
for this model is the tanh approximation, the one the paper and our model use.
"""

import json
import os

import torch

from .config import GPT1Config
from .errors import GPT1Error, reason
from .model import GPT1

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def hf_config(cfg: GPT1Config):
    from transformers import OpenAIGPTConfig

    if cfg.n_inner != 4 * cfg.n_embd:
        raise GPT1Error(f"HF's OpenAIGPT has no n_inner: it needs n_inner == 4 * n_embd, got {cfg.n_inner}")
    return OpenAIGPTConfig(vocab_size=cfg.vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd,
                           n_layer=cfg.n_layer, n_head=cfg.n_head, afn="gelu", embd_pdrop=cfg.embd_pdrop,
                           attn_pdrop=cfg.attn_pdrop, resid_pdrop=cfg.resid_pdrop,
                           layer_norm_epsilon=cfg.layer_norm_epsilon, initializer_range=cfg.initializer_range)


def save_hf(model: GPT1, out_dir, tokenizer=None):
    """Write `out_dir` so that OpenAIGPTLMHeadModel.from_pretrained(out_dir) gives our logits. A directory that
    holds a run (checkpoint.holds_run) is refused; an earlier export is written over."""
    from transformers import OpenAIGPTLMHeadModel

    from .checkpoint import refuse_to_write_over

    refuse_to_write_over(out_dir, ("Hugging Face",), "export into another directory")

    state = {}
    for k, v in model.state_dict().items():
        state["transformer." + k] = (v.t() if k.endswith(CONV1D) else v).detach().float().cpu().contiguous()
    hf = OpenAIGPTLMHeadModel(hf_config(model.config))
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the token embedding
    if missing or unexpected:
        raise GPT1Error(f"weights do not map onto OpenAIGPTLMHeadModel: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    hf.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_hf(out_dir, model.config.n_positions)


def read_state_dict(path):
    from safetensors.torch import load_file

    for name in ("model.safetensors", "pytorch_model.bin"):
        f = os.path.join(path, name)
        if os.path.isfile(f):
            try:
                if name.endswith(".safetensors"):
                    return load_file(f)
                return torch.load(f, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - a truncated or foreign file: whatever the reader raised, name it
                raise GPT1Error(f"{f} cannot be read: {reason(e)}") from None
    raise GPT1Error(f"{path} holds neither model.safetensors nor pytorch_model.bin")


def load_hf(path, **overrides):
    """A GPT1 from an HF OpenAIGPT directory (ours, the public openai-gpt layout, with or without the `transformer.`
    key prefix, or a double-heads model's, without its multiple-choice head); `overrides` set config fields such
    as attn_impl."""
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise GPT1Error(f"{path} is not a Hugging Face model directory (no config.json)")
    with open(cfg_file) as f:
        try:
            hf = json.load(f)
        except ValueError as e:
            raise GPT1Error(f"{cfg_file} is not JSON: {e}") from None
    if not isinstance(hf, dict):
        raise GPT1Error(f"{cfg_file} is not a model config (a JSON object)")
    keys = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "embd_pdrop", "attn_pdrop", "resid_pdrop",
            "layer_norm_epsilon", "initializer_range")
    cfg = GPT1Config(**{**{k: hf[k] for k in keys if k in hf}, **overrides})
    if hf.get("afn", "gelu") != "gelu":
        raise GPT1Error(f"{cfg_file}: activation {hf['afn']!r} is not GPT-1's GELU")
    state = {}
    for k, v in read_state_dict(path).items():
        k = k.removeprefix("transformer.")
        if k.startswith("multiple_choice_head.") or k.endswith((".attn.bias", "position_ids")):
            continue  # the double-heads model's classifier (not the LM's), HF's mask/position buffers
        state[k] = v.t() if k.endswith(CONV1D) else v
    state = tied_head(state, path)
    model = GPT1(cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise GPT1Error(f"{path}: weights do not match its config.json: {reason(e)}") from None
    return model.eval()  # as from_pretrained does


def tied_head(state, path):
    """`state` without lm_head.weight, which must be the token embedding: our head has no weights of its own. HF's
    double-heads model ties the other way and saves the matrix as lm_head.weight alone."""
    head = state.pop("lm_head.weight", None)
    if head is None:
        return state
    if "tokens_embed.weight" not in state:
        return {**state, "tokens_embed.weight": head}
    if not torch.equal(head, state["tokens_embed.weight"]):
        raise GPT1Error(f"{path}: its LM head (lm_head.weight) is not tied to the token embedding, as GPT-1's is "
                        "(tie_word_embeddings false?): our model cannot hold it")
    return state
