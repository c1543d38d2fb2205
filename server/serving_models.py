"""``/v1/models`` and ``/version``."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from .protocol import ModelCard, ModelList, VersionResponse
from .serving_engine import OpenAIServing


class OpenAIServingModels(OpenAIServing):
    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.served.name, created=self.created)])

    @staticmethod
    def version() -> VersionResponse:
        try:
            return VersionResponse(version=version("axiscap"))
        except PackageNotFoundError:  # run from a source tree that was never installed
            return VersionResponse(version="0+unknown")
