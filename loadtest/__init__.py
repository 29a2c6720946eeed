"""Load tests against a running Triton: Locust users, typed SLOs and a headless runner."""
