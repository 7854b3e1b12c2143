"""The toy world of the demo and the tests: captions a tiny model can learn, the words of every template, and the
renderers that turn a caption's attributes into media.

Images are coloured shapes on a background, videos a shape moving in a direction, audio a tone of some pitch
and pattern. `scripts/tiny/make_toy_data.py` writes them in the NExT-GPT layouts; `scripts/tiny/make_tiny_ckpt.py` trains
the tiny tokenizers on `tokenizer_corpus()`. Importing this module does no work (numpy / PIL load in the
renderers).
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
VIDEO_BACKGROUND = (20, 20, 30)

IMAGE_SIZE = 64             # px, square
VIDEO_SIZE = 64             # px, square (even: h264 needs even sides)
VIDEO_FPS = 8
VIDEO_SECONDS = 2.0
AUDIO_RATE = 48000          # Hz, stereo PCM-16 like the AudioCaps wavs (ImageBind resamples to 16 kHz)
AUDIO_SECONDS = 2.0


# Colour x shape combinations no toy training ever shows (toy data for the stages, the decoders' training media):
# the judged evaluation reports them apart, as a test of composition (scripts/tiny/judge_eval.py).
HELD_OUT = (("red", "triangle"), ("blue", "circle"), ("yellow", "square"))


def held_out(color: str, shape: str) -> bool:
    return (color, shape) in HELD_OUT


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


# ----------------------------------------------------------------------------------------------------------------
# Conversation templates (our own wording, in the roles of the original's prepare_data.py templates, §4.3).
# "{}" is the modality noun.

NOUNS = {"image": "image", "video": "video", "audio": "audio"}
COMPREHENSION_PROMPTS = ("What is the {} about?", "Describe the {}.", "Give me a summary of the {}.",
                         "What does the {} show?", "Tell me about the {}.", "Summarize the {}.")
# "{}" is a noun for the output with its article; the caption follows
GENERATION_PROMPTS = ("Can you show me {} of ", "Please generate {} of ", "I would like you to make {} of ",
                      "Create {} of ", "Show me {} of ")
GENERATION_NOUNS = {"image": ("a picture", "an image"), "video": ("a video", "a clip"),
                    "audio": ("a sound", "an audio clip")}
RESPONSES = ("Sure thing!", "Here is {} for your reference.", "Of course! Here it is.", "Here is {} for you.")
CHAT_OPENERS = (("Hello, how are you?", "I am fine, thank you. What can I do for you?"),
                ("What can you do?", "I can describe images, videos and sounds, and I can make them too."))


def comprehension_prompt(modality: str, k: int) -> str:
    return COMPREHENSION_PROMPTS[k % len(COMPREHENSION_PROMPTS)].format(NOUNS[modality])


def generation_prompt(modality: str, caption: str, k: int) -> str:
    nouns = GENERATION_NOUNS[modality]
    return GENERATION_PROMPTS[k % len(GENERATION_PROMPTS)].format(nouns[k % len(nouns)]) + caption


def response(modality: str, k: int) -> str:
    return RESPONSES[k % len(RESPONSES)].format(GENERATION_NOUNS[modality][0])


def image_questions(color: str, shape: str, background: str) -> list[tuple[str, str]]:
    """(question, answer) pairs about one image, for LLaVA-style T+X->T data."""
    return [("What shape is in the image?", f"A {shape}."),
            ("What colour is the shape?", f"It is {color}."),
            ("What colour is the background?", f"The background is {background}."),
            ("Describe the image.", f"A {color} {shape} on a {background} background.")]


NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def text_qa() -> list[tuple[str, str]]:
    """Text-only instruction pairs (Alpaca-style T->T data) about the toy world and small sums."""
    qa = [("Name a shape with three sides.", "A triangle has three sides."),
          ("Name a shape with four equal sides.", "A square has four equal sides."),
          ("Which shape is round?", "A circle is round."),
          ("Which tone is higher, a low tone or a high tone?", "A high tone is higher."),
          ("What colour do you get when you mix red and blue?", "You get purple."),
          ("What colour do you get when you mix blue and yellow?", "You get green."),
          ("Tell me a joke.", "Why did the circle stop? It was tired of going round."),
          ("List the colours you know.", "Red, green, blue, yellow, purple and white.")]
    for a, b in itertools.product(range(1, 5), range(1, 5)):
        qa.append((f"What is {NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]}?", f"{NUMBER_WORDS[a]} plus "
                   f"{NUMBER_WORDS[b]} is {NUMBER_WORDS[a + b]}.".capitalize()))
    return qa


# Words of the templates above plus the prompt template, so the tiny tokenizers know them as pieces.
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
    lines += TEMPLATE_TEXT + [p.format(n) for p in COMPREHENSION_PROMPTS for n in NOUNS.values()]
    lines += [p.format(n) for p in GENERATION_PROMPTS for ns in GENERATION_NOUNS.values() for n in ns]
    lines += [r.format(ns[0]) for r in RESPONSES for ns in GENERATION_NOUNS.values()]
    lines += [t for pair in CHAT_OPENERS for t in pair] + [t for pair in text_qa() for t in pair]
    lines += [t for pair in image_questions("red", "circle", "blue") for t in pair]
    return lines


# ----------------------------------------------------------------------------------------------------------------
# Renderers. `jitter` in [0, 1) moves / resizes the shape a little, so two media with one caption differ.

def _shape_box(center: tuple[float, float], radius: float) -> tuple[float, float, float, float]:
    x, y = center
    return x - radius, y - radius, x + radius, y + radius


def _draw_shape(draw, shape: str, center: tuple[float, float], radius: float, fill: tuple[int, int, int]) -> None:
    box = _shape_box(center, radius)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        x, y = center
        draw.polygon([(x, y - radius), (x + radius, y + radius), (x - radius, y + radius)], fill=fill)
    else:
        raise ValueError(f"unknown toy shape {shape!r}; known: {', '.join(SHAPES)}")


def render_image(color: str, shape: str, background: str, jitter: tuple[float, float, float] = (0.5, 0.5, 0.5),
                 size: int = IMAGE_SIZE):
    """PIL RGB image (size x size): a `color` `shape` on a `background` background."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), BACKGROUNDS[background])
    radius = size * (0.22 + 0.1 * jitter[2])
    margin = radius + 2
    center = (margin + (size - 2 * margin) * jitter[0], margin + (size - 2 * margin) * jitter[1])
    _draw_shape(ImageDraw.Draw(image), shape, center, radius, COLORS[color])
    return image


def render_video(color: str, shape: str, direction: str, jitter: float = 0.5, size: int = VIDEO_SIZE,
                 fps: int = VIDEO_FPS, seconds: float = VIDEO_SECONDS):
    """uint8 frames (F, size, size, 3): a `color` `shape` crossing the frame towards `direction`."""
    import numpy as np
    from PIL import Image, ImageDraw

    if direction not in DIRECTIONS:
        raise ValueError(f"unknown toy direction {direction!r}; known: {', '.join(DIRECTIONS)}")
    count = max(2, round(fps * seconds))
    radius = size * 0.15
    start, end = radius + 2, size - radius - 2
    across = start + (end - start) * jitter           # the coordinate that stays fixed
    frames = []
    for i in range(count):
        t = i / (count - 1)
        along = {"right": start + (end - start) * t, "left": end - (end - start) * t,
                 "down": start + (end - start) * t, "up": end - (end - start) * t}[direction]
        center = (along, across) if direction in ("left", "right") else (across, along)
        frame = Image.new("RGB", (size, size), VIDEO_BACKGROUND)
        _draw_shape(ImageDraw.Draw(frame), shape, center, radius, COLORS[color])
        frames.append(np.asarray(frame))
    return np.stack(frames)


def render_tone(pitch: str, pattern: str, rate: int = AUDIO_RATE, seconds: float = AUDIO_SECONDS,
                channels: int = 2, phase: float = 0.0):
    """float32 waveform (samples, channels) in [-1, 1]: a sine at `pitch` following `pattern`."""
    import numpy as np

    if pattern not in PATTERNS:
        raise ValueError(f"unknown toy pattern {pattern!r}; known: {', '.join(PATTERNS)}")
    t = np.arange(int(rate * seconds)) / rate
    base = PITCHES[pitch]
    if pattern == "rising":        # one octave up, exponential sweep: phase = integral of frequency
        frequency_ratio = 2.0 ** (t / seconds)
        angle = 2 * np.pi * base * seconds / np.log(2) * (frequency_ratio - 1)
    elif pattern == "falling":     # one octave down
        frequency_ratio = 2.0 ** (-t / seconds)
        angle = 2 * np.pi * base * seconds / np.log(2) * (1 - frequency_ratio)
    else:
        angle = 2 * np.pi * base * t
    wave = 0.5 * np.sin(angle + 2 * np.pi * phase)
    if pattern == "beeping":       # 4 beeps per second, half on; 5 ms ramps so the beeps do not click
        gate = (np.floor(t * 8) % 2 == 0).astype(np.float64)
        ramp = max(1, int(0.005 * rate))
        wave *= np.convolve(gate, np.full(ramp, 1.0 / ramp), mode="same")
    fade = np.minimum(1.0, np.minimum(t, seconds - t) / 0.01)    # 10 ms fades: no clicks at the ends
    wave = (wave * fade).astype(np.float32)
    return np.repeat(wave[:, None], channels, axis=1)
