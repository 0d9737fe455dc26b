"""Every field of a route's config is owned by a layer or a component that declares what Envoy
mode does with it, and Envoy mode decides each route from those declarations alone.

Before, `decide_route` listed retry, hedge, fallback and shadow by hand: a Triton route whose only
policy was a response cache, batching or drift was served by Envoy with none of them and no word
anywhere.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gateway.controlplane.config import from_dict
from gateway.controlplane.envoy.decide import decide
from gateway.dataplane.components import COMPONENTS, path_matrix
from gateway.dataplane.layers.chain import route_layers
from tensorgate.config.v1 import config_pb2

TENSORGATE = Path(sys.executable).parent / "tensorgate"
MESSAGES = (config_pb2.Route, config_pb2.Variant, config_pb2.RoutePolicy, config_pb2.Backend)


def _owners() -> dict[str, list[str]]:
    owners: dict[str, list[str]] = {}
    for owner in (*route_layers(), *COMPONENTS):
        for name in owner.fields:
            owners.setdefault(name, []).append(owner.name)
    return owners


def test_every_route_variant_policy_and_backend_field_has_an_owner():
    owners = _owners()
    fields = {f"{m.DESCRIPTOR.name}.{f.name}" for m in MESSAGES for f in m.DESCRIPTOR.fields}
    unowned = sorted(fields - owners.keys())
    assert not unowned, f"config fields no layer or component declares: {unowned}"
    unknown = sorted(owners.keys() - fields)
    assert not unknown, f"declared fields the protos do not have: {unknown}"
    shared = {name: who for name, who in owners.items() if len(who) > 1}
    assert not shared, f"fields owned twice: {shared}"


def _config(route: dict) -> config_pb2.GatewayConfig:
    return from_dict(
        {
            "listeners": {"xds": "127.0.0.1:18000"},
            "envoy": {"listen": "127.0.0.1:18080"},
            "backends": [{"name": "t", "kind": "BACKEND_KIND_TRITON", "address": "127.0.0.1:8001"}],
            "routes": [route],
        }
    )


def build_route(policy: dict | None = None, **variant) -> dict:
    route = {"model": "m", "variants": [{"name": "a", "backend": "t", "weight": 1, **variant}]}
    if policy:
        route["policy"] = policy
    return route


# A route with one policy each; what Envoy mode must do with it (reason text for check-config).
ONE_POLICY = [
    ({}, {}, "envoy", None),
    ({"response_cache": {"deterministic": True}}, {}, "gateway", "response_cache"),
    ({}, {"batching": {"max_batch_size": 8}}, "gateway", "batching"),
    ({"drift": {"outputs": ["OUTPUT0"]}}, {}, "gateway", "drift"),
    ({"hedge": {"delay": "0.01s"}}, {}, "gateway", "hedge"),
    ({"timeout": "2s"}, {}, "envoy", None),
    ({"retry": {"max_attempts": 3, "retry_on": ["UNKNOWN"]}}, {}, "gateway", "retry.retry_on"),
    ({"retry": {"max_attempts": 3}}, {}, "envoy", None),
    ({"fallback": [{"static_response": {}}]}, {}, "gateway", "static_response"),
]


@pytest.mark.parametrize(("policy", "variant", "path", "reason"), ONE_POLICY)
def test_envoy_mode_hands_over_what_it_cannot_apply(policy, variant, path, reason):
    (decision,) = decide(_config(build_route(policy, **variant)))
    assert decision.path == path, decision
    if reason is not None:
        assert any(reason in r for r in decision.reasons), decision.reasons


def test_check_config_says_which_path_serves_cache_batching_and_drift(tmp_path):
    config = {
        "listeners": {"xds": "127.0.0.1:18000"},
        "envoy": {"listen": "127.0.0.1:18080"},
        "backends": [{"name": "t", "kind": "BACKEND_KIND_TRITON", "address": "127.0.0.1:8001"}],
        "routes": [
            {**build_route({"response_cache": {"deterministic": True}}), "model": "cached"},
            {**build_route(batching={"max_batch_size": 8}), "model": "batched"},
            {**build_route({"drift": {"outputs": ["OUTPUT0"]}}), "model": "drifted"},
            {**build_route(), "model": "plain"},
        ],
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    out = subprocess.run(
        [str(TENSORGATE), "check-config", str(path)], capture_output=True, text=True, check=True
    ).stdout
    lines = [line.strip() for line in out.splitlines()]
    for model, word in (
        ("cached", "response_cache"),
        ("batched", "batching"),
        ("drifted", "drift"),
    ):
        at = lines.index(f"gateway {model}")
        assert lines[at + 1].startswith(f"- {word}:"), out
    assert "envoy   plain" in out


def test_architecture_doc_carries_the_declared_path_matrix():
    doc = (Path(__file__).parents[1] / "docs" / "architecture.md").read_text()
    assert path_matrix() in doc, (
        "docs/architecture.md: regenerate with gateway.dataplane.components.path_matrix()"
    )
