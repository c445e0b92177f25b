"""Fixed filters on real digits: Gaussian blur and Sobel edges, through jaxcnn's depthwise conv.

    python examples/filters_demo.py                      # MNIST test images from ../shared/data/mnist
    python examples/filters_demo.py --images PATH.gz --count 6 --out runs/filters_demo.png

Reads an IDX image file (``t10k-images-idx3-ubyte.gz``) with gzip + numpy and writes one PNG: a row per image,
columns original | Gaussian blur | Sobel x | Sobel y | gradient magnitude. Takes a few seconds on a CPU.
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from jaxcnn.nn import filters  # noqa: E402

# MNIST in ../shared/data/mnist beside the repository, where jaxcnn's readers look for it too.
DEFAULT_IMAGES = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist" / "t10k-images-idx3-ubyte.gz")


def read_idx_images(path: str | Path, count: int) -> np.ndarray:
    """The first ``count`` images of an IDX3 file (optionally gzipped) as uint8 ``[count, rows, cols]``."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        header = np.frombuffer(f.read(16), dtype=">u4")
        magic, n, rows, cols = (int(v) for v in header)
        if magic != 2051:
            raise ValueError(f"{path} is not an IDX image file (magic {magic}, expected 2051)")
        count = min(count, n)
        pixels = np.frombuffer(f.read(count * rows * cols), dtype=np.uint8)
    return pixels.reshape(count, rows, cols)


def filter_panels(images: np.ndarray) -> dict[str, np.ndarray]:
    """images: uint8 ``[N, H, W]`` -> named float ``[N, H, W]`` panels (pixels scaled to [0, 1])."""
    x = images[..., None].astype(np.float32) / 255.0
    gx = filters.apply_filter(x, filters.sobel_x())
    gy = filters.apply_filter(x, filters.sobel_y())
    panels = {
        "original": x,
        "gaussian 5x5, sigma 1": filters.apply_filter(x, filters.gaussian_kernel(5, 1.0)),
        "sobel x": gx,
        "sobel y": gy,
        "|gradient|": np.sqrt(np.square(gx) + np.square(gy)),
    }
    return {name: np.asarray(p)[..., 0] for name, p in panels.items()}


def plot(panels: dict[str, np.ndarray], out: Path) -> None:
    n = next(iter(panels.values())).shape[0]
    fig, axes = plt.subplots(n, len(panels), figsize=(2 * len(panels), 2 * n), squeeze=False)
    for col, (name, images) in enumerate(panels.items()):
        signed = name.startswith("sobel")
        for row in range(n):
            ax = axes[row, col]
            if signed:  # derivatives: blue negative, red positive, white zero
                limit = float(np.abs(images[row]).max()) or 1.0
                ax.imshow(images[row], cmap="bwr", vmin=-limit, vmax=limit)
            else:
                ax.imshow(images[row], cmap="gray")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default=DEFAULT_IMAGES, help="IDX3 image file (.gz or raw)")
    parser.add_argument("--count", type=int, default=4, help="how many images (rows)")
    parser.add_argument("--out", default="runs/filters_demo.png", help="the PNG to write")
    args = parser.parse_args(argv)
    out = Path(args.out)
    plot(filter_panels(read_idx_images(args.images, args.count)), out)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
