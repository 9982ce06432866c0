"""The one translation from an exception to what a gRPC client sees.

Every RPC (inference, the stream's per-request ``error_message``, model
control, the admin service, the interceptors) goes through :func:`status_of`:

* an :class:`~infergate.errors.InferGateError` becomes its own status and
  message (its message is written to be shown);
* anything else is a bug or an unexpected runtime failure: it is logged with
  its traceback and the client gets INTERNAL with a message that names the
  method and leaks nothing.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeVar, cast

import grpc

from infergate.errors import InferGateError

__all__ = ["abort_with", "guarded", "status_of"]

log = logging.getLogger(__name__)


def status_of(error: BaseException, method: str) -> tuple[grpc.StatusCode, str]:
    """The status code and the client-safe message for ``error`` raised while serving ``method``."""
    if isinstance(error, InferGateError):
        return grpc.StatusCode[error.status.name], error.message
    log.error("%s failed", method, exc_info=error)
    return grpc.StatusCode.INTERNAL, f"{method}: internal error (the server log has the cause)"


async def abort_with(context: grpc.aio.ServicerContext, error: BaseException, method: str) -> NoReturn:
    """End the call with ``error``'s status (see :func:`status_of`)."""
    code, message = status_of(error, method)
    await context.abort(code, message)
    raise AssertionError("unreachable: abort raises")  # pragma: no cover


Behaviour = TypeVar("Behaviour", bound=Callable[..., Awaitable[Any]])


def guarded(method: Behaviour) -> Behaviour:
    """A unary-response servicer method whose exceptions end the call through :func:`status_of`."""
    name = method.__name__

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise  # the method already chose its status
        except Exception as exc:
            await abort_with(context, exc, name)

    return cast(Behaviour, wrapper)
