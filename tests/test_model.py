"""The GPT-1 model: the paper's architecture, the presets, and every attention / loss kernel giving the
same model (same losses, same gradients, same training trajectory)."""

import pytest
import torch
from helpers import assert_close, grads_agree, replayed_dropout

from gpt1 import GPT1, GPT1Config, get_config
from gpt1.model import filter_logits

SMALL = dict(vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=2)


def small_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT1(GPT1Config(**{**SMALL, **overrides}))


def batch(B=2, T=16, V=100, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T + 1), generator=g)
    return ids[:, :-1].clone().to(device), ids[:, 1:].clone().to(device)


def test_paper_preset_has_117m_parameters():
    with torch.device("meta"):
        model = GPT1(get_config("gpt1", vocab_size=40478))
    cfg = model.config
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_inner, cfg.n_positions) == (12, 768, 12, 3072, 512)
    assert (cfg.embd_pdrop, cfg.attn_pdrop, cfg.resid_pdrop, cfg.layer_norm_epsilon) == (0.1, 0.1, 0.1, 1e-5)
    assert 116.0e6 < model.num_parameters() < 117.5e6  # "117M" in the paper
    assert not hasattr(model, "ln_f")  # post-LN: no final LayerNorm


@pytest.mark.parametrize("name", ["gpt1-mini", "gpt1-tiny"])
def test_small_presets_build(name):
    model = GPT1(get_config(name, vocab_size=100))
    assert model.config.n_inner == 4 * model.config.n_embd
    assert model.num_parameters() > 0


@pytest.mark.parametrize("bad, msg", [
    (dict(n_embd=30, n_head=4), "divisible"),
    (dict(attn_impl="nope"), "attn_impl"),
    (dict(loss_impl="nope"), "loss_impl"),
    (dict(norm_impl="nope"), "norm_impl"),
    (dict(residual_in_fp32="no"), "residual_in_fp32"),
    (dict(mlp_impl="nope"), "mlp_impl"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(attn_pdrop=1.0), "attn_pdrop"),
])
def test_config_rejects_bad_values(bad, msg):
    with pytest.raises(ValueError, match=msg):
        GPT1Config(**{**SMALL, **bad})


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown model preset"):
        get_config("gpt9")


def test_init_and_tied_head():
    model = small_model()
    assert model.lm_logits(torch.zeros(1, 32)).shape == (1, 100)
    assert all(b.abs().max() == 0 for n, b in model.named_parameters() if n.endswith("c_fc.bias"))
    w = model.h[0].mlp.c_fc.weight
    assert abs(w.std().item() - 0.02) < 0.004 and abs(w.mean().item()) < 0.002
    ids, _ = batch()
    logits = model(ids).logits
    assert logits.shape == (2, 16, 100)
    # the head is the token embedding: one (V, C) matrix in the model, and the logits are h @ E^T
    assert [tuple(p.shape) for p in model.parameters()].count((100, 32)) == 1
    model.eval()
    with torch.no_grad():
        assert_close(model(ids).logits, model.hidden_states(ids) @ model.tokens_embed.weight.T, atol=1e-5, rtol=0)


def test_post_layernorm_block_output_is_normalized():
    model = small_model().eval()
    ids, _ = batch()
    h = model.hidden_states(ids)  # the last op of the last block is ln_2, whose gain starts at 1
    assert_close(h.mean(-1), torch.zeros_like(h[..., 0]), atol=1e-5, rtol=0)
    assert_close(h.var(-1, unbiased=False), torch.ones_like(h[..., 0]), atol=1e-3, rtol=0)


def test_forward_without_labels_has_no_loss_and_matches_loss_with_labels():
    model = small_model().eval()
    ids, y = batch()
    out = model(ids)
    assert out.loss is None
    y[0, :3] = -100
    loss = model(ids, labels=y).loss
    keep = y != -100
    ref = torch.nn.functional.cross_entropy(out.logits[keep], y[keep])
    assert_close(loss, ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("attn_impl", ["eager", "sdpa", "triton"])
def test_causal(attn_impl, device):
    model = small_model(attn_impl=attn_impl).to(device).eval()
    ids, _ = batch(device=device)
    ids2 = ids.clone()
    ids2[:, 10:] = (ids2[:, 10:] + 1) % 100
    with torch.no_grad():
        a, b = model(ids).logits, model(ids2).logits
    assert_close(a[:, :10], b[:, :10], atol=1e-5, rtol=1e-5)
    assert (a[:, 10:] - b[:, 10:]).abs().max() > 1e-3


def test_sequence_longer_than_context_is_refused():
    model = small_model()
    with pytest.raises(ValueError, match="exceeds n_positions"):
        model(torch.zeros(1, 33, dtype=torch.long))


IMPLS = [("sdpa", "eager", "eager", "eager"), ("triton", "eager", "eager", "eager"),
         ("eager", "triton", "eager", "eager"), ("eager", "triton_linear", "eager", "eager"),
         ("sdpa", "eager", "triton", "eager"), ("sdpa", "eager", "eager", "triton"),
         ("triton", "triton_linear", "triton", "triton")]


def _tol(device):
    # fp32 throughout; on a GPU the kernels' fp32 dots follow torch's fp32 matmul precision (exact at the default
    # "highest", TF32 at "high"), and the tolerance leaves room for TF32 and the GPU's summation orders
    return dict(atol=1e-4, rtol=1e-4) if device == "cpu" else dict(atol=3e-3, rtol=3e-3)


@pytest.mark.parametrize("attn_impl, loss_impl, norm_impl, mlp_impl", IMPLS)
def test_kernels_give_the_same_loss_and_gradients(attn_impl, loss_impl, norm_impl, mlp_impl, device):
    ref = small_model(attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0).to(device)
    ours = small_model(attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0).to(device)
    ours.set_impl(attn_impl=attn_impl, loss_impl=loss_impl, norm_impl=norm_impl, mlp_impl=mlp_impl)
    ids, y = batch(device=device)
    y[1, 5:9] = -100
    losses = []
    for m in (ref, ours):
        loss = m(ids, labels=y).loss
        loss.backward()
        losses.append(loss)
    assert_close(losses[1], losses[0], **_tol(device))
    for (name, p), q in zip(ref.named_parameters(), ours.parameters()):
        assert_close(q.grad, p.grad, name=name, **_tol(device))


def test_short_attention_kernels_in_the_model(device, monkeypatch):
    """The model's attention through the short-sequence kernels (every launch config given a short entry; on a CPU
    the interpreter's has none): loss and every gradient as the eager model's, through the packed-qkv operator
    and its autograd as training runs them."""
    from kernels import attention

    calls = []
    launch = attention._launch_bwd_short
    monkeypatch.setattr(attention, "_launch_bwd_short", lambda *a, **k: calls.append(1) or launch(*a, **k))
    ref = small_model(attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0).to(device)
    ours = small_model(attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, attn_impl="triton").to(device)
    ids, y = batch(device=device)
    losses = []
    with attention.short_configs(dict(fwd=((128, 4, 1, 2),), bwd=((128, 4, 1, 2),))):
        for m in (ref, ours):
            loss = m(ids, labels=y).loss
            loss.backward()
            losses.append(loss)
    assert len(calls) == ours.config.n_layer  # every layer's backward took the short kernel
    assert_close(losses[1], losses[0], **_tol(device))
    for (name, p), q in zip(ref.named_parameters(), ours.parameters()):
        assert_close(q.grad, p.grad, name=name, **_tol(device))


@pytest.mark.parametrize("attn_impl, loss_impl, norm_impl, mlp_impl", [
    ("triton", "triton", "eager", "eager"), ("triton", "triton_linear", "triton", "triton")])
def test_kernels_follow_the_eager_training_trajectory(attn_impl, loss_impl, norm_impl, mlp_impl, device):
    """Twelve AdamW steps from the same weights on the same batches: the per-step losses stay together."""
    trajectories = []
    for impls in (("eager", "eager", "eager", "eager"), (attn_impl, loss_impl, norm_impl, mlp_impl)):
        model = small_model(attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0).to(device)
        model.set_impl(*impls[:3], mlp_impl=impls[3])
        opt = torch.optim.AdamW(model.param_groups(0.01), lr=1e-2)
        losses = []
        for step in range(12):
            ids, y = batch(B=2, T=32, seed=step % 4, device=device)  # four batches, seen three times
            loss = model(ids, labels=y).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        trajectories.append(torch.tensor(losses))
    eager, ours = trajectories
    assert eager[-1] < eager[0] - 0.3  # it learns
    assert_close(ours, eager, atol=2e-3 if device == "cpu" else 2e-2, rtol=0)


@pytest.mark.parametrize("dropout", ["attn", "resid"])
def test_kernel_dropout_trains_like_eager_dropout(dropout, device):
    """With dropout on, the Triton attention (or the fused add-LayerNorm) draws its own mask: losses differ per
    step, not on average."""
    ids, y = batch(B=4, T=32, device=device)
    means = []
    for impl in ("eager", "triton"):
        rates = dict(attn_pdrop=0.5, resid_pdrop=0.0) if dropout == "attn" else dict(attn_pdrop=0.0, resid_pdrop=0.5)
        impls = dict(attn_impl=impl) if dropout == "attn" else dict(norm_impl=impl)
        model = small_model(**rates, embd_pdrop=0.0, **impls).to(device).train()
        with torch.no_grad():
            means.append(torch.stack([model(ids, labels=y).loss for _ in range(40)]).mean())
        model.eval()
        with torch.no_grad():
            means.append(model(ids, labels=y).loss)
    assert_close(means[2], means[0], atol=0.02, rtol=0)  # the dropout-averaged training losses agree
    assert_close(means[3], means[1], atol=1e-4, rtol=1e-4)  # and in eval mode nothing is dropped


def test_generate_and_filter_logits():
    model = small_model().eval()
    ids = torch.tensor([[1, 2, 3]])
    out = model.generate(ids, max_new_tokens=5, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 8) and torch.equal(out[:, :3], ids)
    greedy = model.generate(ids, max_new_tokens=5, top_k=1)
    assert torch.equal(greedy, model.generate(ids, max_new_tokens=5, top_k=1))
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[True, False, False, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.5)).tolist() == [[True, False, True, True]]
    # generation runs past the context by keeping its last n_positions tokens
    long = model.generate(torch.zeros(1, 30, dtype=torch.long), max_new_tokens=10, top_k=1)
    assert long.shape == (1, 40)


@pytest.mark.parametrize("scale", ["small", "gpt1"])
@pytest.mark.parametrize("loss_impl", ["eager", "triton_linear"])
def test_kernel_attention_dropout_gives_the_gradients_of_its_mask(loss_impl, scale, device, monkeypatch):
    """The model's eager path with attention dropout: our kernels' loss and every parameter's gradient over
    three AdamW steps equal the eager reference's run with the same keep-masks replayed (the model-level twin
    of the kernel tests' mask replay: layouts, autograd and optimizer as training has them). "gpt1" (GPU only):
    two layers of GPT-1's width, heads and vocabulary at T=512 in bf16, the shapes and launch configurations of
    training."""
    if scale == "gpt1" and device != "cuda":
        pytest.skip("GPT-1 scale runs on a GPU")
    shape = {} if scale == "small" else dict(vocab_size=40478, n_positions=512, n_embd=768, n_layer=2, n_head=12)
    ids, y = batch(B=2, T=32, device=device) if scale == "small" else batch(B=8, T=512, V=40478, device=device)
    dtype = torch.float32 if scale == "small" else torch.bfloat16
    runs = []
    for mode in ("ours", "replay"):
        with monkeypatch.context() as mp:
            replayed_dropout(mp, mode)
            model = small_model(attn_pdrop=0.2, resid_pdrop=0.0, embd_pdrop=0.0, attn_impl="triton",
                                loss_impl=loss_impl if mode == "ours" else "eager", **shape).to(device, dtype)
            opt = torch.optim.AdamW(model.param_groups(0.01), lr=1e-3)
            losses, grads = [], []
            for _ in range(3):
                loss = model.train()(ids, labels=y).loss
                opt.zero_grad()
                loss.backward()
                grads.append([p.grad.clone() for p in model.parameters()])
                opt.step()
                losses.append(loss.detach().float())
            runs.append((losses, grads))
    (ours_l, ours_g), (ref_l, ref_g) = runs
    names = [n for n, _ in model.named_parameters()]
    for step in range(3):
        if dtype == torch.float32:
            assert_close(ours_l[step], ref_l[step], name=f"loss, step {step}", **_tol(device))
            for name, a, b in zip(names, ours_g[step], ref_g[step]):
                assert_close(a, b, name=f"{name}.grad, step {step}", **_tol(device))
        else:
            assert_close(ours_l[step], ref_l[step], name=f"loss, step {step}", atol=1e-2, rtol=0)
            for name, a, b in zip(names, ours_g[step], ref_g[step]):
                grads_agree(a, b, f"{name}.grad, step {step}")


@pytest.mark.parametrize("overrides, msg", [
    (dict(n_head=0), "n_head must be positive, got 0"),  # before the divisibility check divides by it
    (dict(n_embd=32.0), "n_embd must be an int, got 32.0"),
    (dict(n_embd="128"), "n_embd must be an int"),
    (dict(embd_pdrop="0.1"), "embd_pdrop must be a number"),
    (dict(layer_norm_epsilon=-1.0), "layer_norm_epsilon must be positive"),
    (dict(n_layer=True), "n_layer must be an int, got True"),
    (dict(initializer_range=-0.02), "initializer_range must be >= 0"),
    (dict(initializer_range=float("nan")), "initializer_range must be >= 0"),
])
def test_config_values_of_the_wrong_type_or_sign_are_refused(overrides, msg):
    with pytest.raises(ValueError, match=msg):
        get_config("gpt1-tiny", **overrides)


@pytest.mark.parametrize("kwargs, msg", [
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"), (dict(top_k=0), "top_k must be at least 1"),
    (dict(temperature=-1.0), "temperature must be >= 0"), (dict(max_new_tokens=-1), "max_new_tokens must be"),
])
def test_generate_refuses_bad_arguments(kwargs, msg):
    model = small_model().eval()
    with pytest.raises(ValueError, match=msg):
        model.generate(torch.tensor([[1, 2]]), **{"max_new_tokens": 2, **kwargs})
    with pytest.raises(ValueError, match="T >= 1"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), 2)


def test_generate_at_a_tiny_temperature_is_greedy():
    """logits / 1e-45 overflow float32 to inf (and softmax to NaN); the limit of sampling is the argmax."""
    model = small_model().eval()
    ids = torch.tensor([[1, 2, 3]])
    out = model.generate(ids, 6, temperature=1e-45, top_p=0.9, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, model.generate(ids, 6, temperature=0))


def test_input_ids_of_another_rank_are_refused():
    model = small_model().eval()
    for ids in (torch.zeros(4, dtype=torch.long), torch.zeros(2, 3, 4, dtype=torch.long)):
        with pytest.raises(ValueError, match=r"input_ids must be \(B, T\)"):
            model(ids)


def test_auto_attention_falls_back_to_sdpa_for_head_dims_the_kernel_lacks():
    from gpt1.model import resolve_attn_impl

    cuda = torch.device("cuda")
    assert resolve_attn_impl("auto", cuda, 64) == "triton" and resolve_attn_impl("auto", cuda, 24) == "sdpa"
    assert resolve_attn_impl("auto", torch.device("cpu"), 64) == "sdpa"
    assert resolve_attn_impl("triton", cuda, 24) == "triton"  # asked for: the kernel's own error says why not
