"""Server: launch and configure Triton, and the gRPC scoring client."""
