"""Generate docs/config.schema.json, a JSON Schema of the gateway's YAML config, from the
`tensorgate.config.v1.GatewayConfig` protobuf message, for editors (e.g. VS Code's YAML extension:
`# yaml-language-server: $schema=<path>/docs/config.schema.json` on a config's first line).

    .venv/bin/python scripts/gen_config_schema.py          # rewrite docs/config.schema.json
    .venv/bin/python scripts/gen_config_schema.py --check  # exit 1 when it is out of date

Field names are the proto's (snake_case; the loader also accepts lowerCamelCase, the schema does
not list those), enums by name, durations as strings such as "1.5s". tests/test_cli_help.py
checks the committed file matches the proto.
"""

from __future__ import annotations

import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "docs" / "config.schema.json"
sys.path[:0] = [str(ROOT), str(ROOT / "protos")]

_INTEGERS = {
    "TYPE_INT32": (-(2**31), 2**31 - 1), "TYPE_SINT32": (-(2**31), 2**31 - 1),
    "TYPE_SFIXED32": (-(2**31), 2**31 - 1), "TYPE_UINT32": (0, 2**32 - 1),
    "TYPE_FIXED32": (0, 2**32 - 1), "TYPE_INT64": (-(2**63), 2**63 - 1),
    "TYPE_SINT64": (-(2**63), 2**63 - 1), "TYPE_SFIXED64": (-(2**63), 2**63 - 1),
    "TYPE_UINT64": (0, 2**64 - 1), "TYPE_FIXED64": (0, 2**64 - 1),
}  # fmt: skip


def schema() -> dict:
    from google.protobuf.descriptor import FieldDescriptor

    from tensorgate.config.v1 import config_pb2

    names = {getattr(FieldDescriptor, n): n for n in dir(FieldDescriptor) if n.startswith("TYPE_")}
    defs: dict[str, dict] = {}

    def value(field) -> dict:
        if field.message_type is not None:
            full = field.message_type.full_name
            if full == "google.protobuf.Duration":
                return {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]{1,9})?s$",
                        "description": 'a duration in seconds, e.g. "30s", "1.5s"'}  # fmt: skip
            if full == "google.protobuf.ListValue":  # SmokeTensor.data: KServe v2 JSON `data`
                return {"type": "array", "description": "values, flat or nested: numbers, "
                        "true/false, text or {b64: ...}"}  # fmt: skip
            return {"$ref": f"#/$defs/{message(field.message_type)}"}
        if field.enum_type is not None:
            values = [v.name for v in field.enum_type.values]
            return {"enum": values, "description": f"{field.enum_type.name}: {', '.join(values)}"}
        kind = names[field.type]
        if kind in _INTEGERS:
            low, high = _INTEGERS[kind]
            return {"type": "integer", "minimum": low, "maximum": high}
        if kind in ("TYPE_DOUBLE", "TYPE_FLOAT"):
            return {"type": "number"}
        if kind == "TYPE_BOOL":
            return {"type": "boolean"}
        if kind == "TYPE_BYTES":
            return {"type": "string", "contentEncoding": "base64"}
        return {"type": "string"}

    def message(descriptor) -> str:
        name = descriptor.full_name.removeprefix("tensorgate.config.v1.")
        if name in defs:
            return name
        defs[name] = {}  # placeholder: recursion
        properties = {}
        for field in descriptor.fields:
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                entry = field.message_type.fields_by_name["value"]
                properties[field.name] = {"type": "object", "additionalProperties": value(entry)}
            elif field.is_repeated:
                properties[field.name] = {"type": "array", "items": value(field)}
            else:
                properties[field.name] = value(field)
        body = {"type": "object", "additionalProperties": False, "properties": properties}
        oneofs = [
            [f.name for f in o.fields]
            for o in descriptor.oneofs
            if not (len(o.fields) == 1 and o.name == f"_{o.fields[0].name}")
        ]
        if oneofs:
            body["allOf"] = [
                {"not": {"anyOf": [{"required": [a, b]} for a in group for b in group if a < b]}}
                for group in oneofs
                if len(group) > 1
            ]
        defs[name] = body
        return name

    root = message(config_pb2.GatewayConfig.DESCRIPTOR)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://github.com/tensorgate/tensorgate/docs/config.schema.json",
        "title": "tensorgate gateway config (tensorgate.config.v1.GatewayConfig)",
        "description": "Generated from protos/tensorgate/config/v1/config.proto by "
        "scripts/gen_config_schema.py; the proto documents every field.",
        "$ref": f"#/$defs/{root}",
        "$defs": dict(sorted(defs.items())),
    }


def render() -> str:
    return json.dumps(schema(), indent=2) + "\n"


if __name__ == "__main__":
    text = render()
    if sys.argv[1:] == ["--check"]:
        if OUTPUT.read_text() != text:
            sys.exit(f"{OUTPUT} is out of date: run scripts/gen_config_schema.py")
        sys.exit(0)
    OUTPUT.write_text(text)
