"""google.protobuf.Duration <-> seconds, the one conversion every part of the gateway uses."""

from __future__ import annotations

from google.protobuf import duration_pb2


def seconds(duration: duration_pb2.Duration, default: float = 0.0) -> float:
    """A Duration in seconds; `default` (when given) for an unset or non-positive one."""
    value = duration.seconds + duration.nanos / 1e9
    return value if value > 0 or default == 0.0 else default


def duration(value: float) -> duration_pb2.Duration:
    """Seconds as a Duration, to the nanosecond."""
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(value * 1e9))
    return d
