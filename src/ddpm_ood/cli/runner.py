"""The error boundary of every entry script: bad input and file-system faults become one line on stderr."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

# Exit status of a file-system fault (sysexits' EX_IOERR), so scripts can tell it from bad input (2).
EXIT_IO_ERROR = 74

# The flags that set library parameters of other names (every other parameter ``name`` is set by ``--name``).
PARAMETER_FLAGS = {
    "resume_epoch": "--ddpm_checkpoint_epoch",
    "spatial_dims": "--spatial_dimension",
    "data.is_grayscale": "--is_grayscale",
    "vqvae.in_channels": "--vqvae_in_channels",
    "vqvae.out_channels": "--vqvae_out_channels",
}


def flag_message(exc: BaseException) -> str:
    """The message of ``exc`` in the command line's words: a ``ParameterError`` names library parameters, and the
    first whole-word mention of each of its ``params`` becomes the flag that sets it (``PARAMETER_FLAGS``, else
    ``--<name>``): ``"val_keep must be in (0, 1], got 2"`` -> ``"--val_keep must be in (0, 1], got 2"``. Later
    mentions (``"min_t=5 must be below max_t=3 (the window is min_t < t < max_t)"``) are left as they are."""
    text = str(exc)
    for param in getattr(exc, "params", ()):
        flag = PARAMETER_FLAGS.get(param, f"--{param}")
        text = re.sub(rf"(?<![\w.-]){re.escape(param)}(?!\w)", lambda _match, flag=flag: flag, text, count=1)
    return text


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)``; no traceback for what the user can fix:

    - a UserError (bad input) prints ``error: <message>`` and returns 2 (a ``ParameterError``'s parameters named
      as their flags: ``flag_message``);
    - an OSError (a full disk, a read-only or vanished folder, permissions, an I/O error) prints
      ``error: <file>: <cause> (<ERRNO>)`` and returns 74. Every stage writes through ``fileio``'s atomic writers, so
      the previous complete version of that file is still in place, and running the same command again resumes;
    - a stop signal (SIGTERM, SIGUSR1; ``preemption``) prints ``preempted: <where the work is kept>`` and returns 75
      (``EXIT_PREEMPTED``): the stage saved its work, and the same command continues it;
    - Ctrl-C returns 130 after the stage has saved what it can (each stage handles KeyboardInterrupt itself).
    """
    from ddpm_ood.errors import UserError
    from ddpm_ood.fileio import describe_os_error
    from ddpm_ood.preemption import EXIT_PREEMPTED, Preempted

    try:
        return main(argv)
    except UserError as exc:
        print(f"error: {flag_message(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {describe_os_error(exc)}; nothing complete was lost, fix it and run the same command again",
              file=sys.stderr)
        return EXIT_IO_ERROR
    except Preempted as exc:
        print(f"preempted: {exc}", file=sys.stderr)
        return EXIT_PREEMPTED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def exit_process(status: int) -> NoReturn:
    """End an entry script with ``status`` (what the torchrun-capable scripts do after ``run_cli``).

    Under torchrun the exit handlers run and stdout/stderr are flushed, then the process ends with ``os._exit``,
    without Python's interpreter teardown: there a gloo worker thread of torch.distributed that still releases a
    finished collective (tensors with Python references) cannot take the interpreter lock and aborts the process
    (``terminate called without an active exception``, SIGABRT), after all the work was done and saved, so that
    torchrun counted a finished run as failed (seen in about one 2-rank run in ten on a busy 2-core machine; the
    gdb backtrace: ``ProcessGroupGloo::AsyncWork::~AsyncWork`` -> ``decref_pyobject`` -> ``PyThread_exit_thread``
    during ``Py_FinalizeEx``). Elsewhere a plain ``sys.exit``."""
    from ddpm_ood.distributed import launched_by_torchrun

    if not launched_by_torchrun():
        sys.exit(status)
    import atexit

    atexit._run_exitfuncs()  # logging, multiprocessing, ddpm_ood's own exit hooks: while the interpreter is whole
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)
