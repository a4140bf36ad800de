"""Elastic restarts under torchrun, tried N times: two gloo workers (CPU) train the tiny DDPM under
``torchrun --nnodes=1 --nproc_per_node=2 --max_restarts=3 --rdzv_backend=c10d``; once the first epoch is finished
(``checkpoint_last.pth`` holds it), one worker, picked at random, is SIGKILLed a random 0-2 s later. torchrun then
restarts the worker group, which resumes by itself from the newest checkpoint (``checkpoint_mid_epoch.pth``, written
every ``--checkpoint_every_minutes``, or ``checkpoint_last.pth``). A try succeeds when torchrun exits with 0 and the
final weights (model, Adam, EMA) are bit-identical to those of an uninterrupted 2-worker run.

``--kill_when=mid_epoch`` kills instead right after the first ``checkpoint_mid_epoch.pth`` appears,
so that the restarted group resumes inside an epoch.

Prints one line per try (``try 3: ok, 41.2 s, restarts 1, resumed from checkpoint_mid_epoch.pth``) and at the end
``successes: S/N``; the torchrun logs stay in ``--workdir`` (a temporary folder unless given).

Usage (repository root, venv active)::

    python benchmarks/elastic_restarts.py --tries=10     # about 25 s a try on 2 CPU cores
    python benchmarks/elastic_restarts.py --tries=10 --kill_when=mid_epoch
    python benchmarks/elastic_restarts.py --tries=1 --workdir=/tmp/elastic

The helpers (toy data, the torchrun command lines, launching and killing workers) are shared with tests/test_cluster.py.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from ddpm_ood.checkpoint import LAST_CHECKPOINT, MID_EPOCH_CHECKPOINT  # noqa: E402

# What a try compares: every tensor that decides how training continues.
COMPARED = ("model_state_dict", "optimizer_state_dict", "ema_state_dict")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_toy_data(folder: Path, n_train: int = 128, n_val: int = 4) -> tuple[str, str]:
    """8x8 uint8 .npy bars and the two split CSVs; returns (train csv, val csv)."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n_train + n_val):
        a = np.zeros((8, 8), np.uint8)
        a[2:6, i % 4:i % 4 + 4] = 255 - i % 7
        np.save(folder / "img" / f"{i}.npy", a)
        paths.append(str(folder / "img" / f"{i}.npy"))
    (folder / "train.csv").write_text("path\n" + "\n".join(paths[:n_train]) + "\n")
    (folder / "val.csv").write_text("path\n" + "\n".join(paths[n_train:]) + "\n")
    return str(folder / "train.csv"), str(folder / "val.csv")


def train_args(output_dir: str | Path, name: str, train: str, val: str, *, n_epochs: int = 3,
               extra: tuple[str, ...] = ()) -> list[str]:
    """train_ddpm.py flags of the toy runs: the tiny UNet, batch 2, validation every epoch, no sample grid."""
    return [f"--output_dir={output_dir}", f"--model_name={name}", f"--training_ids={train}",
            f"--validation_ids={val}", "--model_type=tiny", "--is_grayscale=1", "--batch_size=2",
            f"--n_epochs={n_epochs}", "--eval_freq=1", "--num_workers=0", "--sample_steps=0", "--device=cpu",
            "--dist_timeout=60", "--checkpoint_every_minutes=0", *extra]


def torchrun(args: list[str], *, port: int, nproc: int = 2, nnodes: int = 1, max_restarts: int = 0,
             rdzv_id: str = "ddpm-ood", script: str = "train_ddpm.py") -> list[str]:
    """A torchrun command line with the c10d rendezvous on 127.0.0.1:``port``."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc_per_node={nproc}",
            f"--max_restarts={max_restarts}", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
            f"--rdzv_id={rdzv_id}", "--monitor_interval=0.5", str(REPO / script), *args]


def worker_env() -> dict[str, str]:
    """This environment less any torchrun variables, one intra-op thread per worker (2 workers share 2 cores)."""
    # PYTHONFAULTHANDLER: a worker that aborts (SIGABRT, SIGSEGV) prints where it was.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONFAULTHANDLER="1")
    for var in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE",
                "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_USE_AGENT_STORE"):
        env.pop(var, None)
    return env


def launch(cmd: list[str], log: Path, cwd: Path | None = None) -> subprocess.Popen:
    """Start ``cmd`` in its own session (so a test can signal its process group), stdout+stderr to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=cwd or REPO, env=worker_env(), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)


def children(pid: int) -> list[int]:
    """The direct child processes of ``pid`` (torchrun's workers)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return sorted(set(found))


def completed_epochs(run_dir: Path) -> int:
    """Epochs ``checkpoint_last.pth`` holds (-1 without one)."""
    try:
        return int(torch.load(run_dir / LAST_CHECKPOINT, map_location="cpu", weights_only=True, mmap=True)["epoch"])
    except (OSError, RuntimeError, KeyError, EOFError):
        return -1


def final_state(run_dir: Path) -> dict:
    ckpt = torch.load(run_dir / LAST_CHECKPOINT, map_location="cpu", weights_only=True)
    return {key: ckpt[key] for key in (*COMPARED, "epoch", "global_step")}


def same_state(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b, strict=True))
    if torch.is_tensor(a):
        return torch.is_tensor(b) and torch.equal(a, b)
    return a == b


def wait(proc: subprocess.Popen, timeout_s: float) -> int | None:
    """The exit status, or None after killing the whole process group at the timeout."""
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return None


def uninterrupted(workdir: Path, train: str, val: str, timeout_s: float = 600) -> dict:
    """The final state of an uninterrupted 2-worker run (the reference of every try)."""
    out = workdir / "uninterrupted"
    proc = launch(torchrun(train_args(out, "run", train, val), port=free_port()), workdir / "uninterrupted.log")
    rc = wait(proc, timeout_s)
    if rc != 0:
        raise RuntimeError(f"the uninterrupted run failed (exit {rc}); see {workdir / 'uninterrupted.log'}")
    return final_state(out / "run")


def one_try(workdir: Path, train: str, val: str, reference: dict, *, seed: int, timeout_s: float = 600,
            checkpoint_minutes: float = 0.02, kill_when: str = "epoch") -> dict:
    """Train under torchrun --max_restarts=3, SIGKILL a random worker 0-2 s after the first epoch (``kill_when``
    "epoch") or right after the first mid-epoch checkpoint ("mid_epoch"); the outcome."""
    rng = random.Random(seed)
    out = workdir / "out"
    log = workdir / "torchrun.log"
    started = time.monotonic()
    cmd = torchrun(train_args(out, "run", train, val, extra=(f"--checkpoint_every_minutes={checkpoint_minutes}",)),
                   port=free_port(), max_restarts=3, rdzv_id=f"try{seed}")
    proc = launch(cmd, log)
    killed = None
    while proc.poll() is None and time.monotonic() - started < timeout_s:
        if kill_when == "mid_epoch" and (out / "run" / MID_EPOCH_CHECKPOINT).is_file() or (
                kill_when == "epoch" and completed_epochs(out / "run") >= 1):
            time.sleep(rng.uniform(0.0, 2.0) if kill_when == "epoch" else 0.0)
            workers = children(proc.pid)
            if workers:
                killed = rng.choice(workers)
                os.kill(killed, signal.SIGKILL)
            break
        time.sleep(0.05)
    rc = wait(proc, max(timeout_s - (time.monotonic() - started), 1))
    text = log.read_text(errors="replace")
    resumed = re.findall(r"resuming from \S*/(checkpoint\w*\.pth)", text)
    result = {"rc": rc, "killed": killed, "seconds": time.monotonic() - started,
              "restarts": len(set(re.findall(r"torchrun restart (\d+)", text))), "resumed_from": resumed}
    if rc != 0:
        result["ok"], result["why"] = False, "timed out" if rc is None else f"torchrun exit {rc}"
    elif killed is None:
        result["ok"], result["why"] = False, "finished before a worker could be killed"
    elif not same_state(final_state(out / "run"), reference):
        result["ok"], result["why"] = False, "final weights differ from the uninterrupted run"
    else:
        result["ok"], result["why"] = True, ""
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tries", type=int, default=10)
    p.add_argument("--workdir", type=str, default=None, help="keep data, runs and logs here (default: a temp dir)")
    p.add_argument("--timeout", type=float, default=600, help="seconds a try may take (default 600)")
    p.add_argument("--kill_when", choices=("epoch", "mid_epoch"), default="epoch",
                   help="kill 0-2 s after the first epoch (default) or right after the first mid-epoch checkpoint")
    args = p.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="elastic-restarts-"))
    workdir.mkdir(parents=True, exist_ok=True)
    train, val = write_toy_data(workdir / "data")
    print(f"torch {torch.__version__}, cpu {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores; "
          f"logs in {workdir}", flush=True)
    reference = uninterrupted(workdir, train, val, args.timeout)
    successes = 0
    for i in range(1, args.tries + 1):
        folder = workdir / f"try{i}"
        r = one_try(folder, train, val, reference, seed=i, timeout_s=args.timeout, kill_when=args.kill_when)
        successes += r["ok"]
        resumed = ", ".join(r["resumed_from"]) or "-"
        print(f"try {i}: {'ok' if r['ok'] else 'FAILED (' + r['why'] + ')'}, {r['seconds']:.1f} s, "
              f"restarts {r['restarts']}, resumed from {resumed}", flush=True)
    print(f"successes: {successes}/{args.tries}")
    return 0 if successes == args.tries else 1


if __name__ == "__main__":
    sys.exit(main())
