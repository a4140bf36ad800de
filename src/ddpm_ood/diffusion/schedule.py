"""The noise schedule: closed forms, and the only place MONAI schedulers are constructed (its names and defaults
are ``config``'s).

``t`` always indexes the 1000-step (``num_train_timesteps``) training schedule; ``alphas_cumprod[t]`` is the signal
fraction of x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ddpm_ood.errors import UserError

if TYPE_CHECKING:
    import torch

    from ddpm_ood.config import ScheduleConfig

def _apply_trained_betas(scheduler, config: ScheduleConfig) -> None:
    """A published model's explicit betas (``config.EXPLICIT_BETAS``) replace the placeholder schedule the MONAI
    scheduler was built with, derived as MONAI and diffusers derive theirs (float32: alphas = 1 - betas, cumprod)."""
    if config.trained_betas is None:
        return
    import torch

    betas = torch.tensor(config.trained_betas, dtype=torch.float32)
    scheduler.betas = betas
    scheduler.alphas = 1.0 - betas
    scheduler.alphas_cumprod = torch.cumprod(scheduler.alphas, dim=0)


def _monai_schedule(config: ScheduleConfig) -> dict:
    """The MONAI scheduler arguments of ``config``'s schedule (a placeholder linear one for explicit betas, which
    ``_apply_trained_betas`` then replaces)."""
    if config.trained_betas is not None:
        return {"schedule": "linear_beta"}
    return {"schedule": config.beta_schedule, **config.schedule_args()}


def _apply_snr_shift(scheduler, snr_shift: float) -> None:
    """Upstream's SNR shift: a' = 1 / (1 / (k * SNR) + 1) with SNR = a / (1 - a); alphas/betas re-derived."""
    if snr_shift == 1.0:
        return
    import torch

    a = scheduler.alphas_cumprod.double()
    shifted = 1.0 / (1.0 / (snr_shift * a / (1 - a)) + 1.0)
    alphas = torch.cat([shifted[:1], shifted[1:] / shifted[:-1]])
    scheduler.alphas_cumprod = shifted.float()
    scheduler.alphas = alphas.float()
    scheduler.betas = (1 - alphas).float()


def make_ddpm_scheduler(config: ScheduleConfig):
    """MONAI DDPMScheduler for training and sampling (clip_sample to [-1, 1], fixed_small variance)."""
    from monai.networks.schedulers import DDPMScheduler

    scheduler = DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        prediction_type=config.prediction_type,
        **_monai_schedule(config),
    )
    _apply_trained_betas(scheduler, config)
    _apply_snr_shift(scheduler, config.snr_shift)
    return scheduler


def make_pndm_scheduler(config: ScheduleConfig, num_inference_steps: int):
    """MONAI PNDMScheduler in PLMS mode, as the paper-era sampler: timesteps 1, 11, ..., 991 for 100 steps.

    ``set_alpha_to_one=True``: the last step lands on the clean image (alpha = 1), so a perfect noise predictor
    reconstructs its input exactly. The scheduler is always driven with epsilon (see ``to_epsilon``), so MONAI's
    own handling of v/sample prediction is not used.
    """
    from monai.networks.schedulers import PNDMScheduler

    scheduler = PNDMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        skip_prk_steps=True,
        set_alpha_to_one=True,
        prediction_type="epsilon",
        steps_offset=1,
        **_monai_schedule(config),
    )
    _apply_trained_betas(scheduler, config)
    _apply_snr_shift(scheduler, config.snr_shift)
    scheduler.set_timesteps(num_inference_steps)
    return scheduler


def alphas_cumprod(config: ScheduleConfig) -> torch.Tensor:
    """(num_train_timesteps,) float32 cumulative signal fractions, decreasing from ~1 to ~0."""
    return make_ddpm_scheduler(config).alphas_cumprod.float().clone()


def to_epsilon(
    model_output: torch.Tensor, x_t: torch.Tensor, alpha_t: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """Convert a network output to the noise estimate eps. ``alpha_t``: alphas_cumprod[t], broadcastable to x_t."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return alpha_t.sqrt() * model_output + (1 - alpha_t).sqrt() * x_t
    if prediction_type == "sample":
        return (x_t - alpha_t.sqrt() * model_output) / (1 - alpha_t).sqrt()
    raise UserError(f"unknown prediction type {prediction_type!r}")


def training_target(
    scheduler, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """What the network regresses for each prediction type (upstream always used the noise, wrongly)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(clean, noise, timesteps)
    if prediction_type == "sample":
        return clean
    raise UserError(f"unknown prediction type {prediction_type!r}")


def make_ddim_scheduler(config: ScheduleConfig, num_inference_steps: int):
    """MONAI DDIMScheduler (eta = 0 when stepped with eta=0) for quick sample grids during training."""
    from monai.networks.schedulers import DDIMScheduler

    scheduler = DDIMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        prediction_type=config.prediction_type,
        **_monai_schedule(config),
    )
    _apply_trained_betas(scheduler, config)
    _apply_snr_shift(scheduler, config.snr_shift)
    scheduler.set_timesteps(num_inference_steps)
    return scheduler
