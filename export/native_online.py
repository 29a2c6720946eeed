"""The raw-transaction model in treeops' C backend: `online.json`, the plan backends/treeops_forest.c follows.

A native-compiled version with `online.json` beside `forest.so` takes raw fields (export/online.py's inputs),
reads and updates each entity's history in Redis with online_history.SCRIPT (same keys and semantics as
backends/online_history.OnlineHistory), computes every feature in spec order with the plan's ops and scores
the forest. The ops (all results cast to float32):

- `log1p_clip0`: log1p(x < 0 ? 0 : x) in float64 (NaN stays NaN), Polars' `clip(0).log1p()`;
- `hour_of_day`: floor_mod(t_us, day) / hour, integer division; `iso_weekday`: floor_mod(floor_div(t_us, day)
  + 3, 7) + 1 (1970-01-01 was a Thursday); `is_weekend`: iso_weekday >= 6;
- `category`: the value's index in the sorted `vocabulary` (exact bytes), NaN when unknown;
- `history`: `aggregate` over `window_us` of the entity's history, `column` 0 (none) or 1 + index into `values`.

Stateless ops come from raw_graph.BUILDERS (`Builder.native`), the same entry that states the Polars
expression: a feature without a native op is refused here (FeatureCompileError), never served approximately.
`raw_scorer` applies the plan with numpy in-process, for the export's parity gate.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from backends.online_history import AGGREGATES, SCRIPT, late_us_of, namespace_for, value_columns
from export.errors import FeatureCompileError, UnsupportedModelError
from export.online import TRANSACTION_ID, entity_field, history_features, is_online, non_negative_fields, online_inputs
from export.raw_graph import builder_for, categorical_column
from training.features import Feature, FittedFeatures

ONLINE_FILE = "online.json"
PLAN_FORMAT = 1
_US_PER_DAY = 86_400_000_000
_US_PER_HOUR = 3_600_000_000


def _log1p_clip0(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return np.log1p(np.where(x < 0, 0.0, x))  # NaN < 0 is false: NaN stays NaN


def _hour_of_day(t_us: np.ndarray) -> np.ndarray:
    return np.mod(t_us.astype(np.int64), _US_PER_DAY) // _US_PER_HOUR


def _iso_weekday(t_us: np.ndarray) -> np.ndarray:
    return np.mod(np.floor_divide(t_us.astype(np.int64), _US_PER_DAY) + 3, 7) + 1


#: The stateless ops the C backend implements (besides `category` and `history`), as numpy computes them.
NATIVE_OPS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "log1p_clip0": _log1p_clip0,
    "hour_of_day": _hour_of_day,
    "iso_weekday": _iso_weekday,
    "is_weekend": lambda t_us: _iso_weekday(t_us) >= 6,
}


def online_plan(fitted: FittedFeatures) -> dict:
    """The `online.json` of `fitted`: inputs, store layout and one op per forest feature, in spec order."""
    if not is_online(fitted):
        raise UnsupportedModelError(f"spec {fitted.spec.name!r} has no history features: the native-compiled target "
                                    "serves raw fields only for the raw-transaction model; export a stateless raw-input "
                                    "spec with --target python-onnx")
    described = fitted.to_dict()
    history = [f.history for f in history_features(fitted)]
    times = sorted({h.time for h in history})
    if len(times) != 1:
        raise UnsupportedModelError(f"spec {fitted.spec.name!r} times its history features by {times}; the online "
                                    "store keeps one time field per entity: give them one time field")
    values = value_columns(described["features"])
    max_window_us = max(int(h.window_us) for h in history)
    entity = entity_field(fitted)
    return {
        "format": PLAN_FORMAT,
        "fields": [{"name": r.name, "kind": r.dtype} for r in online_inputs(fitted)],
        "entity": entity,
        "time": times[0],
        "transaction_id": TRANSACTION_ID,
        "values": values,
        "non_negative": non_negative_fields(fitted),
        "namespace": namespace_for(fitted.spec.name, entity),
        "max_window_us": max_window_us,
        "retention_us": max_window_us + late_us_of(described),
        "script": SCRIPT,
        "script_sha1": hashlib.sha1(SCRIPT.encode()).hexdigest(),
        "features": [_feature_op(f, fitted, values) for f in fitted.spec.features],
    }


def _feature_op(feature: Feature, fitted: FittedFeatures, values: list[str]) -> dict:
    if feature.history is not None:
        h = feature.history
        if h.aggregate not in AGGREGATES:
            raise FeatureCompileError(f"history feature {feature.name!r} aggregates {h.aggregate!r}, which the online "
                                      f"store does not compute (it computes {', '.join(AGGREGATES)})")
        return {"name": feature.name, "op": "history", "aggregate": h.aggregate, "window_us": int(h.window_us),
                "column": 1 + values.index(h.value) if h.value else 0}
    if feature.categorical:
        vocab = [str(v) for v in fitted.vocabularies[feature.name]]
        if vocab != sorted(set(vocab)):
            raise FeatureCompileError(f"categorical feature {feature.name!r}: its fitted vocabulary is not sorted and "
                                      "unique, which the native backend's lookup needs; refit the features")
        return {"name": feature.name, "op": "category", "field": categorical_column(feature), "vocabulary": vocab}
    builder = builder_for(feature, fitted)
    if builder.native is None or builder.native[0] not in NATIVE_OPS:
        raise FeatureCompileError(f"feature {feature.name!r} ({feature.expr}) has no op in treeops' C backend; add "
                                  "one (backends/treeops_forest.c, export/native_online.py NATIVE_OPS, its "
                                  "raw_graph.BUILDERS entry's native) or export with --target python-onnx")
    op, field = builder.native
    return {"name": feature.name, "op": op, "field": field}


def write_online_plan(version_dir: Path, fitted: FittedFeatures) -> Path:
    """Write `online.json` into `version_dir` (keys sorted)."""
    path = Path(version_dir) / ONLINE_FILE
    path.write_text(json.dumps(online_plan(fitted), indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return path


def read_online_plan(version_dir: Path) -> dict:
    """The `online.json` of a version folder."""
    return json.loads((Path(version_dir) / ONLINE_FILE).read_text(encoding="utf-8"))


def plan_features(plan: Mapping) -> Callable[[Mapping[str, np.ndarray]], np.ndarray]:
    """The plan's features [N, n_features] float32 of raw feeds (export.raw_graph.raw_feeds: raw columns by
    field name, history features by feature name, as the store would give them), as the C backend computes them."""
    ops = [_op(f) for f in plan["features"]]

    def features(feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        return np.ascontiguousarray(np.column_stack([op(feeds) for op in ops]), dtype=np.float32)

    return features


def _op(feature: Mapping) -> Callable[[Mapping[str, np.ndarray]], np.ndarray]:
    kind = feature["op"]
    if kind == "history":
        return lambda feeds: _column(feeds, feature["name"]).astype(np.float32)
    field = feature["field"]
    if kind == "category":
        index = {v: float(i) for i, v in enumerate(feature["vocabulary"])}
        return lambda feeds: np.array([index.get(v, np.nan) for v in _column(feeds, field).tolist()], np.float32)
    if kind not in NATIVE_OPS:
        raise FeatureCompileError(f"{ONLINE_FILE}: feature {feature['name']!r} has op {kind!r}; known ops: "
                                  f"{sorted([*NATIVE_OPS, 'category', 'history'])}")
    compute = NATIVE_OPS[kind]
    return lambda feeds: compute(_column(feeds, field)).astype(np.float32)


def _column(feeds: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    return np.asarray(feeds[name]).reshape(-1)

