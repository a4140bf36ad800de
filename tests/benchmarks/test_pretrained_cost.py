"""benchmarks/pretrained_cost.py --smoke: every score on both models, one row each with its nfe and speed."""

from __future__ import annotations

import pytest
from tiny_run import benchmark_module, needs_lpips, one_torch_thread

pytest.importorskip("diffusers")


@needs_lpips
def test_smoke_run_prints_every_score_for_both_models(capsys):
    with benchmark_module("pretrained_cost.py") as module, one_torch_thread():
        assert module.main(["--smoke", "--threads=1", "--batch_size=2", "--recon_steps=2"]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines() if line.count("\t") == 4]
    body = rows[1:]
    assert rows[0] == ["model", "params_M", "score", "nfe", "images_per_s"]
    assert len(body) == 8 and {r[0] for r in body} == {"diffusers ddpm-cifar10-32 arch", "ours small"}
    assert [r[2] for r in body[:3]] == ["eps_norm+denoising_error", "msma", "diffpath6d+diffpath1d"]
    assert body[3][2].startswith("reconstruction(") and [r[2] for r in body[4:]] == [r[2] for r in body[:4]]
    assert all(int(r[3]) == 10 for r in body if r[2] in ("eps_norm+denoising_error", "diffpath6d+diffpath1d"))
    assert all(1 <= int(r[3]) <= 10 for r in body if r[2] == "msma") and all(float(r[4]) > 0 for r in body)
