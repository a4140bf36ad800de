"""The VQ-VAE's perceptual training loss: MONAI's ``PerceptualLoss``, as the reference's VQ-VAE trainer uses it.

It is not the reconstruction metric (``perceptual.lpips.PerceptualDistance``) and keeps the reference's conventions,
which differ from the metric's: images go into LPIPS without its [0, 1] -> [-1, 1] normalisation, and in 3D the loss
is the SUM over the three axes of the mean LPIPS of a random half of the slices along each (the metric: the mean
over the axes of all slices). Only its construction differs from MONAI's: the LPIPS network is built offline
(``perceptual.lpips.build_lpips``) where MONAI's constructor would download AlexNet.
"""

from __future__ import annotations

import torch
from monai.losses import PerceptualLoss

from ddpm_ood.perceptual.lpips import pad_to_min_size

FAKE_3D_RATIO = 0.5  # MONAI's default, which the reference keeps


class _LPIPSOnRawInputs(torch.nn.Module):
    """LPIPS called as MONAI's loss calls it: ``net(x, y)`` -> (N, 1, 1, 1), inputs not normalised. Images smaller
    than AlexNet takes are zero-padded first (the reference cannot train on them at all)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(pad_to_min_size(x), pad_to_min_size(y), normalize=False)


class ReferencePerceptualLoss(PerceptualLoss):
    """``PerceptualLoss(spatial_dims, network_type="alex", is_fake_3d=True)`` around a given LPIPS network.

    ``forward(input, target)``: (B, C, H, W) or (B, C, D, H, W), C = 1 or 3 -> a scalar >= 0 (MONAI's forward,
    unchanged). The 3D slice subsets come from the global torch RNG, which the training loop re-seeds per epoch and
    rank, so a resumed run draws the same slices as an uninterrupted one.
    """

    def __init__(self, spatial_dims: int, lpips_net: torch.nn.Module) -> None:
        # Not PerceptualLoss.__init__, which builds (and downloads) its own LPIPS; these are the attributes its
        # forward reads, with the values that constructor would set.
        torch.nn.Module.__init__(self)
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.spatial_dims = spatial_dims
        self.is_fake_3d = True
        self.fake_3d_ratio = FAKE_3D_RATIO
        self.channel_wise = False
        self.perceptual_function = _LPIPSOnRawInputs(lpips_net)
