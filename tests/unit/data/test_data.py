"""Data readers, catalog, collate, sampler and datasets (code/nextgpt/data/)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nextgpt.config import load
from nextgpt.data import catalog
from nextgpt.data.collate import Collator
from nextgpt.data.readers import read_file
from nextgpt.data.records import RecordError, normalize_caption
from nextgpt.data.sampler import MixtureSampler
from nextgpt.data.types import Encoded, Media, Sample, Target, Turn
from nextgpt.tokens import TokenIds

REPO = Path(__file__).resolve().parents[3]
SAMPLES = (REPO.parent / "shared").resolve() / "samples" / "nextgpt"   # resolved: ../shared may be a symlink
needs_samples = pytest.mark.skipif(not (SAMPLES / "T_X_pair_data").is_dir(),
                                   reason=f"real NExT-GPT samples not present at {SAMPLES}")


def _config(root: Path, *extra: str):
    return load(REPO / "code" / "config" / "base.yaml",
                [f"data.root={root}", f"data.embed_dir={root / 'embed'}", f"data.feature_dir={root / 'features'}",
                 *extra])


def _write(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))
    return path


# ---------------------------------------------------------------------------------------------------------------
# Caption normalisation

def test_normalize_caption_matches_process_caption():
    assert normalize_caption('Clear water (full hd)\r\n') == "clear water full hd"
    assert normalize_caption('A "big"  dog: runs; #1 * ~fast~') == "a big dog runs 1 fast"
    assert normalize_caption("runner - up , behind .") == "runner - up , behind ."   # other punctuation stays


# ---------------------------------------------------------------------------------------------------------------
# Catalog

def test_unknown_catalog_name_lists_known(tmp_path):
    with pytest.raises(ValueError) as e:
        catalog.resolve(_config(tmp_path), "cc3m_encoder")
    assert "cc3m_encoder" in str(e.value) and "cc3m_enc" in str(e.value) and "mosit_instruction" in str(e.value)


def test_catalog_names_cover_the_original():
    names = catalog.names(_config(Path("/nonexistent")))
    for name in ("cc3m_enc", "webvid_enc", "audiocap_enc", "cc3m_dec", "webvid_dec", "audiocap_dec",
                 "image_instruction", "video_instruction", "audio_instruction", "llava_instruction",
                 "alpaca_instruction", "mosit_instruction"):
        assert name in names


def test_catalog_accepts_both_pair_spellings_and_prefers_the_legacy_file(tmp_path):
    rec = {"caption": "x", "image_name": "a.jpg"}
    _write(tmp_path / "T-X_pair_data" / "cc3m" / "cc3m_comprehension.json",
           [{"input_image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\nq"},
                                                      {"from": "gpt", "value": "x"}]}])
    cfg = _config(tmp_path)
    entry = catalog.resolve(cfg, "cc3m_enc")
    assert entry.file == tmp_path / "T-X_pair_data" / "cc3m" / "cc3m_comprehension.json"   # only the new file
    _write(tmp_path / "T-X_pair_data" / "cc3m" / "cc3m.json", [rec])
    entry = catalog.resolve(cfg, "cc3m_enc")
    assert entry.file == tmp_path / "T-X_pair_data" / "cc3m" / "cc3m.json"                 # legacy wins
    assert entry.role == "enc" and entry.modality == "image"
    assert entry.media_dirs["image"] == tmp_path / "T-X_pair_data" / "cc3m" / "images"
    assert entry.embed_dir == tmp_path / "embed"


def test_catalog_missing_files_lists_every_path_tried(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        catalog.resolve(_config(tmp_path), "webvid_dec")
    msg = str(e.value)
    assert "T_X_pair_data/webvid/webvid.json" in msg and "T-X_pair_data/webvid/webvid_generation.json" in msg


def test_bad_catalog_yaml_is_one_clear_error(tmp_path):
    bad = tmp_path / "catalog.yaml"
    bad.write_text("datasets:\n  x: {role: encoder, files: [a.json]}\n")
    with pytest.raises(ValueError, match="dataset x: role 'encoder'"):
        catalog.resolve(_config(tmp_path, f"data.catalog={bad}"), "x")


# ---------------------------------------------------------------------------------------------------------------
# Real sample files (../shared/samples/nextgpt): every shipped format parses into Samples

@needs_samples
@pytest.mark.parametrize("folder,modality,count", [("cc3m", "image", 12), ("webvid", "video", 10),
                                                   ("audiocap", "audio", 12)])
def test_real_sample_files_parse(folder, modality, count):
    root = SAMPLES / "T_X_pair_data" / folder
    embed = SAMPLES / "embed"
    raw = json.loads((root / f"{folder}.json").read_text())
    key = {"image": "image_name", "video": "video_name", "audio": "audio_name"}[modality]

    enc = read_file(root / f"{folder}.json", dataset=f"{folder}_enc", role="enc", embed_dir=embed,
                    prompt="generate a caption").samples
    assert len(enc) == count
    for s, r in zip(enc, raw):
        assert [t.role for t in s.turns] == ["human", "gpt"]
        assert s.turns[0].text == "generate a caption"
        assert s.turns[1].text == normalize_caption(r["caption"]) and s.turns[1].output_modality is None
        assert s.media == [Media(modality, str(root / f"{modality}s" / r[key]), r[key])] and s.targets == []

    dec = read_file(root / f"{folder}.json", dataset=f"{folder}_dec", role="dec", embed_dir=embed).samples
    for s, r in zip(dec, raw):
        caption = normalize_caption(r["caption"])
        assert s.turns == [Turn("human", caption), Turn("gpt", caption, modality)]
        assert s.targets == [Target(modality, str(embed / f"{r[key]}.npy"), caption)] and s.media == []
        assert Path(s.targets[0].embed_path).exists()          # the shipped embeddings use exactly these names
        media_path = s.targets[0].media_path                  # the target medium (the denoising loss reads it)
        assert media_path == str(root / f"{modality}s" / r[key]) and Path(media_path).is_file()

    comp = read_file(root / f"{folder}_comprehension.json", dataset="c", role="enc", embed_dir=embed).samples
    assert len(comp) == count
    for s, r in zip(comp, raw):
        assert s.media[0].name == r[key] and f"<{modality}>" not in s.turns[0].text and s.turns[0].text
        assert s.turns[1].text == normalize_caption(r["caption"])

    gen = read_file(root / f"{folder}_generation.json", dataset="g", role="dec", embed_dir=embed).samples
    assert len(gen) == count
    for s, r in zip(gen, raw):
        assert s.turns[1].output_modality == modality and f"<{modality}>" not in s.turns[1].text
        assert s.targets == [Target(modality, str(embed / f"{r[key]}.npy"), normalize_caption(r["caption"]))]


# ---------------------------------------------------------------------------------------------------------------
# Instruction formats (small files written here)

def test_legacy_t2x_record(tmp_path):
    path = _write(tmp_path / "audio_t2x.json", [{
        "mm_name": "34706.wav", "output_modality": "audio", "conversation": [
            {"from": "human", "value": "Make a sound of an engine", "input_modality": "text"},
            {"from": "gpt", "value": "Here it is.", "caption": "A vehicle (engine) works", "output_modality": "audio"},
            {"from": "human", "value": "Thanks!"},
            {"from": "gpt", "value": "You're welcome.", "caption": "", "output_modality": "text"}]}])
    (s,) = read_file(path, dataset="audio_instruction", role="instruction", embed_dir=tmp_path / "e").samples
    assert s.turns == [Turn("human", "Make a sound of an engine"), Turn("gpt", "Here it is.", "audio"),
                       Turn("human", "Thanks!"), Turn("gpt", "You're welcome.")]
    assert s.targets == [Target("audio", str(tmp_path / "e" / "34706.wav.npy"), "a vehicle engine works")]
    assert s.media == []


def test_t2x_mm_name_with_npy_suffix_is_not_mangled(tmp_path):
    path = _write(tmp_path / "image_t2x.json", [{
        "mm_name": "nyp.jpg.npy", "conversation": [
            {"from": "human", "value": "q", "input_modality": "text"},
            {"from": "gpt", "value": "a", "caption": "c", "output_modality": "image"}]}])
    (s,) = read_file(path, dataset="i", role="instruction", embed_dir=tmp_path).samples
    assert s.targets[0].embed_path == str(tmp_path / "nyp.jpg.npy")       # not strip('.npy') -> "jpg"


def test_new_instruction_tuning_record(tmp_path):
    path = _write(tmp_path / "video_instruction_tuning.json", [{
        "video_captions": ["A cat: jumping"], "video_caption_embeddings": ["it_vid_3.mp4.npy"],
        "conversations": [
            {"from": "human", "value": "Show me a cat jumping", "input_modality": "text"},
            {"from": "gpt", "value": "Sure! <video>", "caption": "A cat: jumping", "output_modality": "video"}],
        "source_data": {"x": 1}}])
    (s,) = read_file(path, dataset="video_instruction", role="instruction", embed_dir=tmp_path / "e").samples
    assert s.turns == [Turn("human", "Show me a cat jumping"), Turn("gpt", "Sure!", "video")]
    assert s.targets == [Target("video", str(tmp_path / "e" / "it_vid_3.mp4.npy"), "a cat jumping")]


def test_mosit_record_with_input_and_several_outputs(tmp_path):
    path = _write(tmp_path / "mosit_instruction_tuning.json", [{
        "input_image": ["mosit_i_1.jpg"],
        "audio_captions": ["rain"], "audio_caption_embeddings": ["mosit_a_1.wav.npy"],
        "image_captions": ["a dog", "a cat"], "image_caption_embeddings": ["mosit_i_2.jpg.npy", "mosit_i_3.jpg.npy"],
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A dog. <image>"},
            {"from": "human", "value": "And a sound?"}, {"from": "gpt", "value": "Rain: <audio>"},
            {"from": "human", "value": "A cat?"}, {"from": "gpt", "value": "<image>"}]}])
    (s,) = read_file(path, dataset="mosit", role="instruction", embed_dir=tmp_path).samples
    assert s.media == [Media("image", str(tmp_path / "images" / "mosit_i_1.jpg"), "mosit_i_1.jpg")]
    assert [t.output_modality for t in s.turns] == [None, "image", None, "audio", None, "image"]
    assert s.turns[0].text == "What is this?" and s.turns[5].text == ""
    assert [(t.modality, Path(t.embed_path).name, t.caption) for t in s.targets] == [
        ("image", "mosit_i_2.jpg.npy", "a dog"), ("audio", "mosit_a_1.wav.npy", "rain"),
        ("image", "mosit_i_3.jpg.npy", "a cat")]


def test_llava_legacy_and_new(tmp_path):
    legacy = _write(tmp_path / "llava" / "llava.json", [{
        "image_name": "000000033471.jpg", "output_modality": "text", "conversation": [
            {"from": "human", "value": "What is in the image?\n<image>", "input_modality": "image"},
            {"from": "gpt", "value": "A bus.", "caption": "", "output_modality": "text"},
            {"from": "human", "value": "Colour?", "input_modality": "text"},
            {"from": "gpt", "value": "White.", "caption": "", "output_modality": "text"}]}])
    new = _write(tmp_path / "llava" / "preprocessed_llava.json", [{
        "input_image": ["000000033471.jpg", "000000033471.jpg"], "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the image?"}, {"from": "gpt", "value": "A bus."},
            {"from": "human", "value": "Colour? <image>"}, {"from": "gpt", "value": "White."}]}])
    for path in (legacy, new):
        (s,) = read_file(path, dataset="llava_instruction", role="instruction", embed_dir=tmp_path).samples
        assert s.media == [Media("image", str(tmp_path / "llava" / "images" / "000000033471.jpg"),
                                 "000000033471.jpg")], path.name
        # the legacy record's text is kept verbatim, as the original tokenised it; the new layout's placeholders
        # only mark where the media go
        first = "What is in the image?\n<image>" if path == legacy else "What is in the image?"
        assert s.turns == [Turn("human", first), Turn("gpt", "A bus."), Turn("human", "Colour?"),
                           Turn("gpt", "White.")], path.name
        assert s.targets == []


def test_alpaca_legacy_and_new(tmp_path):
    legacy = _write(tmp_path / "alpaca.json", [{
        "image_name": "00000000000", "output_modality": "text", "conversation": [
            {"from": "human", "value": "Give three tips.", "input_modality": "text"},
            {"from": "gpt", "value": "1. Eat.", "caption": "", "output_modality": "text"}]}])
    new = _write(tmp_path / "preprocessed_alpaca.json", [{"conversations": [
        {"from": "human", "value": "Give three tips."}, {"from": "gpt", "value": "1. Eat."}]}])
    for path in (legacy, new):
        (s,) = read_file(path, dataset="alpaca_instruction", role="instruction", embed_dir=tmp_path).samples
        assert s.turns == [Turn("human", "Give three tips."), Turn("gpt", "1. Eat.")] and not s.media and not s.targets


# ---------------------------------------------------------------------------------------------------------------
# Bad records: one clear error naming file and record

@pytest.mark.parametrize("record,role,expected", [
    ({"image_name": "a.jpg"}, "enc", "missing field 'caption'"),
    ({"id": 3}, "dec", "unknown record format"),
    ({"image_name": "a.jpg"}, "instruction", "missing field 'conversations' (new layout) or 'conversation'"),
    ({"image_name": "a.jpg", "caption": 3}, "enc", "caption: expected a string"),
    ({"image_name": "", "caption": "x"}, "dec", "image_name: empty"),
    ({"image_name": "a.jpg", "caption": "x"}, "instruction", "cannot be used as instruction data"),
    ({"conversations": [{"from": "human", "value": "<image> hi"}, {"from": "gpt", "value": "x"}]}, "instruction",
     "<image> number 1 has no name in 'input_image'"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "<audio>"}]}, "instruction",
     "no entry in 'audio_caption_embeddings'"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "<audio> <image>"}],
      "audio_caption_embeddings": ["a.wav.npy"], "image_caption_embeddings": ["b.jpg.npy"]}, "instruction",
     "2 output placeholders in one gpt turn"),
    ({"conversations": [{"from": "gpt", "value": "x"}]}, "instruction", "turns must alternate"),
    ({"conversations": [{"from": "human"}, {"from": "gpt", "value": "x"}]}, "instruction",
     "conversations[0]: missing field 'value'"),
    ({"conversation": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a", "output_modality": "image"}]},
     "instruction", "missing field 'mm_name'"),
])
def test_bad_record_is_one_clear_error(tmp_path, record, role, expected):
    good = {"image_name": "ok.jpg", "caption": "fine"} if role != "instruction" else \
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    path = _write(tmp_path / "data.json", [good, record])
    with pytest.raises(RecordError) as e:
        read_file(path, dataset="d", role=role, embed_dir=tmp_path)
    assert str(e.value).startswith(f"{path} record 1: ") and expected in str(e.value), str(e.value)
    assert "\n" not in str(e.value)
    result = read_file(path, dataset="d", role=role, embed_dir=tmp_path, skip_bad=True)
    assert len(result.samples) == 1 and result.records == 2 and [x.index for x in result.errors] == [1]


def test_bad_json_file_is_one_clear_error(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"caption": "x", ')
    with pytest.raises(ValueError, match=f"^{path}: not valid JSON"):
        read_file(path, dataset="d", role="enc", embed_dir=tmp_path)
    path.write_text('{"caption": "x"}')
    with pytest.raises(ValueError, match="expected a JSON list"):
        read_file(path, dataset="d", role="enc", embed_dir=tmp_path)


def test_pair_record_of_another_modality_is_refused(tmp_path):
    path = _write(tmp_path / "cc3m.json", [{"audio_name": "a.wav", "caption": "x"}])
    with pytest.raises(RecordError, match="missing field 'image_name'"):
        read_file(path, dataset="cc3m_enc", role="enc", embed_dir=tmp_path, modality="image")


# ---------------------------------------------------------------------------------------------------------------
# Collate

TOKEN_IDS = TokenIds(bos=1, eos=2, pad=2, media_start=90, media_end=91,
                     signal={"image": [100, 101, 102, 103], "video": list(range(110, 134)),
                             "audio": list(range(140, 148))})


def _sample(tmp_path, index, media=(), targets=()):
    return Sample(dataset="d", source=str(tmp_path / "d.json"), index=index, turns=[Turn("human", "q")],
                  media=list(media), targets=list(targets))


def _image_target(tmp_path, name, shape=(77, 8)):
    path = tmp_path / "embed" / f"{name}.npy"
    path.parent.mkdir(exist_ok=True)
    np.save(path, np.full(shape, float(len(name)), dtype=np.float16))
    return Target("image", str(path), "c")


def test_collate_pads_to_the_longest_and_stacks_targets(tmp_path):
    audio = tmp_path / "embed" / "x.wav.npy"
    _image_target(tmp_path, "a.jpg")
    np.save(audio, np.ones(16, dtype=np.float32))
    image_file = tmp_path / "m.jpg"
    image_file.write_bytes(b"not decoded by collate")
    s0 = _sample(tmp_path, 0, media=[Media("image", str(image_file), "m.jpg")])
    s1 = _sample(tmp_path, 1, targets=[_image_target(tmp_path, "a.jpg"), Target("audio", str(audio), "c")])
    s2 = _sample(tmp_path, 2, targets=[_image_target(tmp_path, "bb.jpg")])
    batch = [Encoded([1, 5, 2, 6], [-100, -100, -100, 6], [2], s0),
             Encoded([1, 7, 100, 101, 102, 103, 8, 140, 141, 142, 143, 144, 145, 146, 147], [-100] * 2 + [9] * 13,
                     [], s1),
             Encoded([1, 100, 101, 102, 103], [-100, 100, 101, 102, 103], [], s2)]
    out = Collator(TOKEN_IDS, feature_dir=None, caption_shapes={"image": (77, 8), "audio": (1, 16)})(batch)
    assert out["input_ids"].shape == (3, 15) and out["input_ids"].dtype == torch.long
    assert out["input_ids"][0].tolist() == [1, 5, 2, 6] + [TOKEN_IDS.pad] * 11
    assert out["labels"][0].tolist() == [-100, -100, -100, 6] + [-100] * 11
    assert out["attention_mask"].sum(1).tolist() == [4, 15, 5]
    assert out["media_positions"].tolist() == [[0, 2]] and out["media_names"] == ["m.jpg"]
    assert out["media_modalities"] == ["image"] and out["media_paths"] == [str(image_file)]
    assert out["media_features"] is None
    assert out["caption_embeds"]["image"].shape == (2, 77, 8) and out["caption_embeds"]["image"].dtype == torch.float32
    assert out["caption_embeds"]["image"][:, 0, 0].tolist() == [5.0, 6.0]          # row order kept
    assert out["caption_embeds"]["audio"].shape == (1, 1, 16) and "video" not in out["caption_embeds"]
    assert out["samples"] == [s0, s1, s2]


def test_collate_wrong_shape_names_file_and_record(tmp_path):
    target = _image_target(tmp_path, "a.jpg", shape=(77, 9))
    s = _sample(tmp_path, 7, targets=[target])
    with pytest.raises(ValueError) as e:
        Collator(TOKEN_IDS, caption_shapes={"image": (77, 8)})([Encoded([1, 100, 101, 102, 103], [1] * 5, [], s)])
    assert target.embed_path in str(e.value) and s.where in str(e.value) and "(77, 9)" in str(e.value)


def test_collate_truncated_embedding_names_file_and_record(tmp_path):
    target = _image_target(tmp_path, "a.jpg")
    data = Path(target.embed_path).read_bytes()
    Path(target.embed_path).write_bytes(data[: len(data) // 2])
    s = _sample(tmp_path, 3, targets=[target])
    with pytest.raises(ValueError) as e:
        Collator(TOKEN_IDS, caption_shapes={"image": (77, 8)})([Encoded([1, 100, 101, 102, 103], [1] * 5, [], s)])
    assert target.embed_path in str(e.value) and s.where in str(e.value)


def test_collate_signal_blocks_must_match_targets(tmp_path):
    s = _sample(tmp_path, 4, targets=[])
    with pytest.raises(ValueError, match="1 image signal block"):
        Collator(TOKEN_IDS)([Encoded([1, 100, 101, 102, 103], [1] * 5, [], s)])


def test_collate_uses_features_only_when_all_are_cached(tmp_path):
    features = tmp_path / "features"
    features.mkdir()
    np.save(features / "a.jpg.npy", np.arange(4, dtype=np.float32))
    media_a = Media("image", str(tmp_path / "absent" / "a.jpg"), "a.jpg")
    media_b = Media("audio", str(tmp_path / "absent" / "b.wav"), "b.wav")
    one = [Encoded([1, 2, 5], [-100, -100, 5], [1], _sample(tmp_path, 0, media=[media_a]))]
    out = Collator(TOKEN_IDS, feature_dir=features)(one)
    assert out["media_features"].tolist() == [[0.0, 1.0, 2.0, 3.0]]
    two = one + [Encoded([1, 2, 5], [-100, -100, 5], [1], _sample(tmp_path, 1, media=[media_b]))]
    with pytest.raises(FileNotFoundError) as e:       # b.wav has no feature and no file: a dangling media name
        Collator(TOKEN_IDS, feature_dir=features)(two)
    assert media_a.path in str(e.value) and f"{tmp_path / 'd.json'} record 0" in str(e.value)
    for m in (media_a, media_b):
        Path(m.path).parent.mkdir(exist_ok=True)
        Path(m.path).write_bytes(b"x")
    assert Collator(TOKEN_IDS, feature_dir=features)(two)["media_features"] is None   # live encoding instead


# ---------------------------------------------------------------------------------------------------------------
# Sampler

class _Sized:
    def __init__(self, n, lengths=None):
        self.n, self.lengths = n, lengths

    def __len__(self):
        return self.n


def _epoch(sampler):
    return [b for b in sampler]


def test_sampler_round_robin_is_single_dataset_and_deterministic():
    sizes = [10, 3, 7]
    make = lambda seed: MixtureSampler([_Sized(n) for n in sizes], batch_size=2, seed=seed)  # noqa: E731
    a, b, c = make(5), make(5), make(6)
    batches = _epoch(a)
    assert batches == _epoch(b) and batches != _epoch(c)
    assert len(batches) == len(a) == 5 * 3                      # ceil(10 / 2) rounds x 3 datasets
    offsets = [0, 10, 13, 20]
    for i, batch in enumerate(batches):
        d = i % 3                                               # catalog order within each round
        assert all(offsets[d] <= x < offsets[d + 1] for x in batch)
    first = sorted(x for i, batch in enumerate(batches) if i % 3 == 0 for x in batch)
    assert first == list(range(10))                             # the largest dataset: every sample once
    third = [x for i, batch in enumerate(batches) if i % 3 == 2 for x in batch]
    assert set(third) == set(range(13, 20))                     # smaller ones wrap around
    assert _epoch(a) != batches                                 # next epoch: a new order


def test_sampler_resumes_mid_epoch():
    full = MixtureSampler([_Sized(9), _Sized(4)], batch_size=2, seed=1)
    expected = _epoch(full) + _epoch(full)
    run = MixtureSampler([_Sized(9), _Sized(4)], batch_size=2, seed=1)
    it = iter(run)
    seen = [next(it) for _ in range(3)]
    state = run.state_dict()
    assert state["epoch"] == 0 and state["position"] == 3
    resumed = MixtureSampler([_Sized(9), _Sized(4)], batch_size=2, seed=1)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    seen += _epoch(resumed) + _epoch(resumed)
    assert seen == expected
    with pytest.raises(ValueError, match="seed"):
        MixtureSampler([_Sized(9), _Sized(4)], batch_size=2, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="sizes"):
        MixtureSampler([_Sized(9), _Sized(5)], batch_size=2, seed=1).load_state_dict(state)


def test_sampler_state_with_consumed_count():
    s = MixtureSampler([_Sized(8)], batch_size=2, seed=0)
    batches = _epoch(s)                                         # a prefetching loader ran the sampler dry
    assert s.state_dict(consumed=2)["epoch"] == 0 and s.state_dict(consumed=2)["position"] == 2
    assert s.state_dict(consumed=len(batches))["epoch"] == 1
    assert s.state_dict()["epoch"] == 1 and s.state_dict()["position"] == 0


@pytest.mark.parametrize("mode", ["round_robin", "mixed"])
def test_sampler_ranks_split_each_global_batch(mode):
    datasets = [_Sized(11), _Sized(6)]
    world = [MixtureSampler(datasets, batch_size=3, seed=4, rank=r, world_size=2, mode=mode) for r in range(2)]
    single = MixtureSampler(datasets, batch_size=6, seed=4, mode=mode)
    per_rank = [_epoch(s) for s in world]
    assert len(per_rank[0]) == len(per_rank[1]) == len(single)
    for r0, r1, whole in zip(*per_rank, _epoch(single)):
        assert len(r0) == len(r1) == 3 and r0 + r1 == whole      # rank r: slice [3r, 3r + 3) of the global batch


def test_sampler_mixed_covers_everything_and_mixes():
    s = MixtureSampler([_Sized(10), _Sized(10)], batch_size=4, seed=0, mode="mixed")
    batches = _epoch(s)
    assert len(batches) == 5 and set(x for b in batches for x in b) == set(range(20))
    assert any(min(b) < 10 <= max(b) for b in batches)


def test_sampler_length_grouping_sorts_megabatches():
    lengths = list(np.random.default_rng(0).integers(1, 500, size=64))
    s = MixtureSampler([_Sized(64, lengths)], batch_size=4, seed=3, group_by_length=True, megabatch=4)
    batches = _epoch(s)
    assert sorted(x for b in batches for x in b) == list(range(64))
    for start in range(0, 16, 4):                               # megabatch = 4 batches of 4
        flat = [lengths[x] for b in batches[start:start + 4] for x in b]
        assert flat == sorted(flat, reverse=True)
    plain = _epoch(MixtureSampler([_Sized(64, lengths)], batch_size=4, seed=3))
    spread = lambda bs: np.mean([np.ptp([lengths[x] for x in b]) for b in bs])  # noqa: E731
    assert spread(batches) < spread(plain) / 2


def test_sampler_rejects_bad_layout():
    with pytest.raises(ValueError):
        MixtureSampler([_Sized(4)], batch_size=2, rank=2, world_size=2)
    with pytest.raises(ValueError):
        MixtureSampler([_Sized(0)], batch_size=2)
    with pytest.raises(ValueError, match="mode"):
        MixtureSampler([_Sized(4)], batch_size=2, mode="random")


# ---------------------------------------------------------------------------------------------------------------
# Datasets on the tiny tokenizer and the toy data

def test_build_datasets_encode_every_toy_dataset(tiny_env):
    pytest.importorskip("nextgpt.data.conversation")
    from nextgpt.data.dataset import build_datasets
    from nextgpt.tokens import load_tokenizer

    cfg = tiny_env.config("stage_3")
    tokenizer, token_ids = load_tokenizer(cfg.path(cfg.model.llm))
    names = catalog.names(cfg)
    datasets = build_datasets(cfg, tokenizer, token_ids, names)
    assert list(datasets) == names
    for name, dataset in datasets.items():
        enc = dataset[0]
        assert isinstance(enc, Encoded) and enc.input_ids[0] == token_ids.bos
        assert len(enc.input_ids) == len(enc.labels) <= cfg.model.max_length
        assert len(enc.media_positions) == len(enc.sample.media)
        assert len(dataset.lengths) == len(dataset)
        assert any(label != -100 for label in enc.labels), name


def test_truncated_signal_block_is_skipped_with_one_warning(tiny_env):
    pytest.importorskip("nextgpt.data.conversation")
    from nextgpt.data.dataset import NextGPTDataset
    from nextgpt.tokens import load_tokenizer

    cfg = tiny_env.config("stage_2")
    tokenizer, token_ids = load_tokenizer(cfg.path(cfg.model.llm))
    long = Sample("d", "f.json", 0, [Turn("human", "a red circle " * 40), Turn("gpt", "a red circle " * 40, "image")],
                  targets=[Target("image", "x.npy", "c")])
    short = Sample("d", "f.json", 1, [Turn("human", "a red circle"), Turn("gpt", "a red circle", "image")],
                   targets=[Target("image", "y.npy", "c")])
    warnings: list[str] = []
    dataset = NextGPTDataset("d", [long, short], tokenizer, token_ids, max_length=64, log=warnings.append)
    assert dataset[0].sample is short and dataset[0].sample is short
    assert len(warnings) == 1 and "f.json record 0" in warnings[0] and dataset.skipped == {0}


def test_skips_are_summarised_once_per_dataset(tiny_env):
    """48 records that cannot fit: no per-record lines, one error with the count and the first record; a few that
    cannot fit among good ones: one warning line at the first skip, one count line per pass."""
    pytest.importorskip("nextgpt.data.conversation")
    from nextgpt.data.dataset import NextGPTDataset
    from nextgpt.tokens import load_tokenizer

    cfg = tiny_env.config("stage_2")
    tokenizer, token_ids = load_tokenizer(cfg.path(cfg.model.llm))

    def sample(i: int, words: int) -> Sample:
        return Sample("d", "f.json", i, [Turn("human", "a red circle " * words),
                                         Turn("gpt", "a red circle " * words, "image")],
                      targets=[Target("image", f"{i}.npy", "c")])

    warnings: list[str] = []
    hopeless = NextGPTDataset("d", [sample(i, 1) for i in range(48)], tokenizer, token_ids, max_length=12,
                              log=warnings.append)
    with pytest.raises(ValueError) as error:
        hopeless[0]
    message = str(error.value)
    assert "no sample can be encoded within max_length 12" in message and "48 of 48 skipped" in message
    assert "first: f.json record 0" in message and "signal block" in message
    assert warnings == []

    samples = [sample(i, 40 if i % 4 == 0 else 1) for i in range(40)]          # 10 of 40 too long
    mixed = NextGPTDataset("d", samples, tokenizer, token_ids, max_length=64, log=warnings.append)
    for epoch in range(2):
        for i in range(len(mixed)):
            assert mixed[i].sample.index % 4 != 0
    assert mixed.skipped == set(range(0, 40, 4))
    assert len(warnings) == 2, warnings
    assert "1 sample(s) skipped so far, first: f.json record 0" in warnings[0] and "counted" in warnings[0]
    assert "10 of 40 samples skipped so far (first: f.json record 0" in warnings[1]


def test_lengths_are_the_encoded_token_counts(tiny_env):
    """`lengths` (length grouping) equals len(encode(...).input_ids) for every toy dataset of stages 1-3, capped
    at max_length, from one batched tokenizer call."""
    pytest.importorskip("nextgpt.data.conversation")
    from nextgpt.data.conversation import encode
    from nextgpt.data.dataset import NextGPTDataset, build_datasets
    from nextgpt.tokens import load_tokenizer

    for stage in ("stage_1", "stage_2", "stage_3"):
        cfg = tiny_env.config(stage)
        tokenizer, token_ids = load_tokenizer(cfg.path(cfg.model.llm))
        for name, dataset in build_datasets(cfg, tokenizer, token_ids, catalog.names(cfg) if stage == "stage_3"
                                            else None).items():
            true = [len(encode(s, tokenizer, token_ids, 10_000).input_ids) for s in dataset.samples]
            assert dataset.lengths == [min(n, cfg.model.max_length) for n in true], (stage, name)
    long = Sample("d", "f.json", 0, [Turn("human", "a red circle " * 40), Turn("gpt", "a blue square " * 40)])
    capped = NextGPTDataset("d", [long], tokenizer, token_ids, max_length=32)
    # max_length counts the ids after the prompt prefix (BOS + "### Human: "), as the original's truncation did
    prefix = 1 + len(tokenizer.encode("### Human: ", add_special_tokens=False))
    assert capped.lengths == [prefix + 32]
    assert len(encode(long, tokenizer, token_ids, 10_000).input_ids) > 100
    whole = build_datasets(cfg, tokenizer, token_ids, ["alpaca_instruction"])["alpaca_instruction"]
    assert len(whole.lengths) == len(whole)                 # tokenised before the split: split() slices them
    for part in whole.split(0.25, seed=0):
        assert part.lengths == [len(encode(s, tokenizer, token_ids, cfg.model.max_length).input_ids)
                                for s in part.samples]


def test_loader_batches_a_stage_2_mixture(tiny_env):
    pytest.importorskip("nextgpt.data.conversation")
    from nextgpt.data.dataset import build_loader
    from nextgpt.modalities import MODALITIES
    from nextgpt.tokens import load_tokenizer

    tiny_env.embeddings()
    cfg = tiny_env.config("stage_2", "train.micro_batch_size=3")
    tokenizer, token_ids = load_tokenizer(cfg.path(cfg.model.llm))
    loader, sampler = build_loader(cfg, tokenizer, token_ids)
    batches = [b for _, b in zip(range(3), loader)]
    assert sampler.state_dict()["position"] == 3
    for batch, modality in zip(batches, ["image", "video", "audio"]):      # round robin, catalog order
        assert batch["input_ids"].shape[0] == 3
        embeds = batch["caption_embeds"][modality]
        assert embeds.shape[0] == 3 and embeds.dim() == 3
        if MODALITIES[modality].pooled:
            assert embeds.shape[1] == 1
        assert (batch["attention_mask"].sum(1).max() == batch["input_ids"].shape[1])     # padded to the longest


def test_loader_mixed_mixture_collates_several_modalities(tiny_env):
    pytest.importorskip("nextgpt.data.conversation")
    from nextgpt.data.dataset import build_loader
    from nextgpt.tokens import load_tokenizer

    tiny_env.embeddings()
    cfg = tiny_env.config("stage_2", "train.micro_batch_size=8", "data.mixture=mixed", "data.group_by_length=true")
    tokenizer, token_ids = load_tokenizer(cfg.path(cfg.model.llm))
    loader, sampler = build_loader(cfg, tokenizer, token_ids)
    total = sum(len(d) for d in loader.dataset.datasets)
    assert sampler.mode == "mixed" and sampler.group_by_length and len(loader) == -(-total // 8)
    batches = list(loader)
    assert sum(b["input_ids"].shape[0] for b in batches) == len(loader) * 8
    assert any(len(b["caption_embeds"]) > 1 for b in batches)      # modalities mixed within a micro-batch
    for b in batches:
        assert sum(v.shape[0] for v in b["caption_embeds"].values()) == 8
