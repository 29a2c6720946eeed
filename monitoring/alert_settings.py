"""The SLO figures and alert thresholds the Prometheus rules are generated from (monitoring/alert_rules.py)."""

from __future__ import annotations

from datetime import timedelta

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from monitoring.metric_names import REQUEST_DURATION


class BurnWindow(BaseModel):
    """One multi-window burn-rate condition (Google SRE workbook, ch. 5): the error budget burns `factor` times
    faster than allowed over both the `long` window and its `short` one (the short one ends the alert soon after
    the burn stops)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    long: timedelta = Field(description="window the burn rate must hold over")
    short: timedelta = Field(description="recent window that must burn too (about long / 12)")
    factor: float = Field(gt=1, description="burn rate: budget spent this many times faster than the SLO allows")

    @model_validator(mode="after")
    def _short_within_long(self) -> BurnWindow:
        if not timedelta(0) < self.short < self.long:
            raise ValueError(f"burn window short {self.short} must be positive and shorter than long {self.long}")
        return self


#: The workbook's page-level pairs: 2% of a 30-day budget in 1 h, 5% in 6 h.
WORKBOOK_PAGE_WINDOWS = (
    BurnWindow(long=timedelta(hours=1), short=timedelta(minutes=5), factor=14.4),
    BurnWindow(long=timedelta(hours=6), short=timedelta(minutes=30), factor=6),
)


class AlertSettings(BaseSettings):
    """SLOs and thresholds of treeops' alert rules. Env prefix `TREEOPS_ALERTS_` (durations as seconds or ISO 8601)."""

    model_config = SettingsConfigDict(env_prefix="TREEOPS_ALERTS_", extra="forbid", frozen=True)

    latency_target_s: float = Field(
        0.01, gt=0, description="the latency SLO's bound: a request slower than this spends latency budget "
        f"(must be a bucket of {REQUEST_DURATION.name})")
    latency_objective: float = Field(0.99, gt=0, lt=1, description="share of requests faster than latency_target_s "
                                     "(0.99: p99 under the target)")
    availability_objective: float = Field(0.999, gt=0, lt=1, description="share of requests that must not fail")
    burn_windows: tuple[BurnWindow, ...] = Field(WORKBOOK_PAGE_WINDOWS, min_length=1,
                                                 description="burn-rate pairs; any one pages")
    burn_for: timedelta = Field(timedelta(minutes=2), description="how long a burn must last before it pages")
    max_mean_queue_time_ms: float = Field(5.0, gt=0, description="mean time a request may wait in Triton's queue")
    queue_window: timedelta = Field(timedelta(minutes=5), description="window of the mean queue time")
    queue_for: timedelta = Field(timedelta(minutes=10), description="how long the queue time must stay high")
    no_traffic_window: timedelta = Field(timedelta(minutes=10), description="a model with no request this long alerts")
    max_log_lag_s: float = Field(60.0, gt=0, description="oldest unwritten prediction record may be this old")
    log_lag_for: timedelta = Field(timedelta(minutes=5), description="how long the log lag must stay high")
    log_drop_window: timedelta = Field(timedelta(minutes=10), description="any record dropped in this window alerts")
    max_drift_share: float = Field(0.5, gt=0, le=1, description="share of drifted features that alerts (Evidently's "
                                   "dataset-drift default)")
    min_roc_auc: float = Field(0.75, gt=0.5, lt=1, description="ROC AUC of a monitor window below this alerts")
    monitor_stale_after: timedelta = Field(timedelta(hours=2), description="no monitor window ending within this "
                                           "long alerts (the hourly job stopped)")

    @field_validator("latency_target_s")
    @classmethod
    def _target_is_a_bucket(cls, value: float) -> float:
        if value not in REQUEST_DURATION.buckets:
            raise ValueError(f"latency_target_s {value} is not a bucket of {REQUEST_DURATION.name}; use one of "
                             f"{list(REQUEST_DURATION.buckets)} or add it to the buckets in monitoring/metric_names.py")
        return value

    @property
    def latency_budget(self) -> float:
        """Share of requests allowed to be slower than the target."""
        return 1 - self.latency_objective

    @property
    def error_budget(self) -> float:
        """Share of requests allowed to fail."""
        return 1 - self.availability_objective

    def on_faster_clock(self, speedup: int) -> AlertSettings:
        """The same SLOs with every window and `for` divided by `speedup`: the production rules' shape on a clock
        a test can wait for (1 h -> 1 min at 60)."""
        if speedup < 1:
            raise ValueError(f"speedup {speedup} must be a whole number >= 1")
        scaled = {name: getattr(self, name) / speedup for name, field in type(self).model_fields.items()
                  if field.annotation in (timedelta, "timedelta")}
        scaled["burn_windows"] = tuple(BurnWindow(long=w.long / speedup, short=w.short / speedup, factor=w.factor)
                                       for w in self.burn_windows)
        return self.model_copy(update=scaled)
