"""Generation checks during training: their media go to TensorBoard. (The emission rate they add to the held-out
evaluation, on the tiny model: tests/e2e/test_generation_checks.py.)"""

from __future__ import annotations

import numpy as np

from nextgpt.eval import training as T
from nextgpt.model.decoders import Decoded


def test_media_go_to_tensorboard(tmp_path):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    checks = T.GenerationChecks.__new__(T.GenerationChecks)
    checks.pending = [
        ("generate/image_0", Decoded("image", Image.new("RGB", (16, 16), (200, 10, 10))), 0.25),
        ("generate/audio_0", Decoded("audio", np.sin(np.linspace(0, 100, 1600)).astype(np.float32), rate=16000), None),
        ("generate/video_0", Decoded("video", np.zeros((4, 16, 16, 3), np.uint8), rate=8.0), 0.5)]
    checks.write_media(writer, step=3)
    writer.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0, "audio": 0, "tensors": 0}).Reload()
    tags = events.Tags()
    assert {"generate/image_0", "generate/video_0"} <= set(tags["images"]) and "generate/audio_0" in tags["audio"]
    video = events.Images("generate/video_0")[0]
    assert video.step == 3 and video.encoded_image_string[:6] == b"GIF89a" and (video.width, video.height) == (16, 16)
    assert events.Audio("generate/audio_0")[0].sample_rate == 16000
    assert checks.pending == []
