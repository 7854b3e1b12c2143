"""Webdataset tar shards as a media source: a media folder whose media live inside `00000.tar` ... instead of one
file per medium (img2dataset / video2dataset's output at CC3M / WebVid scale), read without extracting.

A tar-backed media folder (`T_X_pair_data/<name>/images/`, written by scripts/prepare_data.py --tars) holds two
files and no media:

    tars.json         {"format": 1, "count": N, "shards": [{"path", "size", "mtime_ns"}, ...]}
                      shard paths relative to this folder; size / mtime_ns as when the index was built
    tars.index.npy    (N,) structured array sorted by name, memory-mapped:
                      name S<w>    the media name the pair JSON uses (`cc3m_000000123.jpg`)
                      member S<w>  the member inside the tar (`000000123.jpg`), for messages
                      shard <u4    row of tars.json's shard list
                      offset <u8   first data byte of the member in the shard
                      size <u8     its length in bytes

So `<folder>/<name>` stays the medium's path everywhere (readers, catalog, the pair JSON, caches keyed by file
name); where no file is there, `locate` finds the member by binary search in the index and `read` takes its
bytes with one pread at the offset, never scanning the shard. The first lookup into a shard checks its size and
mtime against tars.json: a shard that changed since (rewritten, re-downloaded, truncated) or is gone is an error
naming it, for the media inside it only, so an offset is never read from another file.

Library use: shards are written with webdataset's TarWriter (tests, benchmarks); keys / extensions are split with
webdataset's base_plus_ext; shard lists are expanded with webdataset's expand_urls. The offsets come from the
standard library's tarfile (TarInfo.offset_data): webdataset's iterators yield member bytes without offsets, and
wids' indexes are a pickle per shard written beside it (unsafe to load, needs the shard's folder writable, one
file per shard); neither gives one verified index for a whole shard set, so that index is written here.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from nextgpt.io import atomic_write_bytes, atomic_write_text, npy_bytes
from nextgpt.store.manifest import StoreError
from nextgpt.store.share import share_batches

# webdataset is imported inside the two functions that use it: its package import loads torch and its pipeline
# modules (4 s on this machine), and only building an index (prepare_data) needs it; reading never does.

INDEX_JSON = "tars.json"
INDEX_ARRAY = "tars.index.npy"
FORMAT = 1


@dataclass(frozen=True, slots=True)       # one per medium of a precompute: kept small
class Member:
    """Where one medium lives: the media folder whose index names it, the shard (file, row of the index's shard
    list), the member's name, data offset and size."""
    folder: str
    row: int
    shard: Path
    member: str
    offset: int
    size: int

    def __str__(self) -> str:           # how messages name it: `<shard>:<member>`
        return f"{self.shard}:{self.member}"


@dataclass(frozen=True)
class Blob:
    """A medium's bytes read from a shard, for the loaders (nextgpt.imagebind.preprocess*): str() names it."""
    label: str
    data: bytes

    def __str__(self) -> str:
        return self.label

    @property
    def size(self) -> int:
        return len(self.data)

    def open(self) -> io.BytesIO:
        return io.BytesIO(self.data)


# ----------------------------------------------------------------------------------------------------------------
# Building an index (prepare_data)

@dataclass(frozen=True, slots=True)
class Scanned:
    """One regular member of a shard as the scan found it; `truncated` when its data runs past the file's end."""
    name: str
    offset: int
    size: int
    truncated: bool


def expand_shards(spec: str) -> list[Path]:
    """'dir/{00000..00331}.tar' (braces, `::` between lists, as webdataset spells shard sets) -> the paths."""
    from webdataset.shardlists import expand_urls

    return [Path(p) for p in expand_urls(spec)]


def scan_shard(path: Path) -> tuple[list[Scanned], str | None]:
    """Every regular member of one tar in order -> (members, None), or (the members before the damage, reason)
    when the tar is cut short or its headers are damaged (a download interrupted mid-shard)."""
    if not path.is_file():
        return [], f"{path}: shard missing"
    size = path.stat().st_size
    members: list[Scanned] = []
    try:
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:            # reads headers only; data is skipped by seeking
                if info.isfile():
                    truncated = info.offset_data + info.size > size
                    members.append(Scanned(info.name, info.offset_data, info.size, truncated))
    except (tarfile.TarError, OSError, EOFError) as e:
        text = str(e).strip().splitlines()
        return members, f"{path}: damaged tar after {len(members)} members ({text[0] if text else type(e).__name__})"
    return members, None


def split_key(member: str) -> tuple[str | None, str | None]:
    """webdataset's grouping of members into samples: `dir/000001.jpg` -> ('dir/000001', 'jpg')."""
    from webdataset.tariterators import base_plus_ext

    return base_plus_ext(member)


def read_at(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        return os.pread(f.fileno(), size, offset)


def write_index(folder: Path, shards: Sequence[tuple[Path, tuple[int, int]]],
                entries: Iterable[tuple[str, int, str, int, int]], final_folder: Path | None = None) -> int:
    """Write tars.json + tars.index.npy into `folder`. shards: (path, (size, mtime_ns) as it was scanned);
    entries: (media name, shard row, member, offset, size). Shard paths are stored relative to `final_folder`
    (where the folder will live: prepare_data writes under a temporary name and renames). The array is written
    first, the JSON last, so a half-written index is never read. -> number of entries."""
    rows = sorted(entries)
    names = [r[0] for r in rows]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise StoreError(f"{folder}: media name {dup} twice in the shard index")
    width = max([len(n.encode()) for n in names] + [1])
    member_width = max([len(r[2].encode()) for r in rows] + [1])
    dtype = np.dtype([("name", f"S{width}"), ("member", f"S{member_width}"), ("shard", "<u4"), ("offset", "<u8"),
                      ("size", "<u8")])
    array = np.array([(n.encode(), m.encode(), s, o, z) for n, s, m, o, z in rows], dtype=dtype)
    home = (final_folder or folder).resolve()
    listing = [{"path": os.path.relpath(Path(p).resolve(), home), "size": size, "mtime_ns": mtime_ns}
               for p, (size, mtime_ns) in shards]
    atomic_write_bytes(folder / INDEX_ARRAY, npy_bytes(array))
    atomic_write_text(folder / INDEX_JSON, json.dumps({"format": FORMAT, "count": len(rows), "shards": listing},
                                                      indent=1) + "\n")
    forget(folder)
    return len(rows)


# ----------------------------------------------------------------------------------------------------------------
# Reading (precompute, validation, live media)

class ShardSet:
    """The opened index of one tar-backed media folder (each shard verified at its first lookup)."""

    def __init__(self, folder: Path):
        self.folder = folder
        meta_path = folder / INDEX_JSON
        try:
            meta = json.loads(meta_path.read_text())
            listing = meta["shards"]
            self.shards = [(folder / s["path"]).resolve() for s in listing]
            if meta.get("format") != FORMAT:
                raise ValueError(f"format {meta.get('format')}, this code reads {FORMAT}")
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise StoreError(f"{meta_path}: unreadable shard index ({e})") from None
        self.listing = listing
        self._verdicts: dict[int, str | None] = {}       # shard row -> None (as indexed) or why it is refused
        try:
            self.index = np.load(folder / INDEX_ARRAY, mmap_mode="r", allow_pickle=False)
            self.names = self.index["name"]                 # (N,) S<w>, sorted: binary search, no full load
        except (OSError, ValueError, KeyError) as e:
            raise StoreError(f"{folder / INDEX_ARRAY}: unreadable shard index ({e})") from None
        if len(self.index) != meta.get("count"):
            raise StoreError(f"{folder / INDEX_ARRAY}: {len(self.index)} entries, {meta_path} says {meta.get('count')}")
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()
        # live encoding decodes in threads (imagebind/encode.py): descriptors are opened, closed and read under
        # one lock, so one is never closed under a read (DataLoader workers are processes: no contention there)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.index)

    def verify(self, row: int) -> None:
        """Refuse shard `row` (StoreError naming it) when it is gone or its size / mtime differ from the index's:
        an offset of the index must never be read from another file. Checked once per shard per process."""
        if row not in self._verdicts:
            path, built = self.shards[row], self.listing[row]
            try:
                stat = path.stat()
                now = (stat.st_size, stat.st_mtime_ns)
                self._verdicts[row] = None if now == (built["size"], built["mtime_ns"]) else (
                    f"{path}: shard changed since its index was built (size {now[0]}, mtime_ns {now[1]}; indexed "
                    f"{built['size']}, {built['mtime_ns']}); rerun scripts/prepare_data.py --tars to rebuild "
                    f"{self.folder / INDEX_JSON}")
            except OSError:
                self._verdicts[row] = (f"{path}: shard missing (named by {self.folder / INDEX_JSON}; rerun "
                                       "scripts/prepare_data.py --tars to rebuild the index)")
        if self._verdicts[row] is not None:
            raise StoreError(self._verdicts[row])

    def find_many(self, names: Sequence[str]) -> list[Member | None]:
        """Member of each name (None: not in this shard set), one vectorised binary search. A name whose shard
        changed since the index was built raises StoreError naming the shard (verify)."""
        if not names:
            return []
        keys = np.array([n.encode() for n in names])       # a longer name than any indexed one is simply absent
        rows = np.searchsorted(self.names, keys)
        out: list[Member | None] = []
        for name, row in zip(names, rows.tolist()):
            if row < len(self.index) and self.names[row] == name.encode():
                entry = self.index[row]
                shard = int(entry["shard"])
                self.verify(shard)
                out.append(Member(str(self.folder), shard, self.shards[shard], entry["member"].decode(),
                                  int(entry["offset"]), int(entry["size"])))
            else:
                out.append(None)
        return out

    def read(self, member: Member) -> bytes:
        """The member's bytes: one pread at its offset (pread keeps no file position, so DataLoader workers
        forked after the open share nothing that moves)."""
        shard = member.row
        with self._lock:
            if os.getpid() != self._pid:        # a forked worker opens its own descriptors
                self._fds, self._pid = {}, os.getpid()
            fd = self._fds.get(shard)
            if fd is None:
                if len(self._fds) >= 16:        # a few shards open at a time (a worker reads one, then the next)
                    os.close(self._fds.pop(next(iter(self._fds))))
                fd = self._fds[shard] = os.open(member.shard, os.O_RDONLY)
            data = os.pread(fd, member.size, member.offset)
        if len(data) != member.size:
            raise StoreError(f"{member}: shard shorter than its index says (read {len(data)} of {member.size} bytes)")
        return data


_OPEN: dict[str, ShardSet | StoreError | None] = {}


def open_folder(folder: str | Path) -> ShardSet | None:
    """The folder's shard set (opened once per process), or None when it is not tar-backed. An unreadable index
    is refused again without rereading it."""
    key = os.path.abspath(folder)
    if key not in _OPEN:
        try:
            _OPEN[key] = ShardSet(Path(key)) if os.path.isfile(os.path.join(key, INDEX_JSON)) else None
        except StoreError as e:
            _OPEN[key] = e
    if isinstance(_OPEN[key], StoreError):
        raise StoreError(str(_OPEN[key])) from None
    return _OPEN[key]


def forget(folder: str | Path) -> None:
    _OPEN.pop(os.path.abspath(folder), None)


def locate_many(paths: Sequence[str | Path]) -> list[Member | None]:
    """For each media path: the shard member it names when no file is there and its folder is tar-backed and
    holds it, else None (a plain file, or missing)."""
    out: list[Member | None] = [None] * len(paths)
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(paths):
        if not os.path.isfile(p):
            groups.setdefault(os.path.dirname(os.path.abspath(p)), []).append(i)
    for folder, rows in groups.items():
        shard_set = open_folder(folder)
        if shard_set is None:
            continue
        for i, member in zip(rows, shard_set.find_many([os.path.basename(paths[i]) for i in rows])):
            out[i] = member
    return out


def locate(path: str | Path) -> Member | None:
    return locate_many([path])[0]


def media_exists(path: str | Path) -> bool:
    """A medium is there: a file, or a member of its folder's shard set."""
    return os.path.isfile(path) or locate(path) is not None


def is_tar_backed(folder: str | Path) -> bool:
    return open_folder(folder) is not None


def read_member(member: Member) -> Blob:
    """The member's bytes (by offset) as a Blob the loaders take."""
    return Blob(str(member), open_folder(member.folder).read(member))


def read_media(path: str | Path) -> Blob | None:
    """`path`'s bytes from its folder's shard set, or None when the folder is not tar-backed or lacks it."""
    member = locate(path)
    return None if member is None else read_member(member)


def missing_reason(path: str | Path) -> str:
    """Why a media path resolves to nothing, naming the shard index when its folder has one."""
    folder = os.path.dirname(os.path.abspath(path))
    if open_folder(folder) is not None:
        return f"{path}: missing (not a member of the shards indexed in {os.path.join(folder, INDEX_JSON)})"
    return f"{path}: missing"


def plan_batches(paths: dict[str, str | Path], batch_size: int, rank: int, world: int
                 ) -> tuple[list[list[str]], dict[str, Member]]:
    """This rank's batches of a precompute over `paths` (name -> media path) and the shard member of each name
    that lives in a shard. Plain files keep store.share_batches' split (given order, batch j to rank j % world);
    members are grouped by shard in offset order, batches cut within a shard, whole shards dealt round-robin
    (shard k of the sorted shard list to rank k % world). Either way every item is computed in the same batch
    whatever the number of ranks (N processes write the bytes one process writes), and a shard is read front to
    back by one rank."""
    names = list(paths)
    members = dict(zip(names, locate_many([paths[n] for n in names])))
    files = [n for n in names if members[n] is None]
    by_shard: dict[Path, list[str]] = {}
    for n in names:
        if members[n] is not None:
            by_shard.setdefault(members[n].shard, []).append(n)
    batches = share_batches(files, batch_size, rank, world)
    for k, shard in enumerate(sorted(by_shard)):
        if k % world != rank:
            continue
        group = sorted(by_shard[shard], key=lambda n: members[n].offset)
        batches += [group[i:i + batch_size] for i in range(0, len(group), batch_size)]
    return batches, {n: m for n, m in members.items() if m is not None}

