"""The online feature store: history features' state in Redis (settings, a local server, backfill, show).

The per-request logic lives in backends/online_history.py, which runs inside Triton; this package is
the host side.
"""
