"""The serving metrics a Python-backend version registers, handed to it in its config (backends/serving_monitor.py).

The backends run inside Triton and cannot import monitoring/metric_names.py, the one declaration of every metric;
export writes the declarations they need into the config parameter `treeops_metrics` (JSON, by role), so the
names, labels and buckets on the metrics port are those the alert rules and the dashboard read.
"""

from __future__ import annotations

import json

from monitoring import metric_names as m

METRICS_PARAMETER = "treeops_metrics"
#: Role (what backends/serving_monitor.py emits) -> the declared metric.
ROLES = {
    "request_duration": m.REQUEST_DURATION,
    "predictions": m.PREDICTIONS,
    "degraded_answers": m.DEGRADED_ANSWERS,
    "log_lag": m.PREDICTION_LOG_LAG,
    "log_dropped": m.PREDICTION_LOG_DROPPED,
}


def serving_metrics_parameter() -> dict[str, str]:
    """{`treeops_metrics`: JSON of each role's name, kind, help, labels and buckets}."""
    declared = {role: {"name": d.name, "kind": d.kind, "help": d.help, "labels": list(d.labels),
                       "buckets": list(d.buckets)} for role, d in ROLES.items()}
    return {METRICS_PARAMETER: json.dumps(declared, separators=(",", ":"), sort_keys=True)}
