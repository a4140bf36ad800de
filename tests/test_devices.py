"""The precision rule (``--amp``/``--precision``) with the CPU's bf16 capability faked, TF32 switches, and the
machine-sized defaults (loader workers)."""

from __future__ import annotations

import pytest
import torch

from ddpm_ood import devices
from ddpm_ood.devices import (
    autocast_context,
    configure_precision,
    default_num_workers,
    fastest_native_precision,
    make_grad_scaler,
    resolve_precision,
)
from ddpm_ood.errors import UserError
from ddpm_ood.upstream.legacy import precision_from_legacy

CPU = torch.device("cpu")
# A CUDA device object needs no GPU until something runs on it; the rule only looks at its type.
CUDA = torch.device("cuda", 0)


@pytest.fixture
def native_bf16(monkeypatch):
    monkeypatch.setenv(devices.CPU_BF16_ENV, "1")


@pytest.fixture
def emulated_bf16(monkeypatch):
    monkeypatch.setenv(devices.CPU_BF16_ENV, "0")


def test_without_amp_or_precision_it_is_fp32(native_bf16):
    assert resolve_precision(CPU) == "fp32"
    assert resolve_precision(CUDA, amp=False) == "fp32"


def test_amp_on_a_cpu_with_native_bf16_is_bf16(native_bf16, capsys):
    assert resolve_precision(CPU, amp=True) == "bf16"
    assert capsys.readouterr().err == ""


def test_amp_on_a_cpu_that_emulates_bf16_is_fp32_said_in_one_line(emulated_bf16, capsys):
    assert resolve_precision(CPU, amp=True) == "fp32"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bf16 is emulated on this CPU" in err[0] and "using fp32" in err[0]


def test_amp_on_cuda_is_fp16(emulated_bf16):
    assert fastest_native_precision(CUDA) == ("fp16", None)
    assert resolve_precision(CUDA, amp=True) == "fp16"


def test_explicit_bf16_on_an_emulating_cpu_is_obeyed_with_a_warning(emulated_bf16, capsys):
    assert resolve_precision(CPU, precision="bf16") == "bf16"
    assert "emulates it" in capsys.readouterr().err


@pytest.mark.parametrize(
    "device,precision,amp,message",
    [
        (CPU, "fp16", False, "for CUDA GPUs"),
        (CPU, "tf32", False, "for CUDA GPUs"),
        (CPU, "fp32", True, "contradicts"),
        (CUDA, "tf32", True, "contradicts"),
        (CPU, "fp64", False, "unknown precision"),
    ],
)
def test_impossible_or_contradicting_requests_are_refused(native_bf16, device, precision, amp, message):
    with pytest.raises(UserError, match=message):
        resolve_precision(device, precision=precision, amp=amp)


@pytest.mark.parametrize("avx512_bf16,amx,native", [(True, False, True), (False, True, True), (False, False, False)])
def test_detection_reads_the_cpu_feature_flags(monkeypatch, avx512_bf16, amx, native):
    monkeypatch.delenv(devices.CPU_BF16_ENV, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert devices.cpu_has_native_bf16() is native
    assert fastest_native_precision(CPU)[0] == ("bf16" if native else "fp32")


def test_inference_tf32_switches_are_scoped_to_the_forward_pass():
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        with autocast_context(CUDA, "fp32"):
            assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        with autocast_context(CUDA, "tf32"):
            assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_fp32_switches_tf32_off_on_cuda_and_tf32_on():
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cudnn.allow_tf32 = True  # PyTorch's default for cuDNN convolutions
        configure_precision("fp32", CUDA)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
        configure_precision("tf32", CUDA)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
        configure_precision("fp16", CUDA)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_autocast_and_scaler_follow_the_precision():
    conv = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with autocast_context(CPU, "bf16"):
        assert conv(x).dtype == torch.bfloat16
    with autocast_context(CPU, "fp32"):
        assert conv(x).dtype == torch.float32
    assert make_grad_scaler(CPU, "bf16") is None and make_grad_scaler(CPU, "fp32") is None


def test_legacy_settings_precision():
    assert precision_from_legacy({"amp": False}) == "fp32"
    assert precision_from_legacy({"amp": True}) is None  # fp16 on CUDA or bf16 on CPU: not recorded
    assert precision_from_legacy({"precision": "bf16", "amp": True}) == "bf16"


@pytest.mark.parametrize("cpus,sharing,expected", [(2, 1, 1), (1, 1, 0), (16, 1, 8), (64, 1, 8), (16, 4, 3),
                                                   (2, 2, 0)])
def test_default_workers_are_capped_at_the_cores(monkeypatch, cpus, sharing, expected):
    monkeypatch.setattr(devices, "available_cpus", lambda: cpus)
    assert default_num_workers(8, processes_sharing=sharing) == expected


def test_cli_default_workers_fit_this_machine():
    from ddpm_ood.cli.train_ddpm import build_parser

    args = build_parser().parse_args(["--output_dir=o", "--model_name=m", "--training_ids=t", "--validation_ids=v"])
    assert args.num_workers == min(8, devices.available_cpus() - 1)
    args = build_parser().parse_args(["--output_dir=o", "--model_name=m", "--training_ids=t", "--validation_ids=v",
                                      "--num_workers=8"])
    assert args.num_workers == 8  # an explicit value is obeyed
