"""The Grafana dashboard for Triton + treeops metrics, generated from the metric names and the SLO settings.

`monitoring/dashboards/treeops.json` is `render(AlertSettings())` in Grafana's file-provisioning format (the bare
dashboard model; `provider.yml` beside it is the provisioning entry). Regenerate it with
`python -m monitoring.dashboard`; tests/test_alert_rules.py fails while it is stale. Panels are named for the SLOs
they watch and draw the alert thresholds; queries use Grafana's `$__rate_interval` and the `$model` variable.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monitoring import metric_names as names
from monitoring.alert_rules import error_ratio
from monitoring.alert_settings import AlertSettings

DASHBOARD_FILE = Path(__file__).with_name("dashboards") / "treeops.json"
UID = "treeops-serving"
RATE = "$__rate_interval"
MODEL = '{model=~"$model"}'
_DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
_WIDTH, _HEIGHT = 12, 8


@dataclass(frozen=True)
class Panel:
    """One time-series panel: its title, PromQL queries (legend -> expr), unit and an optional threshold line."""

    title: str
    queries: dict[str, str]
    unit: str
    threshold: float | None = None
    description: str = ""


def _rate(metric: str, by: str = "model") -> str:
    return f"sum by ({by}) (rate({metric}{MODEL}[{RATE}]))"


def panels(settings: AlertSettings) -> list[Panel]:
    """The dashboard's panels for `settings`, SLOs first."""
    s = settings
    latency = names.REQUEST_DURATION.name
    success, failure = names.TRITON_REQUEST_SUCCESS.name, names.TRITON_REQUEST_FAILURE.name
    return [
        Panel(f"Latency p{s.latency_objective * 100:g} (SLO: under {s.latency_target_s * 1000:g} ms)",
              {"{{model}}": f"histogram_quantile({s.latency_objective:g}, {_rate(latency + '_bucket', 'model, le')})"},
              "s", s.latency_target_s, f"From {latency}, measured inside the treeops model."),
        Panel(f"Error rate (SLO: {s.availability_objective:.2%} succeed)",
              {"{{model}}": error_ratio(RATE, MODEL),
               "{{model}} {{reason}}": f"{_rate(failure, 'model, reason')} / on(model) group_left() "
                                       f"({_rate(success)} + {_rate(failure)})"},
              "percentunit", s.error_budget,
              f"Failed share of requests ({failure}: queue deadlines and backend errors; the frontend's "
              "rejections of malformed requests are not counted)."),
        Panel(f"Queue time, mean (budget {s.max_mean_queue_time_ms:g} ms)",
              {"{{model}}": f"{_rate(names.TRITON_QUEUE_DURATION_US.name)} / {_rate(success)} / 1000"},
              "ms", s.max_mean_queue_time_ms),
        Panel("Throughput",
              {"{{model}} requests/s": _rate(success), "{{model}} rows/s": _rate(names.TRITON_INFERENCE_COUNT.name)},
              "reqps"),
        Panel("Latency, mean in Triton",
              {"{{model}}": f"{_rate(names.TRITON_REQUEST_DURATION_US.name)} / {_rate(success)} / 1000"}, "ms"),
        Panel("Degraded answers",
              {"{{model}}": f"{_rate(names.DEGRADED_ANSWERS.name)} / {_rate(names.REQUEST_DURATION.name + '_count')}"},
              "percentunit", description="Share of requests answered without their history features."),
        Panel(f"Drift share (alert above {s.max_drift_share:.0%})",
              {"{{model}} v{{version}}": f"{names.MONITOR_DRIFT_SHARE.name}{MODEL}"}, "percentunit", s.max_drift_share),
        Panel(f"Quality: ROC AUC (alert below {s.min_roc_auc:g})",
              {"{{model}} v{{version}}": f'{names.MONITOR_QUALITY.name}{{figure="roc_auc",model=~"$model"}}'},
              "none", s.min_roc_auc),
        Panel(f"Prediction log lag (alert above {s.max_log_lag_s:g} s)",
              {"{{model}}": f"max by (model) ({names.PREDICTION_LOG_LAG.name}{MODEL})"}, "s", s.max_log_lag_s),
        Panel("Prediction log drops", {"{{model}}": _rate(names.PREDICTION_LOG_DROPPED.name)}, "cps"),
    ]


def _panel_json(panel: Panel, index: int) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": panel.unit}
    if panel.threshold is not None:
        defaults["custom"] = {"thresholdsStyle": {"mode": "line"}}
        defaults["thresholds"] = {"mode": "absolute", "steps": [{"color": "green", "value": None},
                                                                {"color": "red", "value": panel.threshold}]}
    return {
        "id": index + 1,
        "type": "timeseries",
        "title": panel.title,
        "description": panel.description,
        "datasource": _DATASOURCE,
        "gridPos": {"x": (index % 2) * _WIDTH, "y": (index // 2) * _HEIGHT, "w": _WIDTH, "h": _HEIGHT},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "targets": [{"refId": chr(ord("A") + i), "datasource": _DATASOURCE, "expr": expr, "legendFormat": legend}
                    for i, (legend, expr) in enumerate(panel.queries.items())],
    }


def dashboard(settings: AlertSettings) -> dict[str, Any]:
    """The dashboard model for `settings`."""
    return {
        "uid": UID,
        "title": "treeops serving",
        "tags": ["treeops", "triton"],
        "timezone": "utc",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"},
            {"name": "model", "type": "query", "datasource": _DATASOURCE, "label": "Model",
             "query": {"query": f"label_values({names.TRITON_REQUEST_SUCCESS.name}, model)", "refId": "models"},
             "refresh": 2, "multi": True, "includeAll": True, "allValue": ".*"},
        ]},
        "panels": [_panel_json(p, i) for i, p in enumerate(panels(settings))],
    }


def render(settings: AlertSettings) -> str:
    """The dashboard file's text for `settings`."""
    return json.dumps(dashboard(settings), indent=2) + "\n"


if __name__ == "__main__":
    DASHBOARD_FILE.write_text(render(AlertSettings()))
    print(DASHBOARD_FILE)
