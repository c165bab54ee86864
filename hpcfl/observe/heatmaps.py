"""Attention heatmaps of a MIL run (``<run>/attention/<slide>.npz``, written by its sites at the end) drawn
over each slide's tiling thumbnail, for the HTML report: where the final global model looked."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ..rundir.paths import RunPaths

HEAT_SIDE = 320  # longest side of an embedded heatmap


def _thumbnail(meta: Dict[str, Any], slide: str, width: int, height: int):
    """The tiling thumbnail of the slide without its legend strip, or a white canvas of the slide's shape."""
    from PIL import Image

    png = Path(str(meta.get("index") or "")) / f"{slide}.thumbnail.png"
    try:
        with Image.open(png) as im:
            im = im.convert("RGB")
            scale = im.width / width
            return im.crop((0, 0, im.width, min(im.height, max(1, round(height * scale))))), scale
    except (OSError, ValueError):
        scale = HEAT_SIDE / max(width, height)
        return Image.new("RGB", (max(1, round(width * scale)), max(1, round(height * scale))), "white"), scale


def draw(meta: Dict[str, Any], arrays: Dict[str, np.ndarray]) -> bytes:
    """JPEG of the thumbnail, greyed, with every tile filled by its attention (inferno, relative to the
    slide's largest attention; opacity grows with it)."""
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    slide = str(meta.get("slide_id"))
    x, y, side, att = arrays["x"], arrays["y"], arrays["size0"], arrays["attention"].astype(np.float64)
    width = int(meta.get("width") or (x + side).max())
    height = int(meta.get("height") or (y + side).max())
    base, s = _thumbnail(meta, slide, width, height)
    base = Image.blend(base, Image.new("RGB", base.size, "white"), 0.4)
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    pen = ImageDraw.Draw(layer)
    rel = att / att.max() if len(att) and att.max() > 0 else att
    cmap = colormaps["inferno"]
    for xi, yi, si, a in zip(x.tolist(), y.tolist(), side.tolist(), rel.tolist()):
        r, g, b, _ = cmap(a)
        pen.rectangle([xi * s, yi * s, (xi + si) * s - 1, (yi + si) * s - 1],
                      fill=(int(r * 255), int(g * 255), int(b * 255), int(90 + 150 * a)))
    out = Image.alpha_composite(base.convert("RGBA"), layer).convert("RGB")
    out.thumbnail((HEAT_SIDE, HEAT_SIDE))
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=88)
    return buf.getvalue()


def read_maps(run_dir: Path) -> List[Tuple[Dict[str, Any], Optional[Dict[str, np.ndarray]], str]]:
    """(meta, arrays, problem) of every attention file of a run, in slide order."""
    from ..checkpoint import read_npz
    from ..errors import HpcflError

    out = []
    for f in sorted(RunPaths(run_dir).attention.glob("*.npz")):
        try:
            meta, arrays = read_npz(f)
            out.append((meta, arrays, ""))
        except HpcflError as exc:
            out.append(({"slide_id": f.stem}, None, str(exc)))
    return out


def attention_section(run_dir: Path, esc, img) -> str:
    """The report's heatmap section ('' for a run without attention maps). ``esc``/``img``: html's helpers."""
    maps = read_maps(run_dir)
    if not maps:
        return ""
    figs = []
    for meta, arrays, problem in maps:
        slide = str(meta.get("slide_id"))
        if arrays is None:
            figs.append(f"<figure>{esc(slide)}: {esc(problem)}</figure>")
            continue
        probs = meta.get("probabilities") or []
        classes = meta.get("classes") or []
        k = int(np.argmax(probs)) if probs else 0
        said = f"{classes[k]} {probs[k]:.2f}" if probs and classes else "-"
        attrs = (f' data-slide="{esc(slide)}" data-site="{esc(meta.get("site"))}" data-label="{esc(meta.get("label"))}"'
                 f' data-value="{probs[-1]!r}"' if probs else "")
        figs.append(f"<figure{attrs}>{img(draw(meta, arrays), f'attention of {slide}', 'image/jpeg', 'thumb')}"
                    f"<figcaption>{esc(slide)} ({esc(meta.get('site'))}): label {esc(meta.get('label'))}, "
                    f"model says {esc(said)}</figcaption></figure>")
    first = maps[0][0]
    return ("<h3>Attention heatmaps (validation slides)</h3>"
            f"<p class=\"muted\">the final global model (round {esc(first.get('round'))}) on each site's validation "
            "slides: every tile coloured by its attention weight relative to the slide's largest (dark: little, "
            f"yellow: most)</p><div class=\"thumbs\">{''.join(figs)}</div>")
