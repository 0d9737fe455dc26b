"""The container image, built and run for real (docs/image.md).

scripts/build-image builds the Dockerfile with buildah (chroot isolation) on a base it builds from
Debian 12 packages (no image registry is reachable here), cached in ~/.cache/tensorgate/image: the
first build on a fresh machine takes 1.5-2 min, later ones seconds. podman then runs the image
as a pod would: its own ENTRYPOINT and CMD, root filesystem read-only, UID/GID 10001, every
capability dropped, no_new_privs, a tmpfs on /tmp, the demo config (deploy/demo/gateway.yaml,
ports and the backend pointed at the session's real Triton) mounted at the ConfigMap's path, on the
host network. tritonclient and grpcurl call it; the image size, the build time and the time from
`podman run` to SERVING are printed.

podman runs with runc and explicit --ulimit values: its defaults (crun; nofile 1048576, nproc
4194304) fail on this project's machines, see docs/image.md. Nothing is skipped: a missing tool
fails (scripts/system-tools installs them).
"""

from __future__ import annotations

import base64
import json
import re
import resource
import shutil
import subprocess
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.backends.process import tool
from tests.backends.triton import REPO_ROOT, free_port
from tests.oip import Y_V1, Y_V2, X

# A first build on a fresh machine (base from Debian packages, every wheel from PyPI) takes
# 1.5-2 min here; the default 300 s per test would be too tight on a slow mirror.
pytestmark = pytest.mark.timeout(900)

BUILD_IMAGE = REPO_ROOT / "scripts" / "build-image"
DEMO_CONFIG = REPO_ROOT / "deploy" / "demo" / "gateway.yaml"
CONFIG_PATH = "/etc/tensorgate/config/gateway.yaml"  # the ConfigMap's mount in deployment.yaml
# podman keeps its own RLIMIT_NPROC at 32768 here, so a container cannot be given more.
NPROC = 32768


@dataclass
class Image:
    id: str
    storage: list[str]  # --root/--runroot of the image store, for buildah and podman
    build_seconds: float
    steps_run: int  # buildah steps run rather than taken from the cache
    steps: int
    base_built: bool
    size: int  # bytes, uncompressed

    def podman(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["podman", *self.storage, "--runtime", "runc", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def ulimits() -> list[str]:
    """This process's own limits: without CAP_SYS_RESOURCE (not in this VM's bounding set) a
    container cannot get more than its parent has."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    _, nproc = resource.getrlimit(resource.RLIMIT_NPROC)
    nproc = NPROC if nproc == resource.RLIM_INFINITY else min(nproc, NPROC)
    return ["--ulimit", f"nofile={soft}:{hard}", "--ulimit", f"nproc={nproc}:{nproc}"]


@pytest.fixture(scope="module")
def image() -> Image:
    missing = [t for t in ("buildah", "podman", "runc", "mmdebstrap") if shutil.which(t) is None]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} missing: scripts/system-tools installs them", pytrace=False
        )
    started = time.monotonic()
    built = subprocess.run(
        [str(BUILD_IMAGE)], capture_output=True, text=True, timeout=840, cwd=REPO_ROOT
    )
    seconds = time.monotonic() - started
    assert built.returncode == 0, f"scripts/build-image failed:\n{built.stderr[-6000:]}"
    image_id = built.stdout.split()[-1]
    assert re.fullmatch(r"[0-9a-f]{64}", image_id), built.stdout
    # buildah's log: "STEP n/m: ..." per step, then "Using cache <id>" when a step was cached.
    # (FROM steps never are.) Two builds: the builder stage alone, then the image.
    steps = re.split(r"^\[?[\d/]*\]? ?STEP \d+/\d+: ", built.stderr, flags=re.M)[1:]
    steps = [step for step in steps if not step.startswith("FROM ")]
    storage = subprocess.run(
        [str(BUILD_IMAGE), "--storage-flags"], capture_output=True, text=True, check=True
    ).stdout.split()
    base_built = "building the base" in built.stderr
    image = Image(image_id, storage, seconds, 0, len(steps), base_built, 0)
    image.steps_run = sum("Using cache" not in step for step in steps)
    inspected = image.podman("image", "inspect", "--format", "{{.Size}}", image_id)
    assert inspected.returncode == 0, inspected.stderr
    image.size = int(inspected.stdout)
    return image


def test_image_is_configured_as_the_pod_runs_it(image):
    inspected = image.podman("image", "inspect", image.id)
    assert inspected.returncode == 0, inspected.stderr
    (meta,) = json.loads(inspected.stdout)
    config = meta["Config"]
    deployment = yaml.safe_load(
        (REPO_ROOT / "deploy" / "kubernetes" / "deployment.yaml").read_text()
    )
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == container["command"] == ["tensorgate"]
    assert config["Cmd"] == container["args"] == ["serve", "--config", CONFIG_PATH]
    assert config["WorkingDir"] == "/tmp"
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["HOME"] == "/tmp" and env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["PATH"].startswith("/opt/venv/bin:")
    assert set(config["ExposedPorts"]) == {"8001/tcp", "8002/tcp", "9464/tcp"}
    # What is inside, run as the image's user on a read-only root: Python 3.11 (the suite's
    # version), the gateway, no pip or test tools in the venv, the standard library compiled.
    # (A .pyc's flags word 1: hash-based, source never checked, as the Dockerfile compiles it.)
    code = (
        "import sys, os, sysconfig, importlib.util\n"
        "print(sys.version_info[:2] == (3, 11), os.getuid(), os.getgid())\n"
        "print(all(importlib.util.find_spec(m) is None for m in ('pip', 'pytest', 'grpc_tools')))\n"
        "pyc = importlib.util.cache_from_source(os.path.join(sysconfig.get_path('stdlib'), 'selectors.py'))\n"
        "print(int.from_bytes(open(pyc, 'rb').read()[4:8], 'little') == 1)\n"
        "print(sys.prefix)\n"
    )
    ran = image.podman("run", "--rm", "--read-only", "--network", "none", *ulimits(),
                       "--entrypoint", "python", image.id, "-c", code)  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.split() == ["True", "10001", "10001", "True", "True", "/opt/venv"], ran.stdout
    version = image.podman("run", "--rm", "--read-only", "--network", "none", *ulimits(),
                           image.id, "--version")  # fmt: skip
    assert version.returncode == 0 and version.stdout.strip() == "tensorgate 0.1.0", version


def demo_config(triton_address: str, port: int, metrics_port: int) -> dict:
    config = yaml.safe_load(DEMO_CONFIG.read_text())
    config["listeners"]["data_plane"] = f"127.0.0.1:{port}"
    config["listeners"]["metrics"] = f"127.0.0.1:{metrics_port}"
    for backend in config["backends"]:
        backend["address"] = triton_address
    return config


def serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=0.5
            )
        except grpc.RpcError:
            return False
    return answer.status == health_pb2.HealthCheckResponse.SERVING


def grpcurl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([tool("grpcurl"), *args], capture_output=True, text=True, timeout=30)


def test_image_serves_the_demo_read_only_as_uid_10001(image, triton, tmp_path, capsys):
    port, metrics_port = free_port(), free_port()
    address = f"127.0.0.1:{port}"
    config = tmp_path / "gateway.yaml"
    config.write_text(
        yaml.safe_dump(demo_config(triton.address, port, metrics_port), sort_keys=False)
    )
    config.chmod(0o644)  # a ConfigMap file: readable by UID 10001, not writable
    name = f"tensorgate-test-{uuid.uuid4().hex[:8]}"
    log_path = tmp_path / "container.log"
    command = [
        "podman", *image.storage, "--runtime", "runc", "run", "--rm", "--name", name,
        "--read-only", "--tmpfs", "/tmp:rw,size=32m,mode=1777", "--user", "10001:10001",
        "--cap-drop", "all", "--security-opt", "no-new-privileges", "--network", "host",
        *ulimits(), "--volume", f"{config}:{CONFIG_PATH}:ro", image.id,
    ]  # fmt: skip
    log = open(log_path, "wb")
    started = time.monotonic()
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    def container_log() -> str:
        return log_path.read_text(errors="replace")

    try:
        deadline = started + 60
        while not serving(address):
            assert proc.poll() is None, f"container exited {proc.returncode}:\n{container_log()}"
            assert time.monotonic() < deadline, f"not SERVING in 60 s:\n{container_log()}"
            time.sleep(0.05)
        start_seconds = time.monotonic() - started

        # The process is the pod's: UID/GID 10001, no capabilities, no_new_privs, root read-only,
        # the host's network namespace.
        pid = image.podman("inspect", "--format", "{{.State.Pid}}", name).stdout.strip()
        status = Path(f"/proc/{pid}/status").read_text()
        assert re.search(r"^Uid:\s+10001\s+10001\s+10001\s+10001$", status, re.M), status
        assert re.search(r"^Gid:\s+10001\s+10001\s+10001\s+10001$", status, re.M), status
        assert re.search(r"^CapEff:\s+0+$", status, re.M) and re.search(
            r"^CapBnd:\s+0+$", status, re.M
        )
        assert re.search(r"^NoNewPrivs:\s+1$", status, re.M), status
        assert re.search(r"^Seccomp:\s+2$", status, re.M), status  # podman's default profile
        # A container, not a chroot: its own mount and PID namespaces (the host's network).
        for ns in ("mnt", "pid"):
            assert Path(f"/proc/{pid}/ns/{ns}").readlink() != Path(f"/proc/self/ns/{ns}").readlink()
        mounts = {
            line.split()[4]: line.split()
            for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
        }
        assert "ro" in mounts["/"][5].split(","), mounts["/"]
        assert "ro" in mounts[CONFIG_PATH][5].split(","), mounts[CONFIG_PATH]
        assert Path(f"/proc/{pid}/ns/net").readlink() == Path("/proc/self/ns/net").readlink()
        assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[1:4] == [
            b"/opt/venv/bin/tensorgate", b"serve", b"--config"
        ]  # fmt: skip

        # tritonclient: ModelInfer on the demo model, both versions pinned, then unpinned.
        client = tc.InferenceServerClient(address)
        assert client.is_server_live() and client.is_server_ready()
        x = tc.InferInput("INPUT0", [1, 4], "FP32")
        x.set_data_from_numpy(np.array([X], dtype=np.float32))
        for version, expected in (("1", Y_V1), ("2", Y_V2)):
            result = client.infer("linear", [x], model_version=version)
            assert result.as_numpy("OUTPUT0").tolist() == [expected]
            assert result.get_response().model_version == version
        assert client.infer("linear", [x]).as_numpy("OUTPUT0").tolist() in ([Y_V1], [Y_V2])
        client.close()

        # grpcurl (server reflection from inside the image): list, infer, health.
        listed = grpcurl("-plaintext", address, "list")
        assert listed.returncode == 0, listed.stderr
        assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= set(
            listed.stdout.split()
        )
        request = {"model_name": "linear", "inputs": [{"name": "INPUT0", "datatype": "FP32",
                   "shape": [1, 4], "contents": {"fp32_contents": X}}]}  # fmt: skip
        for version in ("1", ""):
            called = grpcurl("-plaintext", "-v", "-H", "x-tensorgate-route-key: user-42",
                             "-d", json.dumps({**request, "model_version": version}),
                             address, "inference.GRPCInferenceService/ModelInfer")  # fmt: skip
            assert called.returncode == 0, called.stderr
            variant = re.search(r"x-tensorgate-variant: (\w+)", called.stdout).group(1)
            body = json.loads(
                called.stdout[called.stdout.index("{") : called.stdout.rindex("}") + 1]
            )
            raw = (
                body.get("raw_output_contents") or body["rawOutputContents"]
            )  # grpcurl 1.8.6: the former
            values = np.frombuffer(base64.b64decode(raw[0]), np.float32)
            assert values.tolist() == {"stable": Y_V1, "canary": Y_V2}[variant], called.stdout
            if version == "1":
                assert variant == "stable"
        health = grpcurl("-plaintext", "-d", '{"service": "inference.GRPCInferenceService"}',
                         address, "grpc.health.v1.Health/Check")  # fmt: skip
        assert '"status": "SERVING"' in health.stdout, health

        # Prometheus metrics from inside the container, counting the calls above.
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            assert "tensorgate_requests_total" in r.read().decode()

        # SIGTERM (podman stop) drains and exits 0; podman run --rm returns that status.
        stopped = image.podman("stop", "--time", "30", name, timeout=60)
        assert stopped.returncode == 0, stopped.stderr
        assert proc.wait(30) == 0, container_log()
    finally:
        if proc.poll() is None:
            image.podman("rm", "--force", "--time", "0", name)
            proc.wait(30)
        log.close()
    text = container_log()
    assert "gateway readiness: SERVING" in text and '"message": "stopped"' in text, text
    assert "Read-only file system" not in text and "Traceback" not in text, text
    with capsys.disabled():
        print(
            f"\n[image] {image.id[:12]}: {image.size / 1e6:.0f} MB; build {image.build_seconds:.1f} s"
            f" (base {'built' if image.base_built else 'cached'}, {image.steps_run} of"
            f" {image.steps} buildah steps run, the rest cached);"
            f" podman run to SERVING {start_seconds:.2f} s"
        )
