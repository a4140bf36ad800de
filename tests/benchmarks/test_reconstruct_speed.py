"""Smoke test of benchmarks/reconstruct_speed.py on a tiny model: output format and the fp32 comparison.

Not a timed test: it checks that both paths run on the same inputs, that the differences are really computed (a
planted difference is found), and that the report is ``key: value`` lines ending with ``speedup_vs_reference``.
"""

from __future__ import annotations

import importlib.util
import math
import re
import sys

import pytest
import torch
from tiny_run import REPO_ROOT

from ddpm_ood.errors import UserError
from ddpm_ood.reconstruction.engine import evaluations_per_image

SCRIPT = REPO_ROOT / "benchmarks" / "reconstruct_speed.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("reconstruct_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture
def setup(bench, tiny_model_config):
    # 10-step grid, every 3rd start point: 4 start points (t = 1, 31, 61, 91), at most 11 network calls each.
    return bench.BenchmarkSetup(
        model_config=tiny_model_config, image_shape=(1, 8, 8), batch_size=3, skip_factor=3, num_inference_steps=10
    )


def _report_dict(lines: list[str]) -> dict[str, str]:
    pattern = re.compile(r"^([a-z0-9_]+): (.+)$")
    out = {}
    for line in lines:
        match = pattern.match(line)
        assert match, f"not a 'key: value' line: {line!r}"
        out[match.group(1)] = match.group(2)
    return out


def test_random_init_model_is_not_the_zero_function(bench, setup):
    # MONAI zero-initialises output convs: without the re-init both paths would agree trivially.
    model = bench.build_model(setup)
    x = torch.rand(2, 1, 8, 8)
    with torch.inference_mode():
        out = model(x, timesteps=torch.tensor([10, 500]))
    assert out.abs().max() > 1e-3


def test_differences_finds_a_planted_difference(bench, setup):
    images, _ = bench.make_inputs(setup)
    torch.manual_seed(0)
    recons = torch.rand(4, setup.batch_size, 1, 8, 8)
    assert bench.differences(images, recons, recons.clone()) == {"mse": 0.0, "recon": 0.0}
    shifted = recons.clone()
    shifted[2, 1, 0, 3, 3] += 0.25
    diff = bench.differences(images, recons, shifted)
    assert diff["recon"] == pytest.approx(0.25)
    expected = abs(
        bench.mse_scores(images, recons)[2, 1] - bench.mse_scores(images, shifted)[2, 1]
    ).item()
    assert diff["mse"] == pytest.approx(expected) and diff["mse"] > 0


def test_reference_subset_is_compared_on_the_same_images(bench, setup):
    images, _ = bench.make_inputs(setup)
    torch.manual_seed(1)
    fast = torch.rand(4, setup.batch_size, 1, 8, 8)
    # reference computed on the first image only: rows of the other images must not enter the comparison
    reference = fast[:, :1].clone()
    fast[:, 1:] += 0.5
    assert bench.differences(images, reference, fast)["recon"] == 0.0


def test_benchmark_fp32_paths_agree_and_report_format(bench, setup):
    settings = bench.FastSettings(max_batch=5)
    res = bench.run_benchmark(setup, settings)
    assert 0.0 <= res["max_abs_diff_mse"] < bench.FP32_TOLERANCE
    assert 0.0 <= res["max_abs_diff_recon"] < bench.FP32_TOLERANCE
    for key in ("reference_images_per_s", "fast_images_per_s", "single_image_latency_ratio", "speedup_vs_reference"):
        assert math.isfinite(res[key]) and res[key] > 0
    assert res["speedup_vs_reference"] == pytest.approx(res["fast_images_per_s"] / res["reference_images_per_s"])

    lines = bench.format_report(setup, settings, res)
    report = _report_dict(lines)
    assert lines[-1].startswith("speedup_vs_reference: ")
    assert float(report["max_abs_diff_mse"]) == pytest.approx(res["max_abs_diff_mse"], rel=1e-3, abs=1e-12)
    assert report["fp32_check"].startswith("pass")
    assert float(report["single_image_latency_ratio"]) > 0
    assert report["start_points"] == "4" and report["batch_size"] == "3"
    assert "fast_fp32_images_per_s" not in report  # only reported when the fast path runs bf16/fp16
    # per-evaluation costs: both paths make evaluations_per_image x images evaluations
    assert res["evaluations_per_image"] == evaluations_per_image(setup.start_ts, setup.num_inference_steps)
    assert res["reference_ms_per_evaluation"] == pytest.approx(
        1000 * res["reference_s"] / (res["evaluations_per_image"] * setup.batch_size))
    assert report["floor_ms_per_evaluation"].endswith(f"(one fast-path call of {res['floor_tick_size']} samples)")
    assert float(report["speedup_bound_at_floor"]) == pytest.approx(
        res["reference_ms_per_evaluation"] / res["floor_ms_per_evaluation"], rel=1e-2)


def test_amp_run_reports_fp32_fast_path_separately(bench, setup):
    setup = bench.dataclasses.replace(setup, batch_size=2, reference_images=1)
    settings = bench.FastSettings(precision="bf16", channels_last=True)
    res = bench.run_benchmark(setup, settings)
    assert res["n_reference"] == 1
    assert res["max_abs_diff_mse"] < bench.FP32_TOLERANCE  # fp32 fast (channels_last) vs fp32 reference
    assert res["max_abs_diff_recon_amp"] > 0  # bf16 autocast really ran: it changes the numbers
    report = _report_dict(bench.format_report(setup, settings, res))
    for key in ("fast_fp32_images_per_s", "fast_fp32_speedup_vs_reference", "max_abs_diff_mse_amp"):
        assert key in report
    assert report["reference_images"] == "1"


def test_flags(bench):
    parser = bench.build_parser()
    setup, settings = bench.setup_from_args(parser.parse_args(["--quick", "--device=cpu"]))
    assert setup.model_config.preset == "tiny" and setup.image_shape == (1, 28, 28)
    assert setup.batch_size == 4 and len(setup.start_ts) == 25
    assert settings == bench.best_settings(torch.device("cpu"))
    _, settings = bench.setup_from_args(parser.parse_args(["--quick", "--device=cpu", "--precision=bf16",
                                                           "--max_batch=64"]))
    assert settings.precision == "bf16" and settings.mixed and settings.max_batch == 64
    setup, _ = bench.setup_from_args(parser.parse_args(["--device=cpu"]))
    assert setup.model_config.preset == "small"
    with pytest.raises(UserError, match="--image_size"):
        bench.setup_from_args(parser.parse_args(["--quick", "--device=cpu", "--image_size=30"]))
    with pytest.raises(UserError, match="--batch_size"):
        bench.setup_from_args(parser.parse_args(["--quick", "--device=cpu", "--batch_size=0"]))
    with pytest.raises(SystemExit):
        parser.parse_args(["--precision=fp8"])


@pytest.mark.parametrize("native,expected", [("1", "bf16"), ("0", "fp32")])
def test_fast_path_precision_follows_what_the_cpu_computes_natively(bench, monkeypatch, native, expected):
    monkeypatch.setenv("DDPM_OOD_CPU_NATIVE_BF16", native)
    assert bench.best_settings(torch.device("cpu")).precision == expected
    _, settings = bench.setup_from_args(bench.build_parser().parse_args(["--quick", "--device=cpu"]))
    assert settings.precision == expected
