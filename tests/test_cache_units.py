"""The response cache's core (gateway/dataplane/layers/cache/store.py) on its own: the key, the LRU, TTL, single-flight.
No processes; an injected clock instead of sleeps. The cache as a layer, against real backends,
is tested in tests/test_cache.py."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as oip

from gateway.dataplane.layers.cache.store import (
    ENTRY_OVERHEAD,
    ResponseCache,
    _metadata,
    cacheable,
    request_key,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- the key -----------------------------------------------------------------------------------

names = st.text(min_size=1, max_size=12)
datatypes = st.sampled_from(["FP32", "INT64", "BYTES", "UINT8", "BOOL", "FP16"])
shapes = st.lists(st.integers(min_value=-1, max_value=2**40), min_size=0, max_size=4)
param_values = st.one_of(
    st.tuples(st.just("bool_param"), st.booleans()),
    st.tuples(st.just("int64_param"), st.integers(-(2**63), 2**63 - 1)),
    st.tuples(st.just("uint64_param"), st.integers(0, 2**64 - 1)),
    st.tuples(st.just("string_param"), st.text(max_size=8)),
    st.tuples(st.just("double_param"), st.floats(allow_nan=False)),
)
param_maps = st.dictionaries(names, param_values, max_size=4)


def set_params(target, params: dict) -> None:
    for name, (kind, value) in params.items():
        setattr(target[name], kind, value)


@st.composite
def requests(draw, raw: bool = True) -> oip.ModelInferRequest:
    """A request: 1-3 uniquely named inputs with raw (or typed) contents, 0-2 outputs,
    parameters."""
    request = oip.ModelInferRequest(
        model_name=draw(st.text(max_size=200)),
        model_version=draw(st.text(max_size=3)),
        id=draw(st.text(max_size=200)),  # > 127 bytes: two-byte length prefix
    )
    for name in draw(st.lists(names, min_size=1, max_size=3, unique=True)):
        tensor = request.inputs.add(name=name, datatype=draw(datatypes), shape=draw(shapes))
        set_params(tensor.parameters, draw(param_maps))
        contents = draw(st.binary(min_size=1, max_size=64))
        if raw:
            request.raw_input_contents.append(contents)
        else:
            tensor.contents.bytes_contents.append(contents)
    for name in draw(st.lists(names, max_size=2, unique=True)):
        set_params(request.outputs.add(name=name).parameters, draw(param_maps))
    set_params(request.parameters, draw(param_maps))
    return request


def key(request, revision=7, variant="stable") -> bytes:
    return request_key(revision, variant, request)


def copy(request) -> oip.ModelInferRequest:
    out = oip.ModelInferRequest()
    out.CopyFrom(request)
    return out


def long_fields() -> oip.ModelInferRequest:
    # Lengths whose prefixes take 1, 2 and 3 bytes; "é" is two bytes in UTF-8.
    request = oip.ModelInferRequest(model_name="m" * 127, model_version="é" * 64, id="i" * 20000)
    request.inputs.add(name="x", datatype="FP32", shape=[1]).contents.fp32_contents.append(1.5)
    return request


@settings(max_examples=200)
@given(st.one_of(requests(raw=True), requests(raw=False)))
@example(long_fields())
def test_the_key_covers_the_request_without_model_fields_id_and_nothing_else(request):
    cleared = copy(request)
    for field in ("model_name", "model_version", "id"):
        cleared.ClearField(field)
    assert key(request) == key(cleared)
    assert len(key(request)) == 32
    # What is hashed besides the raw contents is exactly the encoding of the rest.
    cleared.ClearField("raw_input_contents")
    names = [t.name for t in request.inputs]
    if names == sorted(names):
        order = range(len(names))
        assert bytes(_metadata(request, order)) == cleared.SerializeToString(deterministic=True)


def test_raw_contents_cannot_run_into_each_other():
    a, b = oip.ModelInferRequest(), oip.ModelInferRequest()
    for request, raw in ((a, (b"ab", b"c")), (b, (b"a", b"bc"))):
        request.inputs.add(name="x", datatype="BYTES", shape=[1])
        request.inputs.add(name="y", datatype="BYTES", shape=[1])
        request.raw_input_contents.extend(raw)
    assert key(a) != key(b)


@given(requests(), st.data())
def test_flipping_any_raw_byte_changes_the_key(request, data):
    i = data.draw(st.integers(0, len(request.raw_input_contents) - 1))
    raw = bytearray(request.raw_input_contents[i])
    at = data.draw(st.integers(0, len(raw) - 1))
    raw[at] ^= 1 << data.draw(st.integers(0, 7))
    changed = copy(request)
    changed.raw_input_contents[i] = bytes(raw)
    assert key(changed) != key(request)


@given(requests(), st.data())
def test_every_field_that_shapes_the_answer_changes_the_key(request, data):
    i = data.draw(st.integers(0, len(request.inputs) - 1))
    edits = []

    def shape(r):
        dims = r.inputs[i].shape
        if dims:
            dims[data.draw(st.integers(0, len(dims) - 1))] ^= 1
        else:
            dims.append(1)

    def datatype(r):
        r.inputs[i].datatype += "X"

    def input_name(r):
        r.inputs[i].name += "\0"

    def output_name(r):
        if r.outputs:
            r.outputs[0].name += "x"
        else:
            r.outputs.add(name="OUT")

    def parameter_value(r):
        if r.parameters:
            value = r.parameters[sorted(r.parameters)[0]]
            kind = value.WhichOneof("parameter_choice")
            if kind == "string_param":
                value.string_param += "x"
            elif kind == "bool_param":
                value.bool_param = not value.bool_param
            else:  # a different kind of the same number is a different parameter too
                value.string_param = str(getattr(value, kind))
        else:
            r.parameters["priority"].int64_param = 1

    def input_parameter(r):
        r.inputs[i].parameters["p"].bool_param = True
        r.inputs[i].parameters["p"].int64_param = 0

    def output_parameter(r):
        target = r.outputs[0] if r.outputs else r.outputs.add(name="OUT")
        target.parameters["classification"].int64_param = 12345

    edits = [shape, datatype, input_name, output_name, parameter_value, input_parameter]
    edits.append(output_parameter)
    base = key(request)
    for edit in edits:
        changed = copy(request)
        edit(changed)
        assert key(changed) != base, edit.__name__
    assert key(request, revision=8) != base
    assert key(request, variant="canary") != base


@given(st.one_of(requests(raw=True), requests(raw=False)), st.randoms(use_true_random=False))
def test_map_order_input_order_id_and_model_fields_do_not_change_the_key(request, rnd):
    shuffled = oip.ModelInferRequest(model_name="other", model_version="9", id="another call")
    order = list(range(len(request.inputs)))
    rnd.shuffle(order)
    for i in order:
        tensor = request.inputs[i]
        added = shuffled.inputs.add()
        added.CopyFrom(tensor)
        added.parameters.clear()
        items = list(tensor.parameters.items())
        rnd.shuffle(items)
        for name, value in items:
            added.parameters[name].CopyFrom(value)
        if request.raw_input_contents:
            shuffled.raw_input_contents.append(request.raw_input_contents[i])
    for output in request.outputs:  # the order asked is kept: backends answer in it
        added = shuffled.outputs.add(name=output.name)
        items = list(output.parameters.items())
        rnd.shuffle(items)
        for name, value in items:
            added.parameters[name].CopyFrom(value)
    items = list(request.parameters.items())
    rnd.shuffle(items)
    for name, value in items:
        shuffled.parameters[name].CopyFrom(value)
    assert key(shuffled) == key(request)


def test_output_order_and_raw_vs_typed_are_different_keys():
    typed = oip.ModelInferRequest()
    typed.inputs.add(name="x", datatype="INT32", shape=[2]).contents.int_contents.extend([1, 2])
    raw = oip.ModelInferRequest()
    raw.inputs.add(name="x", datatype="INT32", shape=[2])
    raw.raw_input_contents.append((1).to_bytes(4, "little") + (2).to_bytes(4, "little"))
    assert key(typed) != key(raw)

    a, b = copy(typed), copy(typed)
    a.outputs.add(name="A"), a.outputs.add(name="B")
    b.outputs.add(name="B"), b.outputs.add(name="A")
    assert key(a) != key(b)


def test_unpacked_wire_encoding_of_the_same_shape_is_the_same_key():
    packed = oip.ModelInferRequest()
    packed.inputs.add(name="x", datatype="FP32", shape=[1, 300])
    # The same tensor with `shape` (field 3) written unpacked, as an older encoder might.
    tensor = b"\x0a\x01x" + b"\x12\x04FP32" + b"\x18\x01" + b"\x18\xac\x02"
    unpacked = oip.ModelInferRequest.FromString(b"\x2a" + bytes([len(tensor)]) + tensor)
    assert unpacked.SerializeToString() != b"" and unpacked.inputs[0].shape == [1, 300]
    assert key(unpacked) == key(packed)


def test_revision_and_variant_cannot_run_into_each_other():
    request = oip.ModelInferRequest()
    assert request_key("1", "2stable", request) != request_key("12", "stable", request)
    assert request_key(1, "a", request) == request_key("1", "a", request)


def test_sequence_calls_are_not_cacheable():
    request = oip.ModelInferRequest()
    assert cacheable(request)
    request.parameters["priority"].int64_param = 1
    assert cacheable(request)
    request.parameters["sequence_id"].int64_param = 4
    assert not cacheable(request)


# --- the LRU -----------------------------------------------------------------------------------


def response(size: int, tag: str = "") -> oip.ModelInferResponse:
    """A response whose serialized size is exactly `size` bytes (size >= 3)."""
    out = oip.ModelInferResponse(model_name=tag)
    pad = size - out.ByteSize() - 1
    pad -= 1 if pad < 128 else 2
    out.raw_output_contents.append(b"\0" * pad)
    assert out.ByteSize() == size
    return out


def test_lru_evicts_least_recently_used_by_bytes():
    entry = 100
    unit = entry + ENTRY_OVERHEAD
    cache = ResponseCache(max_bytes=10 * unit, ttl=60)
    for i in range(10):
        assert cache.put(bytes([i]), response(entry, str(i)))
    assert (cache.entries, cache.bytes, cache.evictions) == (10, 10 * unit, 0)
    assert cache.get(bytes([0])).model_name == "0"  # 0 is now the most recently used
    cache.put(b"new", response(entry, "new"))
    assert cache.get(bytes([1])) is None  # the least recently used went
    assert cache.get(bytes([0])) is not None and cache.get(b"new") is not None
    assert (cache.entries, cache.bytes, cache.evictions) == (10, 10 * unit, 1)
    # An entry of max_bytes / 8 needs two entries' room: the two least recently used go.
    big = 10 * unit // 8 - ENTRY_OVERHEAD
    assert cache.put(b"big", response(big, "big"))
    assert cache.get(bytes([2])) is None and cache.get(bytes([3])) is None
    assert cache.get(bytes([4])) is not None
    assert (cache.entries, cache.evictions) == (9, 3)
    assert cache.bytes == 8 * unit + big + ENTRY_OVERHEAD
    # Replacing a key replaces its bytes, not adds to them.
    cache.put(b"big", response(entry, "small now"))
    assert cache.bytes == 9 * unit and cache.get(b"big").model_name == "small now"


def test_oversized_entries_are_not_stored():
    cache = ResponseCache(max_bytes=8 * 1024, ttl=60)
    assert cache.put(b"small", response(1024 - ENTRY_OVERHEAD))
    assert not cache.put(b"big", response(1024 - ENTRY_OVERHEAD + 1))
    assert cache.get(b"big") is None and cache.get(b"small") is not None
    assert (cache.oversize, cache.entries, cache.evictions) == (1, 1, 0)
    zero = ResponseCache(max_bytes=0, ttl=60)
    assert not zero.put(b"k", oip.ModelInferResponse()) and zero.entries == 0


def test_ttl_expiry_with_an_injected_clock():
    clock = Clock()
    cache = ResponseCache(max_bytes=1 << 20, ttl=10, clock=clock)
    cache.put(b"k", response(100, "v"))
    clock.now += 9.999
    assert cache.get(b"k").model_name == "v"  # reading does not extend the TTL
    clock.now += 0.001
    assert cache.get(b"k") is None
    assert (cache.entries, cache.bytes, cache.expirations) == (0, 0, 1)


def test_expired_entries_are_swept_on_put():
    clock = Clock()
    cache = ResponseCache(max_bytes=1 << 20, ttl=10, clock=clock)
    for i in range(5):
        cache.put(bytes([i]), response(100))
    clock.now += 5
    cache.put(b"young", response(100))
    clock.now += 6  # the first five expired, never read; the sweep runs at most every ttl/4
    cache.put(b"new", response(100))
    assert cache.entries == 2 and cache.expirations == 5
    assert cache.bytes == 2 * (100 + ENTRY_OVERHEAD)
    assert cache.get(b"young") is not None


def test_each_hit_is_a_fresh_message_and_put_takes_a_snapshot():
    cache = ResponseCache(max_bytes=1 << 20, ttl=60)
    stored = response(100, "backend-name")
    cache.put(b"k", stored)
    stored.model_name = "changed after put"
    first = cache.get(b"k")
    first.model_name, first.id = "public", "call-1"  # what the routing layer does
    second = cache.get(b"k")
    assert second is not first and second.model_name == "backend-name" and second.id == ""


def test_clear_forgets_everything():
    cache = ResponseCache(max_bytes=1 << 20, ttl=60)
    cache.put(b"k", response(100))
    cache.clear()
    assert cache.get(b"k") is None and (cache.entries, cache.bytes) == (0, 0)


def test_settings_are_checked():
    with pytest.raises(ValueError):
        ResponseCache(max_bytes=-1, ttl=1)
    with pytest.raises(ValueError):
        ResponseCache(max_bytes=1, ttl=0)
    ResponseCache(max_bytes=1, ttl=float("inf")).put(b"k", oip.ModelInferResponse())


# --- single-flight -----------------------------------------------------------------------------


class Loader:
    """A load that waits for `release`, counting calls; fails with `error` when set."""

    def __init__(self, error: Exception | None = None) -> None:
        self.calls = 0
        self.release = asyncio.Event()
        self.error = error
        self.cancelled = False

    async def __call__(self) -> oip.ModelInferResponse:
        self.calls += 1
        n = self.calls
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        if self.error is not None:
            raise self.error
        return response(100, f"answer {n}")


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_concurrent_identical_misses_make_one_load():
    cache = ResponseCache(max_bytes=1 << 20, ttl=60)
    load = Loader()
    tasks = [asyncio.create_task(cache.get_or_load(b"k", load)) for _ in range(100)]
    await settle()
    load.release.set()
    results = await asyncio.gather(*tasks)
    assert load.calls == 1
    assert sorted(hit for _, hit in results) == [False] + [True] * 99
    assert {r.model_name for r, _ in results} == {"answer 1"}
    assert len({id(r) for r, _ in results}) == 100  # each caller has its own message
    assert (cache.misses, cache.coalesced, cache.hits) == (1, 99, 0)
    # Now stored: a hit, with no load.
    again, hit = await cache.get_or_load(b"k", load)
    assert hit and again.model_name == "answer 1" and load.calls == 1 and cache.hits == 1


async def test_different_keys_load_separately():
    cache = ResponseCache(max_bytes=1 << 20, ttl=60)
    load = Loader()
    load.release.set()
    await asyncio.gather(cache.get_or_load(b"a", load), cache.get_or_load(b"b", load))
    assert load.calls == 2 and cache.entries == 2


async def test_errors_reach_every_waiter_and_are_not_cached():
    cache = ResponseCache(max_bytes=1 << 20, ttl=60)
    load = Loader(error=RuntimeError("backend down"))
    tasks = [asyncio.create_task(cache.get_or_load(b"k", load)) for _ in range(10)]
    await settle()
    load.release.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert load.calls == 1
    assert all(isinstance(r, RuntimeError) and str(r) == "backend down" for r in results)
    assert cache.entries == 0
    load.error = None
    answer, hit = await cache.get_or_load(b"k", load)
    assert not hit and answer.model_name == "answer 2" and load.calls == 2


async def test_a_waiter_cancelled_does_not_cancel_the_load():
    cache = ResponseCache(max_bytes=1 << 20, ttl=60)
    load = Loader()
    first = asyncio.create_task(cache.get_or_load(b"k", load))
    await settle()
    waiter = asyncio.create_task(cache.get_or_load(b"k", load))
    await settle()
    waiter.cancel()
    await settle()
    assert waiter.cancelled() and not load.cancelled
    load.release.set()
    answer, hit = await first
    assert not hit and answer.model_name == "answer 1" and load.calls == 1


async def test_the_loading_caller_cancelled_others_still_get_the_answer():
    cache = ResponseCache(max_bytes=1 << 20, ttl=60)
    load = Loader()
    leader = asyncio.create_task(cache.get_or_load(b"k", load))
    await settle()
    others = [asyncio.create_task(cache.get_or_load(b"k", load)) for _ in range(3)]
    await settle()
    leader.cancel()
    await settle()
    assert leader.cancelled() and not load.cancelled
    load.release.set()
    results = await asyncio.gather(*others)
    assert [(r.model_name, hit) for r, hit in results] == [("answer 1", True)] * 3
    assert load.calls == 1 and cache.entries == 1


async def test_when_every_caller_is_gone_the_load_is_cancelled():
    cache = ResponseCache(max_bytes=1 << 20, ttl=60)
    load = Loader()
    callers = [asyncio.create_task(cache.get_or_load(b"k", load)) for _ in range(2)]
    await settle()
    for caller in callers:
        caller.cancel()
    await settle()
    assert load.cancelled and cache.entries == 0
    # The next caller starts a new load rather than joining the cancelled one.
    load.release.set()
    answer, hit = await cache.get_or_load(b"k", load)
    assert not hit and answer.model_name == "answer 2"


async def test_a_caller_arriving_as_the_last_waiter_leaves_starts_a_new_load():
    cache = ResponseCache(max_bytes=1 << 20, ttl=60)
    load = Loader()
    caller = asyncio.create_task(cache.get_or_load(b"k", load))
    await settle()
    caller.cancel()
    # Runs after the caller has cancelled the load, before the load has unwound: it must not
    # join the dying load (it would get CancelledError) but start its own.
    newcomer = asyncio.create_task(cache.get_or_load(b"k", load))
    await settle()
    assert load.cancelled and load.calls == 2
    load.release.set()
    answer, hit = await newcomer
    assert not hit and answer.model_name == "answer 2"


async def test_a_load_started_before_clear_is_not_stored():
    cache = ResponseCache(max_bytes=1 << 20, ttl=60)
    old_load, new_load = Loader(), Loader()
    before = asyncio.create_task(cache.get_or_load(b"k", old_load))
    await settle()
    cache.clear()
    after = asyncio.create_task(cache.get_or_load(b"k", new_load))  # does not join the old load
    await settle()
    assert (old_load.calls, new_load.calls) == (1, 1)
    old_load.release.set()
    old, hit = await before
    assert not hit and old.model_name == "answer 1"  # its caller still gets it...
    assert cache.entries == 0  # ...but it was not stored
    new_load.release.set()
    await after
    assert cache.entries == 1
