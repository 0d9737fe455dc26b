"""The Envoy bootstrap: only the admin endpoint and the way to the control plane (ADS); the
listener, routes, clusters and endpoints all come over xDS from `tensorgate serve`."""

from __future__ import annotations

import json

from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import config_source_pb2, grpc_service_pb2
from google.protobuf import json_format

from gateway.controlplane.envoy.clusters import build_cluster, upstream_tls
from gateway.controlplane.envoy.resources import WEIGHTS_LAYER, socket_address, split_address
from tensorgate.config.v1 import config_pb2

XDS_CLUSTER = "tensorgate_xds"


def bootstrap(
    config: config_pb2.GatewayConfig,
    *,
    node_id: str = "envoy",
    admin: str = "127.0.0.1:9901",
    xds_address: str | None = None,
    xds_ca: str | None = None,
    xds_cert: str | None = None,
    xds_key: str | None = None,
    xds_server_name: str | None = None,
) -> bootstrap_pb2.Bootstrap:
    """A bootstrap for one Envoy of the fleet (`node_id` names it in the control plane's logs).
    `xds_ca`: TLS to the control plane (envoy.xds_tls), its certificate checked against this CA
    and `xds_server_name` (default: the host Envoy dials); `xds_cert`/`xds_key`: this Envoy's
    client certificate. Paths as the Envoy sees them (it reads them when it starts)."""
    address = xds_address or config.listeners.xds
    if address in ("", "off"):
        raise ValueError("listeners.xds is off: set it (e.g. 127.0.0.1:18000) to use Envoy mode")
    host, _, port = address.rpartition(":")
    if host in ("0.0.0.0", "[::]", "::"):
        address = f"127.0.0.1:{port}"
    _check_tls_options(config.envoy.xds_tls, xds_ca, xds_cert, xds_key, xds_server_name)
    boot = bootstrap_pb2.Bootstrap()
    boot.node.id = node_id
    boot.node.cluster = "tensorgate"
    boot.admin.address.CopyFrom(socket_address(admin))
    xds, endpoints = build_cluster(XDS_CLUSTER, address, connect_timeout=1.0)
    if endpoints is not None:  # no EDS before there is a control plane: inline, static
        xds.type = cluster_pb2.Cluster.STATIC
        xds.ClearField("eds_cluster_config")
        xds.load_assignment.CopyFrom(endpoints)
    xds.ClearField("common_lb_config")
    if xds_ca:
        server_name = xds_server_name or split_address(address)[0]
        xds.transport_socket.CopyFrom(upstream_tls(server_name, xds_ca, xds_cert, xds_key))
    # Reconnect quickly when the control plane restarts.
    xds.upstream_connection_options.tcp_keepalive.keepalive_time.value = 30
    boot.static_resources.clusters.append(xds)
    dynamic = boot.dynamic_resources
    dynamic.ads_config.api_type = config_source_pb2.ApiConfigSource.GRPC
    dynamic.ads_config.transport_api_version = config_source_pb2.V3
    dynamic.ads_config.set_node_on_first_message_only = True
    dynamic.ads_config.grpc_services.append(
        grpc_service_pb2.GrpcService(
            envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=XDS_CLUSTER)
        )
    )
    for source in (dynamic.cds_config, dynamic.lds_config):
        source.ads.SetInParent()
        source.resource_api_version = config_source_pb2.V3
    # A timeout Envoy enforces (route or per try) answers DEADLINE_EXCEEDED, as the Python data
    # plane does; without it Envoy maps its 504 to UNAVAILABLE, which callers retry
    # (envoyproxy/envoy#10184; the flag is Envoy's own, tests/test_path_conformance.py).
    fixed = boot.layered_runtime.layers.add(name="tensorgate_semantics")
    fixed.static_layer.update(
        {"envoy.reloadable_features.grpc_timeout_returns_deadline_exceeded": True}
    )
    # The variant weights: an RTDS layer the routes read (compile.WEIGHTS_LAYER); the admin
    # layer stays for operators' runtime overrides.
    weights = boot.layered_runtime.layers.add(name=WEIGHTS_LAYER)
    weights.rtds_layer.name = WEIGHTS_LAYER
    weights.rtds_layer.rtds_config.ads.SetInParent()
    weights.rtds_layer.rtds_config.resource_api_version = config_source_pb2.V3
    boot.layered_runtime.layers.add(name="admin").admin_layer.SetInParent()
    return boot


def _check_tls_options(
    tls: config_pb2.Tls,
    ca: str | None,
    cert: str | None,
    key: str | None,
    server_name: str | None,
) -> None:
    """The Envoy side must match envoy.xds_tls: a mismatch would only show as an Envoy that
    keeps reconnecting."""
    if bool(cert) != bool(key):
        raise ValueError("--xds-cert and --xds-key go together (this Envoy's client certificate)")
    if (cert or server_name) and not ca:
        raise ValueError("--xds-cert/--xds-key/--xds-server-name need --xds-ca (TLS to xDS)")
    if tls.cert_file and not ca:
        raise ValueError(
            "envoy.xds_tls is set: the control plane serves xDS over TLS only. Pass --xds-ca FILE "
            "(the CA that signed envoy.xds_tls.cert_file)"
            + (", --xds-cert FILE and --xds-key FILE" if tls.client_ca_file else "")
        )
    if ca and not tls.cert_file:
        raise ValueError(
            "--xds-ca is given but envoy.xds_tls is not set: the control plane serves xDS in "
            "plaintext (set envoy.xds_tls, or drop the --xds-* options)"
        )
    if tls.client_ca_file and not cert:
        raise ValueError(
            "envoy.xds_tls.client_ca_file is set: the control plane only accepts Envoys with a "
            "client certificate it signed. Pass --xds-cert FILE and --xds-key FILE"
        )


def render(boot: bootstrap_pb2.Bootstrap) -> str:
    """The bootstrap as JSON (which Envoy reads as YAML too)."""
    return json.dumps(json_format.MessageToDict(boot), indent=2) + "\n"
