"""pixelchain.data: the real datasets (if present), each format on generated files, downloads, transforms."""

import gzip
import hashlib
import http.server
import io
import os
import pickle
import tarfile
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from conftest import data_root

from pixelchain.data import DataError, ImageDataset, list_datasets, load, quantize, sources
from pixelchain.data.download import cache_dir, downloads_allowed, search_dirs

# ------------------------------------------------------------------------------------------ helpers


def patch_catalogue(monkeypatch, name, payloads, urls=None):
    """Make catalogue entry ``name`` expect the generated ``payloads`` (file name -> bytes), at ``urls``."""
    urls = urls or {}

    def fix(f):
        if f is None:
            return None
        digest = hashlib.new(f.algo, payloads[f.name]).hexdigest() if f.name in payloads else f.digest
        return replace(f, digest=digest, urls=urls.get(f.name, f.urls), archive=fix(f.archive))

    source = sources.SOURCES[name]
    files = {part: tuple(fix(f) for f in fs) for part, fs in source.files.items()}
    monkeypatch.setitem(sources.SOURCES, name, replace(source, files=files))


@pytest.fixture
def no_data(tmp_path, monkeypatch):
    """No shared data folders: only what a test writes (and passes as root) is found."""
    monkeypatch.setenv("PIXELCHAIN_DATA", str(tmp_path / "nothing"))


def idx_bytes(array):
    header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def amat_bytes(bits, sep=" ", newline="\n"):
    return "".join(sep.join(map(str, row)) + newline for row in bits.reshape(len(bits), -1)).encode()


def cifar_pickle(data, labels):
    return pickle.dumps({b"batch_label": b"generated", b"data": data, b"labels": labels}, protocol=2)


class _Touch:
    """Unpickling this creates a file: a stand-in for a pickle that runs code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


# ------------------------------------------------------------------------------------------ catalogue


def test_catalogue_and_argument_errors():
    assert list_datasets() == [
        "digits", "mnist", "binarized_mnist", "fashion_mnist", "caltech101_silhouettes", "cifar10"
    ]
    with pytest.raises(ValueError, match="binarized_mnist"):
        load("nmist")
    with pytest.raises(ValueError, match=r"train\+valid"):
        load("digits", "validation")
    # options are checked before any file is looked for (no CIFAR-10 here: that would be a DataError)
    for kwargs in ({"num_levels": 18}, {"num_levels": 1}, {"num_levels": 4, "binarize": "threshold"},
                   {"binarize": "otsu"}):
        with pytest.raises(ValueError):
            load("digits", **kwargs)
    with pytest.raises(ValueError, match="greyscale"):
        load("cifar10", binarize="threshold")
    with pytest.raises(ValueError, match="more than 2 levels"):
        load("binarized_mnist", binarize="dynamic")


def test_settings_from_environment(monkeypatch, tmp_path):
    for value, allowed in (("", True), ("0", True), ("1", False), ("yes", False)):
        monkeypatch.setenv("PIXELCHAIN_OFFLINE", value)
        assert downloads_allowed(None) is allowed
        assert downloads_allowed(True) and not downloads_allowed(False)
    monkeypatch.delenv("PIXELCHAIN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "pixelchain"


def test_search_order(monkeypatch, tmp_path):
    monkeypatch.setenv("PIXELCHAIN_DATA", os.pathsep.join(["/a", "", "/b"]))
    assert search_dirs(sources.SOURCES["fashion_mnist"], tmp_path) == [
        tmp_path / "fashion_mnist", tmp_path, Path("/a/fashion_mnist"), Path("/a"), Path("/b/fashion_mnist"),
        Path("/b"), Path("/usr/share/datasets/fashion-mnist"), cache_dir() / "fashion_mnist",
    ]


# ------------------------------------------------------------------------------------------ real data


@pytest.mark.parametrize("name", ["mnist", "binarized_mnist", "fashion_mnist", "caltech101_silhouettes"])
def test_checksums_of_local_copies(name):
    """The catalogue's payload sha256 equals that of the local copy, gunzipped where stored as .gz."""
    root = data_root(name)
    for f in {f for files in sources.SOURCES[name].files.values() for f in files}:
        path = next(p for p in (root / f.name, root / f"{f.name}.gz") if p.is_file())
        payload = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        assert hashlib.sha256(payload).hexdigest() == f.digest, path


def height(images):
    """Mean number of rows that the objects in images [N, H, W] touch."""
    return images.amax(2).sum(-1).float().mean()


def width(images):
    """Mean number of columns that the objects in images [N, H, W] touch."""
    return images.amax(1).sum(-1).float().mean()


def check(ds, n, shape, num_levels, labelled=True):
    assert isinstance(ds, ImageDataset) and len(ds) == n and ds.image_shape == shape
    assert ds.images.dtype == torch.int64 and ds.num_levels == num_levels
    assert ds.images.min() == 0 and ds.images.max() == num_levels - 1
    if labelled:
        assert ds.labels.dtype == torch.int64 and len(ds.labels) == n
    else:
        assert ds.labels is None


@pytest.mark.parametrize(
    "name, test_counts, train_counts",
    [
        ("mnist", [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009],
         [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]),
        ("fashion_mnist", [1000] * 10, [6000] * 10),
    ],
)
def test_mnist_layout(name, test_counts, train_counts):
    data_root(name)
    train, valid, test, both = (load(name, s) for s in ("train", "valid", "test", "train+valid"))
    for ds, n in ((train, 50_000), (valid, 10_000), (test, 10_000), (both, 60_000)):
        check(ds, n, (1, 28, 28), 256)
    assert test.labels.bincount().tolist() == test_counts
    assert both.labels.bincount().tolist() == train_counts
    assert torch.equal(both.images, torch.cat([train.images, valid.images]))
    assert torch.equal(both.labels, torch.cat([train.labels, valid.labels]))
    assert both.split == "train+valid" and both.name == name


def test_binarized_mnist():
    data_root("binarized_mnist")
    for split, n in (("train", 50_000), ("valid", 10_000), ("test", 10_000)):
        ds = load("binarized_mnist", split)
        check(ds, n, (1, 28, 28), 2, labelled=False)
        assert abs(ds.images.float().mean().item() - 0.13) < 0.005


def test_caltech101_silhouettes():
    data_root("caltech101_silhouettes")
    for split, n in (("train", 4100), ("valid", 2264), ("test", 2307)):
        ds = load("caltech101_silhouettes", split)
        check(ds, n, (1, 28, 28), 2)
        assert ds.labels.unique().tolist() == list(range(101))
        x = ds.images[:, 0]
        assert (x[:, [0, -1]][:, :, [0, -1]] == 0).all()  # 1 = object, so the corners are background
        assert 0.4 < x.float().mean() < 0.5
        # upright, not transposed: faces (classes 1, 2) are taller than wide, side views of planes (0) wider
        faces, planes = x[(ds.labels == 1) | (ds.labels == 2)], x[ds.labels == 0]
        assert height(faces) > width(faces) + 3 and width(planes) > height(planes) + 1.5


def test_digits():
    from sklearn.datasets import load_digits

    raw = torch.from_numpy(load_digits().images).long()[:, None]
    train, valid, test, both = (load("digits", s) for s in ("train", "valid", "test", "train+valid"))
    for ds, n in ((train, 1257), (valid, 270), (test, 270), (both, 1527)):
        check(ds, n, (1, 8, 8), 17)
    assert torch.equal(torch.cat([train.images, valid.images, test.images]), raw)


# ------------------------------------------------------------------------------- generated files


def test_idx_gz_and_raw(tmp_path, monkeypatch, no_data):
    rng = np.random.default_rng(0)
    x = {"train": rng.integers(0, 256, (12, 28, 28)), "t10k": rng.integers(0, 256, (5, 28, 28))}
    y = {"train": rng.integers(0, 10, 12), "t10k": rng.integers(0, 10, 5)}
    payloads = {}
    for part in x:
        payloads[f"{part}-images-idx3-ubyte"] = idx_bytes(x[part])
        payloads[f"{part}-labels-idx1-ubyte"] = idx_bytes(y[part])
    for name, payload in payloads.items():  # train gzip'ed, t10k plain
        if name.startswith("train"):
            (tmp_path / f"{name}.gz").write_bytes(gzip.compress(payload))
        else:
            (tmp_path / name).write_bytes(payload)
    patch_catalogue(monkeypatch, "mnist", payloads)
    for split, part in (("train", "train"), ("test", "t10k")):
        ds = load("mnist", split, root=tmp_path)
        assert torch.equal(ds.images, torch.from_numpy(x[part][:, None]).long())
        assert torch.equal(ds.labels, torch.from_numpy(y[part]).long())


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda b: b"\x00\x00\x09" + b[3:], "not an IDX file"),
        (lambda b: b[:-10], "header says shape"),
    ],
)
def test_malformed_idx(tmp_path, monkeypatch, no_data, corrupt, message):
    images, labels = idx_bytes(np.zeros((3, 28, 28))), idx_bytes(np.zeros(3))
    payloads = {"t10k-images-idx3-ubyte": corrupt(images), "t10k-labels-idx1-ubyte": labels}
    for name, payload in payloads.items():
        (tmp_path / f"{name}.gz").write_bytes(gzip.compress(payload))
    patch_catalogue(monkeypatch, "mnist", payloads)  # the checksum matches: the parser must object
    with pytest.raises(ValueError, match=rf"t10k-images-idx3-ubyte\.gz: {message}"):
        load("mnist", "test", root=tmp_path)


@pytest.mark.parametrize(
    "payload, message",
    [(b"not the test file\n", "delete the corrupt file"), (b"\x1f\x8b junk", "unreadable gzip data")],
)
def test_corrupt_local_copy_is_an_error(tmp_path, no_data, payload, message):
    path = tmp_path / "binarized_mnist_test.amat.gz"
    path.write_bytes(payload)
    with pytest.raises(DataError, match=message) as e:
        load("binarized_mnist", "test", root=tmp_path)
    assert str(path) in str(e.value)


def test_amat_fast_and_general_layouts(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    bits = {s: rng.integers(0, 2, (n, 28, 28)) for s, n in (("train", 6), ("valid", 3), ("test", 4))}
    payloads = {
        "binarized_mnist_train.amat": amat_bytes(bits["train"]),  # published layout, gzip'ed
        "binarized_mnist_valid.amat": amat_bytes(bits["valid"], sep="  ", newline=" \r\n"),
        "binarized_mnist_test.amat": amat_bytes(bits["test"].astype(float), newline="\n\n"),  # "0.0 1.0"
    }
    folder = tmp_path / "binarized_mnist"  # the <dir>/<dataset>/<file> layout of PIXELCHAIN_DATA
    folder.mkdir()
    for name, payload in payloads.items():
        if "train" in name:
            (folder / f"{name}.gz").write_bytes(gzip.compress(payload))
        else:
            (folder / name).write_bytes(payload)
    monkeypatch.setenv("PIXELCHAIN_DATA", str(tmp_path))
    patch_catalogue(monkeypatch, "binarized_mnist", payloads)
    for split, x in bits.items():
        assert torch.equal(load("binarized_mnist", split).images, torch.from_numpy(x[:, None]).long())
    assert len(load("binarized_mnist", "train+valid")) == 9


@pytest.mark.parametrize("bad", [2, None])  # a 2 in a row; a row one value short
def test_malformed_amat(tmp_path, monkeypatch, no_data, bad):
    payload = bytearray(amat_bytes(np.zeros((5, 784), int)))
    row = 2 * 784 * 2  # the third line
    payload[row : row + 2] = b"2 " if bad == 2 else b""
    (tmp_path / "binarized_mnist_test.amat").write_bytes(payload)
    patch_catalogue(monkeypatch, "binarized_mnist", {"binarized_mnist_test.amat": bytes(payload)})
    with pytest.raises(ValueError, match=r"binarized_mnist_test\.amat, line 3: expected 784 values"):
        load("binarized_mnist", "test", root=tmp_path)


def test_caltech_mat(tmp_path, monkeypatch, no_data):
    """Rows are stored column-major with 0 = object; load gives upright images with 1 = object."""
    rng = np.random.default_rng(2)
    sizes = {"train": 5, "val": 3, "test": 4}
    images = {p: rng.integers(0, 2, (n, 28, 28)).astype(np.uint8) for p, n in sizes.items()}
    labels = {p: rng.integers(1, 102, (len(x), 1)).astype(np.uint8) for p, x in images.items()}
    mat = {}
    for p, x in images.items():
        mat[f"{p}_data"] = np.stack([(1 - im).flatten(order="F") for im in x])
        mat[f"{p}_labels"] = labels[p]
    path = tmp_path / "caltech101_silhouettes_28_split1.mat"
    scipy.io.savemat(path, mat)
    patch_catalogue(monkeypatch, "caltech101_silhouettes", {path.name: path.read_bytes()})
    for split, p in (("train", "train"), ("valid", "val"), ("test", "test")):
        ds = load("caltech101_silhouettes", split, root=tmp_path)
        assert torch.equal(ds.images, torch.from_numpy(images[p][:, None]).long())
        assert torch.equal(ds.labels, torch.from_numpy(labels[p].ravel()).long() - 1)


def cifar_files(rng, n=4):
    """Generated CIFAR batches {file name: pickle bytes}, and the images and labels of each part."""
    files, parts = {}, {}
    for part, batches in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])):
        data = rng.integers(0, 256, (len(batches) * n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, len(batches) * n)
        for i, batch in enumerate(batches):
            rows = slice(i * n, (i + 1) * n)
            files[f"cifar-10-batches-py/{batch}"] = cifar_pickle(data[rows], labels[rows].tolist())
        parts[part] = (torch.from_numpy(data).long().reshape(-1, 3, 32, 32), torch.from_numpy(labels))
    return files, parts


def check_cifar(parts, root=None, download=None):
    train, valid, test = (load("cifar10", s, root=root, download=download)
                          for s in ("train", "valid", "test"))
    assert train.image_shape == (3, 32, 32) and train.num_levels == 256 and len(valid) == 0
    assert torch.equal(train.images, parts["train"][0]) and torch.equal(train.labels, parts["train"][1])
    assert torch.equal(test.images, parts["test"][0]) and torch.equal(test.labels, parts["test"][1])


def test_cifar_folder(tmp_path, monkeypatch, no_data):
    files, parts = cifar_files(np.random.default_rng(3))
    for name, payload in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(payload)
    patch_catalogue(monkeypatch, "cifar10", files)
    check_cifar(parts, root=tmp_path)


def test_cifar_pickle_is_verified_before_loading(tmp_path, no_data):
    marker = tmp_path / "pwned"
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(_Touch(str(marker))))
    with pytest.raises(DataError, match="delete the corrupt file"):
        load("cifar10", "test", root=tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("where", ["local", "download"])
def test_cifar_archive(tmp_path, monkeypatch, no_data, server, where):
    base, www, requests = server
    files, parts = cifar_files(np.random.default_rng(4))
    folder = (tmp_path / "archive") if where == "local" else www
    folder.mkdir(exist_ok=True)
    archive = folder / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, payload in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    files[archive.name] = archive.read_bytes()
    patch_catalogue(monkeypatch, "cifar10", files, urls={archive.name: (f"{base}/{archive.name}",)})
    check_cifar(parts, root=tmp_path / "archive", download=where == "download")
    assert (cache_dir() / "cifar10" / "cifar-10-batches-py" / "data_batch_1").is_file()
    assert requests == ([] if where == "local" else [f"/{archive.name}"])  # extracted once, then cached


# ------------------------------------------------------------------------------------------ downloads


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A local HTTP server for tmp_path/"www": (base URL, that folder, the paths requested)."""
    www, requests = tmp_path / "www", []
    www.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(www), **kwargs)

        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    yield f"http://127.0.0.1:{httpd.server_port}", www, requests
    httpd.shutdown()
    httpd.server_close()


def cache_files():
    return sorted(p.name for p in cache_dir().rglob("*") if p.is_file())


def test_download_verifies_and_caches(server, monkeypatch, no_data):
    base, www, requests = server
    x, y = np.arange(2 * 784).reshape(2, 28, 28) % 256, np.array([3, 7])
    payloads = {"t10k-images-idx3-ubyte": idx_bytes(x), "t10k-labels-idx1-ubyte": idx_bytes(y)}
    for name, payload in payloads.items():
        (www / f"{name}.gz").write_bytes(gzip.compress(payload))
    patch_catalogue(monkeypatch, "mnist", payloads, urls={n: (f"{base}/{n}.gz",) for n in payloads})
    ds = load("mnist", "test", download=True)
    assert torch.equal(ds.images[:, 0], torch.from_numpy(x).long()) and ds.labels.tolist() == [3, 7]
    assert cache_files() == ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    load("mnist", "test", download=False)  # now from the cache, without the network
    assert len(requests) == 2


def test_corrupt_download_leaves_nothing(server, monkeypatch, no_data):
    base, www, _ = server
    (www / "binarized_mnist_test.amat").write_bytes(b"0 1\n")
    url = f"{base}/binarized_mnist_test.amat"
    patch_catalogue(monkeypatch, "binarized_mnist", {"binarized_mnist_test.amat": b"1 0\n"},
                    urls={"binarized_mnist_test.amat": (url,)})
    with pytest.raises(DataError, match=f"checksum mismatch for download from {url}: expected sha256"):
        load("binarized_mnist", "test", download=True)
    assert cache_files() == []


def test_download_falls_back_to_the_next_mirror(server, monkeypatch, no_data):
    base, www, requests = server
    bits = np.ones((2, 784), int)
    (www / "binarized_mnist_test.amat").write_bytes(amat_bytes(bits))
    patch_catalogue(
        monkeypatch, "binarized_mnist", {"binarized_mnist_test.amat": amat_bytes(bits)},
        urls={"binarized_mnist_test.amat": (f"{base}/gone/binarized_mnist_test.amat",
                                            f"{base}/binarized_mnist_test.amat")},
    )
    assert load("binarized_mnist", "test", download=True).images.sum() == 2 * 784
    assert requests == ["/gone/binarized_mnist_test.amat", "/binarized_mnist_test.amat"]
    assert cache_files() == ["binarized_mnist_test.amat"]


@pytest.mark.parametrize("offline, download", [("1", None), ("", False)])
def test_offline_gives_guidance(server, monkeypatch, no_data, offline, download):
    base, www, requests = server
    (www / "binarized_mnist_test.amat").write_bytes(b"")
    patch_catalogue(monkeypatch, "binarized_mnist", {},
                    urls={"binarized_mnist_test.amat": (f"{base}/binarized_mnist_test.amat",)})
    monkeypatch.setenv("PIXELCHAIN_OFFLINE", offline)
    guidance = r"binarized_mnist_test\.amat.*PIXELCHAIN_DATA.*PIXELCHAIN_OFFLINE"
    with pytest.raises(DataError, match=guidance) as e:
        load("binarized_mnist", "test", download=download)
    assert str(cache_dir() / "binarized_mnist") in str(e.value)  # names the places searched
    assert requests == [] and cache_files() == []


# ------------------------------------------------------------------------------------------ transforms


def test_joining_splits():
    train, valid = load("digits", "train"), load("digits", "valid")
    both = train + valid
    assert len(both) == len(train) + len(valid) and both.split == "train+valid"
    assert torch.equal(both.images[len(train):], valid.images) and torch.equal(both.labels[: len(train)], train.labels)
    with pytest.raises(ValueError, match="cannot join"):
        train + load("digits", "train", num_levels=2)


def test_quantize():
    x = torch.arange(256)
    assert quantize(x, 256, 4).bincount().tolist() == [64] * 4
    assert torch.equal(quantize(x, 256, 256), x) and torch.equal(quantize(x, 256, 2), (x >= 128).long())
    assert quantize(torch.arange(17), 17, 4).tolist() == [i * 4 // 17 for i in range(17)]


def test_levels_and_binarisation():
    raw = load("digits", "test")
    four = load("digits", "test", num_levels=4)
    assert four.num_levels == 4 and torch.equal(four.images, raw.images * 4 // 17)
    assert torch.equal(four.labels, raw.labels)
    same = load("digits", "test", num_levels=17)
    assert torch.equal(same.images, raw.images)

    static = load("digits", "test", binarize="threshold")
    assert static.num_levels == 2 and static.intensities is None
    assert torch.equal(static.images, (raw.images >= 9).long())  # x >= 17 / 2

    dynamic = load("digits", "test", binarize="dynamic")
    assert dynamic.num_levels == 2 and dynamic.intensities.dtype == torch.float32
    assert torch.allclose(dynamic.intensities, raw.images / 16)
    assert set(dynamic.images.unique().tolist()) == {0, 1}
    assert torch.equal(dynamic.images, load("digits", "test", binarize="dynamic").images)  # seeded
    index = torch.arange(len(dynamic))
    fresh = dynamic.batch(index, torch.Generator().manual_seed(1))
    assert not torch.equal(fresh, dynamic.images)
    assert abs(fresh.float().mean() - dynamic.intensities.mean()) < 0.02


def test_downloads_refuse_plain_http_other_hosts_and_oversized_files(server, monkeypatch, no_data):
    """https only (http to this machine alone, for local mirrors), redirects only to the same host,
    and no more bytes than the source table allows; each refusal named, nothing left in the cache."""
    base, www, requests = server
    bits = np.ones((2, 784), int)
    (www / "binarized_mnist_test.amat").write_bytes(amat_bytes(bits))
    name = "binarized_mnist_test.amat"

    def attempt(urls, **change):
        patch_catalogue(monkeypatch, "binarized_mnist", {name: amat_bytes(bits)}, urls={name: urls})
        source = sources.SOURCES["binarized_mnist"]
        files = {p: tuple(replace(f, **change) for f in fs) for p, fs in source.files.items()}
        monkeypatch.setitem(sources.SOURCES, "binarized_mnist", replace(source, files=files))
        with pytest.raises(DataError) as error:
            load("binarized_mnist", "test", download=True)
        assert cache_files() == []
        return str(error.value)

    assert "https only" in attempt(("http://example.invalid/" + name,))
    assert "more than the 100 bytes expected" in attempt((f"{base}/{name}",), max_bytes=100)

    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(302)
            self.send_header("Location", self.path.lstrip("/").replace("to/", "", 1))
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        hop = f"http://127.0.0.1:{httpd.server_port}/to/"
        assert "https only" in attempt((hop + "http://example.invalid/" + name,))
        assert "another host" in attempt((hop + "https://example.invalid/" + name,))
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert requests == [f"/{name}"]  # reached by the size-capped attempt alone, never through a redirect
