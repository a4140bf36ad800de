"""benchmarks/gpu_check.sh in its CPU smoke mode: every step runs and every figure lands in the one report file."""

from __future__ import annotations

import os
import subprocess

import pytest
from tiny_run import REPO_ROOT, write_npy_images

from ddpm_ood.data.splits import write_split_csv

SCRIPT = REPO_ROOT / "benchmarks" / "gpu_check.sh"


@pytest.mark.slow
def test_smoke_mode_writes_every_figure(tmp_path):
    splits = tmp_path / "data" / "data_splits"
    shape = (28, 28)
    write_split_csv(splits / "FashionMNIST_train.csv", write_npy_images(tmp_path / "tr", "FashionMNIST", 16, 0, shape))
    write_split_csv(splits / "FashionMNIST_val.csv", write_npy_images(tmp_path / "va", "FashionMNIST", 6, 1, shape))
    write_split_csv(splits / "FashionMNIST_test.csv", write_npy_images(tmp_path / "te", "FashionMNIST", 6, 2, shape))
    write_split_csv(splits / "MNIST_test.csv", write_npy_images(tmp_path / "mn", "MNIST", 6, 3, shape))
    results = tmp_path / "results"
    env = {**os.environ, "GPU_CHECK_SMOKE": "1", "DATA": str(tmp_path / "data"), "RESULTS": str(results),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = (results / "gpu_check.txt").read_text()
    for needle in ("device: cpu", "train_wall_s: ", "epoch 1/1000: train loss", "reconstruct_wall_s: ",
                   "AUC for check vs MNIST", "fp32_check: pass", "speedup_vs_reference: ", "total_wall_s: "):
        assert needle in report, needle
    table = report.split("## 4. training images/s per precision", 1)[1]
    assert " fp32 " in table and " bf16 " in table
    assert not (results / "gpu_check.txt.partial").exists()


def test_missing_data_is_one_line(tmp_path):
    env = {**os.environ, "GPU_CHECK_SMOKE": "1", "DATA": str(tmp_path), "RESULTS": str(tmp_path / "r")}
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path}/data_splits/FashionMNIST_train.csv not found; "
                                                "prepare the data with get_datasets.py"]
