"""Vectorized, seeded rendering of the miniature world (torch on CPU; speed: docs/TOYWORLD.md).

:func:`render` draws a batch of :class:`~dreamguide.toyworld.world.Labels` as RGB images, float32
``(N, 3, size, size)`` in ``[-1, 1]``: a procedural scene, the object (shape, main color, pattern
in its accent color, material shading) supersampled 2x for clean edges, then a style that transforms
the whole image. :func:`sample_labels` draws random labels; :func:`sample` does both and writes captions.
The same ``seed`` (or generator state) always gives the same images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from dreamguide.toyworld.world import (
    CLASSES,
    COLORS,
    MATERIALS,
    PATTERNS,
    SCENES,
    STYLES,
    Labels,
    caption,
)

IMAGE_SIZE = 32
_SUPERSAMPLE = 2

# pose ranges (fractions of the image side)
SCALE_RANGE = (0.42, 0.78)


def _generator(seed_or_generator: int | torch.Generator | None) -> torch.Generator:
    if isinstance(seed_or_generator, torch.Generator):
        return seed_or_generator
    gen = torch.Generator()
    gen.manual_seed(0 if seed_or_generator is None else int(seed_or_generator))
    return gen


def _rand(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.rand(*shape, generator=gen)


# --------------------------------------------------------------------------------------------------
# labels


def sample_pose(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random object centers and sizes that keep most of the object inside the frame."""
    scale = SCALE_RANGE[0] + (SCALE_RANGE[1] - SCALE_RANGE[0]) * _rand(gen, n)
    half = scale / 2
    x = half * 0.8 + (1 - 1.6 * half) * _rand(gen, n)
    y = half * 0.8 + (1 - 1.6 * half) * _rand(gen, n)
    return x, y, scale


def sample_labels(
    n: int,
    generator: int | torch.Generator | None = None,
    *,
    exclude: Sequence[tuple[str, str, str]] = (),
    material_probs: Sequence[float] = (0.7, 0.15, 0.15),
) -> list[Labels]:
    """``n`` random complete labels (no subjects); ``exclude`` lists (class, color, pattern) never drawn.

    Classes, colors, patterns, scenes and styles are uniform; materials follow ``material_probs``
    (matte, shiny, glass). Rejected draws are redrawn from the same generator, so the result is
    still a function of the seed.
    """
    gen = _generator(generator)
    excluded = set(exclude)
    choice = lambda k: torch.randint(k, (n,), generator=gen)  # noqa: E731
    cls = choice(len(CLASSES))
    color = choice(len(COLORS))
    pattern = choice(len(PATTERNS))
    for _ in range(100):
        bad = torch.tensor([(CLASSES[c], list(COLORS)[k], PATTERNS[p]) in excluded
                            for c, k, p in zip(cls.tolist(), color.tolist(), pattern.tolist())], dtype=torch.bool)
        if not bad.any():
            break
        m = int(bad.sum())
        cls[bad] = torch.randint(len(CLASSES), (m,), generator=gen)
        color[bad] = torch.randint(len(COLORS), (m,), generator=gen)
        pattern[bad] = torch.randint(len(PATTERNS), (m,), generator=gen)
    else:  # pragma: no cover - needs an exclusion list covering nearly everything
        raise ValueError("sample_labels: the exclusion list leaves too few (class, color, pattern) choices")
    material = torch.multinomial(torch.tensor(material_probs, dtype=torch.float), n, replacement=True,
                                 generator=gen)
    scene = choice(len(SCENES))
    style = choice(len(STYLES))
    x, y, scale = sample_pose(n, gen)
    colors, scenes, styles = list(COLORS), list(SCENES), list(STYLES)
    return [
        Labels(cls=CLASSES[c], color=colors[k], pattern=PATTERNS[p], material=MATERIALS[m], scene=scenes[s],
               style=styles[t], x=round(float(xx), 4), y=round(float(yy), 4), scale=round(float(sc), 4))
        for c, k, p, m, s, t, xx, yy, sc in zip(cls.tolist(), color.tolist(), pattern.tolist(), material.tolist(),
                                                 scene.tolist(), style.tolist(), x, y, scale)
    ]


# --------------------------------------------------------------------------------------------------
# shapes: each takes local coordinates u, v in [-1, 1] over the object's box (v points down) and
# returns (mask, pattern_mask, shade, part_mask, part_rgb) where "part" is a fixed-color detail.


def _zeros_like(u: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(u, dtype=torch.bool)


def _ball(u, v):
    r2 = u * u + v * v
    mask = r2 <= 0.92
    shade = 1.0 - 0.45 * ((u + 0.4) ** 2 + (v + 0.4) ** 2) / 2.6
    return mask, mask, shade, _zeros_like(u), (0.0, 0.0, 0.0)


def _box(u, v):
    front = (u >= -0.85) & (u <= 0.4) & (v >= -0.3) & (v <= 0.9)
    d = -0.3 - v
    top = (v >= -0.85) & (v < -0.3) & (u >= -0.85 + d) & (u <= 0.4 + d)
    e = u - 0.4
    side = (u > 0.4) & (u <= 0.95) & (v >= -0.3 - e) & (v <= 0.9 - e)
    mask = front | top | side
    shade = torch.where(top, 1.15, torch.where(side, 0.7, 0.92))
    return mask, mask, shade, _zeros_like(u), (0.0, 0.0, 0.0)


def _cup(u, v):
    half_width = 0.42 + 0.14 * (0.9 - v) / 1.5
    body = (v >= -0.6) & (v <= 0.9) & ((u + 0.18).abs() <= half_width)
    rim = (((u + 0.18) / 0.56) ** 2 + ((v + 0.6) / 0.16) ** 2) <= 1.0
    hr = torch.sqrt((u - 0.3) ** 2 + (v - 0.1) ** 2)
    handle = (hr >= 0.22) & (hr <= 0.42) & (u > 0.3)
    mask = body | rim | handle
    shade = torch.where(rim & ~body, 0.55, torch.where(handle & ~body, 0.8, 1.0 - 0.25 * (u + 0.18).clamp(min=0)))
    return mask, body, shade, _zeros_like(u), (0.0, 0.0, 0.0)


def _star(u, v):
    r = torch.sqrt(u * u + v * v)
    theta = torch.atan2(v, u)
    a = torch.remainder((theta + math.pi / 2) * 5 / (2 * math.pi), 1.0)
    tri = (a - 0.5).abs() * 2
    mask = r <= 0.4 + 0.58 * tri
    shade = 1.0 - 0.2 * r
    return mask, mask, shade, _zeros_like(u), (0.0, 0.0, 0.0)


def _tree(u, v):
    canopy = (v >= -0.95) & (v <= 0.45) & (u.abs() <= (v + 0.95) / 1.4 * 0.85)
    trunk = (u.abs() <= 0.16) & (v > 0.45) & (v <= 0.95)
    mask = canopy | trunk
    shade = 1.0 - 0.25 * (u + 0.5).clamp(min=0)
    return mask, canopy, shade, trunk, (0.42, 0.25, 0.1)


def _house(u, v):
    walls = (u.abs() <= 0.72) & (v >= -0.1) & (v <= 0.92)
    roof = (v >= -0.95) & (v < -0.1) & (u.abs() <= 0.95 * (v + 0.95) / 0.85)
    door = ((u - 0.25).abs() <= 0.15) & (v >= 0.42) & (v <= 0.92)
    mask = walls | roof
    shade = torch.where(roof, 0.55, 1.0)
    return mask, walls & ~door, shade, door, (0.3, 0.16, 0.06)


def _ring(u, v):
    r = torch.sqrt(u * u + v * v)
    mask = (r >= 0.5) & (r <= 0.95)
    shade = 0.75 + 0.35 * (1 - ((r - 0.72) / 0.23).abs()).clamp(0, 1) - 0.15 * (u + v).clamp(min=0) / 2
    return mask, mask, shade, _zeros_like(u), (0.0, 0.0, 0.0)


def _tent(u, v):
    body = (v >= -0.92) & (v <= 0.9) & (u.abs() <= (v + 0.92) / 1.82)
    door = (v > 0.2) & (v <= 0.9) & (u.abs() <= (v - 0.2) / 0.7 * 0.28)
    mask = body
    shade = torch.where(u > 0, 0.78, 1.0)
    return mask, body & ~door, shade, door, (0.1, 0.08, 0.06)


_SHAPES = {"ball": _ball, "box": _box, "cup": _cup, "star": _star, "tree": _tree, "house": _house,
           "ring": _ring, "tent": _tent}
assert tuple(_SHAPES) == CLASSES


def _pattern(name: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if name == "plain":
        return _zeros_like(u)
    if name == "striped":
        return torch.remainder(torch.floor((v + 1) * 2.6), 2) == 1
    if name == "dotted":
        fu = torch.remainder((u + 1) * 2.2, 1.0) - 0.5
        fv = torch.remainder((v + 1) * 2.2, 1.0) - 0.5
        return fu * fu + fv * fv <= 0.085
    if name == "checkered":
        return torch.remainder(torch.floor((u + 1) * 2.0) + torch.floor((v + 1) * 2.0), 2) == 1
    raise ValueError(f"unknown pattern {name!r}")


# --------------------------------------------------------------------------------------------------
# scenes: each returns (n, 3, R, R) in [0, 1] from pixel coordinates gx, gy in [0, 1] and the generator


def _rgb(*c: float) -> torch.Tensor:
    return torch.tensor(c, dtype=torch.float32).view(1, 3, 1, 1)


def _mix(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return a + (b - a) * t


def _grid(n: int, res: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = (torch.arange(res, dtype=torch.float32) + 0.5) / res
    gy, gx = torch.meshgrid(g, g, indexing="ij")
    return gx.expand(n, 1, res, res), gy.expand(n, 1, res, res)


def _scene_beach(n, res, gen):
    gx, gy = _grid(n, res)
    horizon = (0.38 + 0.15 * _rand(gen, n)).view(n, 1, 1, 1)
    sky = _mix(_rgb(0.35, 0.62, 0.95), _rgb(0.75, 0.88, 1.0), (gy / horizon).clamp(0, 1))
    waves = 0.5 + 0.5 * torch.sin(gx * 40 + _rand(gen, n).view(n, 1, 1, 1) * 6 + gy * 10)
    sea = _mix(_rgb(0.05, 0.4, 0.75), _rgb(0.2, 0.6, 0.85), waves * 0.6)
    shore = horizon + 0.12
    sand = _rgb(0.93, 0.83, 0.58) + 0.05 * (_rand(gen, n, 1, res, res) - 0.5)
    return torch.where(gy < horizon, sky, torch.where(gy < shore, sea, sand))


def _scene_snow(n, res, gen):
    gx, gy = _grid(n, res)
    horizon = (0.3 + 0.2 * _rand(gen, n)).view(n, 1, 1, 1)
    sky = _mix(_rgb(0.72, 0.78, 0.86), _rgb(0.88, 0.9, 0.94), gy)
    flakes = (_rand(gen, n, 1, res, res) > 0.965).float()
    sky = _mix(sky, _rgb(1.0, 1.0, 1.0), flakes)
    ground = _rgb(0.95, 0.97, 1.0) - 0.06 * torch.sin(gx * 9 + gy * 3 + _rand(gen, n).view(n, 1, 1, 1) * 6) ** 2
    return torch.where(gy < horizon, sky, ground)


def _scene_jungle(n, res, gen):
    gx, gy = _grid(n, res)
    p = _rand(gen, n, 4).view(n, 4, 1, 1) * 6.28
    leaves = (torch.sin(gx * 23 + p[:, :1]) * torch.sin(gy * 19 + p[:, 1:2])
              + torch.sin((gx + gy) * 31 + p[:, 2:3]) * 0.7 + torch.sin((gx - gy) * 17 + p[:, 3:4]) * 0.5)
    t = (leaves * 0.25 + 0.5).clamp(0, 1)
    return _mix(_rgb(0.02, 0.22, 0.06), _rgb(0.25, 0.6, 0.15), t)


def _scene_city(n, res, gen):
    gx, gy = _grid(n, res)
    sky = _mix(_rgb(0.12, 0.15, 0.4), _rgb(0.98, 0.6, 0.3), gy)
    blocks = 7
    heights = 0.25 + 0.45 * _rand(gen, n, blocks + 1)
    offset = _rand(gen, n).view(n, 1, 1, 1)
    index = torch.floor(gx * blocks + offset).long().clamp(0, blocks)
    top = torch.gather(heights.view(n, 1, 1, blocks + 1).expand(n, 1, res, blocks + 1), 3, index)
    building = gy > (1 - top)
    shade = 0.12 + 0.1 * (index.float() % 2)
    body = shade.expand(n, 3, res, res) * _rgb(1.0, 1.0, 1.3)
    windows = ((torch.remainder(gx * res / 2, 2) < 1) & (torch.remainder(gy * res / 2, 2) < 1)
               & (_rand(gen, n, 1, res, res) > 0.4))
    body = torch.where(windows & (gy > 1 - top + 0.04), _rgb(1.0, 0.88, 0.4).expand_as(body), body)
    return torch.where(building, body, sky)


def _scene_wood(n, res, gen):
    gx, gy = _grid(n, res)
    boards = 6
    row = torch.floor(gy * boards + _rand(gen, n).view(n, 1, 1, 1))
    tone = torch.sin(row * 12.9898 + _rand(gen, n).view(n, 1, 1, 1) * 40) * 0.5 + 0.5
    grain = 0.5 + 0.5 * torch.sin(gx * 60 + row * 3 + torch.sin(gx * 9) * 2)
    wood = _mix(_rgb(0.55, 0.33, 0.15), _rgb(0.78, 0.52, 0.28), tone * 0.7 + grain * 0.3)
    gap = torch.remainder(gy * boards + _rand(gen, n).view(n, 1, 1, 1), 1.0) < 0.1
    return torch.where(gap, _rgb(0.3, 0.17, 0.07), wood)


def _scene_fabric(n, res, gen):
    gx, gy = _grid(n, res)
    p = _rand(gen, n, 2).view(n, 2, 1, 1) * 6.28
    folds = torch.sin(gx * 7 + gy * 4 + p[:, :1]) * 0.5 + torch.sin(gy * 9 - gx * 3 + p[:, 1:]) * 0.5
    weave = (torch.remainder(torch.floor(gx * res) + torch.floor(gy * res), 2)) * 0.04
    return _rgb(0.96, 0.58, 0.76) + folds * 0.08 - weave


def _scene_night(n, res, gen):
    gx, gy = _grid(n, res)
    sky = _mix(_rgb(0.02, 0.03, 0.12), _rgb(0.08, 0.1, 0.3), gy)
    stars = (_rand(gen, n, 1, res, res) > 0.975).float()
    mx = (0.15 + 0.7 * _rand(gen, n)).view(n, 1, 1, 1)
    my = (0.1 + 0.2 * _rand(gen, n)).view(n, 1, 1, 1)
    moon = ((gx - mx) ** 2 + (gy - my) ** 2) < 0.009
    sky = _mix(sky, _rgb(1.0, 1.0, 0.9), stars)
    return torch.where(moon, _rgb(0.98, 0.95, 0.7), sky)


def _scene_grass(n, res, gen):
    gx, gy = _grid(n, res)
    horizon = (0.2 + 0.2 * _rand(gen, n)).view(n, 1, 1, 1)
    sky = _mix(_rgb(0.5, 0.75, 1.0), _rgb(0.8, 0.92, 1.0), gy)
    blades = _rand(gen, n, 1, 1, res).expand(n, 1, res, res) * 0.5 + _rand(gen, n, 1, res, res) * 0.5
    grass = _mix(_rgb(0.15, 0.5, 0.1), _rgb(0.45, 0.8, 0.25), blades)
    return torch.where(gy < horizon, sky, grass)


def _scene_water(n, res, gen):
    gx, gy = _grid(n, res)
    p = _rand(gen, n, 2).view(n, 2, 1, 1) * 6.28
    waves = torch.sin(gy * 45 + torch.sin(gx * 12 + p[:, :1]) * 2 + p[:, 1:])
    crest = (waves > 0.8).float()
    water = _mix(_rgb(0.02, 0.35, 0.55), _rgb(0.1, 0.55, 0.7), gy)
    return _mix(water, _rgb(0.75, 0.92, 1.0), crest * 0.7)


def _scene_mountain(n, res, gen):
    gx, gy = _grid(n, res)
    sky = _mix(_rgb(0.45, 0.7, 1.0), _rgb(0.85, 0.93, 1.0), gy)
    peak_x = (0.3 + 0.4 * _rand(gen, n)).view(n, 1, 1, 1)
    peak_y = (0.08 + 0.15 * _rand(gen, n)).view(n, 1, 1, 1)
    slope = 1.1 + 0.4 * _rand(gen, n).view(n, 1, 1, 1)
    ridge = peak_y + (gx - peak_x).abs() * slope
    rock = _mix(_rgb(0.42, 0.42, 0.48), _rgb(0.3, 0.3, 0.36), (gx > peak_x).float())
    mountain = torch.where(gy < peak_y + 0.15, _rgb(0.97, 0.97, 1.0).expand_as(rock), rock)
    meadow = _rgb(0.3, 0.55, 0.2).expand_as(rock)
    out = torch.where(gy > ridge, mountain, sky)
    return torch.where(gy > 0.82, meadow, out)


_SCENES = {"beach": _scene_beach, "snow": _scene_snow, "jungle": _scene_jungle, "city": _scene_city,
           "wood": _scene_wood, "fabric": _scene_fabric, "night": _scene_night, "grass": _scene_grass,
           "water": _scene_water, "mountain": _scene_mountain}
assert tuple(_SCENES) == tuple(SCENES)


# --------------------------------------------------------------------------------------------------
# styles: each maps (n, 3, S, S) in [0, 1] to the same shape


def _luma(x: torch.Tensor) -> torch.Tensor:
    return (0.3 * x[:, 0:1] + 0.59 * x[:, 1:2] + 0.11 * x[:, 2:3])


_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]).view(1, 1, 3, 3) / 4


def _edges(x: torch.Tensor) -> torch.Tensor:
    """Per-channel Sobel gradient magnitude, same shape as ``x``."""
    c = x.shape[1]
    kx = _SOBEL_X.expand(c, 1, 3, 3)
    ky = _SOBEL_X.transpose(2, 3).expand(c, 1, 3, 3)
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(padded, kx, groups=c)
    gy = F.conv2d(padded, ky, groups=c)
    return torch.sqrt(gx * gx + gy * gy + 1e-8)


def _blur(x: torch.Tensor, k: int = 3) -> torch.Tensor:
    return F.avg_pool2d(F.pad(x, (k // 2,) * 4, mode="replicate"), k, stride=1)


def _style_photo(x, gen):
    return x + 0.02 * (torch.randn(x.shape, generator=gen))


def _style_sketch(x, gen):
    lum = _luma(x)
    n, _, s, _ = x.shape
    dark = (_edges(lum) * 5).clamp(0, 1)
    ii = torch.arange(s).view(1, 1, s, 1)
    jj = torch.arange(s).view(1, 1, 1, s)
    hatch = (torch.remainder(ii + jj, 3) == 0).float() * (lum < 0.45).float() * 0.35
    paper = 0.95 + 0.03 * (_rand(gen, n, 1, s, s) - 0.5)
    gray = (paper - 0.85 * dark - hatch).clamp(0, 1)
    return gray * _rgb(1.0, 0.98, 0.94)


def _style_pixel(x, gen):
    block = max(2, x.shape[-1] // 16)
    small = F.avg_pool2d(x, block)
    small = torch.round(small.clamp(0, 1) * 2) / 2
    return F.interpolate(small, scale_factor=block, mode="nearest")


def _style_watercolor(x, gen):
    n, _, s, _ = x.shape
    soft = _blur(_blur(x))
    wash = _mix(soft, torch.ones_like(soft), 0.35)
    bleed = F.interpolate(_rand(gen, n, 3, 4, 4) - 0.5, size=(s, s), mode="bilinear", align_corners=False)
    pooled = _edges(_luma(soft)).clamp(0, 0.3)
    paper = 0.03 * (_rand(gen, n, 1, s, s) - 0.5)
    return wash + 0.12 * bleed - pooled + paper


def _style_neon(x, gen):
    edges = _edges(x).amax(dim=1, keepdim=True)
    hue = x / x.amax(dim=1, keepdim=True).clamp(min=0.2)
    line = (edges * 6).clamp(0, 1)
    glow = _blur(line, 5)
    base = _rgb(0.03, 0.0, 0.08)
    return base + hue.clamp(0.15, 1) * (line + glow * 0.8) + glow * 0.15


def _style_mosaic(x, gen):
    n, _, s, _ = x.shape
    tile = 3 * max(1, s // 32)
    cells = -(-s // tile)
    padded = F.pad(x, (0, cells * tile - s, 0, cells * tile - s), mode="replicate")
    means = F.avg_pool2d(padded, tile) + 0.12 * (_rand(gen, n, 3, cells, cells) - 0.5)
    up = F.interpolate(means, scale_factor=tile, mode="nearest")[..., :s, :s]
    ii = torch.arange(s).view(1, 1, s, 1)
    jj = torch.arange(s).view(1, 1, 1, s)
    grout = (torch.remainder(ii, tile) == tile - 1) | (torch.remainder(jj, tile) == tile - 1)
    return torch.where(grout, _rgb(0.88, 0.85, 0.8), up)


def _style_inverted(x, gen):
    return 1.0 - x


def _style_cartoon(x, gen):
    soft = _blur(x)
    vivid = (soft - soft.mean(dim=1, keepdim=True)) * 1.5 + soft.mean(dim=1, keepdim=True)
    flat = torch.round(vivid.clamp(0, 1) * 3) / 3
    outline = (_edges(_luma(x)) > 0.12)
    return torch.where(outline, torch.zeros_like(flat), flat)


_STYLES = {"photo": _style_photo, "sketch": _style_sketch, "pixel": _style_pixel,
           "watercolor": _style_watercolor, "neon": _style_neon, "mosaic": _style_mosaic,
           "inverted": _style_inverted, "cartoon": _style_cartoon}
assert tuple(_STYLES) == tuple(STYLES)


# --------------------------------------------------------------------------------------------------
# rendering


def _by_group(keys: Sequence[str]) -> dict[str, torch.Tensor]:
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return {k: torch.tensor(v, dtype=torch.long) for k, v in groups.items()}


def render(
    labels: Sequence[Labels],
    generator: int | torch.Generator | None = 0,
    *,
    size: int = IMAGE_SIZE,
    accents: torch.Tensor | None = None,
    return_masks: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Draw ``labels`` (complete, see :attr:`Labels.is_complete`) as float32 ``(N, 3, size, size)`` in [-1, 1].

    ``generator`` (a seed or a ``torch.Generator``) drives the scene and style noise. ``accents``
    (``(N, 3)`` RGB in [0, 1]) overrides the pattern colors, to draw instances outside the grammar.
    With ``return_masks`` it also returns the object's coverage ``(N, 1, size, size)`` in [0, 1].
    """
    labels = list(labels)
    n = len(labels)
    if n == 0:
        empty = torch.zeros(0, 3, size, size)
        return (empty, torch.zeros(0, 1, size, size)) if return_masks else empty
    for i, lab in enumerate(labels):
        if not lab.is_complete:
            raise ValueError(f"render: labels[{i}] = {lab} is incomplete; every attribute and x, y, scale "
                             "must be set (use sample_labels or fill them in)")
    gen = _generator(generator)
    res = size * _SUPERSAMPLE

    # background
    image = torch.empty(n, 3, res, res)
    for scene, idx in _by_group([lab.scene for lab in labels]).items():
        image[idx] = _SCENES[scene](len(idx), res, gen)
    background = image.clamp(0, 1)

    # object
    x = torch.tensor([lab.x for lab in labels]).view(n, 1, 1)
    y = torch.tensor([lab.y for lab in labels]).view(n, 1, 1)
    half = torch.tensor([lab.scale for lab in labels]).view(n, 1, 1) / 2
    g = (torch.arange(res, dtype=torch.float32) + 0.5) / res
    u = (g.view(1, 1, res) - x) / half
    v = (g.view(1, res, 1) - y) / half
    u, v = u.expand(n, res, res), v.expand(n, res, res)

    mask = torch.zeros(n, res, res, dtype=torch.bool)
    body = torch.zeros(n, res, res, dtype=torch.bool)
    shade = torch.ones(n, res, res)
    part = torch.zeros(n, res, res, dtype=torch.bool)
    part_rgb = torch.zeros(n, 3)
    for cls, idx in _by_group([lab.cls for lab in labels]).items():
        m, b, sh, p, prgb = _SHAPES[cls](u[idx], v[idx])
        mask[idx], body[idx], part[idx] = m | p, b, p
        shade[idx] = torch.as_tensor(sh, dtype=torch.float32).expand(len(idx), res, res)
        part_rgb[idx] = torch.tensor(prgb)
    stripes = torch.zeros(n, res, res, dtype=torch.bool)
    for pattern, idx in _by_group([lab.pattern for lab in labels]).items():
        stripes[idx] = _pattern(pattern, u[idx], v[idx])
    stripes &= body

    main = torch.tensor([COLORS[lab.color] for lab in labels]).view(n, 3, 1, 1)
    accent = (accents if accents is not None else torch.tensor([lab.accent for lab in labels])).view(n, 3, 1, 1)
    surface = torch.where(stripes.unsqueeze(1), accent, main) * shade.unsqueeze(1).clamp(0.3, 1.3)
    surface = torch.where(part.unsqueeze(1), part_rgb.view(n, 3, 1, 1).expand(n, 3, res, res), surface)

    material = torch.tensor([MATERIALS.index(lab.material) for lab in labels]).view(n, 1, 1, 1)
    highlight = torch.exp(-((u + 0.38) ** 2 + (v + 0.42) ** 2) / 0.025).unsqueeze(1)
    shiny = material == MATERIALS.index("shiny")
    glass = material == MATERIALS.index("glass")
    surface = torch.where(shiny, (surface - 0.5) * 1.25 + 0.5 + 0.9 * highlight, surface)
    alpha = mask.unsqueeze(1).float()
    alpha = torch.where(glass & ~part.unsqueeze(1), alpha * 0.5, alpha)
    surface = torch.where(glass, surface + 0.6 * highlight, surface)
    composite = background * (1 - alpha) + surface.clamp(0, 1) * alpha
    # glass outline so the shape stays visible
    if glass.any():
        outline = (F.max_pool2d(alpha, 3, 1, 1) - alpha).clamp(0, 1) * glass.float()
        composite = composite * (1 - outline) + 0.95 * outline

    image = F.avg_pool2d(composite, _SUPERSAMPLE).clamp(0, 1)

    # style
    out = torch.empty_like(image)
    for style, idx in _by_group([lab.style for lab in labels]).items():
        out[idx] = _STYLES[style](image[idx], gen)
    out = (out.clamp(0, 1) * 2 - 1).contiguous()
    if return_masks:
        return out, F.avg_pool2d(mask.unsqueeze(1).float(), _SUPERSAMPLE)
    return out


def sample(
    n: int,
    generator: int | torch.Generator | None = 0,
    *,
    size: int = IMAGE_SIZE,
    exclude: Sequence[tuple[str, str, str]] = (),
) -> tuple[torch.Tensor, list[Labels], list[str]]:
    """``n`` random images, their labels and full captions (no subjects; ``exclude`` as in :func:`sample_labels`)."""
    gen = _generator(generator)
    labels = sample_labels(n, gen, exclude=exclude)
    images = render(labels, gen, size=size)
    return images, labels, [caption(lab) for lab in labels]


def to_pil(images: torch.Tensor):
    """Convert ``(N, 3, H, W)`` in [-1, 1] to a list of PIL images."""
    from PIL import Image

    array = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in array]


def from_pil(images) -> torch.Tensor:
    """Convert PIL images (any size; resized to :data:`IMAGE_SIZE`) to ``(N, 3, S, S)`` in [-1, 1]."""
    import numpy as np
    from PIL import Image

    arrays = []
    for image in images:
        image = image.convert("RGB")
        if image.size != (IMAGE_SIZE, IMAGE_SIZE):
            image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
        arrays.append(np.asarray(image, dtype=np.float32) / 127.5 - 1)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
