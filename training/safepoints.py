"""Where a run may stop or checkpoint: SIGTERM (preemption) and SIGINT (Ctrl-C) only raise a flag; the run acts on
it at the next safe point (the end of a training batch, of an epoch or of a phase), after writing a checkpoint
there, so that ``--resume`` continues with the numbers of an uninterrupted run. The same safe points take the
checkpoints by wall time (``checkpoint_minutes``). Under torchrun every rank decides together (the flags are
all-reduced), so all stop or checkpoint at the same batch.
"""
from __future__ import annotations

import signal
import threading
import time
from typing import Union

__all__ = ["SafePoints", "Interrupted", "EXIT_CODES"]

#: Exit code of a run stopped by a signal (the shell's 128 + signal number).
EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}


class Interrupted(RuntimeError):
    """The run stopped at a safe point after writing its checkpoint (``exit_code`` for the process)."""

    def __init__(self, message: str, exit_code: int = 75):
        super().__init__(message)
        self.exit_code = exit_code


class SafePoints:
    """Stop and checkpoint decisions of one run.

    Args:
        runtime: the run's runtime (under torchrun the decisions are all-reduced).
        minutes: a checkpoint is due this long after the previous one (0: never by time).
        log: ``log(text)`` for the one line a signal prints.
    """

    def __init__(self, runtime, *, minutes: float, log=print):
        self.runtime = runtime
        self.seconds = 60.0 * float(minutes)
        self.log = log
        self.signal: Union[int, None] = None
        self.last_checkpoint = time.monotonic()
        self._previous: dict = {}

    # ---------------------------------------------------------------- signals
    def install(self) -> None:
        """Handle SIGTERM and SIGINT (in the main thread; elsewhere signals keep their handlers)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for number in EXIT_CODES:
            self._previous[number] = signal.signal(number, self._on_signal)

    def restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def _on_signal(self, number, frame) -> None:
        if self.signal is not None:  # a second signal: stop now, without a checkpoint
            self.restore()
            raise KeyboardInterrupt
        self.signal = number
        self.log(f"{signal.Signals(number).name}: stopping at the next safe point (end of a batch) after a "
                 "checkpoint; send it again to stop at once")

    # ---------------------------------------------------------------- decisions
    def decide(self) -> tuple[bool, bool]:
        """(stop, checkpoint due), the same on every rank."""
        stop = self.signal is not None
        due = self.seconds > 0 and time.monotonic() - self.last_checkpoint >= self.seconds
        if self.runtime.distributed:
            import torch
            import torch.distributed as dist

            flags = torch.tensor([float(stop), float(due)], device=self.runtime.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            stop, due = bool(flags[0]), bool(flags[1])
        return stop, due

    def checkpointed(self) -> None:
        self.last_checkpoint = time.monotonic()

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signal, 130)
