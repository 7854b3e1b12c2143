"""The toy world of the demo and the tests: captions a tiny model can learn, and the words of every template.

Images are coloured shapes on a background, videos a shape moving in a direction, audio a tone of some pitch
and pattern. `scripts/make_toy_data.py` renders them; `scripts/make_tiny_ckpt.py` trains the tiny tokenizer on
`tokenizer_corpus()`.
"""

from __future__ import annotations

import itertools

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40),
          "purple": (150, 60, 190), "white": (240, 240, 240)}
BACKGROUNDS = {"black": (10, 10, 10), "gray": (128, 128, 128), "white": (245, 245, 245), "blue": (30, 40, 120)}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down")
PITCHES = {"low": 220.0, "middle": 440.0, "high": 880.0}
PATTERNS = ("steady", "rising", "falling", "beeping")


def image_captions() -> list[tuple[str, str, str, str]]:
    """[(caption, color, shape, background)] — every combination whose colours differ."""
    out = []
    for color, shape, bg in itertools.product(COLORS, SHAPES, BACKGROUNDS):
        if color != bg:
            out.append((f"a {color} {shape} on a {bg} background", color, shape, bg))
    return out


def video_captions() -> list[tuple[str, str, str, str]]:
    """[(caption, color, shape, direction)]"""
    return [(f"a {color} {shape} moving {d}", color, shape, d)
            for color, shape, d in itertools.product(COLORS, SHAPES, DIRECTIONS)]


def audio_captions() -> list[tuple[str, str, str]]:
    """[(caption, pitch, pattern)]"""
    return [(f"a {p} {pat} tone", p, pat) for p, pat in itertools.product(PITCHES, PATTERNS)]


# Words of the instruction / conversation templates the toy data uses (make_toy_data) and the prompt template.
TEMPLATE_TEXT = [
    "### Human: <Img> </Img> generate a caption\n### Assistant: ",
    "What is the image about? What is the video trying to convey? Could you encapsulate the essence of the audio?",
    "Can you show me a picture of", "Please generate a video of", "I would like you to make a sound of",
    "Sure thing! Here is an image for you.", "Here is a video for your reference.", "Here is a sound for you.",
    "Describe the image.", "What do you hear?", "Tell me a joke.", "Hello, how are you? I am fine, thank you.",
    "the a an of on in is are and to for you me it this that what which with",
]


def tokenizer_corpus() -> list[str]:
    lines = [c for c, *_ in image_captions()] + [c for c, *_ in video_captions()] + [c for c, *_ in audio_captions()]
    return lines + TEMPLATE_TEXT
