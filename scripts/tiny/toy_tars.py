"""The toy media as img2dataset / video2dataset would download them: webdataset tar shards (`00000.tar` ... with
`<key>.<ext>`, `<key>.txt`, `<key>.json`) or the same samples in the "files" layout (`00000/<key>.<ext>` + .txt +
.json), for the tests and benchmarks of reading shards directly (nextgpt/store/tars.py).

    samples = pair_samples(data / "T_X_pair_data" / "cc3m" / "cc3m.json", "image")   # (key, ext, bytes, caption)
    shards = write_shards(samples, out / "tars", per_shard=8)                          # [00000.tar, ...]
    write_files(samples, out / "files", per_shard=8)                                   # 00000/000000000.jpg ...

Shards are written with webdataset's TarWriter (the library's own writer, the format img2dataset writes).
Importing this module does no work.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

from nextgpt.modalities import MODALITIES

Sample = tuple[str, str, bytes, str]            # (key, extension without dot, media bytes, caption)


def pair_samples(pair_json: Path, modality: str, repeat: int = 1) -> Iterator[Sample]:
    """The media and captions of a toy pair JSON as webdataset samples, keys 000000000 ... in record order;
    `repeat` > 1 cycles through the records (a large shard set of the toy media)."""
    records = json.loads(Path(pair_json).read_text())
    key = MODALITIES[modality].pair_key
    folder = Path(pair_json).parent / MODALITIES[modality].media_folder
    cache: dict[str, bytes] = {}
    for i in range(len(records) * repeat):
        record = records[i % len(records)]
        name = record[key]
        if name not in cache:
            cache[name] = (folder / name).read_bytes()
        yield f"{i:09d}", Path(name).suffix[1:].lower(), cache[name], record["caption"]


def _chunks(samples: Iterable[Sample], per_shard: int) -> Iterator[list[Sample]]:
    chunk: list[Sample] = []
    for sample in samples:
        chunk.append(sample)
        if len(chunk) == per_shard:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def write_shards(samples: Iterable[Sample], out: Path, per_shard: int) -> list[Path]:
    """`out`/00000.tar ...: per sample <key>.<ext> (the medium), <key>.txt (caption), <key>.json ({"caption",
    "key", "status"}), as img2dataset's webdataset output has them."""
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for number, chunk in enumerate(_chunks(samples, per_shard)):
        path = out / f"{number:05d}.tar"
        with wds.TarWriter(str(path), encoder=False, mtime=0) as writer:   # encoder=False: bytes as given
            for key, ext, data, caption in chunk:
                meta = json.dumps({"caption": caption, "key": key, "status": "success"}).encode()
                writer.write({"__key__": key, ext: data, "txt": caption.encode(), "json": meta})
        shards.append(path)
    return shards


def write_files(samples: Iterable[Sample], out: Path, per_shard: int) -> list[Path]:
    """The same samples in img2dataset's "files" layout: `out`/00000/<key>.<ext> + .txt + .json."""
    media = []
    for number, chunk in enumerate(_chunks(samples, per_shard)):
        folder = out / f"{number:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        for key, ext, data, caption in chunk:
            (folder / f"{key}.{ext}").write_bytes(data)
            (folder / f"{key}.txt").write_text(caption)
            (folder / f"{key}.json").write_text(json.dumps({"caption": caption, "key": key, "status": "success"}))
            media.append(folder / f"{key}.{ext}")
    return media
