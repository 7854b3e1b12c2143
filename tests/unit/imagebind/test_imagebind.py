"""ImageBind: architecture / key layout, strict loading, parity with the original, preprocessing fidelity, media
errors, the Encoder, the feature cache and the benchmark script.

Fixtures from ../shared/reference (parity weights, the huge key table, the original pipeline's outputs) and the
samples in ../shared/samples/nextgpt are used when present; those tests skip with the reason otherwise. Everything
else runs on media generated here.
"""

from __future__ import annotations

import json
import re
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from nextgpt.imagebind import preprocess, preprocess_audio, preprocess_video
from nextgpt.imagebind.encode import Encoder
from nextgpt.imagebind.features import write_feature_cache
from nextgpt.imagebind.model import ImageBindModel, load_imagebind, preset, select_state_dict
from nextgpt.imagebind.preprocess import MediaError

REPO = Path(__file__).resolve().parents[3]
SHARED = (REPO.parent / "shared").resolve()          # ../shared may be a symlink; code resolves paths
REFERENCE = SHARED / "reference"
SAMPLES = SHARED / "samples" / "nextgpt" / "T_X_pair_data"
PARITY = REFERENCE / "imagebind_tiny_parity.safetensors"
PREPROCESS_FIXTURE = REFERENCE / "imagebind_preprocess_fixture.safetensors"
KEY_TABLE = REFERENCE / "imagebind_huge_keys.tsv"
SAMPLE_FOLDERS = {"image": SAMPLES / "cc3m" / "images", "audio": SAMPLES / "audiocap" / "audios",
                  "video": SAMPLES / "webvid" / "videos"}
SHAPES = {"image": (3, 224, 224), "audio": (3, 1, 128, 204), "video": (15, 3, 2, 224, 224)}
LOADERS = {"image": preprocess.load_image, "audio": preprocess_audio.load_audio, "video": preprocess_video.load_video}
SKIPPED = re.compile(r"\.(depth|thermal|imu)\.")


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} absent (the shared reference fixtures / samples are not checked out beside the repo)")
    return path


def fixture_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(need(path)), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def parity_inputs(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[str, torch.Tensor]]:
    # Fixture input names -> (ImageBind tower, input): images and videos both go through the vision tower.
    tower = {"image": "vision", "video": "vision", "audio": "audio", "text": "text"}
    return {k[len("input."):]: (tower[k[len("input."):]], v) for k, v in tensors.items() if k.startswith("input.")}


# ------------------------------------------------------------------------------------------------ generated media


def write_video(path: Path, width: int, height: int, frames: int, fps: int = 10, faststart: bool = False) -> Path:
    import av

    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index in range(frames):
            frame = np.zeros((height, width, 3), np.uint8)
            frame[:, (4 * index) % width:(4 * index) % width + 8] = (255, 128, 0)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, list[Path]]:
    """Small valid files: 3 images, 2 wavs (44.1 kHz stereo 3 s; 16 kHz mono 1 s), 2 videos (landscape 4 s;
    portrait 1.5 s, shorter than a clip)."""
    import soundfile
    from PIL import Image

    folder = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    images = []
    for index, size in enumerate([(64, 48), (40, 90), (300, 300)]):
        path = folder / f"image_{index}.jpg"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        images.append(path)
    audios = []
    for index, (rate, seconds, channels) in enumerate([(44100, 3.0, 2), (16000, 1.0, 1)]):
        path = folder / f"audio_{index}.wav"
        samples = 0.2 * rng.standard_normal((int(rate * seconds), channels)).astype(np.float32)
        soundfile.write(path, samples, rate, subtype="PCM_16")
        audios.append(path)
    videos = [write_video(folder / "video_0.mp4", 96, 64, 40), write_video(folder / "video_1.mp4", 48, 80, 15)]
    return {"image": images, "audio": audios, "video": videos}


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from tiny import make_tiny_ckpt

    path = tmp_path_factory.mktemp("ckpt") / "imagebind" / "imagebind_tiny.pth"
    make_tiny_ckpt.write_imagebind(path)
    return path


# ---------------------------------------------------------------------------------------- architecture and loading


def test_tiny_preset_is_the_parity_fixture_config():
    _, metadata = fixture_tensors(PARITY)
    assert json.loads(metadata["config"]) == preset("tiny")
    with pytest.raises(ValueError, match="unknown ImageBind preset 'giant'"):
        preset("giant")


def test_huge_preset_state_dict_equals_the_key_table():
    rows = [line.rstrip("\n").split("\t") for line in need(KEY_TABLE).read_text().splitlines()[1:]]
    table = {key: tuple(int(n) for n in re.findall(r"\d+", shape)) for key, shape, _ in rows}
    assert len(table) == 1311
    with torch.device("meta"):
        model = ImageBindModel(**preset("huge"))
    ours = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert {k: table[k] for k in ours if k in table} == ours            # every name and shape of ours is in the table
    rest = set(table) - set(ours)
    assert rest == {k for k in table if SKIPPED.search(k)}             # the remainder is exactly depth/thermal/imu
    assert len(ours) == 864 and len(rest) == 447
    # reference §5.2: 1,200,781,057 parameters in all; ours is that minus the three skipped towers
    assert sum(p.numel() for p in model.parameters()) == 1_073_097_729


def test_parity_with_the_original_tiny_model():
    tensors, metadata = fixture_tensors(PARITY)
    weights = {k[len("weights."):]: v for k, v in tensors.items() if k.startswith("weights.")}
    model = ImageBindModel(**json.loads(metadata["config"])).eval()
    model.load_state_dict(select_state_dict(model, weights, PARITY), strict=True)
    with torch.no_grad():
        for name, (tower, x) in parity_inputs(tensors).items():
            out = model.encode(tower, x)
            expected = tensors[f"output.{name}"]
            assert out.shape == expected.shape
            assert (out - expected).abs().max().item() <= 1e-5, name
        # audio is only L2-normalised (NExT-GPT skips the x20 scale): one clip gives a unit vector
        single_clip = model.encode("audio", tensors["input.audio"][:, :1])
    assert torch.allclose(single_clip.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_load_imagebind_reads_a_full_checkpoint_strictly(tmp_path):
    tensors, _ = fixture_tensors(PARITY)
    weights = {k[len("weights."):]: v for k, v in tensors.items() if k.startswith("weights.")}
    assert any(SKIPPED.search(k) for k in weights)
    path = tmp_path / "imagebind_tiny_full.pth"
    torch.save(weights, path)
    model = load_imagebind(path, "tiny")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        for name, (tower, x) in parity_inputs(tensors).items():
            assert (model.encode(tower, x) - tensors[f"output.{name}"]).abs().max().item() <= 1e-5, name

    # only vision + audio, in bf16: text entries are skipped too, outputs stay close
    small = load_imagebind(path, "tiny", dtype=torch.bfloat16, modalities=("vision", "audio"))
    assert not any(k.startswith("modality_trunks.text") for k in small.state_dict())
    assert next(small.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        image = small.encode("vision", tensors["input.image"].bfloat16()).float()
    assert (image - tensors["output.image"]).abs().max().item() < 0.05


def test_load_imagebind_errors_list_the_keys(tmp_path, tiny_checkpoint):
    state = torch.load(tiny_checkpoint, weights_only=True)
    cases = {
        "unexpected": ({**state, "modality_trunks.vision.blocks.7.norm_1.weight": torch.zeros(32)},
                       "unexpected: modality_trunks.vision.blocks.7.norm_1.weight"),
        "missing": ({k: v for k, v in state.items() if k != "modality_heads.audio.2.weight"},
                    "missing: modality_heads.audio.2.weight"),
        "shape": ({**state, "modality_heads.vision.2.weight": torch.zeros(16, 33)},
                  "shape mismatch: modality_heads.vision.2.weight (16, 33) (model (16, 32))"),
    }
    for name, (bad, message) in cases.items():
        path = tmp_path / f"{name}.pth"
        torch.save(bad, path)
        with pytest.raises(ValueError, match=re.escape(message)) as error:
            load_imagebind(path, "tiny")
        assert str(error.value).startswith(str(path)), name
    # a depth/thermal/imu entry is skipped, whatever it holds
    path = tmp_path / "with_depth.pth"
    torch.save({**state, "modality_trunks.depth.blocks.0.norm_1.weight": torch.zeros(3)}, path)
    load_imagebind(path, "tiny")
    # not a checkpoint / missing / wrong preset
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint\n")
    with pytest.raises(ValueError, match=re.escape(f"{text}: not a readable torch checkpoint")):
        load_imagebind(text, "tiny")
    with pytest.raises(FileNotFoundError, match="missing"):
        load_imagebind(tmp_path / "absent.pth", "tiny")
    with pytest.raises(ValueError, match="shape mismatch"):
        load_imagebind(tiny_checkpoint, "huge")


def test_tiny_checkpoint_is_seeded_and_loads(tmp_path, tiny_checkpoint):
    from tiny import make_tiny_ckpt

    again = tmp_path / "again.pth"
    make_tiny_ckpt.write_imagebind(again)
    first, second = torch.load(tiny_checkpoint, weights_only=True), torch.load(again, weights_only=True)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    model = load_imagebind(tiny_checkpoint, "tiny")
    with torch.no_grad():
        out = model.encode("vision", torch.randn(2, 15, 3, 2, 224, 224))
    assert out.shape == (2, 16) and torch.isfinite(out).all()


# --------------------------------------------------------------------------------------------------- preprocessing


def test_clip_spans_and_frame_choice_follow_pytorchvideo():
    # ConstantClipsPerVideoSampler: starts k * max(duration - 2, 0) / clips
    assert preprocess.clip_spans(10.0, 2, 3) == [(0, 2), (Fraction(8, 3), Fraction(14, 3)),
                                                 (Fraction(16, 3), Fraction(22, 3))]
    assert preprocess.clip_spans(1.5, 2, 3) == [(0, 2)] * 3
    # 10 s at 25 fps: clip starts 0, 1.6, 3.2, 4.8, 6.4 s; first and last frame of each 2 s clip
    assert preprocess_video.video_frame_indices(250, 25.0) == [[0, 49], [40, 89], [80, 129], [120, 169], [160, 209]]
    # a video shorter than a clip uses all of it, 5 times
    assert preprocess_video.video_frame_indices(15, 10.0) == [[0, 14]] * 5


def test_spatial_crops_follow_the_long_side():
    portrait = torch.arange(300.0).view(1, 1, 300, 1).expand(3, 2, 300, 224)
    tops = [crop[0, 0, 0, 0].item() for crop in preprocess_video.spatial_crops(portrait)]
    assert tops == [0, 38, 76]
    landscape = torch.arange(397.0).view(1, 1, 1, 397).expand(3, 2, 224, 397)
    assert [crop[0, 0, 0, 0].item() for crop in preprocess_video.spatial_crops(landscape)] == [0, 87, 173]


def test_image_matches_the_original():
    tensors, metadata = fixture_tensors(PREPROCESS_FIXTURE)
    for index, name in enumerate(json.loads(metadata["files"])["image"]):
        image = preprocess.load_image(need(SAMPLE_FOLDERS["image"] / name))
        assert (image - tensors["image"][index]).abs().max().item() <= 1e-5, name


def test_fbank_and_resampling_match_the_original():
    tensors, metadata = fixture_tensors(PREPROCESS_FIXTURE)
    melspec = preprocess_audio.waveform_to_melspec(tensors["audio_clip16k"][0])
    assert melspec.shape == (1, 128, 204)
    # measured 1.8e-5 (float32 FFT / summation order)
    assert (melspec - tensors["audio_clip16k_melspec"]).abs().max().item() <= 1e-4
    import soundfile

    name = json.loads(metadata["files"])["audio"][0]
    samples, rate = soundfile.read(need(SAMPLE_FOLDERS["audio"] / name), dtype="float32", always_2d=True)
    resampled = preprocess_audio.resample(np.ascontiguousarray(samples[:, 0]), rate)
    reference = tensors["audio_resampled16k"][0].numpy()
    assert resampled.shape == reference.shape
    # torchaudio's float32 sinc-Hann kernel written in torch: measured 0.0 (soxr HQ: 3.1e-3, resample_poly: 3.9e-3)
    assert np.abs(resampled - reference).max() <= 1e-5


def test_whole_audio_matches_the_original():
    tensors, metadata = fixture_tensors(PREPROCESS_FIXTURE)
    for index, name in enumerate(json.loads(metadata["files"])["audio"]):
        audio = preprocess_audio.load_audio(need(SAMPLE_FOLDERS["audio"] / name))
        difference = (audio - tensors["audio"][index]).abs()
        # measured 0.0 on both files (with soxr instead: max 0.72, mean 0.006, all in the top mel bins)
        assert difference.max().item() <= 1e-5, name
    # from the original's own resampled waveform, the rest of the pipeline is exact
    exact = preprocess_audio.audio_transform(tensors["audio_resampled16k"][0])
    assert (exact - tensors["audio"][0]).abs().max().item() <= 1e-5


def test_video_matches_the_original():
    tensors, metadata = fixture_tensors(PREPROCESS_FIXTURE)
    name = json.loads(metadata["files"])["video"][0]
    video = preprocess_video.load_video(need(SAMPLE_FOLDERS["video"] / name))
    assert video.shape == (15, 3, 2, 224, 224)
    # measured 0.0: PyAV 18.1 picks and converts the same frames as decord did for the original
    assert (video - tensors["video"][0]).abs().max().item() <= 1e-4


def test_generated_media_shapes(media):
    for modality, paths in media.items():
        for path in paths:
            assert tuple(LOADERS[modality](path).shape) == SHAPES[modality], path.name
    # a 1 s clip gives 98 fbank frames; the rest is the zero padding, normalised
    short = preprocess_audio.load_audio(media["audio"][1])
    assert torch.allclose(short[:, :, :, 98:], torch.tensor((0 + 4.268) / 9.138))
    assert not torch.allclose(short[:, :, :, 97], torch.tensor((0 + 4.268) / 9.138))


def test_audio_soundfile_cannot_read_is_decoded_with_pyav(tmp_path):
    import av

    path = tmp_path / "tone.m4a"          # AAC: not a libsndfile format
    seconds = np.arange(44100 * 3) / 44100
    tone = np.stack([0.3 * np.sin(2 * np.pi * 440 * seconds)] * 2).astype(np.float32)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=44100)
        stream.layout = "stereo"
        for start in range(0, tone.shape[1], 1024):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(tone[:, start:start + 1024]), format="fltp",
                                               layout="stereo")
            frame.sample_rate = 44100
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    samples, rate = preprocess_audio.decode_audio(path)
    assert rate == 44100 and samples.shape[1] == 2 and abs(samples.shape[0] - tone.shape[1]) < 4096
    assert 0.25 < np.abs(samples).max() < 0.35
    assert preprocess_audio.load_audio(path).shape == (3, 1, 128, 204)


def _bad_files(folder: Path, media: dict[str, list[Path]]) -> list[tuple[str, Path]]:
    cases = []
    for modality, extension in (("image", ".jpg"), ("audio", ".wav"), ("video", ".mp4")):
        empty = folder / f"empty{extension}"
        empty.write_bytes(b"")
        text = folder / f"notes{extension}"
        text.write_text("this is a text file, not media\n" * 20)
        source = media[modality][0] if modality != "image" else media["image"][2]
        truncated = folder / f"truncated{extension}"
        truncated.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
        cases += [(modality, folder / f"missing{extension}"), (modality, empty), (modality, text),
                  (modality, truncated)]
    # an mp4 with its index first (faststart) opens fine and fails while decoding
    whole = write_video(folder / "faststart.mp4", 96, 64, 60, faststart=True)
    cut = folder / "faststart_truncated.mp4"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    cases.append(("video", cut))
    return cases


def test_bad_media_raise_one_line_errors_naming_the_file(tmp_path, media):
    for modality, path in _bad_files(tmp_path, media):
        with pytest.raises(MediaError) as error:
            LOADERS[modality](path)
        message = str(error.value)
        assert message.startswith(f"{path}: ") and "\n" not in message, message
        assert isinstance(error.value, ValueError)


# ------------------------------------------------------------------------------------------ encoder, feature cache


def test_encoder_batches_match_the_model(media, tiny_checkpoint):
    encoder = Encoder(tiny_checkpoint, "tiny", device="cpu")
    assert encoder.out_dim == 16 and encoder.dtype == torch.float32
    model = load_imagebind(tiny_checkpoint, "tiny")
    for modality, paths in media.items():
        vectors = encoder.encode(paths, modality, batch_size=2)
        assert vectors.shape == (len(paths), 16) and vectors.dtype == torch.float32
        tower = "audio" if modality == "audio" else "vision"
        with torch.no_grad():
            expected = model.encode(tower, torch.stack([LOADERS[modality](p) for p in paths]))
        assert torch.allclose(vectors, expected, atol=1e-5), modality
        assert torch.allclose(encoder.encode(paths, modality, batch_size=1, workers=0), vectors, atol=1e-5)
    assert encoder.encode([], "image").shape == (0, 16)
    with pytest.raises(ValueError, match="unknown modality 'depth'"):
        encoder.encode(media["image"], "depth")


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_feature_cache_writes_skips_and_repairs(tmp_path, media, tiny_checkpoint):
    out = tmp_path / "features"
    items = [(p.name, p) for p in media["image"]]
    assert write_feature_cache(items, "image", out, tiny_checkpoint, "tiny", batch_size=2) == dict(written=3,
                                                                                                   skipped=0)
    manifest = json.loads((out / "manifest.json").read_text())
    section = manifest["modalities"]["image"]          # the one store manifest format (nextgpt/store/)
    assert manifest["kind"] == "imagebind_features" and manifest["store"] == "files"
    assert {k: section[k] for k in ("encoder", "shape", "dtype", "count")} == dict(
        encoder=f"{tiny_checkpoint}#tiny", shape=[16], dtype="float32", count=3)
    encoder = Encoder(tiny_checkpoint, "tiny")
    expected = encoder.encode([p for _, p in items], "image")
    for (name, _), vector in zip(items, expected):
        stored = np.load(out / f"{name}.npy")
        assert stored.shape == (16,) and stored.dtype == np.float32
        assert np.allclose(stored, vector.numpy(), atol=1e-5)

    before = _mtimes(out)
    assert write_feature_cache(items, "image", out, tiny_checkpoint, "tiny") == dict(written=0, skipped=3)
    assert _mtimes(out) == before                                    # second run writes nothing at all

    truncated, garbage = out / f"{items[0][0]}.npy", out / f"{items[1][0]}.npy"
    truncated.write_bytes(truncated.read_bytes()[:60])
    garbage.write_bytes(b"\x00" * 200)
    assert write_feature_cache(items, "image", out, tiny_checkpoint, "tiny") == dict(written=2, skipped=1)
    for name, _ in items:
        assert np.load(out / f"{name}.npy").shape == (16,)

    # the same folder refuses features of another encoder
    with pytest.raises(ValueError, match="refusing"):
        write_feature_cache(items, "image", out, tmp_path / "other.pth", "tiny")


def test_feature_cache_resumes_after_a_kill(tmp_path, media, tiny_checkpoint, monkeypatch):
    out = tmp_path / "features"
    items = [(p.name, p) for p in media["image"]] + [(p.name, p) for p in media["image"][:1]]   # a duplicate
    items += [(f"copy_{p.name}", p) for p in media["image"][1:]]
    calls = {"n": 0}
    original = Encoder.encode_tensors

    def dies_on_second_batch(self, modality, batch):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, modality, batch)

    monkeypatch.setattr(Encoder, "encode_tensors", dies_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        write_feature_cache(items, "image", out, tiny_checkpoint, "tiny", batch_size=2)
    monkeypatch.undo()
    left = sorted(p.name for p in out.iterdir())
    assert left == sorted(f"{name}.npy" for name, _ in items[:2])     # the first batch only, no temp files
    assert write_feature_cache(items, "image", out, tiny_checkpoint, "tiny", batch_size=2) == dict(written=3,
                                                                                                   skipped=2)
    assert json.loads((out / "manifest.json").read_text())["modalities"]["image"]["count"] == 5
    assert all(np.load(p).shape == (16,) for p in out.glob("*.npy"))


def test_feature_cache_removes_temp_files_of_a_killed_run(tmp_path, media, tiny_checkpoint):
    """A SIGKILL during an atomic write leaves `.<name>.npy.<random>.tmp`; the next run removes those of its items
    (also when every item is already done), but not another run's."""
    out = tmp_path / "features"
    items = [(p.name, p) for p in media["image"]]
    out.mkdir()
    stale = out / f".{items[0][0]}.npy.k1ll3d.tmp"
    stale.write_bytes(b"partial")
    foreign = out / ".someone_else.jpg.npy.abc.tmp"
    foreign.write_bytes(b"in flight")
    assert write_feature_cache(items, "image", out, tiny_checkpoint, "tiny", batch_size=2) == dict(written=3,
                                                                                                   skipped=0)
    assert not stale.exists() and foreign.exists()
    stale.write_bytes(b"partial")
    assert write_feature_cache(items, "image", out, tiny_checkpoint, "tiny") == dict(written=0, skipped=3)
    assert not stale.exists()
    assert sorted(p.name for p in out.iterdir() if p != foreign) == sorted(
        [f"{name}.npy" for name, _ in items] + ["manifest.json"])


def test_feature_cache_names_the_bad_medium(tmp_path, media, tiny_checkpoint):
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n")
    items = [(p.name, p) for p in media["video"]] + [(text.name, text)]
    with pytest.raises(MediaError, match=re.escape(f"{text}: not a readable video")):
        write_feature_cache(items, "video", tmp_path / "video", tiny_checkpoint, "tiny", batch_size=2)
    absent = tmp_path / "absent.wav"
    with pytest.raises(MediaError, match=re.escape(f"{absent}: missing")):
        write_feature_cache([(absent.name, absent)], "audio", tmp_path / "audio", tiny_checkpoint, "tiny")
    assert not (tmp_path / "audio" / f"{absent.name}.npy").exists()
    with pytest.raises(ValueError, match="two different files"):
        write_feature_cache([("a.jpg", media["image"][0]), ("a.jpg", media["image"][1])], "image",
                            tmp_path / "image", tiny_checkpoint, "tiny")


# ---------------------------------------------------------------------------------------------------- benchmark


def test_bench_encoder_reports_throughput_and_memory(tmp_path, media, tiny_checkpoint, capsys):
    from bench import bench_encoder

    report = tmp_path / "bench.json"
    assert bench_encoder.main(["--count", "2", "--batch-size", "2", "--media-dir", str(media["image"][0].parent),
                               "--huge-checkpoint", str(tmp_path / "absent.pth"), "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "images/s" in printed and "videos/s" in printed and "audio clips/s" in printed
    assert "estimated from the parameter count" in printed
    result = json.loads(report.read_text())
    assert set(result["throughput"]) == {"image", "video", "audio"}
    assert all(row["end_to_end_per_s"] > 0 for row in result["throughput"].values())
    memory = result["huge_bf16_vision_audio_load"]
    assert memory["parameters"] == 719_065_088                        # vision 633 M + audio 86 M
    assert memory["parameter_bytes"] == 2 * (719_065_088 + 1)         # bf16, plus the audio logit-scale buffer
    # the measured path (a fresh process loading a real file); the tiny file stands in for huge here
    measured = bench_encoder.bench_huge_memory(tiny_checkpoint, "cpu", preset_name="tiny")
    assert measured["source"] == "measured" and measured["parameter_bytes"] > 0
    assert measured["cpu_peak_rss_growth_bytes"] > 0
