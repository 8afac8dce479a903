"""Ray Serve application: tier deployments on labelled nodes, the router, the HTTP ingress."""

from aiflow_ray.config.app import AppArgs
from aiflow_ray.serve.builder import build_app

__all__ = ["AppArgs", "build_app"]
