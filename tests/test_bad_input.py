"""A table of bad values through every command and API entry point: each gets a one-line error
naming the problem and a non-zero exit (ValueError and kin from Python), never a traceback, and
nothing is written or overwritten."""

import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch

import pixelchain as pc
from pixelchain.cli import main


def png_header(width, height):
    """A PNG whose header claims width x height 1-bit pixels, with no image data after it."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    chunk = lambda kind, body: struct.pack(">I", len(body)) + kind + body + struct.pack(  # noqa: E731
        ">I", zlib.crc32(kind + body))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A density model and a classifier on the digits, and files good and bad."""
    root = tmp_path_factory.mktemp("world")
    test = pc.data.load("digits", "test")
    pc.save(pc.create("fully_visible", (1, 8, 8), 17), root / "model", dataset={"name": "digits"})
    pc.save(pc.classifiers.create("logistic_regression", (1, 8, 8), 17, num_classes=10), root / "clf",
            dataset={"name": "digits"})
    np.save(root / "x.npy", test.images[:4].numpy().astype(np.uint8))
    np.save(root / "y.npy", test.labels[:4].numpy())
    (root / "bomb").mkdir()
    (root / "bomb" / "big.png").write_bytes(png_header(100_000, 100_000))
    header = b"{'descr': '<i8', 'fortran_order': False, 'shape': (1000000000000,), }"
    header += b" " * (63 - len(header) % 64) + b"\n"
    (root / "crafted.npy").write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + b"\0" * 64)
    (root / "nested").mkdir()
    (root / "nested" / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    (root / "floats.npy").write_bytes(b"")
    np.save(root / "floats.npy", np.zeros((2, 8, 8), np.float32))
    np.savez(root / "levels.npz", images=np.zeros((5, 8, 8), np.uint8), num_levels=np.array([1, 2]))
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("no images here")
    (root / "broken").mkdir()
    (root / "broken" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return root


def cases(root):
    m, c, x, y, out = str(root / "model"), str(root / "clf"), str(root / "x.npy"), str(root / "y.npy"), str(root / "o")
    new = str(root / "new_run")
    train = ["train", "fully_visible", "--run-dir", new, "--max-steps", "1", "--no-figures"]
    return [
        # train
        train + ["--dataset", "nonsense"],
        train + ["--dataset", str(root / "notes")],
        train + ["--dataset", str(root / "bomb")],
        train + ["--dataset", str(root / "crafted.npy")],
        train + ["--dataset", str(root / "floats.npy")],
        train + ["--dataset", str(root / "broken")],
        train + ["--dataset", str(root / "levels.npz")],
        train + ["--set", "hidden=" + "[" * 3000 + "]" * 3000],
        train + ["--num-levels", "1"],
        train + ["--num-levels", "1000"],
        train + ["--binarize", "threshold", "--num-levels", "4"],
        train + ["--resize", "8x8"],
        train + ["--epochs", "0"],
        train + ["--batch-size", "0"],
        train + ["--lr", "nan"],
        train + ["--lr", "-1"],
        train + ["--ema", "1"],
        train + ["--ema", "0"],
        train + ["--set", "hidden=10**12"],
        ["train", "pixelcnn", "--run-dir", new, "--set", "kernel_size=4"],
        ["train", "pixelcnn", "--run-dir", new, "--set", "kernel_size=0"],
        ["train", "pixelcnn", "--run-dir", new, "--set", "kernel_size=-3"],
        ["train", "gated_pixelcnn", "--run-dir", new, "--set", "kernel_size=2"],
        ["train", "row_lstm", "--run-dir", new, "--set", "kernel_size=2"],
        ["train", "made", "--run-dir", new, "--set", "hidden=3000000000"],
        ["train", "nade", "--run-dir", new, "--set", "hidden=[[1]]"],
        ["train", "fully_visible", "--run-dir", m],  # a saved model: refused
        ["train", "fully_visible", "--run-dir", m, "--resume"],  # nothing to resume
        ["train", "fully_visible", "--run-dir", new, "--resume"],
        # eval
        ["eval", str(root / "nowhere")],
        ["eval", str(root / "nested")],
        ["eval", m, "--split", "bogus"],
        ["eval", m, "--dataset", "nonsense"],
        ["eval", m, "--dataset", "mnist"],  # another image shape
        ["eval", m, "--device", "nonsense"],
        # sample
        ["sample", m, "-n", "0", "--out", out + ".png"],
        ["sample", m, "-n", "10000000", "--out", out + ".png"],
        ["sample", m, "--temperature", "nan", "--out", out + ".png"],
        ["sample", m, "--temperature", "-1", "--out", out + ".png"],
        ["sample", m, "--label", "3", "--out", out + ".png"],
        ["sample", m, "--batch-size", "0", "--out", out + ".png"],
        ["sample", m, "--out", str(root / "no" / "such" / "dir.png")],
        ["sample", c, "--out", out + ".png"],
        # complete
        ["complete", m, "-n", "0", "--out", out + ".png"],
        ["complete", m, "-n", "100000", "--out", out + ".png"],
        ["complete", m, "--per-image", "10000000", "--out", out + ".png"],
        ["complete", m, "--split", "bogus", "--out", out + ".png"],
        # attack
        ["attack", c, x, "--labels", y, "--eps", "-1", "--out", out],
        ["attack", c, x, "--labels", y, "--grid", "0", "--out", out],
        ["attack", c, x, "--labels", y, "--grid", "-2", "--out", out],
        ["attack", c, x, "--labels", y, "--batch-size", "0", "--out", out],
        ["attack", c, x, "--out", out],  # no labels
        ["attack", c, str(root / "crafted.npy"), "--labels", y, "--out", out],
        ["attack", c, str(root / "bomb"), "--labels", y, "--out", out],
        ["attack", m, x, "--labels", y, "--out", out],
        ["attack", c, x, "--labels", y, "--method", "bpda", "--out", out],  # no --purifier
        ["attack", c, x, "--labels", y, "--method", "bpda", "--purifier", m, "--steps", "0", "--out", out],
        ["attack", c, x, "--labels", y, "--method", "bpda", "--purifier", m, "--restarts", "0", "--out", out],
        ["attack", c, x, "--labels", y, "--method", "bpda", "--purifier", m, "--eps-def", "-1", "--out", out],
        ["attack", c, x, "--labels", y, "--method", "bpda", "--purifier", m, "--temperature", "0", "--out", out],
        # detect
        ["detect", m, x, "--batch-size", "0", "--out", out],
        ["detect", m, x, "--batch-size", "-5", "--out", out],
        ["detect", m, x, "--alpha", "2", "--out", out],
        ["detect", m, x, "--show", "-1", "--out", out],
        ["detect", m, x, "--reference", str(root / "floats.npy"), "--out", out],
        ["detect", m, str(root / "bomb"), "--out", out],
        ["detect", m, str(root / "crafted.npy"), "--out", out],
        ["detect", m, "digits:bogus", "--out", out],
        ["detect", c, x, "--out", out],
        # purify
        ["purify", m, x, "--eps", "-1", "--out", out],
        ["purify", m, x, "--grid", "0", "--out", out],
        ["purify", m, x, "--batch-size", "0", "--out", out],
        ["purify", m, x, "--adaptive", "1.5", "--out", out],
        ["purify", m, x, "--classifier", m, "--out", out],
        ["purify", m, str(root / "nested"), "--out", out],
    ]


def files(root):
    """Every file and folder under root, with its modification time (a folder's changes as files come
    and go; the run directory lock's does too, so it is left out)."""
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.name != ".lock" and not (p / ".lock").exists()}


def test_every_bad_value_gets_a_one_line_error(world, capsys):
    failures = []
    for argv in cases(world):
        before = files(world)
        try:
            main(argv)
            code = 0
        except SystemExit as exit_:
            code = exit_.code
        except Exception as error:  # noqa: BLE001 - what the table looks for
            code = f"{type(error).__name__}: {str(error)[:200]}"
        err = capsys.readouterr().err.strip().splitlines()
        errors = [line for line in err if "error" in line]
        # one line (argparse puts its usage line above it), a non-zero exit, nothing written
        if code != 1 and code != 2 or len(errors) != 1:
            failures.append(f"{' '.join(argv[:1] + argv[2:])}: exit {code}, stderr {err[-2:]}")
        elif files(world) != before:
            failures.append(f"{' '.join(argv)}: wrote {set(files(world)) ^ set(before)}")
    assert not failures, "\n".join(failures)


def test_no_traceback_reaches_the_terminal(world):
    """The same, in fresh processes: what a user at a terminal sees."""
    argv = ["sample", str(world / "model"), "-n", "10000000", "--out", str(world / "o.png")]
    done = subprocess.run([sys.executable, "-m", "pixelchain.cli", *argv], capture_output=True, text=True)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_api_entry_points_raise_value_errors(world):
    model = pc.load(world / "model")
    x = torch.zeros(2, 1, 8, 8, dtype=torch.long)
    for call in (
        lambda: pc.create("pixelcnn", (1, 8, 8), 4, kernel_size=4),
        lambda: pc.create("made", (1, 8, 8), 2, hidden=10**12),
        lambda: pc.load(world / "nested"),
        lambda: model.sample(10**12),
        lambda: model.sample(0),
        lambda: model.sample(2, temperature=float("nan")),
        lambda: model.purify(x, -1),
        lambda: pc.data.from_images(world / "bomb"),
        lambda: pc.data.from_images(world / "crafted.npy"),
        lambda: pc.data.from_images(world / "notes"),
        lambda: pc.data.from_images(np.zeros((2, 8, 8), np.float32)),
        lambda: pc.data.from_images(np.zeros((4, 2, 8, 8), np.int64)),
        lambda: pc.data.from_images(np.zeros((2, 8, 8), np.int64), "train"),
    ):
        with pytest.raises((ValueError, FileNotFoundError)):
            call()


def test_an_eps_beyond_the_levels_is_the_whole_range(world, capsys):
    """A huge --eps answers as eps = K - 1 does (every level), with no overflow."""
    model = pc.load(world / "model")
    x = pc.data.load("digits", "test").images[:3]
    huge = model.purify(x, 10**21, batch_size=None)
    assert torch.equal(huge, model.purify(x, 16, batch_size=None))
    huge = "1" + "0" * 21
    main(["attack", str(world / "clf"), str(world / "x.npy"), "--labels", str(world / "y.npy"), "--eps", huge,
          "--out", str(world / "huge_attack")])
    main(["purify", str(world / "model"), str(world / "x.npy"), "--eps", huge, "--out", str(world / "huge_purify")])
    assert (world / "huge_attack" / "before_after.png").is_file()
    assert (world / "huge_purify" / "before_after.png").is_file()
