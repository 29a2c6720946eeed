"""The workspace: one directory holding all state (data, MLflow, model repository, reports)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class WorkspaceSettings(BaseSettings):
    """Where state lives. Env: `TREEOPS_WORKSPACE`; `MLFLOW_TRACKING_URI` overrides the embedded store."""

    model_config = SettingsConfigDict(env_prefix="TREEOPS_", extra="ignore")

    workspace: Path = Field(Path("."), description="root of all treeops state")


@dataclass(frozen=True)
class Workspace:
    """Paths inside one workspace root; `mlflow_uri` is a configured MLflow server (None: embedded)."""

    root: Path
    mlflow_uri: str | None = None

    @classmethod
    def resolve(cls, explicit: Path | None) -> Workspace:
        """`explicit` (from --workspace) beats TREEOPS_WORKSPACE, which beats the current directory.

        MLFLOW_TRACKING_URI is read here, once: `mlflow.set_tracking_uri` later writes that
        variable itself, so reading it lazily would mix up workspaces in one process.
        """
        root = explicit if explicit is not None else WorkspaceSettings().workspace
        return cls(root.expanduser().resolve(), os.environ.get("MLFLOW_TRACKING_URI") or None)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def model_repository(self) -> Path:
        return self.root / "model_repository"

    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    @property
    def triton_dir(self) -> Path:
        return self.root / ".triton"

    @property
    def audit_log(self) -> Path:
        """Append-only log of promotions and rollbacks."""
        return self.root / "audit" / "registry.jsonl"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.root / "mlartifacts"

    @property
    def tracking_uri(self) -> str:
        """MLFLOW_TRACKING_URI when set (a real MLflow server), else SQLite in the workspace."""
        return self.mlflow_uri or f"sqlite:///{self.root / 'mlflow.db'}"

    @property
    def artifact_root(self) -> Path | None:
        """Local artifact store for the embedded default; a configured server decides its own."""
        return None if self.mlflow_uri else self.mlflow_artifacts
