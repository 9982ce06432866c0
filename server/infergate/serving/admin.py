"""infergate's operator API (``infergate.admin.InferGateAdmin``): what the routers are doing.

Read-only views of the repository's routers and shadow statistics; errors
become statuses the same way as in servicer.py.
"""

from __future__ import annotations

import grpc

from infergate._proto import infergate_admin_pb2 as apb
from infergate._proto import infergate_admin_pb2_grpc as apb_grpc
from infergate.errors import InferGateError, NotFound
from infergate.repository.loader import ModelEntry, ModelRepository
from infergate.routing.shadow import ShadowStats

__all__ = ["ADMIN_SERVICE_NAME", "AdminServicer"]

ADMIN_SERVICE_NAME: str = apb.DESCRIPTOR.services_by_name["InferGateAdmin"].full_name


class AdminServicer(apb_grpc.InferGateAdminServicer):
    def __init__(self, repository: ModelRepository):
        self._repository = repository

    async def RoutingStatus(
        self, request: apb.RoutingStatusRequest, context: grpc.aio.ServicerContext
    ) -> apb.RoutingStatusResponse:
        try:
            entries = self._entries(request.name)
        except InferGateError as exc:
            await context.abort(grpc.StatusCode[exc.status.name], exc.message)
        return apb.RoutingStatusResponse(models=[_model_routing(e) for e in entries if e.router is not None])

    def _entries(self, name: str) -> list[ModelEntry]:
        entries = self._repository.entries
        if not name:
            return [entries[n] for n in sorted(entries)]
        if name not in entries:
            raise NotFound(f"unknown model {name!r}")
        return [entries[name]]


def _model_routing(entry: ModelEntry) -> apb.ModelRouting:
    router = entry.router
    assert router is not None
    routing = router.routing
    message = apb.ModelRouting(
        name=entry.name,
        versions=[str(v) for v in sorted(entry.versions)],
        arms=[apb.RouteArm(version=str(v), weight=w) for v, w in sorted(routing.weights.items())],
        sticky_header=router.sticky_header or "",
        sticky_parameter=router.sticky_parameter or "",
    )
    canary = router.canary
    if canary is not None:
        message.canary.CopyFrom(
            apb.CanaryStatus(
                version=str(canary.version),
                weight=canary.weight,
                step=canary.step,
                state=canary.state,
                reason=canary.reason,
            )
        )
    if routing.shadow is not None:
        stats = entry.shadows.get(routing.shadow.version) or ShadowStats(routing.shadow.version)
        message.shadow.CopyFrom(_shadow_status(stats, routing.shadow.fraction))
    return message


def _shadow_status(stats: ShadowStats, fraction: float) -> apb.ShadowStatus:
    message = apb.ShadowStatus(
        version=str(stats.version),
        fraction=fraction,
        sent=stats.sent,
        dropped=stats.dropped,
        errors=stats.errors,
        compared=stats.compared,
    )
    for name, agreement in stats.outputs.items():
        message.outputs[name].CopyFrom(
            apb.OutputAgreement(
                compared=agreement.compared,
                max_abs_diff=agreement.max_abs_diff,
                mean_max_abs_diff=agreement.mean_max_abs_diff,
                mismatched=agreement.mismatched,
                top1_rows=agreement.top1_rows,
                top1_agreed=agreement.top1_agreed,
            )
        )
    return message
