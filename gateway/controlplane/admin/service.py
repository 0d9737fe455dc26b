"""tensorgate.admin.v1.AdminService: thin handlers over RouteManager and RolloutController."""

from __future__ import annotations

import time

import grpc
from google.protobuf import timestamp_pb2

from gateway.controlplane.admin import declared
from gateway.controlplane.admin.auth import current_principal
from gateway.controlplane.admin.rollout import RolloutController
from gateway.controlplane.admin.routes import RouteManager, find_route, stale, unavailable
from gateway.controlplane.admin.view import GatewayView
from gateway.controlplane.store.base import StoredRevision, StoreUnavailable
from gateway.errors import GatewayError, invalid, shown
from tensorgate.admin.v1 import admin_pb2, admin_pb2_grpc


def revision_message(revision: StoredRevision) -> admin_pb2.Revision:
    created = timestamp_pb2.Timestamp()
    created.FromNanoseconds(int(revision.created_at * 1e9))
    return admin_pb2.Revision(
        number=revision.number, created_at=created, author=revision.author, summary=revision.summary
    )


def _who() -> str:
    principal = current_principal.get()
    return principal.name if principal else "unknown"


def _handled(method):
    """Turn GatewayError into the RPC status (and its trailers, if any); nothing else about the
    call changes."""

    async def handler(self, request, context):
        try:
            return await method(self, request, context)
        except GatewayError as err:
            # OutcomeUnknown names the revision it tried in a trailer, for the CLI to look for.
            await context.abort(err.code, err.message, getattr(err, "trailers", ()))

    handler.__name__ = method.__name__
    return handler


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(
        self, runtime: GatewayView, routes: RouteManager, rollouts: RolloutController
    ) -> None:
        self._runtime = runtime
        self._routes = routes
        self._rollouts = rollouts

    @_handled
    async def GetRouteTable(self, request, context):
        return admin_pb2.GetRouteTableResponse(
            revision=revision_message(self._routes.revision), routes=self._routes.routes()
        )

    async def _change(self, method: str, model: str, summary: str, mutate, expected: int):
        revision = await self._routes.change(
            who=_who(), method=method, summary=summary, mutate=mutate, expected_revision=expected
        )
        return revision_message(revision), find_route(self._routes.routes(), model)

    @_handled
    async def SetVariantWeights(self, request, context):
        if not request.weights:
            raise invalid("weights: name at least one variant")

        def mutate(routes) -> None:
            route = find_route(routes, request.model)
            names = {v.name for v in route.variants}
            unknown = sorted(set(request.weights) - names)
            if unknown:
                raise invalid(
                    f"model {shown(request.model)} has no variant(s) "
                    f"{', '.join(map(shown, unknown))} "
                    f"(variants: {', '.join(sorted(names))})"
                )
            for variant in route.variants:
                if variant.name in request.weights:
                    variant.weight = request.weights[variant.name]

        weights = ", ".join(f"{k}={v}" for k, v in sorted(request.weights.items()))
        revision, route = await self._change(
            "SetVariantWeights", request.model, f"{request.model}: weights {weights}", mutate,
            request.expected_revision,
        )  # fmt: skip
        return admin_pb2.SetVariantWeightsResponse(revision=revision, route=route)

    @_handled
    async def SetShadow(self, request, context):
        def mutate(routes) -> None:
            route = find_route(routes, request.model)
            if request.shadow.variant:
                if request.shadow.variant not in {v.name for v in route.variants}:
                    raise invalid(
                        f"model {shown(request.model)} has no variant "
                        f"{shown(request.shadow.variant)}"
                    )
                route.policy.shadow.CopyFrom(request.shadow)
            else:
                route.policy.ClearField("shadow")

        what = (
            f"shadow {request.shadow.variant} {request.shadow.fraction:g}"
            if request.shadow.variant
            else "shadow off"
        )
        revision, route = await self._change(
            "SetShadow",
            request.model,
            f"{request.model}: {what}",
            mutate,
            request.expected_revision,
        )
        return admin_pb2.SetShadowResponse(revision=revision, route=route)

    @_handled
    async def SetFallback(self, request, context):
        def mutate(routes) -> None:
            route = find_route(routes, request.model)
            del route.policy.fallback[:]
            route.policy.fallback.extend(request.fallback)

        steps = ", ".join(s.WhichOneof("step") or "?" for s in request.fallback) or "none"
        revision, route = await self._change(
            "SetFallback", request.model, f"{request.model}: fallback [{steps}]", mutate,
            request.expected_revision,
        )  # fmt: skip
        return admin_pb2.SetFallbackResponse(revision=revision, route=route)

    @_handled
    async def Rollback(self, request, context):
        revision = await self._routes.rollback(
            who=_who(), to_revision=request.to_revision, expected_revision=request.expected_revision
        )
        return admin_pb2.RollbackResponse(revision=revision_message(revision))

    @_handled
    async def ListRevisions(self, request, context):
        history = await self._routes.history()
        if request.limit:
            history = history[: request.limit]
        return admin_pb2.ListRevisionsResponse(revisions=[revision_message(r) for r in history])

    @_handled
    async def StartRollout(self, request, context):
        return admin_pb2.StartRolloutResponse(rollout=await self._rollouts.start(request, _who()))

    @_handled
    async def GetRollout(self, request, context):
        return admin_pb2.GetRolloutResponse(rollout=await self._rollouts.get(request.model))

    @_handled
    async def AbortRollout(self, request, context):
        rollout = await self._rollouts.abort(request.model, request.reason, _who())
        return admin_pb2.AbortRolloutResponse(rollout=rollout)

    @_handled
    async def GetBackendStatus(self, request, context):
        runtime = self._runtime
        since = time.monotonic() - 60
        reply = admin_pb2.GetBackendStatusResponse()
        for backend in runtime.config.backends:
            breaker = runtime.breakers.get(backend.name)
            bulkhead = runtime.bulkheads.get(backend.name)
            requests, ratio = runtime.recent.backend_summary(backend.name, since)
            reply.backends.add(
                name=backend.name,
                kind=backend.kind,
                healthy=bool(runtime.readiness.backend_up.get(backend.name)),
                breaker_state=breaker.state if breaker else "disabled",
                in_flight=bulkhead.in_flight if bulkhead else 0,
                drained=backend.name in runtime.readiness.drained,
                recent_requests=requests,
                recent_error_ratio=ratio,
            )
        down = runtime.readiness.down
        for plan in runtime.table:
            for target in plan.targets:
                requests, ratio, p99 = runtime.recent.summary(
                    plan.model, target.variant, since=since
                )
                reply.variants.add(
                    model=plan.model,
                    variant=target.variant,
                    backend=target.backend,
                    weight=target.weight,
                    healthy=target.key not in down,
                    recent_requests=requests,
                    recent_error_ratio=ratio,
                    recent_p99_seconds=p99,
                )
        return reply

    @_handled
    async def ApplyRouteTable(self, request, context):
        """The declared table replaces the live one whole (routes and variants added, removed,
        changed), with the validation, audit and compare-and-swap of every change."""
        routes = self._routes
        if request.expected_revision and request.expected_revision != routes.live:
            raise stale(request.expected_revision, routes.live)
        live = routes.routes()
        wanted = routes.checked(list(request.routes), "ApplyRouteTable")
        what = declared.summary(live, wanted)
        reply = admin_pb2.ApplyRouteTableResponse(
            revision=revision_message(routes.revision),
            changed=not declared.same(live, wanted),
            summary=what,
            diff=declared.diff(live, wanted, "live", request.source or "applied"),
            dry_run=request.dry_run,
        )
        if request.dry_run or not reply.changed:
            return reply

        def replace(table) -> None:
            del table[:]
            table.extend(request.routes)

        source = f" {request.source}" if request.source else ""
        revision = await routes.change(
            who=_who(), method="ApplyRouteTable", summary=f"apply{source}: {what}",
            mutate=replace, expected_revision=request.expected_revision,
        )  # fmt: skip
        reply.revision.CopyFrom(revision_message(revision))
        return reply

    @_handled
    async def DrainBackend(self, request, context):
        await self._set_drain(request.backend, True)
        return admin_pb2.DrainBackendResponse(drained=sorted(self._runtime.readiness.drained))

    @_handled
    async def UndrainBackend(self, request, context):
        await self._set_drain(request.backend, False)
        return admin_pb2.UndrainBackendResponse(drained=sorted(self._runtime.readiness.drained))

    async def _set_drain(self, backend: str, drained: bool) -> None:
        names = {b.name for b in self._runtime.config.backends}
        if backend not in names:
            raise GatewayError(
                grpc.StatusCode.NOT_FOUND,
                f"no backend {shown(backend)} (backends: {', '.join(sorted(names))})",
            )
        store = self._routes.store
        try:
            await store.set_drained(backend, drained)
            current = await store.drained()
        except StoreUnavailable as err:
            raise unavailable(store, err) from None
        await self._runtime.readiness.use_drained(current)
