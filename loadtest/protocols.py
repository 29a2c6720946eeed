"""The contract between the runner and the Locust process: protocols, user classes, env vars."""

from __future__ import annotations

from typing import Literal

ProtocolName = Literal["grpc", "http"]

USER_CLASSES: dict[ProtocolName, str] = {"grpc": "TritonGrpcUser", "http": "TritonHttpUser"}
"""Locust user class that drives each protocol (selected by name on the Locust command line)."""

REQUEST_NAMES: dict[ProtocolName, str] = {"grpc": "grpc infer", "http": "http infer"}
"""Name each protocol's requests carry in Locust's statistics."""

ENV_ROWS = "TREEOPS_LT_ROWS"
ENV_MODEL = "TREEOPS_LT_MODEL"
ENV_GRPC_URL = "TREEOPS_LT_GRPC_URL"
ENV_TIMEOUT_S = "TREEOPS_LT_TIMEOUT_S"
ENV_SIGNATURE = "TREEOPS_LT_SIGNATURE"
