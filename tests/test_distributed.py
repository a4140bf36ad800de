"""DDP: the process-group life cycle, and two CPU processes under torchrun writing one set of files."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as torch_dist
from tiny_run import REPO_ROOT

from ddpm_ood.checkpoint import LAST_CHECKPOINT, load_checkpoint, run_config_of
from ddpm_ood.compute import ComputeOptions
from ddpm_ood.devices import resolve_precision
from ddpm_ood.distributed import (
    DistContext,
    all_reduce_sum,
    cleanup_distributed,
    init_distributed,
    launched_by_torchrun,
)

ROOT = REPO_ROOT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_single_process_without_torchrun(monkeypatch):
    for var in ("LOCAL_RANK", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(var, raising=False)
    assert not launched_by_torchrun()
    ctx = init_distributed("cpu")
    assert ctx == DistContext(device=torch.device("cpu"))
    assert ctx.is_main and not ctx.distributed
    assert all_reduce_sum([1.5, 2.0], ctx) == [1.5, 2.0]
    cleanup_distributed()  # a no-op without a group


@pytest.mark.parametrize("precision, amp", [("fp32", False), (None, False), (None, True)])
def test_a_stage_joins_its_launch_with_the_precision_resolved_on_the_launch_device(monkeypatch, tmp_path, precision,
                                                                                    amp):
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    try:
        ctx, resolved = ComputeOptions(device="cpu", precision=precision, amp=amp).launch(tmp_path, "--output_dir")
        assert torch_dist.is_initialized() and ctx.distributed and ctx.device == torch.device("cpu")
        assert resolved == resolve_precision(ctx.device, precision=precision, amp=amp)
    finally:
        cleanup_distributed()


def test_torchrun_environment_starts_and_destroys_a_gloo_group(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    ctx = init_distributed("cpu")
    try:
        assert torch_dist.is_initialized() and torch_dist.get_backend() == "gloo"
        assert ctx.distributed and ctx.is_main and ctx.world_size == 1
        assert all_reduce_sum([3.0, 4.0], ctx) == [3.0, 4.0]
    finally:
        cleanup_distributed()
    assert not torch_dist.is_initialized()


def _write_data(tmp: Path, n_train: int, n_val: int) -> tuple[str, str]:
    (tmp / "img").mkdir()
    paths = []
    for i in range(n_train + n_val):
        a = np.zeros((8, 8), np.uint8)
        a[2:6, i % 4:i % 4 + 4] = 255
        np.save(tmp / "img" / f"{i}.npy", a)
        paths.append(str(tmp / "img" / f"{i}.npy"))
    (tmp / "train.csv").write_text("path\n" + "\n".join(paths[:n_train]) + "\n")
    (tmp / "val.csv").write_text("path\n" + "\n".join(paths[n_train:]) + "\n")
    return str(tmp / "train.csv"), str(tmp / "val.csv")


def _torchrun(args: list[str], cwd: Path, script: str = "train_ddpm.py") -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for var in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}", str(ROOT / script), *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_two_cpu_processes_train_one_run(tmp_path):
    train, val = _write_data(tmp_path, n_train=8, n_val=3)
    proc = _torchrun([f"--output_dir={tmp_path / 'out'}", "--model_name=ddp", f"--training_ids={train}",
                      f"--validation_ids={val}", "--model_type=tiny", "--is_grayscale=1", "--batch_size=2",
                      "--n_epochs=1", "--num_workers=0", "--sample_steps=2", "--device=cpu"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "out" / "ddp"
    # Only rank 0 wrote: one set of checkpoints, one event file per TensorBoard folder.
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pth", LAST_CHECKPOINT, "train", "val"]
    assert len(list((run / "train").iterdir())) == 1 and len(list((run / "val").iterdir())) == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ddp"]
    ckpt = load_checkpoint(run / LAST_CHECKPOINT)
    # 8 images over 2 ranks in batches of 2: 2 steps per epoch (one process would take 4).
    assert ckpt["epoch"] == 1 and ckpt["global_step"] == 2
    assert not any(k.startswith("module.") for k in ckpt["model_state_dict"])  # unwrapped from DDP
    assert run_config_of(ckpt).model.preset == "tiny"
    assert proc.stdout.count("trained 1/1 epochs") == 1  # rank 0 reports, once


@pytest.mark.slow
def test_two_cpu_processes_train_one_vqvae(tmp_path):
    train, val = _write_data(tmp_path, n_train=8, n_val=3)
    proc = _torchrun([f"--output_dir={tmp_path / 'out'}", "--model_name=vq", f"--training_ids={train}",
                      f"--validation_ids={val}", "--is_grayscale=1", "--spatial_dimension=2", "--batch_size=2",
                      "--n_epochs=1", "--num_workers=0", "--device=cpu", "--perceptual_weight=0",
                      "--vqvae_num_channels=[8]", "--vqvae_num_res_channels=[8]", "--vqvae_num_res_layers=1",
                      "--vqvae_downsample_parameters=[[2,4,1,1]]", "--vqvae_upsample_parameters=[[2,4,1,1,0]]",
                      "--vqvae_num_embeddings=8", "--vqvae_embedding_dim=2"], tmp_path, script="train_vqvae.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "out" / "vq"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pth", LAST_CHECKPOINT, "train", "val",
                                                     "vqvae_config.json"]
    ckpt = load_checkpoint(run / LAST_CHECKPOINT, kind="vqvae")
    assert ckpt["epoch"] == 1 and ckpt["global_step"] == 2
    for key in ("model_state_dict", "discriminator_state_dict"):
        assert not any(k.startswith("module.") for k in ckpt[key])
    assert proc.stdout.count("trained 1/1 epochs") == 1
    # The per-term means cover both ranks' batches: the generator loss term equals the epoch loss (the all-reduced
    # mean of the generator losses), not rank 0's half of it.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train = EventAccumulator(str(run / "train")).Reload()
    epoch_loss = train.Scalars("epoch_loss")[-1].value
    rank0_steps = [e.value for e in train.Scalars("loss")]  # per-step losses, logged by rank 0 only
    assert train.Scalars("generator_loss")[-1].value == pytest.approx(epoch_loss, rel=1e-5)
    assert abs(sum(rank0_steps) / len(rank0_steps) - epoch_loss) > 1e-4  # the ranks' halves differ


@pytest.mark.slow
def test_an_error_under_torchrun_reaches_the_user(tmp_path):
    _, val = _write_data(tmp_path, n_train=2, n_val=2)
    proc = _torchrun([f"--output_dir={tmp_path / 'out'}", "--model_name=ddp",
                      f"--training_ids={tmp_path / 'missing.csv'}", f"--validation_ids={val}", "--model_type=tiny",
                      "--is_grayscale=1", "--device=cpu"], tmp_path)
    assert proc.returncode != 0
    # Every rank's stderr is kept (upstream sent ranks != 0 to /dev/null): both ranks report the error.
    assert proc.stderr.count("error: ") >= 2 and "missing.csv: split CSV not found" in proc.stderr
    assert not (tmp_path / "out" / "ddp" / LAST_CHECKPOINT).exists()


def test_any_rank_without_ddp_is_the_flags_themselves():
    from ddpm_ood.distributed import any_rank, check_shared_folder

    assert any_rank([True, False, 1, 0], DistContext()) == [True, False, True, False]
    check_shared_folder("/nonexistent/folder", DistContext(), "--output_dir")  # one process: nothing to compare


def test_workers_of_each_torchrun_restart_use_their_own_store_keys(monkeypatch):
    # torchrun shares one store with every worker generation; a restarted worker must not read the keys (gloo's
    # peer addresses) its dead predecessor wrote there.
    from datetime import timedelta

    from ddpm_ood.distributed import _worker_store

    port = _free_port()
    server = torch_dist.TCPStore("127.0.0.1", port, 1, is_master=True, wait_for_workers=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    assert _worker_store(2, 0, timedelta(seconds=5)) is None  # a fresh store per generation: plain env://
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    first, second = (_worker_store(2, restart, timedelta(seconds=5)) for restart in (0, 1))
    first.set("rank_0", "old address")
    second.set("rank_0", "new address")
    assert first.get("rank_0") == b"old address" and second.get("rank_0") == b"new address"
    assert server.get("ddpm_ood/restart_1/rank_0") == b"new address"


def test_a_start_up_that_does_not_complete_in_time_ends_the_process():
    # A hang inside C++ (gloo's connect, a barrier) cannot be interrupted from Python: the watchdog ends the process
    # so that torchrun restarts the workers.
    code = ("import time\nfrom ddpm_ood.distributed import _exit_unless_done_within\n"
            "with _exit_unless_done_within(0.5, 'rank 1: joining the process group of 2 ranks'):\n"
            "    time.sleep(60)\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("error: rank 1: joining the process group of 2 ranks did not complete within "
                                   "--dist_timeout=0.5 s; exiting so that torchrun can restart the workers")


def test_restarts_over_several_nodes_on_a_shared_store_are_warned_about(monkeypatch):
    from ddpm_ood.distributed import multi_node_restart_note

    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in multi_node_restart_note(DistContext(world_size=8))
    assert multi_node_restart_note(DistContext(world_size=4)) is None  # one node: the restart count is shared
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")
    assert multi_node_restart_note(DistContext(world_size=8)) is None


@pytest.mark.parametrize("under_torchrun", [True, False])
def test_entry_scripts_exit_with_their_status_after_the_exit_handlers(under_torchrun):
    # Under torchrun the process ends without Python's interpreter teardown (where a gloo worker thread can abort a
    # finished run), but only after the exit handlers ran and the output is flushed.
    code = ("import atexit, sys\natexit.register(lambda: print('exit handler ran', flush=True))\n"
            "from ddpm_ood.cli.runner import exit_process\nprint('work done', end='')\nexit_process(75)\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    for var in ("LOCAL_RANK", "WORLD_SIZE"):
        env.pop(var, None)
    if under_torchrun:
        env.update(LOCAL_RANK="0", WORLD_SIZE="1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 75 and proc.stdout == "work doneexit handler ran\n"
