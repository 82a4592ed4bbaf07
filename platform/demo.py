"""Model demo: restore a real photo with a freshly initialised network and write the result.

A one-image smoke run without Ray (the main job is ``python jobs/train.py``): it proves the install, the network,
the metrics and the weights format end to end on a real image that ships inside scikit-image's wheel. A randomly
initialised network does not restore anything yet; the printed PSNRs say so honestly.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pydantic import Field

from datprl.models import count_parameters, create_model, load_model, save_model
from datprl.platform.config import StrictModel, parse_cli, save_resolved_config
from datprl.platform.evaluation.metrics import PAPER, psnr, ssim


class DemoConfig(StrictModel):
    """Restore one real image (degraded by seeded Gaussian noise) with a randomly initialised network."""

    variant: str = Field("paper_tiny", description="model variant from datprl.models.VARIANTS")
    image: str = Field("astronaut", description="a scikit-image sample name or a path to an image file")
    crop: int = Field(256, ge=8, description="centre crop size (pixels) to keep the demo fast on CPU")
    noise_sigma: float = Field(25.0, ge=0, description="Gaussian noise std on the 0-255 scale")
    seed: int = 0
    output_dir: Path = Field(Path("outputs/demo"), description="where the images, weights and config are written")


def load_image(name: str) -> np.ndarray:
    """An RGB uint8 image: a scikit-image sample shipped in its wheel (e.g. 'astronaut') or a file path."""
    path = Path(name)
    if path.suffix:
        if not path.exists():
            raise FileNotFoundError(f"image file {path} not found; pass a path to an existing image or a sample name")
        return np.asarray(Image.open(path).convert("RGB"))
    import skimage.data

    loader = getattr(skimage.data, name, None)
    if loader is None:
        raise ValueError(f"unknown scikit-image sample {name!r}; try astronaut, coffee or chelsea")
    image = loader()
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return image[..., :3]


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0


def _to_uint8(tensor: torch.Tensor) -> np.ndarray:
    return (tensor[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def run(config: DemoConfig) -> dict[str, float]:
    """Degrade, restore, measure and write; returns the measured numbers."""
    torch.manual_seed(config.seed)
    clean = load_image(config.image)
    h, w = clean.shape[:2]
    top, left = max(0, (h - config.crop) // 2), max(0, (w - config.crop) // 2)
    clean = clean[top : top + config.crop, left : left + config.crop]
    target = _to_tensor(clean)
    noise = torch.randn(target.shape, generator=torch.Generator().manual_seed(config.seed)) * config.noise_sigma / 255
    degraded = (target + noise).clamp(0, 1)

    model = create_model(config.variant).eval()
    out_dir = config.output_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    save_resolved_config(config, out_dir / "config.yaml")
    weights = save_model(model, out_dir / "model")
    model = load_model(weights)  # prove the safetensors round trip the serving path relies on

    start = time.perf_counter()
    with torch.inference_mode():
        restored = model(degraded).clamp(0, 1)
    seconds = time.perf_counter() - start

    strip = np.concatenate([_to_uint8(degraded), _to_uint8(restored), clean], axis=1)
    Image.fromarray(_to_uint8(restored)).save(out_dir / "restored.png")
    Image.fromarray(strip).save(out_dir / "input_output_target.png")
    numbers = {
        "params": count_parameters(model),
        "seconds": seconds,
        "input_psnr": psnr(degraded, target).item(),
        "output_psnr": psnr(restored, target).item(),
        "input_ssim": ssim(degraded, target).item(),
        "output_ssim": ssim(restored, target).item(),
    }
    print(
        f"variant {config.variant} ({numbers['params']:,} parameters, random weights), image {config.image} "
        f"{clean.shape[1]}x{clean.shape[0]}, forward {seconds:.2f} s"
    )
    print(f"metric protocol: {PAPER.describe()}")
    print(f"input  PSNR {numbers['input_psnr']:.2f} dB  SSIM {numbers['input_ssim']:.4f}")
    print(f"output PSNR {numbers['output_psnr']:.2f} dB  SSIM {numbers['output_ssim']:.4f}  (untrained network)")
    print(f"wrote {out_dir / 'input_output_target.png'}, {out_dir / 'restored.png'}, {weights}")
    return numbers


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: ``python jobs/demo.py [config.yaml] [key=value ...]``."""
    run(parse_cli(DemoConfig, sys.argv[1:] if argv is None else argv))
    return 0
