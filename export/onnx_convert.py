"""XGBoost booster -> ONNX (onnxmltools), refusing objectives the converter gets wrong.

Every graph has one float input `features` [N, n_features] and exactly one float output
`probabilities` [N, n_outputs] (`n_outputs` below), so the Python backend and Triton's
native onnxruntime backend can serve it with the config the targets generate. For a
regressor the one column is the predicted value (the name is kept for the served API).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import xgboost as xgb

from export.booster import n_outputs, probability_booster, task_of
from export.errors import UnsupportedModelError
from export.signature import FEATURES_INPUT as INPUT_NAME, SCORES_OUTPUT as OUTPUT_NAME

log = logging.getLogger(__name__)

#: What onnxmltools names a classifier's score output (renamed to OUTPUT_NAME, the served name, if they differ).
CONVERTER_SCORES = "probabilities"

def to_onnx(booster: xgb.Booster, n_features: int) -> onnx.ModelProto:
    """Convert `booster` to a graph `features` [N, n_features] -> `probabilities` [N, n_outputs]."""
    from onnxmltools import convert_xgboost
    from onnxmltools.convert.common.data_types import FloatTensorType

    width = n_outputs(booster)
    plain = probability_booster(booster)
    plain.feature_names = None  # the converter needs f0, f1, ...; names live in the feature spec
    plain.feature_types = None
    source: xgb.Booster | xgb.XGBClassifier = plain
    if task_of(booster) != "regression":
        # Given a Booster, onnxmltools guesses "regression" when every tree cover is a whole number
        # (e.g. one tree with base_score 0.5) and emits raw margins; a classifier wrapper avoids the guess.
        source = xgb.XGBClassifier()
        source.load_model(bytearray(plain.save_raw("json")))
    model = convert_xgboost(source, initial_types=[(INPUT_NAME, FloatTensorType([None, n_features]))])
    model = _single_output(model, width)
    onnx.checker.check_model(model)
    return model


def _single_output(model: onnx.ModelProto, width: int) -> onnx.ModelProto:
    """Keep only the score output (drop `label`), named OUTPUT_NAME with a static width."""
    graph = model.graph
    scores = [o.name for o in graph.output if o.name == CONVERTER_SCORES] or [o.name for o in graph.output][-1:]
    if not scores:
        raise UnsupportedModelError("the converted ONNX graph has no outputs; this is a converter bug")
    source = scores[0]
    if source != OUTPUT_NAME:
        # Regressors come out as `variable` [N, 1]: rename the tensor wherever it appears.
        for node in graph.node:
            node.input[:] = [OUTPUT_NAME if n == source else n for n in node.input]
            node.output[:] = [OUTPUT_NAME if n == source else n for n in node.output]
    del graph.output[:]
    graph.output.append(onnx.helper.make_tensor_value_info(OUTPUT_NAME, onnx.TensorProto.FLOAT, [None, width]))
    pruned = onnx.utils.Extractor(model).extract_model([i.name for i in graph.input], [OUTPUT_NAME])
    pruned.ir_version = model.ir_version
    pruned.producer_name, pruned.producer_version = model.producer_name, model.producer_version
    return pruned


def serving_session(path: Path):
    """An ONNX Runtime session configured as model.py serves it: one intra-op thread, sequential.

    More threads split a small batch's trees between threads and sum them in another order,
    so the parity gate must run exactly this configuration to check the served bits.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def file_scorer(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """Score rows with the ONNX file at `path`, configured as served, as a parity scorer."""
    session = serving_session(path)

    def score(x: np.ndarray) -> np.ndarray:
        return session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)})[0]

    return score
