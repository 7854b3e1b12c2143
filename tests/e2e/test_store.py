"""nextgpt/store/ and dataset-scale precompute: sharded runs (2 processes == 1 process, killed share resumed),
the shard layout (round trip files <-> shards, half-written shards never read), caption hashes (an edited caption
is recomputed / reported stale), finite checks, refused foreign features, online == precomputed caption embeddings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import process_embeddings
from nextgpt import store
from nextgpt.data.records import normalize_caption

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def image_pairs(tiny_env) -> tuple[Path, Path]:
    """(the toy cc3m pair JSON, the tiny Stable Diffusion folder)."""
    return tiny_env.data / "T_X_pair_data" / "cc3m" / "cc3m.json", tiny_env.ckpt / "stable-diffusion"


def _embed(json_path: Path, decoder: Path, out: Path, *extra: str) -> int:
    return process_embeddings.main([str(json_path), "image", str(out), "--decoder", str(decoder),
                                    "--batch-size", "8", *extra])


def _items(folder: Path) -> dict[str, np.ndarray]:
    reader = store.StoreReader(folder)
    if reader.layout == "shards":
        names = sorted(store.shard_table(folder))
    else:
        names = sorted(p.name[:-4] for p in folder.glob("*.npy") if not p.name.startswith("."))
    return {n: reader.get(n) for n in names}


def test_shard_round_trip_and_two_shares_equal_one_run(image_pairs, tmp_path, capsys):
    json_path, decoder = image_pairs
    files = tmp_path / "files"
    assert _embed(json_path, decoder, files) == 0
    reference = _items(files)
    assert len(reference) == len(json.loads(json_path.read_text()))

    # Two shares (--shard K/N, as a scheduler's array job runs them) write exactly the bytes one run writes, and the
    # share that completes the set merges the one manifest.
    split = tmp_path / "split"
    assert _embed(json_path, decoder, split, "--shard", "1/2") == 0
    assert "other shares still to finish" in capsys.readouterr().out
    assert not (split / "manifest.json").exists()
    assert _embed(json_path, decoder, split, "--shard", "0/2") == 0
    assert store.read_manifest(split).modalities["image"].count == len(reference)
    assert not list(split.glob(".part-*"))
    for name, array in _items(split).items():
        assert np.array_equal(array, reference[name]), name

    # files -> shards -> files: the same vectors (float32 kept), a handful of files, hashes carried along.
    assert store.main(["convert", str(files), "--to", "shards"]) == 0
    manifest = store.read_manifest(files)
    assert manifest.store == "shards" and manifest.modalities["image"].count == len(reference)
    assert not list(files.glob("*.npy")) and len(list((files / "shards").iterdir())) == 2
    sharded = _items(files)
    assert sharded.keys() == reference.keys()
    assert all(np.array_equal(sharded[n], reference[n]) for n in reference)
    # a rerun of process_embeddings on the shard store finds every item done (hashes survived the conversion)
    capsys.readouterr()
    assert _embed(json_path, decoder, files, "--store", "shards", "--fp32") == 0
    assert "image: 0 written" in capsys.readouterr().out
    assert store.main(["convert", str(files), "--to", "files"]) == 0
    back = _items(files)
    assert all(np.array_equal(back[n], reference[n]) for n in reference)
    assert not (files / "shards").exists() and store.read_manifest(files).store == "files"
    # the wrong layout for a folder is one line naming the way out
    assert _embed(json_path, decoder, files, "--store", "shards") == 2
    assert "convert it" in capsys.readouterr().err


def test_shards_default_to_float16_and_half_written_shards_are_never_read(image_pairs, tmp_path):
    json_path, decoder = image_pairs
    out = tmp_path / "shards"
    assert _embed(json_path, decoder, out, "--store", "shards") == 0
    section = store.read_manifest(out).modalities["image"]
    assert section.dtype == "float16" and section.hashed and section.fingerprint
    first = _items(out)
    # A kill between a shard's two renames leaves an array without an index, or a temp file: neither is read,
    # and the writer of that share removes them on its next run.
    orphan = out / "shards" / "image-0of1-00007.npy"
    orphan.write_bytes(b"\x93NUMPY half written")
    temp = out / "shards" / ".image-0of1-00008.npy.x1.tmp"
    temp.write_bytes(b"partial")
    reader = store.StoreReader(out)
    assert all(np.array_equal(reader.get(n), a) for n, a in first.items())
    assert _embed(json_path, decoder, out, "--store", "shards") == 0
    assert not orphan.exists() and not temp.exists()
    # A damaged complete shard is one line naming it.
    shard = next((out / "shards").glob("image-*.npy"))
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(store.StoreError, match=f"{shard.name}: damaged shard"):
        store.StoreReader(out).get(next(iter(first)))


def test_killed_share_resumes(image_pairs, tmp_path, monkeypatch):
    """Share 1/2 is killed in its second batch; share 0/2 finishes (no manifest yet); rerunning share 1/2
    computes only what was lost, merges, and the result equals one uninterrupted process."""
    from nextgpt.data import embeddings as emb

    json_path, decoder = image_pairs
    reference = tmp_path / "one"
    assert _embed(json_path, decoder, reference, "--store", "shards") == 0
    expected = _items(reference)

    out = tmp_path / "split"
    seen: list[int] = []
    original = emb.CaptionEncoder.encode

    def killed_on_second_batch(self, captions):
        seen.append(len(captions))
        if len(seen) == 2:
            raise KeyboardInterrupt
        return original(self, captions)

    monkeypatch.setattr(emb.CaptionEncoder, "encode", killed_on_second_batch)
    # the entry point turns the interrupt into an error line and exit 130 (nextgpt.cli), as Ctrl-C would
    assert _embed(json_path, decoder, out, "--shard", "1/2", "--store", "shards") == 130
    assert len(store.shard_table(out)) == 8                  # the first batch reached the disk
    monkeypatch.setattr(emb.CaptionEncoder, "encode", original)
    assert _embed(json_path, decoder, out, "--shard", "0/2", "--store", "shards") == 0
    assert not (out / "manifest.json").exists()              # share 1 is not complete
    assert _embed(json_path, decoder, out, "--shard", "1/2", "--store", "shards", "--fp32") == 2   # dtype differs
    seen.clear()
    monkeypatch.setattr(emb.CaptionEncoder, "encode", lambda self, c: (seen.append(len(c)), original(self, c))[1])
    assert _embed(json_path, decoder, out, "--shard", "1/2", "--store", "shards") == 0
    share1 = sum(len(b) for b in store.share_batches(list(expected), 8, 1, 2))
    assert sum(seen) == share1 - 8                           # only what the kill lost
    manifest = store.read_manifest(out)
    assert manifest.store == "shards" and manifest.modalities["image"].count == len(expected)
    got = _items(out)
    assert got.keys() == expected.keys() and all(np.array_equal(got[n], expected[n]) for n in expected)


def test_two_processes_equal_one_process_bit_for_bit(tiny_env, tmp_path):
    """ImageBind features: two concurrent plain subprocesses with RANK / WORLD_SIZE (what deepspeed / torchrun
    set) write exactly the files one process writes, and one manifest."""
    records = json.loads((tiny_env.data / "T_X_pair_data" / "cc3m" / "cc3m.json").read_text())[:12]
    for r in records:
        r["image_name"] = str(tiny_env.data / "T_X_pair_data" / "cc3m" / "images" / r["image_name"])
    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps(records))

    def argv(out: Path) -> list[str]:
        return [str(pairs), "image", str(out), "--features", "--imagebind", str(tiny_env.imagebind), "--preset",
                "tiny", "--batch-size", "4", "--workers", "1"]

    one = tmp_path / "one"
    assert process_embeddings.main(argv(one)) == 0
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, str(REPO / "code" / "process_embeddings.py"), *argv(two)],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]
    names = sorted(p.name for p in one.glob("*.npy"))
    assert len(names) == 12 and names == sorted(p.name for p in two.glob("*.npy"))
    assert all((one / n).read_bytes() == (two / n).read_bytes() for n in names)
    assert (one / "manifest.json").read_text() == (two / "manifest.json").read_text()


def test_edited_caption_is_recomputed_and_reported_stale(image_pairs, tmp_path, tiny_env, capsys):
    from nextgpt.data.collate import Collator

    json_path, decoder = image_pairs
    records = json.loads(json_path.read_text())[:6]
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "embed"
    assert _embed(data, decoder, out) == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.npy")}
    edited = records[2]["image_name"]
    records[2]["caption"] = "a completely different caption"
    data.write_text(json.dumps(records))

    # Training reads it: the stale item is one line naming the file.
    from nextgpt.data.readers import read_file

    sample = next(s for s in read_file(data, dataset="x", role="dec", embed_dir=out).samples
                  if s.targets[0].embed_path.endswith(f"{edited}.npy"))
    collator = Collator(None, caption_shapes={})
    with pytest.raises(store.StoreError, match=f"{edited}.npy: stale caption embedding of {edited}"):
        collator._caption_embed(sample.targets[0], sample)
    assert store.check_item(sample.targets[0].embed_path, caption=sample.targets[0].caption) is not None

    # process_embeddings recomputes exactly that item.
    capsys.readouterr()
    assert _embed(data, decoder, out) == 0
    assert "image: 1 written, 5 already done" in capsys.readouterr().out
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.npy")}
    assert [n for n in after if after[n] != before[n]] == [f"{edited}.npy"]
    assert store.check_item(sample.targets[0].embed_path, caption=sample.targets[0].caption) is None
    assert collator._caption_embed(sample.targets[0], sample).shape == (77, 32)

    # The same media name with two different captions is an error naming both records.
    records.append({**records[0], "caption": "another caption"})
    data.write_text(json.dumps(records))
    assert _embed(data, decoder, out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{data} record 0" in err[0] and f"{data} record 6" in err[0]


def test_non_finite_vectors_are_refused_or_counted(tmp_path):
    section = store.Section(encoder="x", shape=[4], dtype="float16", hashed=True)
    writer = store.StoreWriter(tmp_path / "a", store.KINDS[0], "image", section)
    good, bad = np.ones((1, 4)), np.array([[1.0, np.nan, 0, 0]])
    with pytest.raises(store.StoreError, match="b.jpg: non-finite values"):
        writer.put(["a.jpg", "b.jpg"], np.concatenate([good, bad]), ["h" * 16, "h" * 16])
    overflow = np.array([[7e4, 0, 0, 0]])                       # finite in float32, inf in the float16 store
    with pytest.raises(store.StoreError, match="c.jpg: non-finite"):
        writer.put(["c.jpg"], overflow)
    writer.close()
    assert not list((tmp_path / "a").glob("*.npy"))            # nothing of a refused batch is written
    skipping = store.StoreWriter(tmp_path / "b", store.KINDS[0], "image", section, layout="shards", skip_bad=True)
    assert [n for n, _ in skipping.put(["a.jpg", "b.jpg", "c.jpg"], np.concatenate([good, bad, overflow]))] == [
        "b.jpg", "c.jpg"]
    skipping.close()
    assert list(store.shard_table(tmp_path / "b")) == ["a.jpg"]


def test_training_refuses_features_of_another_imagebind(tmp_path):
    from nextgpt.data.collate import Collator
    from nextgpt.imagebind.features import KIND, encoder_fingerprint

    checkpoint, other = tmp_path / "imagebind_huge.pth", tmp_path / "imagebind_other.pth"
    checkpoint.write_bytes(b"weights")
    other.write_bytes(b"other weights")
    features = tmp_path / "features"
    section = store.Section(encoder=f"{checkpoint}#huge", shape=[4], dtype="float32",
                            fingerprint=encoder_fingerprint(checkpoint, "huge"))
    writer = store.StoreWriter(features, KIND, "image", section, layout="shards")
    writer.put(["a.jpg"], np.ones((1, 4)))
    writer.close()
    store.merge(features, KIND, "image", section, "shards")
    assert Collator(None, feature_dir=features, feature_fingerprint=encoder_fingerprint(checkpoint, "huge"))
    with pytest.raises(store.StoreError, match="not by the configured imagebind_other.pth"):
        Collator(None, feature_dir=features, feature_fingerprint=encoder_fingerprint(other, "huge"))
    with pytest.raises(ValueError, match="refusing features of"):       # and process_embeddings refuses them
        from nextgpt.imagebind.features import write_feature_cache

        write_feature_cache([("a.jpg", tmp_path / "a.jpg")], "image", features, other, "huge", layout="shards")


def test_online_caption_embeddings_equal_precomputed(tiny_env, tmp_path):
    from nextgpt.model.caption_encoder import OnlineCaptionEmbeds, attach

    embed_dir = tiny_env.embeddings()                      # precomputed (float32) by process_embeddings --all
    cfg = tiny_env.config("stage_2", "data.caption_embeds=online")
    decoders = {m: cfg.path(cfg.model.decoders[m]) for m in cfg.model.modalities}
    online = OnlineCaptionEmbeds(decoders, "cpu", torch.float32)
    from nextgpt.data.readers import read_file

    texts: dict[str, list[str]] = {}
    stored: dict[str, list[np.ndarray]] = {}
    for relative, modality in [("T_X_pair_data/cc3m/cc3m.json", "image"), ("T_X_pair_data/webvid/webvid.json", "video"),
                               ("T_X_pair_data/audiocap/audiocap.json", "audio")]:
        samples = read_file(tiny_env.data / relative, dataset="x", role="dec", embed_dir=embed_dir).samples[:5]
        for s in samples:
            target = s.targets[0]
            texts.setdefault(modality, []).append(target.caption)
            stored.setdefault(modality, []).append(store.StoreReader(embed_dir).get(Path(target.embed_path).name[:-4],
                                                                                      caption=target.caption))
    out = online(texts)
    for modality, arrays in stored.items():
        expected = torch.from_numpy(np.stack(arrays))
        got = out[modality]
        assert got.dtype == torch.float32 and got.shape[0] == 5
        assert torch.allclose(got.reshape(expected.shape), expected, rtol=0, atol=1e-5), modality
        assert got.dim() == 3                                  # (n, T, D); pooled audio (n, 1, D)

    # Wired as a forward pre-hook: the batch's caption_texts become caption_embeds before forward runs.
    seen = {}

    class Model(torch.nn.Module):
        def forward(self, batch):
            seen.update(batch["caption_embeds"])
            return batch

    model = Model()
    assert attach(model, tiny_env.config("stage_2"), "cpu", torch.float32) is None     # precomputed: nothing
    assert attach(model, cfg, "cpu", torch.float32) is not None
    model({"caption_texts": {"image": texts["image"][:2]}, "caption_embeds": {}})
    assert torch.allclose(seen["image"], out["image"][:2], atol=1e-6)
    assert normalize_caption(texts["image"][0]) == texts["image"][0]


def test_collator_online_mode_carries_captions_and_validation_skips_embeddings(tiny_env, tmp_path):
    from nextgpt.data.dataset import build_loader
    from nextgpt.data.validate import validate
    from nextgpt.tokens import load_tokenizer

    cfg = tiny_env.config("stage_2", "data.caption_embeds=online", f"data.embed_dir={tmp_path / 'none'}",
                          "train.micro_batch_size=3")
    assert validate(cfg, decode=False).ok                   # no embeddings needed at all
    tokenizer, token_ids = load_tokenizer(cfg.path(cfg.model.llm))
    loader, _ = build_loader(cfg, tokenizer, token_ids)
    batch = next(iter(loader))
    assert batch["caption_embeds"] == {}
    counts = {m: len(v) for m, v in batch["caption_texts"].items()}
    assert sum(counts.values()) == sum(len(s.targets) for s in batch["samples"])
    assert batch["caption_texts"] == {m: [t.caption for s in batch["samples"] for t in s.targets if t.modality == m]
                                      for m in counts}


def test_undecodable_media_fail_in_one_line_or_are_counted_skips(tiny_env, tmp_path, capsys):
    """process_embeddings --features: a present file that does not decode names the file and its record, or with
    data.skip_bad_records is skipped, counted once and left out (the rest is written)."""
    source = tiny_env.data / "T_X_pair_data" / "cc3m"
    records = json.loads((source / "cc3m.json").read_text())[:5]
    (tmp_path / "images").mkdir()
    for r in records:
        os.symlink(source / "images" / r["image_name"], tmp_path / "images" / r["image_name"])
    broken = records[3]["image_name"]
    (tmp_path / "images" / broken).unlink()
    (tmp_path / "images" / broken).write_bytes(b"not an image at all" * 10)
    pairs = tmp_path / "cc3m.json"
    pairs.write_text(json.dumps(records))
    argv = [str(pairs), "image", str(tmp_path / "features"), "--features", "--imagebind", str(tiny_env.imagebind),
            "--preset", "tiny", "--batch-size", "2", "--workers", "0"]
    assert process_embeddings.main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and broken in err[0] and f"{pairs} record 3" in err[0]
    assert process_embeddings.main([*argv, "--set", "data.skip_bad_records=true"]) == 0
    out = capsys.readouterr().out
    assert f"skipped 1 unusable medium (first: {tmp_path / 'images' / broken}" in out
    written = sorted(p.name[:-4] for p in (tmp_path / "features").glob("*.npy"))
    assert written == sorted(r["image_name"] for r in records if r["image_name"] != broken)
    assert store.read_manifest(tmp_path / "features").modalities["image"].count == 4


def test_online_training_matches_precomputed(tiny_env, tmp_path):
    """train.py with data.caption_embeds=online (text encoders in the step, via the forward pre-hook) gives the
    losses of the precomputed run, step for step."""
    import train

    tiny_env.embeddings()
    losses = {}
    for mode in ("precomputed", "online"):
        out = tmp_path / mode
        assert train.main(tiny_env.argv("stage_2", f"train.output_dir={out}", "train.log_every=1", "train.init_from=",
                                        "train.max_steps=2", "data.datasets=[cc3m_dec]", "train.micro_batch_size=4",
                                        "train.save_every=0", f"data.caption_embeds={mode}")) == 0
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[mode] = [(r["loss"], r["image"]) for r in rows if "image" in r]
    assert len(losses["online"]) == 2
    np.testing.assert_allclose(losses["online"], losses["precomputed"], rtol=1e-5)


def test_shard_index_finds_every_row_and_the_newest_copy_wins(tmp_path):
    section = store.Section(encoder="x", shape=[3], dtype="float16", hashed=True)
    writer = store.StoreWriter(tmp_path, store.KINDS[0], "image", section, layout="shards", shard_bytes=20)  # 3 rows
    writer.put(["b.jpg", "a.jpg", "c.jpg", "d.jpg"], np.arange(12).reshape(4, 3), ["1" * 16, "2" * 16, "3" * 16, ""])
    writer.close()
    rewrite = store.StoreWriter(tmp_path, store.KINDS[0], "image", section, layout="shards", tag="later")
    rewrite.put(["a.jpg"], np.full((1, 3), 9.0), ["9" * 16])           # a.jpg re-embedded from another caption
    rewrite.close()
    store.merge(tmp_path, store.KINDS[0], "image", section, "shards")
    index = store.ShardIndex(tmp_path)
    assert len(index) == 4 and index.get("zz.jpg") is None
    assert index.get("d.jpg")[1:] == (0, "") and index.get("d.jpg")[0].name == "image-0of1-00001.npy"
    reader = store.StoreReader(tmp_path)
    assert reader.get("a.jpg").tolist() == [9, 9, 9] and reader.get("c.jpg").tolist() == [6, 7, 8]
    assert reader.stale("a.jpg", "some caption") is not None and store.read_manifest(tmp_path).modalities[
        "image"].count == 4
