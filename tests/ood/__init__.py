"""Tests of ddpm_ood.ood (a package, so that test basenames shared with other folders import)."""
