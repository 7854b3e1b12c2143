"""Webdataset tar shards as a media source (nextgpt/store/tars.py, prepare_data --tars): the toy cc3m media
written as img2dataset's webdataset output and as its "files" output give the same pair JSON, the same ImageBind
features and caption embeddings bit for bit; a killed sharded precompute resumes at shard granularity; bad
members are named (shard and key) or counted; validation covers shards; live encoding reads members (a member
read by offset without scanning: tests/unit/store/test_tars_index.py)."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

import prepare_data
import process_embeddings
import validate_data
from nextgpt import store
from nextgpt.store import tars
from tiny import toy_tars

REPO = Path(__file__).resolve().parents[2]
PER_SHARD = 8                   # 48 toy images -> 6 shards


def _prepare(root: Path, catalog: Path, *source: str, modality_args: tuple[str, ...] = ("img2dataset",)) -> Path:
    assert prepare_data.main([*modality_args, "--name", "webcc", *source, "--root", str(root),
                              "--catalog", str(catalog)]) == 0
    return root / "T_X_pair_data" / "webcc" / "webcc.json"


@pytest.fixture(scope="module")
def web(tiny_env, tmp_path_factory):
    """The toy cc3m images as 6 webdataset shards and as the same samples in folders, each prepared with
    prepare_data (tars: `tar_json`, files: `file_json`); a catalog of their own."""
    root = tmp_path_factory.mktemp("web")
    catalog = root / "catalog.yaml"
    shutil.copy(REPO / "code" / "config" / "catalog.yaml", catalog)
    samples = list(toy_tars.pair_samples(tiny_env.data / "T_X_pair_data" / "cc3m" / "cc3m.json", "image"))
    shards = toy_tars.write_shards(samples, root / "raw_tars", PER_SHARD)
    toy_tars.write_files(samples, root / "raw_files", PER_SHARD)
    spec = str(root / "raw_tars" / "{00000..00005}.tar")
    return dict(root=root, catalog=catalog, shards=shards, spec=spec, samples=samples,
                tar_json=_prepare(root / "t", catalog, "--tars", spec),
                file_json=_prepare(root / "f", catalog, "--src", str(root / "raw_files")))


def _features(json_path: Path, out: Path, tiny_env, *extra: str) -> int:
    return process_embeddings.main([str(json_path), "image", str(out), "--features", "--imagebind",
                                    str(tiny_env.imagebind), "--preset", "tiny", "--batch-size", "4", *extra])


def _items(folder: Path) -> dict[str, np.ndarray]:
    reader = store.StoreReader(folder)
    names = sorted(p.name[:-4] for p in folder.glob("*.npy") if not p.name.startswith("."))
    return {n: reader.get(n) for n in names}


def test_prepare_writes_the_same_json_and_an_index_instead_of_files(web):
    tar_json, file_json = web["tar_json"], web["file_json"]
    assert tar_json.read_text() == file_json.read_text()              # same names, same captions, same order
    media = tar_json.parent / "images"
    assert sorted(p.name for p in media.iterdir()) == sorted([tars.INDEX_JSON, tars.INDEX_ARRAY])   # none per medium
    records = json.loads(tar_json.read_text())
    members = tars.locate_many([media / r["image_name"] for r in records])
    for record, member in zip(records, members):
        expected = (file_json.parent / "images" / record["image_name"]).read_bytes()
        assert member is not None and tars.read_member(member).data == expected
    assert {m.shard for m in members} == set(web["shards"])
    meta = json.loads((media / tars.INDEX_JSON).read_text())
    assert meta["count"] == 48 and [s["path"] for s in meta["shards"]] == [
        f"../../../../raw_tars/{k:05d}.tar" for k in range(6)]       # relative to the media folder


def test_features_and_caption_embeddings_equal_the_files_dataset(web, tiny_env, tmp_path, monkeypatch):
    """Bit-identical to the same dataset as files (batches of 4 fall on the same items: 8 per shard); two shares
    over the shards write what one process writes, each share reading whole shards (shards 0, 2, 4 / 1, 3, 5)."""
    assert _features(web["tar_json"], tmp_path / "ft", tiny_env) == 0
    assert _features(web["file_json"], tmp_path / "ff", tiny_env) == 0
    from_tars, from_files = _items(tmp_path / "ft"), _items(tmp_path / "ff")
    assert len(from_files) == 48 and from_tars.keys() == from_files.keys()
    assert all(np.array_equal(from_tars[n], from_files[n]) and from_tars[n].dtype == from_files[n].dtype
               for n in from_files)
    assert (tmp_path / "ft" / "manifest.json").read_text() == (tmp_path / "ff" / "manifest.json").read_text()

    read_shards = []
    real_read = tars.ShardSet.read
    monkeypatch.setattr(tars.ShardSet, "read", lambda self, m: read_shards.append(m.row) or real_read(self, m))
    for k in range(2):            # batch 5 does not divide a shard: batches are cut within each shard
        assert _features(web["tar_json"], tmp_path / "two", tiny_env, "--shard", f"{k}/2", "--batch-size", "5",
                         "--workers", "0") == 0
        assert sorted(set(read_shards)) == [k, k + 2, k + 4]
        read_shards.clear()
    assert _features(web["tar_json"], tmp_path / "one", tiny_env, "--batch-size", "5") == 0
    one, two = _items(tmp_path / "one"), _items(tmp_path / "two")
    assert one.keys() == two.keys() and all(np.array_equal(one[n], two[n]) for n in one)
    assert store.read_manifest(tmp_path / "two").modalities["image"].count == 48

    decoder = tiny_env.ckpt / "stable-diffusion"
    for json_path, out in ((web["tar_json"], tmp_path / "et"), (web["file_json"], tmp_path / "ef")):
        assert process_embeddings.main([str(json_path), "image", str(out), "--decoder", str(decoder),
                                        "--batch-size", "8"]) == 0
    embeds_t, embeds_f = _items(tmp_path / "et"), _items(tmp_path / "ef")
    assert len(embeds_f) == 48 and all(np.array_equal(embeds_t[n], embeds_f[n]) for n in embeds_f)


def test_killed_sharded_precompute_resumes_at_shard_granularity(web, tiny_env, tmp_path, monkeypatch):
    """Killed in the 4th batch (shard 0 and half of shard 1 written): the rerun opens neither shard 0 nor the
    done half of shard 1, encodes the 36 items left, and the result equals an uninterrupted run."""
    from nextgpt.imagebind.encode import Encoder

    real_encode = Encoder.encode_tensors
    calls = []

    def killed_in_fourth_batch(self, modality, batch):
        calls.append(len(batch))
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_encode(self, modality, batch)

    monkeypatch.setattr(Encoder, "encode_tensors", killed_in_fourth_batch)
    with pytest.raises(KeyboardInterrupt):
        process_embeddings.run(process_embeddings._parser().parse_args(
            [str(web["tar_json"]), "image", str(tmp_path / "out"), "--features", "--imagebind", str(tiny_env.imagebind),
             "--preset", "tiny", "--batch-size", "4", "--workers", "0"]))
    assert len(_items(tmp_path / "out")) == 12
    monkeypatch.setattr(Encoder, "encode_tensors", real_encode)
    read = []
    real_read = tars.ShardSet.read
    monkeypatch.setattr(tars.ShardSet, "read", lambda self, m: read.append(m) or real_read(self, m))
    assert _features(web["tar_json"], tmp_path / "out", tiny_env, "--workers", "0") == 0
    assert len(read) == 36 and 0 not in {m.row for m in read}
    assert sorted(m.member for m in read if m.row == 1) == [f"{i:09d}.jpg" for i in range(12, 16)]
    assert _features(web["tar_json"], tmp_path / "whole", tiny_env) == 0
    resumed, whole = _items(tmp_path / "out"), _items(tmp_path / "whole")
    assert resumed.keys() == whole.keys() and all(np.array_equal(resumed[n], whole[n]) for n in whole)


@pytest.fixture
def broken(web, tmp_path):
    """Shards with one undecodable member, one truncated member (the shard cut inside it), one key without a
    caption, prepared; and the pair JSON with one more record naming a member absent from the shards."""
    samples = list(web["samples"][:16])
    key, ext, _, caption = samples[3]
    samples[3] = (key, ext, b"not an image at all" * 10, caption)
    shards = toy_tars.write_shards(samples, tmp_path / "raw", PER_SHARD)
    # shard 1 without its last sample's caption, then cut 100 bytes into its last image
    with tarfile.open(shards[1]) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shards[1], "w") as tar:
        for m, data in members:
            if m.name != "000000014.txt" and m.name != "000000014.json":
                tar.addfile(m, io.BytesIO(data))
    with tarfile.open(shards[1]) as tar:
        last = [m for m in tar.getmembers() if m.name == "000000015.jpg"][0]
    with open(shards[1], "r+b") as f:
        f.truncate(last.offset_data + 100)
    json_path = _prepare(tmp_path / "data", web["catalog"], "--tars", str(tmp_path / "raw" / "{00000..00001}.tar"))
    records = json.loads(json_path.read_text())
    records.append({"image_name": "webcc_999999999.jpg", "caption": "a red circle on a blue background"})
    json_path.write_text(json.dumps(records))
    return dict(json=json_path, shards=shards, bad_member=f"{shards[0]}:000000003.jpg", records=records)


def test_bad_members_are_named_with_shard_and_key_or_counted(broken, tiny_env, tmp_path, capsys):
    missing = (broken["json"].parent / "missing.txt").read_text().splitlines()
    shard1 = broken["shards"][1]
    assert any(line.startswith(f"{shard1}:000000015: 000000015.jpg is truncated") for line in missing)
    assert any(line.startswith(f"{shard1}:000000014: empty caption") for line in missing)
    assert len(broken["records"]) == 16 - 2 + 1
    capsys.readouterr()
    # the absent member: one line naming the index, before the model loads
    assert _features(broken["json"], tmp_path / "f", tiny_env, "--workers", "0") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and "webcc_999999999.jpg: media file missing" in err[0]
    good = broken["records"][:-1]
    broken["json"].write_text(json.dumps(good))
    # the undecodable member: one line naming shard and key and the record
    assert _features(broken["json"], tmp_path / "f", tiny_env, "--workers", "0") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and broken["bad_member"] in err[0] and f"{broken['json']} record 3" in err[0]
    broken["json"].write_text(json.dumps(broken["records"]))
    assert _features(broken["json"], tmp_path / "f", tiny_env, "--set", "data.skip_bad_records=true") == 0
    out = capsys.readouterr().out
    assert "skipping 1 missing image file(s) (first: " in out and "webcc_999999999.jpg" in out
    assert f"skipped 1 unusable medium (first: {broken['bad_member']}: " in out
    assert store.read_manifest(tmp_path / "f").modalities["image"].count == 13


def _validate(tiny_env, catalog: Path, root: Path, *extra: str) -> list[str]:
    overrides = [o for o in tiny_env.overrides if not o.startswith(("data.root=", "data.feature_dir="))]
    return ["--config", str(REPO / "code" / "config" / "tiny" / "stage_1.yaml"),
            *[a for o in overrides for a in ("--set", o)], "--set", f"data.root={root}", "--set",
            f"data.catalog={catalog}", "--set", f"data.feature_dir={root / 'no_features'}", "--datasets", "webcc_enc",
            *extra]


def test_validate_covers_shards(broken, web, tiny_env, capsys):
    root = broken["json"].parents[2]
    assert validate_data.main(_validate(tiny_env, web["catalog"], root)) == 1
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("webcc_enc"))
    assert row.split()[1:5] == ["15", "13", "1", "1"]                 # records ok missing corrupt
    assert f"record 3: {broken['bad_member']}: " in out
    assert "record 14: " in out and "webcc_999999999.jpg: media file missing (not in the shard index" in out
    # a shard rewritten since its index was built: its records are refused naming it, the others stay usable
    shard0 = broken["shards"][0]
    shard0.write_bytes(shard0.read_bytes())
    tars.forget(broken["json"].parent / "images")
    assert validate_data.main(_validate(tiny_env, web["catalog"], root, "--no-decode")) == 1
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("webcc_enc"))
    assert row.split()[1:5] == ["15", "6", "1", "8"]
    assert f"{shard0}: shard changed since its index was built" in out


def test_live_encoding_reads_members(web, tiny_env):
    """Stage-3 live media (and the app, eval): the encoder given the media paths of the tar-backed dataset
    computes what it computes from the files."""
    from nextgpt.imagebind.encode import Encoder

    names = [r["image_name"] for r in json.loads(web["tar_json"].read_text())[:6]]
    encoder = Encoder(tiny_env.imagebind, "tiny", device="cpu")
    from_tars = encoder.encode([str(web["tar_json"].parent / "images" / n) for n in names], "image", batch_size=3)
    from_files = encoder.encode([str(web["file_json"].parent / "images" / n) for n in names], "image", batch_size=3)
    assert from_tars.shape == (6, encoder.out_dim) and bool((from_tars == from_files).all())
    assert all(tars.media_exists(web["tar_json"].parent / "images" / n) for n in names)
    assert not tars.media_exists(web["tar_json"].parent / "images" / "webcc_999.jpg")


@pytest.mark.parametrize("modality,folder", [("video", "webvid"), ("audio", "audiocap")])
def test_video_and_audio_members_decode_as_their_files(tiny_env, tmp_path, modality, folder):
    """prepare_data webdataset --modality: a video / audio member goes through its loader (PyAV / soundfile on
    the member's bytes) to exactly the tensor its file gives."""
    from nextgpt.imagebind.encode import LOADERS

    pair_json = tiny_env.data / "T_X_pair_data" / folder / f"{folder}.json"
    samples = list(toy_tars.pair_samples(pair_json, modality))[:3]
    toy_tars.write_shards(samples, tmp_path / "raw", 2)
    catalog = tmp_path / "catalog.yaml"
    shutil.copy(REPO / "code" / "config" / "catalog.yaml", catalog)
    json_path = _prepare(tmp_path / "data", catalog, "--modality", modality, "--tars",
                         str(tmp_path / "raw" / "{00000..00001}.tar"), modality_args=("webdataset",))
    key = f"{modality}_name"
    records = json.loads(json_path.read_text())
    originals = [r[key] for r in json.loads(pair_json.read_text())[:3]]
    media = json_path.parent / ("videos" if modality == "video" else "audios")
    for record, original in zip(records, originals):
        from_member = LOADERS[modality](str(media / record[key]))
        from_file = LOADERS[modality](str(pair_json.parent / media.name / original))
        assert torch.equal(from_member, from_file)
