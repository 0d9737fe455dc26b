"""The admin API against a running gateway and a real Triton: auth, optimistic concurrency,
validation that leaves the table untouched, persistence across restarts, rollouts, drain."""

from __future__ import annotations

import asyncio
import json
import pathlib
import subprocess

import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from tritonclient.grpc import service_pb2_grpc

from tensorgate.admin.v1 import admin_pb2, admin_pb2_grpc
from tests.gateway_process import ADMIN_TOKEN, READ_TOKEN, GatewayProcess, triton_backend
from tests.loadgen import Results, run_load
from tests.oip import Y_V1, linear_request, output


def creds(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


ADMIN = creds(ADMIN_TOKEN)
READ = creds(READ_TOKEN)


def linear_route(*variants: tuple[str, str, int]) -> dict:
    return {
        "model": "linear",
        "variants": [
            {
                "name": name,
                "backend": "triton-a",
                "backend_model": model,
                "backend_version": "1",
                "weight": weight,
            }
            for name, model, weight in variants
        ],
    }


def base_config(triton, *variants) -> dict:
    variants = variants or (("stable", "demo_linear", 90), ("canary", "demo_linear", 10))
    return {
        "backends": [triton_backend(triton.address)],
        "routes": [linear_route(*variants)],
        "lifecycle": {"health_check_interval": "1s", "shutdown_grace": "2s"},
    }


@pytest.fixture(scope="module")
def gateway(triton):
    with GatewayProcess(base_config(triton), admin=True) as gw:
        yield gw


@pytest.fixture(scope="module")
def admin(gateway):
    with grpc.insecure_channel(gateway.admin_address) as channel:
        yield admin_pb2_grpc.AdminServiceStub(channel)


def table(admin) -> admin_pb2.GetRouteTableResponse:
    return admin.GetRouteTable(admin_pb2.GetRouteTableRequest(), metadata=READ)


def weights(reply, model: str = "linear") -> dict[str, int]:
    route = next(r for r in reply.routes if r.model == model)
    return {v.name: v.weight for v in route.variants}


def test_auth_matrix(gateway, admin):
    request = admin_pb2.GetRouteTableRequest()
    change = admin_pb2.SetVariantWeightsRequest(model="linear", weights={"stable": 90})
    for metadata in ((), creds("wrong-token-0123456789"), (("authorization", ADMIN_TOKEN),)):
        with pytest.raises(grpc.RpcError) as err:
            admin.GetRouteTable(request, metadata=metadata)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "Bearer" in err.value.details()
    assert admin.GetRouteTable(request, metadata=READ).revision.number >= 1
    with pytest.raises(grpc.RpcError) as err:
        admin.SetVariantWeights(change, metadata=READ)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "'viewer' has read-only access" in err.value.details()
    assert admin.SetVariantWeights(change, metadata=ADMIN).revision.author == "ops"
    # Tokens never reach the log.
    log = gateway.log()
    assert ADMIN_TOKEN not in log and READ_TOKEN not in log and "wrong-token" not in log


def test_admin_is_not_on_the_data_plane(gateway):
    with grpc.insecure_channel(gateway.address) as channel:
        stub = admin_pb2_grpc.AdminServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.GetRouteTable(admin_pb2.GetRouteTableRequest(), metadata=ADMIN)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_reflection_on_admin_port_needs_auth(gateway):
    with grpc.insecure_channel(gateway.admin_address) as channel:
        with pytest.raises(grpc.RpcError) as err:
            list(ProtoReflectionDescriptorDatabase(channel).get_services())
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    authed = grpc.intercept_channel(
        grpc.insecure_channel(gateway.admin_address), _AddToken(ADMIN_TOKEN)
    )
    database = ProtoReflectionDescriptorDatabase(authed)
    assert "tensorgate.admin.v1.AdminService" in set(database.get_services())
    service = descriptor_pool.DescriptorPool(database).FindServiceByName(
        "tensorgate.admin.v1.AdminService"
    )
    assert "SetVariantWeights" in service.methods_by_name


class _AddToken(grpc.StreamStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token

    def intercept_stream_stream(self, continuation, details, request_iterator):
        metadata = [*(details.metadata or ()), ("authorization", f"Bearer {self._token}")]
        return continuation(details._replace(metadata=metadata), request_iterator)


def test_invalid_changes_leave_the_table_byte_identical(admin):
    before = table(admin).SerializeToString(deterministic=True)
    live = table(admin).revision.number
    cases = [
        (
            admin_pb2.SetVariantWeightsRequest(model="linear", weights={"nope": 5}),
            "has no variant(s) 'nope'",
        ),
        (
            admin_pb2.SetVariantWeightsRequest(model="linear", weights={"stable": 0, "canary": 0}),
            "all weights are 0",
        ),
        (
            admin_pb2.SetVariantWeightsRequest(model="linear", weights={}),
            "name at least one variant",
        ),
    ]
    for request, expected in cases:
        with pytest.raises(grpc.RpcError) as err:
            admin.SetVariantWeights(request, metadata=ADMIN)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, expected
        assert expected in err.value.details()
    with pytest.raises(grpc.RpcError) as err:  # a shadow equal to a live (primary) variant
        admin.SetShadow(
            admin_pb2.SetShadowRequest(
                model="linear", shadow={"variant": "stable", "fraction": 0.5}
            ),
            metadata=ADMIN,
        )
    assert (
        err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        and "a shadow needs weight 0" in err.value.details()
    )
    with pytest.raises(grpc.RpcError) as err:
        admin.SetFallback(
            admin_pb2.SetFallbackRequest(model="linear", fallback=[{"model": "nope"}]),
            metadata=ADMIN,
        )
    assert (
        err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        and "no route for model 'nope'" in err.value.details()
    )
    with pytest.raises(grpc.RpcError) as err:
        admin.SetVariantWeights(
            admin_pb2.SetVariantWeightsRequest(model="ghost", weights={"a": 1}), metadata=ADMIN
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        admin.SetVariantWeights(
            admin_pb2.SetVariantWeightsRequest(
                model="linear", weights={"stable": 5}, expected_revision=live + 7
            ),
            metadata=ADMIN,
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert table(admin).SerializeToString(deterministic=True) == before


async def test_concurrent_writers_lose_no_update(gateway):
    clients, increments = 6, 5
    async with grpc.aio.insecure_channel(gateway.admin_address) as channel:
        stub = admin_pb2_grpc.AdminServiceStub(channel)
        start = await stub.GetRouteTable(admin_pb2.GetRouteTableRequest(), metadata=READ)
        aborted = 0

        async def writer() -> None:
            nonlocal aborted
            for _ in range(increments):
                while True:
                    live = await stub.GetRouteTable(admin_pb2.GetRouteTableRequest(), metadata=READ)
                    weight = weights(live)["canary"] + 1
                    try:
                        await stub.SetVariantWeights(
                            admin_pb2.SetVariantWeightsRequest(
                                model="linear",
                                weights={"canary": weight},
                                expected_revision=live.revision.number,
                            ),
                            metadata=ADMIN,
                        )
                        break
                    except grpc.aio.AioRpcError as err:
                        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
                        aborted += 1

        await asyncio.gather(*(writer() for _ in range(clients)))
        end = await stub.GetRouteTable(admin_pb2.GetRouteTableRequest(), metadata=READ)
        revisions = await stub.ListRevisions(admin_pb2.ListRevisionsRequest(), metadata=READ)
    assert weights(end)["canary"] == weights(start)["canary"] + clients * increments
    assert end.revision.number == start.revision.number + clients * increments
    numbers = [r.number for r in revisions.revisions]
    assert numbers == sorted(set(numbers), reverse=True)  # one winner per revision
    assert aborted > 0  # the writers really did collide


async def test_weights_change_under_load_without_errors(gateway, admin):
    live = Results()
    stop = asyncio.Event()
    load = asyncio.ensure_future(
        run_load(
            gateway.address,
            lambda: linear_request(),
            concurrency=8,
            until=stop,
            timeout=10,
            results=live,
        )
    )
    for i in range(10):
        await asyncio.sleep(0.2)
        await asyncio.to_thread(
            admin.SetVariantWeights,
            admin_pb2.SetVariantWeightsRequest(
                model="linear", weights={"stable": 10 + i, "canary": 10}
            ),
            metadata=ADMIN,
        )
    await asyncio.to_thread(
        admin.SetVariantWeights,
        admin_pb2.SetVariantWeightsRequest(model="linear", weights={"stable": 0, "canary": 1}),
        metadata=ADMIN,
    )
    await asyncio.sleep(0.5)
    mark = len(live.outcomes)
    await asyncio.sleep(1.0)
    stop.set()
    results = await load
    assert results.errors() == [] and len(results.outcomes) > 200
    assert all(output(o.response) == Y_V1 for o in results.outcomes)
    assert {o.variant for o in results.outcomes[mark:]} == {"canary"}
    admin.SetVariantWeights(
        admin_pb2.SetVariantWeightsRequest(model="linear", weights={"stable": 90, "canary": 10}),
        metadata=ADMIN,
    )


def test_rollback_revisions_and_audit(gateway, admin):
    first = table(admin)
    admin.SetVariantWeights(
        admin_pb2.SetVariantWeightsRequest(model="linear", weights={"stable": 1, "canary": 3}),
        metadata=ADMIN,
    )
    assert weights(table(admin)) == {"stable": 1, "canary": 3}
    reply = admin.Rollback(
        admin_pb2.RollbackRequest(to_revision=first.revision.number), metadata=ADMIN
    )
    assert reply.revision.number == first.revision.number + 2
    assert weights(table(admin)) == weights(first)
    history = admin.ListRevisions(admin_pb2.ListRevisionsRequest(limit=2), metadata=READ).revisions
    assert (
        history[0].summary == f"rollback to revision {first.revision.number}"
        and history[0].author == "ops"
    )
    with pytest.raises(grpc.RpcError) as err:
        admin.Rollback(admin_pb2.RollbackRequest(to_revision=99999), metadata=ADMIN)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    audit = [
        json.loads(line)
        for line in (pathlib.Path(gateway.directory) / ".tensorgate-state" / "audit.jsonl")
        .read_text()
        .splitlines()
    ]
    last = audit[-1]
    assert (
        last["who"] == "ops"
        and last["method"] == "Rollback"
        and last["revision"] == reply.revision.number
    )
    assert '-        "weight": 3' in last["diff"] or '"weight": 3' in last["diff"]


def test_restart_serves_the_last_revision(triton, tmp_path):
    config = base_config(triton)
    with (
        GatewayProcess(config, admin=True, directory=str(tmp_path)) as gw,
        grpc.insecure_channel(gw.admin_address) as channel,
    ):
        stub = admin_pb2_grpc.AdminServiceStub(channel)
        stub.SetVariantWeights(
            admin_pb2.SetVariantWeightsRequest(model="linear", weights={"stable": 0, "canary": 7}),
            metadata=ADMIN,
        )
        revision = table(stub).revision.number
    with (
        GatewayProcess(config, admin=True, directory=str(tmp_path)) as gw,
        grpc.insecure_channel(gw.admin_address) as channel,
    ):
        reply = table(admin_pb2_grpc.AdminServiceStub(channel))
        assert reply.revision.number == revision
        assert weights(reply) == {"stable": 0, "canary": 7}
        results = asyncio.run(
            run_load(gw.address, lambda: linear_request(), concurrency=2, duration=0.5, timeout=5)
        )
        assert {o.variant for o in results.outcomes} == {"canary"}


def _rollout(admin, canary: str, **fields) -> admin_pb2.Rollout:
    request = admin_pb2.StartRolloutRequest(
        model="linear",
        canary=canary,
        baseline="stable",
        steps=[20, 50, 100],
        min_step_duration={"seconds": 1},
        min_requests=40,
        max_p99_factor=10,
        **fields,
    )
    return admin.StartRollout(request, metadata=ADMIN).rollout


async def _watch(gw, admin, model="linear", timeout=60.0) -> admin_pb2.Rollout:
    load = Results()
    stop = asyncio.Event()
    task = asyncio.ensure_future(
        run_load(
            gw.address,
            lambda: linear_request(),
            concurrency=4,
            until=stop,
            timeout=10,
            results=load,
        )
    )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        while True:
            await asyncio.sleep(0.3)
            rollout = (
                await asyncio.to_thread(
                    admin.GetRollout, admin_pb2.GetRolloutRequest(model=model), metadata=READ
                )
            ).rollout
            if rollout.state != admin_pb2.Rollout.STATE_RUNNING:
                return rollout
            assert loop.time() < deadline, rollout
    finally:
        stop.set()
        await task


async def test_rollout_of_a_failing_canary_rolls_back_by_itself(triton):
    config = base_config(triton, ("stable", "demo_linear", 100), ("canary", "demo_flaky", 0))
    with (
        GatewayProcess(config, admin=True) as gw,
        grpc.insecure_channel(gw.admin_address) as channel,
    ):
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        assert _rollout(admin, "canary").state == admin_pb2.Rollout.STATE_RUNNING
        with pytest.raises(grpc.RpcError) as err:  # one rollout per model at a time
            _rollout(admin, "canary")
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        rollout = await _watch(gw, admin)
        assert rollout.state == admin_pb2.Rollout.STATE_ROLLED_BACK, rollout
        assert "error ratio" in rollout.reason
        assert rollout.analyses[-1].canary_error_ratio > 0.05 and not rollout.analyses[-1].passed
        assert weights(table(admin)) == {"stable": 100, "canary": 0}  # restored
        assert table(admin).revision.author == "rollout:ops"


async def test_rollout_of_a_healthy_canary_promotes(triton):
    config = base_config(triton, ("stable", "demo_linear", 100), ("canary", "demo_linear", 0))
    with (
        GatewayProcess(config, admin=True) as gw,
        grpc.insecure_channel(gw.admin_address) as channel,
    ):
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        _rollout(admin, "canary")
        rollout = await _watch(gw, admin)
        assert rollout.state == admin_pb2.Rollout.STATE_PROMOTED, rollout
        assert [a.percent for a in rollout.analyses] == [20, 50, 100] and all(
            a.passed for a in rollout.analyses
        )
        assert weights(table(admin)) == {"stable": 0, "canary": 100}
        results = await run_load(
            gw.address, lambda: linear_request(), concurrency=2, duration=0.5, timeout=5
        )
        assert {o.variant for o in results.outcomes} == {"canary"}


async def test_drain_and_backend_status(triton):
    from tests.backends.triton import TritonServer  # noqa: F401 - one Triton, two backend names

    config = {
        "backends": [triton_backend(triton.address, "a"), triton_backend(triton.address, "b")],
        "routes": [{"model": "linear", "variants": [
            {"name": "on-a", "backend": "a", "backend_model": "demo_linear", "backend_version": "1", "weight": 1},
            {"name": "on-b", "backend": "b", "backend_model": "demo_linear", "backend_version": "1", "weight": 1},
        ]}],
        "lifecycle": {"health_check_interval": "1s", "shutdown_grace": "1s"},
    }  # fmt: skip
    with (
        GatewayProcess(config, admin=True) as gw,
        grpc.insecure_channel(gw.admin_address) as channel,
    ):
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        assert list(
            admin.DrainBackend(admin_pb2.DrainBackendRequest(backend="a"), metadata=ADMIN).drained
        ) == ["a"]
        drained = await run_load(
            gw.address, lambda: linear_request(), concurrency=2, duration=1.0, timeout=5
        )
        assert drained.errors() == [] and {o.variant for o in drained.outcomes} == {"on-b"}
        status = admin.GetBackendStatus(admin_pb2.GetBackendStatusRequest(), metadata=READ)
        by_name = {b.name: b for b in status.backends}
        assert (
            by_name["a"].drained and by_name["a"].healthy and by_name["a"].breaker_state == "closed"
        )
        assert (
            by_name["b"].recent_requests >= len(drained.outcomes)
            and by_name["b"].recent_error_ratio == 0
        )
        assert {(v.variant, v.healthy) for v in status.variants} == {
            ("on-a", False),
            ("on-b", True),
        }
        admin.UndrainBackend(admin_pb2.UndrainBackendRequest(backend="a"), metadata=ADMIN)
        both = await run_load(
            gw.address, lambda: linear_request(), concurrency=2, duration=1.0, timeout=5
        )
        assert {o.variant for o in both.outcomes} == {"on-a", "on-b"}
        with pytest.raises(grpc.RpcError) as err:
            admin.DrainBackend(admin_pb2.DrainBackendRequest(backend="zzz"), metadata=ADMIN)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_admin_needs_credentials_to_start(triton, tmp_path):
    config = base_config(triton)
    from tests.backends.triton import free_port

    config["listeners"] = {
        "admin": f"127.0.0.1:{free_port()}",
        "data_plane": f"127.0.0.1:{free_port()}",
        "metrics": "off",
    }
    path = tmp_path / "g.yaml"
    import yaml

    path.write_text(yaml.safe_dump(config))
    from tests.gateway_process import TENSORGATE

    run = subprocess.run(
        [TENSORGATE, "serve", "--config", path], capture_output=True, text=True, timeout=30
    )
    assert run.returncode == 1 and "no credentials are configured" in run.stderr


def test_admin_on_the_network_in_plaintext_is_refused_by_check_config_and_serve(tmp_path):
    import yaml

    from tests.backends.triton import free_port
    from tests.gateway_process import TENSORGATE

    config = {
        "backends": [triton_backend("127.0.0.1:1")],
        "routes": [linear_route(("stable", "demo_linear", 1))],
        "listeners": {"admin": f"0.0.0.0:{free_port()}", "data_plane": f"127.0.0.1:{free_port()}"},
        "admin": {"tokens_env": "TENSORGATE_ADMIN_TOKENS"},
    }
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(config))
    for command in (["check-config", path], ["serve", "--config", path]):
        run = subprocess.run([TENSORGATE, *command], capture_output=True, text=True, timeout=30)
        assert run.returncode == 1, run.stderr
        assert f"listeners.admin: '{config['listeners']['admin']}' is not a loopback" in run.stderr
        assert "admin.tls" in run.stderr and "insecure_plaintext_on_network" in run.stderr


def test_cli_reads_token_from_environment(gateway):
    from tests.gateway_process import TENSORGATE

    def admin_cli(*args, token=ADMIN_TOKEN):
        env = {"TENSORGATE_ADMIN_TOKEN": token, "PATH": "/usr/bin:/bin"}
        return subprocess.run(
            [TENSORGATE, "admin", "--address", gateway.admin_address, *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
        )

    routes = admin_cli("routes")
    assert routes.returncode == 0, routes.stderr
    assert "MODEL" in routes.stdout and "linear" in routes.stdout and "stable" in routes.stdout
    changed = admin_cli("set-weights", "linear", "stable=70", "canary=30")
    assert changed.returncode == 0 and "linear: weights canary=30, stable=70" in changed.stdout
    assert "70%" in admin_cli("routes").stdout
    denied = admin_cli("set-weights", "linear", "stable=1", token=READ_TOKEN)
    assert denied.returncode == 1 and "PERMISSION_DENIED" in denied.stderr
    assert "ops" in admin_cli("revisions", "--limit", "3").stdout
    assert "triton-a" in admin_cli("backends").stdout
    admin_cli("set-weights", "linear", "stable=90", "canary=10")


def test_mtls_client_certificates(triton, tmp_path):
    from tests.certs import issue, make_ca

    ca = make_ca(tmp_path, "admin-ca")
    server_key, server_cert = issue(tmp_path, ca, "gateway", server=True)
    client_key, client_cert = issue(tmp_path, ca, "alice", server=False)
    rogue_ca = make_ca(tmp_path, "rogue-ca")
    rogue_key, rogue_cert = issue(tmp_path, rogue_ca, "mallory", server=False)
    config = base_config(triton)
    config["admin"] = {
        "tls": {
            "cert_file": str(server_cert),
            "key_file": str(server_key),
            "client_ca_file": str(ca[1]),
        },
        "client_cert_role": "admin",
    }
    with GatewayProcess(config, admin=True) as gw:
        trust = ca[1].read_bytes()

        def stub_with(key, cert):
            creds = grpc.ssl_channel_credentials(
                trust, key.read_bytes() if key else None, cert.read_bytes() if cert else None
            )
            return admin_pb2_grpc.AdminServiceStub(grpc.secure_channel(gw.admin_address, creds))

        alice = stub_with(client_key, client_cert)
        reply = alice.SetVariantWeights(
            admin_pb2.SetVariantWeightsRequest(model="linear", weights={"canary": 11})
        )
        assert reply.revision.author == "cert:CN=alice"
        for key, cert in ((None, None), (rogue_key, rogue_cert)):
            with pytest.raises(grpc.RpcError) as err:
                stub_with(key, cert).GetRouteTable(admin_pb2.GetRouteTableRequest(), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # the TLS handshake is refused
        # Plaintext to a TLS port fails too.
        with grpc.insecure_channel(gw.admin_address) as plain, pytest.raises(grpc.RpcError):
            admin_pb2_grpc.AdminServiceStub(plain).GetRouteTable(
                admin_pb2.GetRouteTableRequest(), metadata=ADMIN, timeout=5
            )


def test_tls_on_the_data_plane(triton, tmp_path):
    from tests.certs import issue, make_ca

    ca = make_ca(tmp_path, "plane-ca")
    key, cert = issue(tmp_path, ca, "gateway", server=True)
    config = base_config(triton)
    config["listeners"] = {"data_plane_tls": {"cert_file": str(cert), "key_file": str(key)}}
    gw = GatewayProcess(config).start(wait="none")  # TLS listener: checked below
    try:
        creds = grpc.ssl_channel_credentials(ca[1].read_bytes())
        with grpc.secure_channel(gw.address, creds) as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            assert output(stub.ModelInfer(linear_request(version=""), timeout=10)) == Y_V1
        with grpc.insecure_channel(gw.address) as plain, pytest.raises(grpc.RpcError):
            service_pb2_grpc.GRPCInferenceServiceStub(plain).ModelInfer(linear_request(), timeout=5)
    finally:
        gw.stop()
