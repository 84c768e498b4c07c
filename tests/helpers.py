import torch


def assert_close(actual, expected, atol, rtol, name="tensor"):
    """torch.testing-style closeness check that reports how many elements are off and where."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    bad = ~torch.isclose(actual, expected, atol=atol, rtol=rtol, equal_nan=False)
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        worst = (actual - expected).abs().max().item()
        raise AssertionError(f"{name}: {int(bad.sum())}/{bad.numel()} elements off (max abs err {worst:.3g}, "
                             f"atol={atol}, rtol={rtol}); first bad indices {idx}")
