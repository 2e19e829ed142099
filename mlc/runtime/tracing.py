"""Per-request event tracing, exportable as Chrome trace JSON (chrome://tracing, Perfetto)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any


class Tracer:
    """Records (time, request, event, details); cheap no-op when disabled.

    Each request (and the engine itself, "engine") is one trace thread: an integer tid named
    by a "thread_name" metadata event, as the Chrome trace format expects.
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.events: list[dict[str, Any]] = []
        self._tids: dict[str, int] = {}
        self._lock = threading.Lock()
        self._t0 = time.perf_counter()

    def _now_us(self) -> float:
        return (time.perf_counter() - self._t0) * 1e6

    def _tid(self, track: str) -> int:
        """The tid of a request or "engine" (call with the lock held)."""
        tid = self._tids.get(track)
        if tid is None:
            tid = self._tids[track] = len(self._tids) + 1
            self.events.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": tid,
                                "args": {"name": track}})
        return tid

    def event(self, request_id: str, name: str, **args: Any) -> None:
        """An instant event of one request (queued, admitted, prefill_chunk, first_token...)."""
        if self.enabled:
            with self._lock:
                self.events.append({"name": name, "ph": "i", "s": "t", "ts": self._now_us(),
                                    "pid": 0, "tid": self._tid(request_id), "args": args})

    def batch(self, name: str, batch_size: int, request_ids) -> None:
        """An engine-wide event, e.g. one decode step and its batch size."""
        if self.enabled:
            with self._lock:
                self.events.append({"name": name, "ph": "C", "ts": self._now_us(), "pid": 0,
                                    "tid": self._tid("engine"),
                                    "args": {"batch_size": batch_size}})
                for rid in request_ids:
                    self.events.append({"name": "decode", "ph": "i", "s": "t",
                                        "ts": self._now_us(), "pid": 0, "tid": self._tid(rid),
                                        "args": {"batch_size": batch_size}})

    def request_events(self, request_id: str) -> list[dict[str, Any]]:
        """The events of one request ("engine": the engine-wide ones), oldest first."""
        with self._lock:
            tid = self._tids.get(request_id)
            return [e for e in self.events if e["tid"] == tid and e["ph"] != "M"]

    def to_chrome_trace(self) -> dict[str, Any]:
        with self._lock:
            return {"traceEvents": list(self.events), "displayTimeUnit": "ms"}

    def save(self, path: str | Path) -> Path:
        """Write the Chrome trace JSON."""
        path = Path(path)
        path.write_text(json.dumps(self.to_chrome_trace()))
        return path
