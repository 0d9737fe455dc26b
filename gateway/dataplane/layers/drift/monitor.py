"""Drift of inputs and predictions, per route (RoutePolicy.drift).

For a sample of calls (sample_ratio), the values of selected features are kept: input tensor
columns, output tensors, and for a class-score output its argmax class and maximum. Each
(model, variant) keeps its last `window` values per feature; each model has one reference per
feature: the values of its first `reference_size` sampled calls after the gateway starts or the
policy changes, or a file `tensorgate drift baseline` wrote. At scrape time each window is
compared with the reference: the population stability index (PSI, over the reference's
quantile bins) and the two-sample Kolmogorov-Smirnov statistic, exported as
tensorgate_drift_psi / tensorgate_drift_ks{model, variant, feature}. A canary or a shadow
variant that predicts differently from the traffic the reference came from shows up on the
prediction features; a shift in what callers send shows up on the input features of every
variant.

Cost: the hot path draws one random number per call; a sampled call's features are read after
its answer went out (call_soon), and statistics are computed only when Prometheus scrapes.
Memory: at most MAX_FEATURES features per route and `window` values per feature and variant.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from prometheus_client.core import GaugeMetricFamily
from tritonclient.grpc import service_pb2 as oip

from adapters.codecs.oip import input_array, output_array
from tensorgate.config.v1 import config_pb2

log = logging.getLogger(__name__)

MAX_FEATURES = 32
MAX_WINDOW = 100_000
DEFAULT_SAMPLE = 0.1
DEFAULT_WINDOW = 1000
DEFAULT_REFERENCE = 1000
DEFAULT_BINS = 10
_EPSILON = 1e-4  # PSI of an empty bin: a floor instead of log(0)
_NUMERIC = frozenset(
    ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
     "FP16", "BF16", "FP32", "FP64")
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Feature:
    name: str  # as exported: "input:INPUT0[0]", "output:OUTPUT0", "prediction:argmax", ...
    kind: str  # input | output | argmax | max
    tensor: str
    column: int = 0


def features(policy: config_pb2.DriftPolicy) -> tuple[Feature, ...]:
    out: list[Feature] = []
    for watched in policy.inputs:
        for column in list(watched.columns) or [0]:
            out.append(
                Feature(f"input:{watched.tensor}[{column}]", "input", watched.tensor, column)
            )
    for name in policy.outputs:
        out.append(Feature(f"output:{name}", "output", name))
    if policy.prediction_output:
        out.append(Feature("prediction:argmax", "argmax", policy.prediction_output))
        out.append(Feature("prediction:max_probability", "max", policy.prediction_output))
    return tuple(out)


def check(policy: config_pb2.RoutePolicy, at: str, route, models) -> Iterator[tuple[str, str]]:
    if not policy.HasField("drift"):
        return
    d, dat = policy.drift, f"{at}.drift"
    count = len(features(d))
    if count == 0:
        yield dat, "name at least one input, output or prediction_output to watch"
    if count > MAX_FEATURES:
        yield dat, f"{count} features: at most {MAX_FEATURES} per route"
    if not 0 <= d.sample_ratio <= 1 or math.isnan(d.sample_ratio):
        yield f"{dat}.sample_ratio", "must be within (0, 1]"
    if d.window > MAX_WINDOW:
        yield f"{dat}.window", f"at most {MAX_WINDOW}"
    if d.reference_size > MAX_WINDOW:
        yield f"{dat}.reference_size", f"at most {MAX_WINDOW}"
    if d.bins == 1 or d.bins > 100:
        yield f"{dat}.bins", "must be within 2..100"
    if d.reference_file:
        try:
            load_reference(d.reference_file)
        except (OSError, ValueError) as err:
            yield f"{dat}.reference_file", str(err)


def load_reference(path: str) -> dict[str, np.ndarray]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as err:
        raise OSError(f"cannot read {path}: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not JSON: {err}") from None
    values = data.get("features") if isinstance(data, dict) else None
    if not isinstance(values, dict) or not values:
        raise ValueError(f"{path}: expected {{'features': {{name: [numbers, ...]}}}}")
    return {str(k): np.sort(np.asarray(v, dtype=np.float64)) for k, v in values.items()}


def extract(
    watched: tuple[Feature, ...], request: oip.ModelInferRequest, response
) -> dict[str, np.ndarray]:
    """Feature values of one call (a batch gives several values per feature)."""
    out: dict[str, np.ndarray] = {}
    inputs = {t.name: i for i, t in enumerate(request.inputs)}
    outputs = {t.name: i for i, t in enumerate(response.outputs)} if response is not None else {}
    for feature in watched:
        try:
            if feature.kind == "input":
                i = inputs.get(feature.tensor)
                if i is None or request.inputs[i].datatype not in _NUMERIC:
                    continue
                array = input_array(request, i)
            else:
                i = outputs.get(feature.tensor)
                if i is None or response.outputs[i].datatype not in _NUMERIC:
                    continue
                array = output_array(response, i)
        except Exception:  # a tensor that does not decode: not this feature's concern
            continue
        array = np.asarray(array, dtype=np.float64)
        if feature.kind == "output":
            out[feature.name] = array.ravel()
            continue
        rows = array.reshape(-1, array.shape[-1]) if array.ndim else array.reshape(1, 1)
        if feature.kind == "input":
            if feature.column < rows.shape[1]:
                out[feature.name] = rows[:, feature.column]
        elif feature.kind == "argmax":
            out[feature.name] = rows.argmax(axis=1).astype(np.float64)
        else:
            out[feature.name] = rows.max(axis=1)
    return out


def psi(reference: np.ndarray, current: np.ndarray, bins: int) -> float:
    """Population stability index of `current` against `reference` (sorted), over the
    reference's quantile bins."""
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1]))
    expected = np.bincount(np.searchsorted(edges, reference, side="right"),
                           minlength=len(edges) + 1) / len(reference)  # fmt: skip
    actual = np.bincount(np.searchsorted(edges, current, side="right"),
                         minlength=len(edges) + 1) / len(current)  # fmt: skip
    expected = np.maximum(expected, _EPSILON)
    actual = np.maximum(actual, _EPSILON)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def ks(reference: np.ndarray, current: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two CDFs."""
    current = np.sort(current)
    points = np.concatenate([reference, current])
    cdf_ref = np.searchsorted(reference, points, side="right") / len(reference)
    cdf_cur = np.searchsorted(current, points, side="right") / len(current)
    return float(np.max(np.abs(cdf_ref - cdf_cur)))


@dataclass
class RouteDrift:
    """One route's reference and per-variant windows."""

    policy: config_pb2.DriftPolicy
    watched: tuple[Feature, ...]
    ratio: float
    window: int
    reference_size: int
    bins: int
    reference: dict[str, np.ndarray] | None = None  # sorted values per feature, once complete
    capturing: dict[str, list] = field(default_factory=dict)
    captured_calls: int = 0
    windows: dict[tuple[str, str], deque] = field(default_factory=dict)

    @classmethod
    def of(cls, policy: config_pb2.DriftPolicy) -> RouteDrift:
        route = cls(
            policy=policy,
            watched=features(policy),
            ratio=policy.sample_ratio or DEFAULT_SAMPLE,
            window=policy.window or DEFAULT_WINDOW,
            reference_size=policy.reference_size or DEFAULT_REFERENCE,
            bins=policy.bins or DEFAULT_BINS,
        )
        if policy.reference_file:
            try:
                route.reference = load_reference(policy.reference_file)
            except (OSError, ValueError) as err:  # checked at load; gone since: capture instead
                log.error("drift: %s; capturing a reference from traffic instead", err)
        return route

    def record(self, variant: str, values: dict[str, np.ndarray], reference: bool = True) -> None:
        """`reference`: may count toward the reference (answers the caller got; a shadow's do
        not, or the reference would mix the two variants it is meant to tell apart)."""
        if self.reference is None and reference:
            self.captured_calls += 1
            for name, v in values.items():
                self.capturing.setdefault(name, []).append(v)
            if self.captured_calls >= self.reference_size:
                self.reference = {
                    name: np.sort(np.concatenate(parts)) for name, parts in self.capturing.items()
                }
                self.capturing = {}
                log.info("drift: reference captured from %d calls", self.captured_calls)
        for name, v in values.items():
            key = (variant, name)
            samples = self.windows.get(key)
            if samples is None:
                samples = self.windows[key] = deque(maxlen=self.window)
            samples.extend(v.tolist())


class DriftMonitor:
    """Every route's drift, as a Prometheus collector (statistics computed at scrape time)."""

    def __init__(self, registry) -> None:
        self._routes: dict[str, RouteDrift] = {}
        if registry is not None:
            registry.register(self)

    def route(self, model: str, policy: config_pb2.DriftPolicy) -> RouteDrift:
        """The route's state, kept while its drift policy stays the same."""
        current = self._routes.get(model)
        if current is None or current.policy != policy:
            current = self._routes[model] = RouteDrift.of(policy)
        return current

    def existing(self, model: str) -> RouteDrift | None:
        return self._routes.get(model)

    def observe(
        self, route: RouteDrift, variant: str, request, response, *, shadow: bool = False
    ) -> None:
        """Record one call's features, after its answer went out (call_soon). A shadow's
        answer never counts toward the reference."""
        asyncio.get_running_loop().call_soon(
            self._record, route, variant, request, response, not shadow
        )

    @staticmethod
    def sampled(route: RouteDrift) -> bool:
        return route.ratio >= 1 or random.random() < route.ratio

    @staticmethod
    def _record(route: RouteDrift, variant: str, request, response, reference: bool) -> None:
        try:
            values = extract(route.watched, request, response)
        except Exception:
            log.exception("drift: cannot read a sampled call")
            return
        if values:
            route.record(variant, values, reference)

    def describe(self):
        return list(self._families())

    def collect(self):
        return self._families(compute=True)

    def _families(self, compute: bool = False):
        psi_family = GaugeMetricFamily(
            "tensorgate_drift_psi",
            "Population stability index of a feature's current window vs the reference.",
            labels=("model", "variant", "feature"),
        )
        ks_family = GaugeMetricFamily(
            "tensorgate_drift_ks",
            "Kolmogorov-Smirnov statistic of a feature's current window vs the reference.",
            labels=("model", "variant", "feature"),
        )
        window = GaugeMetricFamily(
            "tensorgate_drift_window_samples",
            "Values in a feature's current window.",
            labels=("model", "variant", "feature"),
        )
        reference = GaugeMetricFamily(
            "tensorgate_drift_reference_samples",
            "Values in a feature's reference (0 while it is being captured).",
            labels=("model", "feature"),
        )
        if compute:
            for model, route in list(self._routes.items()):
                for feature in route.watched:
                    ref = (route.reference or {}).get(feature.name)
                    reference.add_metric((model, feature.name), 0 if ref is None else len(ref))
                for (variant, name), samples in list(route.windows.items()):
                    window.add_metric((model, variant, name), len(samples))
                    ref = (route.reference or {}).get(name)
                    if ref is None or len(ref) == 0 or not samples:
                        continue
                    current = np.fromiter(samples, dtype=np.float64, count=len(samples))
                    psi_family.add_metric((model, variant, name), psi(ref, current, route.bins))
                    ks_family.add_metric((model, variant, name), ks(ref, current))
        return [psi_family, ks_family, window, reference]


def baseline(config, model: str, sample_path: str, gateway: str | None, limit: int) -> dict:
    """A reference file's content from a sample of requests (newline-delimited JSON of
    ModelInferRequest, as grpcurl takes them). Output and prediction features need answers:
    each request is sent to the gateway at `gateway` (the model's route as it serves it)."""
    import grpc
    from google.protobuf import json_format
    from tritonclient.grpc import service_pb2_grpc

    route = next((r for r in config.routes if r.model == model), None)
    if route is None:
        raise ValueError(f"no route for model {model!r} in the config")
    policy = route.policy.drift if route.policy.HasField("drift") else None
    if policy is None and config.defaults.route_policy.HasField("drift"):
        policy = config.defaults.route_policy.drift
    if policy is None:
        raise ValueError(f"route {model!r} has no drift policy: nothing to baseline")
    watched = features(policy)
    needs_answers = any(f.kind != "input" for f in watched)
    if needs_answers and not gateway:
        raise ValueError("outputs or prediction_output are watched: pass --gateway host:port")
    channel = grpc.insecure_channel(gateway) if needs_answers else None
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel) if channel else None
    values: dict[str, list[np.ndarray]] = {}
    used = 0
    try:
        with open(sample_path, encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                if used >= limit:
                    break
                request = oip.ModelInferRequest()
                try:
                    json_format.Parse(line, request)
                except json_format.ParseError as err:
                    raise ValueError(f"{sample_path}:{number}: {err}") from None
                request.model_name = model
                response = stub.ModelInfer(request, timeout=30) if stub else None
                for name, v in extract(watched, request, response).items():
                    values.setdefault(name, []).append(v)
                used += 1
    finally:
        if channel is not None:
            channel.close()
    if not used:
        raise ValueError(f"{sample_path}: no requests")
    return {
        "model": model,
        "samples": used,
        "features": {name: np.concatenate(parts).tolist() for name, parts in values.items()},
    }
