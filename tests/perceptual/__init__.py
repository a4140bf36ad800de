"""Tests of ddpm_ood.perceptual (a package, so that test basenames shared with other folders import)."""
