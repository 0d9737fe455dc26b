"""Protobuf messages as JSON Schema (OpenAPI 3.1 is JSON Schema 2020-12), by the proto3 JSON
mapping that google.protobuf.json_format reads and writes: field names as in the .proto (the
admin API and the data plane print them so, like the config file), 64-bit integers as decimal
strings (numbers accepted), floats as numbers or "NaN"/"Infinity"/"-Infinity", enums by name,
bytes as base64, maps as objects, and the well-known types in their JSON forms (a Duration is
"1.5s", a Timestamp RFC 3339). Each message and enum becomes one component, named by its full
protobuf name, described by its comment in the .proto (proto_comments.json)."""

from __future__ import annotations

import functools
import json
import pathlib

from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor

COMMENTS = pathlib.Path(__file__).with_name("proto_comments.json")

_I32 = (-(1 << 31), (1 << 31) - 1)
_U32 = (0, (1 << 32) - 1)
_INT = {
    FieldDescriptor.TYPE_INT32: _I32,
    FieldDescriptor.TYPE_SINT32: _I32,
    FieldDescriptor.TYPE_SFIXED32: _I32,
    FieldDescriptor.TYPE_UINT32: _U32,
    FieldDescriptor.TYPE_FIXED32: _U32,
}
# Printed as strings by the mapping; the string forms are kept within the type's range (18 and 19
# digits) so a value the schema allows is one the parser takes.
_INT64 = {
    FieldDescriptor.TYPE_INT64: ((-(1 << 63), (1 << 63) - 1), "^-?[0-9]{1,18}$"),
    FieldDescriptor.TYPE_SINT64: ((-(1 << 63), (1 << 63) - 1), "^-?[0-9]{1,18}$"),
    FieldDescriptor.TYPE_SFIXED64: ((-(1 << 63), (1 << 63) - 1), "^-?[0-9]{1,18}$"),
    FieldDescriptor.TYPE_UINT64: ((0, (1 << 64) - 1), "^[0-9]{1,19}$"),
    FieldDescriptor.TYPE_FIXED64: ((0, (1 << 64) - 1), "^[0-9]{1,19}$"),
}
_FLOAT_MAX = 3.4028234663852886e38
_NOT_A_NUMBER = "^(NaN|-?Infinity)$"

_WELL_KNOWN: dict[str, dict] = {
    "google.protobuf.Duration": {
        "type": "string",
        # Within Duration's range (315,576,000,000 s), so the parser takes what the schema allows.
        "pattern": "^-?[0-9]{1,11}(\\.[0-9]{1,9})?s$",
        "description": 'A duration in seconds with an "s" suffix, e.g. "30s", "0.250s".',
        "examples": ["30s"],
    },
    "google.protobuf.Timestamp": {
        "type": "string",
        "format": "date-time",
        "description": 'An RFC 3339 time in UTC, e.g. "2026-12-06T07:00:00Z".',
    },
    "google.protobuf.Empty": {"type": "object", "additionalProperties": False},
    "google.protobuf.Struct": {"type": "object"},
    "google.protobuf.Value": {},
    "google.protobuf.ListValue": {"type": "array"},
    "google.protobuf.FieldMask": {"type": "string"},
    "google.protobuf.Any": {
        "type": "object",
        "properties": {"@type": {"type": "string"}},
        "required": ["@type"],
    },
}
_WRAPPERS = {
    f"google.protobuf.{name}Value"
    for name in ("Double", "Float", "Int64", "UInt64", "Int32", "UInt32", "Bool", "String", "Bytes")
}


@functools.cache
def comments() -> dict[str, str]:
    """Full protobuf name -> its comment in the .proto (scripts/gen_openapi.py writes the file)."""
    try:
        return json.loads(COMMENTS.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}


def scalar(field: FieldDescriptor) -> dict:
    """The JSON Schema of one value of a non-message field."""
    kind = field.type
    if kind in _INT:
        low, high = _INT[kind]
        # (examples: the page would otherwise show the maximum as every number's example)
        return {"type": "integer", "minimum": low, "maximum": high, "examples": [0]}
    if kind in _INT64:
        (low, high), pattern = _INT64[kind]
        return {
            "type": ["integer", "string"],
            "minimum": low,
            "maximum": high,
            "pattern": pattern,
            "description": "64-bit integer: printed as a decimal string; a number is accepted.",
            "examples": ["0"],
        }
    if kind in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        schema: dict = {"type": ["number", "string"], "pattern": _NOT_A_NUMBER, "examples": [0]}
        if kind == FieldDescriptor.TYPE_FLOAT:
            schema.update(minimum=-_FLOAT_MAX, maximum=_FLOAT_MAX)
        return schema
    if kind == FieldDescriptor.TYPE_BOOL:
        return {"type": "boolean"}
    if kind == FieldDescriptor.TYPE_STRING:
        return {"type": "string"}
    if kind == FieldDescriptor.TYPE_BYTES:
        return {"type": "string", "contentEncoding": "base64"}
    raise TypeError(f"no JSON mapping for field {field.full_name} of type {kind}")


class Components:
    """The schemas a document refers to, gathered as messages are named: `ref(descriptor)` gives
    a reference and records the message (and every message and enum it reaches)."""

    def __init__(self) -> None:
        self.schemas: dict[str, dict] = {}

    def ref(self, descriptor: Descriptor | EnumDescriptor) -> dict:
        name = descriptor.full_name
        if name not in self.schemas:
            self.schemas[name] = {}  # placed first: recursive messages refer to themselves
            if isinstance(descriptor, EnumDescriptor):
                self.schemas[name] = _enum(descriptor)
            else:
                self.schemas[name] = self._message(descriptor)
        return {"$ref": f"#/components/schemas/{name}"}

    def _message(self, message: Descriptor) -> dict:
        if message.full_name in _WELL_KNOWN:
            return dict(_WELL_KNOWN[message.full_name])
        if message.full_name in _WRAPPERS:
            return self._value(message.fields_by_name["value"])
        properties = {}
        for field in message.fields:
            schema = self.field(field)
            text = comments().get(field.full_name)
            if text:
                schema = {**schema, "description": text}
            properties[field.name] = schema
        schema: dict = {"type": "object", "title": message.name}
        text = comments().get(message.full_name)
        if text:
            schema["description"] = text
        schema["properties"] = properties
        schema["additionalProperties"] = False
        exclusive = [
            [f.name for f in oneof.fields]
            for oneof in message.oneofs
            if not _synthetic(oneof) and len(oneof.fields) > 1
        ]
        if exclusive:
            # The parser refuses a message that sets two members of one oneof.
            schema["not"] = {
                "anyOf": [
                    {"required": [a, b]}
                    for names in exclusive
                    for i, a in enumerate(names)
                    for b in names[i + 1 :]
                ]
            }
        return schema

    def field(self, field: FieldDescriptor) -> dict:
        """The schema of a field's JSON value (a list for repeated, an object for a map)."""
        if field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
            key, value = field.message_type.fields
            keys = {"type": "string"}
            if key.type != FieldDescriptor.TYPE_STRING:
                keys["pattern"] = "^(true|false)$" if key.type == key.TYPE_BOOL else "^-?[0-9]+$"
            return {
                "type": "object",
                "propertyNames": keys,
                "additionalProperties": self._value(value),
            }
        if field.is_repeated:
            return {"type": "array", "items": self._value(field)}
        return self._value(field)

    def _value(self, field: FieldDescriptor) -> dict:
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            return self.ref(field.message_type)
        if field.type == FieldDescriptor.TYPE_ENUM:
            return self.ref(field.enum_type)
        return scalar(field)


def _enum(enum: EnumDescriptor) -> dict:
    names = [value.name for value in enum.values]
    schema: dict = {"type": "string", "title": enum.name, "enum": names}
    described = [
        f"- `{value.name}`: {comments()[f'{enum.full_name}.{value.name}']}"
        for value in enum.values
        if f"{enum.full_name}.{value.name}" in comments()
    ]
    text = "\n".join(filter(None, [comments().get(enum.full_name, ""), *described]))
    if text:
        schema["description"] = text
    return schema


def _synthetic(oneof) -> bool:
    """A proto3 `optional` field's one-member oneof, not a real choice."""
    return len(oneof.fields) == 1 and oneof.name == f"_{oneof.fields[0].name}"
