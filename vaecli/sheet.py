"""Contact sheets: originals beside each model's reconstruction, a zoomed crop of its worst region and an error map.

One row per image: the original, then for every model its reconstruction (the worst region outlined), that region
zoomed (original | reconstruction, nearest-neighbour), and a heat map of the absolute error, each with a label.
Tiles are downscaled to at most `MAX_TILE` pixels a side; everything measured (metrics, the worst region) is measured
at full resolution. Only the small tiles are kept: the caller hands over one full-size reconstruction at a time, and
`max_rows` bounds the rows held (the rows with the lowest PSNR are kept). Knows nothing of the CLI.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from vaecli import media

MAX_TILE = 512  # longest side of a downscaled image tile, in pixels
WINDOW = 64  # side of the worst-region window, in source pixels; searched on a grid of half-window steps
ZOOM = 4  # nearest-neighbour magnification of the worst-region crop
GAP = 4  # between the original and the reconstruction halves of a crop tile
MARGIN = 8  # around and between cells
MIN_CELL = 220  # narrowest cell, so that labels stay readable under small tiles
LINE = 16  # height of one label line
LABEL = 2 * LINE + 4  # label area under each tile
HEAT_MAX = 0.1  # absolute error (mean over RGB, pixels in [0, 1]) shown at the top of the colour map
BAND_ROWS = 256  # rows of the error map computed at a time (bounded scratch for large images)

BACKGROUND = (24, 24, 24)
TEXT = (230, 230, 230)
OUTLINE = (0, 230, 255)
# Colour map stops (black -> purple -> red -> orange -> pale yellow), sampled at 0, 1/4, ..., 1.
_STOPS = np.array([(0, 0, 0), (84, 16, 124), (205, 42, 62), (250, 160, 24), (255, 255, 210)], dtype=np.float64)
HEAT_LUT = np.stack([np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_STOPS)), _STOPS[:, c])
                     for c in range(3)], axis=1).round().astype(np.uint8)


@dataclass(frozen=True)
class Region:
    """A window of the source image, in full-resolution pixels, and its mean absolute error."""

    x: int
    y: int
    width: int
    height: int
    error: float

    def box(self) -> list[int]:
        """[x, y, width, height]."""
        return [self.x, self.y, self.width, self.height]


def fit(width: int, height: int, max_side: int = MAX_TILE) -> tuple[int, int]:
    """Tile size (W, H) of a `width` x `height` image: downscaled to `max_side` on its longer side, never enlarged."""
    scale = min(1.0, max_side / width, max_side / height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def error_map(original: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """(H, W) float32 absolute error averaged over RGB, of two (1, 3, H, W) images in [0, 1], made band by band."""
    if original.shape != recon.shape or original.dim() != 4:
        raise ValueError(f"expected two (1, 3, H, W) images of one shape, got {tuple(original.shape)} and "
                         f"{tuple(recon.shape)}")
    h, w = original.shape[-2:]
    err = torch.empty(h, w, dtype=torch.float32)
    for r0 in range(0, h, BAND_ROWS):
        r1 = min(h, r0 + BAND_ROWS)
        a = original[0, :, r0:r1].float()
        b = recon[0, :, r0:r1].float()
        err[r0:r1] = (a - b).abs_().mean(0)
    return err


def _starts(size: int, window: int) -> list[int]:
    step = max(1, window // 2)
    starts = list(range(0, size - window + 1, step))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


def worst_region(err: torch.Tensor, window: int = WINDOW) -> Region:
    """The `window`-sided square (smaller images: the image's side) with the largest mean of `err` (H, W), among
    windows at half-window steps plus the last one flush with each edge; ties go to the top-left one."""
    h, w = err.shape
    wh, ww = min(window, h), min(window, w)
    xs = torch.tensor(_starts(w, ww))
    best, where = -1.0, (0, 0)
    for y in _starts(h, wh):
        cols = torch.zeros(w + 1, dtype=torch.float64)
        cols[1:] = err[y:y + wh].sum(0, dtype=torch.float64).cumsum(0)
        sums = cols[xs + ww] - cols[xs]
        i = int(torch.argmax(sums))  # the first maximum
        if sums[i].item() > best:
            best, where = sums[i].item(), (int(xs[i]), y)
    return Region(where[0], where[1], ww, wh, best / (wh * ww))


def heat_image(err: torch.Tensor, size: tuple[int, int]) -> Image.Image:
    """`err` (H, W) area-averaged to `size` (W, H) and coloured: black at 0, pale yellow at `HEAT_MAX` and above."""
    if tuple(err.shape) != (size[1], size[0]):
        err = F.adaptive_avg_pool2d(err[None, None], (size[1], size[0]))[0, 0]
    index = err.div(HEAT_MAX).clamp_(0, 1).mul_(255).round_().to(torch.uint8).numpy()
    return Image.fromarray(HEAT_LUT[index], "RGB")


def image_tile(pixels: torch.Tensor, size: tuple[int, int]) -> Image.Image:
    """(1, 3, H, W) in [0, 1] as an 8-bit image of `size` (W, H) (Lanczos when downscaling)."""
    img = Image.fromarray(media.to_uint8(pixels), "RGB")
    if img.size != size:
        img = img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return img


def crop_tile(original: torch.Tensor, recon: torch.Tensor, region: Region, zoom: int = ZOOM) -> Image.Image:
    """The region of the original and of the reconstruction, side by side, each magnified `zoom` x (nearest)."""
    size = (region.width * zoom, region.height * zoom)
    tile = Image.new("RGB", (2 * size[0] + GAP, size[1]), BACKGROUND)
    for i, pixels in enumerate((original, recon)):
        part = pixels[..., region.y:region.y + region.height, region.x:region.x + region.width]
        tile.paste(Image.fromarray(media.to_uint8(part), "RGB").resize(size, Image.Resampling.NEAREST),
                   (i * (size[0] + GAP), 0))
    return tile


def outline(img: Image.Image, region: Region, scale: float) -> None:
    """Draw `region` (full-resolution coordinates) on a tile shown at `scale`."""
    x0, y0 = region.x * scale, region.y * scale
    x1 = max(x0 + 2, (region.x + region.width) * scale - 1)
    y1 = max(y0 + 2, (region.y + region.height) * scale - 1)
    ImageDraw.Draw(img).rectangle((x0, y0, x1, y1), outline=OUTLINE, width=2)


@dataclass
class Row:
    """One image's tiles with their labels, in column order."""

    index: int
    tiles: list[tuple[Image.Image, tuple[str, str]]] = field(default_factory=list)
    psnrs: list[float] = field(default_factory=list)


class ContactSheet:
    """Builds a sheet row by row: `start(original, title)`, then `add(model, recon, psnr, ssim)` per model."""

    def __init__(self, max_rows: int | None = None):
        self.max_rows = max_rows
        self.rows: list[Row] = []
        self.total = 0
        self._row: Row | None = None
        self._original: torch.Tensor | None = None

    def start(self, original: torch.Tensor, title: str) -> None:
        """Begin the row of `original` (1, 3, H, W) in [0, 1]; it is referenced until the next `start`/`render`."""
        self._close()
        h, w = original.shape[-2:]
        size = fit(w, h)
        shown = "" if size == (w, h) else f", shown at {size[0] / w:.0%}"
        self._original = original
        self._row = Row(self.total)
        self._row.tiles.append((image_tile(original, size), (title, f"original {w}x{h}{shown}")))
        self.total += 1

    def add(self, model: str, recon: torch.Tensor, psnr: float, ssim: float) -> Region:
        """Add `model`'s reconstruction of the current row's image: its tile, worst-region crop and error map; the
        worst region. `psnr`/`ssim` are only printed (compute them with `vaecli.metrics` at full resolution)."""
        if self._row is None:
            raise RuntimeError("ContactSheet.add before start")
        original = self._original
        h, w = original.shape[-2:]
        size = fit(w, h)
        scale = size[0] / w
        err = error_map(original, recon)
        region = worst_region(err)
        tile = image_tile(recon, size)
        outline(tile, region, scale)
        heat = heat_image(err, size)
        outline(heat, region, scale)
        del err
        score = f"PSNR {psnr:.2f} dB  SSIM {ssim:.4f}"
        self._row.tiles += [
            (tile, (model, score)),
            (crop_tile(original, recon, region),
             (f"{model}: worst {region.width}x{region.height} at {region.x},{region.y}",
              f"original | {model}, {ZOOM}x")),
            (heat, (f"{model}: |error| mean {region.error:.3f} there", f"black 0 .. yellow {HEAT_MAX:g}+")),
        ]
        self._row.psnrs.append(psnr)
        return region

    def _close(self) -> None:
        """Keep the current row; past `max_rows`, drop the kept row whose lowest PSNR is highest (the best one)."""
        if self._row is not None:
            self.rows.append(self._row)
            if self.max_rows is not None and len(self.rows) > self.max_rows:
                best = max(self.rows, key=lambda r: (min(r.psnrs, default=float("inf")), r.index))
                self.rows.remove(best)
        self._row, self._original = None, None

    def cell_size(self) -> tuple[int, list[int]]:
        """Width of every cell, and the height of each row's cells (tallest tile plus the label)."""
        width = max([MIN_CELL] + [img.width for row in self.rows for img, _ in row.tiles])
        heights = [max(img.height for img, _ in row.tiles) + LABEL for row in self.rows]
        return width, heights

    def render(self) -> Image.Image:
        """The sheet: rows in input order, one cell per tile, each label under its tile."""
        self._close()
        if not self.rows:
            raise ValueError("a contact sheet needs at least one image")
        cell, heights = self.cell_size()
        columns = max(len(row.tiles) for row in self.rows)
        sheet = Image.new("RGB", (MARGIN + columns * (cell + MARGIN), MARGIN + sum(h + MARGIN for h in heights)),
                          BACKGROUND)
        draw = ImageDraw.Draw(sheet)
        font = _font()
        top = MARGIN
        for row, height in zip(self.rows, heights, strict=True):
            for col, (img, lines) in enumerate(row.tiles):
                left = MARGIN + col * (cell + MARGIN)
                sheet.paste(img, (left, top))
                for i, text in enumerate(lines):
                    draw.text((left, top + img.height + 2 + i * LINE), _fit_text(draw, text, font, cell),
                              fill=TEXT, font=font)
            top += height + MARGIN
        return sheet


def _font():
    try:
        return ImageFont.load_default(size=12)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """`text`, shortened with an ellipsis to fit `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."
