"""Runs on several processes (`accelerate launch`, `torchrun`): where each process works, one decision made by the
main process for all, and a clean stop when the launcher ends the run.

Rank bookkeeping is accelerate's (`PartialState`); this module only adds what sdrpn's long jobs need on top."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, parse_flag_from_env

from sdrpn.errors import SdrpnError

T = TypeVar("T")


def run_state() -> PartialState:
    """accelerate's view of this run. Without a GPU, the processes that `torchrun` or `accelerate launch` started
    meet over gloo on the CPU (asked plainly, accelerate would take each of them for a run of its own)."""
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.accelerator.is_available())


def process_device(requested: str | None) -> str | None:
    """The device this process loads the model on. One process: what was asked (None: where it loads). Several:
    the launcher's choice for this process (its own GPU, or the CPU); `--device` may only name that device type."""
    state = run_state()
    if state.num_processes == 1:
        return requested
    if requested is not None and torch.device(requested).type != state.device.type:
        raise SdrpnError(
            f"--device {requested}: the launcher placed this run's processes on {state.device.type}; "
            "leave --device out in a multi-process run"
        )
    return str(state.device)


def decided_by_main(decide: Callable[[], T]) -> T:
    """Run `decide` on the main process only and hand its result to every process; a `SdrpnError` it raises is
    raised on every process, so no process waits for a main process that gave up."""
    state = run_state()
    if state.num_processes == 1:
        return decide()
    outcome: list = [None, None]
    if state.is_main_process:
        try:
            outcome[0] = decide()
        except SdrpnError as error:
            outcome[1] = str(error)
    broadcast_object_list(outcome, from_process=0)
    if outcome[1] is not None:
        raise SdrpnError(outcome[1])
    return outcome[0]


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """When one process of a run dies, the launcher stops the others with SIGTERM. Inside this block SIGTERM
    raises KeyboardInterrupt instead of ending the process at once, so finished work is saved on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
