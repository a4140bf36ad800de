"""The training loop as a library: loss, targets, schedules, reproducibility, resume, EMA, checkpoints, TensorBoard.

All runs use the conftest tiny UNet (8/16 channels) on 8x8 (or 8^3) images and a few steps.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ddpm_ood.autoencoder.base import IdentityAutoencoder
from ddpm_ood.checkpoint import BEST_CHECKPOINT, LAST_CHECKPOINT, load_checkpoint, periodic_checkpoint_name
from ddpm_ood.config import DataConfig, ModelConfig, RunConfig, ScheduleConfig
from ddpm_ood.diffusion.schedule import make_ddpm_scheduler
from ddpm_ood.diffusion.unet import build_unet, check_image_fits_unet
from ddpm_ood.errors import UserError
from ddpm_ood.seeding import derive_seed
from ddpm_ood.training import ddpm as training
from ddpm_ood.training.ddpm import draw_train_noise, image_grid, train, train_step
from ddpm_ood.training.loop import TrainConfig
from ddpm_ood.training.resume import find_resume_point

pytestmark = pytest.mark.usefixtures("one_thread")


class ToyImages(torch.utils.data.Dataset):
    """Learnable toy set: bright squares at a few positions on a dark background, (1, *spatial) in [0, 1]."""

    def __init__(self, n: int, size: int = 8, spatial_dims: int = 2, offset: int = 0) -> None:
        self.images = []
        for i in range(n):
            x = torch.zeros((1,) + (size,) * spatial_dims)
            j = (i + offset) % (size // 2)
            if spatial_dims == 2:
                x[0, 2:6, j:j + 4] = 1.0
            else:
                x[0, 2:6, j:j + 4, 2:6] = 1.0
            self.images.append(x)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "path": f"toy_{i}.npy", "index": i}


def _run_config(model: ModelConfig, schedule: ScheduleConfig | None = None, size: int = 8) -> RunConfig:
    schedule = schedule or ScheduleConfig()
    data = DataConfig(is_grayscale=True, spatial_dims=model.spatial_dims)
    return RunConfig(model=model, schedule=schedule, data=data, image_shape=(1,) + (size,) * model.spatial_dims)


def _cfg(tmp_path, name: str = "run", **kw) -> TrainConfig:
    base = dict(run_dir=str(tmp_path / name), n_epochs=2, eval_freq=1, checkpoint_every=0, batch_size=4,
                num_workers=0, seed=3, lr=1e-3, sample_steps=0)
    base.update(kw)
    return TrainConfig(**base)


def _train(run_config, cfg, n_train=8, n_val=4):
    resume = find_resume_point(cfg.run_dir, cfg.resume_epoch)
    return train(run_config, cfg, ToyImages(n_train), ToyImages(n_val, offset=1), resume=resume)


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_loss_falls_on_learnable_toy_set(tmp_path, tiny_model_config):
    # 16 images, batch 8 -> 2 steps per epoch; 12 epochs = 24 Adam steps at lr 2e-3.
    cfg = _cfg(tmp_path, n_epochs=12, batch_size=8, lr=2e-3)
    summary = train(_run_config(tiny_model_config), cfg, ToyImages(16), ToyImages(8, offset=1))
    first, last = summary.val_losses[1], summary.val_losses[12]
    assert all(math.isfinite(v) for v in summary.val_losses.values())
    # The fixed-noise validation loss must drop clearly (same (t, noise) pairs every epoch).
    assert last < 0.7 * first, summary.val_losses
    assert summary.epoch_losses[-1] < summary.epoch_losses[0]
    assert summary.global_step == 24
    assert summary.best_loss == min(summary.val_losses.values())


class _ZeroModel(torch.nn.Module):
    """Stand-in network that always predicts 0: the loss is then the mean square of the training target."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t):
        return torch.zeros_like(x) * self.w


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_train_step_regresses_the_target_of_the_prediction_type(prediction_type):
    schedule = ScheduleConfig(prediction_type=prediction_type, b_scale=2.0)
    scheduler = make_ddpm_scheduler(schedule)
    g = torch.Generator().manual_seed(0)
    images = torch.rand((4, 1, 8, 8), generator=g)
    timesteps = torch.tensor([0, 10, 500, 999])
    noise = torch.randn(images.shape, generator=g)
    model = _ZeroModel()
    clean = IdentityAutoencoder(schedule.b_scale).encode(images)  # what the DDPM task feeds train_step
    loss = train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), scheduler, clean, timesteps, noise,
                      schedule)
    # Closed forms with x0 = b_scale * image, a = alphas_cumprod[t] (linear betas 1e-4..2e-2 over 1000 steps).
    betas = np.linspace(1e-4, 2e-2, 1000)
    a = torch.tensor(np.cumprod(1 - betas)[timesteps.numpy()], dtype=torch.float32).view(-1, 1, 1, 1)
    x0 = 2.0 * images
    target = {"epsilon": noise, "sample": x0, "v_prediction": a.sqrt() * noise - (1 - a).sqrt() * x0}[prediction_type]
    assert float(loss) == pytest.approx(float(target.pow(2).mean()), rel=1e-5)


def _closed_form_betas(name: str, start: float, end: float, T: int = 1000) -> np.ndarray:
    if name == "linear_beta":
        return np.linspace(start, end, T)
    if name == "scaled_linear_beta":
        return np.linspace(math.sqrt(start), math.sqrt(end), T) ** 2
    if name == "sigmoid_beta":
        return 1 / (1 + np.exp(-np.linspace(-6, 6, T))) * (end - start) + start
    if name == "cosine":  # Nichol & Dhariwal 2021, s = 0.008, betas clipped at 0.999
        s = 0.008
        t = np.arange(T + 1)
        f = np.cos((t / T + s) / (1 + s) * np.pi / 2) ** 2
        abar = f / f[0]
        return np.clip(1 - abar[1:] / abar[:-1], 0, 0.999)
    raise AssertionError(name)


@pytest.mark.parametrize(
    "alias,canonical",
    [("linear", "linear_beta"), ("linear_beta", "linear_beta"), ("scaled_linear", "scaled_linear_beta"),
     ("scaled_linear_beta", "scaled_linear_beta"), ("sigmoid", "sigmoid_beta"), ("sigmoid_beta", "sigmoid_beta"),
     ("cosine", "cosine")],
)
def test_every_schedule_alias_builds_the_closed_form_betas(alias, canonical):
    ranged = canonical != "cosine"
    start, end = (0.0015, 0.0195) if ranged else (None, None)  # README FashionMNIST range
    schedule = ScheduleConfig(beta_schedule=alias, beta_start=start, beta_end=end)
    assert schedule.beta_schedule == canonical
    scheduler = make_ddpm_scheduler(schedule)
    expected = _closed_form_betas(canonical, start, end)
    np.testing.assert_allclose(scheduler.betas.double().numpy(), expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(scheduler.alphas_cumprod.double().numpy(), np.cumprod(1 - expected),
                               rtol=1e-3, atol=1e-6)


def test_cosine_schedule_trains(tmp_path, tiny_model_config):
    schedule = ScheduleConfig(beta_schedule="cosine", beta_start=None, beta_end=None)
    cfg = _cfg(tmp_path, n_epochs=1, batch_size=8)
    summary = train(_run_config(tiny_model_config, schedule), cfg, ToyImages(8), ToyImages(4))
    assert summary.global_step == 1 and math.isfinite(summary.epoch_losses[0])
    ckpt = load_checkpoint(tmp_path / "run" / LAST_CHECKPOINT)
    assert ckpt["config"]["schedule"]["beta_schedule"] == "cosine"
    assert ckpt["config"]["schedule"]["beta_start"] is None


def test_checkpoint_contents_and_config_round_trip(tmp_path, tiny_model_config):
    run_config = _run_config(tiny_model_config, ScheduleConfig(prediction_type="v_prediction", b_scale=1.5))
    cfg = _cfg(tmp_path, n_epochs=2, eval_freq=2, checkpoint_every=1, ema_decay=0.9)
    summary = _train(run_config, cfg)
    run_dir = tmp_path / "run"
    names = sorted(p.name for p in run_dir.glob("*.pth"))
    assert names == sorted([BEST_CHECKPOINT, LAST_CHECKPOINT, periodic_checkpoint_name(1),
                            periodic_checkpoint_name(2)])
    # Loadable without unpickling code.
    ckpt = torch.load(run_dir / LAST_CHECKPOINT, map_location="cpu", weights_only=True)
    assert {"epoch", "global_step", "model_state_dict", "optimizer_state_dict", "best_loss", "ema_state_dict",
            "scaler_state_dict", "rng_state", "config"} <= set(ckpt)
    assert ckpt["epoch"] == 2 and ckpt["global_step"] == 4 == summary.global_step
    assert RunConfig.from_dict(ckpt["config"]) == run_config
    assert ckpt["scaler_state_dict"] is None  # CPU, no fp16
    assert ckpt["best_loss"] == pytest.approx(summary.val_losses[2])
    model = build_unet(tiny_model_config)
    assert ckpt["model_state_dict"].keys() == model.state_dict().keys()
    assert ckpt["ema_state_dict"].keys() == model.state_dict().keys()
    # EMA differs from the raw weights (decay 0.9 after 4 steps) but stays between init and the weights.
    assert any(not torch.equal(ckpt["ema_state_dict"][k], ckpt["model_state_dict"][k])
               for k in ckpt["model_state_dict"])
    periodic1 = load_checkpoint(run_dir / periodic_checkpoint_name(1))
    assert periodic1["epoch"] == 1 and periodic1["global_step"] == 2
    # Eval only at epoch 2 (eval_freq=2): the epoch-1 checkpoint has no validation loss yet.
    assert periodic1["best_loss"] == math.inf


def test_best_checkpoint_is_the_lowest_validation_loss(tmp_path, tiny_model_config):
    cfg = _cfg(tmp_path, n_epochs=4, eval_freq=1, lr=2e-3)
    summary = _train(_run_config(tiny_model_config), cfg)
    best_epoch = min(summary.val_losses, key=summary.val_losses.get)
    best = load_checkpoint(tmp_path / "run" / BEST_CHECKPOINT)
    assert best["epoch"] == best_epoch
    assert best["best_loss"] == pytest.approx(summary.val_losses[best_epoch])


def test_validation_loss_independent_of_batch_size(tiny_model_config):
    torch.manual_seed(0)
    model = build_unet(tiny_model_config)
    schedule = ScheduleConfig()
    scheduler = make_ddpm_scheduler(schedule)
    val = ToyImages(6)
    results = []
    for bs in (1, 4):
        loader = torch.utils.data.DataLoader(val, batch_size=bs)
        total, count = training.validation_loss_sums(model, scheduler, loader, schedule, 7, torch.device("cpu"),
                                                     autoencoder=IdentityAutoencoder(schedule.b_scale))
        results.append(total / count)
        assert count == 6
    assert results[0] == pytest.approx(results[1], rel=1e-5)


def test_step_noise_is_a_pure_function_of_seed_epoch_step_rank():
    a = draw_train_noise(1, 2, 3, 0, (4, 1, 8, 8), 1000)
    b = draw_train_noise(1, 2, 3, 0, (4, 1, 8, 8), 1000)
    c = draw_train_noise(1, 2, 4, 0, (4, 1, 8, 8), 1000)
    d = draw_train_noise(1, 2, 3, 1, (4, 1, 8, 8), 1000)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1]) and not torch.equal(a[1], d[1])
    assert a[0].min() >= 0 and a[0].max() < 1000 and a[0].dtype == torch.long
    assert derive_seed(1, 2) != derive_seed(2, 1)


def test_resume_after_fewer_epochs_equals_uninterrupted_run(tmp_path, tiny_model_config):
    run_config = _run_config(tiny_model_config)
    full = _cfg(tmp_path, "full", n_epochs=3, ema_decay=0.8, checkpoint_every=1)
    _train(run_config, full)
    first = _cfg(tmp_path, "split", n_epochs=1, ema_decay=0.8, checkpoint_every=1)
    _train(run_config, first)
    second = _cfg(tmp_path, "split", n_epochs=3, ema_decay=0.8, checkpoint_every=1)
    summary = _train(run_config, second)
    assert summary.start_epoch == 1  # continues at the next epoch, none skipped
    a = load_checkpoint(tmp_path / "full" / LAST_CHECKPOINT)
    b = load_checkpoint(tmp_path / "split" / LAST_CHECKPOINT)
    assert a["epoch"] == b["epoch"] == 3 and a["global_step"] == b["global_step"] == 6
    _assert_same_state(a["model_state_dict"], b["model_state_dict"])
    _assert_same_state(a["ema_state_dict"], b["ema_state_dict"])
    for pa, pb in zip(a["optimizer_state_dict"]["state"].values(), b["optimizer_state_dict"]["state"].values(),
                      strict=True):
        _assert_same_state(pa, pb)
    assert a["best_loss"] == b["best_loss"]


def test_keyboard_interrupt_mid_epoch_leaves_a_resumable_checkpoint(tmp_path, tiny_model_config, monkeypatch):
    run_config = _run_config(tiny_model_config)
    _train(run_config, _cfg(tmp_path, "full", n_epochs=2))

    calls = {"n": 0}
    real_step = training.train_step

    def interrupting_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # second step of epoch 2 (2 steps per epoch)
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(training, "train_step", interrupting_step)
    cfg = _cfg(tmp_path, "split", n_epochs=2)
    with pytest.raises(KeyboardInterrupt):
        _train(run_config, cfg)
    run_dir = tmp_path / "split"
    assert load_checkpoint(run_dir / LAST_CHECKPOINT)["epoch"] == 1
    assert not list(run_dir.glob(".*.tmp"))  # no half-written file left behind
    monkeypatch.setattr(training, "train_step", real_step)
    summary = _train(run_config, cfg)
    assert summary.start_epoch == 1
    _assert_same_state(load_checkpoint(tmp_path / "full" / LAST_CHECKPOINT)["model_state_dict"],
                       load_checkpoint(run_dir / LAST_CHECKPOINT)["model_state_dict"])


def test_already_complete_run_does_nothing(tmp_path, tiny_model_config):
    run_config = _run_config(tiny_model_config)
    cfg = _cfg(tmp_path, n_epochs=1)
    _train(run_config, cfg)
    before = (tmp_path / "run" / LAST_CHECKPOINT).read_bytes()
    summary = _train(run_config, cfg)
    assert summary.start_epoch == summary.epochs_completed == 1 and summary.epoch_losses == []
    assert (tmp_path / "run" / LAST_CHECKPOINT).read_bytes() == before


def test_resume_from_periodic_checkpoint_and_missing_one(tmp_path, tiny_model_config):
    run_config = _run_config(tiny_model_config)
    _train(run_config, _cfg(tmp_path, n_epochs=2, checkpoint_every=1))
    summary = _train(run_config, _cfg(tmp_path, n_epochs=3, checkpoint_every=1, resume_epoch=1))
    assert summary.start_epoch == 1 and summary.epochs_completed == 3
    with pytest.raises(UserError, match=r"^resume_epoch=7: .*checkpoint_7\.pth not found"):
        find_resume_point(tmp_path / "run", 7)


def test_resume_with_contradicting_config_is_refused(tmp_path, tiny_model_config):
    _train(_run_config(tiny_model_config), _cfg(tmp_path, n_epochs=1))
    other = _run_config(tiny_model_config, ScheduleConfig(beta_schedule="scaled_linear"))
    with pytest.raises(UserError, match=r"--beta_schedule: checkpoint linear_beta, flags scaled_linear_beta"):
        _train(other, _cfg(tmp_path, n_epochs=2))


def test_tensorboard_tags(tmp_path, tiny_model_config):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _train(_run_config(tiny_model_config), _cfg(tmp_path, n_epochs=1, sample_steps=3))
    tr = EventAccumulator(str(tmp_path / "run" / "train"))
    tr.Reload()
    va = EventAccumulator(str(tmp_path / "run" / "val"))
    va.Reload()
    assert {"loss", "epoch_loss", "lr", "images_per_second"} <= set(tr.Tags()["scalars"])
    assert len(tr.Scalars("loss")) == 2  # one per step
    assert tr.Scalars("lr")[0].value == pytest.approx(1e-3)
    assert "loss" in va.Tags()["scalars"]
    assert "samples" in va.Tags()["images"]
    img = va.Images("samples")[0]
    # 8 tiles of 8x8, 4 per row, 2 px padding: 2 rows -> 2 + 2 * 10 = 22 high, 2 + 4 * 10 = 42 wide.
    assert (img.height, img.width) == (22, 42)


def test_sample_images_in_unit_range_and_grids(tiny_model_config):
    torch.manual_seed(0)
    model = build_unet(tiny_model_config)
    samples = training.sample_images(model, ScheduleConfig(b_scale=2.0), (1, 8, 8), 3, 4,
                                     torch.Generator().manual_seed(0), torch.device("cpu"),
                                     autoencoder=IdentityAutoencoder(2.0))
    assert samples.shape == (3, 1, 8, 8) and samples.min() >= 0 and samples.max() <= 1
    vol = torch.rand(2, 1, 8, 8, 8)
    grid = image_grid(vol)
    assert grid.shape == (3, 2 + 2 * 10, 2 + 3 * 10)  # 2 volumes x 3 slices
    # The middle tile of row 1 is the 50 % slice of volume 0 (make_grid repeats 1 channel to 3).
    assert torch.equal(grid[0, 2:10, 12:20], vol[0, 0, :, :, 4])


def test_3d_training(tmp_path):
    model = ModelConfig(preset="test3d", spatial_dims=3, in_channels=1, channels=(8, 16), attention_levels=(False, True),
                        num_res_blocks=1, num_head_channels=16, norm_num_groups=8)
    run_config = _run_config(model)
    cfg = _cfg(tmp_path, n_epochs=1, batch_size=2, sample_steps=2)
    summary = train(run_config, cfg, ToyImages(2, spatial_dims=3), ToyImages(2, spatial_dims=3))
    assert summary.global_step == 1 and math.isfinite(summary.val_losses[1])
    ckpt = load_checkpoint(tmp_path / "run" / LAST_CHECKPOINT)
    assert ckpt["config"]["image_shape"] == [1, 8, 8, 8]
    assert ckpt["model_state_dict"]["conv_in.conv.weight"].ndim == 5


def test_bf16_autocast_on_cpu_trains(tmp_path, tiny_model_config):
    summary = _train(_run_config(tiny_model_config), _cfg(tmp_path, n_epochs=1, precision="bf16"))
    assert math.isfinite(summary.epoch_losses[0])
    ckpt = load_checkpoint(tmp_path / "run" / LAST_CHECKPOINT)
    assert ckpt["scaler_state_dict"] is None and ckpt["train_config"]["precision"] == "bf16"


def test_precision_is_one_of_the_named_ones(tmp_path):
    with pytest.raises(UserError, match="precision must be one of"):
        _cfg(tmp_path, precision="amp")


def test_image_size_must_fit_the_unet(tiny_model_config):
    check_image_fits_unet((1, 8, 12), tiny_model_config, "x.csv")
    with pytest.raises(UserError, match=r"x\.csv: image size 10x8 is not divisible by 4"):
        check_image_fits_unet((1, 10, 8), tiny_model_config, "x.csv")
    with pytest.raises(UserError, match="3 channel"):
        check_image_fits_unet((3, 8, 8), tiny_model_config, "x.csv")
