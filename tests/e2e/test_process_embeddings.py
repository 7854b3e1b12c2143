"""code/process_embeddings.py on the tiny pipelines: what the decoders' own encode_prompt computes, skip / resume,
atomic writes, every JSON format, the seed's call from code/ and from the root."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import process_embeddings
from nextgpt import store
from nextgpt.data import embeddings as emb
from nextgpt.data.records import normalize_caption

REPO = Path(__file__).resolve().parents[2]
SAMPLES = (REPO.parent / "shared").resolve() / "samples" / "nextgpt"   # resolved: ../shared may be a symlink


@pytest.fixture(scope="module")
def pipelines(tiny_env):
    return {"image": tiny_env.ckpt / "stable-diffusion", "video": tiny_env.ckpt / "zeroscope",
            "audio": tiny_env.ckpt / "audioldm"}


def _pipeline_embeds(modality: str, folder: Path, captions: list[str]) -> np.ndarray:
    """What the diffusers pipeline itself computes for these prompts (no classifier-free guidance)."""
    import diffusers

    cls = getattr(diffusers, {"image": "StableDiffusionPipeline", "video": "TextToVideoSDPipeline",
                              "audio": "AudioLDMPipeline"}[modality])
    pipe = cls.from_pretrained(str(folder))
    with torch.no_grad():
        if modality == "audio":
            out = pipe._encode_prompt(captions, "cpu", 1, False)                       # (B, D), normalised
        else:
            out, _ = pipe.encode_prompt(captions, "cpu", 1, False)                     # (B, 77, D)
    return out.float().numpy()


def _names_and_captions(json_path: Path, modality: str) -> dict[str, str]:
    from nextgpt.data.readers import read_file

    out = {}
    for s in read_file(json_path, dataset="x", role="dec", embed_dir="/e").samples:
        for t in s.targets:
            if t.modality == modality:
                out[Path(t.embed_path).name[:-4]] = t.caption
    return out


@pytest.mark.parametrize("modality,relative", [
    ("image", "T_X_pair_data/cc3m/cc3m.json"),                         # raw pair file
    ("video", "T_X_pair_data/webvid/webvid_generation.json"),          # generation file
    ("audio", "IT_data/T-T+X_data/audio_instruction_tuning.json"),     # new instruction file
    ("image", "IT_data/T-T+X_data/image_t2x.json"),                    # legacy t2x
    ("video", "IT_data/MosIT_data/mosit_instruction_tuning.json"),     # MosIT
])
def test_embeddings_equal_the_pipelines_own_encode_prompt(tiny_env, pipelines, tmp_path, modality, relative):
    json_path = tiny_env.data / relative
    out = tmp_path / "embed"
    assert process_embeddings.main([str(json_path), modality, str(out), "--decoder", str(pipelines[modality]),
                                    "--batch-size", "5"]) == 0
    items = _names_and_captions(json_path, modality)
    assert items, relative
    names = sorted(items)
    stored = np.stack([np.load(out / f"{n}.npy") for n in names])
    expected = _pipeline_embeds(modality, pipelines[modality], [items[n] for n in names])
    shape = emb.stored_shape(modality, pipelines[modality])
    assert stored.shape == (len(names), *shape) and stored.dtype == np.float32
    assert len(shape) == (1 if modality == "audio" else 2) and (modality == "audio" or shape[0] == 77)
    np.testing.assert_allclose(stored, expected, rtol=0, atol=2e-5)
    if modality == "audio":
        np.testing.assert_allclose(np.linalg.norm(stored, axis=-1), 1.0, atol=1e-5)
    manifest = store.read_manifest(out, emb.KIND).modalities[modality]
    assert manifest.shape == list(shape) and manifest.dtype == "float32" and manifest.count == len(names)
    assert manifest.encoder == str(pipelines[modality].resolve())


def test_captions_are_normalised_before_embedding(tiny_env, pipelines, tmp_path):
    json_path = tmp_path / "cc3m.json"
    json_path.write_text(json.dumps([{"caption": "A RED (circle): on; a ~blue~ background", "image_name": "q.jpg"}]))
    out = tmp_path / "embed"
    assert process_embeddings.main([str(json_path), "image", str(out), "--decoder", str(pipelines["image"])]) == 0
    expected = _pipeline_embeds("image", pipelines["image"], [normalize_caption("A RED (circle): on; a ~blue~ "
                                                                                "background")])
    np.testing.assert_allclose(np.load(out / "q.jpg.npy")[None], expected, atol=2e-5)


def test_rerun_does_nothing_and_killed_run_resumes(tiny_env, pipelines, tmp_path, monkeypatch, capsys):
    json_path = tiny_env.data / "T_X_pair_data" / "audiocap" / "audiocap.json"
    out = tmp_path / "embed"
    args = [str(json_path), "audio", str(out), "--decoder", str(pipelines["audio"]), "--fp16"]
    assert process_embeddings.main(args) == 0
    files = sorted(out.glob("*.npy"))
    assert len(files) == len(json.loads(json_path.read_text()))
    assert all(np.load(f).dtype == np.float16 for f in files)
    reference = {f.name: np.load(f) for f in files}
    stamps = {f.name: f.stat().st_mtime_ns for f in files}

    # A rerun loads no model and rewrites nothing.
    def refuse(*a, **k):
        raise AssertionError("the text encoder was loaded on a rerun with nothing to do")

    monkeypatch.setattr(emb, "CaptionEncoder", refuse)
    capsys.readouterr()
    assert process_embeddings.main(args) == 0
    assert "audio: 0 written" in capsys.readouterr().out
    assert {f.name: f.stat().st_mtime_ns for f in out.glob("*.npy")} == stamps
    monkeypatch.undo()

    # A killed run: one file truncated (a non-atomic writer), one missing, a temp file of an atomic write left.
    truncated, removed = files[0], files[1]
    truncated.write_bytes(truncated.read_bytes()[:100])
    removed.unlink()
    stale = out / f".{removed.name}.k1ll3d.tmp"
    stale.write_bytes(b"partial")
    assert process_embeddings.main(args) == 0
    assert not stale.exists()
    for f in files:
        assert emb.check_npy(f, (16,)) is None
        np.testing.assert_array_equal(np.load(f), reference[f.name])
    assert {f.name for f in out.iterdir()} == {f.name for f in files} | {"manifest.json", "captions-audio.tsv"}


def test_write_error_stops_the_run_naming_the_file(tiny_env, pipelines, tmp_path, monkeypatch, capsys):
    import nextgpt.io

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(nextgpt.io.os, "fsync", full_disk)          # the batch's fsync pass, on the writer thread
    json_path = tiny_env.data / "T_X_pair_data" / "cc3m" / "cc3m.json"
    first = json.loads(json_path.read_text())[0]["image_name"]
    rc = process_embeddings.main([str(json_path), "image", str(tmp_path / "e"), "--decoder", str(pipelines["image"])])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "%|" not in line]  # minus tqdm's bar
    assert rc == 2 and len(err) == 1 and "Traceback" not in err[0]
    assert err[0].startswith("error: ") and f"{first}.npy" in err[0] and "No space left" in err[0]
    assert not list((tmp_path / "e").glob("*.npy")) and not list((tmp_path / "e").glob(".*.tmp"))


def test_batch_writer_is_atomic_and_overlaps(tmp_path, monkeypatch):
    """ItemWriter: every item of a batch appears complete or not at all, temps never stay, errors name the file."""
    import threading

    import nextgpt.io
    from nextgpt.store.files import ItemWriter, item_path, remove_stale_temps

    arrays = np.arange(3 * 4, dtype=np.float64).reshape(3, 4)
    with ItemWriter(tmp_path, "float16") as writer:
        writer.put(["a.jpg", "b.jpg", "c.jpg"], arrays)
        arrays[:] = -1                                   # the writer copied the batch
    for i, name in enumerate(["a.jpg", "b.jpg", "c.jpg"]):
        stored = np.load(item_path(tmp_path, name))
        assert stored.dtype == np.float16 and stored.tolist() == list(range(4 * i, 4 * i + 4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jpg.npy", "b.jpg.npy", "c.jpg.npy"]

    # The files are written on another thread than the caller's.
    threads = set()
    real_fsync = nextgpt.io.os.fsync
    monkeypatch.setattr(nextgpt.io.os, "fsync", lambda fd: (threads.add(threading.get_ident()), real_fsync(fd)))
    with ItemWriter(tmp_path / "t", "float32") as writer:
        writer.put(["x.wav"], np.zeros((1, 2)))
    assert threads and threading.get_ident() not in threads

    # A rename failing midway: the renamed items are complete, the rest absent, no temp file left, error names it.
    real_replace = nextgpt.io.os.replace

    def fail_second(src, dst):
        if str(dst).endswith("e.jpg.npy"):
            raise OSError(5, "Input/output error")
        real_replace(src, dst)

    monkeypatch.setattr(nextgpt.io.os, "replace", fail_second)
    writer = ItemWriter(tmp_path / "f", "float32")
    writer.put(["d.jpg", "e.jpg", "f.jpg"], np.ones((3, 2)))
    with pytest.raises(OSError, match=r"e\.jpg\.npy: write failed \(Input/output error\)"):
        writer.close()
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == ["d.jpg.npy"]
    monkeypatch.undo()

    # remove_stale_temps removes what a killed writer left for the run's items (and the manifest), nothing else.
    (tmp_path / ".a.jpg.npy.k1ll3d.tmp").write_bytes(b"partial")
    (tmp_path / ".manifest.json.x1.tmp").write_bytes(b"{")
    (tmp_path / ".other.jpg.npy.x2.tmp").write_bytes(b"someone else's")
    assert remove_stale_temps(tmp_path, ["a.jpg", "b.jpg"]) == 2
    assert sorted(p.name for p in tmp_path.glob(".*")) == [".other.jpg.npy.x2.tmp"]


@pytest.mark.parametrize("argv,message", [
    (["{json}", "smell", "{out}"], "modality 'smell'"),
    (["{data}/nope.json", "image", "{out}"], "nope.json: data file not found"),
    (["{json}", "video", "{out}"], "no video caption targets"),
    (["{json}", "image"], "expected <json> <image|video|audio> <out_dir>"),
])
def test_errors_are_one_line(tiny_env, tmp_path, capsys, argv, message):
    json_path = tiny_env.data / "T_X_pair_data" / "cc3m" / "cc3m.json"
    argv = [a.format(json=json_path, out=tmp_path, data=tiny_env.data) for a in argv]
    assert process_embeddings.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


@pytest.mark.skipif(not (SAMPLES / "T_X_pair_data").is_dir(), reason=f"real NExT-GPT samples not at {SAMPLES}")
def test_seed_call_from_code_dir_on_real_samples_loads_only_the_text_encoder(pipelines, tmp_path):
    """`cd code && python process_embeddings.py ../<json> image ../<out> <decoder>` (4th positional as the seed):
    relative paths from code/, real sample JSON, and no diffusers import (so no UNet / VAE is ever loaded)."""
    json_path = SAMPLES / "T_X_pair_data" / "cc3m" / "cc3m.json"
    out = tmp_path / "embed"
    code = REPO / "code"
    rel = lambda p: os.path.relpath(p, code)  # noqa: E731 - "../../tmp/..." like the seed's ../data/...
    # -X importtime lists every module imported: diffusers (hence UNet / VAE classes) must not be among them
    proc = subprocess.run([sys.executable, "-X", "importtime", "process_embeddings.py", rel(json_path), "image",
                           rel(out), rel(pipelines["image"])], cwd=code, capture_output=True, text=True, timeout=300)
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time")]
    assert "transformers" in imported and not any(m.split(".")[0] == "diffusers" for m in imported)
    assert proc.returncode == 0, proc.stderr[-2000:]
    raw = json.loads(json_path.read_text())
    shape = emb.stored_shape("image", pipelines["image"])
    for record in raw:
        assert emb.check_npy(out / f"{record['image_name']}.npy", shape) is None
    assert store.read_manifest(out, emb.KIND).modalities["image"].count == len(raw)


def test_all_covers_every_target_of_stage_2_and_3(tiny_env, pipelines):
    from nextgpt.data.validate import validate

    embed_dir = tiny_env.embeddings()          # process_embeddings --config tiny/stage_2 --all (+ stage_3)
    sections = store.read_manifest(embed_dir, emb.KIND).modalities
    assert set(sections) == {"image", "video", "audio"}
    for modality, folder in pipelines.items():
        assert sections[modality].shape == list(emb.stored_shape(modality, folder))
    for stage in ("stage_2", "stage_3"):
        cfg = tiny_env.config(stage)
        report = validate(cfg, decode=False)
        assert report.ok, report.format()
    cfg = tiny_env.config("stage_3")
    from nextgpt.data.catalog import names
    report = validate(cfg, names(cfg), decode=False)        # MosIT and the new-layout files too
    assert report.ok, report.format()


def test_features_mode_writes_the_imagebind_cache(tiny_env):
    pytest.importorskip("nextgpt.imagebind.features")
    from nextgpt.data.validate import validate

    feature_dir = tiny_env.features()          # --config tiny/stage_1 --all --features (+ stage_3)
    manifest = json.loads((feature_dir / "manifest.json").read_text())
    assert manifest["kind"] == "imagebind_features"
    cfg = tiny_env.config("stage_1")
    for name in ("cc3m_enc", "webvid_enc", "audiocap_enc"):
        from nextgpt.data.catalog import resolve
        from nextgpt.data.readers import read_entry

        for sample in read_entry(resolve(cfg, name), prompt="p").samples:
            for medium in sample.media:
                shape = tuple(manifest["modalities"][medium.modality]["shape"])
                assert emb.check_npy(feature_dir / f"{medium.name}.npy", shape) is None
    assert validate(cfg, decode=False).ok


@pytest.mark.slow
@pytest.mark.parametrize("layout, signum", [("files", 2), ("shards", 15)], ids=["files-SIGINT", "shards-SIGTERM"])
def test_an_interrupted_precompute_leaves_no_temporary_file(tiny_env, tmp_path, layout, signum):
    """Ctrl-C or SIGTERM once items are being written: exit 128 + signal with one line, no dot-file (temporary
    .npy / shard, caption-hash log) left in the store, and the rerun completes every item from where it stopped."""
    import time

    out = tmp_path / "embed"
    command = [sys.executable, str(REPO / "code" / "process_embeddings.py"),
               *tiny_env.argv("stage_2", f"data.embed_dir={out}"), "--all", "--batch-size", "1", "--store", layout]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while process.poll() is None and not [p for p in out.rglob("*") if p.is_file()]:
        time.sleep(0.002)
    # Frozen the moment items are being written, the signal waits until SIGCONT: on a fast machine the whole
    # precompute ends within a sleep, and a signal during interpreter exit would test nothing.
    process.send_signal(signal.SIGSTOP)
    process.send_signal(signum)
    process.send_signal(signal.SIGCONT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, output
    assert output.strip().splitlines()[-1].startswith(f"error: interrupted by {signal_names[signum]}"), output
    assert [str(p.relative_to(out)) for p in out.rglob(".*")] == []
    assert subprocess.run(command, capture_output=True, text=True).returncode == 0
    assert [str(p.relative_to(out)) for p in out.rglob(".*")] == []
    from nextgpt import store

    whole = tmp_path / "uninterrupted"
    command[command.index(f"data.embed_dir={out}")] = f"data.embed_dir={whole}"
    assert subprocess.run(command, capture_output=True, text=True).returncode == 0
    counts = {m: s.count for m, s in store.read_manifest(out).modalities.items()}
    assert counts == {m: s.count for m, s in store.read_manifest(whole).modalities.items()} and all(counts.values())


signal_names = {2: "SIGINT", 15: "SIGTERM"}
