"""LPIPS, the perceptual distance of the metric set: 2D, and 2.5D for volumes.

LPIPS v0.1 with the ImageNet-pretrained AlexNet trunk and lpips' calibrated linear heads, spatially averaged,
``normalize=True`` (inputs in [0, 1] mapped to [-1, 1]). 1-channel images are repeated to 3 channels (what LPIPS's
scaling layer broadcasting did upstream). 2D images with H or W below 32 are zero-padded symmetrically to 32 first
(28x28 -> 2 px per side, upstream's MNIST padding; AlexNet cannot take smaller inputs). 3D volumes: 2.5D LPIPS =
mean over the three axes of the mean over the 2D slices along that axis (upstream intended this; its loop kept only
the last axis). The trunk's weights are installed offline by ``perceptual.weights``; never a random fallback.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from ddpm_ood.errors import UserError
from ddpm_ood.perceptual.weights import (
    FEATURES_FILENAME,
    INSTALL_COMMAND,
    checkpoints_dir,
    find_backbone_weights,
    load_backbone_into_lpips,
    load_features,
    lpips_alex_heads_path,
)

LPIPS_MIN_SIZE = 32  # AlexNet needs >= 31 px per side; upstream padded 28x28 to 32x32


@contextlib.contextmanager
def _quiet_lpips() -> Iterator[None]:
    # lpips 0.1.4 calls torchvision's deprecated ``alexnet(pretrained=...)``: two UserWarnings per build.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*'pretrained' is deprecated", category=UserWarning)
        warnings.filterwarnings("ignore", message=r"Arguments other than a weight enum", category=UserWarning)
        yield


def build_lpips(device: str | torch.device = "cpu", pretrained_backbone: bool = True) -> torch.nn.Module:
    """``lpips.LPIPS(net="alex")`` v0.1, eval mode, frozen, built offline.

    The linear heads come from lpips' own ``weights/v0.1/alex.pth``. The AlexNet trunk comes from the file
    installed by ``python -m ddpm_ood.cli.lpips_weights`` (or torchvision's genuine cached ``alexnet-owt`` file);
    without it, UserError says how to install it. ``pretrained_backbone=False`` keeps lpips' randomly
    initialised trunk (seed with ``torch.manual_seed`` first) and is meant for tests only: a random trunk
    gives meaningless distances, so it is never a fallback.
    """
    import lpips

    features = None
    if pretrained_backbone:
        path = find_backbone_weights()
        if path is None:
            raise UserError(
                f"LPIPS AlexNet weights not found in {checkpoints_dir()} ({FEATURES_FILENAME}); "
                f"install them offline with: {INSTALL_COMMAND}"
            )
        features = load_features(path)
    with _quiet_lpips():
        # pnet_rand=True: build the trunk without torchvision's download; the real weights are loaded below.
        model = lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=True, verbose=False)
    _check_heads_loaded(model)
    if features is not None:
        load_backbone_into_lpips(model, features)
    model.eval().requires_grad_(False)
    return model.to(device)


def _check_heads_loaded(model: torch.nn.Module) -> None:
    # lpips loads alex.pth with strict=False, so a key mismatch would leave random heads without a word.
    heads = torch.load(lpips_alex_heads_path(), map_location="cpu", weights_only=True)
    state = model.state_dict()
    for key, value in heads.items():
        if key not in state or not torch.equal(state[key].cpu(), value):
            raise UserError(f"{lpips_alex_heads_path()}: LPIPS linear head {key} was not loaded")


def pad_to_min_size(x: torch.Tensor, min_size: int = LPIPS_MIN_SIZE) -> torch.Tensor:
    """Zero-pad (N, C, H, W) so that H, W >= min_size; the extra is split floor/ceil between the two sides."""
    pads: list[int] = []
    for size in (x.shape[-1], x.shape[-2]):  # F.pad lists the last dim first
        extra = max(min_size - size, 0)
        pads += [extra // 2, extra - extra // 2]
    return F.pad(x, pads) if any(pads) else x


class PerceptualDistance:
    """``distance(x, y) -> (B,)`` LPIPS per pair of (B, C, H, W) or (B, C, D, H, W) images in [0, 1], C = 1 or 3.

    ``net``: an ``lpips.LPIPS``-like module (``forward(x, y, normalize=True) -> (N, 1, 1, 1)``), e.g.
    ``build_lpips(device)``; ``batch_size``: at most this many 2D pairs (images, or slices of volumes) per forward
    pass (memory only: values do not depend on it).
    """

    def __init__(self, net: torch.nn.Module, batch_size: int = 256) -> None:
        self.net = net.eval()
        self.batch_size = int(batch_size)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """LPIPS per pair, (B,): 2D directly, 3D as the 2.5D mean over axes of the mean over slices."""
        if x.ndim == 4:
            return self._lpips_2d(x, y)
        per_axis = []
        for axis in (2, 3, 4):
            # (B, C, D, H, W) -> (B, S, C, a, b) -> (B*S, C, a, b): every slice along `axis` as a 2D image.
            xs, ys = (t.movedim(axis, 1) for t in (x, y))
            b, s = xs.shape[:2]
            flat = self._lpips_2d(xs.reshape(b * s, *xs.shape[2:]), ys.reshape(b * s, *ys.shape[2:]))
            per_axis.append(flat.view(b, s).mean(dim=1))
        return torch.stack(per_axis).mean(dim=0)

    def _lpips_2d(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        x, y = pad_to_min_size(x), pad_to_min_size(y)
        out = [
            self.net(
                x[i : i + self.batch_size], y[i : i + self.batch_size], normalize=True
            ).reshape(-1)
            for i in range(0, x.shape[0], self.batch_size)
        ]
        return torch.cat(out)
