"""CUDA streams and events for the connector's copies, and the same calls as plain no-ops on the CPU, so one
code path runs on both (the CPU tests cover its logic; on a GPU the copies overlap the forward pass).

Rules on CUDA: loads run on `load`, saves on `save`; the forward stream never waits on the host, only on
events (`wait`); a thread other than the forward thread may wait on the host (`synchronize`) before it
releases memory a pending copy still reads.
"""

from contextlib import nullcontext

import torch


class Streams:
    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self.load = torch.cuda.Stream(device) if self.cuda else None
        self.save = torch.cuda.Stream(device) if self.cuda else None

    def on(self, stream):
        """Make `stream` current (a `with` block); nothing on the CPU."""
        return torch.cuda.stream(stream) if self.cuda else nullcontext()

    def record(self, stream=None):
        """An event marking everything enqueued so far on `stream` (default: the current one); None on CPU."""
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record(stream if stream is not None else torch.cuda.current_stream())
        return event

    def wait(self, event, stream=None) -> None:
        """`stream` (default: the current one) runs nothing enqueued after this call before `event` fired."""
        if event is not None:
            (stream if stream is not None else torch.cuda.current_stream()).wait_event(event)

    @staticmethod
    def synchronize(event) -> None:
        """The host waits for `event` (never call it on the forward thread)."""
        if event is not None:
            event.synchronize()
