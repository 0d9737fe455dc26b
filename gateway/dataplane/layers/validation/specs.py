"""Model descriptions (ModelSpec) per backend model, fetched once and shared: the schema layer
checks requests against them, the stream relay asks whether a model is decoupled."""

from __future__ import annotations

import asyncio
import time

from adapters.base import Adapter, ModelSpec, declared_spec


class SpecCache:
    """Model descriptions per (backend, model, version), fetched once and refreshed after a TTL.

    A backend that cannot describe its model (or not within `wait`) yields None and the request
    goes through unchecked: the schema check only ever adds early, clearer errors, and must not
    make a slow backend's metadata call every caller's problem. (Parameters are checked whatever
    happens here: that check needs no backend call.)
    """

    def __init__(self, ttl: float = 60.0, miss_ttl: float = 5.0, wait: float = 1.0) -> None:
        self._ttl = ttl
        self._miss_ttl = miss_ttl
        self._wait = wait
        self._entries: dict[tuple, tuple[float, asyncio.Task]] = {}
        # Route schemas (config messages, unhashable) -> their ModelSpec, built once per config
        # revision; the schema is kept alongside so its id cannot be reused while cached.
        self._declared: dict[int, tuple[object, ModelSpec]] = {}

    def declared(self, schema) -> ModelSpec:
        entry = self._declared.get(id(schema))
        if entry is None or entry[0] is not schema:
            if len(self._declared) > 4096:  # old config revisions
                self._declared.clear()
            entry = (schema, declared_spec(schema))
            self._declared[id(schema)] = entry
        return entry[1]

    async def get(self, adapter: Adapter, target, remaining: float | None = None):
        """The ModelSpec of `target`'s model: the route's declared schema (public names) when it
        declares inputs, else `adapter`'s description (backend names); None when neither."""
        if target.schema is not None and target.schema.inputs:
            return self.declared(target.schema)
        wait = self._wait if remaining is None else max(0.0, min(self._wait, remaining / 2))
        return await self.backend(adapter, target, wait)

    async def backend(self, adapter: Adapter, target, wait: float):
        """The backend's own description of `target`'s model (what the stream relay asks to know
        whether a model is decoupled), waited for at most `wait` seconds; None when the backend
        cannot say in time. One fetch per model however many callers ask."""
        model, version = target.backend_model, target.backend_version
        key = (adapter.name, model, version, target.options_key)
        now = time.monotonic()
        entry = self._entries.get(key)
        if entry is None or (now >= entry[0] and entry[1].done()):
            task = asyncio.ensure_future(adapter.model_spec(model, version, target))
            task.add_done_callback(lambda t, key=key, now=now: self._settled(key, now, t))
            self._entries[key] = (now + self._ttl, task)
        else:
            task = entry[1]
        if task.done():
            return None if task.cancelled() or task.exception() else task.result()
        try:
            return await asyncio.wait_for(asyncio.shield(task), wait)
        except TimeoutError:
            return None

    def _settled(self, key, started: float, task: asyncio.Task) -> None:
        if task.cancelled() or task.exception() is not None or task.result() is None:
            self._entries[key] = (started + self._miss_ttl, task)

    def clear(self) -> None:
        self._entries.clear()
        self._declared.clear()
