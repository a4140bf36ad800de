"""The VQ-VAE task's parts: the adversarial warm-up, the discriminator's depth for small images, the loss sum."""

from __future__ import annotations

import pytest
import torch
from tiny_run import TINY_VQ_2D

from ddpm_ood.errors import UserError
from ddpm_ood.training.vqvae import (
    ADVERSARIAL_WARMUP_EPOCHS,
    DISCRIMINATOR_LAYERS,
    VQVAELossConfig,
    discriminator_layers,
)


def test_adversarial_weight_is_constant_or_ramped_over_50_epochs():
    flat = VQVAELossConfig(adversarial_weight=0.02)
    assert [flat.adversarial_weight_at(e) for e in (0, 10, 100)] == [0.02] * 3
    ramp = VQVAELossConfig(adversarial_weight=0.02, adversarial_warmup=True)
    assert ADVERSARIAL_WARMUP_EPOCHS == 50
    assert ramp.adversarial_weight_at(0) == 0.0
    assert ramp.adversarial_weight_at(25) == pytest.approx(0.01)
    assert ramp.adversarial_weight_at(50) == ramp.adversarial_weight_at(500) == pytest.approx(0.02)
    with pytest.raises(UserError):
        VQVAELossConfig(adversarial_weight=-1)


@pytest.mark.parametrize("size, layers", [(64, 3), (28, 3), (16, 2), (8, 1)])
def test_discriminator_is_upstreams_unless_the_images_are_too_small(size, layers):
    assert DISCRIMINATOR_LAYERS == 3
    assert discriminator_layers(TINY_VQ_2D, (1, size, size)) == layers


def test_images_too_small_for_any_discriminator_are_refused():
    with pytest.raises(UserError, match="4x4 are too small for the patch discriminator; use --adversarial_weight=0"):
        discriminator_layers(TINY_VQ_2D, (1, 4, 4))


def test_generator_loss_is_the_weighted_sum_of_its_terms(tmp_path):
    from ddpm_ood.config import DataConfig
    from ddpm_ood.distributed import DistContext
    from ddpm_ood.training.loop import TrainConfig
    from ddpm_ood.training.vqvae import VQVAETask

    losses = VQVAELossConfig(adversarial_weight=0.5, perceptual_weight=0.0)
    task = VQVAETask(TINY_VQ_2D, DataConfig(is_grayscale=True), (1, 16, 16), losses,
                     TrainConfig(run_dir=str(tmp_path), num_workers=0), DistContext())
    images = torch.rand(2, 1, 16, 16)
    recon, vq_loss = task.model(images)
    terms = task.generator_losses(images, recon, vq_loss, w_adv=0.5)
    want = terms["l1_loss"] + terms["vq_loss"] + terms["jukebox_loss"] + 0.5 * terms["adversarial_loss"]
    assert torch.allclose(terms["generator_loss"], want)
    assert terms["adversarial_loss"] > 0 and terms["perceptual_loss"] == 0
    assert torch.allclose(terms["l1_loss"], (recon - images).abs().mean())


@pytest.mark.parametrize("shape", [(2, 1, 64, 64), (2, 1, 64, 48, 40)])
def test_perceptual_loss_is_monais_as_the_reference_builds_it(shape):
    # MONAI's own PerceptualLoss(network_type="alex", is_fake_3d=True), its LPIPS stubbed with the same network (its
    # constructor would download AlexNet), against ours under the same RNG state: equal, 2D and 3D (random half of
    # the slices per axis, summed over the axes, inputs not normalised).
    from unittest import mock

    import monai.losses.perceptual as monai_perceptual

    from ddpm_ood.perceptual.loss import ReferencePerceptualLoss
    from ddpm_ood.perceptual.lpips import build_lpips

    torch.manual_seed(0)
    net = build_lpips(pretrained_backbone=False)
    calls = []

    def stub(x, y, normalize=False):
        calls.append(normalize)
        return net(x, y, normalize=normalize)

    with mock.patch.object(monai_perceptual, "LPIPS", return_value=stub):
        theirs = monai_perceptual.PerceptualLoss(spatial_dims=len(shape) - 2, network_type="alex", is_fake_3d=True)
    ours = ReferencePerceptualLoss(len(shape) - 2, net)
    x, y = torch.rand(shape), torch.rand(shape)
    torch.manual_seed(1)
    want = theirs(x, y)
    torch.manual_seed(1)
    got = ours(x, y)
    assert calls and not any(calls) and got.ndim == 0 and got > 0
    torch.testing.assert_close(got, want)
    if len(shape) == 5:  # the slice subset follows the RNG: another seed, another value
        torch.manual_seed(2)
        assert not torch.equal(ours(x, y), want)


def test_perceptual_loss_pads_images_too_small_for_alexnet():
    from ddpm_ood.perceptual.loss import ReferencePerceptualLoss
    from ddpm_ood.perceptual.lpips import build_lpips

    torch.manual_seed(0)
    loss = ReferencePerceptualLoss(2, build_lpips(pretrained_backbone=False))
    x = torch.rand(2, 1, 16, 16)
    assert loss(x, x) == 0 and loss(x, torch.rand(2, 1, 16, 16)) > 0


def test_loss_term_means_leave_out_non_finite_steps(tmp_path, monkeypatch):
    # As the epoch loss does: a step whose loss is not finite (fp16: skipped by the GradScaler) is not averaged in.
    # Real steps (generator_losses and optimizer_step as they are); a spy that wraps generator_losses records each
    # step's terms. The non-finite step (NaN images) comes last: it leaves the weights and codebook NaN.
    import math

    from ddpm_ood.config import DataConfig
    from ddpm_ood.distributed import DistContext
    from ddpm_ood.training.loop import TrainConfig
    from ddpm_ood.training.vqvae import LOSS_TERMS, VQVAETask

    task = VQVAETask(TINY_VQ_2D, DataConfig(is_grayscale=True), (1, 16, 16),
                     VQVAELossConfig(adversarial_weight=0.0, perceptual_weight=0.0),
                     TrainConfig(run_dir=str(tmp_path), num_workers=0), DistContext())
    real_losses, recorded = task.generator_losses, []

    def spy(*args, **kwargs):
        terms = real_losses(*args, **kwargs)
        recorded.append({name: float(value.detach()) for name, value in terms.items()})
        return terms

    monkeypatch.setattr(task, "generator_losses", spy)
    torch.manual_seed(0)
    batches = [torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16), torch.full((2, 1, 16, 16), float("nan"))]
    losses = [float(task.train_step({"image": images}, epoch=0, step=i)) for i, images in enumerate(batches)]
    assert math.isfinite(losses[0]) and math.isfinite(losses[1]) and math.isnan(losses[2]) and len(recorded) == 3
    scalars = task.scalars()
    for name in LOSS_TERMS:
        if name != "discriminator_loss":
            assert scalars[name] == pytest.approx((recorded[0][name] + recorded[1][name]) / 2, rel=1e-6), name
    assert scalars["generator_loss"] == pytest.approx(sum(losses[:2]) / 2, rel=1e-6)
    assert scalars["l1_loss"] > 0 and scalars["jukebox_loss"] > 0 and scalars["discriminator_loss"] == 0.0
    assert task.scalars()["generator_loss"] == 0.0  # reset after each epoch
