"""Serve raw transaction fields: one ONNX graph computing the stateless features in front of the trees.

Inputs, one tensor each, [N, 1]: the raw columns the stateless features read, named after the raw
fields (`amount` as double, `timestamp` as int64 epoch microseconds UTC, categorical columns as
strings), and every stateful (history) feature as float. A single request cannot compute a history
feature: the raw-transaction model (backends/online_model.py) feeds them from the online store,
and parity feeds them as the feature spec computes them offline (NaN where missing).

Which features exist, their order, which are categorical and their vocabularies all come from
the `FittedFeatures`. A stateless numeric feature compiles only through `BUILDERS`, whose entry
states the exact Polars expression it implements; a feature the spec defines differently fails
loudly (FeatureCompileError) instead of being served with different arithmetic.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import polars as pl
import xgboost as xgb
from onnx import TensorProto, helper

from export.errors import FeatureCompileError
from export.onnx_convert import INPUT_NAME, OUTPUT_NAME, serving_session, to_onnx
from export.triton_config import TensorSpec
from training.features import Feature, FittedFeatures

log = logging.getLogger(__name__)

#: Datetime raw fields are served as int64 epoch microseconds UTC under their own name.
TIMESTAMP_INPUT = "timestamp"
OPSET = 17
ML_OPSET = 2  # LabelEncoder-2 (string -> float); TreeEnsemble*-1 stays valid
_US_PER_DAY = 86_400_000_000
_US_PER_HOUR = 3_600_000_000
_EPOCH_ISO_WEEKDAY = 4  # 1970-01-01 was a Thursday

RawDtype = Literal["double", "int64", "string", "float"]
_ONNX_TYPES = {"double": TensorProto.DOUBLE, "int64": TensorProto.INT64, "string": TensorProto.STRING,
               "float": TensorProto.FLOAT}
_NUMPY_TYPES = {"double": np.float64, "int64": np.int64, "string": np.object_, "float": np.float32}
_TRITON_TYPES = {"double": "TYPE_FP64", "int64": "TYPE_INT64", "string": "TYPE_STRING", "float": "TYPE_FP32"}


@dataclass(frozen=True)
class RawInput:
    """One graph input [N, 1]: a raw column or a stateful (history) feature."""

    name: str
    dtype: RawDtype
    description: str
    stateful: bool = False

    def tensor_spec(self) -> TensorSpec:
        """The Triton config tensor (per row: dims [1])."""
        return TensorSpec(self.name, (1,), _TRITON_TYPES[self.dtype])


class _Graph:
    """Accumulates the feature nodes; `cache` shares sub-results (e.g. the weekday) between features."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: dict[str, RawInput] = {}
        self.cache: dict[str, str] = {}

    def input(self, raw: RawInput) -> str:
        self.inputs.setdefault(raw.name, raw)
        return raw.name

    def const(self, value: float | int, dtype: int) -> str:
        name = f"raw_const_{len(self.initializers)}"
        self.initializers.append(helper.make_tensor(name, dtype, [], [value]))
        return name

    def op(self, op_type: str, inputs: list[str], domain: str = "", **attrs: object) -> str:
        out = f"raw_{op_type.lower()}_{len(self.nodes)}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, domain=domain, **attrs))
        return out

    def to_float(self, name: str) -> str:
        return self.op("Cast", [name], to=TensorProto.FLOAT)


def _amount(g: _Graph) -> str:
    return g.input(RawInput("amount", "double", "transaction amount (NaN if unknown)"))


def _epoch_us(g: _Graph) -> str:
    return g.input(RawInput(TIMESTAMP_INPUT, "int64", "transaction time, integer microseconds since 1970-01-01 UTC"))


def _us_of_day(g: _Graph) -> str:
    if "us_of_day" not in g.cache:  # integer Mod (fmod=0) takes the divisor's sign: never negative before 1970 too
        g.cache["us_of_day"] = g.op("Mod", [_epoch_us(g), g.const(_US_PER_DAY, TensorProto.INT64)])
    return g.cache["us_of_day"]


def _iso_weekday(g: _Graph) -> str:
    if "weekday" not in g.cache:
        t = _epoch_us(g)
        days = g.op("Div", [g.op("Sub", [t, _us_of_day(g)]), g.const(_US_PER_DAY, TensorProto.INT64)])
        shifted = g.op("Add", [days, g.const(_EPOCH_ISO_WEEKDAY - 1, TensorProto.INT64)])
        g.cache["weekday"] = g.op("Add", [g.op("Mod", [shifted, g.const(7, TensorProto.INT64)]),
                                          g.const(1, TensorProto.INT64)])
    return g.cache["weekday"]


def _log_amount(g: _Graph) -> str:
    a = _amount(g)
    zero = g.const(0.0, TensorProto.DOUBLE)
    clipped = g.op("Where", [g.op("Less", [a, zero]), zero, a])  # keeps NaN, unlike Max
    return g.to_float(g.op("Log", [g.op("Add", [clipped, g.const(1.0, TensorProto.DOUBLE)])]))


def _hour_of_day(g: _Graph) -> str:
    return g.to_float(g.op("Div", [_us_of_day(g), g.const(_US_PER_HOUR, TensorProto.INT64)]))


def _day_of_week(g: _Graph) -> str:
    return g.to_float(_iso_weekday(g))


def _is_weekend(g: _Graph) -> str:
    return g.to_float(g.op("GreaterOrEqual", [_iso_weekday(g), g.const(6, TensorProto.INT64)]))


@dataclass(frozen=True)
class Builder:
    """Compiles one stateless feature; `expr` is the Polars expression it reproduces exactly.

    `native`: (op, raw field) of the same arithmetic in treeops' C backend (export/native_online.py names the
    ops it implements); None where the C backend has no such op, and the native target refuses the feature."""

    expr: pl.Expr
    build: Callable[[_Graph], str]
    native: tuple[str, str] | None = None


#: Stateless numeric features the graph can compute, by feature name.
BUILDERS: dict[str, Builder] = {
    "log_amount": Builder(pl.col("amount").clip(lower_bound=0).log1p(), _log_amount, native=("log1p_clip0", "amount")),
    "hour_of_day": Builder(pl.col("timestamp").dt.hour(), _hour_of_day, native=("hour_of_day", TIMESTAMP_INPUT)),
    "day_of_week": Builder(pl.col("timestamp").dt.weekday(), _day_of_week, native=("iso_weekday", TIMESTAMP_INPUT)),
    "is_weekend": Builder((pl.col("timestamp").dt.weekday() >= 6).cast(pl.Int8), _is_weekend,
                          native=("is_weekend", TIMESTAMP_INPUT)),
}


def categorical_column(feature: Feature) -> str:
    """The raw string column a categorical feature encodes; refuses a feature that is not a plain column."""
    if not feature.expr.meta.is_column():
        raise FeatureCompileError(
            f"categorical feature {feature.name!r} is {feature.expr}, not a plain column; "
            "add a builder for it in export/raw_graph.py"
        )
    return feature.expr.meta.output_name()


def builder_for(feature: Feature, fitted: FittedFeatures) -> Builder:
    """The builder of a stateless numeric feature; refuses a feature without one or defined differently."""
    builder = BUILDERS.get(feature.name)
    if builder is None:
        raise FeatureCompileError(
            f"feature {feature.name!r} ({feature.expr}) has no ONNX builder; add one to "
            f"export/raw_graph.py BUILDERS (compilable: {sorted(BUILDERS)}) or serve engineered features"
        )
    if str(builder.expr) != str(feature.expr):
        raise FeatureCompileError(
            f"feature {feature.name!r} is defined as {feature.expr} in spec {fitted.spec.name!r}, but the ONNX "
            f"builder implements {builder.expr}; update export/raw_graph.py BUILDERS to the new definition"
        )
    return builder


def _compile_feature(g: _Graph, feature: Feature, fitted: FittedFeatures) -> str:
    if feature.stateful:
        return g.input(RawInput(feature.name, "float", f"history: {feature.description}", stateful=True))
    if feature.categorical:
        column = categorical_column(feature)
        vocab = [str(v) for v in fitted.vocabularies[feature.name]]
        text = g.input(RawInput(column, "string", f"{feature.description} (unknown values score as missing)"))
        return g.op("LabelEncoder", [text], domain="ai.onnx.ml", keys_strings=vocab,
                    values_floats=[float(i) for i in range(len(vocab))], default_float=float("nan"))
    return builder_for(feature, fitted).build(g)


def raw_inputs(fitted: FittedFeatures) -> list[RawInput]:
    """The graph's inputs, in order of first use by the spec's features."""
    return list(_front(fitted)[0].inputs.values())


def _front(fitted: FittedFeatures) -> tuple[_Graph, str]:
    g = _Graph()
    columns = [_compile_feature(g, f, fitted) for f in fitted.spec.features]
    return g, g.op("Concat", columns, axis=1)


def feature_model(fitted: FittedFeatures) -> onnx.ModelProto:
    """Raw inputs -> the spec's features only: `features` [N, n_features] float, as the trees read them."""
    g, features = _front(fitted)
    nodes = g.nodes[:-1] + [_rename_output(g.nodes[-1], features, INPUT_NAME)]  # the last node is the Concat
    output = helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [None, len(fitted.spec.features)])
    return _model(g, nodes, [output], [], "raw_transactions_to_features")


def compile_raw_model(fitted: FittedFeatures, booster: xgb.Booster) -> onnx.ModelProto:
    """One graph: raw inputs -> the spec's features (in spec order) -> `booster`'s trees -> `probabilities`."""
    trees = to_onnx(booster, len(fitted.spec.features))
    g, features = _front(fitted)
    tree_nodes = [_rename_input(n, INPUT_NAME, features) for n in trees.graph.node]
    model = _model(g, g.nodes + tree_nodes, list(trees.graph.output), list(trees.graph.initializer),
                   "raw_transactions_to_scores", ir_version=trees.ir_version)
    log.info("raw-input graph: %d inputs (%d history features) -> %s", len(g.inputs),
             sum(r.stateful for r in g.inputs.values()), OUTPUT_NAME)
    return model


def _model(
    g: _Graph,
    nodes: list[onnx.NodeProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: list[onnx.TensorProto],
    name: str,
    ir_version: int = 8,
) -> onnx.ModelProto:
    inputs = [helper.make_tensor_value_info(r.name, _ONNX_TYPES[r.dtype], [None, 1]) for r in g.inputs.values()]
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=g.initializers + initializers)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("ai.onnx.ml", ML_OPSET)],
        producer_name="treeops.raw_graph", ir_version=ir_version,
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def _rename_output(node: onnx.NodeProto, old: str, new: str) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    copy.output[:] = [new if n == old else n for n in copy.output]
    return copy


def _rename_input(node: onnx.NodeProto, old: str, new: str) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    copy.input[:] = [new if n == old else n for n in copy.input]
    return copy


def raw_feeds(fitted: FittedFeatures, raw: pl.DataFrame) -> dict[str, np.ndarray]:
    """The graph's inputs for `raw` rows (history features computed by the spec over `raw`, offline)."""
    stateful = fitted.encode(fitted.spec.compute(raw.lazy())).collect()
    feeds: dict[str, np.ndarray] = {}
    for r in raw_inputs(fitted):
        if r.stateful:
            col = stateful[r.name].to_numpy()
        elif r.name == TIMESTAMP_INPUT:
            col = raw[r.name].dt.epoch("us").to_numpy()
        elif r.dtype == "string":
            col = raw[r.name].fill_null("").to_numpy()
        else:
            col = raw[r.name].cast(pl.Float64).fill_null(float("nan")).to_numpy()
        feeds[r.name] = np.asarray(col, dtype=_NUMPY_TYPES[r.dtype]).reshape(-1, 1)
    return feeds


def serving_graph(booster: xgb.Booster, n_features: int, raw: FittedFeatures | None = None) -> onnx.ModelProto:
    """The ONNX model a target writes: trees on the feature tensor, or the raw-input graph when `raw` is given."""
    return compile_raw_model(raw, booster) if raw is not None else to_onnx(booster, n_features)


def raw_file_scorer(path: Path) -> Callable[[Mapping[str, np.ndarray]], np.ndarray]:
    """Score raw feeds (see `raw_feeds`) with a written raw-input model, in-process."""
    session = serving_session(path)

    def score(feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        return session.run([OUTPUT_NAME], dict(feeds))[0]

    return score
