"""TLS around Envoy mode. mTLS for the xDS control plane (envoy.xds_tls): config validation,
`tensorgate envoy-bootstrap --xds-ca/--xds-cert/--xds-key`, and a real `tensorgate serve` whose
ADS listener requires client certificates, with real Envoys (tools venv) on 127.0.0.1: those
with a certificate the client CA signed get the listener and carry a call to an in-process
stand-in Triton; those with another CA's certificate, none, or that expect another server name
get nothing. And TLS from Envoy to a TLS data plane (envoy.gateway_tls).
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
from concurrent import futures
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
import yaml
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from tritonclient.grpc import service_pb2 as oip
from tritonclient.grpc import service_pb2_grpc

from gateway.controlplane.config import ConfigError, from_dict
from gateway.controlplane.envoy.bootstrap import bootstrap
from tests.backends.process import free_port, tool
from tests.certs import issue, make_ca
from tests.gateway_process import TENSORGATE, GatewayProcess
from tests.loadgen import metric, scrape
from tests.oip import linear_request
from tests.test_envoy_dataplane import Envoy


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> SimpleNamespace:
    directory = tmp_path_factory.mktemp("xds-pki")
    ca, other = make_ca(directory, "xds-ca"), make_ca(directory, "other-ca")
    return SimpleNamespace(
        ca=ca[1],
        server=issue(directory, ca, "control-plane", server=True),  # SAN 127.0.0.1, localhost
        client=issue(directory, ca, "edge", server=False),
        rogue=issue(directory, other, "rogue", server=False),
    )


def mtls(pki) -> dict:
    key, cert = pki.server
    return {"cert_file": str(cert), "key_file": str(key), "client_ca_file": str(pki.ca)}


BASE = {
    "backends": [{"name": "fake", "kind": "BACKEND_KIND_TRITON", "address": "127.0.0.1:1"}],
    "routes": [{"model": "echo", "variants": [{"name": "a", "backend": "fake", "weight": 1}]}],
}


# --- config validation ---------------------------------------------------------------------


def test_config_xds_on_the_network_needs_mtls(pki):
    on_network = {**BASE, "listeners": {"xds": "0.0.0.0:18000"}}
    with pytest.raises(ConfigError, match=r"listeners\.xds: '0\.0\.0\.0:18000' is not a loopback"):
        from_dict(on_network)
    server_only = {k: v for k, v in mtls(pki).items() if k != "client_ca_file"}
    with pytest.raises(ConfigError, match=r"envoy\.xds_tls has no client_ca_file") as err:
        from_dict({**on_network, "envoy": {"xds_tls": server_only}})
    assert len(err.value.problems) == 1
    config = from_dict({**on_network, "envoy": {"xds_tls": mtls(pki)}})
    assert config.envoy.xds_tls.client_ca_file == str(pki.ca)
    # server-only TLS is fine on loopback, and the explicit opt-out still works on the network
    from_dict({**BASE, "listeners": {"xds": "127.0.0.1:18000"}, "envoy": {"xds_tls": server_only}})
    from_dict({**on_network, "envoy": {"xds_tls": server_only, "xds_on_network": True}})


def test_config_xds_tls_files_are_checked_naming_the_field(pki, tmp_path):
    listeners = {"listeners": {"xds": "127.0.0.1:18000"}}

    def problems(tls: dict) -> list[str]:
        with pytest.raises(ConfigError) as err:
            from_dict({**BASE, **listeners, "envoy": {"xds_tls": {**mtls(pki), **tls}}})
        return [str(p) for p in err.value.problems]

    missing = tmp_path / "missing.pem"
    assert problems({"cert_file": str(missing)}) == [
        f"envoy.xds_tls.cert_file: cannot read {missing}: No such file or directory"
    ]
    assert problems({"key_file": ""}) == ["envoy.xds_tls.key_file: required with envoy.xds_tls"]
    not_pem = tmp_path / "ca.txt"
    not_pem.write_text("not a certificate\n")
    assert problems({"client_ca_file": str(not_pem)}) == [
        f"envoy.xds_tls.client_ca_file: {not_pem} is not PEM (no -----BEGIN line)"
    ]
    # a key that is not the certificate's (gRPC itself would only fail to bind)
    (wrong,) = problems({"key_file": str(pki.client[0])})
    assert wrong.startswith("envoy.xds_tls.key_file: not the (unencrypted) private key")
    assert "BEGIN" not in wrong  # never the key's content
    with pytest.raises(ConfigError, match=r"envoy: set listeners\.xds"):
        from_dict({**BASE, "envoy": {"xds_tls": mtls(pki)}})


# --- envoy-bootstrap -------------------------------------------------------------------------


def write_config(directory: Path, pki) -> Path:
    path = directory / "gateway.yaml"
    config = {**BASE, "listeners": {"xds": "127.0.0.1:18000"}, "envoy": {"xds_tls": mtls(pki)}}
    path.write_text(yaml.safe_dump(config))
    return path


def envoy_bootstrap(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(TENSORGATE), "envoy-bootstrap", *args], capture_output=True, text=True, timeout=30
    )


def test_bootstrap_needs_the_ca_when_xds_has_tls(pki, tmp_path):
    config = write_config(tmp_path, pki)
    done = envoy_bootstrap("-c", str(config))
    assert done.returncode == 1
    assert "envoy.xds_tls is set" in done.stderr and "--xds-ca FILE" in done.stderr
    assert "--xds-cert FILE and --xds-key FILE" in done.stderr  # client_ca_file: mTLS
    done = envoy_bootstrap("-c", str(config), "--xds-ca", str(pki.ca))
    assert done.returncode == 1 and "--xds-cert FILE and --xds-key FILE" in done.stderr
    cert = pki.client[1]
    done = envoy_bootstrap("-c", str(config), "--xds-ca", str(pki.ca), "--xds-cert", str(cert))
    assert done.returncode == 1 and "--xds-cert and --xds-key go together" in done.stderr
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump({**BASE, "listeners": {"xds": "127.0.0.1:18000"}}))
    done = envoy_bootstrap("-c", str(plain), "--xds-ca", str(pki.ca))
    assert done.returncode == 1 and "envoy.xds_tls is not set" in done.stderr


def test_bootstrap_with_the_flags_is_valid_for_envoy(pki, tmp_path):
    config = write_config(tmp_path, pki)
    key, cert = pki.client
    out = tmp_path / "envoy.json"
    done = envoy_bootstrap(
        "-c", str(config), "-o", str(out), "--xds-ca", str(pki.ca),
        "--xds-cert", str(cert), "--xds-key", str(key), "--xds-server-name", "localhost",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (cluster,) = json.loads(out.read_text())["staticResources"]["clusters"]
    socket = cluster["transportSocket"]
    assert socket["name"] == "envoy.transport_sockets.tls"
    context = socket["typedConfig"]
    assert context["sni"] == "localhost"
    common = context["commonTlsContext"]
    assert common["alpnProtocols"] == ["h2"]
    assert common["tlsCertificates"] == [
        {"certificateChain": {"filename": str(cert)}, "privateKey": {"filename": str(key)}}
    ]
    assert common["validationContext"] == {
        "trustedCa": {"filename": str(pki.ca)},
        "matchTypedSubjectAltNames": [{"sanType": "DNS", "matcher": {"exact": "localhost"}}],
    }
    validate = subprocess.run(
        [tool("envoy"), "--mode", "validate", "-c", str(out), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert validate.returncode == 0, validate.stdout + validate.stderr


def test_bootstrap_server_name_defaults_to_the_xds_host(pki):
    config = from_dict(
        {**BASE, "listeners": {"xds": "0.0.0.0:18000"}, "envoy": {"xds_tls": mtls(pki)}}
    )
    key, cert = pki.client
    boot = bootstrap(config, xds_ca=str(pki.ca), xds_cert=str(cert), xds_key=str(key))
    context = tls_pb2.UpstreamTlsContext()
    boot.static_resources.clusters[0].transport_socket.typed_config.Unpack(context)
    (san,) = context.common_tls_context.validation_context.match_typed_subject_alt_names
    assert (san.matcher.exact, san.san_type) == ("127.0.0.1", san.IP_ADDRESS)
    assert context.sni == ""  # SNI carries host names, not IPs
    boot = bootstrap(
        config, xds_address="cp.example:18000", xds_ca="ca.pem", xds_cert="c.pem", xds_key="k.pem"
    )
    boot.static_resources.clusters[0].transport_socket.typed_config.Unpack(context)
    assert context.sni == "cp.example"


# --- a real control plane and real Envoys ----------------------------------------------------


class Backend(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Just enough of a Triton (OIP) server for Envoy to carry one call to."""

    def __init__(self) -> None:
        self.calls = 0

    def ModelInfer(self, request, context):
        self.calls += 1
        return oip.ModelInferResponse(model_name=request.model_name, id="from-backend")

    def ModelMetadata(self, request, context):
        return oip.ModelMetadataResponse(name=request.name, versions=["1"])

    def ModelReady(self, request, context):
        return oip.ModelReadyResponse(ready=True)

    def ServerLive(self, request, context):
        return oip.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return oip.ServerReadyResponse(ready=True)


class StartedEnvoy(Envoy):
    """An Envoy that is up (admin answers) whether or not the control plane gave it anything."""

    def _wait_ready(self) -> None:
        def answers():
            try:
                self.admin("/server_info")
            except urllib.error.HTTPError:
                return True
            except OSError:
                return False
            return True

        self._poll(answers, time.monotonic() + self.startup_timeout, "Envoy admin not up")


@pytest.fixture(scope="module")
def plane(pki):
    backend = Backend()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(backend, server)
    backend_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    listen = free_port()
    config = {
        "listeners": {"xds": f"127.0.0.1:{free_port()}"},
        "envoy": {"listen": f"127.0.0.1:{listen}", "xds_tls": mtls(pki)},
        "backends": [{**BASE["backends"][0], "address": f"127.0.0.1:{backend_port}"}],
        "routes": BASE["routes"],
    }
    gateway = GatewayProcess(config)
    try:
        gateway.start(wait="live")
        yield SimpleNamespace(gateway=gateway, backend=backend, listen=f"127.0.0.1:{listen}")
    finally:
        gateway.stop()
        server.stop(0)


def bootstrap_file(plane, node: str, admin_port: int, *flags: str) -> Path:
    path = Path(plane.gateway.directory) / f"{node}.json"
    done = envoy_bootstrap(
        "-c", str(plane.gateway.config_path), "-o", str(path), "--node-id", node,
        "--admin", f"127.0.0.1:{admin_port}", *flags,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return path


def test_envoy_with_a_client_certificate_gets_the_config_over_mtls(plane, pki):
    key, cert = pki.client
    flags = ("--xds-ca", str(pki.ca), "--xds-cert", str(cert), "--xds-key", str(key))
    admin = free_port()
    # Envoy.start() returns once the listener pushed over xDS is there.
    with Envoy(bootstrap_file(plane, "edge-ok", admin, *flags), admin, 71) as envoy:
        assert envoy.counter("cluster.tensorgate_xds.ssl.handshake") >= 1
        assert envoy.counter("control_plane.connected_state") == 1
        with grpc.insecure_channel(plane.listen) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            response, call = stub.ModelInfer.with_call(linear_request("echo"), timeout=10)
        assert (response.model_name, response.id) == ("echo", "from-backend")
        assert dict(call.trailing_metadata())["x-tensorgate-variant"] == "a"
        assert envoy.counter("cluster.tensorgate_gateway.upstream_rq_total") == 0  # Envoy's own
    assert plane.backend.calls == 1
    assert "xds: Envoy edge-ok connected" in plane.gateway.log()
    assert metric(scrape(plane.gateway.metrics_url), "tensorgate_xds_acks_total", type="lds") >= 1


def test_envoys_without_a_certificate_the_ca_signed_get_nothing(plane, pki, tmp_path):
    key, cert = pki.client
    rogue_key, rogue_cert = pki.rogue
    nodes = {
        "edge-rogue": ("--xds-cert", str(rogue_cert), "--xds-key", str(rogue_key)),
        # the right client certificate, but the control plane's does not name this server
        "edge-wrong-name": ("--xds-cert", str(cert), "--xds-key", str(key),
                            "--xds-server-name", "control-plane.invalid"),
    }  # fmt: skip
    paths = {}
    for node, flags in nodes.items():
        paths[node] = bootstrap_file(plane, node, free_port(), "--xds-ca", str(pki.ca), *flags)
    # No client certificate at all: the same bootstrap without tls_certificates (the command
    # refuses to write one, the control plane requiring client certificates).
    boot = json.loads(paths["edge-rogue"].read_text())
    boot["node"]["id"] = "edge-anonymous"
    boot["admin"]["address"]["socketAddress"]["portValue"] = free_port()
    del boot["staticResources"]["clusters"][0]["transportSocket"]["typedConfig"][
        "commonTlsContext"
    ]["tlsCertificates"]
    paths["edge-anonymous"] = tmp_path / "anonymous.json"
    paths["edge-anonymous"].write_text(json.dumps(boot))
    before = scrape(plane.gateway.metrics_url)
    envoys = []
    try:
        for i, path in enumerate(paths.values()):
            port = json.loads(path.read_text())["admin"]["address"]["socketAddress"]["portValue"]
            envoys.append(StartedEnvoy(path, port, 72 + i).start())
        time.sleep(3)
        for envoy in envoys:
            assert envoy.running, envoy.log_tail()
            assert "tensorgate" not in envoy.admin("/listeners"), envoy.bootstrap
            stats = envoy.stats()
            assert stats.get("control_plane.connected_state") == "0", envoy.bootstrap
            assert stats.get("cluster_manager.cds.update_success", "0") == "0", envoy.bootstrap
            # they did try: TLS failed, on one side or the other
            assert int(stats["cluster.tensorgate_xds.upstream_cx_total"]) >= 1, envoy.bootstrap
            assert int(stats.get("cluster.tensorgate_xds.ssl.handshake", "0")) == 0
    finally:
        for envoy in envoys:
            envoy.stop()
    after = scrape(plane.gateway.metrics_url)
    log = plane.gateway.log()
    for node in paths:
        assert f"xds: Envoy {node} connected" not in log  # no request read, so no ACK either
    for what in ("tensorgate_xds_acks_total", "tensorgate_xds_pushes_total"):
        for kind in ("cds", "eds", "rtds", "lds", "srds", "rds"):
            assert metric(after, what, type=kind) == metric(before, what, type=kind), (what, kind)
    assert metric(after, "tensorgate_xds_connected_envoys") == metric(
        before, "tensorgate_xds_connected_envoys"
    )


# --- Envoy -> the gateway's data plane over TLS ----------------------------------------------


def test_envoy_reaches_a_tls_data_plane_with_gateway_tls(pki):
    """listeners.data_plane_tls + envoy.gateway_tls: the calls Envoy hands to the gateway go
    over TLS, the gateway's certificate checked against the CA and its name."""
    backend = Backend()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(backend, server)
    backend_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    key, cert = pki.server
    listen, data_plane = free_port(), f"127.0.0.1:{free_port()}"
    config = {
        "listeners": {
            "xds": f"127.0.0.1:{free_port()}",
            "data_plane": data_plane,
            "data_plane_tls": {"cert_file": str(cert), "key_file": str(key)},
        },
        "envoy": {
            "listen": f"127.0.0.1:{listen}",
            "gateway_tls": {"ca_file": str(pki.ca)},
            "gateway_routes": ["echo"],  # served by the gateway: Envoy hands every call over
        },
        "backends": [{**BASE["backends"][0], "address": f"127.0.0.1:{backend_port}"}],
        "routes": BASE["routes"],
    }
    gateway = GatewayProcess(config)
    try:
        gateway.start(wait="none")
        credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())
        with grpc.secure_channel(data_plane, credentials) as channel:
            grpc.channel_ready_future(channel).result(timeout=30)  # the TLS data plane is up
        admin = free_port()
        boot = bootstrap_file(SimpleNamespace(gateway=gateway), "edge-tls-gateway", admin)
        with Envoy(boot, admin, 73) as envoy:
            with grpc.insecure_channel(f"127.0.0.1:{listen}") as channel:
                stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
                response = stub.ModelInfer(linear_request("echo"), timeout=10)
            assert response.model_name == "echo"
            assert envoy.counter("cluster.tensorgate_gateway.upstream_rq_total") == 1
            assert envoy.counter("cluster.tensorgate_gateway.ssl.handshake") >= 1
        assert backend.calls == 1
    finally:
        gateway.stop()
        server.stop(0)
