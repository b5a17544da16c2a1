"""A step's figures, read back one step late so that the accelerator never waits for the host.

At the end of step s, its figures (the losses, the gradient norm, the expert balance and
the stop flag every rank agreed on) are copied to pinned host memory behind a CUDA event.
The host reads them only after it has queued step s + 1, so step s + 1's kernels are
already waiting when step s ends, instead of the GPU idling while the host reads the
loss, prints, checks for a stop and launches the next step's first kernels.

A step's time runs from the end of the step before to its own end, both CUDA events: the
host's work between steps counts exactly when the GPU had to wait for it. After a pause
(the start, a checkpoint, the profiled step: places where the loop reads a step at once and
then does host work that is not training) the next step's time starts at its own start.
On the CPU the figures are there as soon as the step returns and times come from the clock.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

# the values of one step, in the order they are stacked
_FIELDS = ("loss", "mtp_loss", "grad_norm", "max_expert_load_ratio", "stop")


@dataclass
class Figures:
    step: int
    loss: float  # mean LM loss over the step's tokens, all ranks
    mtp_loss: float  # the same for the MTP head (0 without MTP)
    lr: float  # the lr this step's update used
    grad_norm: float | None  # before clipping; None when clipping is off
    max_expert_load_ratio: float | None  # busiest expert / mean, worst MoE layer; None: dense
    stop: bool  # some rank was asked to stop during this step
    seconds: float  # the step's time (see the module's docstring)


class Pending:
    """A queued step whose figures are on their way to the host."""

    def __init__(self, step: int, lr: float, values: torch.Tensor, present: dict[str, bool],
                 start, end) -> None:
        self.step, self.lr, self.values, self.present = step, lr, values, present
        self.start, self.end = start, end

    def read(self) -> Figures:
        """Wait for this step (only this one) to end on the accelerator; its figures."""
        if isinstance(self.end, torch.cuda.Event):
            self.end.synchronize()
            seconds = self.start.elapsed_time(self.end) / 1000.0
        else:
            seconds = self.end - self.start
        got = dict(zip(_FIELDS, self.values.tolist(), strict=True))
        return Figures(
            step=self.step, loss=got["loss"], mtp_loss=got["mtp_loss"], lr=self.lr,
            grad_norm=got["grad_norm"] if self.present["grad_norm"] else None,
            max_expert_load_ratio=(got["max_expert_load_ratio"]
                                   if self.present["max_expert_load_ratio"] else None),
            stop=got["stop"] > 0, seconds=seconds)


class Readout:
    """``begin()`` before queuing a step, ``end(...)`` after it: a Pending to ``read()``
    once the next step is queued (or at once, followed by ``pause()``)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._last_end = None  # the end of the step before, while steps follow unpaused
        self._start = None
        self._nan = None

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def begin(self) -> None:
        self._start = self._last_end if self._last_end is not None else self._mark()

    def end(self, step: int, result, stop_flag: torch.Tensor) -> Pending:
        """``result`` is the step's StepResult (tensors on the device); ``stop_flag`` the
        one-element tensor of the stop flag, reduced over the ranks."""
        parts = {"loss": result.losses[0], "mtp_loss": result.losses[1],
                 "grad_norm": result.grad_norm, "max_expert_load_ratio": result.balance,
                 "stop": stop_flag.reshape(())}
        present = {name: value is not None for name, value in parts.items()}
        if self._nan is None:  # the stand-in for an absent figure, made once
            self._nan = torch.full((), float("nan"), device=result.losses.device)
        values = torch.stack([(parts[name] if present[name] else self._nan).float()
                              for name in _FIELDS])
        if self.cuda:
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            host.copy_(values, non_blocking=True)
            values = host
        pending = Pending(step, result.lr, values, present, self._start, self._mark())
        self._last_end = pending.end
        return pending

    def pause(self) -> None:
        """The host is about to do work that is not training: the next step's time starts
        at its own start."""
        self._last_end = None
