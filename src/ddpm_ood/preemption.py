"""Stopping cleanly when a cluster asks: SIGTERM (what SLURM, Kubernetes and torchrun send before they take a
node back) and SIGUSR1 (SLURM's ``--signal=USR1@<seconds>``) set a flag instead of killing the process.

The stage frames (``training.stage``, ``reconstruction.stage``) hold :func:`stop_on_signals` while they run. The
work loops look at :func:`stop_requested` at the end of every optimizer step or results batch, agree on it over all
ranks (``distributed.any_rank``: every rank stops at the same step, none waits forever in a collective), save what
they have (a mid-epoch checkpoint, the appended results rows) and raise :class:`Preempted`; ``cli/runner.py`` turns
it into one line and exit status :data:`EXIT_PREEMPTED`. Running the same command again continues from there.

A leaf module: no imports from the rest of ddpm_ood.
"""

from __future__ import annotations

import atexit
import contextlib
import signal
import threading
from collections.abc import Callable, Iterable, Iterator

# sysexits' EX_TEMPFAIL ("a temporary failure; the user is invited to retry later"), next to the EX_IOERR (74) of a
# file-system fault: the stage stopped at a signal with its work saved, and the same command continues it. Distinct
# from 143 (128 + SIGTERM), which a shell reports for a process killed by SIGTERM before it could save anything, so a
# job script can tell "stopped cleanly, requeue me" (75) from "killed" (143, 137) and from bad input (2).
EXIT_PREEMPTED = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_requested: str | None = None
_exit_hook_registered = False


class Preempted(Exception):
    """A stage stopped at a stop signal after saving its work (the message says where it is kept); the command run
    again continues from there. The CLI prints ``preempted: <message>`` and exits with :data:`EXIT_PREEMPTED`."""


def request_stop(reason: str) -> None:
    """Ask the running stage to stop at its next safe point (what the signal handler does; tests call it too)."""
    global _requested
    if _requested is None:
        _requested = reason


def stop_requested() -> str | None:
    """The name of the signal that asked to stop (``"SIGTERM"``), or None."""
    return _requested


def _on_signal(signum: int, frame) -> None:
    # Only sets a flag: no I/O here (a print re-entering a busy stdout raises), the loops report it.
    request_stop(signal.Signals(signum).name)


@contextlib.contextmanager
def stop_on_signals(signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> Iterator[None]:
    """Within the block, ``signals`` set the stop flag (cleared on entry and exit) instead of ending the process;
    the previous handlers are restored after. Outside the main thread (where Python cannot install handlers) the
    block runs with the handlers as they are."""
    global _requested
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in signals}
    _requested = None
    for sig in signals:
        signal.signal(sig, _on_signal)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        _requested = None


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: the loading workers ignore the stop signals (use :func:`loader_worker_init`,
    and start the workers within :func:`stop_signals_blocked`).

    torchrun and SLURM signal the whole process group, loading workers included; a worker killed by SIGTERM makes the
    training process fail at once, before it could save. Ignoring them, the workers keep serving batches until the
    training process has saved and shuts them down as usual (their normal exit does not need a signal; a worker whose
    parent is gone exits by itself, and SIGKILL still ends everything). A signal held back since the worker was
    started is dropped here."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


@contextlib.contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Hold the stop signals back (pending, not lost) within the block, in which a DataLoader starts its workers: a
    forked worker inherits the block until :func:`ignore_stop_signals` replaces it, so no stop signal can end a
    worker in the moments before it ignores them (torch's worker start-up installs a SIGTERM handler that ends it).
    After the block a signal that arrived in it reaches this process's handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def iterate_loader(loader: Iterable) -> Iterator:
    """The batches of ``loader``, its worker processes (if it starts them now) started within
    :func:`stop_signals_blocked`."""
    with stop_signals_blocked():
        batches = iter(loader)
    yield from batches


def loader_worker_init() -> Callable[[int], None]:
    """The ``worker_init_fn`` of a stage's DataLoaders (:func:`ignore_stop_signals`), after making sure this process
    ends loader workers still alive when it exits with SIGKILL: Python's own exit ends daemonic child processes with
    SIGTERM and then waits for them, which would wait forever for workers that ignore it (a DataLoader does not shut
    its workers down itself once the interpreter is exiting)."""
    global _exit_hook_registered
    if not _exit_hook_registered:
        atexit.register(_kill_daemonic_children)  # runs before multiprocessing's exit hook (registered earlier)
        _exit_hook_registered = True
    return ignore_stop_signals


def _kill_daemonic_children() -> None:
    import multiprocessing

    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
            child.join(timeout=10)
