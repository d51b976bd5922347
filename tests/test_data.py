import io
import os
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from selfboottok.data import (CLASS_NAMES, GLOBAL_FACTORS, LOCAL_FACTORS, TEXTURE_NAMES, CorruptImageWarning,
                              ImageFolder, SyntheticShapes, build_dataset, render_shapes)


def blur(x, sigma=1.5):
    """Separable Gaussian blur of [B, C, H, W]."""
    r = 4
    k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32) ** 2 / (2 * sigma**2))
    k = (k / k.sum()).to(x.dtype)
    C = x.shape[1]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).repeat(C, 1, 1, 1), groups=C)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).repeat(C, 1, 1, 1), groups=C)


@pytest.fixture(scope="module")
def train():
    return SyntheticShapes(2000, seed=0)


def subset(table, idx):
    return {k: v[idx].copy() for k, v in table.items()}


# ---------------------------------------------------------------------------------------------
# SyntheticShapes


def test_determinism_across_instances_sizes_and_read_order(train):
    x, y = train.tensors()
    other = SyntheticShapes(333, seed=0)  # different n, read backwards and in a random order
    for i in list(range(332, -1, -37)) + list(np.random.default_rng(1).permutation(333)[:20]):
        xi, yi = other[i]
        assert yi == y[i].item()
        assert torch.equal(xi, x[i]), i
    assert other.factors(17) == train.factors(17)
    assert torch.equal(SyntheticShapes(2000, seed=0).tensors()[0][1500:], x[1500:])


def test_seeds_and_splits_differ(train):
    x = train.tensors()[0][:200]
    for other in (SyntheticShapes(200, seed=1), SyntheticShapes(200, seed=0, split="test")):
        xo = other.tensors()[0]
        # no image of one set appears in the other
        d = torch.cdist(x.flatten(1), xo.flatten(1))
        assert d.min() > 1.0
        assert not np.allclose(train.factor_table()["pos_x"][:200], other.factor_table()["pos_x"])
    with pytest.raises(ValueError, match="split"):
        SyntheticShapes(10, split="training")


def test_values_dtype_labels(train):
    img, label = train[5]
    assert img.dtype == torch.float32 and img.shape == (3, 32, 32)
    assert isinstance(label, int) and label == train.factors(5)["label"]
    x, y = train.tensors()
    assert x.shape == (2000, 3, 32, 32) and y.dtype == torch.int64
    assert x.min() >= -1 and x.max() <= 1 and x.min() < -0.9 and x.max() > 0.9
    assert torch.bincount(y, minlength=10).tolist() == [200] * 10
    assert len(CLASS_NAMES) == train.num_classes == 10
    assert train[-1][1] == train[1999][1]
    with pytest.raises(IndexError):
        train[2000]
    for bad in (dict(n=0), dict(n=5, seed=-1), dict(n=5, image_size=4)):
        with pytest.raises(ValueError):
            SyntheticShapes(**bad)


def test_factor_table_matches_images(train):
    t = train.factor_table()
    assert set(GLOBAL_FACTORS) | set(LOCAL_FACTORS) <= set(t)
    assert not set(GLOBAL_FACTORS) & set(LOCAL_FACTORS)
    assert all(v.shape == (2000,) for v in t.values())
    assert set(np.unique(t["texture"])) == set(range(len(TEXTURE_NAMES)))
    row = train.factors(123)
    assert all(row[k] == t[k][123] for k in row)
    # the table alone regenerates the images
    idx = np.arange(0, 2000, 97)
    assert torch.allclose(torch.from_numpy(render_shapes(subset(t, idx))), train.tensors()[0][idx], atol=1e-6)


def test_position_moves_the_shape(train):
    f = subset(train.factor_table(), np.arange(40))
    f.pop("noise_key")  # no noise: the background is flat
    f["texture"] = np.zeros(40, np.int64)  # texture sits in the image frame, it would not move
    f["pos_x"], f["size"] = np.full(40, -0.2), np.full(40, 0.35)  # at most 0.56 wide each side
    g = dict(f, pos_x=np.full(40, 0.2))
    a, b = torch.from_numpy(render_shapes(f)), torch.from_numpy(render_shapes(g))

    def centroid_x(x):
        fg = (x - x[:, :, :1, :1]).abs().sum(1)  # distance from the corner (background) colour
        return (fg.sum(1) * torch.arange(32.0)).sum(1) / fg.sum((1, 2))

    shift = centroid_x(b) - centroid_x(a)
    assert torch.allclose(shift, torch.full_like(shift, 0.4 * 16), atol=0.2)  # 0.4 units = 6.4 px
    # the change stays within the columns the shape covers, before or after
    diff = (a - b).abs().amax((1, 2))
    assert (diff[:, :3] == 0).all() and (diff[:, -3:] == 0).all()
    assert (diff[:, 12] > 0.1).all() and (diff[:, 19] > 0.1).all()  # both shape centres


def test_local_factors_are_high_frequency_global_are_not(train):
    f = subset(train.factor_table(), np.arange(200))
    f["texture"] = np.full(200, TEXTURE_NAMES.index("stripes"))
    base = torch.from_numpy(render_shapes(f))

    def blurred_fraction(**changes):
        other = torch.from_numpy(render_shapes(dict(f, **changes)))
        raw = ((other - base) ** 2).mean()
        assert raw > 1e-3  # the change is visible
        return (((blur(other) - blur(base)) ** 2).mean() / raw).item()

    local = blurred_fraction(texture_phase=f["texture_phase"] + np.pi, noise_key=f["noise_key"] + 1,
                             edge_width=2.5 - f["edge_width"] + 0.6)
    hue = blurred_fraction(hue=(f["hue"] + 0.5) % 1)
    pos = blurred_fraction(pos_x=f["pos_x"] + 0.1)
    size = blurred_fraction(size=f["size"] * 1.25)
    assert local < 0.08, local  # local changes vanish under a blur
    assert min(hue, pos, size) > 0.15, (hue, pos, size)  # global ones survive it


def test_classes_separable_by_nearest_class_mean(train):
    test = SyntheticShapes(500, split="test")

    def features(x):  # shift-invariant: FFT magnitude of the blurred foreground map
        fg = blur((x - x[:, :, :1, :1]).abs().sum(1, keepdim=True))
        a = torch.fft.fft2(fg).abs().flatten(1)
        return (a - a.mean(1, keepdim=True)) / a.std(1, keepdim=True)

    (xa, ya), (xb, yb) = train.tensors(), test.tensors()
    fa, fb = features(xa), features(xb)
    means = torch.stack([fa[ya == c].mean(0) for c in range(10)])
    acc = (torch.cdist(fb, means).argmin(1) == yb).float().mean().item()
    assert acc > 0.3, acc  # chance is 0.1


def test_other_image_size_keeps_the_layout():
    a = SyntheticShapes(64, image_size=32).tensors()[0]
    b = SyntheticShapes(64, image_size=64).tensors()[0]
    assert b.shape == (64, 3, 64, 64)
    b_small = F.avg_pool2d(b, 2)
    err = ((blur(b_small) - blur(a)) ** 2).mean()
    assert err < 0.05 * a.var(), (err, a.var())


def test_tensors_shares_cache_with_getitem():
    ds = SyntheticShapes(300)
    x0 = ds[299][0]
    x, _ = ds.tensors(progress=False)
    assert torch.equal(x[299], x0) and x.shape[0] == 300


# ---------------------------------------------------------------------------------------------
# ImageFolder


def _png(path, img):
    img.save(path, format="PNG")


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "imgs"
    (root / "dog").mkdir(parents=True)
    (root / "cat" / "sub").mkdir(parents=True)
    (root / ".hidden").mkdir()
    # three vertical bands, red | green | blue, wider than tall
    bands = np.zeros((20, 90, 3), np.uint8)
    bands[:, :30, 0] = bands[:, 30:60, 1] = bands[:, 60:, 2] = 255
    _png(root / "cat" / "bands.PNG", Image.fromarray(bands))
    _png(root / "cat" / "sub" / "gray.png", Image.fromarray(np.tile(np.arange(0, 250, 10, dtype=np.uint8), (25, 1)), "L"))
    rgba = np.zeros((30, 30, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:15, :, 3] = 255  # top half opaque red, bottom half fully transparent
    _png(root / "dog" / "rgba.png", Image.fromarray(rgba, "RGBA"))
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(buf, "JPEG")
    (root / "dog" / "photo.JpEg").write_bytes(buf.getvalue())
    (root / "dog" / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "dog" / "bad.jpg").write_bytes(np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8).tobytes())
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


def test_image_folder_layout_and_conversion(folder):
    with pytest.warns(CorruptImageWarning, match="bad.jpg"):
        ds = ImageFolder(folder, 16)
    assert ds.classes == ["cat", "dog"] and ds.num_classes == 2
    names = [os.path.basename(p) for p, _ in ds.samples]
    assert names == ["bands.PNG", "gray.png", "photo.JpEg", "rgba.png", "truncated.jpg"]
    assert ds.targets == [0, 0, 1, 1, 1]
    assert [os.path.basename(p) for p in ds.skipped] == ["bad.jpg"]

    bands, label = ds[0]
    assert label == 0 and bands.shape == (3, 16, 16) and bands.dtype == torch.float32
    assert bands.min() >= -1 and bands.max() <= 1
    # short side 20 -> 16, width 90 -> 72, centre crop keeps the green band only
    assert (bands[1] > 0.9).all() and (bands[0] < -0.9).all() and (bands[2] < -0.9).all()

    gray = ds[1][0]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    assert gray[0, :, -1].mean() > gray[0, :, 0].mean()  # the ramp survives

    rgba = ds[3][0]
    assert rgba.shape == (3, 16, 16)
    assert torch.allclose(rgba[:, -3:], torch.ones(3, 3, 16))  # transparent -> white background
    assert (rgba[0, :5] > 0.5).all() and (rgba[1, :5] < -0.9).all()  # opaque red stays red

    sub = ImageFolder(folder, 8, classes=["dog"], verify=False)
    assert sub.classes == ["dog"] and set(sub.targets) == {0} and len(sub) == 4


def test_image_folder_corrupt_files_never_crash_a_loader(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = ImageFolder(folder, 16, verify=False)
    assert len(ds) == 6 and ds.skipped == []
    bad = [os.path.basename(p) for p, _ in ds.samples].index("bad.jpg")
    with pytest.warns(CorruptImageWarning, match="bad.jpg"):
        x, label = ds[bad]
    assert x.shape == (3, 16, 16) and label == 1  # the next readable sample, dog/photo.JpEg
    with pytest.warns(CorruptImageWarning, match="truncated.jpg"):
        ds[len(ds) - 1]  # wraps around to the first sample
    assert len(ds.skipped) == 2

    for workers in (0, 2):
        fresh = ImageFolder(folder, 16, verify=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            batches = list(DataLoader(fresh, batch_size=4, num_workers=workers))
        assert sum(len(b[1]) for b in batches) == 6
        assert all(b[0].shape[1:] == (3, 16, 16) for b in batches)


def test_image_folder_errors(tmp_path, folder):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolder(tmp_path / "nope", 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class folders"):
        ImageFolder(tmp_path / "empty", 16)
    (tmp_path / "noimg" / "a").mkdir(parents=True)
    (tmp_path / "noimg" / "a" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="no images"):
        ImageFolder(tmp_path / "noimg", 16)
    (tmp_path / "allbad" / "a").mkdir(parents=True)
    (tmp_path / "allbad" / "a" / "x.png").write_bytes(b"garbage")
    with pytest.warns(CorruptImageWarning), pytest.raises(ValueError, match="could be read"):
        ImageFolder(tmp_path / "allbad", 16)
    with pytest.raises(ValueError, match="missing"):
        ImageFolder(folder, 16, classes=["cat", "bird"])
    with pytest.raises(NotADirectoryError):
        ImageFolder(folder / "cat" / "bands.PNG", 16)


def test_sixteen_bit_png(tmp_path):
    (tmp_path / "a").mkdir()
    a = np.full((8, 8), 65535, np.uint16)
    a[:, :4] = 0
    Image.fromarray(a).save(tmp_path / "a" / "deep.png")
    x = ImageFolder(tmp_path, 8)[0][0]
    assert (x[:, :, -2:] > 0.99).all() and (x[:, :, :2] < -0.99).all()


def test_build_dataset(folder, tmp_path):
    ds = build_dataset("synthetic", 32, n=50, seed=2, split="test")
    assert isinstance(ds, SyntheticShapes) and len(ds) == 50 and ds.split == "test" and ds.seed == 2
    assert len(build_dataset()) == 10_000
    with pytest.warns(CorruptImageWarning):
        f = build_dataset(str(folder), 16)
    assert isinstance(f, ImageFolder) and len(f) == 5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert len(build_dataset(folder, 16, n=3, seed=0)) == 3
    # ImageNet-style root with split folders
    (tmp_path / "inet" / "train" / "x").mkdir(parents=True)
    (tmp_path / "inet" / "val" / "y").mkdir(parents=True)
    _png(tmp_path / "inet" / "train" / "x" / "1.png", Image.new("RGB", (9, 9)))
    _png(tmp_path / "inet" / "val" / "y" / "1.png", Image.new("RGB", (9, 9)))
    assert build_dataset(tmp_path / "inet", 8).classes == ["x"]
    assert build_dataset(tmp_path / "inet", 8, split="test").classes == ["y"]
    with pytest.raises(FileNotFoundError, match="neither"):
        build_dataset("imagenet-nope", 32)
