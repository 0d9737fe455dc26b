"""Asynchronous inference (docs/jobs.md): the tensorgate.jobs.v1 API on a durable queue, an
embedded SQLite file by default or Redis Streams for a fleet. `JobsService` is what gateway/app.py
builds when the config has `jobs`."""

from gateway.jobs.service import JobsService

__all__ = ["JobsService"]
