"""Tests of ddpm_ood.reconstruction (a package, so that test basenames shared with other folders import)."""
