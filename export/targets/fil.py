"""The XGBoost JSON model served by Triton's FIL backend (`backend: "fil"`, RAPIDS Forest Inference).

Triton 24.10's FIL backend reads XGBoost JSON with Treelite 4.3, which predates XGBoost 3.1's
format: it rejects the `cats` field and the vector `base_score` ("stof"). `xgboost.json` is
therefore written in the pre-3.1 layout: no empty `cats`, a scalar `base_score`, and per-class
intercepts of multi-class models folded into the leaves of each class's first tree (softmax is
unchanged by that). The parity gate scores the written file with xgboost, so the rewrite is
checked on every export. Not in the pip wheel's Triton; use the NGC container on a GPU node.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import xgboost as xgb
from tritonclient.grpc import model_config_pb2 as mc

from export.errors import ModelFileError
from export.booster import legacy_xgboost_json, task_of
from export.parity import Scorer
from export.targets.base import ExportTarget
from export.triton_config import ServingSettings, TensorSpec, model_config
from training.features import FittedFeatures

log = logging.getLogger(__name__)

MODEL_FILE = "xgboost.json"


class FilTarget(ExportTarget):
    """`xgboost.json` for the FIL backend: `input__0` [n_features] -> `output__0` [n_outputs], FP32.

    Classifiers are served with `predict_proba` (binary: [P(0), P(1)]; multi-class: all classes),
    regressors with `output_class: false` (one value). The instance kind is KIND_GPU when the
    serving settings ask for a GPU and KIND_AUTO otherwise (a GPU where the node has one).
    """

    name = "fil"
    input_name = "input__0"
    output_name = "output__0"

    def write_artifacts(
        self, booster: xgb.Booster, n_features: int, version_dir: Path, raw_features: FittedFeatures | None = None
    ) -> None:
        self.require_feature_tensor(raw_features)
        task_of(booster)  # refuses objectives the served probabilities would get wrong
        model = legacy_xgboost_json(booster)
        (version_dir / MODEL_FILE).write_text(json.dumps(model))

    def scorer(self, version_dir: Path) -> Scorer:
        """xgboost reading the written `xgboost.json`, shaped like the FIL output."""
        try:
            booster = xgb.Booster(model_file=str(version_dir / MODEL_FILE))
        except xgb.core.XGBoostError as exc:
            raise ModelFileError.unreadable(str(version_dir / MODEL_FILE), exc, "export the version again") from exc
        task = task_of(booster)

        def score(x: np.ndarray) -> np.ndarray:
            p = np.asarray(booster.inplace_predict(np.ascontiguousarray(x, dtype=np.float32)), dtype=np.float32)
            if task == "binary":
                return np.stack([1 - p, p], axis=1)
            return p.reshape(len(x), -1)

        return score

    def model_config(
        self,
        model_name: str,
        n_features: int,
        n_outputs: int,
        serving: ServingSettings,
        versions: Sequence[int],
        parameters: Mapping[str, str],
        inputs: Sequence[TensorSpec] | None = None,
    ) -> mc.ModelConfig:
        self.require_feature_tensor(inputs)
        classifier = n_outputs > 1  # every classifier here serves probabilities; a regressor serves 1 value
        fil = {
            "model_type": "xgboost_json",
            "output_class": str(classifier).lower(),
            "predict_proba": str(classifier).lower(),
            "storage_type": "AUTO",
        }
        if classifier:
            fil["threshold"] = "0.5"
        cfg = model_config(
            model_name,
            backend="fil",
            inputs=[TensorSpec(self.input_name, (n_features,))],
            outputs=[TensorSpec(self.output_name, (n_outputs,))],
            serving=serving,
            versions=versions,
            parameters={**fil, **parameters},
        )
        kind = mc.ModelInstanceGroup.KIND_GPU if serving.instance_kind == "gpu" else mc.ModelInstanceGroup.KIND_AUTO
        for group in cfg.instance_group:
            group.kind = kind
        return cfg
