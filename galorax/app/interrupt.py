"""Ctrl-C on step boundaries: the first SIGINT asks the loop to stop after the current step
(with a checkpoint labelled with the steps done: the optimizer's count, plus any steps
skipped for non-finite gradients, see :func:`galorax.app.train.run_loop`); a second one
aborts at once, writing nothing more.

The tests deliver an interrupt deterministically at any point of the loop
(:data:`galorax.app.loop.POINTS`) instead of racing a timer: they pass an observer of the
points to :func:`galorax.app.train.train` (``on_point``), which sends the SIGINT.

Example:
    >>> with StopRequest() as stop:
    ...     stop.request()
    ...     stop.requested
    True
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any


class Interrupted(KeyboardInterrupt):
    """The run stopped at a step boundary after a Ctrl-C (its checkpoint written).

    Attributes:
        step: The step it stopped at.
        saved: Whether a checkpoint of ``step`` was written (False: no step had run).
    """

    def __init__(self, message: str, step: int = 0, saved: bool = False) -> None:
        super().__init__(message)
        self.step = step
        self.saved = saved


class StopRequest:
    """While entered, SIGINT sets :attr:`requested`; a second SIGINT raises
    ``KeyboardInterrupt`` (abort). Outside the main thread it installs nothing.

    Under ``jax.distributed`` each process has its own flag (a Ctrl-C may reach one
    process, or each at another time); :meth:`agree` turns them into one decision at a
    step boundary, so every process stops after the same step and saves the same
    checkpoint instead of waiting in a collective for a peer that stopped.

    Attributes:
        requested: Whether a stop was asked for (in this process).
        agreed: Whether the processes agreed to stop (:meth:`agree`).
    """

    def __init__(self, message: str = "stopping after this step (Ctrl-C again to abort)") -> None:
        self.requested = False
        self.agreed = False
        self.message = message
        self._previous: Any = None
        self._installed = False

    def request(self) -> None:
        """What the first Ctrl-C does; the second raises ``KeyboardInterrupt``."""
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\ninterrupt: {self.message}", file=sys.stderr, flush=True)

    def agree(self, any_process: Callable[[bool], bool] = bool) -> bool:
        """Whether to stop now, the same answer on every process: a stop requested in
        any of them (``any_process``, an all-reduce such as
        :func:`galorax.app.distributed.any_process`; the default: this process alone).
        Once agreed it stays so, without another collective. Call it at the same points
        on every process (the loop: before each step).

        Example:
            >>> stop = StopRequest()
            >>> stop.agree(), stop.agree(lambda mine: True)  # a peer was interrupted
            (False, True)
            >>> stop.requested  # not here: this process's first Ctrl-C would not abort
            False
        """
        if not self.agreed and any_process(self.requested):
            self.agreed = True
        return self.agreed

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.request()

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False
