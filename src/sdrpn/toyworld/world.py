"""A synthetic, V*-like fine-detail world for the embedded SD-RPN demo.

Grammar of one scene (``size`` x ``size`` px, 512 by default; everything seeded):

* Background: a mid-gray canvas with slow brightness drift, faint gray blobs (ellipses) and faint gray
  lines, plus per-pixel noise. Nothing in the clutter is coloured or object-like.
* ONE target object at a random place: a filled ``shape`` in ``SHAPES`` (circle, square, triangle,
  diamond, cross), ``OBJECT_SIZE`` px wide (36-44 px at 512 px, scaled with ``size``), in a saturated
  ``colour`` from ``OBJECT_COLOURS``.
* The fine property: a small square ``mark`` (a ``MARK_SIZE`` = 4 px colour core in a ``MARK_RIM`` = 2 px
  dark frame, at 512 px) at the target's box centre, in a colour from ``MARK_COLOURS`` different from
  the object's colour. At the model's input resolution (the scene resized to 112 px, 4.6x smaller) the
  core is under one input pixel, mixed with its dark frame and the object: it only tints the target's
  16-px patch. In a crop of twice the object's size resized to the same 112 px the core is ~6 input
  px wide inside a ~12-px dark frame, plainly legible. The input grid is odd (7 x 7 tokens) so that
  the centre of a centred crop falls in the middle of a token, not on a corner shared by four.

Questions (``qtype`` -> templates -> answer words):

* ``"fine"`` (the main type): "what colour is the mark on the object ?" /
  "what colour is the small mark on the {shape} ?" / "what colour is the mark ?" -> mark colour.
* ``"coarse"``: "what colour is the object ?" -> object colour; "what shape is the object ?" -> shape;
  "where is the object ?" -> the 3x3 cell of the object's centre: "top left", "top", "top right",
  "left", "centre", "right", "bottom left", "bottom", "bottom right".
* ``"yesno"`` (POPE-like): "is there a {colour} object in the image ?" -> "yes" / "no"; the colour
  asked is the target's colour half of the time (colour, unlike shape, is visible at input resolution).

Scenes of several objects (``objects`` = 2-3, the binding variant): the target is drawn exactly as in a
one-object scene, then 1-2 distractors of other shapes and other colours (each with its own mark) at free
places. The question names the target by its colour, which is visible at input resolution, so the model must
first find that object: "what colour is the mark on the {colour} object ?" (fine), "what shape is the {colour}
object ?" / "where is the {colour} object ?" (coarse); yes/no asks about any colour present or absent.

Aspect ratios (``aspect``, default 1:1): a scene may be ``size`` px on its long side and shorter on the
other (4:3, 3:4, 16:9, 9:16 in ``ASPECTS``), for models with dynamic resolution; objects and marks keep
their size at 512 px, the "where" cell is the 3x3 cell of the scene's own width and height. A 1:1 scene is
drawn exactly as before (same pixels for the same seed).

Answers are one word, except the two-word "where" corners. Every sample carries its answer, question
type, the target's box in scene pixels and its seed; ``make_samples`` is deterministic in its seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

SCENE_SIZE = 512
INPUT_SIZE = 112  # the demo model's input side: 7 x 7 tokens of 16 px (odd, so a centred detail is mid-token)
OBJECT_SIZE = (36, 44)  # px at SCENE_SIZE, scaled linearly with the scene size
MARK_SIZE = 4  # px at SCENE_SIZE: the mark's colour core
MARK_RIM = 2  # px at SCENE_SIZE: the dark frame around the mark
NOISE_STD = 10.0

SHAPES = ["circle", "square", "triangle", "diamond", "cross"]
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 175, 60),
    "blue": (45, 85, 235),
    "yellow": (235, 215, 40),
    "purple": (160, 60, 205),
    "white": (250, 250, 250),
}
OBJECT_COLOURS = ["red", "green", "blue", "yellow", "purple"]
MARK_COLOURS = ["red", "green", "blue", "yellow", "purple", "white"]
QTYPES = ["fine", "coarse", "yesno"]
MAX_OBJECTS = 3
QTYPE_WEIGHTS = {"fine": 0.5, "coarse": 0.3, "yesno": 0.2}
ASPECTS = [(1, 1), (4, 3), (3, 4), (16, 9), (9, 16)]  # (width, height) ratios a scene can have
ROWS = ["top", "", "bottom"]
COLS = ["left", "", "right"]

FINE_TEMPLATES = [
    "what colour is the mark on the object ?",
    "what colour is the small mark on the {shape} ?",
    "what colour is the mark ?",
]
COARSE_TEMPLATES = {
    "colour": "what colour is the object ?",
    "shape": "what shape is the object ?",
    "where": "where is the object ?",
}
YESNO_TEMPLATE = "is there a {colour} object in the image ?"
# Scenes of several objects name the target by its colour (binding): the model must find that object first.
NAMED_FINE_TEMPLATE = "what colour is the mark on the {colour} object ?"
NAMED_COARSE_TEMPLATES = {"shape": "what shape is the {colour} object ?", "where": "where is the {colour} object ?"}


def _template_words() -> list[str]:
    words: list[str] = []
    texts = [*FINE_TEMPLATES, *COARSE_TEMPLATES.values(), YESNO_TEMPLATE, NAMED_FINE_TEMPLATE]
    texts += list(NAMED_COARSE_TEMPLATES.values())
    for text in texts:
        for w in text.split():
            if not w.startswith("{") and w not in words:
                words.append(w)
    for w in [*SHAPES, *COLOURS, "top", "bottom", "left", "right", "centre", "yes", "no"]:
        if w not in words:
            words.append(w)
    return words


WORDS: list[str] = [w for w in _template_words() if w != "?"]  # "?" is a chat word of the tokenizer


@dataclass
class SceneObject:
    shape: str
    colour: str
    mark: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive) in scene px
    mark_box: tuple[int, int, int, int]
    where: str


@dataclass
class Scene:
    """The rendered image and the facts every question about it is answered from."""

    image: Image.Image
    shape: str
    colour: str
    mark: str
    target_box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive) in scene px
    mark_box: tuple[int, int, int, int]  # the mark's colour core, same convention
    where: str
    seed: int
    others: list[SceneObject] = field(default_factory=list)  # distractors (scenes of several objects)

    @property
    def objects(self) -> list[SceneObject]:
        """The target first, then the distractors."""
        target = SceneObject(self.shape, self.colour, self.mark, self.target_box, self.mark_box, self.where)
        return [target, *self.others]


@dataclass
class ToySample:
    image: Image.Image
    question: str
    answer: str
    qtype: str  # "fine" | "coarse" | "yesno"
    target_box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive) in scene px
    seed: int
    attrs: dict = field(default_factory=dict)  # shape, colour, mark, mark_box, where, subtype


_NOISE_TILE = 1024
_NOISE: list[np.ndarray] = []


def _noise_bank() -> np.ndarray:
    """A fixed (seed 0) tile of pixel noise; scenes take a seeded window of it (fast and reproducible)."""
    if not _NOISE:
        _NOISE.append(np.random.default_rng(0).normal(0, NOISE_STD, (_NOISE_TILE, _NOISE_TILE, 3)).astype(np.float32))
    return _NOISE[0]


def _where(cx: float, cy: float, size: int, height: int | None = None) -> str:
    height = size if height is None else height
    row = ROWS[min(2, int(3 * cy / height))]
    col = COLS[min(2, int(3 * cx / size))]
    return " ".join(w for w in (row, col) if w) or "centre"


def shape_mask(shape: str, s: int) -> np.ndarray:
    """Boolean s x s mask of a filled shape (the centre pixel is always inside)."""
    yy, xx = np.mgrid[0:s, 0:s] + 0.5
    c = s / 2
    u, v = (xx - c) / c, (yy - c) / c  # in [-1, 1]
    if shape == "circle":
        m = u * u + v * v <= 1.0
    elif shape == "square":
        m = (np.abs(u) <= 0.85) & (np.abs(v) <= 0.85)
    elif shape == "diamond":
        m = np.abs(u) + np.abs(v) <= 1.0
    elif shape == "cross":
        m = ((np.abs(u) <= 0.33) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.33) & (np.abs(u) <= 1.0))
    elif shape == "triangle":  # apex up, base at the bottom
        m = (v <= 0.9) & (np.abs(u) <= (v + 1.0) / 1.9)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return m


def _paint_object(img: np.ndarray, rng: np.random.Generator, obj: SceneObject) -> None:
    """Fill the object's shape and draw its mark (a colour core in a dark frame) at its box centre."""
    x0, y0, x1, _ = obj.box
    s = x1 - x0
    rgb = np.array(COLOURS[obj.colour], np.float32) + rng.uniform(-12, 12, 3)
    img[y0 : y0 + s, x0 : x0 + s][shape_mask(obj.shape, s)] = rgb
    mx0, my0, mx1, my1 = obj.mark_box
    rim = max(1, int(round(MARK_RIM * max(img.shape[:2]) / SCENE_SIZE)))
    img[my0 - rim : my1 + rim, mx0 - rim : mx1 + rim] = 30.0
    img[my0:my1, mx0:mx1] = np.array(COLOURS[obj.mark], np.float32)


def _draw_object(
    rng: np.random.Generator, size: int, shape: str, colour: str, taken=(), height: int | None = None
) -> SceneObject | None:
    """Size, place and mark of one object (None if no free place was found away from ``taken`` boxes);
    ``size`` is the scene's width (and its long side, which scales the object), ``height`` its height."""
    height = size if height is None else height
    k = max(size, height) / SCENE_SIZE
    mark_choices = [c for c in MARK_COLOURS if c != colour]
    mark = mark_choices[int(rng.integers(len(mark_choices)))]
    s = int(round(rng.integers(OBJECT_SIZE[0], OBJECT_SIZE[1] + 1) * k))
    margin = int(8 * k)
    for _ in range(100):
        x0 = int(rng.integers(margin, size - s - margin + 1))
        y0 = int(rng.integers(margin, height - s - margin + 1))
        box = (x0, y0, x0 + s, y0 + s)
        if not any(_near(box, other, margin) for other in taken):
            break
    else:
        return None
    ms = max(1, int(round(MARK_SIZE * k)))
    mx0, my0 = x0 + s // 2 - ms // 2, y0 + s // 2 - ms // 2
    where = _where(x0 + s / 2, y0 + s / 2, size, height)
    return SceneObject(shape, colour, mark, box, (mx0, my0, mx0 + ms, my0 + ms), where)


def _near(a, b, gap: int) -> bool:
    return a[0] < b[2] + gap and b[0] < a[2] + gap and a[1] < b[3] + gap and b[1] < a[3] + gap


def scene_dims(size: int = SCENE_SIZE, aspect: tuple[int, int] = (1, 1)) -> tuple[int, int]:
    """(width, height) of a scene of long side ``size`` and (width, height) ratio ``aspect``."""
    aw, ah = (int(v) for v in aspect)
    if aw < 1 or ah < 1:
        raise ValueError(f"aspect must be two positive integers (width, height), got {aspect!r}")
    if aw >= ah:
        return size, int(round(size * ah / aw))
    return int(round(size * aw / ah)), size


def render_scene(seed: int, size: int = SCENE_SIZE, objects: int = 1, aspect: tuple[int, int] = (1, 1)) -> Scene:
    """Draw one scene from its seed (see the module docstring for the grammar). ``objects`` > 1 adds
    distractors of other colours and shapes; the first object stays the target, drawn as with one.
    ``aspect`` (width, height): ``size`` is the long side; (1, 1) draws the square scene of before."""
    if not 1 <= objects <= MAX_OBJECTS:
        raise ValueError(f"objects must be 1..{MAX_OBJECTS}, got {objects}")
    width, height = scene_dims(size, aspect)
    square = width == height
    rng = np.random.default_rng(seed)
    k = size / SCENE_SIZE

    def place(n: int) -> np.ndarray:  # n/2 (x, y) points in the scene (square scenes: the draws of before)
        return rng.uniform(0, size, n) if square else rng.uniform(0, 1, n) * np.array([width, height] * (n // 2))

    # Background: gray level with a slow drift.
    base = rng.uniform(95, 165)
    drift = rng.normal(0, 12, (4, 4)).astype(np.float32)
    drift_img = Image.fromarray(drift).resize((width, height), Image.BILINEAR)
    layer = Image.new("L", (width, height), 128)  # 128 = no change; blobs and lines overwrite
    draw = ImageDraw.Draw(layer)
    for _ in range(int(rng.integers(6, 14))):  # faint blobs
        w, h = rng.uniform(20, 110, 2) * k
        x, y = place(2)
        draw.ellipse([x - w / 2, y - h / 2, x + w / 2, y + h / 2], fill=int(128 + rng.uniform(-28, 28)))
    for _ in range(int(rng.integers(4, 10))):  # faint lines
        x0, y0, x1, y1 = place(4)
        draw.line([x0, y0, x1, y1], fill=int(128 + rng.uniform(-30, 30)), width=max(1, int(rng.integers(1, 5) * k)))
    clutter = np.asarray(layer, np.float32) - 128.0
    gray = base + np.asarray(drift_img, np.float32) + clutter
    img = np.repeat(gray[:, :, None], 3, axis=2)

    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    colour = OBJECT_COLOURS[int(rng.integers(len(OBJECT_COLOURS)))]
    target = _draw_object(rng, width, shape, colour, height=height)
    _paint_object(img, rng, target)
    if square:
        oy, ox = (int(v) for v in rng.integers(0, _NOISE_TILE - size + 1, 2))
    else:
        oy, ox = int(rng.integers(0, _NOISE_TILE - height + 1)), int(rng.integers(0, _NOISE_TILE - width + 1))
    others: list[SceneObject] = []
    if objects > 1:  # drawn after everything a one-object scene draws, so its scene stays the same
        shapes = [x for x in SHAPES if x != shape]
        colours = [x for x in OBJECT_COLOURS if x != colour]
        for i in rng.permutation(len(shapes))[: objects - 1]:
            other_colour = colours.pop(int(rng.integers(len(colours))))
            taken = [target.box, *(o.box for o in others)]
            other = _draw_object(rng, width, shapes[int(i)], other_colour, taken, height=height)
            if other is not None:
                _paint_object(img, rng, other)
                others.append(other)
    img += _noise_bank()[oy : oy + height, ox : ox + width]
    image = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    return Scene(
        image=image,
        shape=shape,
        colour=colour,
        mark=target.mark,
        target_box=target.box,
        mark_box=target.mark_box,
        where=target.where,
        seed=seed,
        others=others,
    )


def ask(scene: Scene, qtype: str, rng: np.random.Generator) -> tuple[str, str, str]:
    """(question, answer, subtype) about a scene for one question type."""
    named = bool(scene.others)
    if qtype == "fine":
        if named:
            return NAMED_FINE_TEMPLATE.format(colour=scene.colour), scene.mark, "mark"
        t = FINE_TEMPLATES[int(rng.integers(len(FINE_TEMPLATES)))]
        return t.format(shape=scene.shape), scene.mark, "mark"
    if qtype == "coarse":
        templates = NAMED_COARSE_TEMPLATES if named else COARSE_TEMPLATES
        sub = list(templates)[int(rng.integers(len(templates)))]
        answer = {"colour": scene.colour, "shape": scene.shape, "where": scene.where}[sub]
        return templates[sub].format(colour=scene.colour), answer, sub
    if qtype == "yesno":
        present = [scene.colour, *(o.colour for o in scene.others)]
        if rng.random() < 0.5:
            asked = present[int(rng.integers(len(present)))] if named else scene.colour
            return YESNO_TEMPLATE.format(colour=asked), "yes", "yes"
        others = [c for c in OBJECT_COLOURS if c not in present]
        return YESNO_TEMPLATE.format(colour=others[int(rng.integers(len(others)))]), "no", "no"
    raise ValueError(f"unknown question type {qtype!r}; expected one of {QTYPES}")


def _pick_qtype(rng: np.random.Generator) -> str:
    return QTYPES[int(rng.choice(len(QTYPES), p=[QTYPE_WEIGHTS[q] for q in QTYPES]))]


def render_sample(
    seed: int, qtype: str | None = None, size: int = SCENE_SIZE, objects: int = 1, aspect: tuple[int, int] = (1, 1)
) -> ToySample:
    """One scene + one question about it; ``qtype=None`` draws the type (fine 50%, coarse 30%, yes/no 20%).
    A scene of another ``aspect`` than 1:1 records it in ``attrs["aspect"]``."""
    scene = render_scene(seed, size, objects, aspect)
    rng = np.random.default_rng([seed, 1])
    qtype = qtype or _pick_qtype(rng)
    question, answer, sub = ask(scene, qtype, rng)
    sample = ToySample(
        image=scene.image,
        question=question,
        answer=answer,
        qtype=qtype,
        target_box=scene.target_box,
        seed=seed,
        attrs={
            "shape": scene.shape,
            "colour": scene.colour,
            "mark": scene.mark,
            "mark_box": scene.mark_box,
            "where": scene.where,
            "subtype": sub,
            "objects": 1 + len(scene.others),
            "others": [o.box for o in scene.others],
        },
    )
    if tuple(aspect) != (1, 1):
        sample.attrs["aspect"] = tuple(int(v) for v in aspect)
    return sample


def sample_seeds(n: int, seed: int) -> list[int]:
    return [int(s) for s in np.random.default_rng(seed).integers(0, 2**31 - 1, n)]


def make_samples(
    n: int, seed: int, qtypes=None, size: int = SCENE_SIZE, objects: int = 1, aspects=None
) -> list[ToySample]:
    """``n`` samples, deterministic in ``seed``; ``qtypes`` (a type or a list) restricts the question types
    (cycled in order when a list is given); ``objects`` objects per scene; ``aspects`` (a list of (width,
    height) ratios, e.g. ``ASPECTS``) cycles the scenes' aspect ratios (None: all square, as before)."""
    if isinstance(qtypes, str):
        qtypes = [qtypes]
    seeds = sample_seeds(n, seed)
    return [
        render_sample(
            s,
            None if not qtypes else qtypes[i % len(qtypes)],
            size,
            objects,
            (1, 1) if not aspects else tuple(aspects[i % len(aspects)]),
        )
        for i, s in enumerate(seeds)
    ]


def square_box(cx: float, cy: float, side: float, size: int, height: int | None = None) -> tuple[int, int, int, int]:
    """An integer square box of ``side`` px centred at (cx, cy), shifted to lie inside the image (``size`` px
    wide, ``height`` px high; None: square)."""
    height = size if height is None else height
    side = int(round(min(max(side, 2), size, height)))
    x0 = int(round(cx - side / 2))
    y0 = int(round(cy - side / 2))
    x0 = min(max(x0, 0), size - side)
    y0 = min(max(y0, 0), height - side)
    return (x0, y0, x0 + side, y0 + side)


def oracle_crop_box(sample, scale: float = 2.0) -> tuple[int, int, int, int]:
    """The ground-truth crop: a square ``scale`` times the target's size, centred on it, inside the image."""
    x0, y0, x1, y1 = sample.target_box
    width, height = sample.image.size
    return square_box((x0 + x1) / 2, (y0 + y1) / 2, scale * max(x1 - x0, y1 - y0), width, height)


def to_input(image: Image.Image, box=None, input_size: int = INPUT_SIZE) -> Image.Image:
    """The crop (or the whole image) resized to the model input as the CLIP PIL processor does (bicubic)."""
    if box is not None:
        image = image.crop(box)
    return image.resize((input_size, input_size), Image.BICUBIC)
