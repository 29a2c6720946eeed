"""Tests for monitoring.drift: real Evidently reports on seeded synthetic frames."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from monitoring import drift
from monitoring.drift import DriftResult, run_drift_report
from monitoring.errors import DriftInputError, MonitoringError

N_ROWS = 5_000
NUMERIC = ["amount", "age", "balance", "tenure", "velocity"]
CATEGORICAL = ["channel"]
COLUMNS = NUMERIC + CATEGORICAL
CHANNELS = ["web", "app", "pos"]


def make_frame(seed: int, *, shifted: bool = False) -> pl.DataFrame:
    """5 numeric + 1 categorical column; ``shifted`` moves `amount`, `age` and the channel mix."""
    rng = np.random.default_rng(seed)
    data = {col: rng.normal(loc=10.0 * i, scale=1.0 + i, size=N_ROWS) for i, col in enumerate(NUMERIC)}
    channel_p = [0.6, 0.3, 0.1]
    if shifted:
        data["amount"] = data["amount"] + 3.0  # scale 1 -> a 3-sigma shift
        data["age"] = data["age"] * 2.5 + 5.0
        channel_p = [0.1, 0.3, 0.6]
    data["channel"] = rng.choice(CHANNELS, size=N_ROWS, p=channel_p)
    return pl.DataFrame(data)


@pytest.fixture(scope="module")
def reference() -> pl.DataFrame:
    return make_frame(seed=1)


@pytest.fixture(scope="module")
def same_result(reference: pl.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> DriftResult:
    out = tmp_path_factory.mktemp("same")
    return run_drift_report(reference, make_frame(seed=2), COLUMNS, out, name="same", categorical=CATEGORICAL)


@pytest.fixture(scope="module")
def shifted_result(reference: pl.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> DriftResult:
    out = tmp_path_factory.mktemp("shifted")
    current = make_frame(seed=3, shifted=True)
    return run_drift_report(reference, current, COLUMNS, out, name="shifted", categorical=CATEGORICAL)


def test_same_distribution_is_not_drift(same_result: DriftResult) -> None:
    assert same_result.drift_detected is False
    assert same_result.drifted_columns == 0
    assert same_result.total_columns == len(COLUMNS)
    assert [c.column for c in same_result.columns] == COLUMNS
    assert not any(c.drifted for c in same_result.columns)


def test_shifted_columns_are_flagged(shifted_result: DriftResult) -> None:
    assert shifted_result.drift_detected is True
    flagged = {c.column for c in shifted_result.columns if c.drifted}
    assert flagged == {"amount", "age", "channel"}
    assert shifted_result.drifted_columns == 3
    assert shifted_result.total_columns == len(COLUMNS)


def test_methods_follow_declared_types(shifted_result: DriftResult) -> None:
    by_name = {c.column: c for c in shifted_result.columns}
    # For >1000 rows Evidently uses Wasserstein for numerical and Jensen-Shannon for categorical columns.
    assert "Wasserstein" in by_name["amount"].method
    assert "Jensen-Shannon" in by_name["channel"].method
    assert all(np.isfinite(c.score) for c in shifted_result.columns)


def test_reports_are_written_and_match_result(shifted_result: DriftResult) -> None:
    assert shifted_result.html_path.name == "shifted.html"
    assert shifted_result.json_path.name == "shifted.json"
    html = shifted_result.html_path.read_text(encoding="utf-8")
    assert html.lstrip().startswith("<!DOCTYPE html>")
    assert "amount" in html and "channel" in html
    payload = json.loads(shifted_result.json_path.read_text(encoding="utf-8"))
    statuses = {t["status"] for t in payload["tests"]}
    assert "FAIL" in statuses and "SUCCESS" in statuses
    # No temporary files are left next to the reports.
    assert sorted(p.name for p in shifted_result.json_path.parent.iterdir()) == ["shifted.html", "shifted.json"]


def test_to_dict_is_json_safe(shifted_result: DriftResult) -> None:
    data = json.loads(json.dumps(shifted_result.to_dict()))
    assert data["drift_detected"] is True
    assert data["json_path"] == str(shifted_result.json_path)
    assert [c["column"] for c in data["columns"]] == COLUMNS
    assert {c["column"] for c in data["columns"] if c["drifted"]} == {"amount", "age", "channel"}


def test_polars_categorical_and_large_frames_are_sampled(
    reference: pl.DataFrame, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(drift, "MAX_ROWS_PER_FRAME", 1_000)
    ref = reference.with_columns(pl.col("channel").cast(pl.Categorical))
    cur = make_frame(seed=4, shifted=True).with_columns(pl.col("channel").cast(pl.Categorical))
    with caplog.at_level("INFO", logger="monitoring.drift"):
        result = run_drift_report(ref, cur, COLUMNS, tmp_path, categorical=CATEGORICAL)
    assert result.drift_detected is True
    assert {c.column for c in result.columns if c.drifted} >= {"amount", "age"}
    assert "sampling reference data: 1000 of 5000 rows" in caplog.text


@pytest.mark.parametrize("frame_name", ["reference", "current"])
def test_missing_column_names_column_and_frame(reference: pl.DataFrame, tmp_path: Path, frame_name: str) -> None:
    frames = {"reference": reference, "current": reference.clone()}
    frames[frame_name] = frames[frame_name].drop("balance")
    with pytest.raises(DriftInputError, match=rf"{frame_name} data is missing column\(s\) \['balance'\]"):
        run_drift_report(frames["reference"], frames["current"], COLUMNS, tmp_path, categorical=CATEGORICAL)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("frame_name", ["reference", "current"])
def test_empty_frame_is_rejected(reference: pl.DataFrame, tmp_path: Path, frame_name: str) -> None:
    frames = {"reference": reference, "current": reference.clone()}
    frames[frame_name] = frames[frame_name].clear()
    with pytest.raises(DriftInputError, match=rf"{frame_name} data has no rows"):
        run_drift_report(frames["reference"], frames["current"], COLUMNS, tmp_path, categorical=CATEGORICAL)


def test_string_column_not_declared_categorical(reference: pl.DataFrame, tmp_path: Path) -> None:
    with pytest.raises(DriftInputError, match=r"`channel`.*add it to `categorical`"):
        run_drift_report(reference, reference, COLUMNS, tmp_path)


def test_all_null_column_is_rejected(reference: pl.DataFrame, tmp_path: Path) -> None:
    current = reference.with_columns(pl.lit(None, dtype=pl.Float64).alias("tenure"))
    with pytest.raises(DriftInputError, match=r"`tenure` is entirely null in the current data"):
        run_drift_report(reference, current, COLUMNS, tmp_path, categorical=CATEGORICAL)


@pytest.mark.parametrize(
    ("columns", "categorical", "name", "message"),
    [
        ([], [], "drift", "`columns` is empty"),
        (["amount", "amount"], [], "drift", r"\['amount'\] more than once"),
        (["amount"], ["channel"], "drift", r"\['channel'\], which are not in `columns`"),
        (["amount"], [], "../escape", "not a plain file name"),
    ],
)
def test_bad_arguments(
    reference: pl.DataFrame, tmp_path: Path, columns: list[str], categorical: list[str], name: str, message: str
) -> None:
    with pytest.raises(DriftInputError, match=message):
        run_drift_report(reference, reference, columns, tmp_path, name=name, categorical=categorical)


def test_errors_share_the_monitoring_base() -> None:
    assert issubclass(DriftInputError, MonitoringError)
