"""Process settings: glibc's allocator thresholds and the device."""

import os
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


def test_thread_policy_gives_training_and_evaluation_the_free_cores_and_decoding_one(two_threads, monkeypatch):
    small, medium = runtime.TRAIN_PARALLEL_WORK - 1, runtime.TRAIN_PARALLEL_WORK
    monkeypatch.setattr(runtime.THREADS, "free_cores", lambda: 2.0)  # an idle 2-core machine
    assert runtime.threads_for(small, "train") == 1 and runtime.threads_for(medium, "train") == 2
    assert runtime.threads_for(medium, "evaluate") == 2 and runtime.threads_for(medium, "train", most=1) == 1
    assert runtime.threads_for(medium, "decode") == 1 and runtime.threads_for(runtime.PARALLEL_WORK, "decode") == 2
    monkeypatch.setattr(runtime.THREADS, "free_cores", lambda: 1.2)  # another process holds a core
    assert runtime.threads_for(medium, "train") == 1 and runtime.threads_for(medium, "evaluate") == 1
    assert runtime.threads_for(runtime.PARALLEL_WORK, "decode") == 2  # decoding does not look
    monkeypatch.setattr(runtime.THREADS, "free_cores", lambda: None)  # no /proc: the process's setting
    assert runtime.threads_for(medium, "train") == 2
    with pytest.raises(ValueError, match="unknown task"):
        runtime.threads_for(medium, "sampling")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/stat")
def test_free_cores_reads_a_number_of_cores():
    free = runtime.FreeCores(interval=0.0)
    for _ in range(2):
        assert 0.0 <= free() <= os.cpu_count()


@pytest.mark.parametrize("free, train_work, expected", [(2.0, 0.0, 2), (2.0, float("inf"), 1), (1.0, 0.0, 1)])
def test_fit_trains_at_the_policys_threads_and_restores_the_setting(two_threads, monkeypatch, free, train_work,
                                                                    expected):
    import pixelchain as pc
    from pixelchain import train
    from pixelchain.data import ImageDataset

    monkeypatch.setattr(runtime.THREADS, "train_work", train_work)
    monkeypatch.setattr(runtime.THREADS, "free_cores", lambda: free)
    monkeypatch.setattr(train, "THREADS_RECHECK", 0.0)  # asked again at every step
    images = torch.randint(0, 2, (8, 1, 3, 3))
    model = pc.create("pixelcnn", (1, 3, 3), 2, channels=4, num_blocks=1, head_channels=4)
    seen = []

    def penalty(m):
        seen.append(torch.get_num_threads())
        return torch.zeros(())

    pc.fit(model, ImageDataset(images, 2, name="tiny"), None, epochs=2, batch_size=2, penalty=penalty)
    assert set(seen) == {expected} and torch.get_num_threads() == 2


def test_amp_trains_in_bf16_only_where_supported_and_reports_fp32(monkeypatch):
    import pixelchain as pc
    from pixelchain.data import ImageDataset
    from pixelchain.train import Trainer, TrainOptions

    assert not runtime.bf16_supported(torch.device("meta"))
    images = torch.randint(0, 2, (8, 1, 3, 3))
    data = ImageDataset(images, 2, name="tiny")
    model = pc.create("pixelcnn", (1, 3, 3), 2, channels=4, num_blocks=1, head_channels=4)
    for supported in (False, True):
        monkeypatch.setattr(runtime, "bf16_supported", lambda device, s=supported: s)
        trainer = Trainer(model, data, None, TrainOptions(amp=True, epochs=1, batch_size=4))
        assert trainer.autocast._enabled == supported
    pc.fit(model, data, None, epochs=1, batch_size=4, amp=True)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.log_prob(images).dtype == torch.float32


def test_bf16_is_the_default_and_runs_recorded_before_it_resume_in_fp32():
    from pixelchain.train import TrainOptions

    assert TrainOptions().amp
    assert TrainOptions.recorded({"lr": 1e-3, "batch_size": 64})["amp"] is False  # recorded before amp existed
    assert TrainOptions.recorded({"lr": 1e-3, "amp": True})["amp"] is True
    assert "amp" not in TrainOptions.recorded({})
