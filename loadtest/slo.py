"""Service-level objectives for a load test: typed budgets from TOML/JSON, checked against measurements."""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from loadtest.errors import SLOError

SLO_SUFFIXES = (".toml", ".json")
#: Where a relative SLO path is looked for after the current folder: the checkout (or site-packages) holding
#: `loadtest/`, so `--slo loadtest/slo-ci.toml` works from any folder, then `loadtest/` itself (`--slo slo-ci.toml`).
_PACKAGE_DIR = Path(__file__).resolve().parent


def find_slo_file(path: Path) -> Path:
    """`path` itself when it exists (relative to the current folder), else the first existing one of the package
    locations; SLOError lists every place looked in when there is none."""
    path = Path(path)
    looked = [path] if path.is_absolute() else list(dict.fromkeys(
        [Path.cwd() / path, _PACKAGE_DIR.parent / path, _PACKAGE_DIR / path.name]))
    found = next((p for p in looked if p.is_file()), None)
    if found is None:
        raise SLOError(f"SLO file {path} does not exist; looked in {', '.join(map(str, looked))}; give a path to a "
                       f".toml or .json file with any of: {', '.join(_CHECKS)}")
    return found


@dataclass(frozen=True)
class RequestStats:
    """Measured figures for one protocol or for all traffic; latencies are None without requests."""

    requests: int
    failures: int
    rps: float
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None

    @property
    def error_rate(self) -> float | None:
        """Failed / total requests (None when nothing was sent)."""
        return self.failures / self.requests if self.requests else None


@dataclass(frozen=True)
class SLOCheck:
    """One budget compared with its measurement; a missing measurement fails."""

    name: str
    budget: float
    measured: float | None
    passed: bool
    op: Literal["<=", ">="]


# SLO field -> (RequestStats attribute, how the measurement must compare with the budget)
_CHECKS: dict[str, tuple[str, Literal["<=", ">="]]] = {
    "p50_ms": ("p50_ms", "<="),
    "p95_ms": ("p95_ms", "<="),
    "p99_ms": ("p99_ms", "<="),
    "max_error_rate": ("error_rate", "<="),
    "min_rps": ("rps", ">="),
}


class SLO(BaseModel):
    """Budgets a load test must meet; set at least one. Latencies are client-side, as Locust measures them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    p50_ms: float | None = Field(None, gt=0, description="highest acceptable median latency (ms)")
    p95_ms: float | None = Field(None, gt=0, description="highest acceptable 95th-percentile latency (ms)")
    p99_ms: float | None = Field(None, gt=0, description="highest acceptable 99th-percentile latency (ms)")
    max_error_rate: float | None = Field(None, ge=0, le=1, description="highest acceptable failed/total requests")
    min_rps: float | None = Field(None, gt=0, description="lowest acceptable throughput (requests/s)")

    @model_validator(mode="after")
    def _at_least_one(self) -> SLO:
        if all(getattr(self, name) is None for name in _CHECKS):
            raise ValueError(f"an SLO needs at least one budget; valid keys: {', '.join(_CHECKS)}")
        return self

    @classmethod
    def from_file(cls, path: Path) -> SLO:
        """Read an SLO from a flat TOML or JSON table, e.g. `p99_ms = 50` and `max_error_rate = 0.001`."""
        path = Path(path)
        valid = ", ".join(_CHECKS)
        if path.suffix not in SLO_SUFFIXES:
            raise SLOError(f"SLO file {path} must end in {' or '.join(SLO_SUFFIXES)}")
        path = find_slo_file(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise SLOError(f"cannot read SLO file {path}: {exc}") from exc
        try:
            data: Any = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
            raise SLOError(f"SLO file {path} is not valid {path.suffix[1:].upper()}: {exc}") from exc
        if not isinstance(data, dict):
            raise SLOError(f"SLO file {path} must hold one table of budgets ({valid})")
        unknown = sorted(set(data) - set(_CHECKS))
        if unknown:
            raise SLOError(f"unknown SLO key(s) {', '.join(unknown)} in {path}; valid keys: {valid}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'SLO'}: {e['msg']}" for e in exc.errors())
            raise SLOError(f"invalid SLO in {path}: {problems}") from exc

    def evaluate(self, measured: RequestStats) -> list[SLOCheck]:
        """Compare every set budget with `measured`, in declaration order."""
        checks = []
        for name, (attr, op) in _CHECKS.items():
            budget = getattr(self, name)
            if budget is None:
                continue
            value = getattr(measured, attr)
            passed = value is not None and (value <= budget if op == "<=" else value >= budget)
            checks.append(SLOCheck(name, budget, value, passed, op))
        return checks
