"""Fault injection for the fault tests, behind one object the trainer calls once per step.

``trainer.fault`` (validated in ``config.py``) is one of

    nan_loss@STEP          step STEP's loss becomes NaN on every rank (the step is skipped)
    sigkill_in_save@STEP   kill -9 right after the checkpoint of step STEP started writing
    raise@STEP:RANK        RANK raises at the start of step STEP (torchrun's summary names it)
    hang@STEP:RANK         RANK sleeps at the start of step STEP (peers time out in a collective)

    python -m emu3_train.train experiment=demo trainer.fault=nan_loss@3
"""

from __future__ import annotations

import os
import re
import signal
import time
from dataclasses import dataclass

FAULT_PATTERN = r"(nan_loss|sigkill_in_save)@\d+|(raise|hang)@\d+:\d+"


@dataclass(frozen=True)
class FaultHook:
    """The configured fault (``kind`` at ``step``, on ``rank`` or every rank), or none."""

    kind: str | None = None
    step: int = 0
    rank: int | None = None
    my_rank: int = 0

    @classmethod
    def from_spec(cls, spec: str | None, my_rank: int) -> FaultHook:
        if not spec:
            return cls(my_rank=my_rank)
        m = re.fullmatch(r"(\w+)@(\d+)(?::(\d+))?", spec)
        if m is None or not re.fullmatch(FAULT_PATTERN, spec):
            raise ValueError(f"trainer.fault={spec!r}: expected nan_loss@STEP, sigkill_in_save@STEP, "
                             f"raise@STEP:RANK or hang@STEP:RANK")
        return cls(m.group(1), int(m.group(2)), None if m.group(3) is None else int(m.group(3)), my_rank)

    def _here(self, kind: str, step: int) -> bool:
        return self.kind == kind and self.step == step and self.rank in (None, self.my_rank)

    def at_step(self, step: int) -> bool:
        """Called at the start of optimizer step ``step`` (1-based): raises or hangs where told to;
        returns whether this step's loss is to be poisoned with NaN."""
        if self._here("raise", step):
            raise RuntimeError(f"injected fault on rank {self.my_rank} at step {step}")
        if self._here("hang", step):
            time.sleep(10**6)  # peers must time out in their next collective
        return self._here("nan_loss", step)

    def after_save_launch(self, step: int) -> None:
        """Called once the checkpoint of ``step`` started writing in the background."""
        if self._here("sigkill_in_save", step):
            os.kill(os.getpid(), signal.SIGKILL)
