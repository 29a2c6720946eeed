"""The serving benchmark's own model: a seeded synthetic xgboost forest exported like production.

Kept apart from the run (`bench.serving`) so tests and experiments can build and export the same
model without starting a server. The export goes through the real targets (python-onnx, python-compiled,
native-compiled), the parity gate on the written artifact, and `ModelRepository.write_config`, so
the benchmark measures exactly what `treeops export` would serve.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import xgboost as xgb

from export.manifest import MANIFEST_KEY, file_manifest
from export.parity import ParityReport, check_parity, gate_rows, require
from export.raw_graph import serving_graph
from export.repository import METADATA_FILE, ModelRepository, write_json
from export.signature import ServedSignature
from export.targets import TARGETS
from export.targets.base import ExportTarget
from export.targets.onnx_file import ONNX_FILE, OnnxFileTarget
from export.triton_config import ServingSettings

log = logging.getLogger(__name__)

BENCH_MODEL = "bench"
#: The export targets the benchmark serves, by the names `treeops export --target` takes: the forest in
#: treeops' native Triton backend, or ONNX Runtime / the same forest in the Python backend's model.py.
#: (onnxruntime and fil need backends the pip-installed Triton does not have.)
BENCH_TARGETS: dict[str, type[ExportTarget]] = {
    name: TARGETS[name] for name in ("native-compiled", "python-onnx", "python-compiled")}


@dataclass(frozen=True)
class BenchModelSpec:
    """Shape of the benchmark forest: `trees` rounds of depth `depth` on `features` float columns.

    `train_rows` seeded rows (label from a noisy non-linear function) are enough to grow
    full-depth trees; there is no early stopping, so the forest has exactly `trees` trees.
    """

    trees: int = 200
    depth: int = 6
    features: int = 30
    train_rows: int = 20_000
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def synthetic_rows(n: int, features: int, seed: int) -> np.ndarray:
    """`n` float32 rows of `features` standard-normal columns with about 2% NaN."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype(np.float32)
    x[rng.random(x.shape) < 0.02] = np.nan
    return x


def train_bench_model(spec: BenchModelSpec = BenchModelSpec()) -> xgb.Booster:
    """Train the binary:logistic forest of `spec` (1 thread, so the result does not depend on the machine)."""
    x = synthetic_rows(spec.train_rows, spec.features, spec.seed)
    rng = np.random.default_rng(spec.seed + 1)
    z = np.nan_to_num(x)
    k = min(spec.features, 6)
    logit = z[:, :k] @ rng.normal(size=k) + np.sin(3 * z[:, 0]) * z[:, 1 % spec.features] + rng.normal(size=len(z))
    y = (logit > 0).astype(np.float32)
    params = {"objective": "binary:logistic", "max_depth": spec.depth, "eta": 0.1, "nthread": 1,
              "tree_method": "hist", "seed": spec.seed}
    return xgb.train(params, xgb.DMatrix(x, label=y, missing=np.nan), num_boost_round=spec.trees)


def export_bench_model(
    booster: xgb.Booster,
    n_features: int,
    root: Path,
    serving: ServingSettings,
    *,
    model_name: str = BENCH_MODEL,
    version: int = 1,
    seed: int = 0,
    target: str = "python-onnx",
) -> ParityReport:
    """Write `booster` as `<root>/<model_name>/<version>` with the export target `target` and its config.

    `model.onnx` is always written (the ONNX Runtime floor is measured in every run). The artifact
    must pass the export parity gate (`check_parity` on held-out-like, edge and property rows) on the
    served runtime's own scorer, exactly as `treeops export` requires; ParityError otherwise.
    """
    target_name, target = target, BENCH_TARGETS[target]()
    repository = ModelRepository(root)
    width = target.n_outputs(booster)
    rows = gate_rows(booster, synthetic_rows(500, n_features, seed + 2), n_property=500, seed=seed)
    config = target.model_config(model_name, n_features, width, serving, [version], {})
    with repository.stage_version(model_name, version) as staging:
        if not isinstance(target, OnnxFileTarget):
            onnx.save_model(serving_graph(booster, n_features, None), staging / ONNX_FILE)
        target.write_artifacts(booster, n_features, staging)
        report = check_parity(booster, target.scorer(staging), rows)
        require(report, f"benchmark model {model_name} version {version} ({target_name})")
        write_json(staging / METADATA_FILE, {  # what the backends check at load (names, file manifest)
            "target": target_name, "n_features": n_features, "n_outputs": width, "input_name": target.input_name,
            "output_name": target.output_name, "signature": ServedSignature.from_config(config).to_dict(),
            MANIFEST_KEY: file_manifest(staging)})
    repository.write_config(config)
    log.info("benchmark model written to %s (parity max diff %.2g)", repository.version_dir(model_name, version),
             report.max_abs_diff)
    return report
