"""Append-only audit log of admin changes: who, when, what, and the diff (JSON lines)."""

from __future__ import annotations

import difflib
import json
import os
import pathlib
import time

from google.protobuf import json_format


def routes_text(routes) -> list[str]:
    return json.dumps(
        [json_format.MessageToDict(r, preserving_proto_field_name=True) for r in routes],
        indent=1,
        sort_keys=True,
    ).splitlines()


class AuditLog:
    def __init__(self, directory: str | pathlib.Path) -> None:
        self.path = pathlib.Path(directory) / "audit.jsonl"

    def record(self, *, who: str, method: str, revision: int, summary: str, before, after) -> None:
        diff = "\n".join(
            difflib.unified_diff(
                routes_text(before), routes_text(after), "before", "after", lineterm="", n=2
            )
        )
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "who": who,
            "method": method,
            "revision": revision,
            "summary": summary,
            "diff": diff,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())
