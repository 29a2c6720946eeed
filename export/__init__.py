"""Export: registered MLflow version -> ONNX artifacts -> parity-checked -> Triton repository version."""
