"""The built-in dataset: procedural scenes of coloured shapes with varied natural captions.

Every image has several shapes, each with a colour, size and position on a 3x3 grid, on a varied
background. Captions come from several templates with synonyms, so retrieval needs grounding in
colour, shape, size and position rather than string matching. Captions say left and right, so
horizontal flips would corrupt the labels.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 220, 40),
    "purple": (140, 50, 180),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
COLOUR_WORDS = {
    "red": ["red", "crimson"],
    "green": ["green"],
    "blue": ["blue"],
    "yellow": ["yellow"],
    "purple": ["purple", "violet"],
    "orange": ["orange"],
    "white": ["white"],
    "black": ["black", "dark"],
}
SHAPES = ["circle", "square", "triangle", "star", "cross", "diamond"]
SHAPE_WORDS = {
    "circle": ["circle", "disc", "round dot"],
    "square": ["square", "box"],
    "triangle": ["triangle"],
    "star": ["star", "five-pointed star"],
    "cross": ["cross", "plus sign"],
    "diamond": ["diamond", "rhombus"],
}
SIZE_WORDS = {"small": ["small", "little", "tiny"], "large": ["large", "big"]}
# 3x3 grid cells (row, col) and the ways captions name them.
POSITION_WORDS = {
    (0, 0): ["in the top left corner", "at the upper left", "in the top-left"],
    (0, 1): ["at the top", "in the top middle", "near the top edge"],
    (0, 2): ["in the top right corner", "at the upper right", "in the top-right"],
    (1, 0): ["on the left", "at the left side", "on the left-hand side"],
    (1, 1): ["in the center", "in the middle", "at the centre"],
    (1, 2): ["on the right", "at the right side", "on the right-hand side"],
    (2, 0): ["in the bottom left corner", "at the lower left", "in the bottom-left"],
    (2, 1): ["at the bottom", "in the bottom middle", "near the bottom edge"],
    (2, 2): ["in the bottom right corner", "at the lower right", "in the bottom-right"],
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "beige": (225, 210, 170),
    "navy": (20, 30, 90),
    "teal": (30, 120, 120),
    "pink": (240, 170, 190),
    "brown": (110, 70, 40),
}
TEXTURES = ["plain", "striped", "speckled", "gradient"]
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    cell: tuple[int, int]


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: str
    texture: str


def sample_scene(rng: np.random.Generator, min_objects: int, max_objects: int) -> Scene:
    n = int(rng.integers(min_objects, max_objects + 1))
    cells = [tuple(c) for c in np.argwhere(np.ones((3, 3)))]
    picked = rng.choice(len(cells), size=n, replace=False)
    colours = list(COLOURS)
    objects = tuple(
        Obj(
            shape=SHAPES[rng.integers(len(SHAPES))],
            colour=colours[rng.integers(len(colours))],
            size=("small", "large")[rng.integers(2)],
            cell=(int(cells[i][0]), int(cells[i][1])),
        )
        for i in picked
    )
    return Scene(
        objects=objects,
        background=list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))],
        texture=TEXTURES[rng.integers(len(TEXTURES))],
    )


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.7, cy), (cx, cy + r), (cx - r * 0.7, cy)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            ang = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
        return pts
    raise ValueError(shape)


def render(scene: Scene, size: int, rng: np.random.Generator) -> Image.Image:
    base = np.array(BACKGROUNDS[scene.background], dtype=np.float32)
    canvas = np.broadcast_to(base, (size, size, 3)).copy()
    if scene.texture == "striped":
        period = int(rng.integers(6, 14))
        stripes = (np.arange(size) // period) % 2 == 0
        if rng.integers(2):
            canvas[stripes, :] *= 0.75  # horizontal stripes
        else:
            canvas[:, stripes] *= 0.75  # vertical stripes
    elif scene.texture == "speckled":
        canvas += rng.normal(0, 18, size=(size, size, 1))
    elif scene.texture == "gradient":
        ramp = np.linspace(0.65, 1.25, size, dtype=np.float32)
        canvas *= ramp[:, None, None] if rng.integers(2) else ramp[None, :, None]
    img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    cell = size / 3
    for obj in scene.objects:
        r = cell * (0.22 if obj.size == "small" else 0.42) * float(rng.uniform(0.9, 1.1))
        jitter = cell * 0.5 - r
        cx = (obj.cell[1] + 0.5) * cell + float(rng.uniform(-jitter, jitter)) * 0.6
        cy = (obj.cell[0] + 0.5) * cell + float(rng.uniform(-jitter, jitter)) * 0.6
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif obj.shape == "square":
            s = r * 0.85
            draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
        elif obj.shape == "cross":
            w = r * 0.32
            draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
            draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
        else:
            draw.polygon(_shape_points(obj.shape, cx, cy, r), fill=fill)
    return img


def _pick(rng: np.random.Generator, words: list[str]) -> str:
    return words[rng.integers(len(words))]


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _noun(obj: Obj, rng: np.random.Generator, with_size: bool = True) -> str:
    parts = [_pick(rng, SIZE_WORDS[obj.size])] if with_size else []
    parts += [_pick(rng, COLOUR_WORDS[obj.colour]), _pick(rng, SHAPE_WORDS[obj.shape])]
    return _article(" ".join(parts))


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _background(scene: Scene, rng: np.random.Generator) -> str:
    texture = "" if scene.texture == "plain" else scene.texture + " "
    return f"{texture}{scene.background} background"


def _caption(template: int, scene: Scene, rng: np.random.Generator) -> str:
    objs = list(scene.objects)
    order = rng.permutation(len(objs))
    objs = [objs[i] for i in order]
    n = len(objs)
    if template == 0:
        return _join([f"{_noun(o, rng)} {_pick(rng, POSITION_WORDS[o.cell])}" for o in objs])
    if template == 1:
        return f"{NUMBERS[n]} shape{'s' if n > 1 else ''} on a {_background(scene, rng)}: " + _join(
            [_noun(o, rng) for o in objs]
        )
    if template == 2:
        parts = [f"{_pick(rng, POSITION_WORDS[o.cell])} there is {_noun(o, rng)}" for o in objs]
        return "; ".join(parts)
    if template == 3:
        head = _noun(objs[0], rng)
        tail = f" {_pick(rng, POSITION_WORDS[objs[0].cell])}"
        rest = [
            f"{_noun(o, rng, with_size=False)} {_pick(rng, POSITION_WORDS[o.cell])}"
            for o in objs[1:]
        ]
        extra = f", next to {_join(rest)}" if rest else ""
        return f"a picture of {head}{tail}{extra} on a {_background(scene, rng)}"
    if template == 4:
        described = _join([f"{_noun(o, rng)} {_pick(rng, POSITION_WORDS[o.cell])}" for o in objs])
        return f"a {_background(scene, rng)} with {described}"
    if template == 5:
        return _join([_noun(o, rng) for o in objs]) + f" drawn on {_background(scene, rng)}"
    raise ValueError(template)


N_TEMPLATES = 6


def captions_for(scene: Scene, k: int, rng: np.random.Generator) -> list[str]:
    """k different captions, each from a different template where possible."""
    out: list[str] = []
    templates = list(rng.permutation(N_TEMPLATES))
    attempts = 0
    while len(out) < k:
        t = templates[len(out) % N_TEMPLATES] if attempts < 4 * k else rng.integers(N_TEMPLATES)
        text = _caption(int(t), scene, rng)
        attempts += 1
        if text not in out:
            out.append(text)
        elif attempts > 50 * k:
            raise RuntimeError("could not generate distinct captions")
    return out


def generate(index: int, seed: int, size: int, k: int, min_objects: int, max_objects: int):
    """Image `index` of the dataset: (PIL image, captions). Independent of the dataset size."""
    rng = np.random.default_rng([seed, index])
    scene = sample_scene(rng, min_objects, max_objects)
    return render(scene, size, rng), captions_for(scene, k, rng)


def png_bytes(img: Image.Image) -> bytes:
    """The PNG file of a generated image, as ingest stores it."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
