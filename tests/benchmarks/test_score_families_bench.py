"""benchmarks/score_families.py: a whole --smoke run prints every family x setting with its nfe and AUROCs, and the
cost comparison; its flags refuse what cannot run. Structure and invariants only, never timings."""

from __future__ import annotations

import re

import numpy as np
import pytest
from tiny_run import benchmark_module, needs_lpips

from ddpm_ood.diffusion.timesteps import start_timesteps
from ddpm_ood.errors import UserError
from ddpm_ood.families import FamilySettings, nfe_of
from ddpm_ood.families.base import even_levels
from ddpm_ood.reconstruction.engine import evaluations_per_image

NOISE = ("eps_norm", "denoising_error")
DIFFPATH = ("diffpath6d", "diffpath1d")
SETTINGS = (5, 10, 20)
OUT_SETS = ("MNIST", "vflip", "hflip")


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("score_families.py", "score_families_bench") as module:
        yield module


def expected_nfe(family: str, setting: str) -> int:
    """nfe_of for a table row's family and ``L=5`` / ``K=10`` / ``L=K=20`` setting."""
    value = int(setting.rsplit("=", 1)[1])
    if family == "ensemble":
        return nfe_of([*NOISE, *DIFFPATH], FamilySettings(levels=even_levels(value), diffpath_steps=value))
    if family in NOISE:
        return nfe_of([family], FamilySettings(levels=even_levels(value)))
    return nfe_of([family], FamilySettings(diffpath_steps=value))


@needs_lpips
@pytest.mark.slow
def test_smoke_report(bench, capsys):
    assert bench.main(["--smoke", "--threads=1"]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    keys = dict(re.findall(r"^(\w+): (.*)$", out, re.M))
    # the CPU kind the figures were measured on, first
    assert lines[0].startswith("device: cpu")
    assert keys["cpu_capability"] and keys["native_bf16"] in ("yes", "no") and keys["precision"] == "fp32"

    header_at = lines.index("\t".join(bench.TABLE_HEADER))
    table = []
    for line in lines[header_at + 1 :]:
        if "\t" not in line:
            break
        table.append(dict(zip(bench.TABLE_HEADER, line.split("\t"), strict=True)))
    got = [(r["family"], r["L_or_K"]) for r in table]
    wanted = ([(f, f"L={v}") for v in SETTINGS for f in NOISE] + [(f, f"K={v}") for v in SETTINGS for f in DIFFPATH]
              + [("ensemble", f"L=K={v}") for v in SETTINGS])
    assert sorted(got) == sorted(wanted) and len(got) == len(set(got))
    for r in table:
        assert int(r["nfe"]) == expected_nfe(r["family"], r["L_or_K"]), r
        values = [float(r[f"auroc_{s}"]) for s in OUT_SETS]
        assert all(0.0 <= v <= 1.0 for v in values), r
        assert abs(float(r["mean"]) - np.mean(values)) < 1e-4, r

    # the cost comparison: the 10-evaluation families and the paper's reconstruction (skip 16, full path)
    cost = {k: float(v.split()[0]) for k, v in keys.items() if k.startswith(("cost_s_per_image_", "cost_ratio_"))}
    recon = "reconstruction_skip16"
    families = ("noise_levels_L10", "diffpath_K10", "all_families_L10_K10")
    assert set(cost) == {f"cost_s_per_image_{m}" for m in (*families, recon)} | {
        f"cost_ratio_{m}" for m in (*families, "max")}
    assert f"[nfe {evaluations_per_image(start_timesteps(100, 16), 100, None)}," in keys[f"cost_s_per_image_{recon}"]
    assert "[nfe 10," in keys["cost_s_per_image_noise_levels_L10"] and "[nfe 10," in keys["cost_s_per_image_diffpath_K10"]
    for m in families:
        ratio = cost[f"cost_ratio_{m}"]
        assert ratio > 0
        assert abs(ratio - cost[f"cost_s_per_image_{m}"] / cost[f"cost_s_per_image_{recon}"]) <= 1e-3 + 0.01 * ratio
    assert cost["cost_ratio_max"] == max(cost[f"cost_ratio_{m}"] for m in families)
    assert lines[-1].startswith("cost_ratio_max: ")


def test_parse_counts(bench):
    assert bench.parse_counts("5,10,20") == [5, 10, 20]
    for bad in ("5,x", "0,5", "5,5"):
        with pytest.raises(UserError):
            bench.parse_counts(bad)


def test_refusals_before_any_work(bench, tmp_path):
    with pytest.raises(UserError, match="DiffPath steps"):
        bench.main(["--smoke", "--diffpath_steps=5,999"])  # no integer stride of 1000 gives 999 steps
    with pytest.raises(UserError, match="no checkpoint"):
        bench.main([f"--checkpoint={tmp_path / 'missing.pth'}", "--threads=1"])
