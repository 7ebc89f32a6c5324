"""Kubeflow Model Registry, through its Python client (``model-registry``), as the gate sees a
registry."""

from __future__ import annotations

from mapet.errors import MapetError
from mapet.registry.gate import Properties, oldest_first

FORMAT = ("safetensors", "1")


class KubeflowRegistry:
    """Kubeflow Model Registry through its Python client: the registered model ``model``, one
    version per candidate with its classifier's URI as the model artifact and every property as
    the version's custom properties (shown in the Model Registry UI)."""

    def __init__(self, url: str, model: str, author: str = "mapet pipeline"):
        from model_registry import ModelRegistry

        self.model, self.where = model, f"Kubeflow Model Registry {url}, model {model!r}"
        try:
            self.client = ModelRegistry(url, author=author)
        except Exception as error:      # the client raises its own kinds, and aiohttp's, for an unreachable server
            raise MapetError(f"cannot reach Kubeflow Model Registry at {url} ({type(error).__name__}: {error}); "
                             f"check the pipeline's registry_url (http://HOST:PORT inside the cluster)") from error

    def versions(self) -> list[Properties]:
        if self.client.get_registered_model(self.model) is None:
            return []
        records = [{**(version.custom_properties or {}), "version": version.name}
                   for version in self.client.get_model_versions(self.model)]
        for record in records:
            artifact = self.client.get_model_artifact(self.model, str(record["version"]))
            record["uri"] = artifact.uri if artifact else ""
        return oldest_first(records)

    def register(self, version: str, properties: Properties, uri: str) -> str:
        self.client.register_model(self.model, uri, model_format_name=FORMAT[0], model_format_version=FORMAT[1],
                                   version=version, metadata=properties,
                                   version_description=f"MaPeT classifier, fingerprint {properties['fingerprint']}")
        return version

    def set_stage(self, version: str, stage: str) -> None:
        found = self.client.get_model_version(self.model, version)
        found.custom_properties = {**(found.custom_properties or {}), "stage": stage}
        self.client.update(found)
