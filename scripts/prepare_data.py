"""Turn raw (media, caption) collections into the NExT-GPT layout and name them in the dataset catalog.

    # a folder of media + a CSV / JSONL / JSON list of (file, caption)
    python scripts/prepare_data.py folder --name my_photos --modality image --media raw/photos --captions raw/photos.csv
    # img2dataset output ("files" format: 00000/000000001.jpg + .txt and/or .json with "caption")
    python scripts/prepare_data.py img2dataset --name laion_small --src raw/laion_out
    # img2dataset / video2dataset webdataset output (00000.tar ... with <key>.jpg|mp4|wav + <key>.txt | .json):
    # read where it lies, nothing extracted (a shard index instead of one file per medium)
    python scripts/prepare_data.py img2dataset --name cc3m_web --tars 'raw/cc3m/{00000..00331}.tar'
    python scripts/prepare_data.py webdataset --name webvid_web --modality video --tars 'raw/webvid/{00000..00249}.tar'
    # AudioCaps CSV (audiocap_id, youtube_id, start_time, caption) + the folder the clips were downloaded to
    python scripts/prepare_data.py audiocaps --name audiocaps_train --csv train.csv --media raw/audiocaps
    # WebVid CSV (videoid, name, page_dir, ...) + the folder the videos were downloaded to
    python scripts/prepare_data.py webvid --name webvid_small --csv results_2M_val.csv --media raw/webvid

Writes <data root>/T_X_pair_data/<name>/<name>.json (records {"<image|video|audio>_name": ..., "caption": ...}, the
original's pair format) with the media beside it in images/ | videos/ | audios/ (copied, or symlinked with --link;
file names prefixed with the dataset name so caption-embedding and feature caches, keyed by file name, never
collide across datasets), then adds two catalog entries to --catalog:
    <name>_enc   role enc: medium -> caption (stage 1, and comprehension data for stage 3)
    <name>_dec   role dec: caption -> medium (stage 2, and generation data for stage 3)
Rows whose media file is missing or empty, or whose caption is empty, are left out, counted, and listed in
<name>/missing.txt; they never stop the conversion (at least one usable row is needed).

With --tars the media stay in the shards: the media folder holds only the shard index (tars.json +
tars.index.npy: media name -> shard, offset, size, checked against each shard's size and mtime when it is
opened; nextgpt/store/tars.py), so `<name>/images/<media name>` resolves into a shard for every reader, the
catalog and the caches, and no file is created per medium. Members that are truncated or empty, keys without a
medium or without a caption (.txt, or "caption" in the .json), and a shard cut short (the members before the
damage are kept) go to missing.txt naming shard and key.

Then: code/validate_data.py (decodes every file), code/process_embeddings.py for the caption embeddings of the
_dec entry, and training with data.datasets naming the entries (see data/README.md).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from nextgpt import cli
from nextgpt.io import atomic_dir, atomic_write_text
from nextgpt.modalities import MODALITIES
from nextgpt.store import tars

PAIR_FOLDER = "T_X_pair_data"
DEFAULT_CATALOG = "code/config/catalog.yaml"
FILE_COLUMNS = ("file", "file_name", "filename", "path", "image", "video", "audio", "image_name", "video_name",
                "audio_name", "image_path", "url")
CAPTION_COLUMNS = ("caption", "text", "description")


@dataclass
class Row:
    source: Path | None          # the media file (None: not found)
    caption: str
    where: str                   # "<input file>:<line>" for the missing list


# ----------------------------------------------------------------------------------------------------------------
# Reading each raw format -> rows

def _table(path: Path) -> list[tuple[str, dict]]:
    """[(where, record)] of a CSV (header row), a JSONL file or a JSON list of objects."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    suffix = path.suffix.lower()
    out: list[tuple[str, dict]] = []
    if suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8") as f:
            for line, record in enumerate(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","), 2):
                out.append((f"{path}:{line}", record))
    elif suffix == ".jsonl":
        for line, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if text.strip():
                try:
                    out.append((f"{path}:{line}", json.loads(text)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line}: not valid JSON ({e.msg})") from None
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of records")
        out = [(f"{path}[{i}]", r) for i, r in enumerate(data)]
    else:
        raise ValueError(f"{path}: unsupported caption file (use .csv, .tsv, .jsonl or .json)")
    for where, record in out:
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected an object / a row with named columns")
    return out


def _column(records: list[tuple[str, dict]], given: str | None, options: tuple[str, ...], what: str, path: Path) -> str:
    columns = list(records[0][1]) if records else []
    if given:
        if given not in columns:
            raise ValueError(f"{path}: no column {given!r} ({what}); columns: {', '.join(columns)}")
        return given
    found = next((c for c in options if c in columns), None)
    if found is None:
        raise ValueError(f"{path}: no {what} column (looked for {', '.join(options)}); name it with "
                         f"--{'file' if what == 'file' else 'caption'}-column; columns: {', '.join(columns)}")
    return found


def read_folder(media: Path, captions: Path, file_column: str | None, caption_column: str | None) -> list[Row]:
    """A folder of media + a table of (file relative to the folder, caption)."""
    if not media.is_dir():
        raise FileNotFoundError(f"{media}: media folder not found")
    records = _table(captions)
    if not records:
        raise ValueError(f"{captions}: no records")
    file_key = _column(records, file_column, FILE_COLUMNS, "file", captions)
    caption_key = _column(records, caption_column, CAPTION_COLUMNS, "caption", captions)
    rows = []
    for where, record in records:
        name = str(record.get(file_key) or "").strip()
        path = media / name if name else None
        rows.append(Row(path if path is not None and path.is_file() else None, str(record.get(caption_key) or ""),
                        f"{where} ({name or 'no file name'})"))
    return rows


def read_img2dataset(src: Path) -> list[Row]:
    """img2dataset's "files" output: <shard>/<key>.<jpg|png|webp> with <key>.txt and/or <key>.json beside it."""
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: img2dataset output folder not found")
    image_ext = MODALITIES["image"].extensions
    rows = []
    for shard in sorted(p for p in src.iterdir() if p.is_dir()):
        for image in sorted(p for p in shard.iterdir() if p.suffix.lower() in image_ext):
            caption = ""
            text, meta = image.with_suffix(".txt"), image.with_suffix(".json")
            if text.is_file():
                caption = text.read_text(encoding="utf-8")
            elif meta.is_file():
                try:
                    caption = str(json.loads(meta.read_text(encoding="utf-8")).get("caption") or "")
                except (json.JSONDecodeError, AttributeError):
                    caption = ""
            rows.append(Row(image, caption, str(image)))
        # a key with a caption but no image (img2dataset failed to download it): reported as missing
        for orphan in sorted(p for p in shard.glob("*.txt")
                             if not any(p.with_suffix(e).is_file() for e in image_ext)):
            rows.append(Row(None, orphan.read_text(encoding="utf-8"), f"{orphan} (no image)"))
    if not rows:
        tars_here = sorted(src.glob("*.tar"))
        hint = (f"; it holds webdataset shards: pass --tars '{src}/{{{tars_here[0].stem}..{tars_here[-1].stem}}}.tar'"
                if tars_here else "")
        raise ValueError(f"{src}: no shard folders with images (expected 00000/000000001.jpg + .txt{hint})")
    return rows


@dataclass
class TarRow:
    shard: int                  # row of the shard list
    member: "tars.Scanned | None"   # the medium inside the shard (None: the key has no medium)
    caption: str
    where: str                  # "<shard>:<key>"


def _member_caption(parts: dict, fd: int) -> str:
    """A webdataset sample's caption: its .txt member, else "caption" of its .json member, else ""."""
    if "txt" in parts and not parts["txt"].truncated:
        return os.pread(fd, parts["txt"].size, parts["txt"].offset).decode("utf-8", errors="replace")
    if "json" in parts and not parts["json"].truncated:
        try:
            meta = json.loads(os.pread(fd, parts["json"].size, parts["json"].offset))
            return str(meta.get("caption") or "") if isinstance(meta, dict) else ""
        except (json.JSONDecodeError, UnicodeDecodeError):
            return ""
    return ""


def _read_shard(job: tuple[int, Path, tuple[str, ...]]) -> tuple[list[TarRow], str | None, tuple[int, int]]:
    """One shard's samples -> (rows, damage or None, the (size, mtime_ns) it had before the scan). A shard
    that changed while it was read (still being downloaded) is reported as damaged and indexed as unusable."""
    k, shard, extensions = job
    try:
        before = shard.stat()
    except OSError:
        return [], f"{shard}: shard missing", (-1, -1)
    members, damage = tars.scan_shard(shard)
    samples: dict[str, dict] = {}
    for m in members:
        key, ext = tars.split_key(m.name)
        if key is not None:
            samples.setdefault(key, {})[ext.lower()] = m
    rows = []
    with open(shard, "rb") as f:
        for key, parts in samples.items():
            media = [m for ext, m in parts.items() if f".{ext.rsplit('.', 1)[-1]}" in extensions]
            rows.append(TarRow(k, media[0] if media else None, _member_caption(parts, f.fileno()), f"{shard}:{key}"))
    after = shard.stat()
    if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
        return [], f"{shard}: changed while it was read (still being written?); rerun when it is complete", (-1, -1)
    return rows, damage, (before.st_size, before.st_mtime_ns)


def read_tars(spec: str, modality: str, jobs: int = 1
              ) -> tuple[list[tuple[Path, tuple[int, int]]], list[TarRow], list[str]]:
    """webdataset shards ('dir/{00000..00331}.tar') -> ([(shard, (size, mtime_ns))], rows, shard-level
    problems). Members are grouped into samples by key as webdataset groups them (nextgpt.store.tars.split_key);
    shards are scanned by `jobs` processes (the header scan is pure Python: about 1 ms per sample of 3 members
    on one core of this machine)."""
    from concurrent.futures import ProcessPoolExecutor

    shards = tars.expand_shards(spec)
    if not shards:
        raise ValueError(f"--tars {spec!r}: names no shard")
    if not any(p.is_file() for p in shards):
        raise FileNotFoundError(f"{shards[0]}: not found (none of the {len(shards)} shards of --tars {spec!r} exists)")
    work = [(k, shard, MODALITIES[modality].extensions) for k, shard in enumerate(shards)]
    if jobs > 1 and len(shards) > 1:
        with ProcessPoolExecutor(max_workers=min(jobs, len(shards))) as pool:
            results = list(pool.map(_read_shard, work, chunksize=4))
    else:
        results = [_read_shard(job) for job in work]
    rows = [row for shard_rows, _, _ in results for row in shard_rows]
    problems = [damage for _, damage, _ in results if damage]
    return [(shard, stat) for shard, (_, _, stat) in zip(shards, results)], rows, problems


def _find(media: Path, stems: list[str], extensions: tuple[str, ...], subdirs: list[str] = ()) -> Path | None:
    for folder in [media, *(media / s for s in subdirs if s)]:
        for stem in stems:
            for ext in extensions:
                path = folder / f"{stem}{ext}"
                if path.is_file():
                    return path
    return None


def _dataset_table(table: Path, media: Path, modality: str, columns: tuple[str, ...], hint: str
                   ) -> list[tuple[str, dict]]:
    """A public dataset's table (AudioCaps, WebVid) beside its media folder: both must exist and the table must
    have `columns` (one line naming the first missing one and what the dataset's table has: `hint`)."""
    if not media.is_dir():
        raise FileNotFoundError(f"{media}: {modality} folder not found")
    records = _table(table)
    for key in columns:
        if records and key not in records[0][1]:
            raise ValueError(f"{table}: no column {key!r}; {hint}")
    return records


def read_audiocaps(table: Path, media: Path) -> list[Row]:
    """AudioCaps CSV (audiocap_id, youtube_id, start_time, caption). Download tools name clips differently; tried, in
    order: <audiocap_id>, <youtube_id>, Y<youtube_id> (AudioSet style), <youtube_id>_<start_time>, with any
    audio extension."""
    records = _dataset_table(table, media, "audio", ("youtube_id", "caption"),
                             "an AudioCaps CSV has audiocap_id, youtube_id, start_time, caption")
    rows = []
    extensions = MODALITIES["audio"].extensions
    for where, r in records:
        ytid, start, capid = r.get("youtube_id", ""), str(r.get("start_time", "")), str(r.get("audiocap_id", ""))
        stems = [s for s in (capid, ytid, f"Y{ytid}", f"{ytid}_{start}", f"{ytid}_{start}.000") if s and s != "Y"]
        rows.append(Row(_find(media, stems, extensions), r.get("caption") or "", f"{where} ({ytid})"))
    return rows


def read_webvid(table: Path, media: Path) -> list[Row]:
    """WebVid CSV (videoid, name = the caption, page_dir, ...). Tried: <media>/<page_dir>/<videoid>.mp4 (the
    download script's layout), then <media>/<videoid>.<any video extension>."""
    records = _dataset_table(table, media, "video", ("videoid", "name"),
                             "a WebVid CSV has videoid, contentUrl, duration, page_dir, name")
    rows = []
    for where, r in records:
        vid = str(r.get("videoid", ""))
        path = _find(media, [vid], MODALITIES["video"].extensions, [r.get("page_dir", "")]) if vid else None
        rows.append(Row(path, r.get("name") or "", f"{where} ({vid})"))
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Writing the layout and the catalog entries

def _usable(file_name: str | None, size: int, caption: str, where: str, what: str, modality: str,
            missing: list[str]) -> bool:
    """The checks every source row passes before it becomes a record (else one line in `missing`)."""
    if file_name is None:
        missing.append(f"{where}: {what} not found")
    elif size == 0:
        missing.append(f"{where}: {file_name} is empty")
    elif Path(file_name).suffix.lower() not in MODALITIES[modality].extensions:
        missing.append(f"{where}: {file_name} is not a {modality} file ({', '.join(MODALITIES[modality].extensions)})")
    elif not caption:
        missing.append(f"{where}: empty caption")
    else:
        return True
    return False


def _unique(target: str, used: set[str]) -> str:
    """`target`, or `<stem>_<k><suffix>` when the same file name came from two shards / folders."""
    stem, suffix, k = Path(target).stem, Path(target).suffix, 1
    while target in used:
        target, k = f"{stem}_{k}{suffix}", k + 1
    used.add(target)
    return target


def write_dataset(rows: list[Row] | list[TarRow], name: str, modality: str, root: Path, link: bool = False,
                  shards: list[tuple[Path, tuple[int, int]]] | None = None, problems: Sequence[str] = ()
                  ) -> tuple[Path, int, list[str]]:
    """-> (pair JSON path, records written, missing descriptions). The folder is written atomically. With `shards`
    (the --tars form: `rows` are TarRows) the media stay in the shards and the media folder gets the shard index
    (nextgpt/store/tars.py) instead of a file per medium."""
    spec = MODALITIES[modality]
    folder = root / PAIR_FOLDER / name
    missing: list[str] = list(problems)
    records: list[dict] = []
    entries: list[tuple[str, int, str, int, int]] = []         # (media name, shard row, member, offset, size)
    used: set[str] = set()
    with atomic_dir(folder) as tmp:
        media_dir = tmp / spec.media_folder
        media_dir.mkdir()
        for row in rows:
            caption = " ".join(row.caption.split())
            if isinstance(row, TarRow):
                member = row.member
                if member is not None and member.truncated:
                    missing.append(f"{row.where}: {member.name} is truncated (the shard ends inside it)")
                    continue
                file_name, size = (Path(member.name).name, member.size) if member else (None, 0)
                absent = f"no {modality} member"
            else:
                file_name, size = (row.source.name, row.source.stat().st_size) if row.source else (None, 0)
                absent = "media file"
            if not _usable(file_name, size, caption, row.where, absent, modality, missing):
                continue
            target = _unique(f"{name}_{file_name}", used)
            if isinstance(row, TarRow):
                entries.append((target, row.shard, row.member.name, row.member.offset, row.member.size))
            elif link:
                os.symlink(row.source.resolve(), media_dir / target)
            else:
                shutil.copy2(row.source, media_dir / target)
            records.append({spec.pair_key: target, "caption": caption})
        if not records:
            first = missing[0] if missing else "no rows"
            raise ValueError(f"dataset {name}: no usable rows ({len(missing)} missing or empty; first: {first})")
        atomic_write_text(tmp / f"{name}.json", json.dumps(records, indent=1, ensure_ascii=False) + "\n")
        if missing:
            atomic_write_text(tmp / "missing.txt", "".join(m + "\n" for m in missing))
        if shards is not None:
            tars.write_index(media_dir, shards, entries, final_folder=folder / spec.media_folder)
    return folder / f"{name}.json", len(records), missing


def catalog_entries(name: str, modality: str) -> dict[str, dict]:
    rel = f"{PAIR_FOLDER}/{name}/{name}.json"
    return {f"{name}_enc": {"role": "enc", "modality": modality, "files": [rel]},
            f"{name}_dec": {"role": "dec", "modality": modality, "files": [rel]}}


def add_to_catalog(catalog: Path, entries: dict[str, dict]) -> list[str]:
    """Append the entries under `datasets:` (text, so the file's comments stay) -> the names added. An existing
    entry with the same content is left alone; one with other content is an error (edit it by hand)."""
    import yaml

    text = catalog.read_text(encoding="utf-8")
    data = yaml.safe_load(text) or {}
    datasets = data.get("datasets")
    if not isinstance(datasets, dict):
        raise ValueError(f"{catalog}: no 'datasets:' mapping")
    if [k for k in data if k not in ("aliases", "datasets")] or list(data)[-1] != "datasets":
        raise ValueError(f"{catalog}: 'datasets:' must be the last top-level key to append entries")
    added = []
    block = ""
    for entry_name, spec in entries.items():
        if entry_name in datasets:
            if datasets[entry_name] != spec:
                raise ValueError(f"{catalog}: dataset {entry_name} already exists with other settings "
                                 f"({datasets[entry_name]}); choose another --name or edit the catalog")
            continue
        block += (f"  {entry_name}:\n    role: {spec['role']}\n    modality: {spec['modality']}\n"
                  f"    files: [{spec['files'][0]}]\n")
        added.append(entry_name)
    if block:
        header = "  # ---- added by scripts/prepare_data.py ----\n"
        atomic_write_text(catalog, text.rstrip("\n") + "\n" + header + block)
        check = yaml.safe_load(catalog.read_text(encoding="utf-8"))["datasets"]
        assert all(check[n] == entries[n] for n in added), "catalog round trip"
    return added


# ----------------------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="kind", required=True)

    def common(p: argparse.ArgumentParser, modality: str | None) -> None:
        p.add_argument("--name", required=True, help="dataset name (letters, digits, _); catalog names "
                                                     "<name>_enc and <name>_dec")
        if modality is None:
            p.add_argument("--modality", required=True, choices=list(MODALITIES))
        p.set_defaults(modality=modality) if modality else None
        p.add_argument("--root", default="data", help="data root (data.root of your config; default: data)")
        p.add_argument("--catalog", default=DEFAULT_CATALOG, help="catalog to add the entries to (data.catalog); "
                       "a new file starts as a copy of the standard catalog")
        p.add_argument("--link", action="store_true", help="symlink the media instead of copying them")
        p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                       help="--tars: processes scanning shards (default: every CPU)")

    folder = sub.add_parser("folder", help="a folder of media + a CSV / JSONL / JSON of (file, caption)")
    common(folder, None)
    folder.add_argument("--media", required=True, type=Path, help="the folder the file column is relative to")
    folder.add_argument("--captions", required=True, type=Path, help=".csv / .tsv / .jsonl / .json")
    folder.add_argument("--file-column", default=None, help=f"default: the first of {', '.join(FILE_COLUMNS[:5])}...")
    folder.add_argument("--caption-column", default=None, help=f"default: the first of {', '.join(CAPTION_COLUMNS)}")
    img = sub.add_parser("img2dataset", help="img2dataset output: a folder (--output_format files) or webdataset "
                         "tar shards (--tars)")
    common(img, "image")
    source = img.add_mutually_exclusive_group(required=True)
    source.add_argument("--src", type=Path, help="the output folder of --output_format files")
    source.add_argument("--tars", help="the shards of --output_format webdataset: 'dir/{00000..00331}.tar'")
    web = sub.add_parser("webdataset", help="webdataset tar shards of any modality (video2dataset, ...)")
    common(web, None)
    web.add_argument("--tars", required=True, help="'dir/{00000..00249}.tar' (braces; '::' joins lists)")
    audio = sub.add_parser("audiocaps", help="AudioCaps CSV + downloaded clips")
    common(audio, "audio")
    audio.add_argument("--csv", required=True, type=Path)
    audio.add_argument("--media", required=True, type=Path)
    video = sub.add_parser("webvid", help="WebVid CSV + downloaded videos")
    common(video, "video")
    video.add_argument("--csv", required=True, type=Path)
    video.add_argument("--media", required=True, type=Path)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    import re

    from nextgpt.config import resolve_path

    if not re.fullmatch(r"[A-Za-z0-9_]+", args.name):
        raise ValueError(f"--name {args.name!r}: use letters, digits and _ only (it becomes a folder and catalog key)")
    shards, problems = None, []
    if getattr(args, "tars", None):
        shards, rows, problems = read_tars(args.tars, args.modality, args.jobs)
    elif args.kind == "folder":
        rows = read_folder(args.media, args.captions, args.file_column, args.caption_column)
    elif args.kind == "img2dataset":
        rows = read_img2dataset(args.src)
    elif args.kind == "audiocaps":
        rows = read_audiocaps(args.csv, args.media)
    else:
        rows = read_webvid(args.csv, args.media)
    # --root / --catalog are config-style paths: relative ones resolve against the repository root
    root, catalog = resolve_path(args.root), resolve_path(args.catalog)
    if not catalog.is_file():           # a catalog of your own: start from the standard one, so its names stay
        catalog.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(catalog, resolve_path(DEFAULT_CATALOG).read_text(encoding="utf-8"))
    path, count, missing = write_dataset(rows, args.name, args.modality, root, args.link, shards, problems)
    added = add_to_catalog(catalog, catalog_entries(args.name, args.modality))
    return {"json": path, "records": count, "missing": missing, "added": added, "catalog": catalog}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return cli.run(lambda: report(args, run(args)), "prepare_data")  # any failure: one `error:` line (exit 2)


def report(args, result: dict) -> int:
    print(f"wrote {result['json']}: {result['records']} {args.modality} record(s)")
    if result["missing"]:
        print(f"left out {len(result['missing'])} row(s) (missing/empty media or caption), listed in "
              f"{result['json'].parent / 'missing.txt'}; first: {result['missing'][0]}")
    names = [f"{args.name}_enc", f"{args.name}_dec"]
    print(f"catalog {result['catalog']}: " + (f"added {', '.join(result['added'])}" if result["added"]
                                             else f"{', '.join(names)} already present"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
