"""Process settings: glibc's allocator thresholds and the device."""

import sys

import pytest
import torch

from pixelchain import runtime


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_allocator_thresholds_are_pinned_and_reported(monkeypatch):
    assert runtime.configure_allocator(256 << 20, 512 << 20)
    assert runtime.allocator_pinned() == (256 << 20, 512 << 20)
    assert runtime.configure_allocator()  # the defaults: 1 GiB / 2 GiB, accepted by glibc
    assert runtime.allocator_pinned() == (1 << 30, 2 << 30)
    monkeypatch.setenv("PIXELCHAIN_DEFAULT_MALLOC", "1")
    assert not runtime.configure_allocator()


def test_pick_device():
    assert runtime.pick_device("cpu") == torch.device("cpu")
    assert runtime.pick_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def test_threads_restored_also_on_errors(two_threads):
    with runtime.intra_op_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError), runtime.intra_op_threads(1):
        raise RuntimeError
    assert torch.get_num_threads() == 2
    assert runtime.threads_for(1) == 1 and runtime.threads_for(runtime.PARALLEL_WORK) == 2


def test_decoding_runs_small_steps_at_one_thread_and_restores_the_setting(two_threads):
    """A cached step's ops are tiny: one thread inside the loop (barriers stall under load), the
    caller's setting afterwards, also when the policy raises."""
    import pixelchain as pc
    from pixelchain.decode import Sample, decode

    model = pc.create("pixelcnn", (1, 3, 3), 2, channels=4, num_blocks=1, head_channels=4).eval()
    seen = []

    def policy(log_probs, c, h, w):
        seen.append(torch.get_num_threads())
        return Sample(torch.Generator().manual_seed(0))(log_probs, c, h, w)

    decode(model, torch.zeros(2, 1, 3, 3, dtype=torch.long), policy)
    assert set(seen) == {1} and torch.get_num_threads() == 2

    def failing(log_probs, c, h, w):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        decode(model, torch.zeros(2, 1, 3, 3, dtype=torch.long), failing)
    assert torch.get_num_threads() == 2
    model.log_prob(torch.zeros(2, 1, 3, 3, dtype=torch.long))
    assert torch.get_num_threads() == 2
    x = model.sample(2, generator=torch.Generator().manual_seed(0))  # its small ops around decode() too
    model.complete(x, torch.rand(2, 1, 3, 3, generator=torch.Generator().manual_seed(1)) < 0.5)
    assert torch.get_num_threads() == 2
