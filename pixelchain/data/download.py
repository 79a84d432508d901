"""Find a dataset file, verify its checksum, or download it into the cache.

Search order for each file: the ``root`` argument, then each folder of ``$PIXELCHAIN_DATA``
(os.pathsep-separated; as ``<dir>/<dataset>/<file>`` and ``<dir>/<file>``), then the dataset's system
folders, then the cache ``$PIXELCHAIN_CACHE`` (default ``$XDG_CACHE_HOME/pixelchain`` or
``~/.cache/pixelchain``) as ``<cache>/<dataset>/<file>``. A file may be stored gzip'ed as
``<file>.gz``. Whatever is found is verified before use: a corrupt copy is an error, never skipped.

Downloads go over https only (plain http only to this machine, a local mirror), follow redirects
only to https on the same host, and stop at the file's ``max_bytes`` from the source table.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zlib
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from .sources import File, Source


class DataError(RuntimeError):
    """A dataset file is missing, corrupt or could not be downloaded; the message says what to do."""


def cache_dir() -> Path:
    """Where downloads go: $PIXELCHAIN_CACHE, else $XDG_CACHE_HOME/pixelchain or ~/.cache/pixelchain."""
    if os.environ.get("PIXELCHAIN_CACHE"):
        return Path(os.environ["PIXELCHAIN_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "pixelchain"


def downloads_allowed(download: bool | None) -> bool:
    """``download`` if given, else True unless $PIXELCHAIN_OFFLINE is set (to anything but "0")."""
    if download is not None:
        return download
    return os.environ.get("PIXELCHAIN_OFFLINE", "") in ("", "0")


def search_dirs(source: Source, root: str | Path | None = None) -> list[Path]:
    """The folders searched for ``source``'s files, in order."""
    data_dirs = [str(root or ""), *os.environ.get("PIXELCHAIN_DATA", "").split(os.pathsep)]
    dirs = [p for d in data_dirs if d for p in (Path(d).expanduser() / source.name, Path(d).expanduser())]
    return dirs + [Path(d) for d in source.system_dirs] + [cache_dir() / source.name]


def payload_digest(path: Path, algo: str, gzipped: bool) -> str:
    """Hex digest of the file's bytes, after gunzip when ``gzipped``; a message if it does not gunzip."""
    h = hashlib.new(algo)
    try:
        with gzip.open(path, "rb") if gzipped else open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except (OSError, EOFError, zlib.error) as e:
        return f"unreadable gzip data ({e})"
    return h.hexdigest()


def _is_gzipped(path: Path, file: File) -> bool:
    return path.name == PurePosixPath(file.name).name + ".gz"


def _find(file: File, dirs: list[Path]) -> Path | None:
    for d in dirs:
        for path in (d / file.name, d / f"{file.name}.gz"):
            if path.is_file():
                return path
    return None


def _verify(source: Source, file: File, path: Path) -> Path:
    got = payload_digest(path, file.algo, _is_gzipped(path, file))
    if got != file.digest:
        raise DataError(
            f"{source.name}: {path} is corrupt or not the expected {file.name} "
            f"({file.algo} expected {file.digest}, got {got}); delete the corrupt file {path} and retry"
        )
    return path


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def check_url(url: str, came_from: str | None = None) -> None:
    """URLError unless ``url`` is https (or http to this machine) and, when it is a redirect from
    ``came_from``, on the same host."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "https" and not (parts.scheme == "http" and parts.hostname in LOOPBACK):
        raise urllib.error.URLError(f"refused {url}: downloads go over https only")
    if came_from is not None and parts.hostname != urllib.parse.urlsplit(came_from).hostname:
        raise urllib.error.URLError(f"refused the redirect to {url}: another host than {came_from}'s")


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        check_url(newurl, req.full_url)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_opener = urllib.request.build_opener(_CheckedRedirects())


def _download(source: Source, file: File) -> Path:
    """Try each mirror in order; a copy lands in the cache only after its checksum matched."""
    errors = []
    for url in file.urls:
        dest = (cache_dir() / source.name / file.name).with_name(url.rsplit("/", 1)[-1])
        part = dest.with_name(dest.name + ".part")
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            check_url(url)
            with _opener.open(url, timeout=60) as r, open(part, "wb") as f:
                size = int(r.headers.get("Content-Length") or 0) or None
                if size is not None and size > file.max_bytes:
                    raise urllib.error.URLError(f"{size:,} bytes, more than the {file.max_bytes:,} bytes expected")
                with tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name) as bar:
                    while chunk := r.read(1 << 16):
                        if f.tell() + len(chunk) > file.max_bytes:
                            raise urllib.error.URLError(f"more than the {file.max_bytes:,} bytes expected")
                        f.write(chunk)
                        bar.update(len(chunk))
            got = payload_digest(part, file.algo, _is_gzipped(dest, file))
            if got == file.digest:
                return part.replace(dest)
            errors.append(
                f"checksum mismatch for download from {url}: expected {file.algo} {file.digest}, got {got}"
            )
        except (OSError, http.client.HTTPException) as e:  # URLError, HTTPError, timeouts, cut connections
            errors.append(f"download from {url} failed: {e}")
        finally:
            part.unlink(missing_ok=True)
    raise DataError(
        f"{source.name}: could not download {file.name}:\n  " + "\n  ".join(errors or ["no download URL"])
        + f"\nPut a copy in {cache_dir() / source.name} or set PIXELCHAIN_DATA to a folder holding it."
    )


def _extract(source: Source, file: File, archive: Path) -> Path:
    """Unpack ``archive`` into the cache and return the path of ``file`` in it."""
    dest = cache_dir() / source.name
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    path = _find(file, [dest])
    if path is None:
        raise DataError(f"{source.name}: {archive} holds no {file.name}; delete {archive} and retry")
    return path


def fetch(source: Source, file: File, root: str | Path | None = None, download: bool | None = None) -> Path:
    """Path of a verified copy of ``file``: found on the search path, else extracted or downloaded."""
    allowed = downloads_allowed(download)
    dirs = search_dirs(source, root)
    path = _find(file, dirs)
    if path is None and file.archive is not None:  # e.g. a CIFAR batch: unpack the archive holding it
        archive = _find(file.archive, dirs)
        if archive is None and allowed:
            archive = _download(source, file.archive)
        if archive is not None:
            path = _extract(source, file, _verify(source, file.archive, archive))
    elif path is None and allowed:
        return _download(source, file)
    if path is None:
        wanted = file.name if file.archive is None else f"{file.name} (or the archive {file.archive.name})"
        raise DataError(
            f"{source.name}: {wanted} not found (also looked for .gz); searched {', '.join(map(str, dirs))}. "
            "Set PIXELCHAIN_DATA to a folder holding it (or pass root=...), or allow downloads "
            "(unset PIXELCHAIN_OFFLINE, or pass download=True)."
        )
    return _verify(source, file, path)
