"""The config file read against the schema (the `GatewayConfig` protobuf message), in our words:
every problem at once, each with its field path, enum values listed, "did you mean" for a
misspelt field, and no library or Python wording (protobuf's parser stops at the first problem
and speaks of "Invalid enum value" and "invalid literal for int()").

`problems(data)` walks the YAML's mapping alongside the message descriptors; config.py parses
what it finds clean and runs the checks of meaning (checks.py) on the result.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import math
import re
from collections.abc import Iterator

from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor

_DURATION = re.compile(r"^-?\d+(\.\d{1,9})?s$")

_INTEGER_RANGE = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
_FLOATS = (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT)


def _kind(value) -> str:
    """What the YAML gave, in YAML's words."""
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return "a value of another kind"


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _fields(descriptor: Descriptor) -> dict[str, FieldDescriptor]:
    """Every name a field may be written with: the proto's and its lowerCamelCase JSON name."""
    names = {}
    for field in descriptor.fields:
        names[field.name] = field
        names[field.json_name] = field
    return names


def did_you_mean(word: str, choices) -> str:
    """' (did you mean 'x'?)' for the closest choice, or ''."""
    lowered = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.6)
    return f" (did you mean {lowered[close[0]]!r}?)" if close else ""


def problems(data, descriptor: Descriptor, path: str = "") -> Iterator[tuple[str, str]]:
    """(field path, reason) for every part of `data` (a YAML mapping) that is not a valid
    `descriptor` message in the JSON mapping."""
    if not isinstance(data, dict):
        yield path, f"must be a mapping of fields, not {_kind(data)}"
        return
    fields = _fields(descriptor)
    oneofs: dict[str, str] = {}
    for key, value in data.items():
        here = f"{path}.{key}" if path else str(key)
        field = fields.get(key) if isinstance(key, str) else None
        if field is None:
            names = sorted(f.name for f in descriptor.fields)
            hint = _nested(str(key), descriptor) or did_you_mean(str(key), names)
            yield (
                here,
                (
                    f"unknown field{hint}; {_message_name(descriptor)} has: {', '.join(names)}"
                    if not hint
                    else f"unknown field{hint}"
                ),
            )
            continue
        if value is None:
            continue  # YAML's empty value: the field stays unset, as protobuf's JSON reads it
        oneof = field.containing_oneof
        if oneof is not None and not _synthetic(oneof):
            if oneof.name in oneofs:
                choices = ", ".join(f.name for f in oneof.fields)
                yield here, f"set only one of {choices} (already set: {oneofs[oneof.name]})"
                continue
            oneofs[oneof.name] = field.name
        yield from _field_problems(value, field, here)


def _nested(key: str, descriptor: Descriptor) -> str:
    """' (it belongs in tfserving: ...)' when `key` is a field of one of this message's own
    sub-messages (a backend kind's options, say)."""
    homes = [
        f.name
        for f in descriptor.fields
        if f.message_type is not None
        and not f.message_type.GetOptions().map_entry
        and not f.message_type.full_name.startswith("google.protobuf.")
        and key in _fields(f.message_type)
    ]
    if not homes:
        return ""
    return f" (it belongs in {' or '.join(homes)}: write {homes[0]}: {{{key}: ...}})"


def _synthetic(oneof) -> bool:
    """proto3 `optional` fields sit in a oneof of their own: not a choice between fields."""
    return len(oneof.fields) == 1 and oneof.name == f"_{oneof.fields[0].name}"


def _message_name(descriptor: Descriptor) -> str:
    return descriptor.name


def _is_map(field: FieldDescriptor) -> bool:
    message = field.message_type
    return message is not None and message.GetOptions().map_entry


def _field_problems(value, field: FieldDescriptor, path: str) -> Iterator[tuple[str, str]]:
    if _is_map(field):
        if not isinstance(value, dict):
            yield path, f"must be a mapping of names to values, not {_kind(value)}"
            return
        value_field = field.message_type.fields_by_name["value"]
        for key, item in value.items():
            if not isinstance(key, str):
                yield f"{path}.{key}", "keys must be text"
            yield from _value_problems(item, value_field, f"{path}.{key}")
        return
    if field.is_repeated:
        if not isinstance(value, list):
            yield path, f"must be a list, not {_kind(value)}"
            return
        for i, item in enumerate(value):
            yield from _value_problems(item, field, f"{path}[{i}]")
        return
    yield from _value_problems(value, field, path)


def _value_problems(value, field: FieldDescriptor, path: str) -> Iterator[tuple[str, str]]:
    if value is None:
        if field.is_repeated:
            yield path, "empty list entry"
        return
    message = field.message_type
    if message is not None:
        if message.full_name == "google.protobuf.Duration":
            if not (isinstance(value, str) and _DURATION.match(value.strip())):
                yield (
                    path,
                    (
                        f"{_shown(value)} is not a duration: write seconds with an s, "
                        'e.g. "30s", "1.5s", "0.25s"'
                    ),
                )
            return
        if message.full_name == "google.protobuf.ListValue":
            if not isinstance(value, list):
                yield path, f"must be a list of values, not {_kind(value)}"
            return
        if message.full_name.startswith("google.protobuf."):
            return  # other well-known types: left to the parser
        yield from problems(value, message, path)
        return
    if field.enum_type is not None:
        reason = _enum_problem(value, field.enum_type)
        if reason:
            yield path, reason
        return
    kind = field.type
    if kind in _INTEGER_RANGE:
        low, high = _INTEGER_RANGE[kind]
        number = _integer(value)
        if number is None:
            yield path, f"{_shown(value)} is not a whole number"
        elif not low <= number <= high:
            yield path, f"{number} is out of range: must be {low} to {high}"
    elif kind in _FLOATS:
        if isinstance(value, bool) or not isinstance(value, int | float):
            if not (isinstance(value, str) and _is_float(value)):
                yield path, f"{_shown(value)} is not a number"
    elif kind == FieldDescriptor.TYPE_BOOL:
        if not isinstance(value, bool):
            yield path, f"{_shown(value)} is not true or false"
    elif kind == FieldDescriptor.TYPE_STRING:
        if not isinstance(value, str):
            hint = f' (quote it: "{value}")' if isinstance(value, int | float) else ""
            yield path, f"must be text, not {_kind(value)}{hint}"
    elif kind == FieldDescriptor.TYPE_BYTES:
        if not isinstance(value, str):
            yield path, f"must be base64 text, not {_kind(value)}"
        else:
            try:
                base64.b64decode(value + "=" * (-len(value) % 4), validate=False)
            except (binascii.Error, ValueError):
                yield path, f"{_shown(value)} is not base64"


def _integer(value) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
        return int(value)
    return None


def _is_float(text: str) -> bool:
    if text in ("NaN", "Infinity", "-Infinity"):
        return True
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _enum_problem(value, enum: EnumDescriptor) -> str | None:
    names = [v.name for v in enum.values if v.number != 0 or not v.name.endswith("UNSPECIFIED")]
    if isinstance(value, str):
        if value in enum.values_by_name:
            return None
        hint = did_you_mean(value, names)
        if not hint:
            # TRITON for BACKEND_KIND_TRITON: compare with the prefix left out too.
            short = {n.removeprefix(_prefix(enum)): n for n in names}
            close = difflib.get_close_matches(value.upper(), list(short), n=1, cutoff=0.6)
            hint = f" (did you mean {short[close[0]]!r}?)" if close else ""
        return f"{_shown(value)} is not a {enum.name}{hint}; use one of: {', '.join(names)}"
    if isinstance(value, int) and not isinstance(value, bool):
        if value in enum.values_by_number:
            return None
    return f"{_shown(value)} is not a {enum.name}; use one of: {', '.join(names)}"


def _prefix(enum: EnumDescriptor) -> str:
    """The common NAME_ prefix of an enum's values (BACKEND_KIND_), per the style guide."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_"


_TOKEN = re.compile(r"[^.\[\]]+|\[\d+\]")


def without(data: dict, paths) -> dict:
    """A copy of `data` with the values at `paths` (problems' field paths) left out, so the rest
    can be parsed and checked for meaning. A bad list entry drops its whole list."""
    import copy

    clean = copy.deepcopy(data)
    for path in paths:
        tokens = _TOKEN.findall(path)
        if tokens and tokens[-1].startswith("["):
            while tokens and tokens[-1].startswith("["):
                tokens.pop()
        if not tokens:
            continue
        parent = clean
        for token in tokens[:-1]:
            try:
                parent = parent[int(token[1:-1])] if token.startswith("[") else parent[token]
            except (KeyError, IndexError, TypeError, ValueError):
                parent = None
                break
        if isinstance(parent, dict):
            parent.pop(tokens[-1], None)
    return clean


def overlaps(path: str, other: str) -> bool:
    """Whether one field path is the other or lies inside it."""
    short, long = sorted((path, other), key=len)
    return not short or long == short or long.startswith((short + ".", short + "["))
