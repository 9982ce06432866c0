"""infergate's operator API (``infergate.admin.InferGateAdmin``): what the routers are doing.

Read-only views of the catalog's routers and shadow statistics; errors end the
call through the one translation in ``status.py``.
"""

from __future__ import annotations

import grpc

from infergate._proto import infergate_admin_pb2 as apb
from infergate._proto import infergate_admin_pb2_grpc as apb_grpc
from infergate.monitoring.admin import drift_status_response
from infergate.repository.catalog import ModelCatalog, RoutingView
from infergate.routing.shadow import ShadowStats
from infergate.serving.status import guarded

__all__ = ["ADMIN_SERVICE_NAME", "AdminServicer"]

ADMIN_SERVICE_NAME: str = apb.DESCRIPTOR.services_by_name["InferGateAdmin"].full_name


class AdminServicer(apb_grpc.InferGateAdminServicer):
    def __init__(self, catalog: ModelCatalog):
        self._catalog = catalog

    @guarded
    async def RoutingStatus(
        self, request: apb.RoutingStatusRequest, context: grpc.aio.ServicerContext
    ) -> apb.RoutingStatusResponse:
        return apb.RoutingStatusResponse(models=[_model_routing(view) for view in self._catalog.routing(request.name)])

    @guarded
    async def DriftStatus(
        self, request: apb.DriftStatusRequest, context: grpc.aio.ServicerContext
    ) -> apb.DriftStatusResponse:
        return drift_status_response(request, self._catalog.models(request.name))


def _model_routing(view: RoutingView) -> apb.ModelRouting:
    router = view.router
    routing = router.routing
    message = apb.ModelRouting(
        name=view.name,
        versions=[str(v) for v in view.versions],
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
    if routing.shadow is not None and view.shadow is not None:
        message.shadow.CopyFrom(_shadow_status(view.shadow, routing.shadow.fraction))
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
