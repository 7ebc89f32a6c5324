"""The workspace registry: one JSON file per version in ``<workspace>/registry/<model>/`` on the
shared workspace volume, for clusters without Kubeflow Model Registry and for kfp.local runs."""

from __future__ import annotations

import json
from pathlib import Path

from mapet.errors import MapetError
from mapet.files import write_json
from mapet.registry.gate import Properties, oldest_first


class WorkspaceRegistry:
    """One JSON file per version in ``root/<model>/`` (the shared workspace volume): the registry
    of clusters without Kubeflow Model Registry, and of kfp.local runs."""

    def __init__(self, root: Path, model: str):
        self.folder = Path(root) / model
        self.where = f"the workspace registry {self.folder}"

    def _file(self, version: str) -> Path:
        return self.folder / f"{version}.json"

    def versions(self) -> list[Properties]:
        records = []
        for path in self.folder.glob("v*.json"):
            try:
                records.append(json.loads(path.read_text()))
            except (OSError, json.JSONDecodeError) as error:
                raise MapetError(f"{path}: unreadable registry record ({error}); move it aside to go on") from error
        return oldest_first(records)

    def register(self, version: str, properties: Properties, uri: str) -> str:
        try:
            write_json(self._file(version), {**properties, "version": version, "uri": uri}, exclusive=True)
        except FileExistsError as error:
            raise MapetError(f"{self._file(version)} exists already: another run registered {version} at the same "
                             f"time; run this one again") from error
        return version

    def set_stage(self, version: str, stage: str) -> None:
        record = json.loads(self._file(version).read_text())
        write_json(self._file(version), {**record, "stage": stage})
