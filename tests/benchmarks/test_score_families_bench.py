"""benchmarks/score_families.py: a whole --smoke run prints every part of the AUROC table (every registered family at
the defaults with shared and per-image noise, M shared draws, DiffPath's clip on and off, the L/K sweep, the
feature-family ensemble) with nfe and AUROCs, and the cost comparison; its flags refuse what cannot run. Structure
and invariants only, never timings or AUROC values."""

from __future__ import annotations

import re

import numpy as np
import pytest
from tiny_run import benchmark_module, needs_lpips

from ddpm_ood.diffusion.timesteps import start_timesteps
from ddpm_ood.errors import UserError
from ddpm_ood.families import ScoreOptions, feature_family_names, make_settings, nfe_of
from ddpm_ood.families.base import even_levels
from ddpm_ood.reconstruction.engine import evaluations_per_image

NOISE = ("eps_norm", "denoising_error")
DIFFPATH = ("diffpath6d", "diffpath1d")
MEMBERS = ("eps_norm", "denoising_error", "msma", "diffpath6d")  # the ensemble: diffpath1d is part of diffpath6d
SETTINGS = (5, 10, 20)
DRAWS = (1, 2, 4)
OUT_SETS = ("MNIST", "vflip", "hflip")


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("score_families.py", "score_families_bench") as module:
        yield module


@pytest.fixture(scope="module")
def context(bench, tmp_path_factory):
    """The smoke checkpoint's ScoreContext, built as reconstruct.py builds it."""
    from ddpm_ood.reconstruction.stage import score_context
    from ddpm_ood.runs import open_run

    path = tmp_path_factory.mktemp("smoke") / "smoke.pth"
    bench.save_smoke_checkpoint(path)
    return score_context(open_run(path), 2)


def msma_levels(context) -> int:
    return len(make_settings(["msma"], ScoreOptions(), context)["msma"].levels)


def wanted_rows(n_msma: int) -> list[tuple[str, str, str]]:
    """(part, family, setting) of every row a default run prints, in table order."""
    def noise(L, protocol="shared", m=1):
        return f"L={L} noise={protocol} M={m}"

    def path(k, clip="on"):
        return f"K={k} clip={clip}"

    msma = f"scales=10 levels={n_msma}"
    rows = []
    for family in NOISE:
        rows += [("noise", family, noise(10)), ("noise", family, noise(10, "per_image"))]
    rows += [("noise", "msma", msma)] + [("noise", family, path(10)) for family in DIFFPATH]
    rows += [("draws", family, noise(10, m=m)) for family in NOISE for m in DRAWS]
    rows += [("clip", family, path(10, clip)) for family in DIFFPATH for clip in ("on", "off")]
    rows += [("sweep", family, noise(v)) for v in SETTINGS for family in NOISE]
    rows += [("sweep", family, path(v)) for v in SETTINGS for family in DIFFPATH]
    rows += [("ensemble", "ensemble", f"{noise(10, protocol)} + {msma} + {path(10)}")
             for protocol in ("shared", "per_image")]
    rows += [("ensemble", "ensemble", f"{noise(v)} + {msma} + {path(v)}") for v in SETTINGS if v != 10]
    return rows


def expected_nfe(family: str, setting: str, context) -> int:
    """nfe_of the registry's settings for a row's family and setting label (parsed independently of the script)."""
    fields = dict(re.findall(r"(\w+)=(\w+)", setting))
    options = ScoreOptions(
        score_levels=even_levels(int(fields.get("L", 10))), score_noise=fields.get("noise", "shared"),
        score_noise_draws=int(fields.get("M", 1)), diffpath_steps=int(fields.get("K", 10)),
        diffpath_clip=fields.get("clip", "on") == "on")
    families = list(MEMBERS) if family == "ensemble" else [family]
    return nfe_of(families, make_settings(families, options, context))


def read_table(bench, lines: list[str]) -> list[dict[str, str]]:
    header_at = lines.index("\t".join(bench.TABLE_HEADER))
    table = []
    for line in lines[header_at + 1 :]:
        if "\t" not in line:
            break
        table.append(dict(zip(bench.TABLE_HEADER, line.split("\t"), strict=True)))
    return table


@needs_lpips
@pytest.mark.slow
def test_smoke_report(bench, context, capsys):
    assert bench.main(["--smoke", "--threads=1"]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    keys = dict(re.findall(r"^(\w+): (.*)$", out, re.M))
    # the CPU kind the figures were measured on, first
    assert lines[0].startswith("device: cpu")
    assert keys["cpu_capability"] and keys["native_bf16"] in ("yes", "no") and keys["precision"] == "fp32"
    assert "eps_norm, denoising_error, msma, diffpath6d (feature families only" in keys["scores"]

    assert bench.TABLE_HEADER == ["part", "family", "setting", "nfe", *[f"auroc_{s}" for s in OUT_SETS], "mean",
                                  "feature_ms_per_image"]
    table = read_table(bench, lines)
    n_msma = msma_levels(context)
    assert 2 <= n_msma <= 10
    got = [(r["part"], r["family"], r["setting"]) for r in table]
    assert got == wanted_rows(n_msma)
    # every registered feature family is in the defaults part
    assert {r["family"] for r in table if r["part"] == "noise"} == set(feature_family_names())
    by_row = {}
    for r in table:
        values = [float(r[f"auroc_{s}"]) for s in OUT_SETS]
        assert int(r["nfe"]) == expected_nfe(r["family"], r["setting"], context), r
        assert all(0.0 <= v <= 1.0 for v in values), r
        assert abs(float(r["mean"]) - np.mean(values)) < 1e-4, r
        assert float(r["feature_ms_per_image"]) > 0, r
        # the same family and setting in two parts is one computation: the same numbers
        by_row.setdefault((r["family"], r["setting"]), set()).add(tuple(values))
    assert all(len(v) == 1 for v in by_row.values()), by_row
    nfe = {(r["part"], r["family"], r["setting"]): int(r["nfe"]) for r in table}
    assert [nfe[("draws", "eps_norm", f"L=10 noise=shared M={m}")] for m in DRAWS] == [10, 20, 40]
    assert nfe[("noise", "msma", f"scales=10 levels={n_msma}")] == n_msma
    assert nfe[("ensemble", "ensemble", f"L=10 noise=shared M=1 + scales=10 levels={n_msma} + K=10 clip=on")] == (
        20 + n_msma)  # eps_norm and denoising_error share their 10 calls

    # the cost comparison: the 10-evaluation families, msma, all of them, and the paper's reconstruction
    cost = {k: float(v.split()[0]) for k, v in keys.items() if k.startswith(("cost_s_per_image_", "cost_ratio_"))}
    recon = "reconstruction_skip16"
    families = ("noise_levels_L10", "msma", "diffpath_K10", "all_families_L10_K10")
    assert set(cost) == {f"cost_s_per_image_{m}" for m in (*families, recon)} | {
        f"cost_ratio_{m}" for m in (*families, "max")}
    assert f"[nfe {evaluations_per_image(start_timesteps(100, 16), 100, None)}," in keys[f"cost_s_per_image_{recon}"]
    assert "[nfe 10," in keys["cost_s_per_image_noise_levels_L10"] and "[nfe 10," in keys["cost_s_per_image_diffpath_K10"]
    assert f"[nfe {n_msma}," in keys["cost_s_per_image_msma"]
    assert f"[nfe {20 + n_msma}," in keys["cost_s_per_image_all_families_L10_K10"]
    for m in families:
        ratio = cost[f"cost_ratio_{m}"]
        assert ratio > 0
        assert abs(ratio - cost[f"cost_s_per_image_{m}"] / cost[f"cost_s_per_image_{recon}"]) <= 1e-3 + 0.01 * ratio
    assert cost["cost_ratio_max"] == max(cost[f"cost_ratio_{m}"] for m in families)
    assert lines[-1].startswith("cost_ratio_max: ")


def test_table_jobs_follow_the_flags(bench, context):
    """--parts, --draws, --levels and --diffpath_steps choose the rows, without running a network."""
    args = bench.build_parser().parse_args(["--parts=draws,clip,ensemble", "--draws=2,3", "--levels=4",
                                            "--diffpath_steps=4"])
    jobs = bench.table_jobs(args, context)
    assert {part for part, _, _ in jobs} == {"draws", "clip", "ensemble"}
    draws = [(f, s.draws, s.noise) for part, f, s in jobs if part == "draws"]
    assert draws == [(f, m, "shared") for f in NOISE for m in (2, 3)]
    clips = [(f, s.clip) for part, f, s in jobs if part == "clip"]
    assert clips == [(f, clip) for f in DIFFPATH for clip in (context.data_range, None)]
    ensembles = [s for part, f, s in jobs if part == "ensemble"]
    assert all(list(s) == list(MEMBERS) for s in ensembles)
    assert [s["eps_norm"].noise for s in ensembles] == ["shared", "per_image", "shared"]  # defaults x2, L = K = 4
    assert ensembles[-1]["eps_norm"].levels == even_levels(4) and ensembles[-1]["diffpath6d"].steps == 4
    # a family whose settings do not depend on the noise protocol gets one row in the defaults part
    args = bench.build_parser().parse_args(["--parts=noise"])
    families = [f for _, f, _ in bench.table_jobs(args, context)]
    assert families.count("msma") == 1 and families.count("diffpath6d") == 1 and families.count("eps_norm") == 2


def test_parse_counts_and_parts(bench):
    assert bench.parse_counts("5,10,20") == [5, 10, 20]
    for bad in ("5,x", "0,5", "5,5"):
        with pytest.raises(UserError):
            bench.parse_counts(bad)
    assert bench.parse_parts("all") == list(bench.PARTS)
    assert bench.parse_parts("ensemble,noise") == ["noise", "ensemble"]
    for bad in ("", "noise,bogus"):
        with pytest.raises(UserError, match="--parts"):
            bench.parse_parts(bad)


def test_refusals_before_any_work(bench, tmp_path):
    with pytest.raises(UserError, match="DiffPath steps"):
        bench.main(["--smoke", "--diffpath_steps=5,999"])  # no integer stride of 1000 gives 999 steps
    with pytest.raises(UserError, match="score levels"):
        bench.main(["--smoke", "--levels=5,1001"])
    with pytest.raises(UserError, match="no checkpoint"):
        bench.main([f"--checkpoint={tmp_path / 'missing.pth'}", "--threads=1"])
