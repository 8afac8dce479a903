"""Model registry, offline fetch and verification, loading, and tiny test models."""

from aiflow_ray.models.fetch import ModelFetchError, ModelIntegrityError, fetch_model
from aiflow_ray.models.registry import DEFAULT_PAIR, REGISTRY, UnknownModelError

__all__ = ["DEFAULT_PAIR", "REGISTRY", "ModelFetchError", "ModelIntegrityError", "UnknownModelError", "fetch_model"]
