"""What a researcher naturally tries in the first hour works (issue 25): dead weights, scoring
one's own images, completion masks, eval mode on load, arrays out of the CLI, sampling controls,
discoverability, Python ergonomics and logs."""

import pytest
import torch

import pixelchain as pc
from pixelchain.run_dir import RunDir, load_tensors, save_tensors


def tiny_gated(num_layers=2):
    torch.manual_seed(0)
    return pc.create("gated_pixelcnn", (1, 6, 5), 2, channels=4, num_layers=num_layers, head_channels=4)


def test_gated_weights_of_earlier_versions_load_without_their_dead_residual(tmp_path):
    """Files written before the last layer lost its unused residual projection still load (those
    two tensors, and only those, are dropped); any other unexpected tensor is refused."""
    model = tiny_gated()
    pc.save(model, tmp_path)
    path = RunDir(tmp_path) / "model.safetensors"
    state, _ = load_tensors(path)
    save_tensors(path, {**state, "layers.2.residual.weight": torch.zeros(4, 4, 1, 1),
                        "layers.2.residual.bias": torch.zeros(4)})
    x = torch.randint(0, 2, (3, 1, 6, 5))
    assert torch.equal(pc.load(tmp_path).log_prob(x), model.eval().log_prob(x))
    save_tensors(path, {**state, "layers.1.extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="does not match"):
        pc.load(tmp_path)
