"""PixelRNN (Row LSTM, Diagonal BiLSTM) and Transformer: what the shared property tests don't cover.

Receptive fields are read off gradients: the parameters of dimension (c, i, j) depend on input
dimension (c', a, b) iff the gradient there is non-zero (random double-precision weights, so no
dependence cancels by accident; layers wide enough that the output ReLUs are never all off). The
models take the float image directly (``unit`` keeps it).
"""

import pytest
import torch

import pixelchain as pc
from pixelchain.decode import Sample, decode
from pixelchain.layers import skew, unskew


def build(name, image_shape, K=2, **hparams):
    torch.manual_seed(0)
    return pc.create(name, image_shape, K, **hparams).double().eval()


def field(model, c, i, j):
    """bool [C, H, W]: the input dimensions that the parameters of dimension (c, i, j) depend on
    (Bernoulli head: parameter c of pixel (i, j))."""
    u = torch.rand(1, *model.image_shape, dtype=torch.float64, requires_grad=True)
    model(u)[0, c, i, j].backward()
    return u.grad[0] != 0


def earlier(image_shape, c, i, j):
    """bool [C, H, W]: the dimensions before (c, i, j) in raster order, channels inside a pixel."""
    C, H, W = image_shape
    return torch.tensor([[[(a, b, cc) < (i, j, c) for b in range(W)] for a in range(H)] for cc in range(C)])


@pytest.mark.parametrize("shape", [(1, 2, 5), (3, 7, 4), (2, 3, 1, 1)])
def test_skew_round_trip(shape):
    x = torch.randn(*shape) if len(shape) == 4 else torch.randn(2, *shape)
    B, C, H, W = x.shape
    s = skew(x)
    assert s.shape == (B, C, H, W + H - 1)
    for i in range(H):  # row i moved right by i, zeros around it
        torch.testing.assert_close(s[:, :, i, i : i + W], x[:, :, i], rtol=0, atol=0)
        assert s[:, :, i, :i].eq(0).all() and s[:, :, i, i + W :].eq(0).all()
    assert torch.equal(unskew(s), x)


@pytest.mark.parametrize("image_shape,num_layers", [((1, 5, 8), 1), ((3, 4, 6), 2)])
def test_diagonal_bilstm_sees_every_earlier_dimension(image_shape, num_layers):
    """No blind spot, already with one layer: (c, i, j) depends on exactly the dimensions before it
    (all of the row above too, its last pixel included)."""
    model = build("diagonal_bilstm", image_shape, channels=8, num_layers=num_layers)
    C, H, W = image_shape
    for i in range(H):
        for j in range(W):
            for c in range(C):
                assert torch.equal(field(model, c, i, j), earlier(image_shape, c, i, j)), (c, i, j)


def test_row_lstm_field_is_a_triangle():
    """Row LSTM, L layers, kernel k (r = k // 2), first convolution 7 x 7 (reach 3). Pixel (i, j)
    sees, in its own row, columns j - 3 - L r .. j - 1; in row i - d above it (d >= 1) columns
    j - 3 - (L + d) r .. j + 3 + (d - 1) r: a cone widening by r per row, with blind spots to the
    far left of its row and to the upper right."""
    L, k, (H, W) = 2, 3, (7, 15)
    r = k // 2
    model = build("row_lstm", (1, H, W), channels=8, num_layers=L, kernel_size=k)
    cols = torch.arange(W)
    for i in range(H):
        for j in range(W):
            expected = torch.zeros(H, W, dtype=torch.bool)
            expected[i] = (cols >= j - 3 - L * r) & (cols < j)
            for d in range(1, i + 1):
                expected[i - d] = (cols >= j - 3 - (L + d) * r) & (cols <= j + 3 + (d - 1) * r)
            assert torch.equal(field(model, 0, i, j)[0], expected), (i, j)


@pytest.mark.parametrize("image_shape,K", [((1, 6, 5), 2), ((3, 3, 4), 5)])
def test_transformer_kv_cache_equals_full_forward_float32(image_shape, K):
    model = pc.create("transformer", image_shape, K, dim=16, num_layers=2, num_heads=4).eval()
    x = torch.randint(0, K, (3, *image_shape), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model.head.log_prob(model(x), x)  # [B, C, H, W]
        decoder = model.decoder(x)
        for step, (c, i, j) in enumerate(model.decoding_order()):
            log_probs = decoder.conditional(step, c, i, j)  # [B, K]
            cached = log_probs.gather(1, x[:, c, i, j, None])[:, 0]
            torch.testing.assert_close(cached, full[:, c, i, j], rtol=0, atol=1e-5)
            decoder.final(step, c, i, j)


@pytest.mark.parametrize("name", ["row_lstm", "diagonal_bilstm", "transformer"])
def test_float32_cached_sampling_matches_naive(name):
    """The default dtype: cached and naive decoding give the same samples."""
    hparams = {"dim": 8, "num_heads": 2} if name == "transformer" else {"channels": 4}
    torch.manual_seed(0)
    model = pc.create(name, (3, 4, 5), 3, num_layers=2, **hparams).eval()
    start = torch.zeros(2, 3, 4, 5, dtype=torch.long)
    a = decode(model, start, Sample(torch.Generator().manual_seed(1)))
    b = decode(model, start, Sample(torch.Generator().manual_seed(1)), naive=True)
    assert torch.equal(a, b)


def test_bad_hyperparameters():
    with pytest.raises(ValueError, match="kernel_size"):
        pc.create("row_lstm", (1, 4, 4), 2, kernel_size=4)
    with pytest.raises(ValueError, match="num_heads"):
        pc.create("transformer", (1, 4, 4), 2, dim=10, num_heads=4)
