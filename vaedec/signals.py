"""A graceful stop on the signals a cluster sends before it kills a job: SIGTERM (SLURM preemption or
`scancel`, Kubernetes eviction, spot-instance reclaim, torchrun forwarding its own SIGTERM) and SIGUSR1
(SLURM's `--signal=USR1@120`). `train` finishes the step it is in, writes a checkpoint and exits with 128 +
the signal's number; rerunning the same command resumes there. A SIGKILL cannot be caught: the newest
checkpoint is what survives it."""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType

import torch
from accelerate import Accelerator

log = logging.getLogger("vaedec")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """While entered, SIGTERM and SIGUSR1 only set `signum` (their default action would kill the process
    mid-step); the training loop asks `agreed` after every step."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:  # noqa: PYI034 - final class
        # signal.signal works in the main thread only
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self.signum:
            log.warning(
                "%s received: finishing this step, then a checkpoint and exit", signal.Signals(signum).name
            )
        self.signum = signum

    def agreed(self, accelerator: Accelerator) -> int:
        """The signal any process received (0 = none), the same on every process, so that all stop at one step
        and write the checkpoint together; one all-reduce of a scalar per step when there are several."""
        if accelerator.num_processes == 1:
            return self.signum
        flag = torch.tensor([float(self.signum)], device=accelerator.device)
        return int(accelerator.gather(flag).max().item())


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: the worker ignores SIGTERM and SIGUSR1 from anyone but its parent.

    A scheduler signals every process of the job, and torch's own worker handler exits on a SIGTERM, which
    fails the main process before its checkpoint. The parent's SIGTERM (DataLoader's last-resort terminate,
    multiprocessing's exit) must still end the worker, or the parent waits for it for ever; only the sender's
    pid tells them apart, and Python shows it only to sigwaitinfo. So the signals are blocked and one thread
    takes them. (Processes the worker starts, pipe: commands, inherit the block and finish their read.)"""
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)

    def take() -> None:
        while True:
            info = signal.sigwaitinfo(STOP_SIGNALS)
            if info.si_signo == signal.SIGTERM and info.si_pid == parent:
                os._exit(0)  # what torch's handler does for its parent's SIGTERM

    threading.Thread(target=take, name="vaedec-stop-signals", daemon=True).start()
