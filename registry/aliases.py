"""The registry aliases treeops reads and moves (MLflow aliases; stages are deprecated)."""

CHAMPION = "champion"
"""The version Triton serves to unversioned requests."""
CHALLENGER = "challenger"
"""A newer version waiting for promotion."""
