"""The per-(image, t) metric set: MSE closed form, LPIPS padding/channels/2.5D/batching, and the real backbone.

Tests marked "real backbone" skip until ``python -m ddpm_ood.cli.lpips_weights`` has installed it.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from ddpm_ood.errors import UserError
from ddpm_ood.perceptual.lpips import build_lpips, pad_to_min_size
from ddpm_ood.perceptual.weights import INSTALL_COMMAND, find_backbone_weights
from ddpm_ood.reconstruction.metrics import ReconstructionMetrics, mse
from ddpm_ood.results.schema import METRIC_COLUMNS

FASHION_MNIST_TEST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


@pytest.fixture(scope="module")
def random_lpips():
    torch.manual_seed(0)
    return build_lpips(pretrained_backbone=False)


@pytest.fixture(scope="module")
def metrics(random_lpips):
    return ReconstructionMetrics("cpu", lpips_net=random_lpips)


@pytest.fixture(scope="module")
def real_metrics():
    if find_backbone_weights() is None:
        pytest.skip(f"real LPIPS backbone not installed; run {INSTALL_COMMAND}")
    return ReconstructionMetrics("cpu")


def natural_images(n: int = 8) -> torch.Tensor:
    """(n, 1, 28, 28) in [0, 1]: real Fashion-MNIST test images if Debian's dataset is present, else smooth
    synthetic objects (shaded ellipses with stripes on a dark background)."""
    if FASHION_MNIST_TEST.is_file():
        with gzip.open(FASHION_MNIST_TEST) as f:
            data = np.frombuffer(f.read(16 + n * 28 * 28), np.uint8, offset=16).reshape(n, 28, 28)
        return torch.from_numpy(data.astype(np.float32) / 255).unsqueeze(1)
    rng = np.random.default_rng(0)
    yy, xx = np.meshgrid(np.linspace(-1, 1, 28), np.linspace(-1, 1, 28), indexing="ij")
    out = []
    for _ in range(n):
        cx, cy, rx, ry = rng.uniform(-0.3, 0.3, 2).tolist() + rng.uniform(0.3, 0.7, 2).tolist()
        inside = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1
        shade = 0.6 + 0.3 * np.sin(rng.uniform(2, 6) * xx + rng.uniform(0, 6))
        out.append(np.where(inside, shade + 0.15 * (np.sin(rng.uniform(6, 12) * yy) > 0), 0.05))
    return torch.tensor(np.clip(np.stack(out), 0, 1)[:, None], dtype=torch.float32)


def _rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- mse
def test_mse_closed_form():
    x = torch.full((2, 1, 8, 8), 0.25)
    y = torch.full((2, 1, 8, 8), 0.75)
    y[1, 0, 0, :4] = 0.25  # 4 of 64 pixels equal -> mean (60 * 0.25) / 64
    torch.testing.assert_close(mse(x, y), torch.tensor([0.25, 0.25 * 60 / 64]))
    a, b = _rand(3, 3, 4, 5, 6, seed=1), _rand(3, 3, 4, 5, 6, seed=2)
    expected = torch.stack([((a[i] - b[i]) ** 2).sum() / a[i].numel() for i in range(3)])
    torch.testing.assert_close(mse(a, b), expected)


# ---------------------------------------------------------------- padding and channels
def test_pad_28_is_upstreams_two_pixels_per_side():
    x = _rand(2, 1, 28, 28)
    torch.testing.assert_close(pad_to_min_size(x), F.pad(x, (2, 2, 2, 2)))
    odd = pad_to_min_size(_rand(1, 3, 29, 40))
    assert odd.shape == (1, 3, 32, 40)
    assert odd[..., 0, :].abs().sum() == 0 and odd[..., 30:, :].abs().sum() == 0  # 1 above, 2 below
    big = _rand(1, 1, 32, 33)
    assert pad_to_min_size(big) is big


def test_lpips_on_28x28_equals_manual_pad(metrics, random_lpips):
    x, y = _rand(3, 1, 28, 28, seed=1), _rand(3, 1, 28, 28, seed=2)
    manual = random_lpips(F.pad(x, (2, 2, 2, 2)), F.pad(y, (2, 2, 2, 2)), normalize=True).reshape(-1)
    torch.testing.assert_close(metrics(x, y)["perceptual_difference"], manual)


def test_grayscale_equals_rgb_repeat(metrics):
    x, y = _rand(2, 1, 32, 32, seed=3), _rand(2, 1, 32, 32, seed=4)
    gray = metrics(x, y)["perceptual_difference"]
    rgb = metrics(x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1))["perceptual_difference"]
    torch.testing.assert_close(gray, rgb)


# ---------------------------------------------------------------- output contract
def test_output_names_shapes_dtype_and_identity(metrics):
    x, y = _rand(4, 3, 32, 32, seed=5), _rand(4, 3, 32, 32, seed=6)
    out = metrics(x.double(), y.double())
    assert tuple(out) == METRIC_COLUMNS
    for value in out.values():
        assert value.shape == (4,) and value.dtype == torch.float32 and not value.requires_grad
        assert (value > 0).all()
    same = metrics(x, x)
    assert (same["mse"] == 0).all() and (same["perceptual_difference"] == 0).all()


def test_bad_shapes_are_refused(metrics):
    with pytest.raises(ValueError, match="differ"):
        metrics(torch.zeros(1, 1, 32, 32), torch.zeros(1, 1, 32, 31))
    with pytest.raises(ValueError, match="C = 1 or 3"):
        metrics(torch.zeros(1, 2, 32, 32), torch.zeros(1, 2, 32, 32))


def test_autocast_outside_does_not_change_values(metrics):
    x, y = _rand(2, 1, 28, 28, seed=7), _rand(2, 1, 28, 28, seed=8)
    plain = metrics(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = metrics(x, y)
    for name in METRIC_COLUMNS:
        assert under[name].dtype == torch.float32
        torch.testing.assert_close(under[name], plain[name])


# ---------------------------------------------------------------- batching
def test_batched_pairs_equal_one_at_a_time(random_lpips):
    """Many (image, t) pairs in one call give each pair's value alone, whatever the LPIPS chunk size."""
    x = natural_images(4).repeat(3, 1, 1, 1)  # 4 images x 3 "start points"
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    levels = torch.tensor([0.05, 0.2, 0.5]).repeat_interleave(4).view(-1, 1, 1, 1)
    recon = (x + levels * noise).clamp(0, 1)
    together = ReconstructionMetrics("cpu", random_lpips)(x, recon)
    chunked = ReconstructionMetrics("cpu", random_lpips, lpips_batch_size=5)(x, recon)
    single = ReconstructionMetrics("cpu", random_lpips)
    alone = [single(x[i : i + 1], recon[i : i + 1]) for i in range(len(x))]
    for name in METRIC_COLUMNS:
        one_by_one = torch.cat([a[name] for a in alone])
        torch.testing.assert_close(together[name], one_by_one, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(chunked[name], one_by_one, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- 3D
def test_3d_is_mean_over_axes_of_slice_means(metrics):
    x, y = _rand(2, 1, 4, 5, 6, seed=9), _rand(2, 1, 4, 5, 6, seed=10)
    y[:, :, :, :, :3] = x[:, :, :, :, :3]  # make the three axes disagree: half the W range identical
    per_axis = []
    for b in range(2):
        views = [
            [(x[b, :, i], y[b, :, i]) for i in range(4)],  # slices along D: (C, H, W)
            [(x[b, :, :, i], y[b, :, :, i]) for i in range(5)],  # along H: (C, D, W)
            [(x[b, :, :, :, i], y[b, :, :, :, i]) for i in range(6)],  # along W: (C, D, H)
        ]
        per_axis.append(
            [
                torch.stack([metrics(u[None], v[None])["perceptual_difference"][0] for u, v in view]).mean()
                for view in views
            ]
        )
    expected = torch.tensor(per_axis)  # (B, 3)
    got = metrics(x, y)
    torch.testing.assert_close(got["perceptual_difference"], expected.mean(dim=1), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(expected[:, 2], expected.mean(dim=1))  # upstream's last-axis-only value differs
    torch.testing.assert_close(got["mse"], ((x - y) ** 2).mean(dim=(1, 2, 3, 4)))


# ---------------------------------------------------------------- backbone provenance
def test_build_lpips_without_weights_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(UserError, match=INSTALL_COMMAND):
        build_lpips()
    with pytest.raises(UserError, match=INSTALL_COMMAND):
        ReconstructionMetrics("cpu")
    assert build_lpips(pretrained_backbone=False) is not None  # explicit random trunk, tests only


def test_build_lpips_is_quiet(tmp_path, monkeypatch, capsys, recwarn):
    torch.manual_seed(0)
    build_lpips(pretrained_backbone=False)
    assert capsys.readouterr().out == ""
    assert not [w for w in recwarn if "deprecated" in str(w.message)]


# ---------------------------------------------------------------- real backbone
def _distortions(x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    return {
        "noise": [(x + s * noise).clamp(0, 1) for s in (0.05, 0.1, 0.2, 0.4)],
        "blur": [TF.gaussian_blur(x, [9, 9], [s, s]) for s in (0.5, 1.0, 1.5, 2.5)],
    }


def test_real_lpips_zero_on_identity_and_monotone_in_noise_and_blur(real_metrics):
    x = natural_images(8)
    assert (real_metrics(x, x)["perceptual_difference"] == 0).all()
    for kind, ladder in _distortions(x).items():
        values = torch.stack(
            [real_metrics(x, y)["perceptual_difference"] for y in ladder]
        )  # (levels, images)
        assert (values > 0).all(), kind
        assert (values[1:] > values[:-1]).all(), f"LPIPS not increasing with {kind} on every image:\n{values}"


def test_real_backbone_ranks_blur_above_shift_random_does_not(real_metrics, metrics):
    """ImageNet AlexNet is robust to a 1-px shift but sensitive to blur (lost texture); a random trunk, with
    no learned invariance, is the other way round. Measured on Fashion-MNIST: blur/shift mean ratio 7.6 (real)
    vs 0.52-0.62 (random trunks, seeds 0-9); every image ranks blur > shift with the real trunk."""
    x = natural_images(8)
    blur = TF.gaussian_blur(x, [9, 9], [1.0, 1.0])
    shift = torch.roll(x, 1, dims=-1)
    real_blur, real_shift = (real_metrics(x, y)["perceptual_difference"] for y in (blur, shift))
    rand_blur, rand_shift = (metrics(x, y)["perceptual_difference"] for y in (blur, shift))
    assert (real_blur > real_shift).all()
    assert real_blur.mean() > 3 * real_shift.mean()
    assert rand_blur.mean() < rand_shift.mean()
