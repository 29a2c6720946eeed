"""Retraining a challenger on recent data: served traffic joined with its labels, or a given file."""
