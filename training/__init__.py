"""Training: synthetic data, lazy ingest, the feature spec, XGBoost training and MLflow tracking."""
