"""Figures people look at after a training run: ROC, PR, calibration, feature importance."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import xgboost as xgb
from matplotlib.figure import Figure
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve


def classifier_figures(y: np.ndarray, p: np.ndarray, booster: xgb.Booster) -> dict[str, Figure]:
    """PNG-ready figures keyed by artifact file name; close them after logging."""
    figs: dict[str, Figure] = {}
    fig, ax = plt.subplots(figsize=(5, 4))
    skm.RocCurveDisplay.from_predictions(y, p, ax=ax)
    ax.set_title("ROC curve (test split)")
    figs["roc_curve.png"] = fig
    fig, ax = plt.subplots(figsize=(5, 4))
    skm.PrecisionRecallDisplay.from_predictions(y, p, ax=ax)
    ax.set_title("Precision-recall curve (test split)")
    figs["pr_curve.png"] = fig
    fig, ax = plt.subplots(figsize=(5, 4))
    frac, mean = calibration_curve(y, p, n_bins=10, strategy="quantile")
    ax.plot(mean, frac, marker="o", label="model")
    ax.plot([0, max(mean.max(), frac.max())], [0, max(mean.max(), frac.max())], ls="--", color="grey", label="ideal")
    ax.set_xlabel("mean predicted probability")
    ax.set_ylabel("observed fraud rate")
    ax.set_title("Calibration (test split, quantile bins)")
    ax.legend()
    figs["calibration.png"] = fig
    gain = booster.get_score(importance_type="gain")
    names = sorted(gain, key=gain.get)
    fig, ax = plt.subplots(figsize=(5, 0.3 * max(len(names), 4) + 1))
    ax.barh(names, [gain[n] for n in names])
    ax.set_xlabel("total gain")
    ax.set_title("Feature importance")
    fig.tight_layout()
    figs["feature_importance.png"] = fig
    return figs
