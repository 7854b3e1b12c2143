"""What train.py's held-out evaluation adds to the teacher-forced loss (train.eval_every; train.eval_generate):
the emission rate of greedy replies to held-out requests, and with train.eval_generate = N decoded media, their
ImageBind score and the media for TensorBoard. The requests and the scoring are eval/run.py's."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable, Sequence

import torch

from nextgpt.eval.run import FeatureMemo, Item, Options, build_items, evaluate_model

# Requests per requested modality (and per "text") that train.py's held-out evaluation generates for the emission
# rate: enough to see it move, few enough that an evaluation costs seconds on the tiny models.
TRAINING_REQUESTS = 8


class GenerationChecks:
    """What train.py's held-out evaluation adds: the emission rate on up to TRAINING_REQUESTS held-out requests per
    requested modality, and with train.eval_generate = N, N fixed generation requests per modality decoded, their
    ImageBind score, and the media for TensorBoard (write_media).

    Every rank runs the same greedy generation (no collective inside, so ZeRO-3 and ranks without data work alike);
    only the caller's main rank writes."""

    def __init__(self, cfg, datasets: Sequence, log: Callable[[str], None] = print):
        self.cfg, self.log = cfg, log
        sets = {d.name: d for d in datasets if len(d)}
        items = build_items(cfg, sets) if sets else []
        self.items: list[Item] = []
        per_kind: dict[str, int] = {}
        for item in items:
            if per_kind.get(item.requested, 0) < TRAINING_REQUESTS:
                per_kind[item.requested] = per_kind.get(item.requested, 0) + 1
                self.items.append(item)
        self.decoders = self.scorer = None
        self.features = FeatureMemo()           # the requests' input media, encoded at the first evaluation only
        self.pending: list[tuple[str, object, float | None]] = []

    def _media_tools(self, device, dtype) -> None:
        if self.decoders is not None:
            return
        from nextgpt.eval.embedders import ImageBindScorer
        from nextgpt.model.decoders import Decoders

        cfg = self.cfg
        self.decoders = Decoders(cfg, device=device, dtype=dtype, seed=cfg.train.seed)
        if "image" in cfg.model.decoders:
            self.scorer = ImageBindScorer(cfg.path(cfg.model.imagebind), cfg.model.imagebind_preset,
                                          cfg.path(cfg.model.decoders["image"]) / "tokenizer", device=device,
                                          dtype=dtype)

    def run(self, model, step: int) -> dict[str, float]:
        """-> {"emission.<modality>": rate, "emission.text": rate, "imagebind.<modality>": mean score}."""
        if not self.items:
            return {}
        options = Options(seed=self.cfg.train.seed, batch_size=8, decode=self.cfg.train.eval_generate,
                          progress=False)
        if options.decode:
            self._media_tools(model.device, next(model.output_proj.parameters()).dtype)
        self.features.attach(model)
        # generation seeds torch's generators: keep training's random streams (dropout, sampling) as they were
        device = model.device
        cuda = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=cuda), tempfile.TemporaryDirectory() as tmp:
                result, records = evaluate_model(model, self.items, self.cfg, options, media_dir=Path(tmp),
                                                 decoders=self.decoders if options.decode else None,
                                                 scorer=self.scorer)
        finally:
            self.features.detach(model)
        self.pending = [(f"generate/{item.requested}_{n}", record["decoded"], record.get("imagebind"))
                        for n, (item, record) in enumerate(zip(self.items, records)) if "decoded" in record]
        return result

    def write_media(self, writer, step: int) -> None:
        """The media of the last run() to a TensorBoard SummaryWriter (images, audio, videos as animated GIFs)."""
        if writer is None:
            return
        for tag, decoded, score in self.pending:
            add_media(writer, tag, decoded, step, caption=None if score is None else f"ImageBind score {score:.3f}")
        self.pending = []


def add_media(writer, tag: str, decoded, step: int, caption: str | None = None) -> None:
    """One decoded medium to TensorBoard: add_image (HWC), add_audio, and for video the animated-GIF image summary
    that add_video writes (made with PIL here: add_video itself needs moviepy 1.x's editor module)."""
    import io

    import numpy as np

    if decoded.modality == "image":
        writer.add_image(tag, np.asarray(decoded.data.convert("RGB")), step, dataformats="HWC")
    elif decoded.modality == "audio":
        writer.add_audio(tag, torch.from_numpy(np.clip(decoded.data, -1, 1)).float(), step,
                         sample_rate=int(decoded.rate))
    else:
        from PIL import Image
        from tensorboard.compat.proto.summary_pb2 import Summary

        frames = [Image.fromarray(frame) for frame in decoded.data]            # (F, H, W, 3) uint8
        buffer = io.BytesIO()
        frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:],
                       duration=int(1000 / max(decoded.rate, 1)), loop=0)
        height, width = decoded.data.shape[1:3]
        image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=buffer.getvalue())
        writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)
    if caption:
        writer.add_text(tag + "/score", caption, step)
