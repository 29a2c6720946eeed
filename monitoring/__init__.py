"""Data-drift monitoring: compare production features with a reference set using Evidently."""
