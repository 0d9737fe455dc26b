"""The response cache's core: a canonical request key, a byte-bounded LRU with TTL, single-flight.

For models a route declares deterministic, an answer is a function of (route revision, variant,
request): `request_key` hashes exactly that, `ResponseCache` keeps answers by key, and
`get_or_load` makes N concurrent identical misses cost one backend call. The layer that wires it
in (after validation, routing and fallback, so the key's variant is the one that answers) owns
the settings, the metrics and the trailer; this module knows nothing of them.

Key. What identifies an answer: route revision, variant, and the request's inputs (name,
datatype, shape, parameters, typed contents), raw input contents, requested outputs (name,
parameters, in the order asked, since backends answer in that order) and request parameters.
Not `model_name` / `model_version` as sent (the caller may pin; the variant says what answers)
and not `id` (it only labels the call). Inputs are taken in name order (with their raw contents),
since they are matched by name. The canonical form is protobuf's deterministic encoding of the
request without those fields and without the raw contents: maps written sorted by key, repeated
scalars always packed, defaults omitted, so encodings of the same message that differ on the wire
(map order, unpacked shapes) hash alike. The raw contents are then hashed one by one, not
serialized again. Every part is length-prefixed, so no two different requests hash the same
byte string; the hash is SHA-256 (32 bytes): a collision, which would answer one caller with
another's result, needs ~2^128 work even for someone trying. SHA-256 rather than BLAKE2b: with
SHA-NI (x86 since Ice Lake / Zen, ARMv8; this machine has it) 1 MB takes 730 us against 1370 us;
keys must not depend on the machine (a cache shared between replicas), so the choice is fixed.
Typed contents and raw contents of the same values make DIFFERENT keys: making them one would
mean encoding typed values per datatype (BYTES framing, FP16 has no typed field, bool width) on
every call, for the rare caller who mixes both forms; the cost is a miss, never a wrong answer.
`-0.0` / `0.0` and NaN payloads differ in bytes and so in key, for the same reason.

Costs (this machine: 2 vCPU Xeon with SHA-NI, Python 3.11, protobuf 7.36 upb; min of repeats
with other test suites running, so upper bounds):
  request_key, one input, one output, a parameter   1 KB: raw ~8 us, typed ~5 us
                                                    1 MB: raw ~785 us, typed ~870 us
  (two inputs sent out of name order: +~1 us; at 1 MB it is all SHA-256, ~1.3 GB/s)
  get, a hit: parse a fresh ModelInferResponse      1 KB: ~0.8 us;  1 MB: ~41 us
  put, serialize the response                       1 KB: ~1.1 us;  1 MB: ~110 us

Values. Entries are the response serialized (at `put`, or when a load completes), and every hit
parses a fresh message: the routing layer writes `model_name` / `model_version` (and the layer
`id`) into the response it returns, so a shared message would carry one caller's names to the
next. A fresh message per hit costs the parse above and makes the returned response the
caller's own to mutate. An entry's size is len(bytes) + ENTRY_OVERHEAD (the key, the tuple,
the dict slot); `bytes` reports that sum.

Single-flight. Errors are never stored, and a load's error reaches every caller waiting on it
(the same exception object; after it, the next call loads again). The load runs as its own task:
a waiter's cancellation never cancels it for the others, and when the caller that started it is
cancelled the rest still get the answer; only when every caller waiting on it has gone is it
cancelled, since no one wants it. The load runs with its starter's deadline, so its
DEADLINE_EXCEEDED reaches the others too. Callers that joined a load get hit=True (their
answer cost no backend call of theirs) and count in `coalesced`, not in `hits`.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from tritonclient.grpc import service_pb2 as oip

# len(bytes) does not see what an entry costs beyond its value: the 32-byte key (65 bytes as a
# Python object), the (value, expires) tuple and float (~80), the OrderedDict slot and links
# (~100). Rounded up, so many tiny entries cannot exceed the byte bound by much.
ENTRY_OVERHEAD = 256
# Bumped whenever the key's layout changes, so keys of different layouts never meet (a shared
# cache across replicas running different versions).
_KEY_VERSION = b"tensorgate.response-cache.key.v1\0"
_SEQUENCE_PARAMETERS = ("sequence_id", "sequence_start", "sequence_end")


def _varint_size(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


def _order(request: oip.ModelInferRequest) -> range | list[int]:
    """The inputs' indices in name order: inputs are matched by name, so the order they are sent
    in means nothing. raw[i] belongs to inputs[i]; with any other count (invalid, refused by
    validation) the order as sent is kept rather than guess at pairs."""
    inputs = request.inputs
    n = len(inputs)
    if n > 1:
        names = [t.name for t in inputs]
        raw = len(request.raw_input_contents)
        if names != sorted(names) and (not raw or raw == n):
            return sorted(range(n), key=names.__getitem__)
    return range(n)


def _metadata(request: oip.ModelInferRequest, order: range | list[int]) -> bytes | memoryview:
    """The deterministic encoding of the request without model_name, model_version, id and
    raw_input_contents, inputs in `order`.

    Deterministic encoding writes known fields in field-number order and maps sorted by key.
    Without raw contents: model_name (1), model_version (2) and id (3) are the first fields,
    strings, so they are exactly the encoding's first `skip` bytes, and a view past them is the
    rest: typed contents (possibly large) are copied only by that one serialization, and the
    caller's message is never edited.
    With raw contents the inputs carry no data: a copy of parameters, inputs and outputs is a
    few microseconds, and the raw bytes are hashed as they are rather than serialized too (upb
    encodes some large messages ~10x slower than others: 2 x 512 KB raw took 1.1 ms, 1 x 1 MB
    0.12 ms). Unknown fields would be included; validation refuses them before this runs."""
    if request.raw_input_contents or not isinstance(order, range):
        inputs = request.inputs
        return oip.ModelInferRequest(
            parameters=request.parameters,
            inputs=[inputs[i] for i in order],
            outputs=request.outputs,
        ).SerializeToString(deterministic=True)
    data = request.SerializeToString(deterministic=True)
    skip = 0
    for field in (request.model_name, request.model_version, request.id):
        if field:
            n = len(field.encode())
            skip += 1 + _varint_size(n) + n  # tag, length, bytes
    return memoryview(data)[skip:]


def request_key(revision: int | str, variant: str, request: oip.ModelInferRequest) -> bytes:
    """The 32-byte cache key of `request` answered by `variant` under route `revision`."""
    rev = str(revision).encode()
    var = variant.encode()
    order = _order(request)
    meta = _metadata(request, order)
    # Every part is preceded by its length, so parts cannot run into each other ("ab"+"c" vs
    # "a"+"bc"), and the raw contents by their count.
    raw = request.raw_input_contents
    h = hashlib.sha256(
        b"".join(
            (
                _KEY_VERSION,
                len(rev).to_bytes(8, "little"),
                rev,
                len(var).to_bytes(8, "little"),
                var,
                len(meta).to_bytes(8, "little"),
            )
        )
    )
    h.update(meta)
    h.update(len(raw).to_bytes(8, "little"))
    if raw:
        if len(raw) != len(order):
            order = range(len(raw))
        for i in order:
            contents = raw[i]
            h.update(len(contents).to_bytes(8, "little"))
            h.update(contents)
    return h.digest()


def cacheable(request: oip.ModelInferRequest) -> bool:
    """False for requests whose answer depends on more than the request: a sequence's calls
    (extension_sequence) answer from state the backend keeps between them. (Shared-memory
    parameters, the other such case, are refused by validation before any layer sees them.)"""
    params = request.parameters
    return not params or not any(name in params for name in _SEQUENCE_PARAMETERS)


class _Flight:
    """One load in progress, and how many callers are waiting on it."""

    __slots__ = ("task", "waiters")

    def __init__(self) -> None:
        self.task: asyncio.Future | None = None
        self.waiters = 0


class ResponseCache:
    """Byte-bounded LRU of serialized responses with a TTL, and single-flight loading.

    Not thread-safe: one event loop owns it (as the gateway's request path does)."""

    def __init__(
        self,
        max_bytes: int,
        ttl: float,
        clock: Callable[[], float] = time.monotonic,
        *,
        message_type: type = oip.ModelInferResponse,
    ) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        if not ttl > 0:
            raise ValueError(f"ttl must be > 0 seconds (math.inf for none), got {ttl}")
        self._max_bytes = max_bytes
        # One answer may not push out more than an eighth of the cache.
        self._max_entry = max_bytes // 8
        self._ttl = ttl
        self._clock = clock
        self._parse = message_type.FromString
        # key -> (serialized response, expiry), least recently used first.
        self._entries: OrderedDict[bytes, tuple[bytes, float]] = OrderedDict()
        self._flights: dict[bytes, _Flight] = {}
        self._bytes = 0
        # Loads started before clear() must not store into the cleared cache.
        self._generation = 0
        # Expired entries are dropped when read, and by a full sweep at most once per
        # _sweep_every on put: sweeping on every put would be O(entries) per put, and an
        # expired entry that is never read drifts to the least recently used end and is evicted
        # first anyway.
        self._sweep_every = max(ttl / 4, 1.0)
        self._next_sweep = clock() + self._sweep_every
        self._hits = self._misses = self._coalesced = 0
        self._evictions = self._expirations = self._oversize = 0

    # --- stats, for metrics ---------------------------------------------------------------------

    @property
    def hits(self) -> int:
        """Answers from a stored entry."""
        return self._hits

    @property
    def misses(self) -> int:
        """`get` calls that found nothing, and loads `get_or_load` started."""
        return self._misses

    @property
    def coalesced(self) -> int:
        """`get_or_load` calls answered by a load another caller had started."""
        return self._coalesced

    @property
    def evictions(self) -> int:
        """Entries removed to stay within max_bytes (expiry is counted in `expirations`)."""
        return self._evictions

    @property
    def expirations(self) -> int:
        return self._expirations

    @property
    def oversize(self) -> int:
        """Answers not stored because they exceed max_bytes / 8."""
        return self._oversize

    @property
    def bytes(self) -> int:
        """Bytes held: stored responses plus ENTRY_OVERHEAD each."""
        return self._bytes

    @property
    def entries(self) -> int:
        return len(self._entries)

    # --- the LRU ------------------------------------------------------------------------------

    def get(self, key: bytes):
        """A fresh response for `key` (the caller's own to mutate), or None."""
        data = self._lookup(key)
        if data is None:
            self._misses += 1
            return None
        self._hits += 1
        return self._parse(data)

    def put(self, key: bytes, response) -> bool:
        """Store `response` as it is now (later changes to it are not seen); False when it is
        too large to be stored."""
        return self._store(key, response.SerializeToString())

    def clear(self) -> None:
        """Forget every entry, and every load in progress (they finish for their callers but
        store nothing; the next caller loads again)."""
        self._entries.clear()
        self._bytes = 0
        self._flights.clear()
        self._generation += 1

    def _lookup(self, key: bytes) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        data, expires = entry
        if self._clock() >= expires:
            del self._entries[key]
            self._bytes -= len(data) + ENTRY_OVERHEAD
            self._expirations += 1
            return None
        self._entries.move_to_end(key)
        return data

    def _store(self, key: bytes, data: bytes) -> bool:
        size = len(data) + ENTRY_OVERHEAD
        if size > self._max_entry:
            self._oversize += 1
            return False
        entries = self._entries
        old = entries.pop(key, None)
        if old is not None:
            self._bytes -= len(old[0]) + ENTRY_OVERHEAD
        now = self._clock()
        entries[key] = (data, now + self._ttl)
        self._bytes += size
        if now >= self._next_sweep:
            self._sweep(now)
        # size <= max_bytes / 8, so the entry just stored is never the one evicted.
        while self._bytes > self._max_bytes:
            _, (evicted, _) = entries.popitem(last=False)
            self._bytes -= len(evicted) + ENTRY_OVERHEAD
            self._evictions += 1
        return True

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + self._sweep_every
        expired = [k for k, (_, expires) in self._entries.items() if now >= expires]
        for k in expired:
            data, _ = self._entries.pop(k)
            self._bytes -= len(data) + ENTRY_OVERHEAD
        self._expirations += len(expired)

    # --- single-flight ------------------------------------------------------------------------

    async def get_or_load(
        self, key: bytes, load: Callable[[], Awaitable[object]]
    ) -> tuple[object, bool]:
        """(response, hit). A stored answer is a hit. Otherwise the first caller starts `load`
        and gets the very response it returned (hit False); callers arriving while it runs wait
        for it and get a fresh copy (hit True: no backend call was made for them). A successful
        answer is stored; an exception reaches every caller of that load and is not stored."""
        data = self._lookup(key)
        if data is not None:
            self._hits += 1
            return self._parse(data), True
        flight = self._flights.get(key)
        started = flight is None
        if started:
            self._misses += 1
            flight = _Flight()
            self._flights[key] = flight
            # A task of its own, so the callers' cancellations reach it only through the
            # waiter count below.
            flight.task = asyncio.ensure_future(self._load(key, load, flight))
        else:
            self._coalesced += 1
        flight.waiters += 1
        try:
            response, data = await asyncio.shield(flight.task)
        finally:
            flight.waiters -= 1
            if flight.waiters == 0 and not flight.task.done():
                # Every caller has gone (cancelled): no one wants the answer. Forget the flight
                # now, not when the task unwinds on its next step: a caller arriving in between
                # must start a load of its own, not join this one and get its CancelledError.
                self._forget(key, flight)
                flight.task.cancel()
        if started:
            return response, False
        return self._parse(data), True

    async def _load(self, key: bytes, load: Callable[[], Awaitable[object]], flight: _Flight):
        generation = self._generation
        try:
            response = await load()
            # Serialized now, before the starter's layers write into the response.
            data = response.SerializeToString()
            if generation == self._generation:
                self._store(key, data)
            return response, data
        finally:
            # Before the task completes: a caller arriving after a failure must load again,
            # not join the failed flight.
            self._forget(key, flight)

    def _forget(self, key: bytes, flight: _Flight) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]


__all__ = ["ENTRY_OVERHEAD", "ResponseCache", "cacheable", "request_key"]
