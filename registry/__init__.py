"""The registry lifecycle: registered versions and their aliases, sync, gated promotion, rollout.

`versions` and `aliases` read MLflow (export reads its input through them); `sync`, `promotion`
and `rollout` drive export and a running Triton so the repository mirrors the registry.
"""
