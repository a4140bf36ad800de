"""Preemption of the training loop: a stop signal mid-epoch, then the same run again, equals an uninterrupted run bit
for bit (DDPM and VQ-VAE); periodic mid-epoch checkpoints; a signal during a checkpoint write; which checkpoint a
run resumes from.

The signals are real (``os.kill`` of this process inside ``stop_on_signals``, sent from inside a training step, so
that they land at a known step); the conftest tiny UNet on 8x8 images, 4 steps per epoch.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time

import pytest
import torch
from tiny_run import TINY_MODEL, TINY_VQ_2D, one_torch_thread

from ddpm_ood.checkpoint import LAST_CHECKPOINT, MID_EPOCH_CHECKPOINT, load_checkpoint, save_checkpoint
from ddpm_ood.config import DataConfig, RunConfig, ScheduleConfig
from ddpm_ood.distributed import DistContext
from ddpm_ood.preemption import EXIT_PREEMPTED, Preempted, stop_on_signals, stop_requested
from ddpm_ood.training import ddpm as training
from ddpm_ood.training import loop
from ddpm_ood.training import vqvae as vqvae_training
from ddpm_ood.training.ddpm import train
from ddpm_ood.training.loop import TrainConfig
from ddpm_ood.training.resume import find_resume_point
from ddpm_ood.training.vqvae import VQVAELossConfig, train_vqvae

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS_PER_EPOCH = 4  # 8 images, batch 2


class Squares(torch.utils.data.Dataset):
    """Bright squares at a few positions, (1, size, size) in [0, 1]."""

    def __init__(self, n: int, size: int = 8, offset: int = 0) -> None:
        self.n, self.size, self.offset = n, size, offset

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        x = torch.zeros(1, self.size, self.size)
        j = (i + self.offset) % (self.size // 2)
        x[0, 2:6, j:j + 4] = 1.0
        return {"image": x, "index": i}


def _run_config(tiny_model_config) -> RunConfig:
    return RunConfig(model=tiny_model_config, schedule=ScheduleConfig(), data=DataConfig(is_grayscale=True),
                     image_shape=(1, 8, 8))


def _cfg(tmp_path, name: str, **kw) -> TrainConfig:
    base = dict(run_dir=str(tmp_path / name), n_epochs=2, eval_freq=1, checkpoint_every=0, batch_size=2,
                num_workers=0, seed=5, lr=1e-3, ema_decay=0.9, sample_steps=0, checkpoint_every_minutes=0)
    base.update(kw)
    return TrainConfig(**base)


def _train_ddpm(run_config, cfg):
    resume = find_resume_point(cfg.run_dir, None, batch_size=cfg.batch_size)
    return train(run_config, cfg, Squares(8), Squares(4, offset=1), resume=resume)


def _signal_at_call(monkeypatch, module, name: str, at: int, sig=signal.SIGTERM) -> dict:
    """Patch ``module.name`` so that its ``at``-th call (1-based) first sends ``sig`` to this process."""
    real = getattr(module, name)
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at:
            os.kill(os.getpid(), sig)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)
    return calls


def _assert_same_tensors(a, b, where: str = "") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same_tensors(x, y, f"{where}[{i}]")
    elif torch.is_tensor(a):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


STATE_KEYS = ("epoch", "global_step", "best_loss", "model_state_dict", "optimizer_state_dict", "ema_state_dict",
              "scaler_state_dict", "discriminator_state_dict", "optimizer_g_state_dict", "optimizer_d_state_dict")


def _assert_same_run(a_dir, b_dir, kind: str = "ddpm") -> None:
    a = load_checkpoint(a_dir / LAST_CHECKPOINT, kind)
    b = load_checkpoint(b_dir / LAST_CHECKPOINT, kind)
    for key in STATE_KEYS:
        _assert_same_tensors(a.get(key), b.get(key), key)


@pytest.fixture(scope="module")
def ddpm_baseline(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("baseline")
    with one_torch_thread():
        summary = _train_ddpm(_run_config(TINY_MODEL), _cfg(tmp, "full"))
    return tmp / "full", summary


@pytest.mark.parametrize("stop_at", [2, STEPS_PER_EPOCH, STEPS_PER_EPOCH + 3])
def test_sigterm_mid_epoch_then_rerun_equals_an_uninterrupted_run(tmp_path, tiny_model_config, monkeypatch,
                                                                  ddpm_baseline, stop_at):
    full_dir, full = ddpm_baseline
    run_config, cfg = _run_config(tiny_model_config), _cfg(tmp_path, "split")
    _signal_at_call(monkeypatch, training, "train_step", stop_at)
    with stop_on_signals(), pytest.raises(Preempted, match=r"SIGTERM: stopped at epoch (\d)/2, step (\d)/4"):
        _train_ddpm(run_config, cfg)
    assert stop_requested() is None  # the handlers and the flag are gone with the block
    run_dir = tmp_path / "split"
    mid = load_checkpoint(run_dir / MID_EPOCH_CHECKPOINT)
    # Every rank finished the step the signal arrived in, and the checkpoint says where inside the epoch it is.
    assert (mid["epoch"], mid["epoch_step"]) == ((stop_at - 1) // STEPS_PER_EPOCH, (stop_at - 1) % STEPS_PER_EPOCH + 1)
    assert mid["global_step"] == stop_at and mid["world_size"] == 1
    assert not list(run_dir.glob(".*.tmp"))
    monkeypatch.undo()
    summary = _train_ddpm(run_config, cfg)
    assert summary.start_epoch == mid["epoch"]
    _assert_same_run(full_dir, run_dir)
    assert not (run_dir / MID_EPOCH_CHECKPOINT).exists()  # superseded by the finished epoch
    # The resumed epoch's loss counts the steps before the stop too.
    assert summary.epoch_losses[0] == pytest.approx(full.epoch_losses[mid["epoch"]], rel=1e-12)


def test_sigusr1_and_two_stops_in_one_epoch(tmp_path, tiny_model_config, monkeypatch, ddpm_baseline):
    full_dir, _ = ddpm_baseline
    run_config, cfg = _run_config(tiny_model_config), _cfg(tmp_path, "split")
    for at in (6, 1):  # SLURM's --signal=USR1: at step 2 of epoch 2, then again one step after resuming
        _signal_at_call(monkeypatch, training, "train_step", at, sig=signal.SIGUSR1)
        with stop_on_signals(), pytest.raises(Preempted, match="SIGUSR1"):
            _train_ddpm(run_config, cfg)
        monkeypatch.undo()
    assert load_checkpoint(tmp_path / "split" / MID_EPOCH_CHECKPOINT)["epoch_step"] == 3
    _train_ddpm(run_config, cfg)
    _assert_same_run(full_dir, tmp_path / "split")


def test_periodic_mid_epoch_checkpoints_change_nothing_and_survive_a_kill(tmp_path, tiny_model_config, monkeypatch,
                                                                          ddpm_baseline):
    full_dir, _ = ddpm_baseline
    run_config = _run_config(tiny_model_config)
    # Due after every step (no spacing by the write time): the saves themselves must not change the run.
    monkeypatch.setattr(loop, "MAX_CHECKPOINT_SHARE", float("inf"))
    every_step = _cfg(tmp_path, "every", checkpoint_every_minutes=1e-9)
    _train_ddpm(run_config, every_step)
    _assert_same_run(full_dir, tmp_path / "every")
    # A kill (here: an exception no handler sees) at step 3 of epoch 2 loses only that step.
    real = training.train_step
    calls = {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == STEPS_PER_EPOCH + 3:
            raise SystemExit("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "train_step", dying)
    cfg = _cfg(tmp_path, "killed", checkpoint_every_minutes=1e-9)
    with pytest.raises(SystemExit):
        _train_ddpm(run_config, cfg)
    monkeypatch.undo()
    mid = load_checkpoint(tmp_path / "killed" / MID_EPOCH_CHECKPOINT)
    assert (mid["epoch"], mid["epoch_step"]) == (1, 2)
    _train_ddpm(run_config, cfg)
    _assert_same_run(full_dir, tmp_path / "killed")


@pytest.mark.parametrize("share, expected", [(float("inf"), 6), (loop.MAX_CHECKPOINT_SHARE, 1)])
def test_periodic_checkpoints_are_spaced_by_their_write_time(tmp_path, tiny_model_config, monkeypatch, share,
                                                             expected):
    # A slow filesystem (0.1 s a write): with the default share (2%), mid-epoch checkpoints come at most every 5 s,
    # so in this run only the first one, however small --checkpoint_every_minutes is; without it after every step
    # but the last of each epoch.
    monkeypatch.setattr(loop, "MAX_CHECKPOINT_SHARE", share)
    real_save, mid_writes = loop.save_checkpoint, []

    def slow_save(path, payload):
        real_save(path, payload)
        time.sleep(0.1)
        if path.name == MID_EPOCH_CHECKPOINT:
            mid_writes.append(payload["epoch_step"])

    monkeypatch.setattr(loop, "save_checkpoint", slow_save)
    _train_ddpm(_run_config(tiny_model_config), _cfg(tmp_path, "run", checkpoint_every_minutes=1e-9))
    assert len(mid_writes) == expected


def test_sigterm_during_a_checkpoint_write_leaves_loadable_checkpoints(tmp_path, tiny_model_config, monkeypatch,
                                                                       ddpm_baseline):
    full_dir, _ = ddpm_baseline
    run_config, cfg = _run_config(tiny_model_config), _cfg(tmp_path, "split")
    real_save = torch.save
    calls = {"n": 0}

    def save_with_signal(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # checkpoint_last.pth of epoch 1 (after checkpoint.pth): half-way through the write
            f.write(b"partial")
            os.kill(os.getpid(), signal.SIGTERM)
            f.seek(0)
            f.truncate()
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_with_signal)
    with stop_on_signals(), pytest.raises(Preempted, match="stopped after epoch 1/2"):
        _train_ddpm(run_config, cfg)
    monkeypatch.undo()
    run_dir = tmp_path / "split"
    assert load_checkpoint(run_dir / LAST_CHECKPOINT)["epoch"] == 1  # the write completed, then the run stopped
    assert not (run_dir / MID_EPOCH_CHECKPOINT).exists() and not list(run_dir.glob(".*.tmp"))
    _train_ddpm(run_config, cfg)
    _assert_same_run(full_dir, run_dir)


def test_vqvae_sigterm_mid_epoch_then_rerun_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    # Dropout draws from the global RNG (re-seeded per step) and the discriminator has its own optimizer: both must
    # continue exactly.
    vq = dataclasses.replace(TINY_VQ_2D, dropout=0.2)
    losses = VQVAELossConfig(adversarial_weight=0.1, perceptual_weight=0.0)

    def run(name):
        cfg = _cfg(tmp_path, name, ema_decay=0.0)
        resume = find_resume_point(cfg.run_dir, None, "vqvae", batch_size=cfg.batch_size)
        return train_vqvae(vq, DataConfig(is_grayscale=True), losses, cfg, Squares(8, 16), Squares(4, 16, 1),
                           (1, 16, 16), DistContext(), resume=resume)

    run("full")
    # optimizer_step runs twice a step (generator, discriminator): the generator's of epoch 2, step 3.
    _signal_at_call(monkeypatch, vqvae_training, "optimizer_step", 2 * (STEPS_PER_EPOCH + 3) - 1)
    with stop_on_signals(), pytest.raises(Preempted, match="epoch 2/2, step 3/4"):
        run("split")
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "split" / MID_EPOCH_CHECKPOINT, "vqvae")["task_epoch_state"]["steps"] == 3
    run("split")
    _assert_same_run(tmp_path / "full", tmp_path / "split", "vqvae")
    # The epoch's loss-term means count the steps before the stop (carried in the checkpoint).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = [EventAccumulator(str(tmp_path / name / "train")).Reload().Scalars("l1_loss")[-1].value
            for name in ("full", "split")]
    assert tags[0] == pytest.approx(tags[1], rel=1e-6)


def test_a_signal_before_training_stops_without_writing(tmp_path, tiny_model_config):
    cfg = _cfg(tmp_path, "early")
    with stop_on_signals(), pytest.raises(Preempted, match="before training"):
        os.kill(os.getpid(), signal.SIGTERM)
        _train_ddpm(_run_config(tiny_model_config), cfg)
    assert not list((tmp_path / "early").glob("*.pth"))


def _checkpoint(path, epoch: int, **extra) -> None:
    save_checkpoint(path, {"epoch": epoch, "model_state_dict": {"w": torch.zeros(1)}, "config": None,
                           "train_config": {"batch_size": 2}, **extra})


def test_the_newest_checkpoint_is_resumed_and_a_mid_epoch_one_of_another_layout_is_not(tmp_path, capsys):
    _checkpoint(tmp_path / LAST_CHECKPOINT, 2)
    assert find_resume_point(tmp_path, None).path.name == LAST_CHECKPOINT
    _checkpoint(tmp_path / MID_EPOCH_CHECKPOINT, 2, epoch_step=3, world_size=1)  # inside epoch 3: newer
    point = find_resume_point(tmp_path, None, batch_size=2)
    assert point.path.name == MID_EPOCH_CHECKPOINT and point.epoch_step == 3
    # Another number of ranks or batch size would make the rest of the epoch other batches: the finished epoch.
    assert find_resume_point(tmp_path, None, batch_size=4).path.name == LAST_CHECKPOINT
    assert find_resume_point(tmp_path, None, ctx=DistContext(world_size=2)).path.name == LAST_CHECKPOINT
    assert "rest of its epoch would be other batches" in capsys.readouterr().out
    _checkpoint(tmp_path / LAST_CHECKPOINT, 3)  # stopped after writing checkpoint_last.pth, before removing it
    assert find_resume_point(tmp_path, None).path.name == LAST_CHECKPOINT


def test_preempted_is_exit_status_75_with_one_line(capsys):
    from ddpm_ood.cli.runner import run_cli

    def stage(argv):
        raise Preempted("SIGTERM: stopped at epoch 1/2, step 3/4")

    assert run_cli(stage, []) == EXIT_PREEMPTED == 75
    assert capsys.readouterr().err == "preempted: SIGTERM: stopped at epoch 1/2, step 3/4\n"


def test_loader_workers_ignore_stop_signals_and_still_end_with_their_process():
    # torchrun and SLURM signal the whole process group: a loading worker must survive SIGTERM (or training would fail
    # before it could save), and must still not keep its process from exiting (Python's exit ends daemonic children
    # with SIGTERM and waits for them; a DataLoader still referenced at exit does not stop its workers itself).
    import subprocess
    import sys

    from tiny_run import REPO_ROOT

    code = ("import os, signal, time\nfrom torch.utils.data import DataLoader\n"
            "from ddpm_ood.preemption import loader_worker_init\n"
            "loader = DataLoader(list(range(10)), batch_size=2, num_workers=1, persistent_workers=True,\n"
            "                    worker_init_fn=loader_worker_init())\n"
            "batches = iter(loader)\nnext(batches)\nworker = loader._iterator._workers[0]\n"
            "os.kill(worker.pid, signal.SIGTERM)\ntime.sleep(0.5)\n"
            "print('alive' if worker.is_alive() else 'dead', next(batches).tolist(), flush=True)\n")
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT / "src"))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "alive [2, 3]"


def test_a_stop_signal_while_loader_workers_start_ends_none_of_them():
    # torch's worker start-up installs a SIGTERM handler that ends the worker, before the worker_init_fn can ignore
    # the signal: workers are started with the stop signals held back, and drop them once they ignore them. Here the
    # whole process group gets SIGTERM while the worker is still in its (slow) init function.
    import subprocess
    import sys

    from tiny_run import REPO_ROOT

    code = ("import os, signal, time\nfrom torch.utils.data import DataLoader\n"
            "from ddpm_ood.preemption import (ignore_stop_signals, loader_worker_init, stop_on_signals,\n"
            "                                 stop_requested, stop_signals_blocked)\n"
            "def slow_init(worker_id):\n    time.sleep(1.0)\n    ignore_stop_signals(worker_id)\n"
            "loader_worker_init()\n"
            "loader = DataLoader(list(range(10)), batch_size=2, num_workers=1, worker_init_fn=slow_init)\n"
            "with stop_on_signals():\n"
            "    with stop_signals_blocked():\n        batches = iter(loader)  # the worker starts\n"
            "    os.killpg(0, signal.SIGTERM)  # the worker is still in its init function\n"
            "    print(stop_requested(), [b.tolist() for b in batches], flush=True)\n")
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT / "src"))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                          start_new_session=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "SIGTERM [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]"
