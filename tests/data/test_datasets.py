"""Image loading: formats, orientation, channel rules, crop/resize/scaling, flips, datasets from CSVs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ddpm_ood.config import DataConfig
from ddpm_ood.data.datasets import ImageDataset, dataset_from_csv, load_image
from ddpm_ood.data.splits import write_split_csv
from ddpm_ood.errors import UserError
from ddpm_ood.fileio import image_stem

GRAY = DataConfig(is_grayscale=True)
RGB = DataConfig(is_grayscale=False)


def save(path, array) -> str:
    np.save(path, array)
    return str(path)


def ramp(h=6, w=5, seed=0) -> np.ndarray:
    """Distinct values everywhere, so any transpose/flip shows."""
    return np.random.default_rng(seed).permutation(h * w).reshape(h, w).astype(np.uint8) + 3


def scaled(a: np.ndarray) -> torch.Tensor:
    a = torch.as_tensor(a, dtype=torch.float32)
    return (a - a.min()) / (a.max() - a.min())


@pytest.mark.parametrize("shape", [(6, 5), (1, 6, 5)])
def test_grayscale_npy_min_max_scaled(tmp_path, shape):
    a = ramp().reshape(shape)
    x = load_image(save(tmp_path / "a.npy", a), GRAY)
    assert x.dtype == torch.float32 and x.shape == (1, 6, 5) and type(x) is torch.Tensor
    assert x.min() == 0 and x.max() == 1
    torch.testing.assert_close(x, scaled(a).reshape(1, 6, 5))


def test_rgb_scaled_over_all_channels_together(tmp_path):
    a = np.stack([ramp(seed=k) * (k + 1) // 2 for k in range(3)]).astype(np.float32)
    x = load_image(save(tmp_path / "a.npy", a), RGB)
    assert x.shape == (3, 6, 5)
    torch.testing.assert_close(x, scaled(a))
    assert x[0].max() < 1  # channel 0 alone is not stretched to [0, 1]


def test_constant_image_becomes_zeros(tmp_path):
    x = load_image(save(tmp_path / "c.npy", np.full((4, 4), 7, np.uint8)), GRAY)
    assert torch.equal(x, torch.zeros(1, 4, 4))


def test_flips(tmp_path):
    a = ramp()
    p = save(tmp_path / "a.npy", a)
    x, v, h = (load_image(p, GRAY, flip=f) for f in (None, "vflip", "hflip"))
    torch.testing.assert_close(v[0], scaled(a[::-1].copy()))  # upside-down: rows reversed
    torch.testing.assert_close(h[0], scaled(a[:, ::-1].copy()))  # mirror: columns reversed
    assert torch.equal(v[0, 0], x[0, -1]) and torch.equal(h[0, :, 0], x[0, :, -1])


def test_png_orientation_and_channel_order(tmp_path):
    gray = np.zeros((6, 4), np.uint8)
    gray[0, :] = 255  # top row white, as PIL shows it
    Image.fromarray(gray).save(tmp_path / "g.png")
    x = load_image(str(tmp_path / "g.png"), GRAY)
    assert x.shape == (1, 6, 4)  # rows = image height
    assert torch.all(x[0, 0] == 1) and torch.all(x[0, 1:] == 0)
    rgb = np.zeros((6, 4, 3), np.uint8)
    rgb[..., 0] = 200  # red everywhere
    rgb[0, :, 2] = 255  # top row also blue
    Image.fromarray(rgb).save(tmp_path / "c.png")
    Image.fromarray(np.dstack([rgb, np.full((6, 4), 9, np.uint8)])).save(tmp_path / "c_rgba.png")
    for name in ("c.png", "c_rgba.png"):
        x = load_image(str(tmp_path / name), RGB)
        assert x.shape == (3, 6, 4)  # alpha dropped
        torch.testing.assert_close(x, scaled(rgb.transpose(2, 0, 1)))


def test_grayscale_jpeg(tmp_path):
    Image.fromarray(np.tile(np.arange(0, 256, 32, dtype=np.uint8), (8, 1))).save(tmp_path / "j.jpeg", quality=100)
    x = load_image(str(tmp_path / "j.jpeg"), GRAY)
    assert x.shape == (1, 8, 8) and x[0, :, 0].max() < 0.05 and x[0, :, -1].min() > 0.95


def test_channel_errors_name_file_and_flag(tmp_path):
    rgb = save(tmp_path / "rgb.npy", np.stack([ramp()] * 3))
    with pytest.raises(UserError, match=r"rgb\.npy.*3 channels.*--is_grayscale=0"):
        load_image(rgb, GRAY)
    gray = save(tmp_path / "gray.npy", ramp())
    with pytest.raises(UserError, match=r"gray\.npy.*single-channel.*--is_grayscale=1"):
        load_image(gray, RGB)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(UserError, match=r"rgb\.png.*--is_grayscale=0"):
        load_image(str(tmp_path / "rgb.png"), GRAY)
    hwc = save(tmp_path / "hwc.npy", np.zeros((5, 5, 3), np.uint8))
    with pytest.raises(UserError, match=r"hwc\.npy.*CHW"):
        load_image(hwc, RGB)


def test_volume_needs_3d_config(tmp_path):
    vol = np.random.default_rng(0).random((5, 6, 7)).astype(np.float32)
    p = save(tmp_path / "v.npy", vol)
    with pytest.raises(UserError, match=r"v\.npy.*--spatial_dimension=3"):
        load_image(p, GRAY)
    x = load_image(p, DataConfig(is_grayscale=True, spatial_dims=3), flip="vflip")
    assert x.shape == (1, 5, 6, 7)
    torch.testing.assert_close(x[0], scaled(vol[::-1].copy()))
    with pytest.raises(UserError, match=r"has 2 dimensions"):
        load_image(save(tmp_path / "flat.npy", ramp()), DataConfig(is_grayscale=True, spatial_dims=3))


def test_nifti_keeps_channel_0_of_multimodal_volume(tmp_path):
    nib = pytest.importorskip("nibabel")
    rng = np.random.default_rng(0)
    vol4 = rng.random((6, 5, 4, 4)).astype(np.float32)  # (H, W, D, modalities), as BraTS
    vol4[..., 1] *= 10  # a brighter other modality must not affect channel 0's scaling
    nib.save(nib.Nifti1Image(vol4, np.eye(4)), tmp_path / "b.nii.gz")
    cfg = DataConfig(is_grayscale=True, spatial_dims=3)
    x = load_image(str(tmp_path / "b.nii.gz"), cfg)
    assert x.shape == (1, 6, 5, 4)
    torch.testing.assert_close(x[0], scaled(vol4[..., 0]))
    nib.save(nib.Nifti1Image(vol4[..., 0], np.eye(4)), tmp_path / "s.nii")
    torch.testing.assert_close(load_image(str(tmp_path / "s.nii"), cfg), x)
    with pytest.raises(UserError, match=r"s\.nii.*spatial dimensions"):
        load_image(str(tmp_path / "s.nii"), GRAY)


def test_roi_crop_then_area_resize(tmp_path):
    a = np.random.default_rng(1).random((12, 8)).astype(np.float32)
    p = save(tmp_path / "a.npy", a)
    x = load_image(p, DataConfig(is_grayscale=True, image_roi=(8, -1)))
    torch.testing.assert_close(x[0], scaled(a[2:10]))  # centre 8 rows, all columns
    y = load_image(p, DataConfig(is_grayscale=True, image_roi=(8, -1), image_size=4))
    # "area" resize by an integer factor is 2x2 average pooling; scaling comes after the resize.
    pooled = F.avg_pool2d(torch.as_tensor(a[2:10])[None, None], 2)[0, 0]
    torch.testing.assert_close(y[0], scaled(pooled.numpy()))


def test_bad_files(tmp_path):
    (tmp_path / "corrupt.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(UserError, match=r"corrupt\.npy: cannot be read"):
        load_image(str(tmp_path / "corrupt.npy"), GRAY)
    (tmp_path / "corrupt.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match=r"corrupt\.png: cannot be read"):
        load_image(str(tmp_path / "corrupt.png"), GRAY)
    with pytest.raises(UserError, match=r"missing\.npy: image file not found"):
        load_image(str(tmp_path / "missing.npy"), GRAY)
    with pytest.raises(UserError, match=r"x\.tif: unsupported"):
        load_image(str(tmp_path / "x.tif"), GRAY)
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(UserError, match=r"obj\.npy"):
        load_image(str(tmp_path / "obj.npy"), GRAY)
    with pytest.raises(UserError, match=r"nan\.npy.*NaN"):
        load_image(save(tmp_path / "nan.npy", np.array([[0.0, np.nan]])), GRAY)


def test_image_stem():
    assert image_stem("D/x/MNIST_7.npy") == "MNIST_7"
    assert image_stem("/a/b/BRATS_001.nii.gz") == "BRATS_001"
    assert image_stem("c.nii") == "c" and image_stem("d.PNG") == "d" and image_stem("e.jpg") == "e"
    assert image_stem("f.jpeg") == "f"


def make_set(tmp_path, n=4, shape=(6, 5)) -> list[str]:
    return [save(tmp_path / f"X_{i}.npy", ramp(*shape, seed=i)) for i in range(n)]


@pytest.mark.parametrize("cache", [False, True])
def test_image_dataset_items(tmp_path, cache):
    paths = make_set(tmp_path)
    ds = ImageDataset(paths, GRAY, flip="hflip", cache=cache)
    assert len(ds) == 4 and ds.image_shape == (1, 6, 5)
    item = ds[2]
    assert item["path"] == paths[2] and item["index"] == 2
    assert torch.equal(item["image"], load_image(paths[2], GRAY, flip="hflip"))
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert batch["image"].shape == (3, 1, 6, 5) and batch["path"] == paths[:3]
    assert batch["index"].tolist() == [0, 1, 2]


def test_mixed_sizes_name_both_files(tmp_path):
    paths = make_set(tmp_path, 3)
    paths.append(save(tmp_path / "big.npy", ramp(7, 5)))
    ds = ImageDataset(paths, GRAY)
    assert ds[1]["image"].shape == (1, 6, 5)
    with pytest.raises(UserError, match=r"big\.npy.*\(1, 7, 5\).*X_0\.npy.*\(1, 6, 5\)"):
        ds[3]
    with pytest.raises(UserError, match=r"big\.npy"):
        ImageDataset(paths, GRAY, cache=True)
    resized = ImageDataset(paths, DataConfig(is_grayscale=True, image_size=4))
    assert resized[3]["image"].shape == (1, 4, 4)


def test_dataset_from_csv_flip_and_first_n(tmp_path):
    paths = make_set(tmp_path, 5)
    write_split_csv(tmp_path / "X_test.csv", paths)
    ds = dataset_from_csv(str(tmp_path / "X_test.csv"), GRAY, first_n=3)
    assert ds.paths == paths[:3] and ds.flip is None
    v = dataset_from_csv(str(tmp_path / "X_vflip_test.csv"), GRAY)  # need not exist
    assert v.flip == "vflip" and v.paths == paths
    assert torch.equal(v[4]["image"], load_image(paths[4], GRAY).flip(1))
    h = dataset_from_csv(str(tmp_path / "X_hflip_test.csv"), GRAY, cache=True)
    assert torch.equal(h[0]["image"], load_image(paths[0], GRAY).flip(2))
    with pytest.raises(UserError, match=r"Y_vflip_test\.csv.*Y_test\.csv"):
        dataset_from_csv(str(tmp_path / "Y_vflip_test.csv"), GRAY)
    with pytest.raises(UserError, match=r"Y_test\.csv"):
        dataset_from_csv(str(tmp_path / "Y_test.csv"), GRAY)


def test_dataset_from_csv_fails_early_on_bad_first_image(tmp_path):
    paths = make_set(tmp_path, 2)
    write_split_csv(tmp_path / "X_train.csv", paths)
    with pytest.raises(UserError, match=r"X_0\.npy.*--is_grayscale=1"):
        dataset_from_csv(str(tmp_path / "X_train.csv"), RGB)
