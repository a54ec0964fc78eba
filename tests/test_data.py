"""Label tables, dataset loaders, transforms and AugmentedDataset.

Fixture files are written here in the datasets' real formats: GTA5 labels as paletted PNGs, SYNTHIA
labels as 16-bit RGB PNGs made by a small encoder below (independent of OpenCV, which the reader
uses), Cityscapes labels as 8-bit *_gtFine_labelIds.png. Expected labels come from the tables of
DESIGN.md, copied here by hand.
"""

import os
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from lsr_fast.data import (
    AugmentedDataset,
    CityscapesDataset,
    EvalTransform,
    FileFormatError,
    GTA5Dataset,
    PAPER_SIZES,
    SynthiaDataset,
    TrainTransform,
    UnreadableFileError,
    colorize,
    denormalize_image,
    normalize_image,
)
from lsr_fast.data import labels as L

# DESIGN.md, "Datasets".
CS_TABLE = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
            25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
SYNTHIA_TABLE = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9, 1: 10, 10: 11,
                 17: 12, 8: 13, 18: 14, 19: 15, 20: 16, 12: 17, 11: 18}
SUBSET = [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18]  # position = 16-class id


def expected(table, raw, subset=False):
    out = np.array([[table.get(int(v), 255) for v in row] for row in raw], dtype=np.int64)
    if subset:
        out = np.array([[SUBSET.index(v) if v in SUBSET else 255 for v in row] for row in out], dtype=np.int64)
    return out


# ------------------------------------------------------------------------------------------
# Fixture writers


def write_png16_rgb(path, rgb):
    """A 16-bit RGB PNG (colour type 2, big-endian samples), written without any image library."""
    rgb = np.asarray(rgb, dtype=np.uint16)
    height, width, _ = rgb.shape
    rows = b"".join(b"\x00" + rgb[y].astype(">u2").tobytes() for y in range(height))  # filter 0 per row

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)))
        f.write(chunk(b"IDAT", zlib.compress(rows)))
        f.write(chunk(b"IEND", b""))


def write_paletted(path, indices):
    im = Image.fromarray(np.asarray(indices, dtype=np.uint8)).convert("L")
    im = im.convert("P")  # indices keep their values; give it a palette unrelated to the ids
    im.putpalette([(i * 7) % 256 for i in range(256)] + [(i * 13) % 256 for i in range(256)] + [(i * 29) % 256 for i in range(256)])
    assert im.mode == "P"
    im.save(path)


def write_rgb(path, height, width, seed=0):
    rgb = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return rgb


def all_ids_16x16():
    return np.arange(256, dtype=np.uint8).reshape(16, 16)


def make_gta5(root, names=("00001", "00002"), size=(16, 16)):
    os.makedirs(root / "images")
    os.makedirs(root / "labels")
    images = {}
    for k, name in enumerate(names):
        images[name] = write_rgb(root / "images" / f"{name}.png", *size, seed=k)
        ids = np.roll(all_ids_16x16(), k).reshape(-1)[: size[0] * size[1]].reshape(size)
        write_paletted(root / "labels" / f"{name}.png", ids)
    return images


SYNTHIA_RAW = np.array([list(range(0, 12)), list(range(12, 24)), [24, 25, 30, 255, 256, 259, 277, 512 + 21, 1000, 4096, 65535, 3]], dtype=np.uint16)


def synthia_rgb16(raw):
    # G and B hold other values, so reading the wrong channel gives another label map.
    return np.stack([raw, (raw + 1) % 23, np.full_like(raw, 7)], axis=-1)


def make_synthia(root, names=("0000000", "0000001")):
    os.makedirs(root / "RGB")
    os.makedirs(root / "GT" / "LABELS")
    for k, name in enumerate(names):
        write_rgb(root / "RGB" / f"{name}.png", *SYNTHIA_RAW.shape, seed=k)
        write_png16_rgb(root / "GT" / "LABELS" / f"{name}.png", synthia_rgb16(np.roll(SYNTHIA_RAW, k)))


def make_cityscapes(root, split="val", items=(("lindau", "lindau_000001_000019"), ("frankfurt", "frankfurt_000000_000294"))):
    for k, (city, base) in enumerate(items):
        os.makedirs(root / "leftImg8bit" / split / city, exist_ok=True)
        os.makedirs(root / "gtFine" / split / city, exist_ok=True)
        write_rgb(root / "leftImg8bit" / split / city / f"{base}_leftImg8bit.png", 16, 16, seed=k)
        Image.fromarray(np.roll(all_ids_16x16(), 3 * k)).save(root / "gtFine" / split / city / f"{base}_gtFine_labelIds.png")


# ------------------------------------------------------------------------------------------
# Tables


def test_tables_are_the_design_tables():
    assert L.CITYSCAPES_ID_TO_TRAINID == CS_TABLE
    assert L.SYNTHIA_ID_TO_TRAINID == SYNTHIA_TABLE
    assert [L.SUBSET16_TO_TRAINID[k] for k in range(16)] == SUBSET
    assert all(L.TRAINID_TO_SUBSET16[t] == k for k, t in enumerate(SUBSET))
    for v in range(256):
        assert L.CITYSCAPES_LUT[v] == CS_TABLE.get(v, 255)
        assert L.SUBSET16_LUT[v] == (SUBSET.index(v) if v in SUBSET else 255)
        assert L.SUBSET16_INVERSE_LUT[v] == (SUBSET[v] if v < 16 else 255)
    assert L.SYNTHIA_LUT.shape == (65536,)
    values = np.arange(65536)
    assert np.array_equal(L.SYNTHIA_LUT, np.array([SYNTHIA_TABLE.get(int(v), 255) for v in values], dtype=np.uint8))
    assert len(L.CLASS_NAMES_19) == 19 and L.CLASS_NAMES_19[13] == "car"
    assert L.CLASS_NAMES_16[9] == "sky" and "terrain" not in L.CLASS_NAMES_16


def test_lut_functions_numpy_and_torch():
    ids = np.array([[7, 33], [0, 34]], dtype=np.uint8)
    np.testing.assert_array_equal(L.cityscapes_to_trainid(ids), [[0, 18], [255, 255]])
    out = L.cityscapes_to_trainid(torch.tensor([[7, 33], [0, 34]]))
    assert out.dtype == torch.int64 and out.tolist() == [[0, 18], [255, 255]]
    assert L.synthia_to_trainid(torch.tensor([3, 259, 65535])).tolist() == [0, 255, 255]
    sub = L.trainid_to_subset16(torch.tensor([0, 9, 10, 18, 255]))
    assert sub.tolist() == [0, 255, 9, 15, 255]
    assert L.subset16_to_trainid(torch.tensor([0, 9, 15, 255])).tolist() == [0, 10, 18, 255]
    with pytest.raises(ValueError, match="256"):
        L.cityscapes_to_trainid(torch.tensor([256]))
    with pytest.raises(ValueError, match="-1"):
        L.cityscapes_to_trainid(np.array([-1]))
    with pytest.raises(TypeError, match="labels must be an integer tensor, got torch.float32"):
        L.cityscapes_to_trainid(torch.tensor([1.0]))


def test_colorize():
    out = colorize(torch.tensor([[0, 255], [13, 18]]))
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
    assert out.tolist() == [[[128, 64, 128], [0, 0, 0]], [[0, 0, 142], [119, 11, 32]]]
    # 16-class id 9 is trainId 10, sky.
    assert colorize(np.array([[9]]), num_classes=16).tolist() == [[[70, 130, 180]]]
    with pytest.raises(ValueError, match="19"):
        colorize(np.array([[19]]))
    with pytest.raises(ValueError, match="num_classes"):
        colorize(np.array([[0]]), num_classes=7)


# ------------------------------------------------------------------------------------------
# GTA5


def test_gta5_reads_palette_indices_through_the_table(tmp_path):
    images = make_gta5(tmp_path)
    ds = GTA5Dataset(tmp_path)
    assert len(ds) == 2 and ds.num_classes == 19
    item = ds[0]
    assert item["name"] == "00001"
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 16, 16)
    assert np.array_equal(item["image"].permute(1, 2, 0).numpy(), images["00001"])
    assert item["label"].dtype == torch.int64
    np.testing.assert_array_equal(item["label"].numpy(), expected(CS_TABLE, all_ids_16x16()))
    np.testing.assert_array_equal(ds[1]["label"].numpy(), expected(CS_TABLE, np.roll(all_ids_16x16(), 1)))
    ds16 = GTA5Dataset(tmp_path, num_classes=16)
    np.testing.assert_array_equal(ds16[0]["label"].numpy(), expected(CS_TABLE, all_ids_16x16(), subset=True))


def test_gta5_grey_label_accepted_rgb_label_rejected(tmp_path):
    make_gta5(tmp_path, names=("a", "b"))
    Image.fromarray(all_ids_16x16()).save(tmp_path / "labels" / "a.png")  # mode L
    np.testing.assert_array_equal(GTA5Dataset(tmp_path)[0]["label"].numpy(), expected(CS_TABLE, all_ids_16x16()))
    write_rgb(tmp_path / "labels" / "b.png", 16, 16)
    with pytest.raises(FileFormatError, match=r"b\.png.*'RGB'"):
        GTA5Dataset(tmp_path)[1]


# ------------------------------------------------------------------------------------------
# SYNTHIA


def test_synthia_reads_red_channel_of_16_bit_labels(tmp_path):
    make_synthia(tmp_path)
    ds = SynthiaDataset(tmp_path, num_classes=19)
    item = ds[0]
    assert item["name"] == "0000000" and item["image"].shape == (3, 3, 12)
    np.testing.assert_array_equal(item["label"].numpy(), expected(SYNTHIA_TABLE, SYNTHIA_RAW))
    np.testing.assert_array_equal(ds[1]["label"].numpy(), expected(SYNTHIA_TABLE, np.roll(SYNTHIA_RAW, 1)))
    # Ids above 255 are void, not wrapped modulo 256 (259 would otherwise read as 3, road).
    assert item["label"][2, 5] == 255 and item["label"][2, 7] == 255
    ds16 = SynthiaDataset(tmp_path)  # the default is the 16-class subset
    assert ds16.num_classes == 16
    np.testing.assert_array_equal(ds16[0]["label"].numpy(), expected(SYNTHIA_TABLE, SYNTHIA_RAW, subset=True))


def test_synthia_rejects_labels_that_are_not_16_bit_rgb(tmp_path):
    make_synthia(tmp_path, names=("x", "y"))
    Image.fromarray(SYNTHIA_RAW.astype(np.uint8)).save(tmp_path / "GT" / "LABELS" / "x.png")  # 8-bit
    with pytest.raises(FileFormatError, match=r"x\.png.*16-bit"):
        SynthiaDataset(tmp_path)[0]
    Image.fromarray(SYNTHIA_RAW.astype(np.uint16)).save(tmp_path / "GT" / "LABELS" / "y.png")  # 16-bit grey
    with pytest.raises(FileFormatError, match=r"y\.png.*channel"):
        SynthiaDataset(tmp_path)[1]


# ------------------------------------------------------------------------------------------
# Cityscapes


def test_cityscapes_tree(tmp_path):
    make_cityscapes(tmp_path)
    ds = CityscapesDataset(tmp_path, split="val")
    assert ds.names == ["frankfurt/frankfurt_000000_000294_leftImg8bit", "lindau/lindau_000001_000019_leftImg8bit"]
    # frankfurt was written second (k=1): ids rolled by 3.
    np.testing.assert_array_equal(ds[0]["label"].numpy(), expected(CS_TABLE, np.roll(all_ids_16x16(), 3)))
    np.testing.assert_array_equal(ds[1]["label"].numpy(), expected(CS_TABLE, all_ids_16x16()))
    ds16 = CityscapesDataset(tmp_path, num_classes=16)
    np.testing.assert_array_equal(ds16[1]["label"].numpy(), expected(CS_TABLE, all_ids_16x16(), subset=True))
    with pytest.raises(FileNotFoundError, match=r"leftImg8bit.train"):
        CityscapesDataset(tmp_path, split="train")


# ------------------------------------------------------------------------------------------
# Split lists and errors


def test_split_list_order_and_formats(tmp_path):
    make_gta5(tmp_path, names=("00001", "00002", "00003"))
    lst = tmp_path / "list.txt"
    lst.write_text("# a comment\n00003.png\n\n00001\n")
    ds = GTA5Dataset(tmp_path, split_list=lst)
    assert ds.names == ["00003", "00001"]
    assert ds[0]["name"] == "00003"
    lst.write_text("00001\n00009.png\n")
    with pytest.raises(ValueError, match=r"list\.txt.*'00009'"):
        GTA5Dataset(tmp_path, split_list=lst)
    with pytest.raises(FileNotFoundError, match="nolist.txt"):
        GTA5Dataset(tmp_path, split_list=tmp_path / "nolist.txt")


def test_cityscapes_split_list(tmp_path):
    make_cityscapes(tmp_path)
    lst = tmp_path / "val.txt"
    lst.write_text("lindau/lindau_000001_000019_leftImg8bit.png\n")
    ds = CityscapesDataset(tmp_path, split_list=lst)
    assert ds.names == ["lindau/lindau_000001_000019_leftImg8bit"]


def test_missing_root_and_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        GTA5Dataset(tmp_path / "nowhere")
    os.makedirs(tmp_path / "images")
    with pytest.raises(FileNotFoundError, match="labels"):
        GTA5Dataset(tmp_path)
    os.makedirs(tmp_path / "labels")
    with pytest.raises(ValueError, match="empty"):
        GTA5Dataset(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"GT.LABELS"):
        os.makedirs(tmp_path / "syn" / "RGB")
        SynthiaDataset(tmp_path / "syn")
    with pytest.raises(ValueError, match="num_classes"):
        GTA5Dataset(tmp_path, num_classes=13)


def test_missing_label_names_the_label(tmp_path):
    make_gta5(tmp_path)
    os.remove(tmp_path / "labels" / "00002.png")
    with pytest.raises(FileNotFoundError, match=r"labels.00002\.png"):
        GTA5Dataset(tmp_path)


def test_size_mismatch_names_both_files(tmp_path):
    make_gta5(tmp_path, names=("a",))
    write_rgb(tmp_path / "images" / "a.png", 16, 15)
    with pytest.raises(ValueError, match=r"images.a\.png.*15x16.*labels.a\.png.*16x16"):
        GTA5Dataset(tmp_path)[0]


def test_unreadable_files(tmp_path):
    make_gta5(tmp_path, names=("a", "b"))
    (tmp_path / "images" / "a.png").write_bytes(b"not a png")
    (tmp_path / "labels" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    ds = GTA5Dataset(tmp_path)
    with pytest.raises(UnreadableFileError, match=r"images.a\.png"):
        ds[0]
    with pytest.raises(UnreadableFileError, match=r"labels.b\.png"):
        ds[1]
    make_synthia(tmp_path / "syn", names=("c",))
    (tmp_path / "syn" / "GT" / "LABELS" / "c.png").write_bytes(b"garbage")
    with pytest.raises(UnreadableFileError, match=r"c\.png"):
        SynthiaDataset(tmp_path / "syn")[0]


def test_grey_image_rejected(tmp_path):
    make_gta5(tmp_path, names=("a",))
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "images" / "a.png")
    with pytest.raises(FileFormatError, match=r"a\.png.*'L'.*RGB"):
        GTA5Dataset(tmp_path)[0]


def test_converted_trainids_are_preferred(tmp_path):
    make_synthia(tmp_path, names=("x",))
    converted = tmp_path / "lsr_fast_trainids" / "GT" / "LABELS"
    os.makedirs(converted)
    fake = np.full(SYNTHIA_RAW.shape, 13, np.uint8)
    fake[0, 0] = 255
    Image.fromarray(fake).save(converted / "x.png")
    item = SynthiaDataset(tmp_path, num_classes=19)[0]
    assert item["label"][0, 0] == 255 and (item["label"].flatten()[1:] == 13).all()
    assert SynthiaDataset(tmp_path, num_classes=16)[0]["label"][0, 1] == 12  # car is subset class 12
    raw = SynthiaDataset(tmp_path, num_classes=19, use_trainids=False)[0]["label"]
    np.testing.assert_array_equal(raw.numpy(), expected(SYNTHIA_TABLE, SYNTHIA_RAW))
    fake[1, 1] = 19  # not a trainId
    Image.fromarray(fake).save(converted / "x.png")
    with pytest.raises(FileFormatError, match=r"lsr_fast_trainids.*x\.png.*\[19\]"):
        SynthiaDataset(tmp_path)[0]


# ------------------------------------------------------------------------------------------
# Transforms

PLAIN = dict(white_point=0.0, jitter=0.0, blur_prob=0.0, normalize="none")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_paper_sizes():
    assert PAPER_SIZES == {"gta5": (720, 1280), "synthia": (760, 1280), "cityscapes": (512, 1024)}


def test_resize_nearest_by_hand():
    label = torch.arange(16).view(4, 4)
    image = torch.zeros(3, 4, 4, dtype=torch.uint8)
    t = TrainTransform(resize=(2, 2), flip=False, **PLAIN)
    x, y = t(image, label, gen(0))
    assert x.shape == (3, 2, 2) and x.dtype == torch.float32 and y.dtype == torch.int64
    # Output cell i samples input row floor((i + 0.5) * 2) = 1, 3.
    assert y.tolist() == [[5, 7], [13, 15]]
    _, up = TrainTransform(resize=(4, 4), flip=False, **PLAIN)(image[:, :2, :2], torch.tensor([[1, 2], [3, 4]]), gen(0))
    assert up.tolist() == [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]


def test_resize_keeps_only_present_label_values_and_clamps_image():
    g = gen(1)
    label = torch.tensor([0, 5, 255])[torch.randint(0, 3, (37, 53), generator=g)]
    image = ((torch.arange(53) % 2) * 255).to(torch.uint8).expand(3, 37, 53).contiguous()  # stripes overshoot bicubic
    x, y = TrainTransform(resize=(61, 90), flip=False, **PLAIN)(image, label, g)
    assert x.shape == (3, 61, 90) and y.shape == (61, 90)
    assert set(y.unique().tolist()) <= {0, 5, 255}
    assert x.min() >= 0.0 and x.max() <= 1.0  # normalize="none": /255 after clamping to [0, 255]
    x, y = EvalTransform(resize=(20, 30), normalize="none")(image, label)
    assert x.shape == (3, 20, 30) and torch.equal(y, label)  # evaluation keeps full label resolution


def encoded(height=12, width=16):
    """Image channels 0 and 1 hold each pixel's row and column; the label holds row*100 + col."""
    rows = torch.arange(height).view(-1, 1).expand(height, width)
    cols = torch.arange(width).view(1, -1).expand(height, width)
    image = torch.stack([rows, cols, torch.zeros_like(rows)]).to(torch.uint8)
    return image, rows * 100 + cols


def test_crop_and_flip_move_image_and_label_together():
    image, label = encoded()
    t = TrainTransform(crop=(5, 7), **PLAIN)
    tops, flips = set(), set()
    for seed in range(40):
        x, y = t(image, label, gen(seed))
        rows, cols = (x[0] * 255).round().long(), (x[1] * 255).round().long()
        assert torch.equal(y, rows * 100 + cols)
        # A contiguous window: rows increase by 1 down, columns by +-1 across (flipped or not).
        assert (rows[1:] - rows[:-1] == 1).all()
        step = cols[:, 1:] - cols[:, :-1]
        assert (step == 1).all() or (step == -1).all()
        tops.add(int(rows[0, 0]))
        flips.add(int(step[0, 0]))
        assert 0 <= rows.min() and rows.max() <= 11 and 0 <= cols.min() and cols.max() <= 15
    assert len(tops) > 3 and flips == {1, -1}


def test_crop_larger_than_image_is_an_error():
    image, label = encoded(6, 8)
    with pytest.raises(ValueError, match=r"crop \(7, 8\)"):
        TrainTransform(crop=(7, 8))(image, label, gen(0))


def test_same_generator_seed_same_output():
    image = torch.randint(0, 256, (3, 20, 24), dtype=torch.uint8, generator=gen(5))
    label = torch.randint(0, 19, (20, 24), generator=gen(6))
    t = TrainTransform(resize=(18, 22), crop=(10, 12))
    a, b = t(image, label, gen(3)), t(image, label, gen(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert any(not torch.equal(a[0], t(image, label, gen(s))[0]) for s in range(4, 8))


def test_white_point_range():
    image = torch.full((3, 4, 4), 100, dtype=torch.uint8)
    label = torch.zeros(4, 4, dtype=torch.long)
    t = TrainTransform(flip=False, white_point=75.0, jitter=0.0, blur_prob=0.0, normalize="none")
    values = []
    for seed in range(200):
        x, _ = t(image, label, gen(seed))
        per_channel = x.view(3, -1)
        assert (per_channel == per_channel[:, :1]).all()  # a gain per channel, the same everywhere
        values.append(per_channel[:, 0] * 255)
    values = torch.stack(values)
    # 100 * (255 + u) / 255 with u in [-75, 75]: [70.59, 129.41].
    assert values.min() >= 100 * 180 / 255 - 1e-3 and values.max() <= 100 * 330 / 255 + 1e-3
    assert values.min() < 75 and values.max() > 125
    assert (values[:, 0] != values[:, 1]).any()  # channels drawn independently


def test_jitter_range_and_clipping():
    label = torch.zeros(2, 2, dtype=torch.long)
    t = TrainTransform(flip=False, white_point=0.0, jitter=25.0, blur_prob=0.0, normalize="none")
    mid = torch.stack([t(torch.full((3, 2, 2), 100, dtype=torch.uint8), label, gen(s))[0][:, 0, 0] * 255 for s in range(200)])
    assert mid.min() >= 75 - 1e-3 and mid.max() <= 125 + 1e-3
    assert mid.min() < 80 and mid.max() > 120
    high = torch.stack([t(torch.full((3, 2, 2), 250, dtype=torch.uint8), label, gen(s))[0][:, 0, 0] * 255 for s in range(200)])
    assert high.max() == 255 and high.min() >= 225 - 1e-3  # clipped at 255, not wrapped


def test_blur():
    label = torch.zeros(9, 9, dtype=torch.long)
    edge = torch.zeros(3, 9, 9, dtype=torch.uint8)
    edge[:, :, 5:] = 200
    never = TrainTransform(flip=False, white_point=0.0, jitter=0.0, blur_prob=0.0, normalize="none")
    assert torch.equal(never(edge, label, gen(0))[0] * 255, edge.float())
    always = TrainTransform(flip=False, white_point=0.0, jitter=0.0, blur_prob=1.0, normalize="none")
    x = always(edge, label, gen(0))[0] * 255
    assert 0 < x[0, 4, 4] < 200 and 0 < x[0, 4, 5] < 200  # the edge is smoothed
    assert abs(float(x[0, 4, 0])) < 1e-3  # far from the edge, unchanged
    flat = torch.full((3, 9, 9), 77, dtype=torch.uint8)
    assert torch.allclose(always(flat, label, gen(0))[0] * 255, flat.float(), atol=1e-3)
    half = TrainTransform(flip=False, white_point=0.0, jitter=0.0, blur_prob=0.5, normalize="none")
    blurred = sum(not torch.equal(half(edge, label, gen(s))[0] * 255, edge.float()) for s in range(100))
    assert 30 < blurred < 70


def test_blur_of_an_impulse_by_hand():
    impulse = torch.zeros(3, 9, 9, dtype=torch.uint8)
    impulse[:, 4, 4] = 255
    t = TrainTransform(flip=False, white_point=0.0, jitter=0.0, blur_prob=1.0, blur_sigma=(1.0, 1.0), normalize="none")
    x = t(impulse, torch.zeros(9, 9, dtype=torch.long), gen(0))[0] * 255
    # sigma 1, radius 3: 1-D weights exp(-d^2 / 2), d = -3..3, sum 2.505949; the centre gets
    # 255 / 2.505949^2 = 40.606, its neighbour 40.606 * exp(-1/2) = 24.629.
    assert abs(float(x[0, 4, 4]) - 40.606) < 1e-2
    assert abs(float(x[1, 4, 5]) - 24.629) < 1e-2
    assert abs(float(x.sum()) - 3 * 255) < 1e-2


def test_normalize_by_hand():
    image = torch.tensor([255, 0, 128], dtype=torch.uint8).view(3, 1, 1)
    x = normalize_image(image, "imagenet").flatten()
    want = [(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (128 / 255 - 0.406) / 0.225]
    assert torch.allclose(x, torch.tensor(want), atol=1e-5)
    rgb = torch.tensor([10, 20, 30], dtype=torch.uint8).view(3, 1, 1)
    caffe = normalize_image(rgb, "caffe").flatten()  # B, G, R minus the BGR mean
    assert torch.allclose(caffe.double(), torch.tensor([30 - 104.00698793, 20 - 116.66876762, 10 - 122.67891434], dtype=torch.float64), atol=1e-4)
    assert torch.allclose(normalize_image(rgb, "none").flatten(), torch.tensor([10 / 255, 20 / 255, 30 / 255]))
    with pytest.raises(ValueError, match="normalize"):
        normalize_image(rgb, "bgr")


@pytest.mark.parametrize("mode", ["imagenet", "caffe", "none"])
def test_normalize_round_trip(mode):
    image = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8, generator=gen(0))
    back = denormalize_image(normalize_image(image, mode), mode)
    assert back.dtype == torch.uint8 and torch.equal(back, image)
    assert torch.equal(denormalize_image(normalize_image(image[0], mode), mode), image[0])


def test_transform_input_checks():
    with pytest.raises(ValueError, match="uint8"):
        TrainTransform()(torch.zeros(3, 4, 4), torch.zeros(4, 4, dtype=torch.long), gen(0))
    with pytest.raises(ValueError, match="label"):
        TrainTransform()(torch.zeros(3, 4, 4, dtype=torch.uint8), torch.zeros(4, 5, dtype=torch.long), gen(0))
    with pytest.raises(ValueError, match="white_point"):
        TrainTransform(white_point=300)
    with pytest.raises(ValueError, match="resize"):
        TrainTransform(resize=(0, 4))


# ------------------------------------------------------------------------------------------
# AugmentedDataset


def test_augmented_dataset_reproducible_by_key(tmp_path):
    make_gta5(tmp_path, names=("a", "b", "c"))
    aug = AugmentedDataset(GTA5Dataset(tmp_path), TrainTransform(crop=(6, 6)), seed=3)
    assert len(aug) == 3
    first = aug[(1, 42)]
    assert first["index"] == 1 and first["name"] == "b"
    assert first["image"].dtype == torch.float32 and first["image"].shape == (3, 6, 6)
    assert first["label"].dtype == torch.int64 and first["label"].shape == (6, 6)
    again = AugmentedDataset(GTA5Dataset(tmp_path), TrainTransform(crop=(6, 6)), seed=3)[(1, 42)]
    assert torch.equal(first["image"], again["image"]) and torch.equal(first["label"], again["label"])
    assert torch.equal(aug[1]["image"], aug[(1, 0)]["image"])
    assert any(not torch.equal(first["image"], aug[(1, s)]["image"]) for s in range(5))
    other_seed = AugmentedDataset(GTA5Dataset(tmp_path), TrainTransform(crop=(6, 6)), seed=4)
    assert any(not torch.equal(first["image"], other_seed[(1, s)]["image"]) for s in (42, 43))
    assert torch.equal(aug[-1]["image"], aug[2]["image"])
    with pytest.raises(IndexError, match="index 3 is out of range for a dataset of 3 samples"):
        aug[3]
    with pytest.raises(TypeError, match=r"key must be an index or an \(index, sample_seed\) pair, got \(1, 2, 3\)"):
        aug[(1, 2, 3)]
