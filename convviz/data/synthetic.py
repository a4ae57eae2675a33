"""Synthetic object images with named part boxes, a stand-in for ImageNet-style data.

Each image shows one object of a class (face, house, car, ...) at a random position, scale
(relative size drawn from ``scale_range``), rotation (uniform in ``[-rotation_deg, rotation_deg]``)
and colouring, over a textured clutter background with a few distractor shapes (circles,
ellipses, rectangles, bars: none of them a class). Classes differ by shape only: colours are
drawn independently of the class, so a network has to learn shape to tell them apart.

Conventions
-----------
* Objects are designed in a local frame with y pointing down (as in images), "upright" and
  fitting inside the unit disc, so any rotation keeps them inside a square of side 2 units.
  The relative size ``r`` maps one local unit to ``r * image_size / 2`` pixels: an object never
  spans more than ``r`` of the image, and with ``r <= 1`` it always fits entirely inside.
* Left/right part names are from the viewer's point of view of the *upright* object: the face's
  ``left_eye`` is the eye on the image's left side before rotation. After a rotation by about
  180 degrees it appears on the right. (Horizontal-flip augmentation would swap the two names.)
* "Front" of side-view objects (car, fish, bird, arrow head) is the image's right side (+x)
  before rotation.
* Positive rotation angles turn the object clockwise on screen (y points down).
* Part boxes are ``x0, y0, x1, y1`` integer pixels of the saved image, x1/y1 exclusive, clipped
  to the image: the bounding box of the part's transformed polygon corners. Every image has a
  part named ``object``: the box of the whole object including its 1-pixel outline.

Determinism: every image has its own ``numpy.random.default_rng`` seeded from
``(seed, target, class index, split, image index)``, so the same arguments give identical
images and tables, and changing one count or the number of classes leaves the other images as
they were. Nothing uses a global random state.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from convviz.data.common import channel_stats, write_dataset_tables

SPLITS = ("train", "val")
OBJECT_PART = "object"
DEFAULT_SOURCE_CLASSES = 10
DEFAULT_TARGET_CLASSES = 5
MAX_IMAGE_SIZE = 1024
MAX_DISTRACTORS = 50


# ---------------------------------------------------------------------------------------------
# Geometry helpers: every shape is a polygon (N, 2) in the object's local frame.
# ---------------------------------------------------------------------------------------------


class Shape(NamedTuple):
    """One filled polygon of an object design.

    role: which of the image's colours fills it ("body", "detail" or "accent").
    part: the part it belongs to (its corners extend that part's box), or None.
    hole: cut the polygon out of what was drawn before (background shows through).
    """

    points: np.ndarray
    role: str
    part: str | None = None
    hole: bool = False


def ellipse(cx: float, cy: float, rx: float, ry: float, angle_deg: float = 0.0, n: int = 28) -> np.ndarray:
    """Polygon approximating an ellipse, optionally rotated by angle_deg about its centre."""
    t = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
    pts = np.stack([rx * np.cos(t), ry * np.sin(t)], axis=1)
    return _rotate(pts, angle_deg) + (cx, cy)


def circle(cx: float, cy: float, r: float, n: int = 28) -> np.ndarray:
    return ellipse(cx, cy, r, r, n=n)


def rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], dtype=float)


def poly(*pts) -> np.ndarray:
    return np.array(pts, dtype=float)


def arc_band(cx: float, cy: float, r_out: float, r_in: float, a0: float, a1: float, n: int = 16) -> np.ndarray:
    """Ring segment between angles a0..a1 degrees (0 = +x, 90 = +y i.e. downwards)."""
    t = np.radians(np.linspace(a0, a1, n))
    outer = np.stack([cx + r_out * np.cos(t), cy + r_out * np.sin(t)], axis=1)
    inner = np.stack([cx + r_in * np.cos(t[::-1]), cy + r_in * np.sin(t[::-1])], axis=1)
    return np.concatenate([outer, inner])


def bar(p0, p1, width: float) -> np.ndarray:
    """Rectangle of the given width along the segment p0-p1 (a thick line)."""
    p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
    d = p1 - p0
    normal = np.array([-d[1], d[0]]) / (np.hypot(*d) + 1e-12) * (width / 2)
    return np.array([p0 + normal, p1 + normal, p1 - normal, p0 - normal])


def star(cx: float, cy: float, r_out: float, r_in: float, points: int = 5) -> np.ndarray:
    """Star polygon with its first tip pointing up."""
    angles = -math.pi / 2 + np.arange(2 * points) * math.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, r_out, r_in)
    return np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)


def _rotate(pts: np.ndarray, angle_deg: float) -> np.ndarray:
    a = math.radians(angle_deg)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return pts @ rot.T


def _jit(rng: np.random.Generator, value: float, amount: float) -> float:
    """value plus uniform jitter in [-amount, amount]: small per-image shape variation."""
    return float(value + rng.uniform(-amount, amount))


# ---------------------------------------------------------------------------------------------
# Object designs. Each returns the shapes of one upright object inside the unit disc, drawn in
# list order (later shapes cover earlier ones). Jitter amounts are small enough that every point
# stays inside the disc (checked by the tests).
# ---------------------------------------------------------------------------------------------


def _face(rng):
    rx = _jit(rng, 0.76, 0.06)
    eye_dx, eye_y = _jit(rng, 0.3, 0.04), _jit(rng, -0.25, 0.05)
    eye_rx, eye_ry = _jit(rng, 0.14, 0.02), _jit(rng, 0.1, 0.02)
    mouth_w = _jit(rng, 0.3, 0.06)
    return [
        Shape(ellipse(0, 0, rx, 0.95), "body"),
        Shape(ellipse(-eye_dx, eye_y, eye_rx, eye_ry), "detail", "left_eye"),
        Shape(ellipse(eye_dx, eye_y, eye_rx, eye_ry), "detail", "right_eye"),
        Shape(poly((0, -0.1), (-0.12, 0.24), (0.12, 0.24)), "accent", "nose"),
        Shape(ellipse(0, 0.52, mouth_w, 0.08), "accent", "mouth"),
    ]


def _house(rng):
    top = _jit(rng, -0.1, 0.05)
    shapes = []
    if rng.random() < 0.5:  # optional chimney, partly hidden by the roof
        shapes.append(Shape(rect(0.3, -0.68, 0.46, -0.3), "body"))
    door_x = _jit(rng, -0.28, 0.08)
    return shapes + [
        Shape(rect(-0.6, top, 0.6, 0.75), "body"),
        Shape(poly((-0.78, top), (0, -0.78), (0.78, top)), "detail", "roof"),
        Shape(rect(door_x - 0.14, 0.3, door_x + 0.14, 0.75), "accent", "door"),
        Shape(rect(0.12, 0.08, 0.44, 0.4), "detail", "window"),
    ]


def _car(rng):
    roof = _jit(rng, -0.45, 0.05)
    wheel_r = _jit(rng, 0.21, 0.02)
    return [
        Shape(rect(-0.9, -0.05, 0.9, 0.3), "body"),
        Shape(poly((-0.5, -0.04), (-0.3, roof), (0.3, roof), (0.55, -0.04)), "body", "cabin"),
        Shape(poly((-0.38, -0.07), (-0.25, roof + 0.08), (0.25, roof + 0.08), (0.42, -0.07)), "accent", "cabin"),
        Shape(circle(-0.5, 0.35, wheel_r), "detail", "wheel_back"),
        Shape(circle(0.5, 0.35, wheel_r), "detail", "wheel_front"),
    ]


def _tree(rng):
    r_top, r_side = _jit(rng, 0.44, 0.03), _jit(rng, 0.36, 0.04)
    trunk_w = _jit(rng, 0.12, 0.03)
    return [
        Shape(rect(-trunk_w, 0.15, trunk_w, 0.94), "detail", "trunk"),
        Shape(circle(-0.36, -0.05, r_side), "body", "canopy"),
        Shape(circle(0.36, -0.05, r_side), "body", "canopy"),
        Shape(circle(0, -0.45, r_top), "body", "canopy"),
    ]


def _fish(rng):
    ry = _jit(rng, 0.33, 0.05)
    return [
        Shape(poly((-0.45, 0), (-0.9, -0.35), (-0.9, 0.35)), "detail", "tail"),
        Shape(poly((-0.1, -ry + 0.05), (0.25, -ry + 0.05), (-0.05, -ry - 0.25)), "detail", "fin"),
        Shape(ellipse(0.1, 0, 0.6, ry), "body"),
        Shape(circle(0.42, -0.08, 0.075), "accent", "eye"),
    ]


def _star(rng):
    r_in = _jit(rng, 0.4, 0.05)
    pts = star(0, 0, 0.95, r_in)
    # The top arm is coloured apart so that "top_point" is a visible part.
    top_arm = np.array([pts[-1], pts[0], pts[1]])
    return [
        Shape(pts, "body"),
        Shape(top_arm, "accent", "top_point"),
        Shape(circle(0, 0, _jit(rng, 0.22, 0.03)), "detail", "center"),
    ]


def _cup(rng):
    h = _jit(rng, 0.68, 0.05)
    return [
        Shape(arc_band(0.4, 0.0, 0.4, 0.23, -90, 90), "detail", "handle"),
        Shape(poly((-0.6, -h), (0.45, -h), (0.35, h), (-0.5, h)), "body"),
        Shape(ellipse(-0.075, -h, 0.525, 0.09), "detail", "rim"),
    ]


def _key(rng):
    r_out = _jit(rng, 0.36, 0.02)
    return [
        Shape(circle(-0.55, 0, r_out), "body", "bow"),
        Shape(circle(-0.55, 0, _jit(rng, 0.16, 0.03)), "body", None, hole=True),
        Shape(rect(-0.22, -0.1, 0.9, 0.1), "body", "shaft"),
        Shape(rect(0.52, 0.1, 0.64, 0.32), "detail", "teeth"),
        Shape(rect(0.74, 0.1, 0.86, 0.26), "detail", "teeth"),
    ]


def _flower(rng):
    n_petals = int(rng.integers(5, 8))
    offset = rng.uniform(0, 360)
    petals = []
    for k in range(n_petals):
        a = offset + 360.0 * k / n_petals
        c = (0.3 * math.cos(math.radians(a)), -0.42 + 0.3 * math.sin(math.radians(a)))
        petals.append(Shape(ellipse(c[0], c[1], 0.2, 0.11, angle_deg=a), "body", "petals"))
    return [
        Shape(rect(-0.05, -0.2, 0.05, 0.95), "detail", "stem"),
        Shape(ellipse(0.22, 0.6, 0.2, 0.08, angle_deg=-35), "detail", "leaf"),
        *petals,
        Shape(circle(0, -0.42, _jit(rng, 0.15, 0.02)), "accent", "center"),
    ]


def _arrow(rng):
    head_w = _jit(rng, 0.35, 0.05)
    return [
        Shape(rect(-0.8, -0.08, 0.45, 0.08), "body"),
        Shape(poly((0.35, -head_w), (0.95, 0), (0.35, head_w)), "detail", "head"),
        Shape(poly((-0.92, -0.3), (-0.65, -0.3), (-0.45, 0), (-0.65, 0.3), (-0.92, 0.3), (-0.72, 0)), "accent", "tail"),
    ]


def _bird(rng):
    wing_angle = _jit(rng, -20, 12)
    return [
        Shape(poly((-0.55, 0.05), (-0.95, -0.15), (-0.9, 0.25)), "body"),
        Shape(ellipse(-0.1, 0.1, 0.5, 0.3), "body"),
        Shape(circle(0.45, -0.2, 0.22), "body", "head"),
        Shape(circle(0.52, -0.26, 0.05), "accent", "head"),
        Shape(poly((0.62, -0.3), (0.92, -0.2), (0.62, -0.1)), "accent", "beak"),
        Shape(ellipse(-0.15, 0.02, 0.35, 0.14, angle_deg=wing_angle), "detail", "wing"),
    ]


def _umbrella(rng):
    r = _jit(rng, 0.8, 0.03)
    t = np.radians(np.linspace(180, 360, 24))
    dome = np.stack([r * np.cos(t), -0.05 + r * np.sin(t)], axis=1)
    # Scalloped lower edge: four small arcs bulging upwards, right to left.
    scallops = []
    for k in range(4):
        cx = r - (2 * k + 1) * r / 4
        s = np.radians(np.linspace(0, -180, 8))
        scallops.append(np.stack([cx + r / 4 * np.cos(s), -0.05 + 0.12 * np.sin(s)], axis=1))
    return [
        Shape(np.concatenate([dome, *scallops]), "body", "canopy"),
        Shape(poly((0, -0.05 - r - 0.08), (-0.05, -0.05 - r + 0.02), (0.05, -0.05 - r + 0.02)), "accent", "tip"),
        Shape(rect(-0.045, -0.1, 0.045, 0.66), "detail", "handle"),
        Shape(arc_band(-0.14, 0.64, 0.18, 0.1, 0, 180), "detail", "handle"),
    ]


def _lamp(rng):
    shade_w = _jit(rng, 0.6, 0.05)
    return [
        Shape(rect(-0.05, -0.3, 0.05, 0.62), "detail", "pole"),
        Shape(rect(-0.45, 0.6, 0.45, 0.8), "detail", "base"),
        Shape(poly((-0.3, -0.85), (0.3, -0.85), (shade_w, -0.25), (-shade_w, -0.25)), "body", "shade"),
    ]


def _boat(rng):
    sail_w = _jit(rng, 0.62, 0.06)
    return [
        Shape(rect(-0.04, -0.9, 0.04, 0.38), "detail", "mast"),
        Shape(poly((0.08, -0.8), (0.08, 0.25), (0.08 + sail_w, 0.25)), "accent", "sail"),
        Shape(poly((-0.08, -0.6), (-0.08, 0.25), (-0.5, 0.25)), "accent", "sail"),
        Shape(poly((-0.85, 0.33), (0.85, 0.33), (0.55, 0.7), (-0.55, 0.7)), "body", "hull"),
    ]


def _bottle(rng):
    w = _jit(rng, 0.33, 0.03)
    return [
        Shape(rect(-w, -0.3, w, 0.9), "body"),
        Shape(ellipse(0, -0.3, w, 0.15), "body"),
        Shape(rect(-0.12, -0.76, 0.12, -0.3), "body", "neck"),
        Shape(rect(-0.15, -0.95, 0.15, -0.75), "detail", "cap"),
        Shape(rect(-w, _jit(rng, 0.1, 0.06), w, 0.5), "accent", "label"),
    ]


def _kite(rng):
    half_w = _jit(rng, 0.48, 0.05)
    tail = [(0, 0.3), (0.16, 0.52), (-0.1, 0.74), (0.08, 0.94)]
    shapes = [Shape(bar(tail[k], tail[k + 1], 0.05), "detail", "tail") for k in range(3)]
    for bx, by in tail[1:3]:  # bows tied to the tail
        bow = poly((bx - 0.12, by - 0.07), (bx + 0.12, by + 0.07), (bx + 0.12, by - 0.07), (bx - 0.12, by + 0.07))
        shapes.append(Shape(bow, "accent", "tail"))
    return shapes + [
        Shape(poly((0, -0.95), (half_w, -0.35), (0, 0.3), (-half_w, -0.35)), "body", "sail"),
        Shape(bar((0, -0.95), (0, 0.3), 0.05), "detail", "spars"),
        Shape(bar((-half_w, -0.35), (half_w, -0.35), 0.05), "detail", "spars"),
    ]


def _chair(rng):
    back_top = _jit(rng, -0.8, 0.04)
    return [
        Shape(rect(-0.5, back_top, -0.34, 0.05), "detail", "backrest"),
        Shape(rect(-0.5, 0.15, -0.38, 0.84), "accent", "legs"),
        Shape(rect(0.32, 0.15, 0.44, 0.84), "accent", "legs"),
        Shape(rect(-0.5, 0.0, 0.44, 0.16), "body", "seat"),
    ]


def _bell(rng):
    flare = _jit(rng, 0.75, 0.05)
    body = poly(
        (-0.3, -0.6), (0.3, -0.6), (0.4, -0.2), (0.5, 0.3), (flare, 0.52), (-flare, 0.52), (-0.5, 0.3), (-0.4, -0.2)
    )
    return [
        Shape(circle(0, 0.68, 0.13), "detail", "clapper"),
        Shape(circle(0, -0.78, 0.15), "accent", "crown"),
        Shape(circle(0, -0.78, 0.07), "accent", None, hole=True),
        Shape(body, "body"),
        Shape(ellipse(0, -0.6, 0.3, 0.15), "body"),
        Shape(rect(-flare + 0.03, 0.4, flare - 0.03, 0.52), "accent", "rim"),
    ]


@dataclass(frozen=True)
class Design:
    """A class of synthetic object: its name, drawing function and named parts."""

    name: str
    draw: Callable[[np.random.Generator], list]
    parts: tuple[str, ...]


SOURCE_DESIGNS: tuple[Design, ...] = (
    Design("face", _face, ("left_eye", "right_eye", "nose", "mouth")),
    Design("house", _house, ("roof", "door", "window")),
    Design("car", _car, ("cabin", "wheel_back", "wheel_front")),
    Design("tree", _tree, ("trunk", "canopy")),
    Design("fish", _fish, ("tail", "fin", "eye")),
    Design("star", _star, ("top_point", "center")),
    Design("cup", _cup, ("handle", "rim")),
    Design("key", _key, ("bow", "shaft", "teeth")),
    Design("flower", _flower, ("stem", "leaf", "petals", "center")),
    Design("arrow", _arrow, ("head", "tail")),
    Design("bird", _bird, ("head", "beak", "wing")),
)

TARGET_DESIGNS: tuple[Design, ...] = (
    Design("umbrella", _umbrella, ("canopy", "tip", "handle")),
    Design("lamp", _lamp, ("pole", "base", "shade")),
    Design("boat", _boat, ("mast", "sail", "hull")),
    Design("bottle", _bottle, ("neck", "cap", "label")),
    Design("kite", _kite, ("tail", "sail", "spars")),
    Design("chair", _chair, ("backrest", "legs", "seat")),
    Design("bell", _bell, ("clapper", "crown", "rim")),
)

SOURCE_CLASSES = tuple(d.name for d in SOURCE_DESIGNS)
TARGET_CLASSES = tuple(d.name for d in TARGET_DESIGNS)


def designs(target: bool = False) -> tuple[Design, ...]:
    """All defined designs of the source (target=False) or target set, in label order."""
    return TARGET_DESIGNS if target else SOURCE_DESIGNS


# ---------------------------------------------------------------------------------------------
# Colours
# ---------------------------------------------------------------------------------------------


def _colour_distance(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, float) - np.asarray(b, float)))


def _contrasting_colour(rng: np.random.Generator, avoid: list, tries: int = 40) -> tuple:
    """A random RGB colour at least d (Euclidean, 0-255) from each (colour, d) pair in avoid.

    Rejection sampling with a fixed number of tries keeps it deterministic; if none qualifies
    (rare) the candidate with the largest worst-case margin is used.
    """
    best, best_margin = None, -math.inf
    for _ in range(tries):
        c = tuple(int(v) for v in rng.integers(0, 256, size=3))
        margin = min((_colour_distance(c, a) - d for a, d in avoid), default=0.0)
        if margin >= 0:
            return c
        if margin > best_margin:
            best, best_margin = c, margin
    return best


def _luminance(c) -> float:
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]


def _object_colours(rng: np.random.Generator, background) -> dict:
    """Body, outline, detail and accent colours of one object.

    The body stands out from the (mean) background; detail and accent, the part colours, stand
    out strongly from the body and from each other, and clearly from outline and background, so
    parts are visible and a part's pixels can be told apart by colour (the tests rely on it).
    """
    body = _contrasting_colour(rng, [(background, 90)])
    # A dark or light outline, whichever stands out from the body, keeps the silhouette visible
    # on any background without making the outline colour a class cue.
    shade = int(rng.integers(0, 40))
    outline = (shade,) * 3 if _luminance(body) > 110 else (255 - shade,) * 3
    detail = _contrasting_colour(rng, [(body, 130), (outline, 60), (background, 60)])
    accent = _contrasting_colour(rng, [(body, 110), (detail, 100), (outline, 60), (background, 60)])
    return {"body": body, "detail": detail, "accent": accent, "outline": outline}


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One rendered image and what is known about it."""

    image: np.ndarray  # (S, S, 3) uint8
    boxes: dict  # part name -> (x0, y0, x1, y1) ints, x1/y1 exclusive; includes "object"
    scale: float  # relative object size (fraction of the image side)
    rotation: float  # degrees, clockwise on screen
    center: tuple  # (x, y) pixels: where the local origin landed
    colours: dict = field(default_factory=dict)  # role -> RGB (plus "background" when plain)


def _supersample(image_size: int) -> int:
    """Supersampling factor for antialiasing: 4x for small images, 2x for large ones (speed)."""
    return 4 if image_size <= 128 else 2


def _clutter_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Float (S, S, 3) 0-255 texture: smooth two-colour blotches plus, often, random stripes."""
    c0 = rng.integers(0, 256, size=3).astype(float)
    c1 = rng.integers(0, 256, size=3).astype(float)
    k = int(rng.integers(3, 7))
    grid = Image.fromarray((rng.random((k, k)) * 255).astype(np.uint8))
    weight = np.asarray(grid.resize((size, size), Image.BICUBIC), dtype=float)[..., None] / 255.0
    bg = c0 * (1 - weight) + c1 * weight
    if rng.random() < 0.6:
        phi = rng.uniform(0, math.pi)
        period = rng.uniform(0.08, 0.3) * size
        yy, xx = np.mgrid[0:size, 0:size]
        wave = np.sin(2 * math.pi * (xx * math.cos(phi) + yy * math.sin(phi)) / period + rng.uniform(0, 2 * math.pi))
        stripe_colour = rng.integers(0, 256, size=3).astype(float)
        strength = rng.uniform(0.2, 0.5)
        mix = (wave[..., None] > 0) * strength
        bg = bg * (1 - mix) + stripe_colour * mix
    return bg


class _Layer:
    """A supersampled RGB + coverage canvas that is reduced to image size for compositing."""

    def __init__(self, size: int, ss: int, fill=(0, 0, 0)):
        self.ss = ss
        self.colour = Image.new("RGB", (size * ss, size * ss), fill)
        self.mask = Image.new("L", (size * ss, size * ss), 0)
        self._draw_colour = ImageDraw.Draw(self.colour)
        self._draw_mask = ImageDraw.Draw(self.mask)

    def polygon(self, pts_px: np.ndarray, colour, hole: bool = False) -> None:
        # PIL fills canvas pixels floor(min)..floor(max) of a polygon's coordinates, i.e. pixel
        # j covers [j, j+1); the part boxes (see _box) use the same convention, so they hold
        # every pixel the polygon touches.
        xy = [(float(x), float(y)) for x, y in pts_px * self.ss]
        self._draw_colour.polygon(xy, fill=colour)
        self._draw_mask.polygon(xy, fill=0 if hole else 255)

    def reduce(self) -> tuple[np.ndarray, np.ndarray]:
        """Box-filtered colour (S, S, 3) and alpha (S, S, 1), both float; alpha in 0-1."""
        colour = np.asarray(self.colour.reduce(self.ss), dtype=float)
        alpha = np.asarray(self.mask.reduce(self.ss), dtype=float)[..., None] / 255.0
        return colour, alpha


def _composite(base: np.ndarray, colour, alpha: np.ndarray) -> np.ndarray:
    return base * (1 - alpha) + np.asarray(colour, dtype=float) * alpha


def _dilate(alpha: np.ndarray) -> np.ndarray:
    """3x3 maximum filter of an (S, S, 1) array: the object's coverage grown by one pixel."""
    padded = np.pad(alpha[..., 0], 1)
    s = alpha.shape[0]
    out = np.max([padded[dy : dy + s, dx : dx + s] for dy in range(3) for dx in range(3)], axis=0)
    return out[..., None]


def _draw_distractors(rng: np.random.Generator, size: int, ss: int, count: int) -> _Layer:
    """Circles, ellipses, rectangles and bars in random colours: clutter that is no class."""
    layer = _Layer(size, ss)
    for _ in range(count):
        kind = int(rng.integers(0, 4))
        extent = rng.uniform(0.08, 0.35) * size
        cx, cy = rng.uniform(0, size, size=2)
        angle = rng.uniform(0, 180)
        if kind == 0:
            pts = circle(cx, cy, extent / 2)
        elif kind == 1:
            pts = ellipse(cx, cy, extent / 2, extent * rng.uniform(0.15, 0.4), angle_deg=angle)
        elif kind == 2:
            w, h = extent, extent * rng.uniform(0.3, 1.0)
            pts = _rotate(rect(-w / 2, -h / 2, w / 2, h / 2), angle) + (cx, cy)
        else:
            d = np.array([math.cos(math.radians(angle)), math.sin(math.radians(angle))]) * extent
            pts = bar((cx, cy) - d, (cx, cy) + d, max(1.0, extent * rng.uniform(0.05, 0.12)))
        layer.polygon(pts, tuple(int(v) for v in rng.integers(0, 256, size=3)))
    return layer


def _placement(rng, points: np.ndarray, image_size: int, scale_range, rotation_deg: float):
    """Random relative size, rotation and translation keeping the object inside the image.

    Returns (scale, rotation, linear 2x2 map local -> pixels, translation).
    """
    scale = float(rng.uniform(*scale_range))
    rotation = float(rng.uniform(-rotation_deg, rotation_deg))
    # Slight independent stretching of the two axes varies the shapes a little more; it only
    # shrinks, so the object stays inside the unit disc.
    stretch = np.diag(rng.uniform(0.85, 1.0, size=2))
    a = math.radians(rotation)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    linear = (scale * image_size / 2) * rot @ stretch
    placed = points @ linear.T
    lo, hi = placed.min(axis=0), placed.max(axis=0)
    margin = 1.0  # room for the one-pixel outline
    t = np.empty(2)
    for axis in range(2):
        low, high = -lo[axis] + margin, image_size - hi[axis] - margin
        # An object wider than the image (only near scale 1) is centred instead.
        t[axis] = rng.uniform(low, high) if high > low else (low + high) / 2
    return scale, rotation, linear, t


def _box(points_px: np.ndarray, image_size: int, pad: int = 0) -> tuple[int, int, int, int]:
    """Integer box (x1/y1 exclusive) around points, padded, clipped and never empty.

    Pixel i covers [i, i+1); floor(max) + 1 rather than ceil(max) keeps a polygon corner lying
    exactly on a pixel boundary inside the box, as PIL fills that pixel too.
    """
    x0, y0 = np.floor(points_px.min(axis=0)).astype(int) - pad
    x1, y1 = np.floor(points_px.max(axis=0)).astype(int) + 1 + pad
    x0, y0 = min(max(x0, 0), image_size - 1), min(max(y0, 0), image_size - 1)
    x1, y1 = max(min(x1, image_size), x0 + 1), max(min(y1, image_size), y0 + 1)
    return int(x0), int(y0), int(x1), int(y1)


def render_sample(
    design: Design,
    rng: np.random.Generator,
    image_size: int,
    scale_range=(0.45, 0.95),
    rotation_deg: float = 180.0,
    distractors: int = 3,
    plain: bool = False,
) -> Sample:
    """Render one image of `design` with its part boxes.

    plain=True draws on a uniform background colour (recorded in colours["background"]) with no
    distractors and no pixel noise: used by tests to check that boxes cover the drawn parts.
    """
    ss = _supersample(image_size)
    if plain:
        background = _contrasting_colour(rng, [])
        base = np.broadcast_to(np.asarray(background, float), (image_size, image_size, 3)).copy()
    else:
        base = _clutter_background(rng, image_size)
        background = tuple(base.mean(axis=(0, 1)))
        if distractors:
            colour, alpha = _draw_distractors(rng, image_size, ss, distractors).reduce()
            base = _composite(base, colour, alpha)

    shapes = design.draw(rng)
    solid = np.concatenate([s.points for s in shapes if not s.hole])
    scale, rotation, linear, t = _placement(rng, solid, image_size, scale_range, rotation_deg)
    colours = _object_colours(rng, background)
    if plain:
        colours["background"] = background

    # Unfilled canvas pixels (and holes) take the outline colour so that the box-filtered edge
    # pixels blend body into outline rather than into black.
    layer = _Layer(image_size, ss, fill=colours["outline"])
    part_points: dict[str, list] = {}
    for s in shapes:
        pts = s.points @ linear.T + t
        layer.polygon(pts, colours["outline"] if s.hole else colours[s.role], hole=s.hole)
        if s.part is not None:
            part_points.setdefault(s.part, []).append(pts)
    colour, alpha = layer.reduce()
    image = _composite(base, colours["outline"], _dilate(alpha))
    image = _composite(image, colour, alpha)
    if not plain:
        image = image + rng.normal(0.0, rng.uniform(2.0, 6.0), size=image.shape)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)

    boxes = {OBJECT_PART: _box(solid @ linear.T + t, image_size, pad=1)}
    for name in design.parts:
        boxes[name] = _box(np.concatenate(part_points[name]), image_size)
    return Sample(image, boxes, scale, rotation, (float(t[0]), float(t[1])), colours)


# ---------------------------------------------------------------------------------------------
# Dataset generation
# ---------------------------------------------------------------------------------------------


def image_rng(seed: int, target: bool, class_index: int, split: str, index: int) -> np.random.Generator:
    """The generator of one image: independent of every count, so counts can change freely."""
    return np.random.default_rng([seed, int(target), class_index, SPLITS.index(split), index])


def _check_int(name: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    return int(value)


def _check_args(
    seed, image_size, classes, train_per_class, val_per_class, scale_range, rotation_deg, distractors, target
) -> None:
    """Validate arguments; every error names the argument and its allowed range."""
    available = len(designs(target))
    kind = "target" if target else "source"
    _check_int("seed", seed, 0, 2**63 - 1)
    _check_int("image_size", image_size, 16, MAX_IMAGE_SIZE)
    if isinstance(classes, bool) or not isinstance(classes, (int, np.integer)) or not 2 <= classes <= available:
        raise ValueError(
            f"classes must be an integer in [2, {available}] ({available} {kind} classes are defined), got {classes!r}"
        )
    _check_int("train_per_class", train_per_class, 1, 10**7)
    _check_int("val_per_class", val_per_class, 1, 10**7)
    _check_int("distractors", distractors, 0, MAX_DISTRACTORS)
    scale_error = f"scale_range must be a pair (low, high) with 0 < low <= high <= 1, got {scale_range!r}"
    try:
        lo, hi = (float(v) for v in scale_range)
    except (TypeError, ValueError):
        raise ValueError(scale_error) from None
    if not 0 < lo <= hi <= 1:
        raise ValueError(scale_error)
    if isinstance(rotation_deg, bool) or not isinstance(rotation_deg, (int, float)) or not 0 <= rotation_deg <= 180:
        raise ValueError(f"rotation_deg must be a number in [0, 180], got {rotation_deg!r}")


def generate_synthetic(
    out_dir,
    *,
    seed: int,
    image_size: int = 64,
    classes: int | None = None,
    train_per_class: int = 120,
    val_per_class: int = 30,
    scale_range=(0.45, 0.95),
    rotation_deg: float = 180.0,
    distractors: int = 3,
    target: bool = False,
    log=print,
) -> dict:
    """Write a synthetic dataset to out_dir and return its metadata (also in dataset.json).

    Writes ``images/<split>/<class>/<image_id>.png`` for splits train and val, then
    manifest.parquet, parts.parquet and dataset.json (see convviz.data.common). The first
    ``classes`` designs of the source set (target=False; default 10, at most
    len(SOURCE_DESIGNS), "face" first) or of the disjoint target set (target=True; default 5, at
    most len(TARGET_DESIGNS)) are used, labelled 0..classes-1 in that order.

    The manifest has, besides the common columns, the nuisance parameters of each image: scale
    (relative size), rotation (degrees), center_x, center_y (pixels). out_dir/images is
    cleared first; nothing else in out_dir is deleted. Bad arguments raise ValueError.
    """
    log = log or (lambda *_: None)
    if classes is None:
        classes = DEFAULT_TARGET_CLASSES if target else DEFAULT_SOURCE_CLASSES
    _check_args(
        seed, image_size, classes, train_per_class, val_per_class, scale_range, rotation_deg, distractors, target
    )
    scale_range = (float(scale_range[0]), float(scale_range[1]))
    start = time.perf_counter()
    out_dir = Path(out_dir)
    image_root = out_dir / "images"
    if image_root.exists():
        shutil.rmtree(image_root)  # stale images of an earlier run must not linger

    chosen = designs(target)[:classes]
    prefix = "t_" if target else ""
    counts = {"train": train_per_class, "val": val_per_class}
    rows, part_rows, train_images = [], [], []
    for label, design in enumerate(chosen):
        for split in SPLITS:
            folder = image_root / split / design.name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(counts[split]):
                rng = image_rng(seed, target, label, split, i)
                sample = render_sample(design, rng, image_size, scale_range, rotation_deg, distractors)
                image_id = f"{prefix}{design.name}_{split}_{i:04d}"
                rel_path = f"images/{split}/{design.name}/{image_id}.png"
                Image.fromarray(sample.image).save(out_dir / rel_path)
                if split == "train":
                    train_images.append(sample.image)
                rows.append(
                    {
                        "image_id": image_id,
                        "split": split,
                        "label": label,
                        "class_name": design.name,
                        "path": rel_path,
                        "scale": sample.scale,
                        "rotation": sample.rotation,
                        "center_x": sample.center[0],
                        "center_y": sample.center[1],
                    }
                )
                part_rows.extend((image_id, part, *box) for part, box in sample.boxes.items())
        log(
            f"synthetic: class {label + 1}/{len(chosen)} {design.name!r}: "
            f"{train_per_class} train + {val_per_class} val images"
        )

    manifest = pd.DataFrame(rows)
    # Train rows first, then val; within a split by label and index (generation order).
    manifest["_split_order"] = manifest["split"].map(SPLITS.index)
    manifest = manifest.sort_values(["_split_order", "label"], kind="stable").drop(columns="_split_order")
    parts = pd.DataFrame(part_rows, columns=["image_id", "part", "x0", "y0", "x1", "y1"])
    parts[["x0", "y0", "x1", "y1"]] = parts[["x0", "y0", "x1", "y1"]].astype("int64")
    mean, std = channel_stats(train_images)
    meta = {
        "name": "synthetic_target" if target else "synthetic",
        "classes": [d.name for d in chosen],
        "image_size": image_size,
        "mean": mean,
        "std": std,
        "multilabel": False,
        "seed": seed,
        "parts": sorted({OBJECT_PART, *(p for d in chosen for p in d.parts)}),
        "class_parts": {d.name: [OBJECT_PART, *d.parts] for d in chosen},
        "generator": {
            "train_per_class": train_per_class,
            "val_per_class": val_per_class,
            "scale_range": list(scale_range),
            "rotation_deg": float(rotation_deg),
            "distractors": distractors,
            "target": bool(target),
        },
        # As write_dataset_tables would add it, so that the returned dict equals dataset.json.
        "counts": {split: counts[split] * len(chosen) for split in SPLITS},
    }
    write_dataset_tables(out_dir, manifest, parts, meta)
    seconds = time.perf_counter() - start
    log(f"synthetic: wrote {len(manifest)} images of {len(chosen)} classes to {out_dir} in {seconds:.1f} s")
    return meta


def _main(argv=None) -> None:  # pragma: no cover - convenience for manual runs
    import argparse

    parser = argparse.ArgumentParser(description="Write a synthetic convviz dataset.")
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--classes", type=int, default=None)
    parser.add_argument("--train-per-class", type=int, default=120)
    parser.add_argument("--val-per-class", type=int, default=30)
    parser.add_argument("--target", action="store_true")
    args = parser.parse_args(argv)
    generate_synthetic(
        os.fspath(args.out_dir),
        seed=args.seed,
        image_size=args.image_size,
        classes=args.classes,
        train_per_class=args.train_per_class,
        val_per_class=args.val_per_class,
        target=args.target,
    )


if __name__ == "__main__":  # pragma: no cover
    _main()
