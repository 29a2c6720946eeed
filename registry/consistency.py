"""Drift between the registry and the model repository: what `treeops models` and `serve` report, `sync` repairs."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from export.errors import ExportError
from export.pipeline import served_versions
from export.repository import CONFIG_FILE, GATE_SUFFIX, ModelRepository
from registry import versions as registry
from registry.aliases import CHAMPION

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RepositoryDrift:
    """One model's registry aliases next to what its repository folder serves and holds.

    `problems`: one line per disagreement, each saying how to repair it (empty: in step).
    """

    model_name: str
    aliases: dict[str, int]
    served: tuple[int, ...]
    on_disk: tuple[int, ...]
    problems: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "aliases": self.aliases, "served": list(self.served),
                "on_disk": list(self.on_disk), "problems": list(self.problems)}


def check(model_name: str, repository: ModelRepository) -> RepositoryDrift:
    """Compare `model_name`'s registry with its repository folder (a model never exported has no drift)."""
    aliases = registry.aliases(model_name)
    registered = {r["version"] for r in registry.list_versions(model_name)}
    served, on_disk = served_versions(repository, model_name), tuple(repository.versions(model_name))
    config = repository.model_dir(model_name) / CONFIG_FILE
    fix = "run `treeops sync` (with --triton-url to switch a running Triton)"
    problems = []
    champion = aliases.get(CHAMPION)
    if (served or on_disk) and champion is not None and (not served or served[0] != champion):
        problems.append(f"registry champion is version {champion} but {config} serves "
                        f"{served[0] if served else 'nothing'}: {fix}")
    problems += [f"{config} serves version {v}, missing on disk: {fix}" for v in served if v not in on_disk]
    if (served or on_disk) and champion is not None and champion not in on_disk:
        problems.append(f"champion version {champion} is not exported: {fix}")
    problems += [f"{repository.version_dir(model_name, v)} is not a registered version of {model_name!r}: delete it "
                 "or use the workspace whose registry it came from" for v in on_disk if v not in registered]
    problems += [f"{p} was left by an export that died: `treeops sync` or `treeops export` removes it"
                 for p in repository.stale_work_folders(model_name)]
    gate = repository.model_dir(model_name + GATE_SUFFIX)
    if gate.is_dir():
        problems.append(f"{gate} was left by a loop stopped during its gate: the next `treeops loop --once` removes it")
    return RepositoryDrift(model_name, aliases, served, on_disk, tuple(problems))


def warn_on_drift(repository: ModelRepository) -> list[str]:
    """Log a warning for each drift problem of every model folder in `repository` (a `<model>-gate` folder next to
    `<model>` is one of `<model>`'s problems); returns the lines."""
    lines = []
    folders = {p.name for p in repository.root.iterdir() if p.is_dir()} if repository.root.is_dir() else set()
    for name in sorted(folders):
        if name.endswith(GATE_SUFFIX) and name.removesuffix(GATE_SUFFIX) in folders:
            continue
        try:
            lines += list(check(name, repository).problems)
        except ExportError as exc:
            lines.append(f"{repository.model_dir(name)}: {exc}")
    for line in lines:
        log.warning("registry and repository disagree: %s", line)
    return lines
