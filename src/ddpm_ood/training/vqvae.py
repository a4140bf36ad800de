"""The VQ-VAE task plugged into ``loop.fit`` (the first stage of latent diffusion, upstream's ``train_vqvae.py``).

Generator loss, as the reference: L1 + VQ (commitment) loss + ``perceptual_weight`` * MONAI's perceptual loss
(``perceptual.loss``) +
MONAI's Jukebox spectral loss + w_adv * least-squares patch-adversarial loss; discriminator loss w_adv * (fake + real)
/ 2. w_adv = ``adversarial_weight``, ramped linearly over the first 50 epochs with ``adversarial_warmup``. Images are
float32 (B, C, *spatial) in [0, 1]; the VQ-VAE reconstructs them in the same range (not clamped).

Better than the reference: the discriminator and both optimizers are checkpointed (so a resumed run equals an
uninterrupted one), the best checkpoint is the lowest validation L1 reconstruction loss, every loss term goes to
TensorBoard, and the configuration travels with the weights.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ddpm_ood.autoencoder.vqvae import build_vqvae
from ddpm_ood.config import DataConfig, VQVAEConfig
from ddpm_ood.devices import autocast_context, configure_precision, make_grad_scaler
from ddpm_ood.distributed import DistContext, all_reduce_sum
from ddpm_ood.errors import ParameterError, UserError
from ddpm_ood.seeding import seed_everything
from ddpm_ood.training.loop import TrainConfig, TrainSummary, fit, log
from ddpm_ood.training.optimizer import optimizer_state_fits, optimizer_step
from ddpm_ood.training.resume import ResumePoint

ADVERSARIAL_WARMUP_EPOCHS = 50
DISCRIMINATOR_LR = 5e-4
LOSS_TERMS = ("l1_loss", "vq_loss", "perceptual_loss", "jukebox_loss", "adversarial_loss", "generator_loss",
              "discriminator_loss")
GRID_IMAGES = 4


@dataclass(frozen=True)
class VQVAELossConfig:
    """Loss weights (upstream's: perceptual 0.001, adversarial 0.01, no warm-up)."""

    adversarial_weight: float = 0.01
    adversarial_warmup: bool = False
    perceptual_weight: float = 0.001

    def __post_init__(self) -> None:
        if self.adversarial_weight < 0 or self.perceptual_weight < 0:
            raise ParameterError("adversarial_weight and perceptual_weight must be >= 0", "adversarial_weight",
                                 "perceptual_weight")

    def adversarial_weight_at(self, epoch: int) -> float:
        """w_adv of 0-based ``epoch``: ramped from 0 over the first 50 epochs with warm-up."""
        if not self.adversarial_warmup:
            return self.adversarial_weight
        return self.adversarial_weight * min(epoch, ADVERSARIAL_WARMUP_EPOCHS) / ADVERSARIAL_WARMUP_EPOCHS


def vqvae_checkpoint_config(vqvae: VQVAEConfig, data: DataConfig, image_shape: tuple[int, ...]) -> dict:
    """``checkpoint["config"]`` of a VQ-VAE checkpoint (``checkpoint.checkpoint_kind`` reads its ``kind``)."""
    return {"kind": "vqvae", "vqvae": vqvae.to_dict(), "data": data.to_dict(), "image_shape": list(image_shape)}


DISCRIMINATOR_LAYERS = 3


def build_discriminator(config: VQVAEConfig, num_layers: int = DISCRIMINATOR_LAYERS) -> torch.nn.Module:
    """Upstream's PatchDiscriminator: 3 layers, 64 channels, kernel 4, LeakyReLU 0.2, batch norm, no bias."""
    from monai.networks.nets import PatchDiscriminator

    return PatchDiscriminator(spatial_dims=config.spatial_dims, channels=64, in_channels=config.out_channels,
                              out_channels=1, num_layers_d=num_layers, kernel_size=4,
                              activation=("LEAKYRELU", {"negative_slope": 0.2}), norm="BATCH", bias=False, padding=1)


def discriminator_layers(config: VQVAEConfig, image_shape: tuple[int, ...]) -> int:
    """Upstream's 3 downsampling layers, or fewer when the images are too small for them (each halves the size and
    the last convolution needs at least 4 pixels a side): the most that fit (a dry run on the meta device)."""
    for layers in range(DISCRIMINATOR_LAYERS, 0, -1):
        try:
            with torch.device("meta"):
                build_discriminator(config, layers).eval()(torch.zeros((1, config.out_channels, *image_shape[1:])))
            return layers
        except RuntimeError:
            continue
    raise UserError(f"images of size {'x'.join(map(str, image_shape[1:]))} are too small for the patch "
                    "discriminator; use --adversarial_weight=0")


def _perceptual(weight: float, spatial_dims: int, device: torch.device) -> torch.nn.Module | None:
    if weight <= 0:
        return None
    from ddpm_ood.perceptual.loss import ReferencePerceptualLoss
    from ddpm_ood.perceptual.lpips import build_lpips

    return ReferencePerceptualLoss(spatial_dims, build_lpips(device))


def check_vqvae_resume(resume: ResumePoint, config: dict, losses: VQVAELossConfig, *,
                       compare_image_shape: bool = True) -> None:
    """UserError naming the checkpoint unless it was trained with the same VQ-VAE, data settings, image shape (unless
    ``compare_image_shape`` is False: before the data are read) and loss weights. An upstream checkpoint (no stored
    configuration) is compared with the ``vqvae_config.json`` beside it, the only record it has."""
    stored = resume.ckpt.get("config")
    if stored is None:
        from ddpm_ood.autoencoder.vqvae import VQVAE_CONFIG_FILE, read_vqvae_config_json

        stored = {"vqvae": read_vqvae_config_json(resume.path.parent / VQVAE_CONFIG_FILE).to_dict()}
        keys = ["vqvae"]
    else:
        keys = ["vqvae", "data", "image_shape"] if compare_image_shape else ["vqvae", "data"]
    diffs = [f"{key}: checkpoint {stored.get(key)}, flags {config[key]}" for key in keys
             if stored.get(key) != config[key]]
    saved_losses = resume.ckpt.get("loss_config")
    if saved_losses is not None and saved_losses != asdict(losses):
        diffs.append(f"loss weights: checkpoint {saved_losses}, flags {asdict(losses)}")
    if diffs:
        raise UserError(f"{resume.path}: flags contradict the checkpoint's configuration ({'; '.join(diffs)}); "
                        "resume with the checkpoint's settings or train under another --model_name")


class VQVAETask:
    """The VQ-VAE (generator) and its patch discriminator, their two Adam optimizers and (fp16 on CUDA) scalers,
    built and restored in a fixed order so that the seeded initial weights are the same on every rank and run."""

    def __init__(self, vqvae: VQVAEConfig, data: DataConfig, image_shape: tuple[int, ...], losses: VQVAELossConfig,
                 cfg: TrainConfig, ctx: DistContext, resume: ResumePoint | None = None) -> None:
        self.cfg, self.ctx, self.device, self.losses = cfg, ctx, ctx.device, losses
        self.config = vqvae_checkpoint_config(vqvae, data, image_shape)
        self.spatial_dims = vqvae.spatial_dims
        seed_everything(cfg.seed)
        self.model = build_vqvae(vqvae).to(self.device)
        layers = discriminator_layers(vqvae, image_shape) if losses.adversarial_weight > 0 else DISCRIMINATOR_LAYERS
        if layers < DISCRIMINATOR_LAYERS:
            log(ctx, f"note: {'x'.join(map(str, image_shape[1:]))} images are too small for upstream's "
                     f"{DISCRIMINATOR_LAYERS}-layer patch discriminator; it has {layers}")
        self.discriminator = build_discriminator(vqvae, layers).to(self.device)
        self.opt_g = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=DISCRIMINATOR_LR)
        configure_precision(cfg.precision, self.device)
        self.scaler_g = make_grad_scaler(self.device, cfg.precision)
        self.scaler_d = make_grad_scaler(self.device, cfg.precision)
        self.skips_non_finite = self.scaler_g is not None
        if resume is not None:
            check_vqvae_resume(resume, self.config, losses)
            self._restore(resume)
        from monai.losses import JukeboxLoss, PatchAdversarialLoss

        self.jukebox = JukeboxLoss(spatial_dims=vqvae.spatial_dims)
        self.adversarial = PatchAdversarialLoss(criterion="least_squares")
        self.perceptual = _perceptual(losses.perceptual_weight, vqvae.spatial_dims, self.device)
        self.generator, self.critic = self.model, self.discriminator
        if ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.generator = DistributedDataParallel(self.model, device_ids=ids, broadcast_buffers=False)
            self.critic = DistributedDataParallel(self.discriminator, device_ids=ids, broadcast_buffers=False)
        self.train_module = torch.nn.ModuleList([self.generator, self.critic])
        self._sums: dict[str, torch.Tensor] = {}
        self._steps: torch.Tensor | int = 0  # steps with a finite generator loss, on the device
        self._grid_images: torch.Tensor | None = None

    def _restore(self, resume: ResumePoint) -> None:
        from ddpm_ood.checkpoint import load_state_strict
        from ddpm_ood.seeding import restore_rng_state

        ck = resume.ckpt
        load_state_strict(self.model, ck["model_state_dict"], f"{resume.path} (model_state_dict)",
                          "the VQ-VAE the flags build")
        if ck.get("discriminator_state_dict") is not None:
            load_state_strict(self.discriminator, ck["discriminator_state_dict"],
                              f"{resume.path} (discriminator_state_dict)", "the discriminator the flags build")
        else:
            log(self.ctx, f"note: {resume.path} has no discriminator weights (upstream); it starts afresh")
        for name, opt in (("optimizer_g_state_dict", self.opt_g), ("optimizer_d_state_dict", self.opt_d)):
            state = ck.get(name)
            if state is not None and optimizer_state_fits(opt, state):
                opt.load_state_dict(state)
            else:
                log(self.ctx, f"note: {resume.path}: no usable {name}; starting a fresh Adam")
        for name, scaler in (("scaler_g_state_dict", self.scaler_g), ("scaler_d_state_dict", self.scaler_d)):
            if scaler is not None and ck.get(name):
                scaler.load_state_dict(ck[name])
        self.opt_g.param_groups[0]["lr"] = self.cfg.lr  # --vqvae_learning_rate wins over the saved value
        restore_rng_state(ck.get("rng_state"))

    def generator_losses(self, images: torch.Tensor, recon: torch.Tensor, vq_loss: torch.Tensor,
                         w_adv: float) -> dict[str, torch.Tensor]:
        """Every generator loss term (fp32 scalars) and their weighted sum ``generator_loss``."""
        recon = recon.float()
        terms = {"l1_loss": F.l1_loss(recon, images), "vq_loss": vq_loss.float().mean(),
                 "jukebox_loss": self.jukebox(recon, images)}
        terms["perceptual_loss"] = (self.perceptual(recon, images) if self.perceptual is not None
                                    else torch.zeros((), device=images.device))
        if w_adv > 0:
            with autocast_context(images.device, self.cfg.precision):
                logits_fake = self.critic(recon.contiguous())[-1]
            terms["adversarial_loss"] = self.adversarial(logits_fake.float(), target_is_real=True,
                                                         for_discriminator=False)
        else:
            terms["adversarial_loss"] = torch.zeros((), device=images.device)
        terms["generator_loss"] = (terms["l1_loss"] + terms["vq_loss"] + terms["jukebox_loss"]
                                   + self.losses.perceptual_weight * terms["perceptual_loss"]
                                   + w_adv * terms["adversarial_loss"])
        return terms

    def train_step(self, batch: dict, epoch: int, step: int) -> torch.Tensor:
        """One generator step, then (when w_adv > 0) one discriminator step, on batch["image"] (B, C, *spatial) in
        [0, 1]. Returns the detached generator loss; every term is summed for the epoch's ``scalars``."""
        images = batch["image"].to(self.device, non_blocking=True)
        w_adv = self.losses.adversarial_weight_at(epoch)
        with autocast_context(self.device, self.cfg.precision):
            recon, vq_loss = self.generator(images)
        terms = self.generator_losses(images, recon, vq_loss, w_adv)
        optimizer_step(terms["generator_loss"], self.opt_g, self.scaler_g)
        if w_adv > 0:
            with autocast_context(self.device, self.cfg.precision):
                fake = self.critic(recon.detach().float().contiguous())[-1]
                real = self.critic(images.contiguous())[-1]
            d_loss = w_adv * 0.5 * (self.adversarial(fake.float(), target_is_real=False, for_discriminator=True)
                                    + self.adversarial(real.float(), target_is_real=True, for_discriminator=True))
            optimizer_step(d_loss, self.opt_d, self.scaler_d)
            terms["discriminator_loss"] = d_loss
        else:
            terms["discriminator_loss"] = torch.zeros((), device=self.device)
        # Steps with a non-finite generator loss (fp16: skipped by the GradScaler) are left out of the means, as
        # they are of the epoch loss; kept on the device (no host sync per step).
        finite = torch.isfinite(terms["generator_loss"].detach())
        for name in LOSS_TERMS:
            value = torch.where(finite, terms[name].detach().float(), 0.0)
            self._sums[name] = self._sums.get(name, 0) + value
        self._steps = self._steps + finite.long()
        return terms["generator_loss"].detach()

    @torch.no_grad()
    def validation_loss(self, loader: Iterable[dict], max_batches: int | None) -> tuple[float, int]:
        """(sum over images of the per-image L1 reconstruction error, number of images), in eval mode."""
        self.model.eval()
        total, count = 0.0, 0
        for b, batch in enumerate(loader):
            if max_batches is not None and b >= max_batches:
                break
            images = batch["image"].to(self.device)
            if self._grid_images is None:
                self._grid_images = images[:GRID_IMAGES].cpu()
            with autocast_context(self.device, self.cfg.precision):
                recon, _ = self.model(images)
            total += float((recon.float() - images).abs().flatten(1).mean(dim=1).double().sum())
            count += images.shape[0]
        return total, count

    @torch.no_grad()
    def log_evaluation(self, writer: Any, global_step: int) -> None:
        """``recons``: the first validation images (top row) over their reconstructions (bottom row), middle slices of
        the last axis for volumes."""
        from torchvision.utils import make_grid

        if self._grid_images is None:
            return
        images = self._grid_images.to(self.device)
        with autocast_context(self.device, self.cfg.precision):
            recon, _ = self.model(images)
        tiles = torch.cat([images, recon.float().clamp(0, 1)]).cpu()
        if self.spatial_dims == 3:
            tiles = tiles[..., tiles.shape[-1] // 2]
        writer.add_image("recons", make_grid(tiles, nrow=len(images), padding=2, pad_value=1.0), global_step)

    def state_dict(self) -> dict[str, Any]:
        """The VQ-VAE checkpoint's own part: both networks (unwrapped from DDP), both optimizers and scalers, the
        configuration (``vqvae_checkpoint_config``) and the loss weights."""
        return {
            "model_state_dict": self.model.state_dict(),
            "discriminator_state_dict": self.discriminator.state_dict(),
            "optimizer_g_state_dict": self.opt_g.state_dict(),
            "optimizer_d_state_dict": self.opt_d.state_dict(),
            "scaler_g_state_dict": self.scaler_g.state_dict() if self.scaler_g is not None else None,
            "scaler_d_state_dict": self.scaler_d.state_dict() if self.scaler_d is not None else None,
            "config": self.config,
            "loss_config": asdict(self.losses),
        }

    def epoch_state(self) -> dict[str, float]:
        """The epoch's running sums of every loss term and its count of finite steps so far, over all ranks (for a
        mid-epoch checkpoint; every rank must call it under DDP)."""
        sums = all_reduce_sum([float(self._sums.get(name, 0.0)) for name in LOSS_TERMS] + [float(self._steps)],
                              self.ctx)
        return {**dict(zip(LOSS_TERMS, sums[:-1], strict=True)), "steps": sums[-1]}

    def load_epoch_state(self, state: dict[str, float]) -> None:
        """Continue the running sums of :meth:`epoch_state` (on one rank: ``scalars`` sums over the ranks)."""
        self._sums = {name: torch.tensor(float(state[name]), device=self.device) for name in LOSS_TERMS
                      if name in state}
        self._steps = torch.tensor(int(state.get("steps", 0)), device=self.device)

    def scalars(self) -> dict[str, float]:
        """The epoch's mean of every loss term over all ranks' batches with a finite loss (then reset), and the
        learning rate. Under DDP every rank must call it (it all-reduces)."""
        sums = all_reduce_sum([float(self._sums.get(name, 0.0)) for name in LOSS_TERMS] + [float(self._steps)],
                              self.ctx)
        out = {name: value / max(sums[-1], 1) for name, value in zip(LOSS_TERMS, sums[:-1], strict=True)}
        self._sums, self._steps = {}, 0
        out["lr"] = self.opt_g.param_groups[0]["lr"]
        return out


def train_vqvae(vqvae: VQVAEConfig, data: DataConfig, losses: VQVAELossConfig, cfg: TrainConfig, train_set: Dataset,
                val_set: Dataset, image_shape: tuple[int, ...], ctx: DistContext | None = None,
                resume: ResumePoint | None = None) -> TrainSummary:
    """Train (or continue training) a VQ-VAE on images (C, *spatial) in [0, 1]; checkpoints and TensorBoard logs go
    under ``cfg.run_dir`` (only rank 0 writes). ``resume`` continues at epoch ``resume.epochs_completed``."""
    ctx = ctx or DistContext()
    task = VQVAETask(vqvae, data, image_shape, losses, cfg, ctx, resume)
    return fit(task, cfg, train_set, val_set, ctx, resume)
