"""tensorgate.jobs.v1.JobsService over gRPC: transport only (service.py does the work). The
caller is identified as for ModelInfer (`DataPlane.identify`: bearer token, client certificate
or anonymous), and a job belongs to the caller that submitted it."""

from __future__ import annotations

import logging

from gateway.dataplane.servicer import answers_errors
from gateway.errors import GatewayError, settled
from tensorgate.jobs.v1 import jobs_pb2, jobs_pb2_grpc

log = logging.getLogger(__name__)


class JobsServicer(jobs_pb2_grpc.JobsServiceServicer):
    def __init__(self, service) -> None:
        self._service = service
        self._plane = service.plane

    @answers_errors
    async def Submit(self, request, context):
        job, created = await self._service.submit(request, self._plane.identify(context))
        return jobs_pb2.SubmitResponse(job=job, created=created)

    @answers_errors
    async def Get(self, request, context):
        job = await self._service.get(request.id, self._plane.identify(context))
        return jobs_pb2.GetResponse(job=job)

    @answers_errors
    async def Cancel(self, request, context):
        job = await self._service.cancel(request.id, self._plane.identify(context))
        return jobs_pb2.CancelResponse(job=job)

    @answers_errors
    async def List(self, request, context):
        return await self._service.list(request, self._plane.identify(context))

    async def Watch(self, request, context):
        try:
            caller = self._plane.identify(context)
            async for job in self._service.watch(request.id, caller):
                yield jobs_pb2.WatchResponse(job=job)
        except GatewayError as err:
            code, message, _ = settled(err)
        else:
            return
        await context.abort(code, message)
