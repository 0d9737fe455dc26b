"""Writes the OpenAPI documents to docs/openapi/ (data-plane.json, admin.json), and first the .proto
comments they are described with (gateway/openapi/proto_comments.json, read by a gateway that
serves the documents). tests/test_openapi.py fails when a committed file differs from what this
writes; run it after changing a .proto, gateway/openapi/ or the admin API's read-only methods.

    .venv/bin/python scripts/gen_openapi.py           # write
    .venv/bin/python scripts/gen_openapi.py --check   # exit 1 and name the stale files
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DOCUMENTS = {"data_plane": "docs/openapi/data-plane.json", "admin": "docs/openapi/admin.json"}


def generated(write: bool = False) -> dict[pathlib.Path, bytes]:
    """Every generated file's path and fresh content. The documents read the comments from
    proto_comments.json: with `write`, it is rewritten before they are made."""
    from gateway import openapi
    from gateway.openapi import comments, schemas

    fresh = (json.dumps(comments.extract(), indent=2, ensure_ascii=False) + "\n").encode()
    if write and (not schemas.COMMENTS.exists() or schemas.COMMENTS.read_bytes() != fresh):
        schemas.COMMENTS.write_bytes(fresh)
        print(f"wrote {schemas.COMMENTS.relative_to(ROOT)}")
    for cached in (schemas.comments, openapi.document, openapi.document_json):
        cached.cache_clear()
    files = {schemas.COMMENTS: fresh}
    for kind, path in DOCUMENTS.items():
        files[ROOT / path] = openapi.document_json(kind)
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare, write nothing")
    args = parser.parse_args()
    stale = []
    for path, content in generated(write=not args.check).items():
        if path.exists() and path.read_bytes() == content:
            continue
        stale.append(path.relative_to(ROOT))
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
    if args.check and stale:
        print(f"stale: {', '.join(map(str, stale))}: run scripts/gen_openapi.py", file=sys.stderr)
        return 1
    for path in stale:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
