"""ddpm-ood: out-of-distribution detection with denoising diffusion models (Graham et al., CVPR-W 2023)."""

from ddpm_ood.errors import UserError

__all__ = ["UserError", "OODScorer"]


def __getattr__(name: str):
    # OODScorer pulls in torch and MONAI; import it lazily so `import ddpm_ood` stays cheap.
    if name == "OODScorer":
        from ddpm_ood.ood.scorer import OODScorer

        return OODScorer
    raise AttributeError(name)
