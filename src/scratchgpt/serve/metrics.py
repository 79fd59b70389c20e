"""The engine's counters in Prometheus' text format (hand-written: three kinds of metric suffice).

Every metric is safe to update from the engine's thread while the HTTP layer renders it.
"""

from __future__ import annotations

import threading
from typing import Callable

# Seconds, from a fast decode step to a long request.
TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return "{" + inner + "}"


def _number(value: float) -> str:
    return repr(float(value)) if value != int(value) else f"{int(value)}"


class Metric:
    """One named metric: a HELP line, a TYPE line and its samples."""

    kind = "untyped"

    def __init__(self, name: str, help: str):
        self.name, self.help = name, help
        self._lock = threading.Lock()

    def samples(self) -> list[tuple[str, dict[str, str], float]]:
        raise NotImplementedError

    def render(self) -> str:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]
        lines += [f"{name}{_labels(labels)} {_number(value)}" for name, labels, value in self.samples()]
        return "\n".join(lines) + "\n"


class Counter(Metric):
    """A count that only grows, optionally split by the values of one label."""

    kind = "counter"

    def __init__(self, name: str, help: str, label: str | None = None, values: tuple[str, ...] = ()):
        super().__init__(name, help)
        self.label = label
        self._values = {value: 0.0 for value in values} if label else {None: 0.0}

    def inc(self, amount: float = 1.0, value: str | None = None) -> None:
        with self._lock:
            self._values[value] = self._values.get(value, 0.0) + amount

    def samples(self):
        with self._lock:
            return [(self.name, {self.label: v} if self.label else {}, n) for v, n in self._values.items()]


class Gauge(Metric):
    """A value read when the metrics are rendered (e.g. requests running now)."""

    kind = "gauge"

    def __init__(self, name: str, help: str, read: Callable[[], float]):
        super().__init__(name, help)
        self.read = read

    def samples(self):
        return [(self.name, {}, self.read())]


class Histogram(Metric):
    """Observations counted into cumulative buckets, with their sum and count."""

    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: tuple[float, ...] = TIME_BUCKETS):
        super().__init__(name, help)
        self.buckets = buckets
        self._counts = [0] * len(buckets)
        self._sum, self._count = 0.0, 0

    def observe(self, value: float) -> None:
        with self._lock:
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    self._counts[i] += 1
            self._sum += value
            self._count += 1

    def samples(self):
        with self._lock:
            rows = [(f"{self.name}_bucket", {"le": _number(b)}, n) for b, n in zip(self.buckets, self._counts)]
            rows.append((f"{self.name}_bucket", {"le": "+Inf"}, self._count))
            rows += [(f"{self.name}_sum", {}, self._sum), (f"{self.name}_count", {}, self._count)]
            return rows


def render(metrics: list[Metric]) -> str:
    """The exposition text of `metrics`, for GET /metrics."""
    return "".join(metric.render() for metric in metrics)
