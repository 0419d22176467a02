"""A guard that fails on host reads of tensors and pageable copies while a forward runs.

    with hostsync.forbid():
        model(x)          # raises HostSyncError at the first Tensor.item(), bool(t), ...

Forbidden inside: Tensor.item / tolist / numpy / cpu / __bool__ / __int__ / __float__ /
__index__, `.to()` / `.copy_()` moving data from a device to the host, and copies from
host memory that is not pinned to a device (synchronous for the host). On a CPU device
none of these actually synchronises anything, but each would on a GPU, so the graph-safety
tests run the CPU forward under this guard to prove the traced Python has none. Work
inside the ops' implementations that is allowed host work (the CPU path's op bodies;
the Triton interpreter's emulation of a launch) runs under `exempt()`.

On a GPU, `torch.cuda.set_sync_debug_mode("error")` is the authoritative check of
device syncs (benchmarks/gpu/graph_check.py uses both).
"""

from __future__ import annotations

import contextlib
import threading

import torch


class HostSyncError(RuntimeError):
    pass


_state = threading.local()
_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__")


def _active() -> bool:
    return getattr(_state, "forbid", 0) > 0 and getattr(_state, "exempt", 0) == 0


def _fail(what: str):
    raise HostSyncError(f"host sync during the forward: {what}")


def _host_target(args, kwargs) -> bool:
    dev = kwargs.get("device")
    for a in args:
        if isinstance(a, (str, torch.device)):
            dev = a
        elif isinstance(a, torch.Tensor):
            dev = a.device
    return dev is not None and torch.device(dev).type == "cpu"


def _device_target(args, kwargs) -> bool:
    dev = kwargs.get("device")
    for a in args:
        if isinstance(a, (str, torch.device)):
            dev = a
        elif isinstance(a, torch.Tensor):
            dev = a.device
    return dev is not None and torch.device(dev).type != "cpu"


@contextlib.contextmanager
def exempt():
    _state.exempt = getattr(_state, "exempt", 0) + 1
    try:
        yield
    finally:
        _state.exempt -= 1


@contextlib.contextmanager
def forbid():
    saved = {name: getattr(torch.Tensor, name) for name in _READS + ("to", "copy_")}

    def reader(name):
        orig = saved[name]

        def f(self, *a, **k):
            if _active():
                _fail(f"Tensor.{name}() on a {self.device.type} tensor {tuple(self.shape)}")
            return orig(self, *a, **k)
        return f

    def to(self, *a, **k):
        if _active():
            if self.device.type != "cpu" and _host_target(a, k):
                _fail(f"device -> host .to() of {tuple(self.shape)}")
            if self.device.type == "cpu" and not self.is_pinned() and _device_target(a, k):
                _fail(f"pageable host -> device .to() of {tuple(self.shape)}")
        return saved["to"](self, *a, **k)

    def copy_(self, src, *a, **k):
        if _active() and isinstance(src, torch.Tensor):
            if src.device.type != "cpu" and self.device.type == "cpu":
                _fail(f"device -> host copy_ of {tuple(src.shape)}")
            if src.device.type == "cpu" and self.device.type != "cpu" and not src.is_pinned():
                _fail(f"pageable host -> device copy_ of {tuple(src.shape)}")
        return saved["copy_"](self, src, *a, **k)

    _state.forbid = getattr(_state, "forbid", 0) + 1
    try:
        for name in _READS:
            setattr(torch.Tensor, name, reader(name))
        torch.Tensor.to = to
        torch.Tensor.copy_ = copy_
        yield
    finally:
        _state.forbid -= 1
        if _state.forbid == 0:
            for name, fn in saved.items():
                setattr(torch.Tensor, name, fn)
