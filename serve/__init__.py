"""Ray Serve application serving the restoration network over HTTP (docs/serving.md).

Modules (importing this package imports none of them, so the codecs and the engine never pull in Ray):

* ``config``: :class:`~datprl.serve.config.ServeConfig`, the typed settings every launcher shares.
* ``codec``: format sniffing, content-type checks, header-first pixel limits, decoding and encoding (PNG 8/16-bit,
  JPEG, TIFF, DICOM) and the normalisation to [0, 1] and back.
* ``tiling``: overlapping tiles of one shape with cross-fade blending, rows finished a strip at a time.
* ``engine``: weights loading (local or s3://, safetensors only), padded batched forwards (pixel-bounded, fp32 or
  bf16), prompt summaries, the activation-memory measurement.
* ``memory``: a process's resident memory from ``/proc`` and the estimate of one request's memory from its header.
* ``pipeline``: one request's path after its body is read (plan and memory budget, restore, encode) and the replica
  process's memory set-up, shared by the deployment and the large-image benchmark.
* ``app``: the Serve deployment with its FastAPI ingress and ``build_app``, the application builder.
* ``launch``: ``jobs/serve.py``; ``benchmark``: ``jobs/benchmark_serve.py``. The large-image benchmark
  (``jobs/benchmark_large_images.py``) is ``datprl.platform.bench.large_images``.
"""
