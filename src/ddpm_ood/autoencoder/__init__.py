"""The autoencoder seam: the diffusion model works in its space; pixel space is the identity autoencoder (base)."""
