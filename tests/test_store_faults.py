"""The etcd store as an operator meets it when things go wrong (issue #20): real etcd members,
real `tensorgate` processes, the CLI as a user runs it.

- A write etcd's leader accepted but could not commit (both followers killed) has an unknown
  outcome: the gateway says so, and the CLI waits for the store and says whether it landed.
- Whatever `serve` refuses about store.etcd, `check-config` refuses first, with the field path.
- Two processes given the same `store.etcd.replica` do not both drive a rollout, and a finished
  rollout is never undone.
- The start-up messages: the failure wording of docs/store.md, the revision served.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import time
from pathlib import Path

import aetcd
import grpc
import pytest
import yaml

from tensorgate.admin.v1 import admin_pb2
from tensorgate.store.v1 import store_pb2
from tests.backends.etcd import cluster_of, leader_of, start_all
from tests.backends.triton import REPO_ROOT, free_port
from tests.gateway_process import ADMIN_TOKEN, TENSORGATE, GatewayProcess
from tests.loadgen import Results, run_load
from tests.oip import linear_request
from tests.test_store_etcd import ADMIN, PREFIX, Replica, fleet_config

CLI_ENV = {**os.environ, "TENSORGATE_ADMIN_TOKEN": ADMIN_TOKEN}


@pytest.fixture
def cluster():
    members = cluster_of(3)
    try:
        start_all(members)
        yield members
    finally:
        for m in members:
            m.wipe()


def admin_cli(address: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [str(TENSORGATE), "admin", "--address", address, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=CLI_ENV,
        cwd=REPO_ROOT,
    )


def test_a_write_that_timed_out_is_unknown_and_the_cli_finds_out_it_landed(triton, cluster):
    """Issue #20, 1: gateway on the leader, both followers killed. The write is sent, etcd's
    leader accepts it but cannot commit it; after 2 s the gateway answers. Saying "nothing was
    changed" would be wrong: when the followers come back, the old leader commits it. The CLI
    says the outcome is unknown, waits for the store, and reports "applied as revision N"."""
    leader = leader_of(cluster)
    followers = [m for m in cluster if m is not leader]
    with Replica(triton, leader, "gw", timeout="2s") as gw:
        before = gw.table().revision.number
        for f in followers:
            f.kill()
        cli = admin_cli(gw.process.admin_address, "set-weights", "linear", "stable=61",
                        "canary=39", "--expect", str(before))  # fmt: skip
        try:
            # the CLI's first lines: the gateway's answer, then that it waits
            seen = []
            deadline = time.monotonic() + 20
            while not any("waiting up to" in line for line in seen):
                line = cli.stderr.readline()
                assert line or cli.poll() is None, (cli.wait(), "".join(seen), cli.stdout.read())
                seen.append(line)
                assert time.monotonic() < deadline, seen
            answer = "".join(seen)
            assert "UNAVAILABLE" in answer and "outcome is unknown" in answer, answer
            assert "nothing was changed" not in answer, answer
            assert f"--expect {before}" in answer, answer  # how a retry stays safe
            assert answer.count(leader.endpoint) == 1, answer  # the store named once
            start_all(followers)
            out, err = cli.communicate(timeout=40)
        finally:
            if cli.poll() is None:
                cli.kill()
                cli.wait()
        # the answer is final: nothing lands later
        time.sleep(1.0)
        assert gw.table().revision.number == before + 1
        assert cli.returncode == 0, (answer, out, err)
        assert (
            out.strip() == f"applied as revision {before + 1}: linear: weights canary=39, stable=61"
        )
        # and it is what the replica serves (it followed the store)
        deadline = time.monotonic() + 5
        while gw.table().revision.number != before + 1:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert gw.weights() == {"stable": 61, "canary": 39}


def test_a_timed_out_write_that_did_not_land_is_reported_not_applied(triton, cluster):
    """The other outcome: the write timed out, and the store then answers without it (the
    leader lost its leadership before committing: a follower with the older log won). Here:
    followers killed, write sent, then the LEADER killed (its pending entry only on it) and the
    followers restarted: they elect one of themselves. The CLI says "not
    applied" and exits 1."""
    leader = leader_of(cluster)
    followers = [m for m in cluster if m is not leader]
    endpoints = [leader.endpoint] + [m.endpoint for m in followers]  # connected to the leader
    with Replica(triton, leader, "gw", timeout="2s", endpoints=endpoints) as gw:
        before = gw.table().revision.number
        for f in followers:
            f.kill()
        cli = admin_cli(gw.process.admin_address, "set-weights", "linear", "stable=62",
                        "canary=38", "--resolve-wait", "40")  # fmt: skip
        try:
            seen = []
            while not any("waiting up to" in line for line in seen):
                line = cli.stderr.readline()
                assert line or cli.poll() is None, (cli.wait(), "".join(seen))
                seen.append(line)
            leader.kill()  # its uncommitted entry dies with it: the two others win
            start_all(followers)
            out, err = cli.communicate(timeout=45)
        finally:
            if cli.poll() is None:
                cli.kill()
                cli.wait()
        assert cli.returncode == 1, (seen, out, err)
        assert "not applied: the live revision is" in err, err
        time.sleep(1.0)  # and it stays so
        assert gw.weights() == {"stable": 90, "canary": 10}
        assert gw.table().revision.number == before


def write_config(tmp_path: Path, store: dict) -> Path:
    config = {
        "backends": [{"name": "triton-a", "kind": "BACKEND_KIND_TRITON",
                      "address": "127.0.0.1:1"}],
        "routes": [{"model": "linear", "variants": [
            {"name": "stable", "backend": "triton-a", "backend_model": "demo_linear",
             "weight": 100}]}],
        "listeners": {"data_plane": f"127.0.0.1:{free_port()}", "metrics": "off"},
        "store": {"etcd": store},
    }  # fmt: skip
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def tensorgate(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(TENSORGATE), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
    )


@pytest.mark.parametrize(
    ("endpoints", "path", "words"),
    [
        (["localhost:38001", "localhost:38002", "localhost:38003"], "store.etcd.endpoints[0]",
         "with several endpoints each must be an IP address"),
        (["http://127.0.0.1:2379"], "store.etcd.endpoints[0]", "drop the scheme"),
        (["127.0.0.1:2379", "https://127.0.0.1:2380"], "store.etcd.endpoints[1]",
         "drop the scheme and give host:port ('127.0.0.1:2380')"),
    ],
)  # fmt: skip
def test_check_config_refuses_what_serve_would(tmp_path, endpoints, path, words):
    """Issue #20, 2: check-config passed these and serve died with a traceback. Now both refuse
    them with the field path, the same words, exit status 1, no traceback."""
    config = write_config(tmp_path, {"endpoints": endpoints, "prefix": "/t"})
    checked = tensorgate("check-config", str(config))
    served = tensorgate("serve", "--config", str(config))
    for result in (checked, served):
        output = result.stdout + result.stderr
        assert result.returncode == 1, output
        assert "Traceback" not in output, output
        assert f"{path}: " in output and words in output, output
    assert checked.stderr == served.stderr


def test_check_config_accepts_one_host_name(tmp_path):
    config = write_config(tmp_path, {"endpoints": ["localhost:2379"], "prefix": "/t"})
    result = tensorgate("check-config", str(config))
    assert result.returncode == 0, result.stderr


def test_startup_failure_wording_and_log_of_the_revision(tmp_path, etcd):
    """Issue #20, 4: a replica that cannot read the store exits with the words of
    docs/store.md; one that starts says which revision it serves, from which store."""
    nobody = f"127.0.0.1:{free_port()}"
    config = write_config(tmp_path, {"endpoints": [nobody], "prefix": "/t", "timeout": "1s"})
    result = tensorgate("serve", "--config", str(config))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"tensorgate: cannot start: the revision store (etcd {nobody} /t) is unavailable: "
        "no answer in time"
    ), result.stderr
    config = {
        "backends": [{"name": "triton-a", "kind": "BACKEND_KIND_TRITON",
                      "address": "127.0.0.1:1"}],
        "routes": [{"model": "linear", "variants": [
            {"name": "stable", "backend": "triton-a", "backend_model": "demo_linear",
             "weight": 100}]}],
        "store": {"etcd": {"endpoints": [etcd.endpoint], "prefix": "/t", "replica": "gw"}},
    }  # fmt: skip
    with GatewayProcess(config).start(wait="live") as gw:
        deadline = time.monotonic() + 5
        while "route table revision 1 from the revision store" not in gw.log():
            assert time.monotonic() < deadline, gw.log()
            time.sleep(0.1)
        assert f"(etcd {etcd.endpoint} /t), store identity gw." in gw.log()


async def _audit(etcd) -> list[store_pb2.AuditEntry]:
    async with aetcd.Client(etcd.host, etcd.port, timeout=5) as client:
        found = await client.get_prefix(f"{PREFIX}/audit/".encode())
        return [store_pb2.AuditEntry.FromString(kv.value) for kv in found]


async def test_two_processes_with_one_replica_name_do_not_both_drive(triton, etcd):
    """Issue #20, 3: two gateways given the same store.etcd.replica both believed they held
    the driver lease; after "promoted" the other one rolled the canary back. Now the driver's
    identity is per process, its writes are conditional on the lease, and a finished rollout
    is never undone."""
    config = fleet_config(triton, etcd, "gw", stable=100, canary=0)
    config["store"]["etcd"]["lease_ttl"] = "2s"
    with GatewayProcess(config, admin=True) as one, GatewayProcess(config, admin=True) as two:
        load = Results()
        stop = asyncio.Event()
        tasks = [
            asyncio.ensure_future(run_load(p.address, linear_request, concurrency=2, until=stop,
                                           timeout=5, results=load))
            for p in (one, two)
        ]  # fmt: skip
        try:
            watch = await asyncio.to_thread(
                subprocess.run,
                [str(TENSORGATE), "admin", "--address", two.admin_address, "rollout", "start",
                 "linear", "canary", "stable", "--steps", "10,50,100", "--min-step", "1",
                 "--min-requests", "5", "--max-p99-factor", "10", "--watch"],
                capture_output=True, text=True, timeout=50, env=CLI_ENV,
            )  # fmt: skip
            assert watch.returncode == 0, watch.stdout + watch.stderr
            assert "promoted" in watch.stdout
            await asyncio.sleep(3.0)  # a driver that would undo it has had every chance
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
        drivers = [p for p in (one, two) if re.search(r"rollouts: gw\S* is the driver", p.log())]
        assert len(drivers) == 1, [p.log() for p in (one, two)]
        assert re.search(r"rollouts: gw\.[0-9a-f]{6} is the driver", drivers[0].log())
        summaries = [e.summary for e in await _audit(etcd) if e.method == "Rollout"]
        assert summaries == [
            "rollout linear: canary 10%, stable 90%",
            "rollout linear: canary 50%, stable 50%",
            "rollout linear: canary 100%, stable 0%",
        ], summaries
        for p in (one, two):
            with grpc.insecure_channel(p.admin_address) as channel:
                from tensorgate.admin.v1 import admin_pb2_grpc

                stub = admin_pb2_grpc.AdminServiceStub(channel)
                table = stub.GetRouteTable(admin_pb2.GetRouteTableRequest(), metadata=ADMIN)
                rollout = stub.GetRollout(
                    admin_pb2.GetRolloutRequest(model="linear"), metadata=ADMIN
                ).rollout
            weights = {v.name: v.weight for v in table.routes[0].variants}
            assert weights == {"stable": 0, "canary": 100}
            assert rollout.state == admin_pb2.Rollout.STATE_PROMOTED


async def test_a_rollback_left_half_done_is_finished_by_the_next_driver(triton, etcd):
    """Found by the 30-minute chaos run (seed 33): the driver saved a rollout as rolled back,
    then lost the store (etcd's leader killed) before it wrote the original weights back; only
    running rollouts were adopted, so the route stayed on the canary under a rollout that said
    "rolled back". Here the store holds exactly what that driver left: the record ended with
    its restore pending, the weights still at the last step. The next driver writes them back,
    once, and clears the mark."""
    from google.protobuf import timestamp_pb2

    started = timestamp_pb2.Timestamp()
    started.GetCurrentTime()
    record = store_pb2.RolloutRecord(
        rollout=admin_pb2.Rollout(
            model="linear", canary="canary", baseline="stable", steps=[10, 50, 100], step=2,
            percent=100, state=admin_pb2.Rollout.STATE_ROLLED_BACK, started_at=started,
            reason="step 100%: error ratio 0.300 > 2 x baseline 0.000 + 0.01",
        ),
        original_weights={"stable": 100, "canary": 0},
        started_by="ops",
        restore_pending=True,
    )  # fmt: skip
    async with aetcd.Client(etcd.host, etcd.port, timeout=5) as client:
        await client.put(f"{PREFIX}/rollouts/linear".encode(), record.SerializeToString())
    config = fleet_config(triton, etcd, "gw", stable=0, canary=100)
    with GatewayProcess(config, admin=True) as gateway:
        with grpc.insecure_channel(gateway.admin_address) as channel:
            from tensorgate.admin.v1 import admin_pb2_grpc

            stub = admin_pb2_grpc.AdminServiceStub(channel)
            deadline = time.monotonic() + 20
            while True:
                table = stub.GetRouteTable(admin_pb2.GetRouteTableRequest(), metadata=ADMIN)
                weights = {v.name: v.weight for v in table.routes[0].variants}
                if weights == {"stable": 100, "canary": 0} or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            assert weights == {"stable": 100, "canary": 0}, gateway.log()
            rollout = stub.GetRollout(admin_pb2.GetRolloutRequest(model="linear"), metadata=ADMIN)
            assert rollout.rollout.state == admin_pb2.Rollout.STATE_ROLLED_BACK
        await asyncio.sleep(1.0)  # a second driver pass must not write it again
    summaries = [e.summary for e in await _audit(etcd) if e.method == "Rollout"]
    assert summaries == ["rollout linear: canary rolled back"], summaries
    async with aetcd.Client(etcd.host, etcd.port, timeout=5) as client:
        stored = (await client.get(f"{PREFIX}/rollouts/linear".encode())).value
    assert not store_pb2.RolloutRecord.FromString(stored).restore_pending
