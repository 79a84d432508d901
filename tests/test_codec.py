"""Lossless compression (pixelchain.codec): round trips for every family, chunk sizes and thread
counts, the coder's overhead, and the file checks (corrupt, truncated, foreign, other model)."""

import hashlib
import json

import numpy as np
import pytest
import torch

import pixelchain as pc
from pixelchain import codec
from pixelchain.checkpoint import PRETRAINED_DIR
from pixelchain.cli import main
from pixelchain.run_dir import RunDir
from tests.test_properties import TINY

pytest.importorskip("constriction")


def tiny(name, image_shape, K, seed=0):
    """A tiny float32 model with random weights (so that no round trip holds by accident of the init)."""
    torch.manual_seed(seed)
    model = pc.create(name, image_shape, K, **TINY[name][0])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def images(n, image_shape, K, seed=1):
    return torch.randint(0, K, (n, *image_shape), generator=torch.Generator().manual_seed(seed))


CASES = [(name, shape, K) for name, (_, levels) in TINY.items()
         for shape, K in [((1, 5, 4), levels[0]), ((3, 4, 3), levels[-1])]]


@pytest.mark.parametrize("name,image_shape,K", CASES)
def test_round_trip_every_family(name, image_shape, K):
    model, x = tiny(name, image_shape, K), images(7, image_shape, K)
    data = pc.compress(model, x, batch_size=3)  # chunks of 3, 3 and 1
    assert torch.equal(pc.decompress(data, model), x)


@pytest.mark.parametrize("name", ["pixelcnn_pp", "pixelcnn", "fully_visible"])
def test_round_trip_256_levels(name):
    """The 256-level heads: the logistic mixture and the 256-way softmax."""
    model, x = tiny(name, (1, 4, 3), 256), images(5, (1, 4, 3), 256)
    assert torch.equal(pc.decompress(pc.compress(model, x, batch_size=2), model), x)


@pytest.mark.parametrize("name", ["gated_pixelcnn", "transformer", "made"])
def test_chunk_sizes_and_threads(name):
    """The file fixes the chunk layout and coding runs at one thread: the same bytes whatever the
    caller's thread setting, and decompression under another setting than compression's still
    restores the images, for every chunk size."""
    model, x = tiny(name, (3, 4, 3), 5), images(6, (3, 4, 3), 5)
    previous = torch.get_num_threads()
    try:
        for batch_size in (1, 4, 6):
            torch.set_num_threads(2)
            data = pc.compress(model, x, batch_size=batch_size)
            torch.set_num_threads(1)
            assert pc.compress(model, x, batch_size=batch_size) == data
            assert torch.equal(pc.decompress(data, model), x)
            torch.set_num_threads(2)
            assert torch.equal(pc.decompress(data, model), x)
            assert torch.get_num_threads() == 2  # the caller's setting is restored
    finally:
        torch.set_num_threads(previous)


def shipped_check_images(name: str) -> torch.Tensor:
    """The test images a shipped checkpoint carries (no dataset needed)."""
    return RunDir(PRETRAINED_DIR / name).read_check()[0]


def test_payload_is_close_to_minus_log2_p():
    """On a shipped model: the coded streams within 1% of sum -log2 p(x), plus a few words per chunk."""
    model = pc.load("bmnist_nade")
    x = shipped_check_images("bmnist_nade")[:40]
    data = pc.compress("bmnist_nade", x, batch_size=20)
    payload, _ = codec.payload_bits(data)
    ideal = codec.ideal_bits(model, x)
    assert abs(payload - ideal) <= 0.01 * ideal + 64 * 2
    assert torch.equal(pc.decompress(data), x)  # the file names the shipped model


def test_shipped_model_256_levels_round_trip():
    x = shipped_check_images("fmnist_pixelcnn_pp")[:2]
    data = pc.compress(pc.load("fmnist_pixelcnn_pp"), x)  # a loaded module is recognised as the shipped one
    assert codec.read_header(data)[0]["model"]["shipped"] == "fmnist_pixelcnn_pp"
    assert torch.equal(pc.decompress(data), x)


@pytest.fixture(scope="module")
def compressed():
    model, x = tiny("pixelcnn", (1, 5, 4), 3), images(5, (1, 5, 4), 3)
    return model, x, pc.compress(model, x, batch_size=2)


def test_header_records_model_shape_levels_count(compressed):
    model, x, data = compressed
    header, payload = codec.read_header(data)
    assert header["image_shape"] == [1, 5, 4] and header["num_levels"] == 3 and header["count"] == 5
    assert header["chunk"] == 2 and [n for n, _, _ in header["chunks"]] == [2, 2, 1]
    assert header["model"]["shipped"] is None and header["model"]["config"]["model"] == "pixelcnn"
    assert header["model"]["weights_sha256"] == codec.weights_sha256(model)
    assert len(payload) == 4 * sum(words for _, words, _ in header["chunks"])


@pytest.mark.parametrize("damage", ["flip_payload", "flip_header", "truncate", "empty", "extend"])
def test_damaged_files_are_refused(compressed, damage):
    model, _, data = compressed
    b = bytearray(data)
    if damage == "flip_payload":
        b[-40] ^= 1
    elif damage == "flip_header":
        b[20] ^= 4
    elif damage == "truncate":
        b = b[: len(b) // 2]
    elif damage == "empty":
        b = b""
    else:
        b += b"\0"
    with pytest.raises(ValueError, match="corrupted|truncated|signature"):
        pc.decompress(bytes(b), model)


def test_other_formats_and_versions_are_refused(compressed, tmp_path):
    model, x, data = compressed
    np.save(tmp_path / "x.npy", x.numpy())
    for other in [(tmp_path / "x.npy").read_bytes(), b"\x89PNG\r\n\x1a\n" + bytes(100)]:
        with pytest.raises(ValueError, match="not a pixelchain compressed file"):
            pc.decompress(other, model)
    newer = bytearray(data)
    newer[8] = codec.VERSION + 1
    with pytest.raises(ValueError, match="version"):
        pc.decompress(bytes(newer), model)


def rewrite(data, edit):
    """The file with its header changed by ``edit(header)`` and its checksum recomputed (a crafted file)."""
    header, payload = codec.read_header(data)
    edit(header)
    head = json.dumps(header).encode()
    body = codec._PREFIX.pack(codec.MAGIC, codec.VERSION, len(head)) + head + payload
    return body + hashlib.sha256(body).digest()


@pytest.mark.parametrize("edit", [
    lambda h: h["chunks"][0].__setitem__(0, -2),
    lambda h: h["chunks"][0].__setitem__(1, h["chunks"][0][1] + 1),
    lambda h: h.__setitem__("image_shape", [1, 5]),
    lambda h: h.__setitem__("count", 4),
    lambda h: h.pop("model"),
])
def test_crafted_headers_are_refused(compressed, edit):
    model, _, data = compressed
    with pytest.raises(ValueError, match="header"):
        pc.decompress(rewrite(data, edit), model)


def test_header_of_another_shape_is_refused(compressed):
    model, _, data = compressed
    with pytest.raises(ValueError, match="image shape or levels"):
        pc.decompress(rewrite(data, lambda h: h.__setitem__("num_levels", 4)), model)


def test_other_model_is_refused(compressed):
    model, _, data = compressed
    with pytest.raises(ValueError, match="another model"):
        pc.decompress(data, tiny("pixelcnn", (1, 5, 4), 3, seed=1))  # same config, other weights
    with pytest.raises(ValueError, match="not shipped"):
        pc.decompress(data)  # the file names no shipped model: the model must be given


def test_arithmetic_mismatch_gives_an_error_not_wrong_images(compressed, monkeypatch):
    """Were the decoder's tables to differ from the encoder's (another machine's rounding; here
    other weights that pass the identity check), the chunk checksums refuse the images."""
    model, _, data = compressed
    monkeypatch.setattr(codec, "weights_sha256", lambda m: codec.read_header(data)[0]["model"]["weights_sha256"])
    with pytest.raises(ValueError, match="do not match the file's checksum"):
        pc.decompress(data, tiny("pixelcnn", (1, 5, 4), 3, seed=1))


def tiny_conditional():
    return pc.create("gated_pixelcnn", (1, 2, 2), 2, **TINY["gated_pixelcnn"][0], num_classes=2)


def test_input_checks():
    model = tiny("nade", (1, 2, 2), 2)
    with pytest.raises(ValueError, match="values must lie"):
        pc.compress(model, torch.full((1, 1, 2, 2), 2))
    with pytest.raises(ValueError, match="batch_size"):
        pc.compress(model, torch.zeros(1, 1, 2, 2, dtype=torch.long), batch_size=0)
    with pytest.raises(ValueError, match="class-conditional"):
        pc.compress(tiny_conditional(), torch.zeros(1, 1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="not a density model"):
        pc.compress(pc.classifiers.create("logistic_regression", (1, 2, 2), 256, num_classes=2),
                    torch.zeros(1, 1, 2, 2, dtype=torch.long))


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as done:
        main(argv)
    captured = capsys.readouterr()
    return done.value.code, captured.err.strip().splitlines()


def test_cli_round_trip_and_errors(tmp_path, capsys):
    x = shipped_check_images("bmnist_nade")[:6]
    np.save(tmp_path / "x.npy", x.numpy().astype(np.uint8))
    main(["compress", "bmnist_nade", str(tmp_path / "x.npy"), "--out", str(tmp_path / "x.pxc"), "--batch-size", "4"])
    main(["decompress", str(tmp_path / "x.pxc"), "--out", str(tmp_path / "out"), "--png"])
    restored = np.load(tmp_path / "out" / "images.npy")
    assert restored.dtype == np.uint8 and np.array_equal(restored, x.numpy())
    assert len(list((tmp_path / "out").glob("*.png"))) == 6
    capsys.readouterr()
    for argv, message in [
        (["compress", "bmnist_nade", str(tmp_path / "x.npy"), "--out", str(tmp_path / "x.pxc")], "exists"),
        (["decompress", str(tmp_path / "x.pxc"), "--out", str(tmp_path / "out")], "exists"),
        (["decompress", str(tmp_path / "x.npy"), "--out", str(tmp_path / "o2")], "not a pixelchain compressed"),
        (["decompress", str(tmp_path / "x.pxc"), "--out", str(tmp_path / "o3"), "--model", "bmnist_made"],
         "another model"),
        (["decompress", str(tmp_path / "missing.pxc"), "--out", str(tmp_path / "o4")], "missing.pxc"),
    ]:
        code, err = run_cli(argv, capsys)
        assert code == 1 and len(err) == 1 and message in err[0], err
    (tmp_path / "cut.pxc").write_bytes((tmp_path / "x.pxc").read_bytes()[:-1])
    code, err = run_cli(["decompress", str(tmp_path / "cut.pxc"), "--out", str(tmp_path / "o5")], capsys)
    assert code == 1 and len(err) == 1 and "corrupted or truncated" in err[0]
