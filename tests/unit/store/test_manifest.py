"""nextgpt.store.manifest: the one manifest API (Manifest, Section, read_manifest / write_manifest) that caption
embeddings, ImageBind features, the collator and validation all read through."""

from __future__ import annotations

import pytest

from nextgpt.store import files
from nextgpt.store.manifest import Manifest, Section, StoreError, read_manifest, write_manifest


def test_one_manifest_reader_checks_the_kind(tmp_path):
    assert read_manifest(tmp_path) is None
    section = Section(encoder="enc", shape=[1024], dtype="float32", count=3)
    write_manifest(tmp_path, Manifest(kind="imagebind_features", modalities={"image": section}))
    manifest = read_manifest(tmp_path, "imagebind_features")
    assert manifest.section() == section and manifest.section("image") == section
    with pytest.raises(StoreError, match="holds imagebind_features, expected caption_embeddings"):
        read_manifest(tmp_path, "caption_embeddings")
    with pytest.raises(StoreError, match="no audio section"):
        manifest.section("audio")
    # no second view of the format beside it
    assert not hasattr(files, "Manifest") and not hasattr(files, "read_manifest")
