"""One route table for every replica: gateways sharing a real etcd, in front of a real Triton.

Each replica is `tensorgate serve` in its own process with `store.etcd` pointing at an etcd the
test starts on 127.0.0.1 (tests/backends/etcd.py). What a user of a fleet relies on: writes
through any replica are serialized (no lost update; a stale expected_revision is refused with
FAILED_PRECONDITION), every replica serves a change within a second, a new replica starts from
the latest revision rather than its file, an etcd crash under load costs no call, and a rollout
survives the death of the replica driving it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import time

import aetcd
import grpc
import pytest

from tensorgate.admin.v1 import admin_pb2, admin_pb2_grpc
from tensorgate.store.v1 import store_pb2
from tests.gateway_process import ADMIN_TOKEN, GatewayProcess, triton_backend
from tests.loadgen import Results, run_load
from tests.oip import linear_request

ADMIN = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
PREFIX = "/tensorgate/test"


def fleet_config(triton, etcd, replica: str, stable: int = 90, canary: int = 10, **store) -> dict:
    return {
        "backends": [triton_backend(triton.address)],
        "routes": [
            {
                "model": "linear",
                "variants": [
                    {"name": "stable", "backend": "triton-a", "backend_model": "demo_linear",
                     "backend_version": "1", "weight": stable},
                    {"name": "canary", "backend": "triton-a", "backend_model": "demo_linear",
                     "backend_version": "1", "weight": canary},
                ],
            }
        ],
        "lifecycle": {"health_check_interval": "1s", "shutdown_grace": "2s"},
        "store": {
            "etcd": {"endpoints": [etcd.endpoint], "prefix": PREFIX, "replica": replica, **store}
        },
    }  # fmt: skip


class Replica:
    def __init__(self, triton, etcd, name: str, **kwargs) -> None:
        self.name = name
        self.process = GatewayProcess(fleet_config(triton, etcd, name, **kwargs), admin=True)

    def __enter__(self) -> Replica:
        self.process.start()
        self.channel = grpc.insecure_channel(self.process.admin_address)
        self.admin = admin_pb2_grpc.AdminServiceStub(self.channel)
        return self

    def __exit__(self, *exc) -> None:
        self.channel.close()
        self.process.stop()

    def table(self) -> admin_pb2.GetRouteTableResponse:
        return self.admin.GetRouteTable(admin_pb2.GetRouteTableRequest(), metadata=ADMIN, timeout=5)

    def weights(self) -> dict[str, int]:
        return {v.name: v.weight for v in self.table().routes[0].variants}

    def set_weights(self, expected: int = 0, **weights: int) -> admin_pb2.Revision:
        request = admin_pb2.SetVariantWeightsRequest(
            model="linear", weights=weights, expected_revision=expected
        )
        return self.admin.SetVariantWeights(request, metadata=ADMIN, timeout=5).revision


@contextlib.contextmanager
def replicas(triton, etcd, *names: str, **kwargs):
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(Replica(triton, etcd, n, **kwargs)) for n in names]


def test_concurrent_writers_through_three_replicas_lose_no_update(triton, etcd):
    """Six writers, two per replica, each adding 1 to the canary's weight 8 times with
    read-modify-write and expected_revision. etcd's compare-and-swap lets one writer win per
    revision; the others get FAILED_PRECONDITION and retry, so the weight ends at +48."""
    with replicas(triton, etcd, "a", "b", "c") as fleet:
        start = fleet[0].weights()["canary"]
        stale = []
        errors = []

        def writer(replica: Replica) -> None:
            done = 0
            while done < 8:
                reply = replica.table()
                current = {v.name: v.weight for v in reply.routes[0].variants}["canary"]
                try:
                    replica.set_weights(expected=reply.revision.number, canary=current + 1)
                    done += 1
                except grpc.RpcError as err:
                    if err.code() == grpc.StatusCode.FAILED_PRECONDITION:
                        stale.append(err.details())
                    else:
                        errors.append(f"{err.code().name}: {err.details()}")
                        return

        threads = [threading.Thread(target=writer, args=(fleet[i % 3],)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors
        assert stale, "six concurrent writers never collided: the test did not test anything"
        assert all(
            re.search(r"expected revision \d+, but the live revision is \d+", s) for s in stale
        )
        deadline = time.monotonic() + 2
        while {r.weights()["canary"] for r in fleet} != {start + 48}:
            assert time.monotonic() < deadline, [r.weights() for r in fleet]
            time.sleep(0.05)
        # one revision per successful write, one history, seen alike by every replica
        numbers = {r.table().revision.number for r in fleet}
        assert numbers == {1 + 48}
        history = (
            fleet[1]
            .admin.ListRevisions(admin_pb2.ListRevisionsRequest(limit=100), metadata=ADMIN)
            .revisions
        )
        assert [r.number for r in history] == list(range(49, 0, -1))


def test_a_change_through_one_replica_is_served_by_the_others_within_1s(triton, etcd):
    with replicas(triton, etcd, "a", "b", "c") as (a, b, c):
        delays = []
        for i in range(20):
            canary = 11 + i
            a.set_weights(canary=canary)
            written = time.monotonic()
            pending = {b, c}
            while pending:
                pending = {r for r in pending if r.weights()["canary"] != canary}
                assert time.monotonic() - written < 2, "a change did not reach every replica"
            delays.append(time.monotonic() - written)
        delays.sort()
        print(f"propagation to 2 other replicas, 20 changes: p50 {delays[9] * 1000:.0f} ms, "
              f"p99 {delays[-1] * 1000:.0f} ms")  # fmt: skip
        assert delays[-1] < 1.0
        # and served: all of b's traffic goes where a said
        a.set_weights(stable=0, canary=100)
        deadline = time.monotonic() + 1
        while b.weights() != {"stable": 0, "canary": 100}:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        results = asyncio.run(
            run_load(b.process.address, linear_request, concurrency=2, duration=0.5, timeout=5)
        )
        assert results.outcomes and {o.variant for o in results.outcomes} == {"canary"}


def test_a_replica_started_later_serves_the_latest_revision_not_its_file(triton, etcd):
    with replicas(triton, etcd, "a") as (a,):
        for canary in (20, 30, 40, 50, 60):
            a.set_weights(canary=canary)
        latest = a.table().revision.number
        # d's own file says 90/10
        with Replica(triton, etcd, "d", stable=90, canary=10) as d:
            assert d.table().revision.number == latest == 6
            assert d.weights() == {"stable": 90, "canary": 60}


def test_drains_are_shared(triton, etcd):
    with replicas(triton, etcd, "a", "b") as (a, b):
        a.admin.DrainBackend(admin_pb2.DrainBackendRequest(backend="triton-a"), metadata=ADMIN)
        deadline = time.monotonic() + 1
        while True:
            status = b.admin.GetBackendStatus(admin_pb2.GetBackendStatusRequest(), metadata=ADMIN)
            if status.backends[0].drained:
                break
            assert time.monotonic() < deadline, "a drain through a did not reach b in 1 s"
            time.sleep(0.02)
        b.admin.UndrainBackend(admin_pb2.UndrainBackendRequest(backend="triton-a"), metadata=ADMIN)
        deadline = time.monotonic() + 1
        while (
            a.admin.GetBackendStatus(admin_pb2.GetBackendStatusRequest(), metadata=ADMIN)
            .backends[0]
            .drained
        ):
            assert time.monotonic() < deadline
            time.sleep(0.02)


async def test_etcd_killed_under_load_costs_no_call_and_replicas_catch_up(triton, etcd):
    with replicas(triton, etcd, "a", "b") as (a, b):
        load = Results()
        stop = asyncio.Event()
        tasks = [
            asyncio.ensure_future(
                run_load(r.process.address, linear_request, concurrency=4, until=stop,
                         timeout=5, results=load)
            )
            for r in (a, b)
        ]  # fmt: skip
        await asyncio.sleep(0.5)
        etcd.kill()
        try:
            await asyncio.sleep(2.0)
            # admin writes fail fast, naming the store; nothing changes
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                await asyncio.to_thread(a.set_weights, canary=77)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            # etcd did not answer before anything was sent: that much is known
            assert "nothing was changed" in err.value.details()
            assert err.value.details().count(etcd.endpoint) == 1, err.value.details()
            assert time.monotonic() - started < 3.0
            await asyncio.sleep(1.0)
        finally:
            etcd.start()
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*tasks)
        assert len(load.outcomes) > 100
        assert load.errors() == [], load.codes()
        assert a.weights() == {"stable": 90, "canary": 10}
        # back: a write through a reaches b (its watch resumed or it re-read)
        await asyncio.to_thread(a.set_weights, canary=33)
        deadline = time.monotonic() + 3
        while (await asyncio.to_thread(b.weights))["canary"] != 33:
            assert time.monotonic() < deadline, "b did not catch up after etcd came back"
            await asyncio.sleep(0.05)


async def _audit(etcd) -> list[store_pb2.AuditEntry]:
    async with aetcd.Client(etcd.host, etcd.port, timeout=5) as client:
        found = await client.get_prefix(f"{PREFIX}/audit/".encode())
        return [store_pb2.AuditEntry.FromString(kv.value) for kv in found]


async def _driver(etcd) -> str:
    async with aetcd.Client(etcd.host, etcd.port, timeout=5) as client:
        found = await client.get(f"{PREFIX}/driver".encode())
        return found.value.decode() if found else ""


async def test_rollout_survives_its_driver_being_killed(triton, etcd):
    with replicas(triton, etcd, "a", "b", stable=100, canary=0, lease_ttl="2s") as fleet:
        request = admin_pb2.StartRolloutRequest(
            model="linear", canary="canary", baseline="stable", steps=[20, 50, 100],
            min_step_duration={"seconds": 2}, min_requests=30, max_p99_factor=10,
        )  # fmt: skip
        fleet[1].admin.StartRollout(request, metadata=ADMIN)  # through either replica
        load = Results()
        stop = asyncio.Event()
        tasks = {
            r.name: asyncio.ensure_future(
                run_load(r.process.address, linear_request, concurrency=2, until=stop,
                         timeout=5, results=load)
            )
            for r in fleet
        }  # fmt: skip
        try:
            deadline = time.monotonic() + 10
            while not (driver := await _driver(etcd)):
                assert time.monotonic() < deadline, "no replica took the driver lease"
                await asyncio.sleep(0.1)
            # the driver key holds the process's identity: its replica name and a suffix
            victim = next(r for r in fleet if driver.rpartition(".")[0] == r.name)
            survivor = next(r for r in fleet if r is not victim)
            # kill the driver in the middle of the second step
            deadline = time.monotonic() + 30
            while True:
                rollout = survivor.admin.GetRollout(
                    admin_pb2.GetRolloutRequest(model="linear"), metadata=ADMIN
                ).rollout
                if rollout.step == 1:
                    break
                assert time.monotonic() < deadline, rollout
                await asyncio.sleep(0.1)
            victim.process.proc.kill()
            victim.process.proc.wait()
            tasks.pop(victim.name).cancel()
            deadline = time.monotonic() + 60
            while True:
                rollout = survivor.admin.GetRollout(
                    admin_pb2.GetRolloutRequest(model="linear"), metadata=ADMIN
                ).rollout
                if rollout.state != admin_pb2.Rollout.STATE_RUNNING:
                    break
                assert time.monotonic() < deadline, rollout
                await asyncio.sleep(0.2)
        finally:
            stop.set()
            await asyncio.gather(*tasks.values(), return_exceptions=True)
        assert rollout.state == admin_pb2.Rollout.STATE_PROMOTED, rollout
        assert [a.percent for a in rollout.analyses] == [20, 50, 100]
        assert (await _driver(etcd)).rpartition(".")[0] == survivor.name
        assert survivor.weights() == {"stable": 0, "canary": 100}
        # one history: each step's weights were set exactly once, in order
        steps = [e.summary for e in await _audit(etcd) if e.method == "Rollout"]
        assert steps == [
            "rollout linear: canary 20%, stable 80%",
            "rollout linear: canary 50%, stable 50%",
            "rollout linear: canary 100%, stable 0%",
        ], steps


def test_a_change_etcd_refuses_is_unavailable_and_changes_nothing(triton):
    """etcd refuses a revision over its request size limit: the admin call fails with
    UNAVAILABLE saying why, the table and revision stay, and smaller changes still work."""
    from tests.backends.etcd import EtcdServer

    with (
        EtcdServer(extra_args=["--max-request-bytes", "8192"]) as small,
        Replica(triton, small, "a") as a,
    ):
        before = a.table()
        big = admin_pb2.SetFallbackRequest(model="linear")
        big.fallback.add().static_response.outputs.add(
            name="OUTPUT0", datatype="FP32", shape=[4000], fp_values=[0.5] * 4000
        )
        with pytest.raises(grpc.RpcError) as err:
            a.admin.SetFallback(big, metadata=ADMIN, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "too large" in err.value.details() and "nothing was changed" in err.value.details()
        after = a.table()
        assert after.revision.number == before.revision.number
        assert list(after.routes) == list(before.routes)
        a.set_weights(canary=42)
        assert a.table().revision.number == before.revision.number + 1
