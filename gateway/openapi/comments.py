"""The comments of the .proto files, by full protobuf name, for the documents' descriptions.

Generated modules carry no comments (protoc leaves source info out of them), so protoc is run once
more with --include_source_info by scripts/gen_openapi.py, which writes the result next to
schemas.py (proto_comments.json, package data): an installed gateway has no protoc and no .proto
files. tests/test_openapi.py checks the file against a fresh extraction."""

from __future__ import annotations

import pathlib
import re
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROTOS = ROOT / "protos"
SOURCES = ("tensorgate/admin/v1/admin.proto", "tensorgate/config/v1/config.proto")

# FileDescriptorProto / DescriptorProto / ServiceDescriptorProto field numbers (descriptor.proto).
_FILE_MESSAGE, _FILE_ENUM, _FILE_SERVICE = 4, 5, 6
_MESSAGE_FIELD, _MESSAGE_NESTED, _MESSAGE_ENUM = 2, 3, 4
_ENUM_VALUE, _SERVICE_METHOD = 2, 2


def extract() -> dict[str, str]:
    """{full name: comment} for the messages, fields, enums, enum values (`Enum.full.VALUE`),
    services and methods of SOURCES. Needs grpcio-tools (the dev extra)."""
    import grpc_tools
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "set.binpb"
        args = ["protoc", f"-I{PROTOS}", f"-I{well_known}", "--include_source_info"]
        if protoc.main([*args, f"--descriptor_set_out={out}", *SOURCES]) != 0:
            raise RuntimeError(f"protoc failed on {SOURCES}")
        files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    found: dict[str, str] = {}
    for file in files:
        names = _names(file)
        for location in file.source_code_info.location:
            name = names.get(tuple(location.path))
            text = _clean(location.leading_comments or location.trailing_comments)
            if name and text:
                found[name] = text
    return dict(sorted(found.items()))


def _names(file) -> dict[tuple[int, ...], str]:
    """Source-info path -> full name, for everything in one file."""
    names: dict[tuple[int, ...], str] = {}
    package = file.package

    def enum(path, scope, descriptor):
        full = f"{scope}.{descriptor.name}"
        names[path] = full
        for i, value in enumerate(descriptor.value):
            names[(*path, _ENUM_VALUE, i)] = f"{full}.{value.name}"

    def message(path, scope, descriptor):
        full = f"{scope}.{descriptor.name}"
        names[path] = full
        for i, field in enumerate(descriptor.field):
            names[(*path, _MESSAGE_FIELD, i)] = f"{full}.{field.name}"
        for i, nested in enumerate(descriptor.nested_type):
            message((*path, _MESSAGE_NESTED, i), full, nested)
        for i, nested in enumerate(descriptor.enum_type):
            enum((*path, _MESSAGE_ENUM, i), full, nested)

    for i, descriptor in enumerate(file.message_type):
        message((_FILE_MESSAGE, i), package, descriptor)
    for i, descriptor in enumerate(file.enum_type):
        enum((_FILE_ENUM, i), package, descriptor)
    for i, service in enumerate(file.service):
        full = f"{package}.{service.name}"
        names[(_FILE_SERVICE, i)] = full
        for j, method in enumerate(service.method):
            names[(_FILE_SERVICE, i, _SERVICE_METHOD, j)] = f"{full}.{method.name}"
    return names


def _clean(comment: str) -> str:
    """A comment as Markdown: lines wrapped at 100 columns in the .proto joined into paragraphs."""
    paragraphs = re.split(r"\n\s*\n", comment.strip())
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines()) for p in paragraphs)
