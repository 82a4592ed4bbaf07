"""``python jobs/serve.py [config.yaml] [key=value ...]``: deploy the restoration app to a running Ray cluster
(``ray_address`` or ``RAY_ADDRESS``) and return, or start a local Ray, serve until Ctrl-C, and shut down.

With no arguments it serves a freshly initialised (untrained) ``paper_tiny`` -- or the weights ``jobs/train.py``
exported to ``outputs/train/model.safetensors`` when they exist -- on http://127.0.0.1:8000. ``smoke=true`` checks
the running app once (health, model, one restoration of a real photo) and exits: the test of this entry point.
"""

from __future__ import annotations

import base64
import io
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

from pydantic import Field

from datprl.platform.config import config_to_dict, parse_cli
from datprl.serve.config import LISTEN_FIELDS, ServeConfig


class ServeJobConfig(ServeConfig):
    """Serve DATPRL-IR restoration over HTTP on Ray Serve (a running cluster, or a local Ray started here)."""

    ray_address: str | None = Field(
        None, description="running cluster to deploy to (e.g. auto, ray://host:10001); None = RAY_ADDRESS or a local Ray"
    )
    local_num_cpus: int | None = Field(None, ge=1, description="CPUs of a local Ray; None = all of this machine's")
    smoke: bool = Field(False, description="check the running app once (health, model, one restoration) and exit")

    def serve_config(self) -> ServeConfig:
        return ServeConfig.model_validate(self.model_dump(include=set(ServeConfig.model_fields)))


def _start_ray(config: ServeJobConfig) -> bool:
    """Connect to the cluster or start a local Ray; True when this process started (and must stop) it."""
    import ray

    address = config.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
        return False
    ray.init(num_cpus=config.local_num_cpus, include_dashboard=False, object_store_memory=256 * 1024**2,
             log_to_driver=True)
    return True


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
    reply = requests.post(f"{url}/v1/restore?response=json", data=buffer.getvalue(),
                          headers={"Content-Type": "image/png"}, timeout=120)
    reply.raise_for_status()
    body = reply.json()
    print(f"[serve] smoke: healthz={health['status']} variant={model['variant']} source={model['source']} "
          f"trained={model['trained']} sha256={model['weights_sha256'][:16]}")
    print(f"[serve] smoke: restored {body['width']}x{body['height']} {body['channels']}ch {body['bit_depth']}-bit "
          f"{body['format']} in {body['seconds']} s; prompts {body['prompts']}")
    restored = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["image"]))))
    assert restored.shape == (128, 128, 3), restored.shape


def main(argv: Sequence[str]) -> int:
    config = parse_cli(ServeJobConfig, argv, prog="serve.py")
    import ray
    from ray import serve

    from datprl.serve.app import build_app, start_serve

    serve_config = config.serve_config()
    weights = serve_config.absolute_weights()  # what the replicas load: build_app resolves it the same way, here
    print(f"[serve] weights: {weights or f'none: a FRESH, UNTRAINED {config.variant} (seed {config.seed})'}", flush=True)
    started_here = _start_ray(config)
    try:
        start_serve(config.host, config.port)
        args: dict[str, Any] = {k: v for k, v in config_to_dict(serve_config).items() if k not in LISTEN_FIELDS}
        serve.run(build_app(args), name=config.app_name, route_prefix=config.route_prefix)
        url = f"http://{config.host}:{config.port}{config.route_prefix.rstrip('/')}"
        print(f"[serve] ready: {url}/v1/restore  (docs: {url}/docs, health: {url}/healthz, model: {url}/v1/model)",
              flush=True)
        if weights is None:
            print(f"[serve] NOTE: serving an UNTRAINED, freshly initialised {config.variant}: it returns its input "
                  "nearly unchanged. Pass weights=<exported .safetensors> to serve a trained network.", flush=True)
        if config.smoke:
            _smoke(url)
            return 0
        if not started_here:
            print(f"[serve] deployed application {config.app_name!r} to the cluster; it keeps running "
                  f"(remove it with `serve shutdown` or `serve delete {config.app_name}`)", flush=True)
            return 0
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        print("[serve] serving until Ctrl-C", flush=True)
        try:
            while not stop.wait(1.0):
                pass
        except KeyboardInterrupt:
            pass
        return 0
    finally:
        if started_here:
            try:
                serve.shutdown()
            finally:
                ray.shutdown()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
