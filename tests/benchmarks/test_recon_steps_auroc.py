"""benchmarks/recon_steps_auroc.py: its flags, and a whole sweep on tiny data."""

from __future__ import annotations

import json

import pytest
from tiny_run import benchmark_module, needs_lpips, save_tiny_checkpoint, write_npy_images

from ddpm_ood.data.splits import write_split_csv
from ddpm_ood.errors import UserError


@pytest.fixture(scope="module")
def sweep():
    with benchmark_module("recon_steps_auroc.py", "recon_steps_auroc") as module:
        yield module


def test_parse_steps(sweep):
    assert sweep.parse_steps("5, 10,full") == [5, 10, None]
    for bad in ("0", "ten", "5,,full"):
        with pytest.raises(UserError):
            sweep.parse_steps(bad)
    assert sweep.parse_seeds("2,3") == [2, 3]
    with pytest.raises(UserError):
        sweep.parse_seeds("2,x")


@needs_lpips
@pytest.mark.slow
def test_sweep_end_to_end(sweep, tmp_path, capsys):
    quickstart = tmp_path / "quickstart"
    splits = quickstart / "data" / "data_splits"
    for name, seed in (("FashionMNIST_val", 0), ("FashionMNIST_test", 1), ("MNIST_test", 2)):
        write_split_csv(splits / f"{name}.csv", write_npy_images(tmp_path / name, name, 3, seed))
    save_tiny_checkpoint(quickstart / "output" / "fashionmnist_tiny_fast" / "checkpoint.pth")
    assert sweep.main([f"--quickstart_dir={quickstart}", "--recon_steps=2,full", "--n=3", "--skip_factor=64",
                       "--batch_size=2", "--amp=0", "--seeds=3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    header = lines[-3].split("\t")
    rows = [dict(zip(header, line.split("\t"), strict=True)) for line in lines[-2:]]
    assert header[:2] == ["recon_steps", "seed"] and header[-1] == "time_vs_full"
    assert [(r["recon_steps"], r["seed"]) for r in rows] == [("2", "3"), ("full", "3")]
    assert int(rows[0]["evaluations_per_image"]) < int(rows[1]["evaluations_per_image"])
    assert rows[1]["time_vs_full"] == "1.000" and rows[1]["auroc_minus_full"] == "+0.0000"
    for r in rows:
        assert 0.0 <= float(r["auroc_mse+perceptual"]) <= 1.0
    # each run from scratch in its own folder, with the seed and recon_steps asked for
    for label, steps in (("2", 2), ("full", None)):
        ood = quickstart / "recon_steps_sweep" / f"fashionmnist_tiny_fast_recon_steps_{label}_seed_3" / "ood"
        settings = json.loads((ood / "results_MNIST.json").read_text())
        assert settings["seed"] == 3 and settings["recon_steps"] == steps


def test_missing_checkpoint_is_one_line(sweep, tmp_path):
    with pytest.raises(UserError, match="no checkpoint"):
        sweep.main([f"--quickstart_dir={tmp_path}"])
