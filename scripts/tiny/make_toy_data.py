"""Write deterministic toy media and captions in the NExT-GPT data layouts (default: data/toy/).

    T_X_pair_data/cc3m/      cc3m.json (caption, id, image_name), cc3m_comprehension.json, cc3m_generation.json,
                             images/*.jpg       coloured shapes on backgrounds    "a red circle on a blue background"
    T_X_pair_data/webvid/    webvid.json (caption, id, video_name) + the two derived files, videos/*.mp4 (mpeg4)
                                                a shape crossing the frame        "a green square moving left"
    T_X_pair_data/audiocap/  audiocap.json (audio_id, audio_name, caption) + derived files, audios/*.wav
                                                48 kHz stereo tones               "a high rising tone"
    IT_data/T-T+X_data/      {image,video,audio}_t2x.json (legacy: mm_name, conversation, output_modality) and
                             {image,video,audio}_instruction_tuning.json (new: *_captions, *_caption_embeddings,
                             conversations); both name the pair media above, so one caption-embedding cache serves
    IT_data/T+X-T_data/      llava/llava.json + llava/images/ (image questions), alpaca/alpaca.json (text only)
    IT_data/MosIT_data/      mosit_instruction_tuning.json + images/ videos/ audios/ (multi-turn, modality switching)
    .complete                written last: counts of everything above

Formats follow the released NExT-GPT data files (field names and nesting). The
T_X_pair_data and IT_data trees are each written under a temporary name and renamed when complete; other
folders under --out (caption embeddings, ImageBind features) are left alone.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from tiny import toyworld as toy
from nextgpt import cli
from nextgpt.io import atomic_dir, atomic_write_text

PAIR_SETS = {"image": "cc3m", "video": "webvid", "audio": "audiocap"}    # modality -> T_X_pair_data folder


def trained_on(captions: list[tuple]) -> list[tuple]:
    """The image / video captions without the colour x shape combinations held out of all toy training."""
    return [row for row in captions if not toy.held_out(row[1], row[2])]


def _pick(items: list, count: int, rng: random.Random) -> list:
    """`count` items in a seeded order, cycling through reshuffles when count > len(items)."""
    out: list = []
    while len(out) < count:
        batch = list(items)
        rng.shuffle(batch)
        out += batch[: count - len(out)]
    return out


def _dump(path: Path, records: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=4, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# Media writers: one file per call; numpy / PIL / soundfile / PyAV load inside.

def write_jpg(path: Path, image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="JPEG", quality=92)


def write_wav(path: Path, wave, rate: int) -> None:
    import soundfile

    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), wave, rate, subtype="PCM_16", format="WAV")


def write_mp4(path: Path, frames, fps: int) -> None:
    """(F, H, W, 3) uint8 -> mp4 (MPEG-4 Part 2, yuv420p). FFmpeg's own mpeg4 encoder gives the same bytes on every
    run; libx264 (what WebVid uses) was seen to vary between runs here, which would break the determinism."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = 1_000_000         # more than 64x64 frames need: the quantiser stays at its finest
        stream.thread_count = 1
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


class Media:
    """Render-and-write of one toy medium of each modality, with a per-file random jitter."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def image(self, path: Path, color: str, shape: str, background: str) -> None:
        jitter = (self.rng.random(), self.rng.random(), self.rng.random())
        write_jpg(path, toy.render_image(color, shape, background, jitter))

    def video(self, path: Path, color: str, shape: str, direction: str) -> None:
        write_mp4(path, toy.render_video(color, shape, direction, jitter=self.rng.random()), toy.VIDEO_FPS)

    def audio(self, path: Path, pitch: str, pattern: str) -> None:
        write_wav(path, toy.render_tone(pitch, pattern, phase=self.rng.random()), toy.AUDIO_RATE)


# ----------------------------------------------------------------------------------------------------------------
# T_X_pair_data

def pair_items(counts: dict[str, int], rng: random.Random) -> dict[str, list[dict]]:
    """modality -> [{name, caption, attrs, record}]; record: the raw pair-JSON record (cc3m.json: image_name,
    caption)."""
    items: dict[str, list[dict]] = {}
    for i, (caption, *attrs) in enumerate(_pick(trained_on(toy.image_captions()), counts["image"], rng)):
        ident = f"{i:09d}"                                   # cc3m ids are zero-padded strings
        items.setdefault("image", []).append(dict(name=f"{ident}.jpg", caption=caption, attrs=attrs, record={
            "caption": caption, "id": ident, "image_name": f"{ident}.jpg"}))
    for i, (caption, *attrs) in enumerate(_pick(trained_on(toy.video_captions()), counts["video"], rng)):
        name = f"{i:08d}.mp4"                                # webvid: int id, zero-padded file name
        items.setdefault("video", []).append(dict(name=name, caption=caption, attrs=attrs, record={
            "caption": caption, "id": 100000 + i, "video_name": name}))
    for i, (caption, *attrs) in enumerate(_pick(toy.audio_captions(), counts["audio"], rng)):
        audio_id = 1000 + i                                  # audiocap: int id = file stem
        items.setdefault("audio", []).append(dict(name=f"{audio_id}.wav", caption=caption, attrs=attrs, record={
            "audio_id": audio_id, "audio_name": f"{audio_id}.wav", "caption": caption}))
    return items


def write_pairs(root: Path, items: dict[str, list[dict]], media: Media) -> None:
    from nextgpt.modalities import MODALITIES

    for modality, entries in items.items():
        spec = MODALITIES[modality]
        folder = root / PAIR_SETS[modality]
        for item in entries:
            getattr(media, modality)(folder / spec.media_folder / item["name"], *item["attrs"])
        _dump(folder / f"{PAIR_SETS[modality]}.json", [item["record"] for item in entries])
        # encoder side: "<image>\n<question>" -> caption (§4.3)
        _dump(folder / f"{PAIR_SETS[modality]}_comprehension.json", [
            {spec.input_key: item["name"], "conversations": [
                {"from": "human", "value": f"{spec.placeholder}\n{toy.comprehension_prompt(modality, k)}"},
                {"from": "gpt", "value": item["caption"]}]}
            for k, item in enumerate(entries)])
        # decoder side: request + caption -> response + placeholder, with the caption-embedding file name (§4.3)
        _dump(folder / f"{PAIR_SETS[modality]}_generation.json", [
            {spec.output_key: item["name"], spec.captions_key: item["caption"],
             spec.embeddings_key: f"{item['name']}.npy", "conversations": [
                {"from": "human", "value": toy.generation_prompt(modality, item["caption"], k)},
                {"from": "gpt", "value": f"{toy.response(modality, k)} {spec.placeholder}"}]}
            for k, item in enumerate(entries)])


# ----------------------------------------------------------------------------------------------------------------
# IT_data

def t2x_records(modality: str, entries: list[dict]) -> tuple[list[dict], list[dict]]:
    """(legacy *_t2x.json records, new *_instruction_tuning.json records) for text -> text + `modality`.

    Both name the pair media (mm_name / *_caption_embeddings), so their caption embeddings are the pair data's.
    Every third record opens with a chat turn, so later-turn templates are exercised."""
    from nextgpt.modalities import MODALITIES

    spec = MODALITIES[modality]
    legacy, new = [], []
    for k, item in enumerate(entries):
        opener = toy.CHAT_OPENERS[k % len(toy.CHAT_OPENERS)] if k % 3 == 0 else None
        request = toy.generation_prompt(modality, item["caption"], k + 1)
        answer = toy.response(modality, k + 1)
        turns = []
        if opener:
            turns += [{"from": "human", "value": opener[0], "input_modality": "text"},
                      {"from": "gpt", "value": opener[1], "caption": "", "output_modality": "text"}]
        legacy.append({"mm_name": item["name"], "output_modality": modality, "conversation": turns + [
            {"from": "human", "value": request, "input_modality": "text"},
            {"from": "gpt", "value": answer, "caption": item["caption"], "output_modality": modality}]})
        new.append({spec.captions_key: [item["caption"]], spec.embeddings_key: [f"{item['name']}.npy"],
                    "conversations": turns + [
                        {"from": "human", "value": request, "input_modality": "text"},
                        {"from": "gpt", "value": f"{answer} {spec.placeholder}", "caption": item["caption"],
                         "output_modality": modality}],
                    "source_data": {"dataset": PAIR_SETS[modality], "name": item["name"]}})
    return legacy, new


def llava_records(folder: Path, count: int, media: Media, rng: random.Random) -> list[dict]:
    """Legacy llava.json (§4.4): image_name + conversation; first human turn input_modality image with <image>."""
    records = []
    for i, (caption, color, shape, background) in enumerate(_pick(trained_on(toy.image_captions()), count, rng)):
        name = f"{i:012d}.jpg"                               # COCO-style names
        media.image(folder / "images" / name, color, shape, background)
        questions = rng.sample(toy.image_questions(color, shape, background), 2)
        turns = []
        for t, (question, answer) in enumerate(questions):
            turns += [{"from": "human", "value": f"<image>\n{question}" if t == 0 else question,
                       "input_modality": "image" if t == 0 else "text"},
                      {"from": "gpt", "value": answer, "caption": "", "output_modality": "text"}]
        records.append({"image_name": name, "output_modality": "text", "conversation": turns})
    return records


def alpaca_records() -> list[dict]:
    """Legacy alpaca.json (§4.4): text only; image_name is the original's dummy."""
    return [{"image_name": "00000000000", "output_modality": "text", "conversation": [
        {"from": "human", "value": question, "input_modality": "text"},
        {"from": "gpt", "value": answer, "caption": "", "output_modality": "text"}]}
        for question, answer in toy.text_qa()]


def _describe(modality: str, attrs: list[str]) -> str:
    if modality == "image":
        color, shape, background = attrs
        return f"It shows a {color} {shape} on a {background} background."
    if modality == "video":
        color, shape, direction = attrs
        return f"A {color} {shape} is moving {direction}."
    pitch, pattern = attrs
    return f"I hear a {pitch} {pattern} tone."


def mosit_records(folder: Path, count: int, media: Media, rng: random.Random) -> list[dict]:
    """mosit_instruction_tuning.json (§4.4 new layout): two turns; the first describes an input medium (or makes
    one from text), the second makes a medium of another modality. One input medium and one output per gpt turn,
    the media named like the original (mosit_i_/mosit_v_/mosit_a_ + record + index)."""
    from nextgpt.modalities import MODALITIES

    pools = {"image": trained_on(toy.image_captions()), "video": trained_on(toy.video_captions()),
             "audio": toy.audio_captions()}
    letters = {"image": "i", "video": "v", "audio": "a"}
    modalities = list(MODALITIES)
    records = []
    for k in range(count):
        first, second = modalities[k % 3], modalities[(k + 1 + k // 3) % 3]
        if first == second:
            second = modalities[(k + 2) % 3]
        record: dict = {}
        turns: list[dict] = []
        for t, modality in enumerate((first, second)):
            spec = MODALITIES[modality]
            caption, *attrs = rng.choice(pools[modality])
            name = f"mosit_{letters[modality]}_{k:07d}_{t:02d}{spec.extensions[0]}"
            getattr(media, modality)(folder / spec.media_folder / name, *attrs)
            if t == 0 and k % 2 == 0:        # describe an input medium
                record[spec.input_key] = [name]
                turns += [{"from": "human", "value": f"{spec.placeholder}\n{toy.comprehension_prompt(modality, k)}"},
                          {"from": "gpt", "value": _describe(modality, attrs)}]
                continue
            record.setdefault(spec.captions_key, []).append(caption)
            record.setdefault(spec.embeddings_key, []).append(f"{name}.npy")
            turns += [{"from": "human", "value": toy.generation_prompt(modality, caption, k + t)},
                      {"from": "gpt", "value": f"{toy.response(modality, k + t)} {spec.placeholder}"}]
        record["conversations"] = turns
        records.append(record)
    return records


# ----------------------------------------------------------------------------------------------------------------

def build(out: Path, counts: dict[str, int], seed: int = 0, log=print) -> dict[str, int]:
    """Write the whole toy tree under `out`; returns the counts written (also stored in out/.complete)."""
    rng = random.Random(seed)
    media = Media(random.Random(seed + 1))
    (out / ".complete").unlink(missing_ok=True)
    items = pair_items(counts, rng)
    with atomic_dir(out / "T_X_pair_data") as tmp:
        write_pairs(tmp, items, media)
    log(f"[toy] pairs: {', '.join(f'{len(v)} {k}' for k, v in items.items())} -> {out / 'T_X_pair_data'}")
    with atomic_dir(out / "IT_data") as tmp:
        t2x = tmp / "T-T+X_data"
        for modality, entries in items.items():
            legacy, new = t2x_records(modality, entries)
            _dump(t2x / f"{modality}_t2x.json", legacy)
            _dump(t2x / f"{modality}_instruction_tuning.json", new)
        tx2t = tmp / "T+X-T_data"
        _dump(tx2t / "llava" / "llava.json", llava_records(tx2t / "llava", counts["llava"], media, rng))
        _dump(tx2t / "alpaca" / "alpaca.json", alpaca_records())
        mosit = tmp / "MosIT_data"
        _dump(mosit / "mosit_instruction_tuning.json", mosit_records(mosit, counts["mosit"], media, rng))
    log(f"[toy] instructions: t2x / instruction_tuning, llava {counts['llava']}, alpaca {len(toy.text_qa())}, "
        f"mosit {counts['mosit']} -> {out / 'IT_data'}")
    summary = {**counts, "alpaca": len(toy.text_qa()), "seed": seed}
    atomic_write_text(out / ".complete", json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/toy", help="output folder (default: data/toy)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=int, default=48, help="cc3m-style images (default 48)")
    p.add_argument("--videos", type=int, default=24, help="webvid-style videos (default 24)")
    p.add_argument("--audios", type=int, default=12, help="audiocap-style wavs (default 12)")
    p.add_argument("--llava", type=int, default=16, help="LLaVA-style image conversations (default 16)")
    p.add_argument("--mosit", type=int, default=12, help="MosIT conversations (default 12)")
    args = p.parse_args(argv)
    counts = dict(image=args.images, video=args.videos, audio=args.audios, llava=args.llava, mosit=args.mosit)
    bad = [k for k, v in counts.items() if v < 1]
    if bad:
        print(f"error: counts must be at least 1: {', '.join(bad)}", file=sys.stderr)
        return 2

    def body() -> int:
        build(Path(args.out), counts, args.seed)
        print(f"[toy] done -> {args.out}")
        return 0

    return cli.run(body, "make_toy_data")  # any failure: one `error:` line (exit 2), the traceback in a log


if __name__ == "__main__":
    raise SystemExit(main())
