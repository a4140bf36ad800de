"""The error boundary of every entry script: bad input and file-system faults become one line on stderr."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ddpm_ood.distributed import DistContext
    from ddpm_ood.training.loop import TrainConfig

# Exit status of a file-system fault (sysexits' EX_IOERR), so scripts can tell it from bad input (2).
EXIT_IO_ERROR = 74


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)``; no traceback for what the user can fix:

    - a UserError (bad input) prints ``error: <message>`` and returns 2;
    - an OSError (a full disk, a read-only or vanished folder, permissions, an I/O error) prints
      ``error: <file>: <cause> (<ERRNO>)`` and returns 74. Every stage writes through ``io``'s atomic writers, so
      the previous complete version of that file is still in place, and running the same command again resumes;
    - Ctrl-C returns 130 after the stage has saved what it can (each stage handles KeyboardInterrupt itself).
    """
    from ddpm_ood.errors import UserError
    from ddpm_ood.io import describe_os_error

    try:
        return main(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {describe_os_error(exc)}; nothing complete was lost, fix it and run the same command again",
              file=sys.stderr)
        return EXIT_IO_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def run_training_stage(cfg: TrainConfig, *, device: str, precision: str | None, amp: bool, lock_name: str,
                       body: Callable[[TrainConfig, DistContext], int]) -> int:
    """The frame of a training script: start DDP when launched by torchrun, resolve the precision for the device,
    check the run folder and say the device (main rank), hold the run lock, then ``body(cfg, ctx)`` with ``cfg``'s
    precision resolved; the process group is always torn down."""
    import dataclasses
    from pathlib import Path

    from ddpm_ood.devices import describe_device, resolve_precision
    from ddpm_ood.distributed import cleanup_distributed, init_distributed
    from ddpm_ood.io import check_output_dir, run_lock

    run_dir = Path(cfg.run_dir)
    ctx = init_distributed(device)
    try:
        cfg = dataclasses.replace(cfg, precision=resolve_precision(ctx.device, precision=precision, amp=amp))
        if ctx.is_main:
            check_output_dir(run_dir, "--output_dir/--model_name")
            print(f"device: {describe_device(ctx.device)}; precision: {cfg.precision}")
        with run_lock(run_dir, lock_name, enabled=ctx.is_main):
            return body(cfg, ctx)
    finally:
        cleanup_distributed()
