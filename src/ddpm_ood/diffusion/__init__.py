"""The diffusion model: noise schedule (schedule), start points (timesteps), the PLMS update (plms), the UNet (unet)."""
