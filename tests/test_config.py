"""Config errors are loud and whole: file, field path, reason, non-zero exit, nothing started."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import time

import pytest

from gateway.controlplane.config import ConfigError, load_file, load_yaml, warnings
from tests.backends.triton import free_port
from tests.gateway_process import TENSORGATE

GOOD = """
backends:
  - {name: triton-a, kind: BACKEND_KIND_TRITON, address: "127.0.0.1:8101"}
routes:
  - model: linear
    variants:
      - {name: stable, backend: triton-a, weight: 80}
      - {name: canary, backend: triton-a, weight: 20}
"""


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as err:
        load_yaml(text, source="x.yaml")
    return [str(p) for p in err.value.problems]


def test_good_config_is_defaulted():
    config = load_yaml(GOOD)
    assert config.listeners.data_plane == "127.0.0.1:8001"  # loopback unless configured
    assert config.listeners.metrics == "127.0.0.1:9464"
    assert config.routes[0].variants[0].backend_model == "linear"
    assert config.backends[0].per_try_timeout.seconds == 30


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (GOOD.replace("backend: triton-a, weight: 20", "backend: triton-b, weight: 20"),
         "routes[0].variants[1].backend: unknown backend 'triton-b' (known: triton-a)"),
        (GOOD.replace("weight: 80", "weight: -5"), "routes[0].variants[0].weight: -5 is out of range: must be 0 to 4294967295"),
        (GOOD.replace("weight: 80", "weight: 0").replace("weight: 20", "weight: 0"),
         "routes[0].variants: all weights are 0"),
        (GOOD.replace("name: canary", "name: stable"), "routes[0].variants[1].name: duplicate variant 'stable'"),
        (GOOD + "  - model: linear\n    variants: [{name: a, backend: triton-a, weight: 1}]\n",
         "routes[1].model: duplicate route for model 'linear'"),
        (GOOD.replace('"127.0.0.1:8101"', '"127.0.0.1:99999"'), "backends[0].address: '127.0.0.1:99999': port must be 1-65535"),
        (GOOD.replace('"127.0.0.1:8101"', '"localhost"'), "backends[0].address: 'localhost' is not host:port"),
        (GOOD.replace("BACKEND_KIND_TRITON", "TRITON"),
         "backends[0].kind: 'TRITON' is not a BackendKind (did you mean 'BACKEND_KIND_TRITON'?); use one of: BACKEND_KIND_TRITON, "),
        (GOOD.replace("routes:", "rootes:"), "rootes: unknown field (did you mean 'routes'?)"),
        (GOOD + "listeners: {data_plane: 'nohost'}\n", "listeners.data_plane: 'nohost' is not host:port"),
        (GOOD + "lifecycle: {shutdown_grace: 5}\n", "lifecycle.shutdown_grace: 5 is not a duration: write seconds with an s"),
        ("routes: [\n", "not valid YAML: line 2"),
        (GOOD.replace("weight: 20}", "weight: 20, batching: {max_batch_size: 8, max_concurrent_batches: 2, dispatch: BATCH_DISPATCH_WAIT_FOR_DELAY}}"),
         "routes[0].variants[1].batching.max_concurrent_batches: only applies with dispatch BATCH_DISPATCH_SEND_WHEN_IDLE"),
        (GOOD.replace("weight: 20}", "weight: 20, batching: {max_batch_size: 8, dispatch: WHEN_IDLE}}"),
         "routes[0].variants[1].batching.dispatch: 'WHEN_IDLE' is not a BatchDispatch (did you mean 'BATCH_DISPATCH_SEND_WHEN_IDLE'?"),
    ],
)  # fmt: skip
def test_invalid_configs_name_path_and_reason(text, expected):
    found = problems(text)
    assert any(expected in p for p in found), found


def test_all_problems_reported_at_once():
    text = GOOD.replace("triton-a, weight: 20", "nope, weight: 20").replace(
        '"127.0.0.1:8101"', '"x"'
    )
    assert len(problems(text)) == 2


def test_check_config_cli(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(GOOD)
    run = subprocess.run([TENSORGATE, "check-config", good], capture_output=True, text=True)
    assert run.returncode == 0
    assert "OK (1 backends, 1 routes, 2 variants)" in run.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("backend: triton-a, weight: 20", "backend: triton-b, weight: 20"))
    run = subprocess.run([TENSORGATE, "check-config", bad], capture_output=True, text=True)
    assert run.returncode == 1
    assert str(bad) in run.stderr
    assert "routes[0].variants[1].backend: unknown backend 'triton-b'" in run.stderr
    run = subprocess.run(
        [TENSORGATE, "check-config", tmp_path / "missing.yaml"], capture_output=True, text=True
    )
    assert run.returncode == 1 and "cannot read file" in run.stderr


def test_serve_rejects_invalid_config_and_binds_nothing(tmp_path):
    port = free_port()
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        GOOD.replace("weight: 80", "weight: 0").replace("weight: 20", "weight: 0")
        + f"listeners: {{data_plane: '127.0.0.1:{port}'}}\n"
    )
    start = time.monotonic()
    run = subprocess.run(
        [TENSORGATE, "serve", "--config", bad], capture_output=True, text=True, timeout=30
    )
    assert run.returncode == 1
    assert "all weights are 0" in run.stderr and str(bad) in run.stderr
    assert time.monotonic() - start < 15
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0  # nothing listening


def test_serve_refuses_a_busy_port(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = tmp_path / "g.yaml"
        cfg.write_text(GOOD + f"listeners: {{data_plane: '127.0.0.1:{port}', metrics: 'off'}}\n")
        run = subprocess.run(
            [TENSORGATE, "serve", "--config", cfg], capture_output=True, text=True, timeout=30
        )
    assert run.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in run.stderr


ADMIN_TOKENS = "admin: {tokens_env: TENSORGATE_ADMIN_TOKENS}\n"


@pytest.mark.parametrize(
    "address",
    ["0.0.0.0:8002", "[::]:8002", "10.1.2.3:8002", "gw.internal:8002", "localhost.evil:8002"],
)
def test_admin_on_the_network_in_plaintext_is_rejected(address):
    found = problems(GOOD + f"listeners: {{admin: '{address}'}}\n" + ADMIN_TOKENS)
    assert found == [
        f"listeners.admin: {address!r} is not a loopback address and the admin API has no TLS: "
        "bearer tokens would cross the network in clear. Set admin.tls (cert_file, key_file), or "
        "bind listeners.admin to 127.0.0.1, or, on a network you trust end to end, set "
        "admin.insecure_plaintext_on_network: true"
    ]


@pytest.mark.parametrize(
    "address", ["127.0.0.1:8002", "127.9.9.9:8002", "[::1]:8002", "localhost:8002", "off"]
)
def test_admin_on_loopback_needs_no_tls(address):
    config = load_yaml(GOOD + f"listeners: {{admin: '{address}'}}\n" + ADMIN_TOKENS)
    assert config.listeners.admin == address and warnings(config) == []


def test_admin_on_the_network_with_tls_is_accepted():
    config = load_yaml(
        GOOD
        + "listeners: {admin: '0.0.0.0:8002'}\n"
        + "admin: {tokens_env: T, tls: {cert_file: admin.pem, key_file: admin.key}}\n"
    )
    assert config.admin.tls.cert_file == "admin.pem" and warnings(config) == []
    # The opt-out changes nothing when TLS is on: there is nothing to warn about.
    config.admin.insecure_plaintext_on_network = True
    assert warnings(config) == []


def test_admin_plaintext_opt_out_is_accepted_and_loud(tmp_path, caplog):
    text = (
        GOOD
        + "listeners: {admin: '0.0.0.0:8002'}\n"
        + "admin: {tokens_env: T, insecure_plaintext_on_network: true}\n"
    )
    config = load_yaml(text)
    (warning,) = warnings(config)
    assert warning.startswith("listeners.admin '0.0.0.0:8002' serves the admin API in PLAINTEXT")
    assert "bearer tokens cross the network in clear" in warning
    # Loading the file (what serve and check-config do) logs it at WARNING.
    path = tmp_path / "g.yaml"
    path.write_text(text)
    with caplog.at_level(logging.WARNING, logger="gateway.controlplane.config"):
        load_file(path)
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", f"{path}: {warning}")
    ]
    # check-config also checks the variable admin.tokens_env names (set here).
    env = {**os.environ, "T": "ops:admin:0123456789abcdef"}
    run = subprocess.run(
        [TENSORGATE, "check-config", path], capture_output=True, text=True, env=env
    )
    assert run.returncode == 0 and "PLAINTEXT" in run.stderr, run.stderr
    # On loopback the opt-out has no effect, so nothing is said.
    assert warnings(load_yaml(text.replace("0.0.0.0:8002", "127.0.0.1:8002"))) == []


KINDS = """
backends:
  - {name: tri, kind: BACKEND_KIND_TRITON, address: "127.0.0.1:8101"}
  - {name: tfs, kind: BACKEND_KIND_TFSERVING, address: "127.0.0.1:8500"}
  - {name: ts, kind: BACKEND_KIND_TORCHSERVE, address: "127.0.0.1:8080"}
routes:
  - model: m
    variants:
      - {name: a, backend: tri, weight: 1}
      - {name: b, backend: tfs, weight: 1, tfserving: {signature_name: s, version_label: canary}}
      - {name: c, backend: ts, weight: 1, torchserve: {body_contract: BODY_CONTRACT_OIP_JSON}}
"""


def test_backend_kind_options_are_checked_by_their_adapter():
    config = load_yaml(KINDS)
    assert config.routes[0].variants[1].tfserving.signature_name == "s"
    cases = [
        (
            KINDS.replace("{name: a, backend: tri, weight: 1}", "{name: a, backend: tri, weight: 1, tfserving: {signature_name: s}}"),
            "routes[0].variants[0].tfserving: options for another backend kind: backend 'tri' is Triton",
        ),
        (
            KINDS.replace("version_label: canary}", "version_label: canary}, backend_version: '2'"),
            "routes[0].variants[1].tfserving.version_label: set backend_version or tfserving.version_label, not both",
        ),
        (
            KINDS.replace("BODY_CONTRACT_OIP_JSON", "BODY_CONTRACT_INSTANCES_JSON"),
            "routes[0].variants[2].torchserve.body_contract: BODY_CONTRACT_INSTANCES_JSON needs the route schema",
        ),
        (
            KINDS.replace('address: "127.0.0.1:8500"}', 'address: "127.0.0.1:8500", torchserve: {management_address: "127.0.0.1:8081"}}'),
            "backends[1].torchserve: options for another backend kind than TF Serving",
        ),
        (
            KINDS.replace('address: "127.0.0.1:8080"}', 'address: "127.0.0.1:8080", torchserve: {management_address: "nohost"}}'),
            "backends[2].torchserve.management_address: 'nohost' is not host:port",
        ),
        (
            KINDS.replace("tfserving: {signature_name: s, version_label: canary}", "signature_name: s"),
            "signature_name: unknown field (it belongs in tfserving: write tfserving: {signature_name: ...})",
        ),
    ]  # fmt: skip
    for text, expected in cases:
        found = problems(text)
        assert any(expected in p for p in found), (expected, found)
