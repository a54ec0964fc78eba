"""prepare-data: validation reports, trainId label writing, and the CLI glue (run/configure_parser).

Fixtures are written in the datasets' real formats (paletted GTA5 labels, 16-bit RGB SYNTHIA
labels from a small encoder independent of OpenCV, Cityscapes labelIds). Expected trainIds come
from DESIGN.md's tables, copied here by hand.
"""

import argparse
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from lsr_fast.data import CityscapesDataset, GTA5Dataset, SynthiaDataset
from lsr_fast.data.prepare import configure_parser, run, validate_dataset, write_trainid_labels

CS_TABLE = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
            25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
SYNTHIA_TABLE = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9, 1: 10, 10: 11,
                 17: 12, 8: 13, 18: 14, 19: 15, 20: 16, 12: 17, 11: 18}


def expected(table, raw):
    return np.array([[table.get(int(v), 255) for v in row] for row in raw], dtype=np.uint8)


def write_png16_rgb(path, rgb):
    """A 16-bit RGB PNG (colour type 2, big-endian samples), written without any image library."""
    rgb = np.asarray(rgb, dtype=np.uint16)
    height, width, _ = rgb.shape
    rows = b"".join(b"\x00" + rgb[y].astype(">u2").tobytes() for y in range(height))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)))
        f.write(chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def write_rgb(path, height, width, seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)


def write_paletted(path, ids):
    im = Image.fromarray(np.asarray(ids, dtype=np.uint8)).convert("P")
    im.putpalette([(i * 11) % 256 for i in range(768)])
    assert im.mode == "P"
    im.save(path)


# Cityscapes/GTA5 ids 0..33 (all known), on a 6x6 map with two 255-free filler cells.
GOOD_IDS = np.array(list(range(34)) + [7, 26], dtype=np.uint8).reshape(6, 6)
SYNTHIA_GOOD = np.array(list(range(23)) + [3], dtype=np.uint16).reshape(4, 6)


def make_gta5(root, names=("a", "b")):
    os.makedirs(root / "images")
    os.makedirs(root / "labels")
    for k, name in enumerate(names):
        write_rgb(root / "images" / f"{name}.png", 6, 6, seed=k)
        write_paletted(root / "labels" / f"{name}.png", np.roll(GOOD_IDS, k))


def make_synthia(root, names=("0000000", "0000001")):
    os.makedirs(root / "RGB")
    os.makedirs(root / "GT" / "LABELS")
    for k, name in enumerate(names):
        raw = np.roll(SYNTHIA_GOOD, k)
        write_rgb(root / "RGB" / f"{name}.png", 4, 6, seed=k)
        write_png16_rgb(root / "GT" / "LABELS" / f"{name}.png", np.stack([raw, np.full_like(raw, 2), np.full_like(raw, 9)], -1))


def make_cityscapes(root):
    for split, city, base in (("train", "aachen", "aachen_000000_000019"), ("val", "lindau", "lindau_000000_000019"),
                              ("val", "lindau", "lindau_000001_000019")):
        os.makedirs(root / "leftImg8bit" / split / city, exist_ok=True)
        os.makedirs(root / "gtFine" / split / city, exist_ok=True)
        write_rgb(root / "leftImg8bit" / split / city / f"{base}_leftImg8bit.png", 6, 6)
        Image.fromarray(GOOD_IDS).save(root / "gtFine" / split / city / f"{base}_gtFine_labelIds.png")


def snapshot(folder):
    """Every file under folder with its bytes, to prove nothing given was changed."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                out[os.path.join(dirpath, f)] = fh.read()
    return out


# ------------------------------------------------------------------------------------------
# validate_dataset


def test_clean_gta5(tmp_path):
    make_gta5(tmp_path)
    report = validate_dataset("gta5", tmp_path)
    assert report.ok and report.problems == 0
    assert (report.num_images, report.num_labels) == (2, 2)
    assert "no problems found" in str(report)


def test_every_gta5_problem_is_reported_by_file(tmp_path):
    make_gta5(tmp_path, names=("a", "b", "c", "d", "e", "f", "g"))
    img, lab = tmp_path / "images", tmp_path / "labels"
    write_rgb(img / "b.png", 5, 6)  # size mismatch (6x5 vs 6x6)
    os.remove(lab / "c.png")  # image without label
    (img / "d.png").write_bytes(b"garbage")  # unreadable image
    ids = GOOD_IDS.copy()
    ids[0, 0], ids[1, 1], ids[2, 2] = 200, 34, 34
    write_paletted(lab / "e.png", ids)  # unknown ids 34, 200
    write_rgb(lab / "f.png", 6, 6)  # colour label: wrong format
    (lab / "g.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # unreadable label
    write_paletted(lab / "z.png", GOOD_IDS)  # label without image

    report = validate_dataset("gta5", tmp_path)
    assert (report.num_images, report.num_labels) == (7, 7)
    assert report.size_mismatches == [(str(img / "b.png"), str(lab / "b.png"), (6, 5), (6, 6))]
    assert report.images_without_labels == [(str(img / "c.png"), str(lab / "c.png"))]
    assert [p for p, _ in report.unreadable] == [str(img / "d.png"), str(lab / "g.png")]
    assert report.unknown_ids == {str(lab / "e.png"): [34, 200]}
    assert [p for p, _ in report.wrong_format] == [str(lab / "f.png")]
    assert report.labels_without_images == [str(lab / "z.png")]
    assert report.problems == 7 and not report.ok
    text = str(report)
    for name in ("b.png", "c.png", "d.png", "e.png", "f.png", "g.png", "z.png"):
        assert name in text
    assert "[34, 200]" in text and "7 problem(s)" in text


def test_synthia_validation(tmp_path):
    make_synthia(tmp_path, names=("0", "1", "2"))
    labels = tmp_path / "GT" / "LABELS"
    Image.fromarray(SYNTHIA_GOOD.astype(np.uint8)).save(labels / "1.png")  # 8-bit: not SYNTHIA
    raw = SYNTHIA_GOOD.copy()
    raw[0, :3] = [23, 1000, 65535]
    write_png16_rgb(labels / "2.png", np.stack([raw, raw, raw], -1))
    report = validate_dataset("synthia", tmp_path)
    assert [p for p, _ in report.wrong_format] == [str(labels / "1.png")]
    assert "16-bit" in report.wrong_format[0][1]
    assert report.unknown_ids == {str(labels / "2.png"): [23, 1000, 65535]}
    assert report.problems == 2


def test_cityscapes_validation_splits_and_lists(tmp_path):
    make_cityscapes(tmp_path)
    report = validate_dataset("cityscapes", tmp_path)
    assert report.ok and report.splits == ["train", "val"] and report.num_images == 3
    assert validate_dataset("cityscapes", tmp_path, split="val").num_images == 2
    lst = tmp_path / "val.txt"
    lst.write_text("lindau/lindau_000001_000019_leftImg8bit.png\nlindau/lindau_000009_000019_leftImg8bit.png\n")
    report = validate_dataset("cityscapes", tmp_path, split="val", split_list=lst)
    assert report.num_images == 1
    assert report.split_list_missing == [(str(lst), "lindau/lindau_000009_000019_leftImg8bit")]
    assert "lindau_000009_000019" in str(report) and not report.ok
    with pytest.raises(ValueError, match="--split"):
        validate_dataset("cityscapes", tmp_path, split_list=lst)
    with pytest.raises(ValueError, match="cityscapes only"):
        validate_dataset("gta5", tmp_path, split="val")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        validate_dataset("gta5", tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------
# write_trainid_labels


def test_write_gta5_trainids_once(tmp_path):
    make_gta5(tmp_path)
    given = snapshot(tmp_path)
    written = write_trainid_labels("gta5", tmp_path)
    out = tmp_path / "lsr_fast_trainids" / "labels"
    assert sorted(written) == [str(out / "a.png"), str(out / "b.png")]
    for k, name in enumerate(("a", "b")):
        with Image.open(out / f"{name}.png") as im:
            assert im.mode == "L"
            np.testing.assert_array_equal(np.array(im), expected(CS_TABLE, np.roll(GOOD_IDS, k)))
    assert sorted(os.listdir(out)) == ["a.png", "b.png"]  # no temporary files left
    after = snapshot(tmp_path)
    assert all(after[p] == data for p, data in given.items())  # the dataset itself untouched

    converted, raw = GTA5Dataset(tmp_path), GTA5Dataset(tmp_path, use_trainids=False)
    assert all(s[3] for s in converted.samples) and not any(s[3] for s in raw.samples)
    for i in range(2):
        assert torch.equal(converted[i]["label"], raw[i]["label"])
        assert torch.equal(converted[i]["image"], raw[i]["image"])

    # A second run refuses without overwrite and changes nothing.
    before = snapshot(tmp_path)
    with pytest.raises(FileExistsError, match=r"a\.png.*overwrite"):
        write_trainid_labels("gta5", tmp_path)
    assert snapshot(tmp_path) == before
    assert len(write_trainid_labels("gta5", tmp_path, overwrite=True)) == 2


def test_never_writes_over_raw_labels(tmp_path):
    make_gta5(tmp_path)
    before = snapshot(tmp_path)
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="raw label"):
            write_trainid_labels("gta5", tmp_path, out_dir=tmp_path, overwrite=overwrite)
    assert snapshot(tmp_path) == before


def test_write_synthia_and_cityscapes_to_custom_dir(tmp_path):
    make_synthia(tmp_path / "syn")
    out = tmp_path / "conv"
    assert len(write_trainid_labels("synthia", tmp_path / "syn", out_dir=out)) == 2
    with Image.open(out / "GT" / "LABELS" / "0000001.png") as im:
        np.testing.assert_array_equal(np.array(im), expected(SYNTHIA_TABLE, np.roll(SYNTHIA_GOOD, 1)))
    for classes in (16, 19):
        converted = SynthiaDataset(tmp_path / "syn", trainid_dir=out, num_classes=classes)
        raw = SynthiaDataset(tmp_path / "syn", num_classes=classes)
        assert all(s[3] for s in converted.samples) and not any(s[3] for s in raw.samples)
        for i in range(2):
            assert torch.equal(converted[i]["label"], raw[i]["label"])

    make_cityscapes(tmp_path / "cs")
    assert len(write_trainid_labels("cityscapes", tmp_path / "cs")) == 3
    target = tmp_path / "cs" / "lsr_fast_trainids" / "gtFine" / "val" / "lindau" / "lindau_000000_000019_gtFine_labelIds.png"
    with Image.open(target) as im:
        np.testing.assert_array_equal(np.array(im), expected(CS_TABLE, GOOD_IDS))
    ds = CityscapesDataset(tmp_path / "cs", split="val")
    assert all(s[3] for s in ds.samples)
    np.testing.assert_array_equal(ds[0]["label"].numpy(), expected(CS_TABLE, GOOD_IDS))


# ------------------------------------------------------------------------------------------
# CLI glue


def cli(argv):
    parser = configure_parser(argparse.ArgumentParser(prog="lsr-fast prepare-data"))
    return run(parser.parse_args([str(a) for a in argv]))


def test_parser_has_help_for_every_argument():
    parser = configure_parser(argparse.ArgumentParser())
    for action in parser._actions:
        assert action.help, action.dest
    args = parser.parse_args(["cityscapes", "/x", "--split", "val", "--write-trainids", "--out", "/o", "--overwrite",
                              "--split-list", "l.txt"])
    assert (args.kind, args.root, args.split, args.write_trainids, args.out, args.overwrite, args.split_list) == \
        ("cityscapes", "/x", "val", True, "/o", True, "l.txt")


def test_run(tmp_path, capsys):
    make_gta5(tmp_path)
    assert cli(["gta5", tmp_path]) == 0
    assert "no problems found" in capsys.readouterr().out

    assert cli(["gta5", tmp_path, "--write-trainids"]) == 0
    assert "wrote 2 trainId label(s)" in capsys.readouterr().out
    assert cli(["gta5", tmp_path, "--write-trainids"]) == 1
    assert "already exists" in capsys.readouterr().out
    assert cli(["gta5", tmp_path, "--write-trainids", "--overwrite"]) == 0
    capsys.readouterr()

    assert cli(["gta5", tmp_path, "--overwrite"]) == 2
    assert "--write-trainids" in capsys.readouterr().err
    assert cli(["gta5", tmp_path / "nowhere"]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert cli(["gta5", tmp_path, "--split", "val"]) == 2
    capsys.readouterr()

    os.remove(tmp_path / "labels" / "b.png")
    assert cli(["gta5", tmp_path]) == 1
    out = capsys.readouterr().out
    assert "image without label" in out and "b.png" in out
    assert cli(["gta5", tmp_path, "--write-trainids", "--overwrite"]) == 1  # problems block writing
    assert "not written" in capsys.readouterr().out
