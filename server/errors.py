"""Errors raised by the server area; each names what is wrong and how to fix it."""

from __future__ import annotations

from treeops.errors import InvalidSettingsError, TreeopsError


class ServerError(TreeopsError):
    """Base class for serving failures the CLI reports without a traceback."""


class TritonNotFoundError(ServerError):
    """No tritonserver binary could be found."""


class PortInUseError(ServerError):
    """A port Triton needs is taken."""


class TritonStartError(ServerError):
    """Triton exited or did not become ready in time."""


class ScoringError(ServerError):
    """A scoring request failed or the input rows are unusable."""


class StaleServerError(ServerError):
    """A tritonserver started earlier for the same workspace is still running."""


class InsecureAdminError(ServerError, InvalidSettingsError):
    """Triton would start with its admin APIs open: no admin key and no explicit opt-in."""


class TritonUnhealthyError(ServerError):
    """A running tritonserver stopped answering its liveness endpoint, or exited unexpectedly."""


#: Triton 2.51 answers a restricted gRPC call without the right key with UNAVAILABLE and this message.
RESTRICTED_MESSAGE = "is restricted, expecting header"


def effective_grpc_status(status: str, message: str, key_sent: bool) -> str:
    """The gRPC status a client should act on: Triton's UNAVAILABLE for a refused key becomes an auth status.

    `status` as tritonclient gives it ("StatusCode.UNAVAILABLE"); a refused call is UNAUTHENTICATED when no key
    was sent and PERMISSION_DENIED when a wrong one was; neither is retryable.
    """
    if RESTRICTED_MESSAGE in message:
        return "StatusCode.PERMISSION_DENIED" if key_sent else "StatusCode.UNAUTHENTICATED"
    return status
