"""Labels that arrive later: checked files, the latest label per transaction, unknown ids counted, joined by id."""

from __future__ import annotations

import datetime as dt

import polars as pl
import pytest

from monitoring.labels import LabelsError, ingest_labels, join_labels, read_labels

T0 = dt.datetime(2026, 3, 1, 12, tzinfo=dt.UTC)


def _csv(path, text: str):
    path.write_text(text)
    return path


def test_wrong_columns_name_the_file_and_the_columns(tmp_path):
    path = _csv(tmp_path / "labels.csv", "txn,label,when\n1,0,2026-03-01T12:00:00\n")
    with pytest.raises(LabelsError, match=r"labels.csv lacks column\(s\) \['transaction_id', 'labelled_at'\]; "
                                          r"it has \['txn', 'label', 'when'\]"):
        ingest_labels(path, tmp_path / "store", pl.Series([], dtype=pl.String))
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("row, column", [("1,2,2026-03-01T12:00:00", "label"), ("1,yes,2026-03-01T12:00:00", "label"),
                                         ("1,1,not a time", "labelled_at"), (",1,2026-03-01T12:00:00", "transaction_id")])
def test_bad_values_name_the_column_and_row(tmp_path, row, column):
    path = _csv(tmp_path / "labels.csv", f"transaction_id,label,labelled_at\n7,0,2026-03-01T11:00:00\n{row}\n")
    with pytest.raises(LabelsError, match=rf"labels.csv: column `{column}` is empty or invalid in rows \[2\]"):
        ingest_labels(path, tmp_path / "store", pl.Series([], dtype=pl.String))


def test_duplicates_keep_the_latest_and_unknown_ids_are_counted(tmp_path):
    path = _csv(tmp_path / "labels.csv", "transaction_id,label,labelled_at\n"
                "1,0,2026-03-01T12:00:00\n1,1,2026-03-01T14:00:00\n1,0,2026-03-01T13:00:00\n"
                "2,1,2026-03-01T12:00:00+02:00\n3,0,2026-03-01T12:00:00\n")
    result = ingest_labels(path, tmp_path / "store", pl.Series(["1", "2", "9"]))
    assert (result.rows, result.duplicates, result.stored, result.unknown_ids) == (5, 2, 3, 1)
    assert result.unknown_examples == ("3",)
    stored = read_labels(tmp_path / "store")
    assert stored.rows() == [("1", 1, T0 + dt.timedelta(hours=2)), ("2", 1, T0 - dt.timedelta(hours=2)),
                             ("3", 0, T0)]


def test_a_later_ingest_relabels_and_wins_ties(tmp_path):
    store = tmp_path / "store"
    ingest_labels(_csv(tmp_path / "a.csv", "transaction_id,label,labelled_at\n1,0,2026-03-01T12:00:00\n"
                       "2,0,2026-03-01T12:00:00\n"), store, pl.Series(["1", "2"]))
    ingest_labels(_csv(tmp_path / "b.csv", "transaction_id,label,labelled_at\n1,1,2026-03-01T12:00:00\n"
                       "2,1,2026-03-01T11:00:00\n"), store, pl.Series(["1", "2"]))
    assert read_labels(store).select("transaction_id", "label").rows() == [("1", 1), ("2", 0)]


def test_parquet_labels_join_predictions_by_transaction_id(tmp_path):
    path = tmp_path / "labels.parquet"
    pl.DataFrame({"transaction_id": [10, 11], "label": [True, False],
                  "labelled_at": [dt.datetime(2026, 3, 1), dt.datetime(2026, 3, 2)]}).write_parquet(path)
    ingest_labels(path, tmp_path / "store", pl.Series(["10", "11"]))
    predictions = pl.DataFrame({"transaction_id": ["10", "11", "12"], "score": [0.9, 0.1, 0.5]})
    joined = join_labels(predictions, read_labels(tmp_path / "store"))
    assert joined.select("transaction_id", "label").rows() == [("10", 1), ("11", 0), ("12", None)]
    assert read_labels(tmp_path / "nothing").height == 0
