"""Tests of ddpm_ood.upstream (a package, so that test basenames shared with other folders import)."""
