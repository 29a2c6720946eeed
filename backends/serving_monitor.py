"""What a Python-backend model records per request: Triton custom metrics and the prediction log.

Copied beside `model.py` (export/targets/python_runtime.py); runs in Triton's stub process, imports no treeops.
The metric names, kinds, help texts, labels and buckets are monitoring/metric_names.py's, written by export into
the config parameter `treeops_metrics` (JSON, by role): one declaration, and a served version's metrics are visible
in its config. They appear on Triton's metrics port (pb_utils.MetricFamily; 2.51 supports HISTOGRAM).

Warm-up requests are neither counted nor logged: Triton runs each `model_warmup` sample's `batch_size` requests
`count` times (default 1) on every instance before the version is ready, and they look like any client request
(empty id, no flags), so the first that many requests an instance executes are skipped.
The request path only queues what it measured (deque appends, O(1)); a publisher thread hands it to Triton every
`PUBLISH_INTERVAL_S` (each metric call is a message to the Triton process), with the log's lag and dropped count.
So the metrics trail the answers by at most that interval; `close` (finalize) publishes the rest. Asked by a
stopping launcher (prediction_log.py StopHandshake), the publisher stops calling Triton before Triton is frozen.
"""

import collections
import json
import os
import threading
import time

import numpy as np
from prediction_log import PredictionLog, Settings, sampled

METRICS_PARAMETER = "treeops_metrics"
ROLES = ("request_duration", "predictions", "degraded_answers", "log_lag", "log_dropped")
PUBLISH_INTERVAL_S = 0.5


class ServingMonitor:
    """Per-version metrics and log. `features`: served feature names; `raw`: (field, arrow type) of raw inputs."""

    def __init__(self, pb_utils, args, config, params, folder, features, raw=()):
        self.model, self.version = args["model_name"], args["model_version"]
        self.warmup_left = sum(int(w.get("batch_size", 1)) * max(int(w.get("count", 1)), 1)
                               for w in config.get("model_warmup", []))
        if METRICS_PARAMETER not in params:
            raise ValueError(f"model {self.model!r} version {self.version}: config parameter {METRICS_PARAMETER!r} "
                             "is missing (exported before treeops published its serving metrics): re-export the "
                             "version, or `treeops sync` its config")
        declared = json.loads(params[METRICS_PARAMETER])
        missing = [r for r in ROLES if r not in declared]
        if missing:
            raise ValueError(f"config parameter {METRICS_PARAMETER!r} lacks {missing}: re-export the version")
        self._pb, self._declared, self._families = pb_utils, declared, {}
        with open(os.path.join(folder, "treeops.json"), encoding="utf-8") as f:
            objective = json.load(f).get("objective", {})
        self.kind = objective.get("kind", "binary")
        self.threshold = float(objective.get("threshold", 0.5))
        self._duration = self._metric("request_duration")
        self.degraded = self._metric("degraded_answers")  # incremented by the model when it answers degraded
        self._decisions = {}
        self._events = collections.deque()  # (seconds, {decision: rows}) per answered request
        settings = Settings()
        self.log = None
        if settings.root:
            self.log = PredictionLog(settings, self.model, self.version, features, raw)
            self._lag, self._dropped = self._metric("log_lag"), self._metric("log_dropped")
            self._published_dropped = 0
        self._stop = threading.Event()
        self._quiet = False  # the server is stopping: no more calls to Triton
        self._thread = threading.Thread(target=self._run, name=f"treeops-metrics-{self.model}", daemon=True)
        self._thread.start()

    def _metric(self, role, **values):
        d = self._declared[role]
        family = self._families.get(d["name"])
        if family is None:
            kinds = {"counter": self._pb.MetricFamily.COUNTER, "gauge": self._pb.MetricFamily.GAUGE,
                     "histogram": self._pb.MetricFamily.HISTOGRAM}
            family = self._families[d["name"]] = self._pb.MetricFamily(
                name=d["name"], description=d["help"], kind=kinds[d["kind"]])
        known = {"model": self.model, "version": self.version, **values}
        unknown = [k for k in d["labels"] if k not in known]
        if unknown:
            raise ValueError(f"metric {d['name']} declares labels {unknown} the serving path cannot fill "
                             f"(it knows {sorted(known)}): fix monitoring/metric_names.py")
        labels = {k: known[k] for k in d["labels"]}
        if d["kind"] == "histogram":
            return family.Metric(labels=labels, buckets=[float(b) for b in d["buckets"]])
        return family.Metric(labels=labels)

    # --- request path ---------------------------------------------------------------------------------------

    def warmup(self, requests):
        """How many of `requests` (from the front) are Triton's warm-up requests."""
        n = min(self.warmup_left, len(requests))
        self.warmup_left -= n
        return n

    def request_id(self, request):
        """The client's request id, or a fresh one (then a retry is a new sampling decision)."""
        return request.request_id() or os.urandom(8).hex()

    def should_log(self, request_id):
        return self.log is not None and sampled(request_id, self.log.settings.sample_rate)

    def answered(self, scores, started_ns):
        """Queue one answered request's duration and rows by decision (published by the thread)."""
        seconds = (time.perf_counter_ns() - started_ns) / 1e9
        scores = scores.reshape(len(scores), -1)
        if self.kind == "binary":
            positive = int(np.count_nonzero(scores[:, -1] >= self.threshold))
            decisions = {"positive": positive, "negative": len(scores) - positive}
        elif self.kind == "multiclass":
            labels, counts = np.unique(scores.argmax(axis=1), return_counts=True)
            decisions = {str(k): int(n) for k, n in zip(labels, counts)}
        else:
            decisions = {"value": len(scores)}
        self._events.append((seconds, decisions))

    # --- publisher thread -----------------------------------------------------------------------------------

    def _run(self):
        while not self._stop.wait(PUBLISH_INTERVAL_S):
            if self.log is not None and self.log.handshake.stop_requested():
                self._quiet = True
                self.log.prepare_stop()
                self.log.handshake.answer("quiet")
                return
            self.publish()

    def publish(self):
        """Hand every queued measurement, and the log's lag and dropped count, to Triton's metrics."""
        events, rows = self._events, collections.Counter()
        for _ in range(len(events)):
            seconds, decisions = events.popleft()
            self._duration.observe(seconds)
            rows.update(decisions)
        for decision, n in rows.items():
            if n:
                metric = self._decisions.get(decision)
                if metric is None:
                    metric = self._decisions[decision] = self._metric("predictions", decision=decision)
                metric.increment(n)
        if self.log is not None:
            self._lag.set(self.log.lag_s())
            dropped = self.log.dropped
            if dropped > self._published_dropped:
                self._dropped.increment(dropped - self._published_dropped)
                self._published_dropped = dropped

    def close(self):
        """Flush the log and publish what is queued (model finalize)."""
        self._stop.set()
        self._thread.join()
        if self.log is not None:
            self.log.close()
        if not self._quiet:
            self.publish()
