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
