"""nextgpt/store/tars.py on hand-made shards (no models, no subprocesses): the index finds every member and a
member is read by offset without parsing its shard; a shard changed since its index was built is refused for its
own members only; a cut shard is scanned up to the damage; precompute batches deal whole shards to ranks; the
loaders decode a member's bytes as they decode its file."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest

from nextgpt.store import StoreError, tars


def _shards(folder: Path, counts: list[int]) -> list[Path]:
    """Shards of `counts` samples each: <key>.bin holding distinct bytes, <key>.txt, written with webdataset."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    paths, key = [], 0
    for number, count in enumerate(counts):
        path = folder / f"{number:05d}.tar"
        with wds.TarWriter(str(path), encoder=False) as writer:
            for _ in range(count):
                writer.write({"__key__": f"{key:06d}", "bin": bytes([key % 251]) * (100 + key),
                              "txt": f"caption {key}".encode()})
                key += 1
        paths.append(path)
    return paths


def _index(folder: Path, shards: list[Path]) -> tars.ShardSet:
    entries = []
    for row, shard in enumerate(shards):
        members, damage = tars.scan_shard(shard)
        assert damage is None
        entries += [(f"ds_{m.name}", row, m.name, m.offset, m.size) for m in members if m.name.endswith(".bin")]
    stats = [(p, (p.stat().st_size, p.stat().st_mtime_ns)) for p in shards]
    tars.write_index(folder, stats, entries)
    tars.forget(folder)
    return tars.open_folder(folder)


def test_index_finds_every_member_and_reads_it_by_offset_without_scanning(tmp_path, monkeypatch):
    shards = _shards(tmp_path / "raw", [3, 4])
    media = tmp_path / "images"
    media.mkdir()
    shard_set = _index(media, shards)
    assert len(shard_set) == 7 and sorted(os.listdir(media)) == sorted([tars.INDEX_JSON, tars.INDEX_ARRAY])
    meta = json.loads((media / tars.INDEX_JSON).read_text())
    assert [s["path"] for s in meta["shards"]] == ["../raw/00000.tar", "../raw/00001.tar"]

    def no_scan(*args, **kwargs):
        raise AssertionError("the shard was parsed")

    monkeypatch.setattr(tarfile, "open", no_scan)
    monkeypatch.setattr(tarfile.TarFile, "next", no_scan)
    tars.forget(media)                                   # a fresh process state: the index is opened anew
    for key in range(7):
        blob = tars.read_media(media / f"ds_{key:06d}.bin")
        assert blob.data == bytes([key % 251]) * (100 + key)
        assert str(blob) == f"{shards[0 if key < 3 else 1]}:{key:06d}.bin"
    assert tars.read_media(media / "ds_999999.bin") is None
    assert tars.locate(media / ("ds_" + "9" * 40 + ".bin")) is None          # longer than any indexed name
    assert "not a member of the shards indexed in" in tars.missing_reason(media / "ds_999999.bin")
    plain = tmp_path / "plain"
    plain.mkdir()
    assert tars.locate(plain / "x.bin") is None and tars.missing_reason(plain / "x.bin") == f"{plain / 'x.bin'}: missing"


def test_a_changed_shard_is_refused_for_its_own_members(tmp_path):
    shards = _shards(tmp_path / "raw", [2, 2])
    media = tmp_path / "images"
    media.mkdir()
    _index(media, shards)
    shards[1].write_bytes(shards[1].read_bytes())        # rewritten: same size, new mtime
    tars.forget(media)
    assert tars.read_media(media / "ds_000001.bin").size == 101            # shard 0: still usable
    with pytest.raises(StoreError, match=rf"{shards[1]}: shard changed since its index was built"):
        tars.locate(media / "ds_000002.bin")
    shards[0].unlink()
    tars.forget(media)
    with pytest.raises(StoreError, match=rf"{shards[0]}: shard missing"):
        tars.locate(media / "ds_000000.bin")


def test_a_cut_shard_is_scanned_up_to_the_damage(tmp_path):
    (shard,) = _shards(tmp_path / "raw", [3])
    with tarfile.open(shard) as tar:
        last = [m for m in tar.getmembers() if m.name == "000002.bin"][0]
    with open(shard, "r+b") as f:
        f.truncate(last.offset_data + 10)
    members, _ = tars.scan_shard(shard)
    by_name = {m.name: m for m in members}
    assert not by_name["000001.bin"].truncated and by_name["000002.bin"].truncated
    assert tars.scan_shard(tmp_path / "absent.tar") == ([], f"{tmp_path / 'absent.tar'}: shard missing")


def test_precompute_batches_deal_whole_shards_and_keep_files_split(tmp_path):
    shards = _shards(tmp_path / "raw", [5, 3, 4])
    media = tmp_path / "images"
    media.mkdir()
    _index(media, shards)
    (media / "a.bin").write_bytes(b"a")                  # a plain file beside the index
    (media / "b.bin").write_bytes(b"b")
    names = ["a.bin", *[f"ds_{k:06d}.bin" for k in range(12)], "b.bin"]
    paths = {n: media / n for n in names}
    batches, members = tars.plan_batches(paths, 2, 0, 1)
    assert batches == [["a.bin", "b.bin"], ["ds_000000.bin", "ds_000001.bin"], ["ds_000002.bin", "ds_000003.bin"],
                       ["ds_000004.bin"], ["ds_000005.bin", "ds_000006.bin"], ["ds_000007.bin"],
                       ["ds_000008.bin", "ds_000009.bin"], ["ds_000010.bin", "ds_000011.bin"]]
    assert set(members) == set(names) - {"a.bin", "b.bin"}
    share0, _ = tars.plan_batches(paths, 2, 0, 2)
    share1, _ = tars.plan_batches(paths, 2, 1, 2)
    assert share0 == [["a.bin", "b.bin"], *batches[1:4], *batches[6:8]]      # file batch 0, shards 0 and 2
    assert share1 == batches[4:6]                                            # shard 1
    assert sorted(map(tuple, share0 + share1)) == sorted(map(tuple, batches))  # the same batches, disjoint


def test_loaders_decode_a_member_as_its_file(tmp_path):
    from PIL import Image

    from nextgpt.imagebind.preprocess import MediaError, load_image

    pixels = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    Image.fromarray(pixels).save(path)
    blob = tars.Blob("s.tar:x.png", path.read_bytes())
    assert bool((load_image(blob) == load_image(path)).all())
    with pytest.raises(MediaError, match=r"^s.tar:x.png: empty member"):
        load_image(tars.Blob("s.tar:x.png", b""))
    with pytest.raises(MediaError, match=r"^s.tar:x.png: not a readable image"):
        load_image(tars.Blob("s.tar:x.png", b"not an image" * 9))


def test_threads_read_members_of_many_shards(tmp_path):
    """Live encoding decodes in threads: reads from more shards than stay open (16) at once all return their bytes."""
    from concurrent.futures import ThreadPoolExecutor

    shards = _shards(tmp_path / "raw", [2] * 20)
    media = tmp_path / "images"
    media.mkdir()
    _index(media, shards)
    keys = list(range(40)) * 5
    with ThreadPoolExecutor(max_workers=4) as pool:
        read = list(pool.map(lambda k: tars.read_media(media / f"ds_{k:06d}.bin").data, keys))
    assert read == [bytes([k % 251]) * (100 + k) for k in keys]
