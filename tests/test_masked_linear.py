"""MaskedLinear's blocked product for prefix masks (autoregressive masks in their own order)."""

import pytest
import torch

from pixelchain.layers import MaskedLinear, prefix_blocks


def staircase(rows, cols, seed=0):
    """Row r connects the first n_r columns, n_r nondecreasing (some rows none, some all)."""
    lengths = torch.randint(0, cols + 1, (rows,), generator=torch.Generator().manual_seed(seed)).sort().values
    return (torch.arange(cols) < lengths.unsqueeze(1)).double()


@pytest.mark.parametrize("rows,cols", [(300, 200), (1000, 130), (130, 1000)])
def test_blocked_product_and_gradients_equal_the_dense_ones(rows, cols):
    torch.manual_seed(0)
    mask = staircase(rows, cols)
    layer = MaskedLinear(cols, rows, mask).double()
    assert layer.blocks() is not None
    x = torch.randn(7, 3, cols, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    dense = torch.nn.functional.linear(x, layer.weight * layer.mask, layer.bias)
    torch.testing.assert_close(y, dense)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, layer.weight, layer.bias), g)
    want = torch.autograd.grad(dense, (x, layer.weight, layer.bias), g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    assert (got[1][mask == 0] == 0).all()  # masked-out weights get exactly no gradient


def test_blocks_cover_every_connection_and_skip_about_half_of_a_triangle():
    d = torch.arange(784)
    triangle = (d.unsqueeze(0) < d.unsqueeze(1)).float()
    blocks = prefix_blocks(triangle)
    covered = torch.zeros_like(triangle)
    for r0, r1, dense, c in blocks:
        assert (triangle[r0:r1, :dense] == 1).all()  # the dense part needs no mask
        covered[r0:r1, :c] = 1
    assert (covered >= triangle).all()
    assert covered.sum() < 0.6 * triangle.numel()
    assert len(prefix_blocks(staircase(100_000, 20))) == 16  # a bounded number of products


def test_other_masks_take_the_dense_product():
    assert prefix_blocks(torch.ones(256, 256)) is None  # nothing to skip
    reversed_rows = staircase(256, 256).flip(0)  # prefixes, but shrinking down the rows
    assert prefix_blocks(reversed_rows) is None
    holes = staircase(256, 256)
    holes[200, 0] = 0
    assert prefix_blocks(holes) is None


def test_blocks_follow_the_mask_when_it_is_set():
    layer = MaskedLinear(256, 256, staircase(256, 256).float())
    assert layer.blocks() is not None
    assert set(layer.state_dict()) == {"weight", "bias"}  # the mask is derived by the model, never saved
    layer.set_mask(torch.ones(256, 256))
    assert layer.blocks() is None
    x = torch.randn(2, 256)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    layer.set_mask(staircase(256, 256, seed=1).float())
    assert layer.blocks() is not None


def test_blocked_product_under_autocast_runs_in_the_autocast_dtype():
    # bf16 autocast (``fit(amp=True)``) casts the blocked product's operands as it casts F.linear's
    torch.manual_seed(0)
    layer = MaskedLinear(200, 300, staircase(300, 200).float())
    x = torch.randn(16, 200, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        dense = torch.nn.functional.linear(x, layer.masked_weight(), layer.bias)
    assert y.dtype == dense.dtype == torch.bfloat16
    torch.testing.assert_close(y, dense, atol=0.05, rtol=0.02)
    (grad_w,) = torch.autograd.grad(y.float().sum(), layer.weight)
    assert grad_w.dtype == torch.float32 and (grad_w[layer.mask == 0] == 0).all()
    torch.testing.assert_close(grad_w, torch.autograd.grad(dense.float().sum(), layer.weight)[0], atol=0.1, rtol=0.02)
