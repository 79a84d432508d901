"""PixelCNN's blind spot and the Gated PixelCNN without one, read off gradients (as in
test_pixelrnn_transformer.py): with L masked 3 x 3 layers (a type-A input layer, then L - 1
type-B ones), the parameters at (i, j) depend on

* PixelCNN: row i, columns j - L .. j - 1; row i - d (1 <= d <= L), columns j - L .. j + d. The
  field widens by one column to the right per row up: the pixels above and to the right of that
  diagonal are the blind spot of van den Oord et al. (2016b), Figure 1;
* Gated PixelCNN: row i, columns j - L .. j - 1; rows i - L - 1 .. i - 1 (its vertical stack sees
  the current row, and reaches the horizontal one shifted down a row), columns j - L .. j + L: the
  whole rectangle, no blind spot.
"""

import pytest
import torch
from test_pixelrnn_transformer import build, field

L, H, W = 3, 7, 9


def expected_field(i: int, j: int, gated: bool) -> torch.Tensor:
    cols, out = torch.arange(W), torch.zeros(H, W, dtype=torch.bool)
    out[i] = (cols >= j - L) & (cols < j)
    for d in range(1, min(L + gated, i) + 1):
        out[i - d] = (cols >= j - L) & (cols <= j + (L if gated else d))
    return out


@pytest.mark.parametrize("name", ["pixelcnn", "gated_pixelcnn"])
def test_receptive_field(name):
    if name == "pixelcnn":
        model = build(name, (1, H, W), channels=32, num_blocks=L - 1, kernel_size=3, input_kernel_size=3,
                      head_channels=32)
    else:
        model = build(name, (1, H, W), channels=32, num_layers=L - 1, kernel_size=3, input_kernel_size=3,
                      head_channels=32)
    for i in range(H):
        for j in range(W):
            assert torch.equal(field(model, 0, i, j)[0], expected_field(i, j, name == "gated_pixelcnn")), (i, j)


@pytest.mark.parametrize("groups", [1, 3])
def test_pointwise_convolutions_as_matrix_products_equal_conv2d(groups):
    """A 1x1 CausalConv2d on one pixel per image (cached decoding) runs as one matrix product: same
    values, same gradients as the convolution."""
    from pixelchain.layers import pointwise_conv

    torch.manual_seed(0)
    conv = pointwise_conv(6, 9, groups).double()
    x = torch.randn(6, 4, 1, 1, dtype=torch.float64).transpose(0, 1).requires_grad_()  # not contiguous
    y = conv(x)
    reference = torch.nn.functional.conv2d(x, conv.masked_weight(), conv.bias)
    torch.testing.assert_close(y, reference)
    g = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad(y, (x, conv.weight, conv.bias), g),
                         torch.autograd.grad(reference, (x, conv.weight, conv.bias), g), strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name, sizes", [("pixelcnn", {"num_blocks": 2}), ("gated_pixelcnn", {"num_layers": 2})])
def test_dropout_only_in_training(name, sizes):
    """``dropout`` adds no parameters and changes nothing in evaluation (the exact likelihood);
    in training it perturbs the parameters of the conditionals."""
    plain = build(name, (1, 6, 5), channels=8, **sizes)
    dropped = build(name, (1, 6, 5), channels=8, dropout=0.5, **sizes)
    dropped.load_state_dict(plain.state_dict())
    x = torch.randint(0, 2, (4, 1, 6, 5))
    torch.testing.assert_close(dropped.log_prob(x), plain.log_prob(x), rtol=0, atol=0)
    assert not torch.equal(dropped.train()(x), plain(x))
    # still autoregressive in training: under the same dropout draw, a pixel changes no earlier pixel's
    # parameters
    changed = x.clone()
    changed[:, 0, 3, 2] = 1 - changed[:, 0, 3, 2]
    torch.manual_seed(1)
    before = dropped(x)
    torch.manual_seed(1)
    after = dropped(changed)
    assert torch.equal(before.flatten(2)[..., : 3 * 5 + 2], after.flatten(2)[..., : 3 * 5 + 2])
    assert not torch.equal(before, after)


@pytest.mark.parametrize("channels", [1, 3])
def test_gated_forward_runs_the_vertical_stack_a_row_down(channels):
    """The teacher-forced pass computes the vertical stack already shifted down a row (and never its
    last row); the cached decoder computes it unshifted, row by row, and shifts it. Both give the
    same parameters and gradients, with class conditioning too."""
    from pixelchain.models.pixelcnn import down_shift

    torch.manual_seed(0)
    model = build("gated_pixelcnn", (channels, 5, 6), channels=6, num_layers=2, num_classes=3).double()
    x = torch.randint(0, 2, (4, channels, 5, 6))
    labels = torch.tensor([0, 2, 1, 2])
    image = model.image(x)
    reference = model.horizontal_stack(
        image, [down_shift(pre) for pre in model.vertical_stack(image, labels)], labels)
    got = model(x, labels)
    torch.testing.assert_close(got, reference)
    g = torch.randn_like(got)
    params = list(model.parameters())  # the last layer's residual is unused: its gradients are None
    for a, b in zip(torch.autograd.grad(got, params, g, allow_unused=True),
                    torch.autograd.grad(reference, params, g, allow_unused=True), strict=True):
        torch.testing.assert_close(a, b)
