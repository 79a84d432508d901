"""A benchmark run told to leave BENCHMARKS.md alone (--no-write) leaves its figures alone too."""

from argparse import Namespace
from pathlib import Path

from benchmarks.common import figures_dir


def test_no_write_draws_into_the_work_dir(tmp_path):
    shown = tmp_path / "docs" / "figures"
    assert figures_dir(Namespace(no_write=False, work_dir=str(tmp_path / "w"), figures_dir=str(shown))) == shown
    elsewhere = figures_dir(Namespace(no_write=True, work_dir=str(tmp_path / "w"), figures_dir=str(shown)))
    assert elsewhere == Path(tmp_path / "w" / "figures") and shown not in elsewhere.parents
