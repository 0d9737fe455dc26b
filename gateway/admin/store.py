"""Where route-table revisions live between restarts.

`RevisionStore` is the interface (a distributed store such as etcd can implement it);
`FileStore` is the embedded default: one JSON file holding the recent history, rewritten with an
atomic replace (write a temp file, fsync, rename) so a crash leaves either the old or the new
history, never half of one. Each revision carries the full route list as the same
`tensorgate.config.v1.Route` messages the YAML file and the admin API use.
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from dataclasses import dataclass
from typing import Protocol

from google.protobuf import json_format

from tensorgate.config.v1 import config_pb2


@dataclass(frozen=True)
class StoredRevision:
    number: int
    created_at: float  # unix seconds
    author: str
    summary: str
    routes: tuple[config_pb2.Route, ...]


class RevisionStore(Protocol):
    def latest(self) -> StoredRevision | None: ...

    def get(self, number: int) -> StoredRevision | None: ...

    def history(self) -> list[StoredRevision]:
        """Newest first."""
        ...

    def append(self, revision: StoredRevision) -> None: ...


def _encode(revision: StoredRevision) -> dict:
    return {
        "number": revision.number,
        "created_at": revision.created_at,
        "author": revision.author,
        "summary": revision.summary,
        "routes": [
            json_format.MessageToDict(r, preserving_proto_field_name=True) for r in revision.routes
        ],
    }


def _decode(data: dict) -> StoredRevision:
    return StoredRevision(
        number=int(data["number"]),
        created_at=float(data["created_at"]),
        author=str(data["author"]),
        summary=str(data["summary"]),
        routes=tuple(json_format.ParseDict(r, config_pb2.Route()) for r in data["routes"]),
    )


class FileStore:
    def __init__(self, directory: str | pathlib.Path, keep: int = 100) -> None:
        self.path = pathlib.Path(directory) / "routes.json"
        self._keep = max(2, keep)
        self._revisions: list[StoredRevision] = []
        if self.path.exists():
            data = json.loads(self.path.read_text(encoding="utf-8"))
            self._revisions = [_decode(r) for r in data["revisions"]]

    def latest(self) -> StoredRevision | None:
        return self._revisions[0] if self._revisions else None

    def get(self, number: int) -> StoredRevision | None:
        return next((r for r in self._revisions if r.number == number), None)

    def history(self) -> list[StoredRevision]:
        return list(self._revisions)

    def append(self, revision: StoredRevision) -> None:
        revisions = [revision, *self._revisions][: self._keep]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = json.dumps({"revisions": [_encode(r) for r in revisions]}, indent=1)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".routes-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            pathlib.Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
        self._revisions = revisions
