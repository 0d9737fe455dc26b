"""Audit entries of admin changes: who, when, what, and the diff of the route table. The store
keeps them with the revision they made (gateway/controlplane/store/)."""

from __future__ import annotations

import difflib
import json

from google.protobuf import json_format

from gateway.controlplane.store.base import now
from tensorgate.store.v1 import store_pb2


def routes_text(routes) -> list[str]:
    return json.dumps(
        [json_format.MessageToDict(r, preserving_proto_field_name=True) for r in routes],
        indent=1,
        sort_keys=True,
    ).splitlines()


def entry(*, who: str, method: str, revision: int, summary: str, before, after):
    diff = "\n".join(
        difflib.unified_diff(
            routes_text(before), routes_text(after), "before", "after", lineterm="", n=2
        )
    )
    return store_pb2.AuditEntry(
        revision=revision, time=now(), who=who, method=method, summary=summary, diff=diff
    )
