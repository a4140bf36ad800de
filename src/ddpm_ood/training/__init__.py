"""Training: the loop every task plugs into (loop), the DDPM task (ddpm), the EMA of weights (ema)."""
