"""Classifiers: their own registry, the one trainer, safetensors + JSON checkpoints, input checks."""

import pytest
import torch

import pixelchain as pc
from pixelchain.data import ImageDataset

TINY = {
    "logistic_regression": {},
    "resnet": {"widths": (2, 3, 4), "blocks_per_stage": 1},
    "vgg": {"widths": (4, 6), "hidden": 8},
}


def toy_set(n=64, shape=(1, 8, 8), K=16, seed=0):
    """Two classes a classifier can tell apart: bright top half vs bright bottom half."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    x = torch.randint(0, K // 4, (n, *shape), generator=g)
    half = shape[1] // 2
    x[labels == 0, :, :half] += K // 2
    x[labels == 1, :, half:] += K // 2
    return ImageDataset(name="toy", images=x, num_levels=K, labels=labels)


def test_the_registries_are_separate():
    assert set(TINY) == set(pc.classifiers.list_classifiers()), "add every classifier to TINY"
    assert not set(pc.classifiers.list_classifiers()) & set(pc.list_models())
    with pytest.raises(ValueError, match="unknown model"):
        pc.create("resnet", (1, 8, 8), 16)


@pytest.mark.parametrize("name", sorted(TINY))
def test_trains_with_fit_and_round_trips(name, tmp_path):
    data = toy_set()
    torch.manual_seed(0)
    model = pc.classifiers.create(name, data.image_shape, data.num_levels, num_classes=2, **TINY[name])
    before = pc.evaluate(model, data)["nll"]
    pc.fit(model, data, data, run_dir=tmp_path / "run", epochs=6, batch_size=16, lr=0.02, progress=False)
    after = pc.evaluate(model, data)
    assert after["nll"] < before
    assert after["accuracy"] > 0.9
    loaded = pc.load(tmp_path / "run").eval()
    model.eval()
    torch.testing.assert_close(loaded.log_prob(data.images, data.labels), model.log_prob(data.images, data.labels))
    assert loaded.name == name
    # logits_from_unit is forward on [0, 1] floats, and differentiable with respect to them
    u = (data.images[:4].double() / (data.num_levels - 1)).requires_grad_()
    logits = loaded.double().logits_from_unit(u)
    torch.testing.assert_close(logits, loaded(data.images[:4]))
    logits.sum().backward()
    assert u.grad is not None and u.grad.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(TINY))
def test_bad_input(name):
    model = pc.classifiers.create(name, (1, 8, 8), 16, num_classes=2, **TINY[name])
    with pytest.raises(ValueError, match="shape"):
        model.predict(torch.zeros(2, 1, 8, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="values must lie"):
        model.predict(torch.full((2, 1, 8, 8), 16))
    with pytest.raises(ValueError, match="integer levels"):
        model.predict(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="labels"):
        model.log_prob(torch.zeros(2, 1, 8, 8, dtype=torch.long), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="no hyperparameter"):
        pc.classifiers.create(name, (1, 8, 8), 16, channels=3)


def test_resnet32_layout():
    """The default ResNet is the paper's ResNet-32: a stem, 3 stages of 5 blocks of 2 convs, a linear layer."""
    model = pc.classifiers.create("resnet", (1, 28, 28), 256)
    convs = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and "shortcut" not in n]
    assert len(convs) + 1 == 32
    assert [b.conv2.out_channels for b in model.blocks][::5] == [4, 8, 16]
    assert model(torch.zeros(3, 1, 28, 28, dtype=torch.long)).shape == (3, 10)


def test_shipped_logistic_regression_still_loads_and_scores():
    model = pc.load("logistic_regression_mnist")
    assert model.name == "logistic_regression" and model.kind == "classifier"
    x = torch.zeros(2, 1, 28, 28, dtype=torch.long)
    assert model.predict(x).shape == (2,)
    assert torch.isfinite(model.log_prob(x, torch.tensor([0, 1]))).all()


def test_augment_mirrors_and_shifts_each_image_by_a_drawn_amount():
    """Every augmented image is its original, mirrored or not, moved by at most 2 pixels with
    zeros filling the border; the draws vary across a batch and repeat with the generator's seed."""
    from pixelchain.data.transforms import augment

    x = torch.randint(1, 16, (64, 1, 6, 7))

    def moved(image, flip, dy, dx):
        out = torch.zeros_like(image)
        src = image.flip(2) if flip else image
        H, W = image.shape[1:]
        out[:, max(0, dy):H + min(0, dy), max(0, dx):W + min(0, dx)] = \
            src[:, max(0, -dy):H + min(0, -dy), max(0, -dx):W + min(0, -dx)]
        return out

    out = augment(x, torch.Generator().manual_seed(3))
    seen = set()
    for image, aug in zip(x, out, strict=True):
        found = [(f, dy, dx) for f in (0, 1) for dy in range(-2, 3) for dx in range(-2, 3)
                 if torch.equal(moved(image, f, dy, dx), aug)]
        assert len(found) == 1, "each output is exactly one flip and shift of its image"
        seen.add(found[0])
    assert len(seen) > 10
    assert torch.equal(augment(x, torch.Generator().manual_seed(3)), out)


def test_fit_augments_classifiers_and_refuses_density_models(tmp_path):
    data = toy_set()
    torch.manual_seed(0)
    model = pc.classifiers.create("resnet", data.image_shape, data.num_levels, num_classes=2, **TINY["resnet"])
    pc.fit(model, data, data, run_dir=tmp_path / "run", epochs=6, batch_size=16, lr=0.02, augment=True,
           progress=False)
    assert pc.evaluate(model, data)["accuracy"] > 0.8  # the toy's top/bottom cue survives flips and shifts
    assert pc.load(tmp_path / "run").name == "resnet"
    density = pc.create("fully_visible", data.image_shape, data.num_levels)
    with pytest.raises(ValueError, match="augment applies to classifiers"):
        pc.fit(density, data, None, epochs=1, augment=True, progress=False)
