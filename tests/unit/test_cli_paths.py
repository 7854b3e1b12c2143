"""Command-line data paths take both of the seed's spellings (`T-X_pair_data` and `T_X_pair_data`), as the
catalog does."""

from __future__ import annotations

import json
import shutil

import process_embeddings
from nextgpt.data.catalog import spelled_path
from nextgpt.data.readers import read_file


def test_both_spellings_reach_the_file(tmp_path):
    folder = tmp_path / "T-X_pair_data" / "cc3m"            # on disk: the seed's hyphen spelling
    folder.mkdir(parents=True)
    (folder / "cc3m.json").write_text(json.dumps([{"image_name": "a.jpg", "caption": "A red circle"}]))
    underscored = tmp_path / "T_X_pair_data" / "cc3m" / "cc3m.json"
    assert spelled_path(underscored) == folder / "cc3m.json"
    assert spelled_path(folder / "cc3m.json") == folder / "cc3m.json"
    (sample,) = read_file(underscored, dataset="cc3m_enc", role="enc", embed_dir=tmp_path).samples
    assert sample.media[0].path == str((folder / "images" / "a.jpg").resolve())
    missing = tmp_path / "T_X_pair_data" / "webvid" / "webvid.json"
    assert spelled_path(missing) == missing                  # nothing exists: the path as given (its error names it)


def test_process_embeddings_takes_the_seed_spelling(tiny_env, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_env.data / "T_X_pair_data" / "cc3m", data / "T_X_pair_data" / "cc3m",
                    ignore=shutil.ignore_patterns("images"))
    seed_spelling = data / "T-X_pair_data" / "cc3m" / "cc3m.json"
    out = tmp_path / "embed"
    assert process_embeddings.main([str(seed_spelling), "image", str(out), "--decoder",
                                    str(tiny_env.ckpt / "stable-diffusion")]) == 0
    records = json.loads((data / "T_X_pair_data" / "cc3m" / "cc3m.json").read_text())
    assert sorted(p.name for p in out.glob("*.npy")) == sorted(f"{r['image_name']}.npy" for r in records)
