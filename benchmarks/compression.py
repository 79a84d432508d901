"""Lossless compression with the shipped models against the usual lossless codecs.

    nice -n 10 python -m benchmarks.compression --n 1000 --per-image 50 --round-trip 20

On the last ``--n`` test images of each dataset: bits per pixel of ``pc.compress``'s files (the
whole set in one file, header included; per image: each image its own stream, header excluded),
the model's sum of -log2 p(x) (what the coder approaches), and PNG (level 9), JPEG XL lossless
(effort 9), WebP lossless (grey expanded to RGB, which it needs), JPEG-LS and lzma (level 9), all
from ``imagecodecs``, each per image and on the whole set as one image (tall; a mosaic where a
codec refuses the height); compress and decompress throughput. The codecs are given the levels
as uint8 (0/1 for binarized MNIST). ``--round-trip K`` also codes K images with every shipped
density model and checks the round trip. Writes BENCHMARKS.md's "compression" section.
"""

from __future__ import annotations

import argparse
import math
import os

import numpy as np
import torch

import pixelchain as pc
from benchmarks.common import Stopwatch, machine, write_section
from pixelchain import checkpoint, codec
from pixelchain.io import read_images

MODELS = {"binarized_mnist": "bmnist_pixelcnn_pp", "mnist": "mnist_pixelcnn_pp",  # the best shipped of each
          "fashion_mnist": "fmnist_pixelcnn_pp"}
TARGETS = {"binarized_mnist": 0.16, "mnist": 1.05, "fashion_mnist": 2.9}  # bits/pixel, whole set


def codecs():
    import imagecodecs as ic

    rgb = lambda a: np.ascontiguousarray(np.repeat(a[..., None], 3, axis=2))  # noqa: E731
    return {
        "PNG": (lambda a: ic.png_encode(a, level=9), ic.png_decode),
        "JPEG XL": (lambda a: ic.jpegxl_encode(a, lossless=True, effort=9), ic.jpegxl_decode),
        "WebP": (lambda a: ic.webp_encode(rgb(a), lossless=True, level=100), ic.webp_decode),
        "JPEG-LS": (ic.jpegls_encode, ic.jpegls_decode),
        "lzma": (lambda a: ic.lzma_encode(a.tobytes(), level=9), ic.lzma_decode),
    }


def mosaic(x: np.ndarray, columns: int = 32) -> np.ndarray:
    """[N, H, W] -> one [rows * H, columns * W] image (zeros after the last image)."""
    n, H, W = x.shape
    rows = -(-n // columns)
    padded = np.zeros((rows * columns, H, W), x.dtype)
    padded[:n] = x
    return padded.reshape(rows, columns, H, W).transpose(0, 2, 1, 3).reshape(rows * H, columns * W)


def measure_codecs(x: np.ndarray) -> dict:
    """name -> (bits/pixel per image, bits/pixel whole set, images/s encode, images/s decode, whole-set layout)."""
    pixels, results = x.size, {}
    for name, (encode, decode) in codecs().items():
        with Stopwatch() as encoding:
            files = [encode(a) for a in x]
        with Stopwatch() as decoding:
            for f in files:
                decode(f)
        layout = "tall"
        try:
            whole = encode(x.reshape(-1, x.shape[2]))
        except Exception:  # noqa: BLE001 (e.g. WebP's 16383-pixel limit): one mosaic image instead
            whole, layout = encode(mosaic(x)), "mosaic"
        results[name] = (8 * sum(map(len, files)) / pixels, 8 * len(whole) / pixels, len(x) / encoding.seconds,
                         len(x) / decoding.seconds, layout)
    return results


def measure_model(model_name: str, x: torch.Tensor, batch_size: int, per_image: int) -> dict:
    model = pc.load(model_name)
    pixels = x.numel()
    with Stopwatch() as compressing:
        data = pc.compress(model_name, x, batch_size=batch_size, progress=True)
    with Stopwatch() as decompressing:
        restored = pc.decompress(data, progress=True)
    compress_s, decompress_s = compressing.seconds, decompressing.seconds
    payload, rest = codec.payload_bits(data)
    one_each = pc.compress(model_name, x[:per_image], batch_size=1) if per_image else None
    return {
        "exact": torch.equal(restored, x),
        "file": 8 * len(data) / pixels, "payload": payload / pixels, "header_bytes": rest // 8,
        "ideal": codec.ideal_bits(model, x) / pixels,
        "per_image": codec.payload_bits(one_each)[0] / x[:per_image].numel() if per_image else math.nan,
        "per_image_ideal": codec.ideal_bits(model, x[:per_image]) / x[:per_image].numel() if per_image else math.nan,
        "compress_ips": len(x) / compress_s, "decompress_ips": len(x) / decompress_s,
        "compress_s": compress_s, "decompress_s": decompress_s,
    }


def round_trips(n: int) -> list[str]:
    """Every shipped density model on n test images of its dataset: round trip, payload vs -log2 p."""
    rows = []
    for name in pc.pretrained():
        config, model = checkpoint.read_config(name), pc.load(name)
        if model.kind != "density":
            continue
        dataset = config["dataset"]["name"]
        x = read_images(f"{dataset}:test[:{n}]", model.image_shape[0])
        with Stopwatch() as t:
            data = pc.compress(model, x, batch_size=n)
            ok = torch.equal(pc.decompress(data), x)
        payload, _ = codec.payload_bits(data)
        ideal = codec.ideal_bits(model, x)
        rows.append(f"| {name} | {dataset} | {n} | {'yes' if ok else '**NO**'} | {ideal / x.numel():.4f} | "
                    f"{payload / x.numel():.4f} | {100 * (payload / ideal - 1):+.2f}% | {t.seconds:.1f} |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="the last N test images of each dataset")
    parser.add_argument("--datasets", nargs="+", default=list(MODELS))
    parser.add_argument("--model", action="append", default=[], metavar="DATASET=MODEL",
                        help="the model for a dataset (default: the shipped ones)")
    parser.add_argument("--batch-size", type=int, default=250, help="images coded at once (the file's chunk)")
    parser.add_argument("--per-image", type=int, default=50, help="images coded one per stream for the per-image "
                        "column of the model")
    parser.add_argument("--round-trip", type=int, default=20, help="images per shipped density model (0: skip)")
    parser.add_argument("--section", default="compression")
    args = parser.parse_args()
    models = {**MODELS, **dict(pair.split("=", 1) for pair in args.model)}
    torch.set_num_threads(1)
    rows, verdicts = [], []
    for dataset in args.datasets:
        x = read_images(f"{dataset}:test[-{args.n}:]", 1)
        results = measure_codecs(x[:, 0].numpy().astype(np.uint8))
        best = min(min(r[0], r[1]) for r in results.values())
        best_name = min(results, key=lambda k: min(results[k][0], results[k][1]))
        for name, (per, whole, enc, dec, layout) in results.items():
            rows.append(f"| {dataset} | {name} | {per:.3f} | {whole:.3f}{' (mosaic)' if layout == 'mosaic' else ''} "
                        f"| | {enc:.0f} | {dec:.0f} |")
            print(rows[-1], flush=True)
        if models.get(dataset):
            m = measure_model(models[dataset], x, args.batch_size, args.per_image)
            rows.append(
                f"| {dataset} | **{models[dataset]}** (-log2 p: {m['ideal']:.3f}; first {args.per_image}: "
                f"{m['per_image_ideal']:.3f}) | {m['per_image']:.3f} (stream only) | **{m['file']:.3f}** (payload "
                f"{m['payload']:.3f} + {m['header_bytes']} B header; {100 * (m['payload'] / m['ideal'] - 1):+.2f}% "
                f"over -log2 p) | {best / m['file']:.2f}x smaller than {best_name}; round trip "
                f"{'exact' if m['exact'] else '**NOT exact**'} | {m['compress_ips']:.1f} | {m['decompress_ips']:.1f} "
                f"({len(x)} in {m['decompress_s']:.0f} s) |")
            target = TARGETS.get(dataset, math.inf)
            verdicts.append(f"- {dataset}: {m['file']:.3f} bits/pixel (target <= {target}: "
                            f"{'met' if m['file'] <= target else 'missed'}), {best / m['file']:.2f}x smaller than "
                            f"the best codec (target 1.4x: {'met' if best / m['file'] >= 1.4 else 'missed'}), "
                            f"payload {100 * (m['payload'] / m['ideal'] - 1):+.2f}% over -log2 p (target within 1%: "
                            f"{'met' if m['payload'] <= 1.01 * m['ideal'] else 'missed'}); decompression "
                            f"{1000 / m['decompress_ips']:.0f} s per 1,000 images (target < 60 s on 2 cores: "
                            f"{'met' if 1000 / m['decompress_ips'] < 60 else 'missed'} at this load).")
        else:
            rows.append(f"| {dataset} | (no shipped {dataset} density model) | | | | | |")
        print(rows[-1], flush=True)
    body = (
        f"Machine: {machine()}; the benchmark ran at niceness {os.nice(0)} beside other jobs (load average "
        f"{open('/proc/loadavg').read().split()[0]} at the end), so the throughputs are lower bounds for a quiet "
        f"machine. Images: the last {args.n} test images of each dataset. Bits per pixel; per image = each image "
        "its own file (ours: its own range-coder stream, the header left out), whole set = all images in one file "
        "(the codecs: one tall image; ours: one `.pxc` file, header and checksum included, chunks of "
        f"{args.batch_size} images). Codecs from imagecodecs (PNG level 9, JPEG XL lossless effort 9, WebP lossless "
        "level 100 on grey expanded to RGB, JPEG-LS, lzma level 9 on the raw levels), fed the levels as uint8; "
        "their throughput is per image, one thread. Ours: one intra-op thread.\n\n"
        "| data | codec | per image | whole set | vs the best codec | compress (images/s) | "
        "decompress (images/s) |\n|---|---|---|---|---|---|---|\n" + "\n".join(rows)
        + ("\n\nTargets:\n\n" + "\n".join(verdicts) if verdicts else "")
    )
    if args.round_trip:
        trips = round_trips(args.round_trip)
        body += ("\n\nRound trip with every shipped density model (the first test images of its dataset, one chunk): "
                 "\n\n| model | data | images | exact | -log2 p (bits/dim) | coded (bits/dim) | overhead | "
                 "seconds (both ways) |\n|---|---|---|---|---|---|---|---|\n" + "\n".join(trips))
    write_section(args.section, body)


if __name__ == "__main__":
    main()
