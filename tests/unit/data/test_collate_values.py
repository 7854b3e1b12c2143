"""Cached vectors are checked where they are read (issue 26): store.StoreReader.get and the collator."""

from __future__ import annotations

import numpy as np
import pytest

from nextgpt import store


@pytest.mark.parametrize("layout", ["files", "shards"])
def test_vectors_are_checked_where_they_are_read(tmp_path, layout):
    """A vector changed after it was written (NaN, complex64, string, another float dtype) is refused by the
    reader in one message naming its file or shard row; the collator adds the record, or under skip_bad leaves
    the record out and names it in batch["skipped"]."""
    from nextgpt.data.collate import Collator
    from nextgpt.data.types import Encoded, Media, Sample

    section = store.Section(encoder="imagebind", shape=[4], dtype="float32")
    writer = store.StoreWriter(tmp_path, store.KINDS[1], "image", section, layout)
    writer.put(["a.jpg", "b.jpg"], np.ones((2, 4), np.float32))
    writer.close()
    store.finish_share(tmp_path, store.KINDS[1], "image", section, layout, 0, 1)
    reader = store.StoreReader(tmp_path)
    assert reader.get("a.jpg").dtype == np.float32
    if layout == "shards":                              # a shard row turned NaN in place
        entry = reader._entry("b.jpg")
        shard = np.load(entry[0], mmap_mode="r+")
        shard[entry[1], 2] = np.nan
        shard.flush()
        del shard
        with pytest.raises(store.StoreError, match=rf"{entry[0]} row {entry[1]}: b.jpg holds 1 non-finite"):
            store.StoreReader(tmp_path).get("b.jpg")
    else:
        item = store.item_path(tmp_path, "b.jpg")
        for bad, message in [(np.array([1, np.nan, 0, 0], np.float32), "holds 1 non-finite value"),
                             (np.ones(4, np.complex64), "dtype complex64, not a real floating type"),
                             (np.array(["1", "2", "3", "4"]), "dtype <U1, not a real floating type"),
                             (np.ones(4, np.float64), "dtype float64, the manifest says float32"),
                             (np.ones(5, np.float32), r"shape \(5,\), the manifest says \(4,\)")]:
            item.unlink()
            np.save(item, bad)
            with pytest.raises(store.StoreError, match=rf"{item}: b.jpg has|{item}: b.jpg holds") as info:
                reader.get("b.jpg")
            assert message.replace("\\", "") in str(info.value) or pytest.fail(str(info.value))
        item.unlink()
        np.save(item, np.array([1, np.nan, 0, 0], np.float32))

    def encoded(name: str, record: int) -> Encoded:
        sample = Sample("x", "pairs.json", record, [], media=[Media("image", str(tmp_path / name), name)])
        return Encoded([1, 2], [1, 1], [1], sample, signal_blocks=[])

    class Ids:
        pad, signal = 0, {}

    batch = [encoded("a.jpg", 0), encoded("b.jpg", 1)]
    with pytest.raises(store.StoreError, match=r"b.jpg holds 1 non-finite .*\(ImageBind feature of pairs.json "
                                               r"record 1\)"):
        Collator(Ids(), feature_dir=tmp_path)(batch)
    out = Collator(Ids(), feature_dir=tmp_path, skip_bad=True)(batch)
    assert [s.where for s in out["samples"]] == ["pairs.json record 0"] and out["media_features"].shape == (1, 4)
    assert len(out["skipped"]) == 1 and "pairs.json record 1" in out["skipped"][0]
    with pytest.raises(ValueError, match="no good record left"):
        Collator(Ids(), feature_dir=tmp_path, skip_bad=True)(batch[1:])
