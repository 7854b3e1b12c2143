"""validate_data.py / nextgpt.data.validate: every real sample file decodes to ImageBind's input shape; a copy of the
real samples with deliberately broken records reports exactly those records; cheap mode; feature cache stands in for
media; exit codes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import validate_data
from nextgpt.config import load
from nextgpt.data.file_checks import CORRUPT, MISSING, check_media
from nextgpt.data.validate import validate
from nextgpt.imagebind.encode import LOADERS

REPO = Path(__file__).resolve().parents[2]
SAMPLES = (REPO.parent / "shared").resolve() / "samples" / "nextgpt"   # resolved: ../shared may be a symlink
needs_samples = pytest.mark.skipif(not (SAMPLES / "T_X_pair_data").is_dir(),
                                   reason=f"real NExT-GPT samples not present at {SAMPLES}")
ENC = ["cc3m_enc", "webvid_enc", "audiocap_enc"]
DEC = ["cc3m_dec", "webvid_dec", "audiocap_dec"]


# ImageBind's input per file: (3, 224, 224) image, (3, 1, 128, 204) audio clips, (15, 3, 2, 224, 224) video clips
SHAPES = {"image": (3, 224, 224), "audio": (3, 1, 128, 204), "video": (15, 3, 2, 224, 224)}
SAMPLE_FOLDERS = {"image": "cc3m/images", "audio": "audiocap/audios", "video": "webvid/videos"}


@needs_samples
@pytest.mark.parametrize("modality", ["image", "audio", "video"])
def test_every_sample_file_decodes(modality):
    files = sorted(p for p in (SAMPLES / "T_X_pair_data" / SAMPLE_FOLDERS[modality]).iterdir() if p.is_file())
    assert files
    for path in files:
        tensor = LOADERS[modality](path)
        assert tuple(tensor.shape) == SHAPES[modality], path.name
        assert torch.isfinite(tensor).all(), path.name


def _decoder_configs(root: Path) -> dict[str, Path]:
    """Decoder folders holding only the JSON configs conditioning_shape reads: the shipped sample embeddings'
    shapes (image and video (77, 1024) — SD-2 / Zeroscope — and audio (512,))."""
    clip = root / "clip"
    (clip / "text_encoder").mkdir(parents=True)
    (clip / "tokenizer").mkdir()
    (clip / "text_encoder" / "config.json").write_text(json.dumps({"hidden_size": 1024}))
    (clip / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
    clap = root / "clap"
    (clap / "text_encoder").mkdir(parents=True)
    (clap / "text_encoder" / "config.json").write_text(json.dumps({"projection_dim": 512}))
    return {"image": clip, "video": clip, "audio": clap}


def _overrides(data: Path, decoders: dict[str, Path], features: Path | None = None) -> list[str]:
    out = [f"data.root={data}", f"data.embed_dir={data / 'embed'}",
           f"data.feature_dir={features or data / 'no_features'}"]
    return out + [f"model.decoders.{m}={p}" for m, p in decoders.items()]


@pytest.fixture
def broken_copy(tmp_path):
    """A copy of ../shared/samples/nextgpt with one problem per kind, and the exact records expected to fail."""
    if not (SAMPLES / "T_X_pair_data").is_dir():
        pytest.skip(f"real NExT-GPT samples not present at {SAMPLES}")
    data = tmp_path / "data"
    shutil.copytree(SAMPLES, data)
    pairs = data / "T_X_pair_data"

    def edit(folder: str, change) -> list[dict]:
        path = pairs / folder / f"{folder}.json"
        records = json.loads(path.read_text())
        change(records)
        path.write_text(json.dumps(records))
        return records

    cc3m = edit("cc3m", lambda r: (r[3].pop("caption"), r[6].update(image_name="nowhere.jpg")))  # missing field, dangling
    (pairs / "cc3m" / "images" / cc3m[5]["image_name"]).write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")   # corrupt
    np.save(data / "embed" / f"{cc3m[8]['image_name']}.npy", np.zeros((77, 768), np.float16))               # SD-1.5 shape
    webvid = json.loads((pairs / "webvid" / "webvid.json").read_text())
    (pairs / "webvid" / "videos" / webvid[2]["video_name"]).unlink()                                         # missing
    (data / "embed" / f"{webvid[4]['video_name']}.npy").unlink()                                             # missing
    audiocap = json.loads((pairs / "audiocap" / "audiocap.json").read_text())
    wav = data / "embed" / f"{audiocap[1]['audio_name']}.npy"
    wav.write_bytes(wav.read_bytes()[:200])                                                                  # truncated
    (pairs / "audiocap" / "audios" / audiocap[9]["audio_name"]).write_bytes(b"RIFF\x00\x00")               # corrupt
    expected = {
        ("cc3m_enc", 3, CORRUPT), ("cc3m_enc", 6, MISSING), ("cc3m_enc", 5, CORRUPT),
        ("cc3m_dec", 3, CORRUPT), ("cc3m_dec", 6, MISSING), ("cc3m_dec", 8, CORRUPT),
        ("webvid_enc", 2, MISSING), ("webvid_dec", 4, MISSING),
        ("audiocap_dec", 1, CORRUPT), ("audiocap_enc", 9, CORRUPT),
    }
    return data, _decoder_configs(tmp_path / "decoders"), expected


def _found(report) -> set[tuple[str, int, str]]:
    return {(p.dataset, p.index, p.kind) for d in report.datasets for p in d.problems}


@needs_samples
def test_clean_samples_validate(tmp_path):
    cfg = load(REPO / "code" / "config" / "base.yaml", _overrides(SAMPLES, _decoder_configs(tmp_path)))
    report = validate(cfg, ENC + DEC, decode=False)
    assert report.ok, report.format()
    assert [(d.name, d.records, d.ok) for d in report.datasets] == [
        ("cc3m_enc", 12, 12), ("webvid_enc", 10, 10), ("audiocap_enc", 12, 12),
        ("cc3m_dec", 12, 12), ("webvid_dec", 10, 10), ("audiocap_dec", 12, 12)]


def test_broken_copy_reports_exactly_the_broken_records(broken_copy):
    data, decoders, expected = broken_copy
    cfg = load(REPO / "code" / "config" / "base.yaml", _overrides(data, decoders))
    report = validate(cfg, ENC + DEC, decode=True)
    assert not report.ok
    assert _found(report) == expected, report.format()
    rows = {d.name: (d.records, d.ok, d.missing, d.corrupt) for d in report.datasets}
    assert rows["cc3m_enc"] == (12, 9, 1, 2) and rows["cc3m_dec"] == (12, 9, 1, 2)
    assert rows["webvid_enc"] == (10, 9, 1, 0) and rows["audiocap_dec"] == (12, 11, 0, 1)
    text = report.format()
    for problem in (p for d in report.datasets for p in d.problems):
        assert f"{problem.source} record {problem.index}: " in text
    assert "missing field 'caption'" in text and "nowhere.jpg" in text and "(77, 768)" in text


def test_cheap_mode_skips_decoding_but_catches_files_and_npy_headers(broken_copy):
    data, decoders, expected = broken_copy
    cfg = load(REPO / "code" / "config" / "base.yaml", _overrides(data, decoders))
    report = validate(cfg, ENC + DEC, decode=False)
    undecoded = {("cc3m_enc", 5, CORRUPT), ("audiocap_enc", 9, CORRUPT)}     # only a decoder sees these
    assert _found(report) == expected - undecoded, report.format()
    with pytest.raises(ValueError, match="data validation failed"):
        report.raise_if_bad()



def test_error_is_one_line_naming_the_first_record_and_skips_are_per_record(broken_copy):
    data, decoders, expected = broken_copy
    cfg = load(REPO / "code" / "config" / "base.yaml", _overrides(data, decoders))
    report = validate(cfg, ENC + DEC, decode=False)
    found = expected - {("cc3m_enc", 5, CORRUPT), ("audiocap_enc", 9, CORRUPT)}    # cheap mode decodes nothing
    with pytest.raises(ValueError) as caught:
        report.raise_if_bad("code/validate_data.py --config x.yaml")
    cc3m = data / "T_X_pair_data" / "cc3m" / "cc3m.json"
    assert str(caught.value) == (f"data validation failed: {cc3m} record 3: missing field 'caption' "
                                 f"(+{len(found) - 1} more; run code/validate_data.py --config x.yaml for the full list)")
    # every problem is confined to a record: data.skip_bad_records may leave exactly these records out
    assert report.only_bad_records
    bad = report.bad_records()
    assert {(name, index) for name, records in bad.items() for _, index in records} == {(d, i) for d, i, _ in found}
    assert all(source.endswith(".json") for records in bad.values() for source, _ in records)
    # an unreadable data file is not a record problem: no skipping past it
    webvid = data / "T_X_pair_data" / "webvid" / "webvid.json"
    webvid.write_text(webvid.read_text()[:100])
    report = validate(cfg, ["webvid_enc", "cc3m_enc"], decode=False)
    assert not report.only_bad_records and "webvid_enc" not in report.bad_records()
    message = report.error_line()
    assert message.startswith(f"data validation failed: {webvid}: not valid JSON (") and "\n" not in message
    assert f"{webvid}: {webvid}" not in message                                   # the path is named once


def test_feature_cache_stands_in_for_media(broken_copy):
    data, decoders, _ = broken_copy
    features = data / "features"
    features.mkdir()
    webvid = json.loads((data / "T_X_pair_data" / "webvid" / "webvid.json").read_text())
    np.save(features / f"{webvid[2]['video_name']}.npy", np.zeros(16, np.float32))    # the deleted video
    cfg = load(REPO / "code" / "config" / "base.yaml", _overrides(data, decoders, features))
    report = validate(cfg, ["webvid_enc"], decode=True)
    assert report.ok, report.format()


def test_check_media_names_the_file(tmp_path):
    bad = tmp_path / "x.jpg"
    bad.write_bytes(b"garbage")
    kind, reason = check_media(bad, "image")
    assert kind == CORRUPT and str(bad) in reason and "\n" not in reason
    assert check_media(tmp_path / "absent.wav", "audio") == (MISSING, f"{tmp_path / 'absent.wav'}: media file missing")


def test_script_exit_codes_and_table(broken_copy, tmp_path, capsys):
    data, decoders, expected = broken_copy
    argv = ["--config", str(REPO / "code" / "config" / "stage_2.yaml")]
    for text in _overrides(data, decoders):
        argv += ["--set", text]
    assert validate_data.main(argv + ["--no-decode"]) == 1
    out = capsys.readouterr().out
    assert "cc3m_dec" in out and "records" in out and "corrupt" in out and "data has problems" in out
    assert validate_data.main(argv + ["--datasets", "cc3m_decoder"]) == 2
    assert "error: unknown dataset 'cc3m_decoder'" in capsys.readouterr().out
    assert validate_data.main(argv + ["--set", "data.nonsense=1"]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_toy_data_validates_with_its_embeddings(tiny_env):
    tiny_env.embeddings()
    for stage in ("stage_2", "stage_3"):
        assert validate_data.main(tiny_env.argv(stage)) == 0
