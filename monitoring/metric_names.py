"""Every metric the alert rules and the dashboard read, declared once: exposed name, kind, labels, buckets, source.

`source="triton"`: published by tritonserver 2.51 itself on its metrics port (checked on a live server).
`source="treeops"`: to be registered by treeops under exactly these names and labels: the serving path through
Triton's custom-metrics API (so they appear on the same endpoint), the prediction-log writer and the monitor job.
Names are as exposed (what PromQL sees): counters end in `_total`, a histogram exposes `<name>_bucket{le=...}`,
`<name>_sum` and `<name>_count`, and its `le` values are written as `le_label(bound)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Metric:
    """One metric family as Prometheus scrapes it."""

    name: str
    kind: Literal["counter", "gauge", "histogram"]
    help: str
    labels: tuple[str, ...]
    source: Literal["triton", "treeops"]
    buckets: tuple[float, ...] = ()  # histogram upper bounds (+Inf implied)

    def __post_init__(self) -> None:
        if (self.kind == "histogram") != bool(self.buckets):
            raise ValueError(f"metric {self.name}: buckets are given for histograms and only for them")
        if list(self.buckets) != sorted(set(self.buckets)):
            raise ValueError(f"metric {self.name}: buckets {self.buckets} must be strictly increasing")


def le_label(bound: float) -> str:
    """The `le` label value of a histogram bucket: Python's repr of the bound ("0.01", "1.0"), as prometheus_client
    writes it; a treeops emitter must write the same text, or the latency rules match no bucket."""
    return repr(float(bound))


# Triton's own (per model and version; `reason` is REJECTED, CANCELED, BACKEND or OTHER).
TRITON_REQUEST_SUCCESS = Metric(
    "nv_inference_request_success", "counter", "requests Triton answered successfully, all batch sizes",
    ("model", "version"), "triton")
TRITON_REQUEST_FAILURE = Metric(
    "nv_inference_request_failure", "counter",
    "requests that failed after reaching the model's scheduler (a queue deadline, a backend error); requests the "
    "frontend rejects (unknown input, wrong shape or type) and error answers of Python-backend models are not counted",
    ("model", "version", "reason"), "triton")
TRITON_INFERENCE_COUNT = Metric(
    "nv_inference_count", "counter", "rows scored (a batch of n counts n)", ("model", "version"), "triton")
TRITON_REQUEST_DURATION_US = Metric(
    "nv_inference_request_duration_us", "counter", "cumulative end-to-end request time in Triton, microseconds",
    ("model", "version"), "triton")
TRITON_QUEUE_DURATION_US = Metric(
    "nv_inference_queue_duration_us", "counter", "cumulative time requests waited in the scheduler's queue, "
    "microseconds", ("model", "version"), "triton")

# treeops' own.
REQUEST_DURATION = Metric(
    "treeops_request_duration_seconds", "histogram", "time from a request reaching the treeops model to its answer",
    ("model", "version"), "treeops",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0))
PREDICTIONS = Metric(
    "treeops_predictions_total", "counter", "rows answered, by the decision at the served threshold",
    ("model", "version", "decision"), "treeops")
DEGRADED_ANSWERS = Metric(
    "treeops_degraded_answers_total", "counter",
    "requests answered degraded (scored without their history features); a request of several rows counts once",
    ("model", "version"), "treeops")
PREDICTION_LOG_LAG = Metric(
    "treeops_prediction_log_lag_seconds", "gauge", "age of the oldest prediction record not yet written to the log",
    ("model",), "treeops")
PREDICTION_LOG_DROPPED = Metric(
    "treeops_prediction_log_dropped_total", "counter", "prediction records dropped because the log's ring was full",
    ("model",), "treeops")
MONITOR_DRIFT_SHARE = Metric(
    "treeops_monitor_drift_share", "gauge", "share of features that drifted in the last monitor window",
    ("model", "version"), "treeops")
MONITOR_FEATURE_DRIFT = Metric(
    "treeops_monitor_feature_drift_score", "gauge",
    "Evidently's drift score of each column (features and the score) in the last monitor window; `method` says "
    "how to read it: a p-value shrinks with drift, a distance grows", ("model", "version", "feature", "method"),
    "treeops")
MONITOR_QUALITY = Metric(
    "treeops_monitor_quality", "gauge",
    "classification figures on the labelled predictions of the last monitor window (`figure`: roc_auc, pr_auc, "
    "precision and recall at the served threshold, calibration_error)", ("model", "version", "figure"), "treeops")
MONITOR_WINDOW_END = Metric(
    "treeops_monitor_window_end_timestamp_seconds", "gauge", "end of the last monitor window, Unix seconds",
    ("model", "version"), "treeops")

ALL: tuple[Metric, ...] = (
    TRITON_REQUEST_SUCCESS, TRITON_REQUEST_FAILURE, TRITON_INFERENCE_COUNT, TRITON_REQUEST_DURATION_US,
    TRITON_QUEUE_DURATION_US, REQUEST_DURATION, PREDICTIONS, DEGRADED_ANSWERS, PREDICTION_LOG_LAG,
    PREDICTION_LOG_DROPPED, MONITOR_DRIFT_SHARE, MONITOR_FEATURE_DRIFT, MONITOR_QUALITY,
    MONITOR_WINDOW_END,
)
