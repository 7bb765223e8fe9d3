"""Seeded generator of noisy rendered text pages with exact ground truth (``pipeserve-make-pages``).

Each page holds 5-8 rows of 1-3 short phrases (about 11 lines per page) of English-ish
words and numbers in DejaVu fonts of different sizes and positions, on a slightly tinted
background with blur, noise and contrast changes. The ground truth is the text of every line
and its tight ink box, listed in reading order.

With ``rotate_fraction`` > 0 (``--rotate-fraction``) about that fraction of the lines is drawn
turned by 180 degrees in place (same box, same layout), for measuring text-line orientation
classifiers; their ground truth carries ``"angle": 180`` (other lines: no ``angle`` key, i.e.
0). The choice of lines uses its own random stream, so the layout, the text and, with the
default 0, every byte of the output are those of the plain page set.

Guarantee: ``generate_page(seed, index)`` is a pure function of its arguments (same bytes
every time on the same Pillow/OpenCV build).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
FONT_FILES = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf",
              "DejaVuSansCondensed.ttf", "DejaVuSerif-Bold.ttf")
WORDS = """the of and to in is for on with as by at from that this it be are was or an will can
not all new more one about your which their has our time data page order report total amount
price date number service system network model server request result value table figure
section account customer invoice payment balance due item quantity unit address city street
phone email name first last office north south east west river market station road bridge
garden house water light power energy green blue red black white summer winter spring autumn
morning evening today monday friday january march april june october december annual monthly
weekly daily project budget review meeting notes draft final version update status pending
approved shipped delivered returned open closed small large quick brown fox jumps over lazy
dog simple example student school library museum hospital airport hotel restaurant coffee
bread apple orange paper pencil window door table chair computer keyboard screen camera music
""".split()


@dataclass(frozen=True)
class TruthLine:
    """One ground-truth line: its text, tight box x1,y1..x4,y4 (clockwise from top-left) and
    the angle it is drawn at (0 or 180 degrees; the text reads upright after turning it back)."""

    text: str
    box: tuple[float, ...]
    angle: int = 0


@dataclass(frozen=True)
class Page:
    png: bytes
    width: int
    height: int
    lines: tuple[TruthLine, ...]


@lru_cache(maxsize=64)
def _font(index: int, size: int) -> ImageFont.ImageFont:
    files = [FONT_DIR / f for f in FONT_FILES if (FONT_DIR / f).is_file()]
    if not files:   # no DejaVu on this machine: Pillow's bundled scalable font
        return ImageFont.load_default(size=size)
    return ImageFont.truetype(str(files[index % len(files)]), size)


def _token(rng: np.random.Generator) -> str:
    r = rng.random()
    if r < 0.70:
        word = str(rng.choice(WORDS))
        c = rng.random()
        return word.capitalize() if c < 0.2 else word.upper() if c < 0.25 else word
    if r < 0.80:
        return str(int(rng.integers(0, 10 ** int(rng.integers(1, 6)))))
    if r < 0.86:
        return f"${rng.integers(1, 999)}.{rng.integers(0, 100):02d}"
    if r < 0.91:
        return f"{rng.integers(1, 29):02d}/{rng.integers(1, 13):02d}/{rng.integers(1990, 2031)}"
    if r < 0.95:
        return f"{rng.integers(0, 100)}.{rng.integers(0, 10)}%"
    letters = "".join(chr(ord("A") + int(k)) for k in rng.integers(0, 26, 2))
    return f"{letters}-{rng.integers(100, 10000)}"


def _phrase(rng: np.random.Generator, font, max_width: float) -> str:
    """1-3 tokens (short, label- or cell-like phrases), at most ``max_width`` pixels wide."""
    words = [_token(rng) for _ in range(int(rng.choice([1, 1, 2, 2, 3])))]
    text = " ".join(words)
    while len(words) > 1 and font.getlength(text) > max_width:
        words.pop()
        text = " ".join(words)
    if rng.random() < 0.25 and font.getlength(text + ".") <= max_width:
        text += "." if rng.random() < 0.7 else ":"
    return text


def _draw_turned(image: Image.Image, xy: tuple[float, float], text: str, font, ink) -> tuple[int, ...]:
    """Draw ``text`` turned by 180 degrees inside the box it would take upright; its box."""
    box = ImageDraw.Draw(image).textbbox(xy, text, font=font)
    x0, y0, x1, y1 = (int(np.floor(box[0])), int(np.floor(box[1])), int(np.ceil(box[2])), int(np.ceil(box[3])))
    mask = Image.new("L", (max(1, x1 - x0), max(1, y1 - y0)), 0)
    ImageDraw.Draw(mask).text((xy[0] - x0, xy[1] - y0), text, font=font, fill=255)
    image.paste(Image.new("RGB", mask.size, ink), (x0, y0), mask.rotate(180))
    return box


def generate_page(seed: int, index: int, rotate_fraction: float = 0.0) -> Page:
    """Render page ``index`` of the set ``seed``; deterministic in its arguments."""
    if not 0.0 <= rotate_fraction <= 1.0:
        raise ValueError(f"rotate_fraction must be in [0, 1], got {rotate_fraction}")
    rng = np.random.default_rng([seed, index])
    turn_rng = np.random.default_rng([seed, index, 180])   # its own stream: layout unchanged
    width = int(rng.integers(900, 1200))
    margin = int(rng.integers(24, 48))
    n_rows = int(rng.integers(5, 9))
    sizes = rng.integers(14, 36, n_rows)
    gaps = rng.uniform(0.6, 2.0, n_rows) * sizes
    height = int(2 * margin + (sizes * 1.25).sum() + gaps.sum())
    bg = rng.integers(215, 256, 3)
    image = Image.new("RGB", (width, height), tuple(int(v) for v in bg))
    draw = ImageDraw.Draw(image)
    ink = tuple(int(v) for v in rng.integers(0, 110, 3))
    lines: list[TruthLine] = []
    y = float(margin)
    avail = width - 2 * margin
    for size, gap in zip(sizes, gaps):
        font = _font(int(rng.integers(0, len(FONT_FILES))), int(size))
        columns = int(rng.choice([1, 1, 2, 2, 3]))   # form/table-like rows of separate phrases
        col_w = avail / columns
        for k in range(columns):
            text = _phrase(rng, font, 0.8 * col_w)
            left = margin + k * col_w + rng.uniform(0, max(0.0, 0.8 * col_w - font.getlength(text)))
            angle = 180 if rotate_fraction > 0 and turn_rng.random() < rotate_fraction else 0
            if angle:
                x0, y0, x1, y1 = _draw_turned(image, (left, y), text, font, ink)
            else:
                draw.text((left, y), text, font=font, fill=ink)
                x0, y0, x1, y1 = draw.textbbox((left, y), text, font=font)
            lines.append(TruthLine(text, (float(x0), float(y0), float(x1), float(y0),
                                          float(x1), float(y1), float(x0), float(y1)), angle))
        y += size * 1.25 + gap
    arr = np.asarray(image).astype(np.float32)
    # scanner-like degradation: resolution loss, blur, contrast/brightness, sensor noise
    shrink = rng.uniform(0.55, 1.0)
    if shrink < 0.95:
        small = cv2.resize(arr, (round(width * shrink), round(height * shrink)), interpolation=cv2.INTER_AREA)
        arr = cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)
    sigma = rng.uniform(0.0, 1.2)
    if sigma > 0.2:
        arr = cv2.GaussianBlur(arr, (0, 0), sigma)
    contrast = rng.uniform(0.55, 1.0)
    arr = (arr - 128.0) * contrast + 128.0 + rng.uniform(-15, 15)
    arr += rng.normal(0.0, rng.uniform(3.0, 14.0), arr.shape)
    out = np.clip(arr, 0, 255).astype(np.uint8)
    ok, png = cv2.imencode(".png", out[:, :, ::-1])
    assert ok
    return Page(png=png.tobytes(), width=width, height=height, lines=tuple(lines))


def write_pages(out: Path, count: int, seed: int, progress: bool = True,
                rotate_fraction: float = 0.0) -> list[Page]:
    """Write ``p000.png``... and ``ground_truth.json`` into ``out``; return the pages."""
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    pages, meta = [], []
    # disable=None: tqdm turns itself off when stderr is not a terminal (CI, logs)
    for i in tqdm(range(count), desc="pages", unit="page", disable=None if progress else True):
        page = generate_page(seed, i, rotate_fraction)
        name = f"p{i:03d}.png"
        (out / name).write_bytes(page.png)
        pages.append(page)
        meta.append({"file": name, "width": page.width, "height": page.height,
                     "lines": [{"text": ln.text, "box": list(ln.box), **({"angle": ln.angle} if ln.angle else {})}
                               for ln in page.lines]})
    doc = {"seed": seed, "count": count, "generator": "services.ocr.pages", "pages": meta}
    if rotate_fraction:
        doc["rotate_fraction"] = rotate_fraction
    (out / "ground_truth.json").write_text(json.dumps(doc, indent=1))
    return pages


def load_pages(directory: str | Path) -> list[Page]:
    """Read pages written by :func:`write_pages` (``ground_truth.json`` + PNGs)."""
    directory = Path(directory)
    gt = directory / "ground_truth.json"
    if not gt.is_file():
        raise FileNotFoundError(f"{gt} does not exist (run `pipeserve-make-pages --out {directory}`)")
    doc = json.loads(gt.read_text())
    return [Page(png=(directory / p["file"]).read_bytes(), width=p["width"], height=p["height"],
                 lines=tuple(TruthLine(ln["text"], tuple(ln["box"]), int(ln.get("angle", 0))) for ln in p["lines"]))
            for p in doc["pages"]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pipeserve-make-pages",
        description="Generate noisy rendered text pages with exact ground truth "
                    "(p000.png ... and ground_truth.json) for measuring OCR accuracy (CER).")
    parser.add_argument("--out", type=Path, default=Path("data/eval"), help="output directory (default: %(default)s)")
    parser.add_argument("--count", type=int, default=40, help="number of pages (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="page set seed (default: %(default)s)")
    parser.add_argument("--rotate-fraction", type=float, default=0.0,
                        help="draw about this fraction of the lines turned by 180 degrees, recorded as "
                             "\"angle\": 180 in the ground truth (default: %(default)s)")
    args = parser.parse_args(argv)
    if not 0.0 <= args.rotate_fraction <= 1.0:
        parser.error(f"--rotate-fraction must be in [0, 1], got {args.rotate_fraction}")
    pages = write_pages(args.out, args.count, args.seed, rotate_fraction=args.rotate_fraction)
    n = sum(len(p.lines) for p in pages)
    print(f"wrote {len(pages)} pages ({n} lines, {n / max(1, len(pages)):.1f} per page) to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
