"""Cluster behaviour end to end, in subprocesses (all slow): a real SIGTERM to a training process group (DataLoader
workers included), a 2-rank torchrun run stopped by SIGTERM then resumed, a worker SIGKILLed under
``torchrun --max_restarts=3`` (one try of benchmarks/elastic_restarts.py, which runs ten), two launchers
(``--nnodes=2 --nproc_per_node=1``, c10d) against one with ``--nproc_per_node=2``, and ranks that see different
output folders. Each run ends compared bit for bit with an uninterrupted one.

The torchrun helpers (toy data, command lines, launching, killing) are benchmarks/elastic_restarts.py's.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from tiny_run import REPO_ROOT, benchmark_module, one_torch_thread

from ddpm_ood.checkpoint import MID_EPOCH_CHECKPOINT, load_checkpoint
from ddpm_ood.cli.train_ddpm import main as train_main
from ddpm_ood.preemption import EXIT_PREEMPTED

pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def el():
    with benchmark_module("elastic_restarts.py", "elastic_restarts") as module:
        yield module


@pytest.fixture(scope="module")
def toy(el, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cluster")
    train, val = el.write_toy_data(folder / "data", n_train=64)
    return folder, train, val


@pytest.fixture(scope="module")
def two_rank_reference(el, toy):
    """The final state of an uninterrupted 2-rank torchrun run (3 epochs of 16 steps a rank)."""
    folder, train, val = toy
    return el.uninterrupted(folder / "reference", train, val)


def _wait_for(log: Path, text: str, proc, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        if log.is_file() and text in log.read_text(errors="replace"):
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} never appeared in {log} (exit {proc.poll()}):\n{log.read_text()[-3000:]}")


def test_sigterm_to_the_process_group_saves_exits_75_and_the_rerun_equals_an_uninterrupted_run(el, toy, tmp_path):
    _, train, val = toy
    flags = el.train_args(tmp_path / "out", "run", train, val, n_epochs=2, extra=("--num_workers=1",))
    with one_torch_thread():
        assert train_main(el.train_args(tmp_path / "ref", "run", train, val, n_epochs=2,
                                        extra=("--num_workers=1",))) == 0
    log = tmp_path / "stopped.log"
    proc = el.launch([sys.executable, str(REPO_ROOT / "train_ddpm.py"), *flags], log)
    _wait_for(log, "epoch 1/2", proc)
    # As torchrun and SLURM do: the whole process group, so the DataLoader worker gets it too (and ignores it).
    os.killpg(proc.pid, signal.SIGTERM)
    assert el.wait(proc, 240) == EXIT_PREEMPTED, log.read_text()[-3000:]
    text = log.read_text()
    assert "preempted: SIGTERM: stopped at epoch 1/2" in text and "Traceback" not in text
    mid = load_checkpoint(tmp_path / "out" / "run" / MID_EPOCH_CHECKPOINT)
    assert mid["epoch"] == 0 and 0 < mid["epoch_step"] < 32
    with one_torch_thread():
        assert train_main(flags) == 0
    assert el.same_state(el.final_state(tmp_path / "out" / "run"), el.final_state(tmp_path / "ref" / "run"))


def test_two_ranks_stopped_by_sigterm_to_torchrun_resume_to_the_uninterrupted_weights(el, toy, two_rank_reference,
                                                                                        tmp_path):
    _, train, val = toy
    flags = el.train_args(tmp_path / "out", "run", train, val)
    log = tmp_path / "stopped.log"
    proc = el.launch(el.torchrun(flags, port=el.free_port()), log)
    _wait_for(log, "epoch 2/3", proc)
    os.kill(proc.pid, signal.SIGTERM)  # torchrun forwards it to each worker's process group
    assert el.wait(proc, 240) not in (0, None)
    text = log.read_text()
    assert text.count("preempted: SIGTERM: stopped at epoch 2/3") == 2, text[-3000:]  # both ranks, same step
    mid = load_checkpoint(tmp_path / "out" / "run" / MID_EPOCH_CHECKPOINT)
    assert mid["world_size"] == 2 and mid["epoch"] == 1
    rerun = tmp_path / "rerun.log"
    assert el.wait(el.launch(el.torchrun(flags, port=el.free_port()), rerun), 240) == 0, rerun.read_text()[-3000:]
    assert "checkpoint_mid_epoch.pth: 1 epoch(s) and" in rerun.read_text()
    assert el.same_state(el.final_state(tmp_path / "out" / "run"), two_rank_reference)


def test_a_sigkilled_worker_under_max_restarts_finishes_with_the_uninterrupted_weights(el, toy, two_rank_reference,
                                                                                       tmp_path):
    _, train, val = toy
    result = el.one_try(tmp_path, train, val, two_rank_reference, seed=1, timeout_s=400)
    assert result["ok"], (result, (tmp_path / "torchrun.log").read_text()[-4000:])
    assert result["restarts"] == 1 and result["resumed_from"]


def test_two_launchers_of_one_rank_equal_one_launcher_of_two(el, toy, two_rank_reference, tmp_path):
    _, train, val = toy
    port = el.free_port()
    flags = el.train_args(tmp_path / "out", "run", train, val)
    procs = [el.launch(el.torchrun(flags, port=port, nnodes=2, nproc=1, rdzv_id="nodes"), tmp_path / f"node{i}.log")
             for i in range(2)]
    for i, proc in enumerate(procs):
        assert el.wait(proc, 400) == 0, (tmp_path / f"node{i}.log").read_text()[-3000:]
    assert el.same_state(el.final_state(tmp_path / "out" / "run"), two_rank_reference)


def test_ranks_that_see_different_output_folders_are_refused(el, toy, tmp_path):
    _, train, val = toy
    port = el.free_port()
    procs = []
    for i in range(2):  # a relative --output_dir from two working directories: two "nodes" without a shared disk
        cwd = tmp_path / f"node{i}"
        cwd.mkdir()
        cmd = el.torchrun(el.train_args("out", "run", train, val), port=port, nnodes=2, nproc=1, rdzv_id="apart")
        procs.append(el.launch(cmd, tmp_path / f"node{i}.log", cwd=cwd))
    for proc in procs:
        assert el.wait(proc, 300) not in (0, None)
    text = "".join((tmp_path / f"node{i}.log").read_text() for i in range(2))
    assert "error: --output_dir/--model_name: ranks see different folders" in text
    assert "rank(s) 1 (host" in text and "must be on a filesystem every node mounts" in text
    assert not list(tmp_path.glob("node*/out/run/*.pth"))  # refused before any training


def test_reconstruction_with_a_sigkilled_worker_restarts_to_the_rows_of_one_process(el, toy_run, tmp_path):
    # torchrun --max_restarts=1: a worker killed once the validation rows have started to land; the restarted group
    # computes only the images not in the partial file, and the files equal a 1-process run's, no duplicate row.
    from ddpm_ood.cli.reconstruct import main as reconstruct_main


    many = tmp_path / "many"
    val = tmp_path / "Many_val.csv"
    from tiny_run import write_npy_images

    from ddpm_ood.data.splits import write_split_csv

    write_split_csv(val, write_npy_images(many, "Many", 40, 7))
    args = ["--model_name=toy", f"--validation_ids={val}", "--run_in=0", "--run_out=0", "--is_grayscale=1",
            "--num_inference_steps=10", "--inference_skip_factor=4", "--num_workers=0", "--batch_size=2",
            "--device=cpu", "--scores=reconstruction,eps_norm", "--score_levels=2"]
    single, sharded = tmp_path / "one", tmp_path / "two"
    toy_run.copy_to(single)
    toy_run.copy_to(sharded)
    with one_torch_thread():
        assert reconstruct_main([f"--output_dir={single}", *args]) == 0
    partial = sharded / "toy" / "ood" / "results_val.csv.partial"
    proc = el.launch(el.torchrun([f"--output_dir={sharded}", *args], port=el.free_port(), max_restarts=1,
                                 rdzv_id="recon", script="reconstruct.py"), tmp_path / "torchrun.log")
    killed = None
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if partial.is_file() and len(partial.read_text().splitlines()) > 1 + 2 * 3:  # two batches of rows landed
            workers = el.children(proc.pid)
            if workers:
                killed = workers[-1]
                os.kill(killed, signal.SIGKILL)
            break
        time.sleep(0.02)
    assert el.wait(proc, 400) == 0, (tmp_path / "torchrun.log").read_text()[-4000:]
    assert killed is not None, "the run finished before a worker could be killed"
    for rel in ("results_val.csv", "eps_norm/features_val.csv"):
        one = pd.read_csv(single / "toy" / "ood" / rel)
        two = pd.read_csv(sharded / "toy" / "ood" / rel)
        assert list(two["filename"]) == list(one["filename"])  # every image (and t) once, in the set's order
        np.testing.assert_allclose(two.select_dtypes("number").to_numpy(), one.select_dtypes("number").to_numpy(),
                                   rtol=1e-4, atol=1e-6)
