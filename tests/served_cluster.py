"""A local loopback Ray cluster serving one application, for the suites that need a real one.

The Ray processes inherit the given keys from this process's environment (set before the cluster
starts, restored after it stops); the driver connects through the cluster's private temp dir.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from aiflow_ray import cluster

APP = "aiflow"


@contextlib.contextmanager
def served_cluster(state: Path, gcs_port: int, dashboard_port: int, http_port: int, env: dict[str, str],
                   app_args: dict[str, Any]) -> Iterator[str]:
    """Start the cluster, deploy ``app_args`` at / (not waiting for it), yield its URL; stop it all after."""
    os.environ.update(cluster.LOOPBACK_ENV)
    previous = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    info = cluster.up(state, gcs_port=gcs_port, dashboard_port=dashboard_port, cpus_per_node=4)
    try:
        import ray
        from ray import serve

        from aiflow_ray.serve import build_app

        ray.init(address=info.address, _node_ip_address="127.0.0.1", _temp_dir=info.temp_dir, log_to_driver=False)
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": http_port})
        serve.run(build_app(app_args), name=APP, route_prefix="/", blocking=False)
        yield f"http://127.0.0.1:{http_port}"
    finally:
        try:
            import ray
            from ray import serve

            if ray.is_initialized():  # else serve.shutdown() would start a local instance
                serve.shutdown()
                ray.shutdown()
        finally:
            cluster.down(state)
            for name, value in previous.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
