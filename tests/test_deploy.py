"""The deployment files in deploy/, each checked by the real tool that consumes it.

- Kubernetes: kubernetes-validate (strict, offline schemas) on every manifest and on the
  `kubectl kustomize` rendering; the ConfigMap's gateway config passes `tensorgate check-config`
  and really serves (admin API included) in front of a real Triton, its route table in a real
  etcd over TLS with a client certificate, as the manifests configure it.
- Envoy: `envoy --mode validate`, then a real Envoy with deploy/envoy/envoy.yaml (only its three
  loopback ports substituted) between stock tritonclient and a real gateway + Triton.
- Prometheus: `promtool check rules` / `test rules` (every alert fires and stays silent in a unit
  test, every recording rule is evaluated in one), then a real Prometheus with
  deploy/prometheus/prometheus.yaml scraping a real gateway: series, recording rules, every alert
  rule and every Grafana query evaluate, and nothing fires on a healthy gateway.
- Grafana: the dashboard JSON, whose queries (like the rules') use only metric names a real
  gateway exports on /metrics, recording rules of deploy/prometheus, or Envoy's statistics the
  Envoy-mode rules read.

Tools come from the project's scripts: `scripts/backend-venv tools` (Envoy, kubernetes-validate,
kubectl) and `scripts/system-tools` (Prometheus and promtool from Debian).
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
import yaml
from tritonclient.grpc import service_pb2_grpc

from tensorgate.admin.v1 import admin_pb2, admin_pb2_grpc
from tests import certs
from tests.backends.etcd import EtcdServer, etcd_tool
from tests.backends.process import tool
from tests.backends.triton import REPO_ROOT, free_port
from tests.gateway_process import GatewayProcess, triton_backend
from tests.oip import Y_V1, Y_V2, linear_request

DEPLOY = REPO_ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
K8S_ENVOY = DEPLOY / "kubernetes-envoy"  # the Envoy-sidecar overlay of K8S
ENVOY_YAML = DEPLOY / "envoy" / "envoy.yaml"
PROM = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "tensorgate.json"
RUNBOOKS = REPO_ROOT / "docs" / "runbooks.md"
TENSORGATE = Path(sys.executable).parent / "tensorgate"


# --- tools -----------------------------------------------------------------------------------


def system_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: run scripts/system-tools (scripts/test does)")
    return path


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kwargs)


def http_get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as reply:
        return reply.read().decode()


def wait_for(check, timeout: float, what: str, interval: float = 0.2):
    """Poll `check` until it returns something truthy; its last value or error in the failure."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
            last = result
        except Exception as err:  # not up yet: keep polling
            last = err
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


_PRCTL = ctypes.CDLL(None, use_errno=True).prctl  # resolved before fork, not in the child


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when pytest dies, so no Envoy/Prometheus outlives it."""
    _PRCTL(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG


class Process:
    """A server subprocess in its own session with its output in files; stop() always reaps."""

    def __init__(self, cmd: list[str], directory: Path, name: str) -> None:
        self.stdout_path = directory / f"{name}.out"
        self.stderr_path = directory / f"{name}.err"
        self._out = open(self.stdout_path, "wb")
        self._err = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(
            cmd,
            stdout=self._out,
            stderr=self._err,
            start_new_session=True,
            cwd=directory,
            # PDEATHSIG follows the forking thread: only arm it from the main thread.
            preexec_fn=_die_with_parent
            if threading.current_thread() is threading.main_thread()
            else None,
        )

    def output(self) -> str:
        return self.stdout_path.read_text(errors="replace") + self.stderr_path.read_text(
            errors="replace"
        )

    def alive(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"exited {self.proc.returncode}:\n{self.output()[-4000:]}")
        return True

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._out.close()
        self._err.close()
        return self.proc.returncode


# --- PromQL metric names -----------------------------------------------------------------------

PROMQL_WORDS = {
    "and", "or", "unless", "bool", "offset", "inf", "nan", "by", "without", "on", "ignoring",
    "group_left", "group_right",
}  # fmt: skip


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (functions, keywords, labels and literals removed)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", " ", e)  # label matchers (Grafana variables included)
    e = re.sub(r"\[[^\]]*\]", " ", e)  # ranges and subqueries
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\b\d+(\.\d+)?([eE][-+]?\d+)?[a-z]*\b", " ", e)  # numbers, durations
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        if e[match.end() :].lstrip().startswith("("):
            continue  # a function or aggregation
        if match.group() not in PROMQL_WORDS:
            names.add(match.group())
    return names


def exported_names(exposition: str) -> set[str]:
    """Sample names of every metric family in a /metrics page (present even without samples)."""
    names = set()
    for line in exposition.splitlines():
        if not line.startswith("# TYPE "):
            continue
        _, _, name, kind = line.split()
        if kind == "counter":
            base = name.removesuffix("_total")
            names |= {f"{base}_total", f"{base}_created"}
        elif kind in ("histogram", "summary"):
            names |= {f"{name}_bucket", f"{name}_count", f"{name}_sum", f"{name}_created", name}
        else:
            names.add(name)
    return names


def test_promql_metric_names_parser():
    expr = (
        'histogram_quantile(0.99, sum by (model, le) (rate(tensorgate_request_duration_seconds_bucket{job=~"$job", code="OK"}[$__rate_interval]))) > 1e-3\n'
        "and on (model) sum without (instance) (tensorgate_requests_in_flight) / ignoring(code) up offset 5m\n"
        '/ on (model) group_left sum by (model) (rate(tensorgate_requests_total{code=~"A|B"}[1h]))\n'
        "and ignoring (feature) (model:tensorgate_request_errors:burnrate1h > 14.4) or vector(0.999)"
    )
    assert promql_metric_names(expr) == {
        "tensorgate_request_duration_seconds_bucket",
        "tensorgate_requests_in_flight",
        "up",
        "tensorgate_requests_total",
        "model:tensorgate_request_errors:burnrate1h",
    }


# --- shared live processes ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def gateway(triton):
    """A real gateway: route linear -> demo_linear v1 on the session's real Triton."""
    config = {
        "backends": [triton_backend(triton.address)],
        "routes": [
            {
                "model": "linear",
                "variants": [
                    {"name": "stable", "backend": "triton-a", "backend_model": "demo_linear", "backend_version": "1", "version": "1", "weight": 1}
                ],
            }
        ],
        "lifecycle": {"health_check_interval": "1s", "shutdown_grace": "2s"},
        # The Jobs API on: its metrics are exported too (the rules and dashboard read them).
        "jobs": {"embedded": {"path": f"{tempfile.mkdtemp(prefix='tensorgate-jobs-')}/jobs.sqlite3"}},
    }  # fmt: skip
    with GatewayProcess(config) as gw:
        yield gw


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="tensorgate-deploy-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def infer_linear(address: str) -> list[list[float]]:
    client = tc.InferenceServerClient(address)
    try:
        x = tc.InferInput("INPUT0", [1, 4], "FP32")
        x.set_data_from_numpy(np.array([[1, 2, 3, 4]], dtype=np.float32))
        return client.infer("linear", [x]).as_numpy("OUTPUT0").tolist()
    finally:
        client.close()


# --- Kubernetes ---------------------------------------------------------------------------------


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@functools.cache
def kustomization() -> dict:
    return load_yaml(K8S / "kustomization.yaml")


@functools.cache
def rendered_k8s() -> str:
    result = run([tool("kubectl"), "kustomize", str(K8S)])
    assert result.returncode == 0, result.stderr
    return result.stdout


def rendered_objects() -> dict[tuple[str, str], dict]:
    return {
        (doc["kind"], doc["metadata"]["name"]): doc
        for doc in yaml.safe_load_all(rendered_k8s())
        if doc
    }


def manifest(kind: str, name: str = "tensorgate") -> dict:
    return rendered_objects()[(kind, name)]


def configmap_gateway_yaml() -> str:
    (configmap,) = [o for (kind, _), o in rendered_objects().items() if kind == "ConfigMap"]
    return configmap["data"]["gateway.yaml"]


def kubernetes_validate(paths: list[Path]) -> str:
    result = run([tool("kubernetes-validate"), "--strict", *map(str, paths)])
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "WARN" not in output and "ERROR" not in output, output
    return output


def test_every_kubernetes_manifest_validates_strictly():
    resources = kustomization()["resources"]
    listed = {K8S / r for r in resources}
    # Every YAML file here is a listed manifest, or one of the three that are not manifests
    # kubernetes-validate can check: the kustomization itself, the gateway config (it becomes
    # the ConfigMap, validated rendered below) and the optional ServiceMonitor (a CRD: no
    # schema in kubernetes-validate, which only warns; checked structurally below).
    others = {K8S / "kustomization.yaml", K8S / "gateway.yaml", K8S / "servicemonitor.yaml"}
    assert set(K8S.glob("*.yaml")) == listed | others
    output = kubernetes_validate(sorted(listed))
    assert output.count(" passed for resource ") == len(listed), output


def test_kustomize_rendering_validates_and_wires_the_configmap(tmp_path):
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(rendered_k8s())
    objects = rendered_objects()
    output = kubernetes_validate([rendered])
    assert output.count(" passed for resource ") == len(objects)
    assert {kind for kind, _ in objects} == {
        "Namespace", "ServiceAccount", "ConfigMap", "Deployment", "Service",
        "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy",
    }  # fmt: skip
    assert all(
        o["metadata"].get("namespace") == "tensorgate"
        for (k, _), o in objects.items()
        if k != "Namespace"
    )
    (configmap_name,) = [name for kind, name in objects if kind == "ConfigMap"]
    assert re.fullmatch(r"tensorgate-config-[a-z0-9]{10}", configmap_name)  # content hash
    pod = manifest("Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["config"]["configMap"]["name"] == configmap_name
    assert pod["containers"][0]["image"] == "registry.example.com/tensorgate:0.1.0"
    assert configmap_gateway_yaml() == (K8S / "gateway.yaml").read_text()


def test_configmap_gateway_config_passes_check_config(tmp_path):
    config = tmp_path / "gateway.yaml"
    config.write_text(configmap_gateway_yaml())
    # The Secrets it names (tokens, TLS files) exist in the pod only.
    result = run([str(TENSORGATE), "check-config", "--skip-environment", str(config)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout


@functools.cache
def gateway_registry():
    """The registry of a runtime: every metric the gateway exports (each layer registers its
    own on it)."""
    import asyncio

    from gateway.app import Runtime
    from gateway.controlplane.config import from_dict

    config = from_dict(
        {
            "backends": [{"name": "t", "kind": "BACKEND_KIND_TRITON", "address": "127.0.0.1:1"}],
            "routes": [{"model": "m", "variants": [{"name": "a", "backend": "t", "weight": 1}]}],
        }
    )

    async def build():
        from gateway.controlplane.admin.routes import StoreMetrics
        from gateway.jobs.metrics import JobMetrics

        runtime = Runtime(config)
        StoreMetrics(runtime.metrics.registry)  # what `serve` adds: the revision store's gauges
        JobMetrics(runtime.metrics.registry)  # ... and the Jobs API's, with `jobs` configured
        await runtime.close()
        return runtime.metrics.registry

    return asyncio.run(build())


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def test_deployment_matches_the_gateway_config():
    config = yaml.safe_load(configmap_gateway_yaml())
    listeners = {k: host_port(v) for k, v in config["listeners"].items() if k != "xds"}
    # In a pod the listeners bind every interface, explicitly (the gateway's default is loopback),
    # except xDS: only the pod's own Envoy sidecar (deploy/kubernetes-envoy) may read the table.
    assert {host for host, _ in listeners.values()} == {"0.0.0.0"}
    assert host_port(config["listeners"]["xds"])[0] == "127.0.0.1"
    deployment = manifest("Deployment")
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": listeners["data_plane"][1], "metrics": listeners["metrics"][1], "admin": listeners["admin"][1]}  # fmt: skip
    assert container["args"][-1].startswith("/etc/tensorgate/config/")

    # Probes: native gRPC health checks on the data-plane port.
    assert container["readinessProbe"]["grpc"]["port"] == ports["grpc"]
    assert container["livenessProbe"]["grpc"] == {
        "port": ports["grpc"],
        "service": "tensorgate.liveness",
    }

    # Shutdown: preStop sleep, then drain_delay and shutdown_grace, all within the grace period.
    def seconds(duration: str) -> float:
        assert duration.endswith("s")
        return float(duration[:-1])

    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain_delay = seconds(config["lifecycle"]["drain_delay"])
    shutdown_grace = seconds(config["lifecycle"]["shutdown_grace"])
    assert pre_stop > 0 and drain_delay > 0
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain_delay + shutdown_grace

    # Non-root, read-only root filesystem, nothing privileged.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert pod["automountServiceAccountToken"] is False
    for kind in ("requests", "limits"):
        assert set(container["resources"][kind]) == {"cpu", "memory"}

    # The admin tokens file and the etcd client's TLS files are on their Secrets' read-only
    # mounts; the only writable path is /tmp (the etcd store writes nothing to disk).
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}

    def volume_of(path: str) -> dict:
        (name,) = [n for n, m in mounts.items() if path.startswith(m["mountPath"].rstrip("/") + "/") or path == m["mountPath"]]  # fmt: skip
        return volumes[name] | {"readOnly": mounts[name].get("readOnly", False)}

    tokens = volume_of(config["admin"]["tokens_file"])
    assert tokens["secret"]["secretName"] == "tensorgate-admin-tokens"
    assert Path(config["admin"]["tokens_file"]).name in {
        i["path"] for i in tokens["secret"]["items"]
    }
    etcd = config["store"]["etcd"]
    for field, key in (("ca_file", "ca.crt"), ("cert_file", "tls.crt"), ("key_file", "tls.key")):
        assert Path(etcd[field]).name == key, field
        secret = volume_of(etcd[field])
        assert secret["readOnly"] and secret["secret"]["secretName"] == "tensorgate-etcd-client"
    assert "state_dir" not in config["admin"]  # unused with store.etcd
    writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
    assert writable == {"/tmp"} and "emptyDir" in volume_of("/tmp")
    assert volume_of(container["args"][-1])["readOnly"]


def test_services_hpa_pdb_and_network_policy():
    ports = {p["name"]: p for p in manifest("Service")["spec"]["ports"]}
    assert set(ports) == {"grpc", "metrics"}  # no admin port on the data-plane Service
    assert ports["grpc"]["appProtocol"] == "grpc"
    admin = manifest("Service", "tensorgate-admin")["spec"]
    assert admin["type"] == "ClusterIP"
    assert [p["targetPort"] for p in admin["ports"]] == ["admin"]
    assert admin["publishNotReadyAddresses"] is True
    assert "clusterIP" not in admin  # load-balanced: every replica serves the shared table
    pod_labels = manifest("Deployment")["spec"]["template"]["metadata"]["labels"]
    for spec in (manifest("Service")["spec"], admin):
        assert spec["selector"].items() <= pod_labels.items()

    hpa = manifest("HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "tensorgate",
    }
    metrics = {m["type"]: m for m in hpa["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    pods_metric = metrics["Pods"]["pods"]["metric"]["name"]
    assert pods_metric == "tensorgate_requests_in_flight"
    assert pods_metric in {c.name for c in gateway_registry().collect()}

    pdb = manifest("PodDisruptionBudget")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= pod_labels.items()

    policy = manifest("NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress"]
    admin_rules = [r for r in policy["ingress"] if any(p["port"] == "admin" for p in r["ports"])]
    assert len(admin_rules) == 1 and admin_rules[0]["from"]  # restricted to named sources
    # The optional ServiceMonitor (CRD, not schema-validated) scrapes the Service's metrics port.
    monitor = load_yaml(K8S / "servicemonitor.yaml")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= manifest("Service")["metadata"]["labels"].items()  # fmt: skip
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]


class TlsEtcd(EtcdServer):
    """A real etcd on 127.0.0.1 that speaks TLS only and requires client certificates, as
    gateway.yaml's store.etcd expects of a production etcd."""

    def __init__(self, ca_cert: Path, server: tuple[Path, Path], client: tuple[Path, Path]):
        self.tls_flags = [f"--cacert={ca_cert}", f"--cert={client[1]}", f"--key={client[0]}"]
        self._context = ssl.create_default_context(cafile=str(ca_cert))
        self._context.load_cert_chain(str(client[1]), str(client[0]))
        super().__init__(
            extra_args=[
                f"--cert-file={server[1]}", f"--key-file={server[0]}",
                "--client-cert-auth", f"--trusted-ca-file={ca_cert}",
            ]
        )  # fmt: skip

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.client_port}"

    def health(self, timeout: float = 1.0) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=timeout, context=self._context) as reply:  # fmt: skip
                return json.loads(reply.read()).get("health") == "true"
        except (OSError, ValueError):
            return False

    def get(self, key: str) -> str:
        return self.etcdctl(*self.tls_flags, "get", key, "--print-value-only").strip()


def test_configmap_gateway_config_serves_with_its_admin_api(triton, tmp_path):
    """The ConfigMap's config, with only addresses and paths made local: every backend -> the
    test's Triton, listeners -> free loopback ports, store.etcd's endpoint -> a local etcd that
    requires TLS client certificates, tokens and TLS files -> a temp dir. The admin API answers
    over TLS only (its port is on the pod network); the route table lives in etcd, and nothing
    is written to disk."""
    try:
        etcd_tool("etcd"), etcd_tool("etcdctl")
    except FileNotFoundError as err:
        pytest.fail(str(err), pytrace=False)
    config = yaml.safe_load(configmap_gateway_yaml())
    for backend in config["backends"]:
        backend["address"] = triton.address
    admin_port, xds_port, envoy_port = free_port(), free_port(), free_port()
    # GatewayProcess adds the others
    config["listeners"] = {"admin": f"127.0.0.1:{admin_port}", "xds": f"127.0.0.1:{xds_port}"}
    config["envoy"]["listen"] = f"127.0.0.1:{envoy_port}"
    token = "k8s-test-token-0123456789"
    (tmp_path / "tokens.yaml").write_text(yaml.safe_dump([{"name": "ops", "role": "admin", "token": token}]))  # fmt: skip
    config["admin"] |= {"tokens_file": str(tmp_path / "tokens.yaml")}
    ca = certs.make_ca(tmp_path, "ca")
    key, cert = certs.issue(tmp_path, ca, "gateway", server=True)
    config["admin"]["tls"] = {"cert_file": str(cert), "key_file": str(key)}
    etcd_server = certs.issue(tmp_path, ca, "etcd", server=True)
    client_key, client_cert = certs.issue(tmp_path, ca, "tensorgate", server=False)
    config["lifecycle"] |= {"drain_delay": "0s", "shutdown_grace": "2s"}
    store = config["store"]["etcd"]
    head = f"{store['prefix']}/state/head"
    auth = (("authorization", f"Bearer {token}"),)
    with TlsEtcd(ca[1], etcd_server, (client_key, client_cert)) as etcd:
        store |= {"endpoints": [etcd.endpoint], "ca_file": str(ca[1]), "cert_file": str(client_cert), "key_file": str(client_key)}  # fmt: skip
        with GatewayProcess(config, directory=str(tmp_path)) as gw:
            with grpc.insecure_channel(gw.address) as channel:
                stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
                reply = stub.ModelInfer(linear_request(version="1"), timeout=10)
            assert np.frombuffer(reply.raw_output_contents[0], dtype=np.float32).tolist() == Y_V1
            # deploy/kubernetes-envoy's sidecar: its init container's command writes the
            # bootstrap, its container's args run Envoy; a stock call through it is answered.
            envoy = envoy_sidecar(gw.config_path, tmp_path)
            try:
                # unpinned: the ConfigMap's weights are 95/5, so either version may answer
                assert infer_linear(f"127.0.0.1:{envoy_port}") in ([Y_V1], [Y_V2])
            finally:
                assert envoy.stop() == 0, envoy.output()[-4000:]
            with grpc.insecure_channel(gw.admin_address) as channel:
                with pytest.raises(grpc.RpcError):  # plaintext is not spoken there
                    admin_pb2_grpc.AdminServiceStub(channel).GetRouteTable(
                        admin_pb2.GetRouteTableRequest(), timeout=5
                    )
            tls = grpc.ssl_channel_credentials(root_certificates=ca[1].read_bytes())
            with grpc.secure_channel(gw.admin_address, tls) as channel:
                admin = admin_pb2_grpc.AdminServiceStub(channel)
                table = admin.GetRouteTable(
                    admin_pb2.GetRouteTableRequest(), metadata=auth, timeout=10
                )
                # The empty prefix was seeded with the ConfigMap's routes as revision 1 ...
                assert [r.model for r in table.routes] == ["linear"]
                assert table.revision.number == 1 and etcd.get(head) == "1"
                # ... and a change is a compare-and-swap in etcd.
                weights = {"stable": 100, "canary": 0, "backup": 0}
                changed = admin.SetVariantWeights(
                    admin_pb2.SetVariantWeightsRequest(model="linear", weights=weights, expected_revision=1),
                    metadata=auth,
                    timeout=10,
                )  # fmt: skip
                assert changed.revision.number == 2 and etcd.get(head) == "2"
        assert gw.proc.returncode == 0, gw.log()
    assert not (tmp_path / ".tensorgate-state").exists()  # admin.state_dir's default: unused


@functools.cache
def rendered_envoy_overlay() -> str:
    result = run([tool("kubectl"), "kustomize", str(K8S_ENVOY)])
    assert result.returncode == 0, result.stderr
    return result.stdout


def envoy_overlay_pod() -> dict:
    for doc in yaml.safe_load_all(rendered_envoy_overlay()):
        if doc and doc["kind"] == "Deployment":
            return doc["spec"]["template"]["spec"]
    raise AssertionError("no Deployment in deploy/kubernetes-envoy")


def envoy_sidecar(config_path: Path, directory: Path) -> Process:
    """The overlay's init container (its args, paths made local) then its Envoy container (its
    args), against the gateway serving `config_path`; returns once Envoy's listener is up."""
    pod = envoy_overlay_pod()
    (init,) = pod["initContainers"]
    envoy = next(c for c in pod["containers"] if c["name"] == "envoy")
    bootstrap = directory / "envoy.json"
    local = {
        "/etc/tensorgate/config/gateway.yaml": str(config_path),
        "/etc/envoy/envoy.json": str(bootstrap),
        "$(POD_NAME)": "tensorgate-0",
        "127.0.0.1:9901": f"127.0.0.1:{free_port()}",
    }

    def localized(args: list[str]) -> list[str]:
        out = []
        for arg in args:
            for pod_value, here in local.items():
                arg = arg.replace(pod_value, here)
            out.append(arg)
        return out

    written = run([str(TENSORGATE), *localized(init["args"])])
    assert written.returncode == 0, written.stdout + written.stderr
    admin = json.loads(bootstrap.read_text())["admin"]["address"]["socketAddress"]
    process = Process([tool("envoy"), *localized(envoy["args"]), "--base-id", "61"], directory, "sidecar")  # fmt: skip
    url = f"http://127.0.0.1:{admin['portValue']}/listeners"
    wait_for(lambda: process.alive() and "tensorgate" in http_get(url), 20, "sidecar listener")
    return process


def test_envoy_overlay_renders_validates_and_matches_the_config(tmp_path):
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(rendered_envoy_overlay())
    objects = {
        (doc["kind"], doc["metadata"]["name"]): doc
        for doc in yaml.safe_load_all(rendered.read_text())
        if doc
    }
    output = kubernetes_validate([rendered])
    assert output.count(" passed for resource ") == len(objects)
    assert {k for k, _ in objects} == {k for k, _ in rendered_objects()}  # the base, patched
    pod = envoy_overlay_pod()
    (init,) = pod["initContainers"]
    containers = {c["name"]: c for c in pod["containers"]}
    assert set(containers) == {"gateway", "envoy"}
    # The init container runs the gateway's image (kept equal to the base's by hand).
    assert init["image"] == containers["gateway"]["image"] == manifest("Deployment")["spec"][
        "template"]["spec"]["containers"][0]["image"]  # fmt: skip
    config = yaml.safe_load(configmap_gateway_yaml())
    envoy_port = {p["name"]: p["containerPort"] for p in containers["envoy"]["ports"]}["envoy"]
    assert host_port(config["envoy"]["listen"]) == ("0.0.0.0", envoy_port)
    # The bootstrap Envoy reads is the one the init container writes, in a shared volume.
    output_arg = next(a for a in init["args"] if a.startswith("--output="))
    envoy_args = containers["envoy"]["args"]
    assert envoy_args[envoy_args.index("-c") + 1] == output_arg.split("=", 1)[1]
    # Callers reach Envoy: the Service's grpc port and the NetworkPolicy's first rule.
    service = objects[("Service", "tensorgate")]
    assert {p["name"]: p["targetPort"] for p in service["spec"]["ports"]}["grpc"] == "envoy"
    policy = objects[("NetworkPolicy", "tensorgate")]
    assert {"port": "envoy", "protocol": "TCP"} in policy["spec"]["ingress"][0]["ports"]


# --- Envoy ---------------------------------------------------------------------------------------


def test_envoy_config_validates():
    result = run(
        [tool("envoy"), "--mode", "validate", "-c", str(ENVOY_YAML), "--log-level", "warn"]
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout


def render_envoy(listen_port: int, gateway_port: int, admin_port: int) -> dict:
    """deploy/envoy/envoy.yaml with only its three loopback ports replaced."""
    config = load_yaml(ENVOY_YAML)
    admin = config["admin"]["address"]["socket_address"]
    (listener,) = config["static_resources"]["listeners"]
    (cluster,) = config["static_resources"]["clusters"]
    (locality,) = cluster["load_assignment"]["endpoints"]
    (endpoint,) = locality["lb_endpoints"]
    upstream = endpoint["endpoint"]["address"]["socket_address"]
    sockets = [admin, listener["address"]["socket_address"], upstream]
    assert {s["address"] for s in sockets} == {"127.0.0.1"}  # loopback as shipped
    for socket, port in zip(sockets, (admin_port, listen_port, gateway_port), strict=True):
        socket["port_value"] = port
    return config


class EnvoyProcess(Process):
    """A real Envoy running deploy/envoy/envoy.yaml with free loopback ports."""

    def __init__(self, gateway_port: int, workdir: Path) -> None:
        self.port, self.admin_port = free_port(), free_port()
        self.gateway_port = gateway_port
        config_path = workdir / "envoy.yaml"
        config_path.write_text(yaml.safe_dump(render_envoy(self.port, gateway_port, self.admin_port)))  # fmt: skip
        super().__init__(
            [tool("envoy"), "-c", str(config_path), "--disable-hot-restart", "--concurrency", "1", "--log-level", "warn"],
            workdir,
            "envoy",
        )  # fmt: skip
        self.address = f"127.0.0.1:{self.port}"
        admin = f"http://127.0.0.1:{self.admin_port}"
        wait_for(lambda: self.alive() and http_get(f"{admin}/ready").strip() == "LIVE", 20, "Envoy ready")  # fmt: skip

    def stats(self) -> dict[str, str]:
        prefix = "cluster.tensorgate."
        text = http_get(f"http://127.0.0.1:{self.admin_port}/stats?filter=^{re.escape(prefix)}")
        return {
            k.removeprefix(prefix): v
            for k, v in (line.split(": ", 1) for line in text.splitlines() if ": " in line)
        }

    def access_log(self) -> list[dict]:
        """The JSON access log lines (Envoy flushes them at exit at the latest)."""
        lines = self.stdout_path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]


def test_envoy_in_front_of_gateway_and_triton(gateway, workdir):
    envoy = EnvoyProcess(host_port(gateway.address)[1], workdir)
    try:
        # The active grpc.health.v1 check reached the gateway and marked it healthy.
        def health_checked() -> dict[str, str] | None:
            stats = envoy.stats()
            ok = int(stats["health_check.success"]) >= 1
            return stats if ok and stats["membership_healthy"] == "1" else None

        stats = wait_for(health_checked, 15, "a successful health check")
        assert stats["health_check.failure"] == "0"

        # Stock tritonclient through Envoy: the exact answer of demo_linear v1.
        assert infer_linear(envoy.address) == [Y_V1]
        with grpc.insecure_channel(envoy.address) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            reply, call = stub.ModelInfer.with_call(linear_request(), timeout=10)
            assert reply.model_name == "linear"
            assert ("x-tensorgate-variant", "stable") in call.trailing_metadata()
            # The admin API is not routed through Envoy.
            admin = admin_pb2_grpc.AdminServiceStub(channel)
            with pytest.raises(grpc.RpcError) as err:
                admin.GetRouteTable(admin_pb2.GetRouteTableRequest(), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED

        stats = envoy.stats()
        assert int(stats["upstream_rq_completed"]) >= 2
        assert stats["upstream_rq_retry"] == "0"
    finally:
        code = envoy.stop()
    assert code == 0, envoy.output()[-4000:]
    logs = envoy.access_log()
    infers = [e for e in logs if e["method"] == "/inference.GRPCInferenceService/ModelInfer"]
    assert len(infers) == 2, logs
    assert all(e["grpc_status"] == "OK" and e["variant"] == "stable" for e in infers), infers
    assert {e["upstream"] for e in infers} == {f"127.0.0.1:{envoy.gateway_port}"}
    admin_calls = [e for e in logs if e["method"].startswith("/tensorgate.admin.")]
    assert [(e["grpc_status"], e["flags"], e["upstream"]) for e in admin_calls] == [
        ("Unimplemented", "NR", None)
    ]  # no route


def test_envoy_retries_unavailable_once_and_caller_errors_never(workdir):
    """Envoy ignores unknown retry_on words silently, so check the policy's behaviour: a gateway
    whose only backend is down answers UNAVAILABLE (its own retries off), Envoy retries once;
    NOT_FOUND is not retried."""
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    config = {
        "backends": [triton_backend(dead, "dead")],
        "routes": [{"model": "linear", "variants": [{"name": "only", "backend": "dead", "weight": 1}]}],
        "defaults": {"route_policy": {"retry": {"max_attempts": 1}}},
        "lifecycle": {"shutdown_grace": "1s"},
    }  # fmt: skip
    (workdir / "gateway").mkdir()
    gw = GatewayProcess(config, directory=str(workdir / "gateway")).start(wait="live")
    envoy = None
    try:
        # Ready although its backend is down (readiness is the gateway's own, lifecycle.readiness
        # default): Envoy's only host is healthy and the gateway's own answer comes back.
        envoy = EnvoyProcess(host_port(gw.address)[1], workdir)
        wait_for(
            lambda: (
                int((stats := envoy.stats())["health_check.success"]) >= 1
                and stats["membership_healthy"] == "1"
            ),
            15,
            "a successful health check",
        )
        with grpc.insecure_channel(envoy.address) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer(linear_request(), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert envoy.stats()["upstream_rq_retry"] == "1"
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer(linear_request("no-such-model"), timeout=10)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            assert envoy.stats()["upstream_rq_retry"] == "1"
        # Both tries of the first call reached the gateway.
        counted = [
            (re.search(r'code="(\w+)"', line).group(1), line.rsplit(" ", 1)[1])
            for line in http_get(gw.metrics_url).splitlines()
            if line.startswith("tensorgate_requests_total{") and 'model="linear"' in line
        ]
        assert counted == [("UNAVAILABLE", "2.0")]
    finally:
        code = envoy.stop() if envoy else 0
        gw.stop()
    assert code == 0, envoy.output()[-4000:]
    attempts = [(e["grpc_status"], e["attempts"]) for e in envoy.access_log() if "ModelInfer" in e["method"]]  # fmt: skip
    assert attempts == [("Unavailable", 2), ("NotFound", 1)]


# --- Prometheus ----------------------------------------------------------------------------------


RULE_FILES = ("recording.yaml", "alerts.yaml", "envoy.yaml")
ALERT_FILES = ("alerts.yaml", "envoy.yaml")  # envoy.yaml: Envoy mode's rules and their alerts


def unit_test_files() -> list[Path]:
    """promtool unit tests: alerts_test.yaml, slo_test.yaml (multi-hour SLO windows), envoy_test.yaml."""
    return sorted(PROM.glob("*_test.yaml"))


def test_promtool_checks_rules_config_and_unit_tests():
    promtool = system_tool("promtool")
    for name in RULE_FILES:
        result = run([promtool, "check", "rules", str(PROM / name)])
        assert result.returncode == 0, result.stdout + result.stderr
    result = run([promtool, "check", "config", str(PROM / "prometheus.yaml")])
    assert result.returncode == 0, result.stdout + result.stderr
    shipped = {"alerts_test.yaml", "slo_test.yaml", "envoy_test.yaml"}
    assert {p.name for p in unit_test_files()} >= shipped
    for path in unit_test_files():
        result = run([promtool, "test", "rules", str(path)])
        assert result.returncode == 0, result.stdout + result.stderr
        assert "SUCCESS" in result.stdout


def rules(path: Path, kind: str) -> list[dict]:
    return [r for g in load_yaml(path)["groups"] for r in g["rules"] if kind in r]


def unit_tests() -> list[dict]:
    return [t for path in unit_test_files() for t in load_yaml(path)["tests"]]


def test_every_alert_is_unit_tested_both_ways_and_has_a_runbook():
    alerts = [a for name in ALERT_FILES for a in rules(PROM / name, "alert")]
    assert rules(PROM / "envoy.yaml", "alert"), "Envoy mode's series have no alert"
    names = [a["alert"] for a in alerts]
    assert len(names) == len(set(names))
    cases = [case for t in unit_tests() for case in t.get("alert_rule_test", [])]
    firing = {c["alertname"] for c in cases if c.get("exp_alerts")}
    silent = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    assert firing == set(names) and silent == set(names)

    headings = re.findall(r"^#{2,3} (.+)$", RUNBOOKS.read_text(), re.M)
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in headings}
    for alert in alerts:
        url = alert["annotations"]["runbook_url"]
        page, _, anchor = url.partition("#")
        assert page.endswith("/docs/runbooks.md") and anchor == alert["alert"].lower(), url
        assert anchor in anchors, f"{alert['alert']}: no section #{anchor} in docs/runbooks.md"
        assert alert["labels"]["severity"] in {"critical", "warning", "info"}
    # ... and no runbook section for an alert that does not exist.
    assert {h for h in headings if h.startswith("Tensorgate")} == set(names)


def test_every_recording_rule_is_evaluated_in_a_unit_test():
    """Each recorded name is queried by some promql_expr_test: by name, or by a
    {__name__=~"..."} selector (one expression for a rule's every window)."""
    exprs = [case["expr"] for t in unit_tests() for case in t.get("promql_expr_test", [])]
    patterns = [re.compile(p) for e in exprs for p in re.findall(r'__name__=~"([^"]+)"', e)]
    named = set().union(*(promql_metric_names(e) for e in exprs))
    for path in (PROM / f for f in RULE_FILES):
        for rule in rules(path, "record"):
            name = rule["record"]
            assert name in named or any(p.fullmatch(name) for p in patterns), f"{path.name}: {name}"


@functools.cache
def gateway_metric_names() -> set[str]:
    """What the gateway exports, from its own registry (the live test compares with /metrics)."""
    import prometheus_client

    return exported_names(prometheus_client.generate_latest(gateway_registry()).decode())


# Series no gateway exports that rules and dashboards may read:
# - `up`: Prometheus's own, one per scrape target (TensorgateDown).
PROMETHEUS_OWN = {"up"}


def envoy_recorded() -> set[str]:
    """The series envoy.yaml records: what its alerts and the dashboard's Envoy row read."""
    return {r["record"] for r in rules(PROM / "envoy.yaml", "record")}


def envoy_statistics() -> set[str]:
    """Envoy's statistics that envoy.yaml's rules read (Envoy mode records them as the gateway's
    series). tests/test_envoy_dataplane.py checks each against a live Envoy's /stats/prometheus."""
    exprs = [r["expr"] for r in rules(PROM / "envoy.yaml", "record")]
    names = set().union(*map(promql_metric_names, exprs))
    assert names and all(n.startswith("envoy_") for n in names), names
    return names


def test_rules_and_dashboard_use_only_exported_metrics(gateway):
    """Every metric name in every rule and every dashboard query is one a real gateway (with a
    real Triton behind it) exports on /metrics, the name of a recording rule of deploy/prometheus,
    Prometheus's own `up`, or an Envoy statistic the Envoy-mode rules read."""
    infer_linear(gateway.address)  # labelled families with samples too, not only their TYPE lines
    exported = exported_names(http_get(gateway.metrics_url))
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes", "tensorgate_requests_total",
            "tensorgate_request_duration_seconds_bucket", "tensorgate_variant_weight"} <= exported  # fmt: skip
    recorded = {r["record"] for r in rules(PROM / "recording.yaml", "record")}
    assert not recorded & exported  # a recording rule never shadows an exported series
    for path in (PROM / "recording.yaml", PROM / "alerts.yaml"):
        for rule in rules(path, "expr"):
            unknown = promql_metric_names(rule["expr"]) - exported - recorded - PROMETHEUS_OWN
            assert not unknown, f"{path.name}: {rule.get('alert') or rule.get('record')}: {unknown}"
    # Envoy mode records the gateway's own series (or recording-rule names) from Envoy's.
    for rule in rules(PROM / "envoy.yaml", "record"):
        assert rule["record"] in exported or rule["record"].count(":") == 2, rule["record"]
    envoy = envoy_statistics() | envoy_recorded()
    for path in sorted(DASHBOARD.parent.glob("*.json")):
        for expr in dashboard_queries(path):
            unknown = promql_metric_names(expr) - exported - recorded - PROMETHEUS_OWN - envoy
            assert not unknown, f"{path.name}: {expr}: {unknown}"


def render_prometheus(target: str) -> dict:
    """deploy/prometheus/prometheus.yaml with the live target, absolute rule paths and 1s
    intervals; everything else as shipped."""
    config = load_yaml(PROM / "prometheus.yaml")
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(PROM / f) for f in config["rule_files"]]
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "tensorgate"
    job["static_configs"] = [{"targets": [target]}]
    return config


class PromAPI:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path: str, **params) -> dict:
        url = f"{self.base}{path}?{urllib.parse.urlencode(params)}" if params else self.base + path
        reply = json.loads(http_get(url))
        assert reply["status"] == "success", reply
        return reply["data"]

    def query(self, expr: str) -> list[dict]:
        data = self.get("/api/v1/query", query=expr)
        assert data["resultType"] == "vector", data
        return data["result"]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None


def dashboard(path: Path = DASHBOARD) -> dict:
    return json.loads(path.read_text())


def dashboard_queries(path: Path = DASHBOARD) -> list[str]:
    board = dashboard(path)
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            match = re.fullmatch(r"label_values\((.+),\s*\w+\)", var["query"]["query"])
            assert match, var
            exprs.append(match.group(1))
    return exprs


def grafana_to_promql(expr: str) -> str:
    """Grafana's variables as Grafana would expand them for 'All' on this Prometheus."""
    return (
        expr.replace("$__rate_interval", "30s")
        .replace('"$job"', '"tensorgate"')
        .replace('"$model"', '".*"')
        .replace('"$backend"', '".*"')
    )


def test_envoy_alerts_and_dashboard_row_read_only_envoy_yaml_series():
    """Envoy mode's alerts and dashboard row read what envoy.yaml records (so loading envoy.yaml
    alone gives both), and the row plots every series an alert reads."""
    recorded = envoy_recorded()
    alerted = set()
    for alert in rules(PROM / "envoy.yaml", "alert"):
        names = promql_metric_names(alert["expr"])
        assert names and names <= recorded, f"{alert['alert']}: {names - recorded}"
        alerted |= names
    row = envoy_row()
    assert row, "no Envoy mode row on the dashboard"
    exprs = [t["expr"] for p in row for t in p["targets"]]
    read = set().union(*map(promql_metric_names, exprs))
    assert read <= recorded, read - recorded
    assert alerted | {"model:tensorgate_envoy_try_duration_seconds:p99_5m"} <= read
    # Its error ratio and latency panels carry the alerts' thresholds.
    thresholds = {
        step["value"]
        for p in row
        for step in p["fieldConfig"]["defaults"].get("thresholds", {}).get("steps", [])
    }
    assert {0.05, 1} <= thresholds


def envoy_row() -> list[dict]:
    """The panels of the dashboard's "Envoy mode" row: those below its header, to the next row."""
    panels = sorted(dashboard()["panels"], key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"]))
    inside, found = False, []
    for p in panels:
        if p["type"] == "row":
            inside = p["title"] == "Envoy mode"
        elif inside:
            found.append(p)
    return found


def test_prometheus_scrapes_gateway_and_evaluates_rules(gateway, workdir):
    port = free_port()
    metrics_target = gateway.metrics_url.removeprefix("http://").removesuffix("/metrics")
    config_path = workdir / "prometheus.yaml"
    config_path.write_text(yaml.safe_dump(render_prometheus(metrics_target)))
    prometheus = Process(
        [
            system_tool("prometheus"),
            f"--config.file={config_path}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        workdir,
        "prometheus",
    )
    api = PromAPI(port)
    try:
        wait_for(
            lambda: prometheus.alive() and http_get(f"{api.base}/-/ready"), 30, "Prometheus ready"
        )
        wait_for(lambda: api.value('up{job="tensorgate"}') == 1, 15, "a successful scrape")
        # Calls spread over a few scrapes, so rates and quantiles have something to work on.
        with grpc.insecure_channel(gateway.address) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            for _ in range(30):
                stub.ModelInfer(linear_request(), timeout=10)
                time.sleep(0.1)

        # Prometheus holds exactly what the gateway counts (no other traffic meanwhile).
        def counted_by_gateway() -> float:
            for line in http_get(gateway.metrics_url).splitlines():
                if line.startswith("tensorgate_requests_total{") and 'model="linear"' in line and 'code="OK"' in line:  # fmt: skip
                    return float(line.rsplit(" ", 1)[1])
            raise AssertionError("no tensorgate_requests_total for linear")

        expected = counted_by_gateway()
        assert expected >= 30
        query = 'sum(tensorgate_requests_total{job="tensorgate", model="linear", code="OK"})'
        wait_for(lambda: api.value(query) == expected, 15, f"{query} == {expected}")

        # Recording rules evaluate on the live series.
        rate = wait_for(lambda: api.value('model:tensorgate_requests:rate5m{model="linear"}'), 15, "rate recording rule")  # fmt: skip
        assert rate > 0
        p99 = wait_for(
            lambda: api.value('model_variant:tensorgate_request_duration_seconds:p99_5m{model="linear", variant="stable"}'),
            15,
            "p99 recording rule",
        )  # fmt: skip
        assert math.isfinite(p99) and 0 < p99 < 1.0
        assert api.value('model:tensorgate_request_errors:ratio_rate5m{model="linear"}') == 0

        # Every rule loaded and evaluates without error against real data.
        def evaluated_groups() -> list[dict] | None:
            groups = api.get("/api/v1/rules")["groups"]
            rules_ = [r for g in groups for r in g["rules"]]
            evaluated = all(not r["lastEvaluation"].startswith("0001") for r in rules_)
            return groups if rules_ and evaluated else None

        groups = wait_for(evaluated_groups, 15, "every rule evaluated")
        by_type = {"recording": 0, "alerting": 0}
        for rule in (r for g in groups for r in g["rules"]):
            assert rule["health"] == "ok", rule
            by_type[rule["type"]] += 1
        assert by_type == {
            "recording": len(rules(PROM / "recording.yaml", "record")),
            "alerting": len(rules(PROM / "alerts.yaml", "alert")),
        }
        # A healthy gateway raises nothing, not even a pending alert.
        assert api.query("ALERTS") == []

        # The live /metrics page exports the same names as the registry the static checks use.
        assert exported_names(http_get(gateway.metrics_url)) == gateway_metric_names()

        # Every Grafana query is valid PromQL here; the core panels have data.
        for expr in dashboard_queries():
            api.query(grafana_to_promql(expr))
        for needle in (
            "tensorgate_requests_total", "tensorgate_request_duration_seconds_bucket",
            "tensorgate_backend_up", "tensorgate_breaker_state", "tensorgate_ready",
            "tensorgate_variant_weight", "process_cpu_seconds_total", "process_resident_memory_bytes",
            "tensorgate_request_errors:burnrate", "tensorgate_slow_ok_requests:burnrate",
        ):  # fmt: skip
            panel_exprs = [e for e in dashboard_queries() if needle in e]
            assert panel_exprs, needle
            for expr in panel_exprs:
                assert api.query(grafana_to_promql(expr)), expr
    finally:
        code = prometheus.stop()
    assert code == 0, prometheus.output()[-4000:]


# --- Grafana -------------------------------------------------------------------------------------


def test_grafana_dashboard_is_valid_and_uses_a_datasource_variable():
    board = dashboard()
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for p in board["panels"]:
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}" and t["expr"].strip()
        grid = p["gridPos"]
        assert grid["x"] + grid["w"] <= 24
    # No panel hides part of another.
    cells: dict[tuple[int, int], str] = {}
    for p in board["panels"]:
        g = p["gridPos"]
        for y in range(g["y"], g["y"] + g["h"]):
            for x in range(g["x"], g["x"] + g["w"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]
    # What the operators asked for is on it.
    exprs = " ".join(dashboard_queries())
    for metric in (
        "tensorgate_requests_total", "tensorgate_request_duration_seconds_bucket",
        "tensorgate_requests_in_flight", "tensorgate_breaker_state", "tensorgate_backend_up",
        "tensorgate_fallbacks_total", "tensorgate_retries_total", "tensorgate_shadow_max_abs_diff_bucket",
        "tensorgate_shadow_argmax_total", "tensorgate_bulkhead_rejections_total",
        # SLOs, canaries and rollouts, drift, processes, the revision store
        "model:tensorgate_request_errors:burnrate1h", "model:tensorgate_slow_ok_requests:burnrate1h",
        "tensorgate_variant_weight", "tensorgate_rollout_state", "tensorgate_rollout_percent",
        "tensorgate_rollout_step", "tensorgate_drift_psi", "tensorgate_drift_ks",
        "process_cpu_seconds_total", "process_resident_memory_bytes", "tensorgate_store_up",
        "tensorgate_route_revision",
    ):  # fmt: skip
        assert metric in exprs, metric
    # Latency per variant (canary vs stable) is over OK calls only.
    assert re.search(r'histogram_quantile\(0\.99, sum by \(model, variant, le\) \(rate\(tensorgate_request_duration_seconds_bucket\{[^}]*code="OK"', exprs)  # fmt: skip
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}" in exprs or f"histogram_quantile({q}0" in exprs


def test_docs_name_no_path_of_the_machine_they_were_written_on():
    import re

    root = Path(__file__).resolve().parent.parent
    pattern = re.compile(r"(?<![\w.])/(work|root|home|Users)/")
    found = []
    for doc in [root / "README.md", *sorted((root / "docs").glob("*.md")),
                *sorted((root / "bench").glob("*.md"))]:  # fmt: skip
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            if pattern.search(line):
                found.append(f"{doc.name}:{number}: {line.strip()[:80]}")
    assert not found, found
