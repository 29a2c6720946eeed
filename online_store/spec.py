"""The OnlineHistory of a model's fitted features: the namespace and declarations serving uses too."""

from __future__ import annotations

import redis

from backends.online_history import OnlineHistory, namespace_for
from online_store.errors import NoHistoryFeaturesError, OnlineStoreError
from training.features import FittedFeatures


def online_history(fitted: FittedFeatures, client: redis.Redis, url: str) -> OnlineHistory:
    """The spec's history features in the store at `url`, under the namespace the exported model reads
    (export/online.py: `namespace_for(spec name, entity)`), pruned with the spec's late allowance."""
    features = fitted.to_dict()["features"]
    entities = sorted({f["history"]["entity"] for f in features if f.get("history")})
    if not entities:
        raise NoHistoryFeaturesError(f"feature spec {fitted.spec.name!r} declares no history feature, so it has no "
                                     "online state: train with a spec that has some (e.g. card_transactions_v2)")
    if len(entities) > 1:
        raise OnlineStoreError(f"feature spec {fitted.spec.name!r} keys its history features by {entities}; the "
                               "online store serves one entity per spec")
    return OnlineHistory(client, url, namespace_for(fitted.spec.name, entities[0]), features,
                         late_us=fitted.spec.late_arrival_us)
