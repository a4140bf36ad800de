"""Loading one image the way every stage sees it, and the dataset of a split CSV.

The chain (upstream's, section 2 of UPSTREAM.md): read -> channels -> centre crop (``image_roi``) -> resize
(``image_size``, MONAI "area") -> per-image min-max to [0, 1] over the whole array -> optional flip.
Images come out as float32 tensors of shape (C, *spatial), C = 1 (grayscale) or 3 (RGB), values in [0, 1].
Spatial axis 0 is the image rows (top to bottom, as PIL shows a PNG), spatial axis 1 the columns.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ddpm_ood.config import DataConfig
from ddpm_ood.errors import UserError
from ddpm_ood.fileio import IMAGE_SUFFIXES, NIFTI_SUFFIXES, PIL_SUFFIXES

FLIPS = ("vflip", "hflip")




def _suffix(path: str) -> str:
    lower = path.lower()
    for suffix in IMAGE_SUFFIXES:
        if lower.endswith(suffix):
            return suffix
    raise UserError(f"{path}: unsupported image type; expected one of {', '.join(IMAGE_SUFFIXES)}")


def _read_numpy(path: str) -> np.ndarray:
    try:
        a = np.load(path, allow_pickle=False)
    except Exception as exc:  # truncated/corrupt files raise ValueError, EOFError, OSError, ...
        raise UserError(f"{path}: cannot be read as a .npy array ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(a, np.ndarray) or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
        raise UserError(f"{path}: .npy does not hold a numeric array (dtype {getattr(a, 'dtype', type(a))})")
    return a


def _read_pil(path: str) -> np.ndarray:
    """(H, W) for grayscale modes, (3, H, W) for colour; alpha is dropped. Row 0 = top row as PIL shows it."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode in ("1", "L", "I", "I;16", "I;16B", "I;16L", "F"):
                return np.asarray(im.convert("F") if mode.startswith("I;16") else im)
            if mode == "LA":
                return np.asarray(im.getchannel("L"))
            return np.asarray(im.convert("RGB")).transpose(2, 0, 1)  # RGB, RGBA, P, CMYK, YCbCr -> CHW
    except Exception as exc:
        raise UserError(f"{path}: cannot be read as an image ({exc.__class__.__name__}: {exc})") from None


def _read_nifti(path: str) -> np.ndarray:
    """(C, *spatial) via MONAI's LoadImage (NiBabel reader; a 4-D volume's last axis is the channel axis)."""
    from monai.transforms import LoadImage

    try:
        img = LoadImage(image_only=True, ensure_channel_first=True)(path)
    except Exception as exc:
        raise UserError(f"{path}: cannot be read as NIfTI ({exc.__class__.__name__}: {exc})") from None
    return np.asarray(img)


def _shape_error(path: str, shape: tuple[int, ...], data: DataConfig, why: str) -> UserError:
    sd = data.spatial_dims
    spatial = "H,W" if sd == 2 else "D,H,W"
    expected = f"({spatial}) or (1,{spatial})" if data.is_grayscale else f"(3,{spatial})"
    return UserError(
        f"{path}: shape {tuple(shape)} {why}; with --is_grayscale={int(data.is_grayscale)} "
        f"--spatial_dimension={sd} expected {expected}"
    )


@functools.cache
def _say_channel_kept(channels: int, kept: int) -> None:
    """One line per process and channel count: which channel of multi-channel volumes the run uses."""
    print(f"note: {channels}-channel NIfTI volumes: keeping channel {kept} only (--channel={kept}; BraTS: 0 FLAIR, "
          "1 T1w, 2 t1gd, 3 T2w)", file=sys.stderr, flush=True)


def _channels_first(a: np.ndarray, path: str, data: DataConfig, has_channel_axis: bool) -> np.ndarray:
    """Apply the channel rule: return (C, *spatial) with C = data.channels, or raise a UserError. With
    is_grayscale, a multi-channel NIfTI volume (C, *spatial) keeps channel ``data.channel``."""
    sd = data.spatial_dims
    if not has_channel_axis:
        if a.ndim == sd:
            a = a[None]
        elif a.ndim != sd + 1:
            raise _shape_error(path, a.shape, data, f"has {a.ndim} dimensions")
    if a.ndim != sd + 1:
        raise _shape_error(path, a.shape[1:], data, f"has {a.ndim - 1} spatial dimensions")
    c = a.shape[0]
    if data.is_grayscale:
        if c == 1:
            return a
        if has_channel_axis:  # multi-modality NIfTI (BraTS: FLAIR, T1w, t1gd, T2w): keep the one asked for
            if data.channel >= c:
                raise UserError(f"{path}: has {c} channels (shape {tuple(a.shape)}); --channel={data.channel} is out "
                                f"of range 0..{c - 1} (every CSV a model reads uses its --channel: an out set "
                                "without it has to be left out)")
            _say_channel_kept(c, data.channel)
            return a[data.channel:data.channel + 1]
        if c == 3:
            raise UserError(
                f"{path}: has 3 channels (shape {tuple(a.shape)}) but --is_grayscale=1; "
                f"use --is_grayscale=0 for RGB images"
            )
        why = "is not one single-channel image"
        if sd == 2:
            why += " (a 3D volume? use --spatial_dimension=3)"
        raise _shape_error(path, a.shape, data, why)
    if c == 3:
        return a
    if c == 1:
        raise UserError(
            f"{path}: is single-channel (shape {tuple(a.shape)}) but --is_grayscale=0; "
            f"use --is_grayscale=1 for grayscale images"
        )
    raise _shape_error(path, a.shape, data, "does not have 3 channels first (RGB .npy must be CHW)")


@functools.lru_cache(maxsize=16)
def _spatial_transforms(data: DataConfig) -> tuple:
    """MONAI CenterSpatialCrop (``image_roi``, -1 keeps a dim) then Resize (``image_size``, mode "area")."""
    from monai.transforms import CenterSpatialCrop, Resize

    out = []
    if data.image_roi is not None:
        out.append(CenterSpatialCrop(roi_size=data.image_roi))
    if data.image_size is not None:
        out.append(Resize(spatial_size=(data.image_size,) * data.spatial_dims, mode="area"))
    return tuple(out)


def load_image(path: str, data: DataConfig, flip: str | None = None) -> torch.Tensor:
    """Load one image as float32 (C, *spatial) in [0, 1].

    ``flip``: None, "vflip" (spatial axis 0 reversed: upside-down) or "hflip" (spatial axis 1: mirror),
    applied after scaling. Bad files, wrong channel counts and wrong dimensionality raise UserError.
    """
    from monai.transforms.utils import rescale_array

    if flip not in (None, *FLIPS):
        raise ValueError(f"flip must be None, 'vflip' or 'hflip', got {flip!r}")
    path = str(path)
    suffix = _suffix(path)
    if not os.path.isfile(path):
        raise UserError(f"{path}: image file not found")
    if suffix in NIFTI_SUFFIXES:
        a = _channels_first(_read_nifti(path), path, data, has_channel_axis=True)
    elif suffix in PIL_SUFFIXES:
        a = _channels_first(_read_pil(path), path, data, has_channel_axis=False)
    else:
        a = _channels_first(_read_numpy(path), path, data, has_channel_axis=False)
    if 0 in a.shape:
        raise UserError(f"{path}: empty image (shape {tuple(a.shape)})")
    x: torch.Tensor = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    if not torch.isfinite(x).all():
        raise UserError(f"{path}: image contains NaN or infinite values")
    for transform in _spatial_transforms(data):
        x = transform(x)
    x = x.as_tensor() if hasattr(x, "as_tensor") else x  # MetaTensor -> plain tensor
    # Per-image min-max over all channels together; a constant image becomes zeros. This is the function
    # MONAI's ScaleIntensity(minv=0, maxv=1) applies (upstream's step), without its per-call MetaTensor cost.
    x = rescale_array(x, minv=0.0, maxv=1.0, dtype=torch.float32)
    if flip == "vflip":
        x = torch.flip(x, dims=(1,))
    elif flip == "hflip":
        x = torch.flip(x, dims=(2,))
    return x.to(torch.float32).contiguous()


class ImageDataset(Dataset):
    """The images of a path list. Item i: {"image": float32 (C, *spatial) in [0, 1], "path": str, "index": i}.

    Every image must have the shape of item 0 (``image_shape``); a different one raises UserError naming
    both files. ``cache=True`` loads everything up front (upstream's CacheDataset) into one tensor.
    """

    def __init__(
        self, paths: Sequence[str], data: DataConfig, flip: str | None = None, cache: bool = False
    ) -> None:
        if flip not in (None, *FLIPS):
            raise ValueError(f"flip must be None, 'vflip' or 'hflip', got {flip!r}")
        self.paths = [str(p) for p in paths]
        self.data = data
        self.flip = flip
        self._shape: tuple[int, ...] | None = None
        self._cache: torch.Tensor | None = None
        if cache and self.paths:
            from tqdm import tqdm

            images = [
                self._load(i)
                for i in tqdm(range(len(self.paths)), desc="caching images", unit="img", mininterval=1.0,
                              disable=len(self.paths) < 1000)
            ]
            self._cache = torch.stack(images)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def image_shape(self) -> tuple[int, ...]:
        """(C, *spatial) of item 0 after loading; every other item must match it."""
        if self._shape is None:
            if not self.paths:
                raise UserError("no images to load (empty path list)")
            self._shape = tuple(load_image(self.paths[0], self.data, self.flip).shape)
        return self._shape

    def _load(self, i: int) -> torch.Tensor:
        x = load_image(self.paths[i], self.data, self.flip)
        if i == 0 and self._shape is None:
            self._shape = tuple(x.shape)
        expected = self.image_shape
        if tuple(x.shape) != expected:
            raise UserError(
                f"{self.paths[i]}: loaded shape {tuple(x.shape)} differs from {self.paths[0]}: {expected} "
                f"(mixed image sizes; set --image_size and/or --image_roi)"
            )
        return x

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if not -len(self.paths) <= i < len(self.paths):
            raise IndexError(i)
        i %= len(self.paths)
        x = self._cache[i] if self._cache is not None else self._load(i)
        return {"image": x, "path": self.paths[i], "index": i}


def dataset_from_csv(
    csv_path: str, data: DataConfig, first_n: int | None = None, cache: bool = False
) -> ImageDataset:
    """The dataset of a split CSV. ``X_vflip_test.csv``/``X_hflip_test.csv`` mean the flipped images of
    ``X_test.csv`` (the flipped CSV itself need not exist). ``first_n`` keeps the first n paths (before any
    sharding). Item 0 is loaded at once, so an unreadable first image fails here.
    """
    from ddpm_ood.data.splits import read_split_csv, split_flip

    base, flip = split_flip(str(csv_path))
    if flip is not None and not os.path.isfile(base):
        raise UserError(f"{csv_path}: means the {flip}ped images of {base}, which is not found")
    if first_n is not None and first_n < 1:
        raise UserError(f"{csv_path}: first_n must be >= 1, got {first_n}")
    paths = read_split_csv(base)
    if first_n is not None:
        paths = paths[:first_n]
    ds = ImageDataset(paths, data, flip=flip, cache=cache)
    _ = ds.image_shape
    return ds
