"""Procedural anime-style portraits drawn with Pillow from tags, captioned in animagine-xl's tag order.

A tiny stand-in for an anime dataset, for training and testing the tiny model: each attribute is one
tag from a small fixed vocabulary, the caption lists them in animagine-xl's order, e.g.
`1girl, solo, blue hair, long hair, red eyes, smile, ribbon, yellow background`, and image `index`
of `seed` is a pure function of (seed, index, size), down to the PNG bytes.

Heterochromia and the star hairpin can be drawn but the default sampler never picks them: they make
a subject the model has never seen, for the DreamBooth demo.
"""

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# Vocabularies: tag word -> RGB. The tuples below are the label sets, in a fixed order.
HAIR_RGB = {
    "blonde": (235, 195, 80), "brown": (125, 80, 45), "black": (45, 40, 50), "blue": (60, 110, 220),
    "red": (200, 40, 45), "pink": (245, 140, 185), "green": (60, 165, 85), "silver": (195, 200, 215),
}
EYE_RGB = {
    "blue": (40, 100, 235), "red": (215, 25, 40), "green": (25, 165, 70),
    "purple": (145, 60, 210), "yellow": (240, 190, 20), "brown": (125, 70, 30),
}
BACKGROUND_RGB = {
    "white": (250, 250, 250), "yellow": (255, 240, 160), "blue": (160, 200, 245),
    "pink": (250, 205, 225), "green": (180, 225, 165), "grey": (140, 140, 145),
}
HAIR_COLOURS = tuple(HAIR_RGB)
HAIR_LENGTHS = ("short hair", "long hair", "twintails")
EYE_COLOURS = tuple(EYE_RGB)
# "closed eyes" is left out on purpose: it would hide the eye colour that the caption names.
EXPRESSIONS = ("smile", "open mouth", "frown", "expressionless")
ACCESSORIES = ("none", "hat", "ribbon", "glasses", "hairclip", "star hairpin")  # "none" has no tag
BACKGROUNDS = tuple(BACKGROUND_RGB)

# The default distribution leaves these out; so is heterochromia (a second eye colour).
RARE_ACCESSORIES = ("star hairpin",)
DEFAULT_ACCESSORIES = tuple(a for a in ACCESSORIES if a not in RARE_ACCESSORIES)

# Fixed colours of the parts no tag describes.
WHITE_RGB = (255, 255, 255)  # eye whites and highlights
SKIN_RGB = (255, 228, 210)
SKIN_LINE_RGB = (215, 160, 145)  # nose
LINE_RGB = (55, 35, 40)  # lashes, mouth lines, glasses
MOUTH_RGB = (150, 40, 55)
TONGUE_RGB = (240, 120, 130)
CLOTHES_RGB = (45, 55, 100)
COLLAR_RGB = (245, 245, 245)
HAT_RGB = (95, 60, 150)
HAT_BAND_RGB = (235, 215, 110)
RIBBON_RGB = (225, 35, 60)
HAIRCLIP_RGB = (60, 205, 215)
STAR_RGB = (255, 215, 0)
HAIR_SHADE = 0.7  # strands and ties: the hair colour times this
PUPIL_SHADE = 0.4  # pupil: the iris colour times this

# Drawing: sizes and the supersampling that anti-aliases the shapes.
MIN_SIZE = 64  # below this the eyes are a pixel or two and their colour stops being readable
SUPERSAMPLE = 4  # draw at 4x, then downsample with LANCZOS
FACE_CENTRE = (0.5, 0.5)  # in fractions of the image side; the shapes below are relative to it
JITTER_SHIFT = 0.04  # the head moves up to this far (fraction of the side) in x and y
ZOOM = 1.12  # the head fills most of the frame: at 64 px the eyes and mouth must survive the VAE's 8x downsampling
JITTER_SCALE = 0.06  # and is scaled by up to ZOOM * (1 +- this)
FACE_RADII = (0.19, 0.21)  # half width, half height of the face, before the chin taper
CHIN_TAPER = 0.35  # the face's width shrinks by this fraction at the chin
EYE_X, EYE_Y = 0.095, 0.035  # eye centres: (+-EYE_X, EYE_Y) from the face centre


@dataclass(frozen=True)
class Character:
    """One portrait's attributes, each a word from the vocabularies above."""

    hair_colour: str
    hair_length: str
    eye_colour: str  # both eyes, or the eye on the viewer's left with heterochromia
    expression: str
    accessory: str
    background: str
    second_eye_colour: str | None = None  # heterochromia: the eye on the viewer's right; None: same colour

    def __post_init__(self):
        for field, value, allowed in [
            ("hair_colour", self.hair_colour, HAIR_COLOURS), ("hair_length", self.hair_length, HAIR_LENGTHS),
            ("eye_colour", self.eye_colour, EYE_COLOURS), ("expression", self.expression, EXPRESSIONS),
            ("accessory", self.accessory, ACCESSORIES), ("background", self.background, BACKGROUNDS),
            ("second_eye_colour", self.second_eye_colour, (None, *EYE_COLOURS)),
        ]:
            if value not in allowed:
                raise ValueError(f"{field} {value!r} is not one of {allowed}")
        if self.second_eye_colour == self.eye_colour:
            raise ValueError(f"second_eye_colour equals eye_colour {self.eye_colour!r}; use None for matching eyes")

    @property
    def heterochromia(self):
        return self.second_eye_colour is not None


def random_character(rng):
    """A character from the default distribution: each attribute uniform over its default values,
    never heterochromia or a rare accessory. `rng` is a numpy Generator."""

    def pick(values):
        return values[rng.integers(len(values))]

    # Keyword arguments are evaluated left to right, so the draws happen in this order.
    return Character(hair_colour=pick(HAIR_COLOURS), hair_length=pick(HAIR_LENGTHS), eye_colour=pick(EYE_COLOURS),
                     expression=pick(EXPRESSIONS), accessory=pick(DEFAULT_ACCESSORIES), background=pick(BACKGROUNDS))


HETEROCHROMIA_RATE = 0.25  # widened_character: share of characters with two eye colours


def widened_character(rng):
    """The default distribution widened to everything the drawing can show: accessory uniform over all
    ACCESSORIES (star hairpin too), heterochromia with probability HETEROCHROMIA_RATE. For what must
    handle every picture (the VAE, an image codec; the classifier), never for the UNet and text encoders,
    which must not have seen the DreamBooth subject."""
    c = random_character(rng)
    accessory = ACCESSORIES[rng.integers(len(ACCESSORIES))]
    second = None
    if rng.random() < HETEROCHROMIA_RATE:
        others = [e for e in EYE_COLOURS if e != c.eye_colour]
        second = others[rng.integers(len(others))]
    return Character(c.hair_colour, c.hair_length, c.eye_colour, c.expression, accessory, c.background, second)


def caption(character):
    """Tags in animagine-xl's order: subject count, hair, eyes, expression, accessory, background."""
    c = character
    eyes = [f"{c.eye_colour} eyes"]
    if c.heterochromia:
        eyes = ["heterochromia", f"{c.eye_colour} eyes", f"{c.second_eye_colour} eyes"]
    accessory = [] if c.accessory == "none" else [c.accessory]
    tags = ["1girl", "solo", f"{c.hair_colour} hair", c.hair_length, *eyes, c.expression, *accessory,
            f"{c.background} background"]
    return ", ".join(tags)


def parse_caption(text):
    """The Character a caption describes (the inverse of `caption`); unknown or missing tags raise."""
    tags = [tag.strip() for tag in text.split(",")]
    if tags[:2] != ["1girl", "solo"]:
        raise ValueError(f"caption {text!r} does not start with '1girl, solo'")
    found = {"hair": [], "length": [], "eyes": [], "expression": [], "accessory": [], "background": []}
    heterochromia = False
    for tag in tags[2:]:
        word, _, kind = tag.rpartition(" ")  # "blue eyes" -> ("blue", "eyes")
        if tag in HAIR_LENGTHS:  # before "<colour> hair": "short hair" also ends in "hair"
            found["length"].append(tag)
        elif kind == "hair" and word in HAIR_COLOURS:
            found["hair"].append(word)
        elif kind == "eyes" and word in EYE_COLOURS:
            found["eyes"].append(word)
        elif kind == "background" and word in BACKGROUNDS:
            found["background"].append(word)
        elif tag in EXPRESSIONS:
            found["expression"].append(tag)
        elif tag in ACCESSORIES and tag != "none":
            found["accessory"].append(tag)
        elif tag == "heterochromia":
            heterochromia = True
        else:
            raise ValueError(f"unknown tag {tag!r} in caption {text!r}")
    found["accessory"] = found["accessory"] or ["none"]  # no accessory tag means none
    eye_count = 2 if heterochromia else 1
    for kind, values in found.items():
        expected = eye_count if kind == "eyes" else 1
        if len(values) != expected:
            raise ValueError(f"caption {text!r} has {len(values)} {kind} tags, expected {expected}")
    return Character(hair_colour=found["hair"][0], hair_length=found["length"][0], eye_colour=found["eyes"][0],
                     expression=found["expression"][0], accessory=found["accessory"][0],
                     background=found["background"][0], second_eye_colour=found["eyes"][1] if heterochromia else None)


def shade(rgb, factor):
    """A darker version of a colour."""
    return tuple(round(v * factor) for v in rgb)


class Canvas:
    """A supersampled square canvas whose coordinates are fractions of the image side, relative to the face
    centre (y points down), at a portrait's shift and scale. The shapes' coordinates stay inline in the parts
    below, one shape a line: they are the picture, not settings to tune."""

    def __init__(self, centre, scale, side, background):
        (self.cx, self.cy), self.scale, self.side = centre, scale, side
        self.image = Image.new("RGB", (side, side), background)
        self.draw = ImageDraw.Draw(self.image)

    def pt(self, x, y):
        return ((self.cx + x * self.scale) * self.side, (self.cy + y * self.scale) * self.side)

    def box(self, x, y, rx, ry):  # the bounding box of an ellipse centred at (x, y)
        return [self.pt(x - rx, y - ry), self.pt(x + rx, y + ry)]

    def width(self, w):  # a line width, at least one canvas pixel
        return max(1, round(w * self.scale * self.side))


def draw(character, size=64, rng=None):
    """An RGB portrait of `character`, size x size. With `rng` (a numpy Generator) the head is shifted
    and scaled a little; without it, it sits centred at scale 1. Drawn back to front: back hair, neck and
    shoulders, face, front hair, eyes, nose and mouth, accessory."""
    if size < MIN_SIZE:
        raise ValueError(f"size {size} is too small to read the attributes; use {MIN_SIZE} or more")
    c = character
    # Always draw the three jitter numbers, so the random stream does not depend on the character.
    dx, dy, ds = rng.uniform(-1, 1, size=3) if rng is not None else (0.0, 0.0, 0.0)
    centre = (FACE_CENTRE[0] + JITTER_SHIFT * dx, FACE_CENTRE[1] + JITTER_SHIFT * dy)
    canvas = Canvas(centre, ZOOM * (1 + JITTER_SCALE * ds), size * SUPERSAMPLE, BACKGROUND_RGB[c.background])
    hair = HAIR_RGB[c.hair_colour], shade(HAIR_RGB[c.hair_colour], HAIR_SHADE)
    for part in (draw_back_hair, draw_body, draw_face, draw_front_hair, draw_eyes, draw_mouth, draw_accessory):
        part(c, canvas, hair)
    return canvas.image.resize((size, size), Image.Resampling.LANCZOS)


def draw_back_hair(c, canvas, hair):
    """Back hair, behind the head and shoulders."""
    d, pt, box, width, (hair, hair_dark) = canvas.draw, canvas.pt, canvas.box, canvas.width, hair
    d.ellipse(box(0, -0.05, 0.26, 0.25), fill=hair)
    if c.hair_length == "long hair":  # falls past the shoulders to the bottom edge
        d.polygon([pt(-0.26, -0.05), pt(-0.31, 0.6), pt(0.31, 0.6), pt(0.26, -0.05)], fill=hair)
    else:  # short hair and twintails: a bob that ends at the jaw
        d.polygon([pt(-0.26, -0.05), pt(-0.25, 0.13), pt(0.25, 0.13), pt(0.26, -0.05)], fill=hair)
    if c.hair_length == "twintails":  # two tails tied high on the sides of the head
        for sign in (-1, 1):
            d.ellipse(box(sign * 0.33, 0.2, 0.085, 0.25), fill=hair)
            d.line([pt(sign * 0.33, 0.0), pt(sign * 0.33, 0.4)], fill=hair_dark, width=width(0.01))
            d.ellipse(box(sign * 0.31, -0.04, 0.03, 0.03), fill=hair_dark)  # the tie


def draw_body(c, canvas, hair):
    """Neck, shoulders in a sailor-style top with a white collar."""
    d, pt, box = canvas.draw, canvas.pt, canvas.box
    d.rectangle([pt(-0.06, 0.1), pt(0.06, 0.32)], fill=SKIN_RGB)
    d.ellipse(box(0, 0.58, 0.36, 0.3), fill=CLOTHES_RGB)
    d.polygon([pt(-0.2, 0.31), pt(0, 0.45), pt(0.2, 0.31), pt(0.1, 0.29), pt(0, 0.36), pt(-0.1, 0.29)],
              fill=COLLAR_RGB)


def draw_face(c, canvas, hair):
    """Face: an ellipse whose lower half narrows to an anime chin."""
    d, pt = canvas.draw, canvas.pt
    face_rx, face_ry = FACE_RADII
    t = np.linspace(0, 2 * np.pi, 64, endpoint=False)  # 64 corners: smooth at 4x supersampling
    taper = 1 - CHIN_TAPER * np.clip(np.sin(t), 0, None) ** 2  # 1 above the centre line, less below
    d.polygon([pt(face_rx * np.cos(a) * k, face_ry * np.sin(a)) for a, k in zip(t, taper)], fill=SKIN_RGB)


def draw_front_hair(c, canvas, hair):
    """Front hair: a cap over the forehead, jagged bangs, and locks framing the face."""
    d, pt, box, width, (hair, hair_dark) = canvas.draw, canvas.pt, canvas.box, canvas.width, hair
    d.chord(box(0, -0.06, 0.215, 0.2), 180, 360, fill=hair)
    spikes = 5
    for i in range(spikes):
        left = -0.2 + 0.4 * i / spikes
        d.polygon([pt(left, -0.07), pt(left + 0.4 / spikes, -0.07), pt(left + 0.2 / spikes, 0.01 + 0.01 * (i % 2))],
                  fill=hair)
    lock_end = 0.42 if c.hair_length == "long hair" else 0.12  # long locks fall over the shoulders
    for sign in (-1, 1):
        d.polygon([pt(sign * 0.15, -0.1), pt(sign * 0.215, -0.06), pt(sign * 0.23, lock_end),
                   pt(sign * 0.17, lock_end - 0.04), pt(sign * 0.165, 0.02)], fill=hair)
        d.line([pt(sign * 0.12, -0.2), pt(sign * 0.07, -0.07)], fill=hair_dark, width=width(0.008))  # a strand


def draw_eyes(c, canvas, hair):
    """Eyes: white, iris in the eye colour, darker pupil, a highlight, a thick upper lash."""
    d, pt, box, width = canvas.draw, canvas.pt, canvas.box, canvas.width
    eye_colours = (c.eye_colour, c.second_eye_colour or c.eye_colour)  # viewer's left, viewer's right
    for sign, colour in zip((-1, 1), eye_colours):
        x, y = sign * EYE_X, EYE_Y
        iris = EYE_RGB[colour]
        d.ellipse(box(x, y, 0.06, 0.075), fill=WHITE_RGB)
        d.ellipse(box(x, y + 0.008, 0.054, 0.068), fill=iris)
        d.ellipse(box(x, y + 0.018, 0.018, 0.028), fill=shade(iris, PUPIL_SHADE))
        d.ellipse(box(x - 0.019, y - 0.019, 0.013, 0.013), fill=WHITE_RGB)
        d.line([pt(x - 0.068 * sign, y - 0.047), pt(x, y - 0.078), pt(x + 0.074 * sign, y - 0.061)],
               fill=LINE_RGB, width=width(0.016), joint="curve")


def draw_mouth(c, canvas, hair):
    """The nose, and the mouth per expression."""
    d, pt, box, width = canvas.draw, canvas.pt, canvas.box, canvas.width
    d.line([pt(0, 0.115), pt(0.006, 0.125)], fill=SKIN_LINE_RGB, width=width(0.008))  # nose
    line = width(0.016)
    if c.expression == "smile":
        d.arc(box(0, 0.135, 0.06, 0.04), 20, 160, fill=LINE_RGB, width=line)
    elif c.expression == "open mouth":
        d.ellipse(box(0, 0.16, 0.042, 0.038), fill=MOUTH_RGB)
        d.chord(box(0, 0.18, 0.03, 0.02), 180, 360, fill=TONGUE_RGB)
    elif c.expression == "frown":
        d.arc(box(0, 0.19, 0.052, 0.033), 200, 340, fill=LINE_RGB, width=line)
    else:  # expressionless: a flat line
        d.line([pt(-0.04, 0.16), pt(0.04, 0.16)], fill=LINE_RGB, width=line)


def draw_accessory(c, canvas, hair):
    """The accessory, on top of everything."""
    d, pt, box, width = canvas.draw, canvas.pt, canvas.box, canvas.width
    if c.accessory == "hat":  # a brimmed hat with a band
        d.chord(box(0, -0.2, 0.2, 0.17), 180, 360, fill=HAT_RGB)
        d.rectangle([pt(-0.2, -0.28), pt(0.2, -0.235)], fill=HAT_BAND_RGB)
        d.ellipse(box(0, -0.19, 0.32, 0.055), fill=HAT_RGB)
    elif c.accessory == "ribbon":  # a bow on the viewer's right of the head
        x, y = 0.16, -0.21
        d.polygon([pt(x, y), pt(x - 0.1, y - 0.06), pt(x - 0.1, y + 0.06)], fill=RIBBON_RGB)
        d.polygon([pt(x, y), pt(x + 0.1, y - 0.06), pt(x + 0.1, y + 0.06)], fill=RIBBON_RGB)
        d.ellipse(box(x, y, 0.025, 0.025), fill=shade(RIBBON_RGB, HAIR_SHADE))
    elif c.accessory == "glasses":  # round frames over the eyes and a bridge
        for sign in (-1, 1):
            d.ellipse(box(sign * EYE_X, EYE_Y + 0.005, 0.078, 0.085), outline=LINE_RGB, width=width(0.012))
        d.line([pt(-0.017, EYE_Y), pt(0.017, EYE_Y)], fill=LINE_RGB, width=width(0.01))
    elif c.accessory == "hairclip":  # two parallel bars on the bangs, viewer's right, outlined to show on any hair
        for offset in (0, 0.04):
            bar = [pt(0.08 + offset, -0.16), pt(0.15 + offset, -0.09)]
            d.line(bar, fill=LINE_RGB, width=width(0.03))
            d.line(bar, fill=HAIRCLIP_RGB, width=width(0.018))
    elif c.accessory == "star hairpin":  # a five-pointed star on the bangs, viewer's left
        x, y, outer, inner = -0.12, -0.12, 0.08, 0.035
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5  # alternate outer and inner corners, first point up
        radii = [outer if i % 2 == 0 else inner for i in range(10)]
        d.polygon([pt(x + r * np.cos(a), y + r * np.sin(a)) for a, r in zip(angles, radii)], fill=STAR_RGB,
                  outline=shade(STAR_RGB, HAIR_SHADE), width=width(0.006))


def sample(index, seed=0, size=64, widened=False):
    """Image `index` of the dataset `seed`: (image, caption, character), the same for the same numbers.
    `widened` draws from widened_character instead of the default distribution."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
    character = (widened_character if widened else random_character)(rng)
    return draw(character, size, rng), caption(character), character


def write_dataset(folder, count, seed=0, size=64, widened=False):
    """Write NNNNN.png with its caption in NNNNN.txt for the first `count` samples; pairs already there
    are kept. Each file is written under a temporary name then renamed, so an interrupted run leaves no
    half files. Returns the indices written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for index in range(count):
        png, txt = folder / f"{index:05d}.png", folder / f"{index:05d}.txt"
        if png.exists() and txt.exists():
            continue
        image, text, _ = sample(index, seed, size, widened)
        # The caption goes first: an image without its .txt would be read with the folder's default prompt.
        tmp = folder / f".{txt.name}.tmp"
        tmp.write_text(text + "\n")
        os.replace(tmp, txt)
        tmp = folder / f".{png.name}.tmp"
        image.save(tmp, format="PNG")
        os.replace(tmp, png)
        written.append(index)
    return written
