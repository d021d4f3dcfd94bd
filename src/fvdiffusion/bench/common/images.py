"""Sample grids as pictures."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor


def to_uint8(images: Tensor) -> Tensor:
    """[N, C, H, W] in [-1, 1] -> uint8 [N, H, W, C]."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1)


def grid(images: Tensor, ncols: int | None = None, pad: int = 2) -> Tensor:
    """Tile [N, C, H, W] images in [-1, 1] into one uint8 [rows·(H+pad), cols·(W+pad), C] array."""
    n, c, h, w = images.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    tiles = to_uint8(images)
    canvas = torch.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, ncols)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        canvas[top: top + h, left: left + w] = tiles[i]
    return canvas


def save_grid(images: Tensor, path: Path, ncols: int | None = None, scale: int = 3) -> Path:
    from PIL import Image

    array = grid(images, ncols).numpy()
    mode = "L" if array.shape[2] == 1 else "RGB"
    img = Image.fromarray(array[:, :, 0] if mode == "L" else array, mode=mode)
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return save_image(img, path)


def save_image(img, path: Path) -> Path:
    """Write a PIL image atomically (encoded in memory first: a full disk leaves no 0-byte file)."""
    import io

    from fvdiffusion.durable import write_atomically

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    img.save(buffer, format=path.suffix.lstrip(".").upper().replace("JPG", "JPEG") or "PNG")
    write_atomically(path, buffer.getvalue())
    return path


def save_figure(fig, path: Path, dpi: int = 110) -> Path:
    """Lay out, write and close a matplotlib figure (creating the directory)."""
    import matplotlib.pyplot as plt

    import io

    from fvdiffusion.durable import write_atomically

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    buffer = io.BytesIO()  # rendered in memory: a full disk leaves no half-written figure
    try:
        fig.savefig(buffer, dpi=dpi, format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    write_atomically(path, buffer.getvalue())
    return path


def save_rows(rows: Sequence[tuple[str, Tensor]], path: Path, per_row: int = 16) -> Path:
    """One labelled row of samples per method (the --compare figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 1, figsize=(per_row * 0.55 + 1.5, 0.75 * len(rows) + 0.3), squeeze=False)
    for ax, (label, images) in zip(axes[:, 0], rows):
        ax.imshow(grid(images[:per_row], ncols=per_row).squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=255)
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    return save_figure(fig, path)
