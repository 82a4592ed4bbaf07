"""``python jobs/serve.py [config.yaml] [key=value ...]``: deploy the restoration app to a running Ray cluster
(``ray_address`` or ``RAY_ADDRESS``) and return, or start a local Ray, serve until Ctrl-C or SIGTERM, and shut down
Serve and that Ray (:func:`datprl.platform.runtime.ray_session`), also when the signal comes while they start.

With no arguments it serves a freshly initialised (untrained) ``paper_tiny`` -- or the weights ``jobs/train.py``
exported to ``outputs/train/model.safetensors`` when they exist -- on http://127.0.0.1:8000. ``smoke=true`` checks
the running app once (health, model, one restoration of a real photo) and exits: the test of this entry point.
"""

from __future__ import annotations

import base64
import io
import sys
import time
from collections.abc import Sequence
from typing import Any

from pydantic import Field

from datprl.platform.config import config_to_dict, parse_cli
from datprl.platform.runtime import (
    SMALL_OBJECT_STORE_BYTES,
    LocalRaySettings,
    cluster_address,
    ray_session,
    stop_exit_code,
)
from datprl.serve.config import LISTEN_FIELDS, ServeConfig


class ServeJobConfig(ServeConfig):
    """Serve DATPRL-IR restoration over HTTP on Ray Serve (a running cluster, or a local Ray started here)."""

    ray_address: str | None = Field(
        None,
        description="running cluster to deploy to (e.g. auto, ray://host:10001); None = RAY_ADDRESS or a local Ray",
    )
    local_num_cpus: int | None = Field(None, ge=1, description="CPUs of a local Ray; None = all of this machine's")
    smoke: bool = Field(False, description="check the running app once (health, model, one restoration) and exit")
    verbose: bool = Field(False, description="show Ray's own INFO logs (start-up, Serve controller notes)")

    def serve_config(self) -> ServeConfig:
        return ServeConfig.model_validate(self.model_dump(include=set(ServeConfig.model_fields)))


def local_ray_settings(config: ServeJobConfig) -> LocalRaySettings:
    """The local Ray started when no cluster is given: ``local_num_cpus`` CPUs, a 256 MiB object store, no dashboard
    (Serve does not need it), the replicas' output in this console."""
    return LocalRaySettings(
        num_cpus=config.local_num_cpus, object_store_bytes=SMALL_OBJECT_STORE_BYTES, dashboard=False, log_to_driver=True
    )


def _smoke(url: str) -> None:
    """One pass over the endpoints with a real photo (scikit-image's astronaut, 128x128 crop)."""
    import numpy as np
    import requests
    import skimage.data
    from PIL import Image

    health = requests.get(f"{url}/healthz", timeout=30).json()
    model = requests.get(f"{url}/v1/model", timeout=30).json()
    buffer = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()[96:224, 160:288]).save(buffer, format="PNG")
    reply = requests.post(
        f"{url}/v1/restore?response=json", data=buffer.getvalue(), headers={"Content-Type": "image/png"}, timeout=120
    )
    reply.raise_for_status()
    body = reply.json()
    print(
        f"[serve] smoke: healthz={health['status']} variant={model['variant']} source={model['source']} "
        f"trained={model['trained']} sha256={model['weights_sha256'][:16]}"
    )
    print(
        f"[serve] smoke: restored {body['width']}x{body['height']} {body['channels']}ch {body['bit_depth']}-bit "
        f"{body['format']} in {body['seconds']} s; prompts {body['prompts']}"
    )
    restored = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["image"]))))
    assert restored.shape == (128, 128, 3), restored.shape


def main(argv: Sequence[str]) -> int:
    """Entry point of ``jobs/serve.py``: 0 when deployed to a cluster or smoke-checked; a local server runs until
    stopped and then returns ``128 + signal`` (143 for SIGTERM, 130 for Ctrl-C) once Serve and its Ray are down."""
    config = parse_cli(ServeJobConfig, argv, prog="serve.py")
    serve_config = config.serve_config()
    weights = serve_config.absolute_weights()  # what the replicas load: build_app resolves it the same way, here
    fresh = f"none: a FRESH, UNTRAINED {config.variant} (seed {config.seed})"
    print(f"[serve] weights: {weights or fresh}", flush=True)
    joined = cluster_address(config.ray_address)
    # A cluster's replica logs stay on the cluster.
    local = LocalRaySettings(log_to_driver=False) if joined else local_ray_settings(config)
    try:
        with ray_session(config.ray_address, local, quiet=not config.verbose, serve=True) as session:
            return _serve(config, serve_config, weights, session.started_here)
    except KeyboardInterrupt:  # SIGTERM (Stopped) or Ctrl-C: ray_session has shut down what it started
        # A signal that interrupts a blocking Ray call reaches here as a plain KeyboardInterrupt: stop_exit_code knows
        # which signal it was.
        done = "the cluster is left as it is" if joined else "Serve and the local Ray of this process are shut down"
        code = stop_exit_code()
        print(f"[serve] stopped (SIGTERM or Ctrl-C); {done}; exit status {code}", flush=True)
        return code


def _serve(config: ServeJobConfig, serve_config: ServeConfig, weights: str | None, started_here: bool) -> int:
    from ray import serve

    from datprl.serve.app import build_app, start_serve

    start_serve(config.host, config.port)
    args: dict[str, Any] = {k: v for k, v in config_to_dict(serve_config).items() if k not in LISTEN_FIELDS}
    serve.run(build_app(args), name=config.app_name, route_prefix=config.route_prefix)
    url = f"http://{config.host}:{config.port}{config.route_prefix.rstrip('/')}"
    print(
        f"[serve] ready: {url}/v1/restore  (docs: {url}/docs, health: {url}/healthz, model: {url}/v1/model)", flush=True
    )
    if weights is None:
        print(
            f"[serve] NOTE: serving an UNTRAINED, freshly initialised {config.variant}: it returns its input "
            "nearly unchanged. Pass weights=<exported .safetensors> to serve a trained network.",
            flush=True,
        )
    if config.smoke:
        _smoke(url)
        return 0
    if not started_here:
        print(
            f"[serve] deployed application {config.app_name!r} to the cluster; it keeps running "
            f"(remove it with `serve shutdown` or `serve delete {config.app_name}`)",
            flush=True,
        )
        return 0
    print("[serve] serving until Ctrl-C or SIGTERM", flush=True)
    while True:  # the signal handlers of ray_session end this wait with an exception
        time.sleep(3600)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
