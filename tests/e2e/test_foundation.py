"""Foundation: tiny checkpoints, toy data, check_ckpt, config loading, make targets, git hygiene."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import check_ckpt
from tiny import make_tiny_ckpt
from tiny import make_toy_data
from nextgpt import config as config_lib
from tiny import toyworld as toy
from nextgpt.modalities import MODALITIES, conditioning_shape

REPO = Path(__file__).resolve().parents[2]
EXPECTED_CONDITIONING = {"image": (77, make_tiny_ckpt.SD_TEXT_WIDTH), "video": (77, make_tiny_ckpt.VIDEO_TEXT_WIDTH),
                         "audio": (1, make_tiny_ckpt.CLAP_PROJECTION)}


def _folder(tiny_env, modality: str) -> Path:
    return tiny_env.ckpt / make_tiny_ckpt.PIPELINE_WRITERS[modality][0]


def _tree_digest(root: Path, skip_suffix: str = "") -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not (skip_suffix and p.name.endswith(skip_suffix))}


# ----------------------------------------------------------------------------------------------------------------
# Tiny checkpoints

def test_tiny_llm_loads_and_runs(tiny_env):
    from transformers import LlamaForCausalLM, LlamaTokenizer

    folder = tiny_env.ckpt / "vicuna"
    tokenizer = LlamaTokenizer.from_pretrained(str(folder))
    model = LlamaForCausalLM.from_pretrained(str(folder)).eval()
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (1, 2, 0)   # LLaMA's ids
    assert model.config.vocab_size == len(tokenizer) and model.config.num_hidden_layers == 2
    # trained on the toy captions: their words are single pieces, not bytes
    pieces = tokenizer.tokenize("a purple triangle moving left")
    assert pieces == ["▁a", "▁purple", "▁triangle", "▁moving", "▁left"]
    ids = tokenizer("### Human: a red circle on a blue background", return_tensors="pt").input_ids
    assert ids[0, 0].item() == tokenizer.bos_token_id
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("modality", list(MODALITIES))
def test_tiny_pipeline_loads_and_decodes(tiny_env, modality):
    from diffusers import DiffusionPipeline

    folder = _folder(tiny_env, modality)
    pipe = DiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == MODALITIES[modality].pipeline
    tokens, dim = conditioning_shape(modality, folder)
    assert (tokens, dim) == EXPECTED_CONDITIONING[modality]

    # the pipeline's own text encoder produces exactly that conditioning shape (what process_embeddings stores)
    text = pipe.tokenizer(["a red circle on a blue background"], padding="max_length",
                          max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt")
    assert len(pipe.tokenizer.tokenize("a red circle on a blue background")) == 7      # toy words are whole tokens
    with torch.no_grad():
        encoded = pipe.text_encoder(text.input_ids, attention_mask=text.attention_mask)
    caption_embeds = encoded.text_embeds if MODALITIES[modality].pooled else encoded.last_hidden_state
    assert tuple(caption_embeds.shape) == ((1, dim) if MODALITIES[modality].pooled else (1, tokens, dim))

    # decode from prompt_embeds at the tiny inference sizes
    shape = (1, dim) if MODALITIES[modality].pooled else (1, tokens, dim)
    prompt_embeds = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    sizes = make_tiny_ckpt.inference_sizes()[modality]
    out = pipe(prompt_embeds=prompt_embeds, guidance_scale=1.0, output_type="np",
               generator=torch.Generator().manual_seed(0), **sizes)
    if modality == "image":
        assert out.images.shape == (1, sizes["height"], sizes["width"], 3)
    elif modality == "video":
        assert np.asarray(out.frames).shape == (1, sizes["num_frames"], sizes["height"], sizes["width"], 3)
    else:
        rate = pipe.vocoder.config.sampling_rate
        assert out.audios.shape == (1, int(sizes["audio_length_in_s"] * rate)) and rate == 16000
    result = out.images if modality == "image" else (out.frames if modality == "video" else out.audios)
    assert np.isfinite(np.asarray(result)).all()


def test_tiny_conditioning_widths_are_distinct():
    # a projector built for the wrong modality must fail on shapes, not pass silently
    dims = [d for _, d in EXPECTED_CONDITIONING.values()]
    assert len(set(dims)) == len(dims)


def test_tiny_inference_sizes_match_tiny_config():
    cfg = config_lib.load(REPO / "code" / "config" / "tiny" / "base.yaml")
    for modality, values in make_tiny_ckpt.TINY_INFERENCE.items():
        for key, value in values.items():
            assert getattr(cfg.inference.decoding(modality), key) == value, (modality, key)


def test_tiny_build_is_deterministic(tiny_env, tmp_path):
    make_tiny_ckpt.write_llm(tmp_path / "vicuna")
    make_tiny_ckpt.write_audioldm(tmp_path / "audioldm")
    for name in ("vicuna", "audioldm"):
        assert _tree_digest(tmp_path / name) == _tree_digest(tiny_env.ckpt / name), name


def test_tiny_clip_tokenizer_spells_toy_words(tiny_env):
    from transformers import CLIPTokenizer, RobertaTokenizer

    clip = CLIPTokenizer.from_pretrained(str(_folder(tiny_env, "image") / "tokenizer"))
    assert clip.model_max_length == 77
    assert clip.tokenize("A Yellow square!") == ["a</w>", "yellow</w>", "square</w>", "!</w>"]
    assert "zebra" not in json.loads((_folder(tiny_env, "image") / "tokenizer" / "vocab.json").read_text())
    assert "".join(clip.tokenize("zebra")).replace("</w>", "") == "zebra"      # unknown words fall back to bytes
    roberta = RobertaTokenizer.from_pretrained(str(_folder(tiny_env, "audio") / "tokenizer"))
    assert roberta.tokenize("a high rising tone") == ["a", "Ġhigh", "Ġrising", "Ġtone"]


# ----------------------------------------------------------------------------------------------------------------
# Toy data

PAIR_FIELDS = {"cc3m": {"caption": str, "id": str, "image_name": str},
               "webvid": {"caption": str, "id": int, "video_name": str},
               "audiocap": {"audio_id": int, "audio_name": str, "caption": str}}


def _load(path: Path) -> list:
    data = json.loads(path.read_text())
    assert isinstance(data, list) and data, path
    return data


def test_toy_pair_files_follow_the_reference(tiny_env):
    root = tiny_env.data / "T_X_pair_data"
    counts = {"cc3m": 48, "webvid": 24, "audiocap": 12}
    for folder, (modality, spec) in zip(PAIR_FIELDS, MODALITIES.items()):
        raw = _load(root / folder / f"{folder}.json")
        assert len(raw) == counts[folder]
        for record in raw:
            assert {k: type(v) for k, v in record.items()} == PAIR_FIELDS[folder], record
        names = [r[spec.pair_key] for r in raw]
        assert len(set(names)) == len(names)
        comprehension = _load(root / folder / f"{folder}_comprehension.json")
        generation = _load(root / folder / f"{folder}_generation.json")
        for record, comp, gen in zip(raw, comprehension, generation):
            name = record[spec.pair_key]
            assert set(comp) == {spec.input_key, "conversations"} and comp[spec.input_key] == name
            human, gpt = comp["conversations"]
            assert human["from"] == "human" and human["value"].startswith(spec.placeholder + "\n")
            assert gpt == {"from": "gpt", "value": record["caption"]}
            assert set(gen) == {spec.output_key, spec.captions_key, spec.embeddings_key, "conversations"}
            assert gen[spec.captions_key] == record["caption"] and gen[spec.embeddings_key] == f"{name}.npy"
            human, gpt = gen["conversations"]
            assert human["value"].endswith(record["caption"]) and gpt["value"].endswith(" " + spec.placeholder)


def test_toy_instruction_files_follow_the_reference(tiny_env):
    it = tiny_env.data / "IT_data"
    pair_names = {m: {r[spec.pair_key] for r in _load(
        tiny_env.data / "T_X_pair_data" / folder / f"{folder}.json")}
        for (m, spec), folder in zip(MODALITIES.items(), PAIR_FIELDS)}
    for modality, spec in MODALITIES.items():
        for record in _load(it / "T-T+X_data" / f"{modality}_t2x.json"):
            assert set(record) == {"mm_name", "output_modality", "conversation"}
            assert record["output_modality"] == modality and record["mm_name"] in pair_names[modality]
            last = record["conversation"][-1]
            assert set(last) == {"from", "value", "caption", "output_modality"} and last["caption"]
            assert all(t["input_modality"] == "text" for t in record["conversation"] if t["from"] == "human")
        for record in _load(it / "T-T+X_data" / f"{modality}_instruction_tuning.json"):
            assert set(record) == {spec.captions_key, spec.embeddings_key, "conversations", "source_data"}
            (embed_name,) = record[spec.embeddings_key]
            assert embed_name.endswith(".npy") and embed_name[:-4] in pair_names[modality]
            assert record["conversations"][-1]["value"].endswith(spec.placeholder)
    for record in _load(it / "T+X-T_data" / "llava" / "llava.json"):
        assert set(record) == {"image_name", "output_modality", "conversation"}
        first = record["conversation"][0]
        assert first["input_modality"] == "image" and first["value"].startswith("<image>")
    for record in _load(it / "T+X-T_data" / "alpaca" / "alpaca.json"):
        assert [t["from"] for t in record["conversation"]] == ["human", "gpt"]
    for record in _load(it / "MosIT_data" / "mosit_instruction_tuning.json"):
        # one input medium at most, one output placeholder per gpt turn, one embedding per output placeholder
        assert sum(len(record.get(s.input_key, [])) for s in MODALITIES.values()) <= 1
        gpt_text = " ".join(t["value"] for t in record["conversations"] if t["from"] == "gpt")
        for spec in MODALITIES.values():
            assert gpt_text.count(spec.placeholder) == len(record.get(spec.embeddings_key, []))
            assert len(record.get(spec.captions_key, [])) == len(record.get(spec.embeddings_key, []))


def _referenced_media(data: Path) -> list[tuple[str, Path]]:
    """(modality, path) of every medium any toy JSON names (inputs, and outputs whose files exist by design)."""
    out = []
    for (modality, spec), folder in zip(MODALITIES.items(), PAIR_FIELDS):
        base = data / "T_X_pair_data" / folder
        out += [(modality, base / spec.media_folder / r[spec.pair_key]) for r in _load(base / f"{folder}.json")]
        out += [(modality, base / spec.media_folder / r[spec.input_key])
                for r in _load(base / f"{folder}_comprehension.json")]
        out += [(modality, base / spec.media_folder / r[spec.output_key])
                for r in _load(base / f"{folder}_generation.json")]
        out += [(modality, base / spec.media_folder / r["mm_name"])
                for r in _load(data / "IT_data" / "T-T+X_data" / f"{modality}_t2x.json")]
    llava = data / "IT_data" / "T+X-T_data" / "llava"
    out += [("image", llava / "images" / r["image_name"]) for r in _load(llava / "llava.json")]
    mosit = data / "IT_data" / "MosIT_data"
    for record in _load(mosit / "mosit_instruction_tuning.json"):
        for modality, spec in MODALITIES.items():
            names = record.get(spec.input_key, []) + [n[:-4] for n in record.get(spec.embeddings_key, [])]
            out += [(modality, mosit / spec.media_folder / n) for n in names]
    return out


def test_toy_media_exist_and_decode(tiny_env):
    import av
    import soundfile
    from PIL import Image

    media = _referenced_media(tiny_env.data)
    assert len({p for _, p in media}) >= 48 + 24 + 12 + 16
    for modality, path in sorted(set(media)):
        assert path.is_file(), path
        if modality == "image":
            with Image.open(path) as image:
                image.load()
                assert image.format == "JPEG" and image.size == (toy.IMAGE_SIZE, toy.IMAGE_SIZE), path
        elif modality == "audio":
            wave, rate = soundfile.read(str(path))
            assert rate == toy.AUDIO_RATE and wave.shape == (int(rate * toy.AUDIO_SECONDS), 2), path
            assert 0.3 < np.abs(wave).max() <= 1.0
        else:
            with av.open(str(path)) as container:
                frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
            assert len(frames) == round(toy.VIDEO_FPS * toy.VIDEO_SECONDS), path
            assert frames[0].shape == (toy.VIDEO_SIZE, toy.VIDEO_SIZE, 3)


def _close(pixel, rgb, tolerance=40) -> bool:
    return bool(np.abs(np.asarray(pixel, dtype=int) - np.asarray(rgb)).max() <= tolerance)


def test_toy_media_match_their_captions(tiny_env):
    """The caption is learnable from the medium: colours, direction of motion, pitch and its pattern."""
    import av
    import soundfile
    from PIL import Image

    base = tiny_env.data / "T_X_pair_data"
    for record in _load(base / "cc3m" / "cc3m.json")[:12]:
        _, color, shape, _, _, background, _ = record["caption"].split()
        pixels = np.asarray(Image.open(base / "cc3m" / "images" / record["image_name"]))
        assert _close(np.median(pixels[0], axis=0), toy.BACKGROUNDS[background]), record   # top row
        assert np.mean([_close(p, toy.COLORS[color]) for p in pixels.reshape(-1, 3)]) > 0.05, record
    for record in _load(base / "webvid" / "webvid.json")[:8]:
        direction = record["caption"].split()[-1]
        with av.open(str(base / "webvid" / "videos" / record["video_name"])) as container:
            frames = [f.to_ndarray(format="rgb24").astype(int) for f in container.decode(video=0)]
        centers = []
        for frame in (frames[0], frames[-1]):
            ys, xs = np.nonzero(np.abs(frame - np.asarray(toy.VIDEO_BACKGROUND)).max(axis=-1) > 60)
            centers.append((xs.mean(), ys.mean()))
        (x0, y0), (x1, y1) = centers
        moved = {"right": x1 - x0, "left": x0 - x1, "down": y1 - y0, "up": y0 - y1}[direction]
        assert moved > toy.VIDEO_SIZE / 3, record
    for record in _load(base / "audiocap" / "audiocap.json"):
        _, pitch, pattern, _ = record["caption"].split()
        wave, rate = soundfile.read(str(base / "audiocap" / "audios" / record["audio_name"]))
        base_hz = toy.PITCHES[pitch]
        centroids = []                                      # spectral centroid (Hz) of each half, below 4 x pitch
        for half in np.array_split(wave[:, 0], 2):
            magnitude = np.abs(np.fft.rfft(half))
            hz = np.fft.rfftfreq(len(half), 1 / rate)
            band = hz < 4 * base_hz
            centroids.append(float((hz[band] * magnitude[band]).sum() / magnitude[band].sum()))
        if pattern in ("steady", "beeping"):
            peak = np.argmax(np.abs(np.fft.rfft(wave[:, 0]))) * rate / len(wave)
            assert abs(peak - base_hz) < 0.02 * base_hz, (record, peak)
        else:
            assert (centroids[1] > centroids[0] * 1.2) == (pattern == "rising"), (record, centroids)
            assert (centroids[0] > centroids[1] * 1.2) == (pattern == "falling"), (record, centroids)
        silent = np.mean(np.abs(wave[:, 0]) < 1e-3)
        assert (silent > 0.3) == (pattern == "beeping"), record


def test_toy_data_is_deterministic(tiny_env, tmp_path):
    new = tmp_path / "toy"
    assert make_toy_data.main(["--out", str(new)]) == 0
    for sub in ("T_X_pair_data", "IT_data"):                # byte for byte, media included
        assert _tree_digest(new / sub) == _tree_digest(tiny_env.data / sub), sub
    assert json.loads((new / ".complete").read_text())["image"] == 48


def test_toy_data_rejects_bad_counts(tmp_path, capsys):
    assert make_toy_data.main(["--out", str(tmp_path), "--videos", "0"]) == 2
    assert "video" in capsys.readouterr().err


def test_toy_data_reads_through_the_catalog(tiny_env):
    readers = pytest.importorskip("nextgpt.data.readers")
    catalog = pytest.importorskip("yaml").safe_load((REPO / "code" / "config" / "catalog.yaml").read_text())
    cfg = tiny_env.config("stage_3")
    for name in catalog["datasets"]:
        samples = readers.read_dataset(cfg, name)
        assert samples, name
        for sample in samples:
            for medium in sample.media:
                assert Path(medium.path).is_file(), (name, medium)


# ----------------------------------------------------------------------------------------------------------------
# tiny_env itself

def test_tiny_env_config_points_into_the_session_folders(tiny_env):
    cfg = tiny_env.config("stage_2", "train.max_steps=3")
    assert cfg.train.max_steps == 3 and cfg.train.stage == 2
    inside = [cfg.model.llm, cfg.model.imagebind, *cfg.model.decoders.values(), cfg.data.root, cfg.data.embed_dir,
              cfg.data.feature_dir, cfg.train.output_dir, cfg.train.init_from, cfg.inference.ckpt]
    for value in inside:
        assert Path(value).is_relative_to(tiny_env.root), value
    assert Path(cfg.train.init_from) == tiny_env.delta / "stage_1"
    assert Path(cfg.model.imagebind) == tiny_env.imagebind and tiny_env.imagebind.is_file()
    assert tiny_env.argv(3)[:2] == ["--config", str(REPO / "code" / "config" / "tiny" / "stage_3.yaml")]
    with pytest.raises(ValueError, match="no tiny config"):
        tiny_env.config("stage_9")


def test_tiny_env_builds_embeddings_and_features(tiny_env):
    pytest.importorskip("process_embeddings")
    embed_dir, feature_dir = tiny_env.embeddings(), tiny_env.features()
    for (modality, spec), folder in zip(MODALITIES.items(), PAIR_FIELDS):
        tokens, dim = EXPECTED_CONDITIONING[modality]
        expected = (dim,) if spec.pooled else (tokens, dim)
        for record in _load(tiny_env.data / "T_X_pair_data" / folder / f"{folder}.json"):
            name = record[spec.pair_key]
            assert np.load(embed_dir / f"{name}.npy").shape == expected, name
            assert np.load(feature_dir / f"{name}.npy").shape == (16,), name       # tiny ImageBind out_embed_dim


# ----------------------------------------------------------------------------------------------------------------
# check_ckpt

def _run_check(capsys, argv):
    rc = check_ckpt.main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_check_ckpt_names_every_missing_file_at_once(tmp_path, capsys):
    empty = tmp_path / "pretrained_ckpt"
    overrides = [f"model.imagebind={empty}/imagebind_ckpt/huge/imagebind_huge.pth",
                 f"model.llm={empty}/vicuna_ckpt/7b_v0"] + [
        f"model.decoders.{m}={empty}/{m}-decoder" for m in MODALITIES] + [
        f"train.init_from={tmp_path}/no_delta", f"inference.ckpt={tmp_path}/no_delta"]
    argv = ["--config", str(REPO / "code" / "config" / "stage_3.yaml")]
    for text in overrides:
        argv += ["--set", text]
    rc, out, _ = _run_check(capsys, argv)
    assert rc == 1
    expected = ["imagebind_huge.pth", "7b_v0/config.json", "pytorch_model-00001-of-00002.bin",
                "pytorch_model-00002-of-00002.bin", "7b_v0/tokenizer.model", "dl.fbaipublicfiles.com",
                "lmsys/vicuna-7b-delta-v0"]
    for m in MODALITIES:
        expected += [f"{m}-decoder/{name}" for name in (
            "model_index.json", "text_encoder/config.json", "unet/config.json", "vae/config.json",
            "scheduler/scheduler_config.json", "tokenizer/vocab.json", "unet/diffusion_pytorch_model")]
    expected += ["audio-decoder/vocoder/config.json", "cerspense/zeroscope_v2_576w", "cvssp/audioldm-l-full"]
    for text in expected:
        assert text in out, text
    assert "image-decoder/vocoder" not in out
    assert out.count("MISSING") == 5 + 3 * 10 + 2                    # ImageBind, 4 Vicuna, 10 per decoder, vocoder
    assert "optional" in out                                           # the absent delta does not fail the check


def test_check_ckpt_passes_on_tiny(tiny_env, capsys):
    rc, out, _ = _run_check(capsys, tiny_env.argv("stage_3") + ["--check-keys"])
    assert rc == 0, out
    assert "(77, 32)" in out and "(77, 48)" in out and "(1, 16)" in out
    assert "keys match preset 'tiny'" in out


def test_check_ckpt_finds_wrong_files(tiny_env, tmp_path, capsys):
    vicuna = tmp_path / "vicuna"
    shutil.copytree(tiny_env.ckpt / "vicuna", vicuna)
    (vicuna / "tokenizer.model").write_bytes(b"")
    config = json.loads((vicuna / "config.json").read_text())
    config["model_type"] = "gpt2"
    (vicuna / "config.json").write_text(json.dumps(config))
    state = torch.load(tiny_env.imagebind, weights_only=True)
    state.pop(next(iter(state)))
    torch.save(state, tmp_path / "imagebind.pth")
    from safetensors.torch import save_file

    delta = tmp_path / "delta"
    delta.mkdir()
    save_file({"input_proj.weight": torch.zeros(32, 16), "input_proj.bias": torch.zeros(32)},
              str(delta / "delta.safetensors"))
    rc, out, _ = _run_check(capsys, tiny_env.argv(
        "stage_3", f"model.llm={vicuna}", f"model.imagebind={tmp_path / 'imagebind.pth'}",
        f"model.decoders.audio={_folder(tiny_env, 'image')}", f"train.init_from={delta}") + ["--check-keys"])
    assert rc == 1
    assert "model_type 'gpt2'" in out
    assert "empty file" in out and "tokenizer.model" in out
    assert "missing: " in out and "imagebind.pth" in out                       # the key table lost one key
    assert "the audio decoder needs AudioLDMPipeline" in out
    assert "hidden size 32, this LLM has 64" in out


def test_check_ckpt_accepts_a_matching_delta(tiny_env, tmp_path, capsys):
    from safetensors.torch import save_file

    save_file({"input_proj.weight": torch.zeros(64, 16)}, str(tmp_path / "delta.safetensors"))
    rc, out, _ = _run_check(capsys, tiny_env.argv("stage_3") + ["--delta", str(tmp_path)])
    assert rc == 0 and "input_proj.weight (64, 16)" in out
    rc, out, _ = _run_check(capsys, tiny_env.argv("stage_3") + ["--delta", str(tmp_path / "nowhere")])
    assert rc == 1 and "MISSING" in out                                # an explicit --delta is required


def test_check_ckpt_bad_config_is_one_line(capsys):
    rc, _, err = _run_check(capsys, ["--config", str(REPO / "code" / "config" / "tiny" / "stage_3.yaml"),
                                     "--set", "model.nope=1"])
    assert rc == 2 and err.startswith("error:") and "nope" in err and "Traceback" not in err


# ----------------------------------------------------------------------------------------------------------------
# Config loading

def test_every_shipped_config_loads():
    files = [f for folder in (REPO / "code" / "config", REPO / "code" / "config" / "tiny")
             for f in sorted(folder.glob("*.yaml")) if f.name != "catalog.yaml"]
    assert len(files) >= 10
    for path in files:
        cfg = config_lib.load(path)
        assert cfg.source == str(path.resolve())
    assert config_lib.load(REPO / "code" / "config" / "tiny" / "stage_3.yaml").model.llm == "ckpt/tiny/vicuna"


def test_config_unknown_key_in_file(tmp_path):
    (tmp_path / "bad.yaml").write_text(f"base: {REPO / 'code' / 'config' / 'stage_1.yaml'}\ntrain:\n  nope: 1\n")
    with pytest.raises(config_lib.ConfigError, match="unknown key.*nope"):
        config_lib.load(tmp_path / "bad.yaml")


@pytest.mark.parametrize("override, message", [
    ("train.lr=abc", "expected a number"),
    ("train.micro_batch_size=1.5", "expected an integer"),
    ("model.lora.enabled=maybe", "expected true/false"),
    ("train.nope=1", "unknown key 'train.nope'"),
    ("model.modalities=image", "expected a list"),
    ("train.betas=[0.9]", r"train\.betas: expected a list of 2 values"),
    ("train.token_rows=some", "train.token_rows: 'some'; allowed: new, all, none"),
    ("train.trainable=[input_proj, decoder]", r"train\.trainable\[1\]: 'decoder'; allowed: input_proj"),
    ("model.quantization=8", "model.quantization: 8; allowed: none, 8bit, 4bit"),
])
def test_config_wrong_override(override, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.load(REPO / "code" / "config" / "stage_1.yaml", [override])


def test_config_betas_tuple_dumps_as_a_list(tmp_path):
    cfg = config_lib.load(REPO / "code" / "config" / "stage_1.yaml", ["train.betas=[0.8, 0.99]"])
    assert cfg.train.betas == (0.8, 0.99)
    config_lib.save(cfg, tmp_path / "config.yaml")  # what a checkpoint keeps must load back to the same config
    assert config_lib.load(tmp_path / "config.yaml").to_dict() | {"source": ""} == cfg.to_dict() | {"source": ""}


def test_config_override_types_are_parsed():
    cfg = config_lib.load(REPO / "code" / "config" / "stage_1.yaml",
                          ["train.lr=1e-4", "train.micro_batch_size=3", "model.modalities=[image, audio]"])
    assert cfg.train.lr == 1e-4 and cfg.train.micro_batch_size == 3 and cfg.model.modalities == ["image", "audio"]


def test_config_circular_base(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(config_lib.ConfigError, match="circular"):
        config_lib.load(tmp_path / "a.yaml")


def test_config_paths_resolve_against_the_repo(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    cfg = config_lib.load(REPO / "code" / "config" / "tiny" / "stage_1.yaml")
    assert cfg.path(cfg.model.llm) == REPO / "ckpt" / "tiny" / "vicuna"


# ----------------------------------------------------------------------------------------------------------------
# Make targets and git hygiene

def _make(*args) -> str:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    result = subprocess.run(["make", "-C", str(REPO), "-n", *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_make_targets_run_the_scripts():
    assert "scripts/tiny/make_tiny_ckpt.py --out ckpt/tiny" in _make("-B", "tiny")
    assert "scripts/tiny/make_toy_data.py --out data/toy" in _make("-B", "toy-data")
    assert "scripts/check_ckpt.py --config code/config/stage_3.yaml" in _make("check-ckpt")
    assert "scripts/check_ckpt.py --config code/config/tiny/stage_3.yaml" in _make("check-ckpt", "CONFIG=tiny")


def test_generated_folders_are_ignored_by_git():
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    generated = ["data/toy/.complete", "data/toy/T_X_pair_data/cc3m/cc3m.json", "ckpt/tiny/vicuna/config.json",
                 "ckpt/pretrained_ckpt/imagebind_ckpt/huge/imagebind_huge.pth", "data/embed/x.jpg.npy",
                 ".venv/bin/python", "runs/demo/loss.png"]
    result = subprocess.run(["git", "-C", str(REPO), "check-ignore", "--no-index", *generated],
                            capture_output=True, text=True)
    assert sorted(result.stdout.split()) == sorted(generated)
    tracked = subprocess.run(["git", "-C", str(REPO), "ls-files", "data", "ckpt"], capture_output=True,
                             text=True).stdout.split()
    assert tracked == ["ckpt/README.md", "data/README.md"]
