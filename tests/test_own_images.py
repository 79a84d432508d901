"""Your own images: from Python (pc.data.from_images) and wherever the command line takes a dataset."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import pixelchain as pc
from pixelchain import io
from pixelchain.cli import main


def digits_as_files(folder, n=40, suffix=".png"):
    """n digits (17 levels) as 8-bit greyscale files, the levels scaled to 0..255 by 15."""
    folder.mkdir()
    x = pc.data.load("digits", "test").images[:n, 0].numpy().astype(np.uint8) * 15
    for i, image in enumerate(x):
        Image.fromarray(image).save(folder / f"{i:03d}{suffix}")
    return x


def test_from_images_reads_every_case_of_suffix_and_format(tmp_path):
    x = digits_as_files(tmp_path / "mixed", 6)
    (tmp_path / "mixed" / "002.png").rename(tmp_path / "mixed" / "002.PNG")
    Image.fromarray(x[3]).save(tmp_path / "mixed" / "003.tif")
    (tmp_path / "mixed" / "003.png").unlink()
    (tmp_path / "mixed" / "notes.txt").write_text("not an image")
    ds = pc.data.from_images(tmp_path / "mixed")
    assert ds.num_levels == 256 and ds.image_shape == (1, 8, 8) and len(ds) == 6
    assert torch.equal(ds.images[:, 0], torch.from_numpy(x).long())
    Image.fromarray(x[0]).save(tmp_path / "mixed" / "006.JPG", quality=100)  # lossy: close, not equal
    jpeg = pc.data.from_images(tmp_path / "mixed").images[6, 0]
    assert (jpeg - torch.from_numpy(x[0]).long()).abs().float().mean() < 8


def test_sixteen_bit_images_keep_their_depth(tmp_path):
    folder = tmp_path / "deep"
    folder.mkdir()
    values = np.array([[0, 300], [40000, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(folder / "a.png")  # a 16-bit greyscale PNG
    assert Image.open(folder / "a.png").mode.startswith("I")
    ds = pc.data.from_images(folder)
    assert ds.num_levels == 65536 and ds.images[0, 0].tolist() == values.tolist()  # not clipped at 255
    assert io.read_model_images(str(folder), 1, 256)[0, 0].tolist() == (values // 256).tolist()  # quantised


def test_splits_are_deterministic_disjoint_and_cover_everything():
    x = torch.randint(0, 5, (50, 1, 3, 3), generator=torch.Generator().manual_seed(0))
    parts = {s: pc.data.from_images(x, s) for s in ("train", "valid", "test")}
    assert [len(parts[s]) for s in ("train", "valid", "test")] == [40, 5, 5]
    rows = torch.cat([parts[s].images for s in ("train", "valid", "test")])
    assert sorted(map(tuple, rows.flatten(1).tolist())) == sorted(map(tuple, x.flatten(1).tolist()))
    assert torch.equal(pc.data.from_images(x, "valid").images, parts["valid"].images)
    assert pc.data.from_images(x).num_levels == int(x.max()) + 1


def test_mixed_sizes_are_refused_or_resized(tmp_path):
    digits_as_files(tmp_path / "sizes", 3)
    Image.fromarray(np.zeros((5, 7), np.uint8)).save(tmp_path / "sizes" / "odd.png")
    with pytest.raises(ValueError, match="different sizes.*--resize"):
        pc.data.from_images(tmp_path / "sizes")
    assert pc.data.from_images(tmp_path / "sizes", resize=(8, 8)).image_shape == (1, 8, 8)


def test_train_eval_detect_on_a_folder_and_an_npy(tmp_path, capsys):
    digits_as_files(tmp_path / "mine", 40)
    run = tmp_path / "run"
    main(["train", "fully_visible", "--dataset", str(tmp_path / "mine"), "--num-levels", "16", "--run-dir", str(run),
          "--epochs", "1", "--no-figures"])
    dataset = json.loads((run / "config.json").read_text())["dataset"]
    assert dataset["path"] == str((tmp_path / "mine").resolve()) and dataset["images"] == 40
    assert dataset["num_levels"] == 16
    capsys.readouterr()
    main(["eval", str(run), "--split", "valid"])
    assert "(4 images)" in capsys.readouterr().out
    main(["detect", str(run), str(tmp_path / "mine"), "--out", str(tmp_path / "detect")])  # default reference
    assert "reference: 4 images" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # another folder on resume
        main(["train", "fully_visible", "--dataset", str(tmp_path), "--run-dir", str(run), "--resume"])
    assert "a resumed run keeps its model and data" in capsys.readouterr().err
    np.save(tmp_path / "mine.npy", pc.data.load("digits", "test").images[:30].numpy())
    main(["train", "fully_visible", "--dataset", str(tmp_path / "mine.npy"), "--run-dir", str(tmp_path / "npy"),
          "--epochs", "1", "--no-figures"])
    assert json.loads((tmp_path / "npy" / "config.json").read_text())["args"]["num_levels"] == 17


def test_default_reference_uses_the_runs_levels(tmp_path, capsys):
    run = tmp_path / "four"
    main(["train", "fully_visible", "--dataset", "digits", "--num-levels", "4", "--run-dir", str(run),
          "--epochs", "1", "--no-figures"])
    np.save(tmp_path / "x.npy", pc.data.load("digits", "test", num_levels=4).images[:5].numpy())
    capsys.readouterr()
    main(["detect", str(run), str(tmp_path / "x.npy"), "--out", str(tmp_path / "detect")])
    assert "reference: 270 images" in capsys.readouterr().out


def test_a_folder_is_read_once_per_state_and_again_when_it_changes(tmp_path):
    x = digits_as_files(tmp_path / "f", 5)
    assert torch.equal(pc.data.from_images(tmp_path / "f", "all").images[:, 0], torch.from_numpy(x).long())
    Image.fromarray(255 - x[0]).save(tmp_path / "f" / "000.png")
    os.utime(tmp_path / "f" / "000.png", ns=(1, 1))  # a new modification time, whatever the clock's resolution
    assert pc.data.from_images(tmp_path / "f", "all").images[0, 0].tolist() == (255 - x[0]).tolist()


def test_one_rule_maps_images_to_a_models_levels(tmp_path):
    """io.read_model_images: known deeper levels are quantised as --num-levels would (for 2 levels,
    the threshold binarisation), the flags map as train does, unknown-depth arrays must fit or
    name the flag, shallower images are refused."""
    x = digits_as_files(tmp_path / "files", 5)  # 8-bit files
    files = str(tmp_path / "files")
    as_levels = torch.from_numpy(x).long()
    assert torch.equal(io.read_model_images(files, 1, 4)[:, 0], as_levels * 4 // 256)
    assert torch.equal(io.read_model_images(files, 1, 2), io.read_model_images(files, 1, 2, binarize="threshold"))
    assert torch.equal(io.read_model_images(files, 1, 4), io.read_model_images(files, 1, 4, num_levels=4))
    np.save(tmp_path / "raw.npy", x)  # 0..255, depth unknown
    with pytest.raises(ValueError, match="--num-levels 4"):
        io.read_model_images(str(tmp_path / "raw.npy"), 1, 4)
    assert torch.equal(io.read_model_images(str(tmp_path / "raw.npy"), 1, 4, num_levels=4)[:, 0], as_levels * 4 // 256)
    with pytest.raises(ValueError, match="--binarize threshold"):
        io.read_model_images(str(tmp_path / "raw.npy"), 1, 2)
    with pytest.raises(ValueError, match="have 8 levels but the model takes 4"):
        io.read_model_images(files, 1, 4, num_levels=8)
    np.savez(tmp_path / "four.npz", images=x // 64, num_levels=4)
    with pytest.raises(ValueError, match="images of 4 levels for a model of 256"):
        io.read_model_images(str(tmp_path / "four.npz"), 1, 256)


def test_every_command_reads_images_by_the_same_rule(tmp_path, capsys):
    """The same 8-bit files, scored by eval and detect under a 4-level model: the same bits/dim."""
    run = tmp_path / "four"
    main(["train", "fully_visible", "--dataset", "digits", "--num-levels", "4", "--run-dir", str(run),
          "--epochs", "1", "--no-figures", "--quiet"])
    digits_as_files(tmp_path / "files", 5)
    capsys.readouterr()
    main(["eval", str(run), str(tmp_path / "files"), "--out", str(tmp_path / "eval.csv"), "--quiet"])
    main(["detect", str(run), str(tmp_path / "files"), "--out", str(tmp_path / "detect"), "--quiet"])
    evaluated = np.loadtxt(tmp_path / "eval.csv", delimiter=",", skiprows=1, usecols=2)
    detected = [line for line in (tmp_path / "detect").rglob("*.csv")]
    assert detected, "detect wrote no table"
    text = detected[0].read_text().splitlines()
    column = text[0].split(",").index("bits_per_dim")
    assert np.allclose([float(r.split(",")[column]) for r in text[1:]], evaluated, atol=1e-4)
