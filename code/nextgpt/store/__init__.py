"""One store format for per-item vectors: caption embeddings (stage 2/3 targets) and ImageBind features (stage 1).

A store is a folder keyed by media file name (`000000123.jpg`), holding any of the three modalities, with ONE
manifest format for both kinds:

    manifest.json  {"kind": "caption_embeddings" | "imagebind_features", "store": "files" | "shards",
                    "modalities": {"image": {"encoder", "fingerprint", "shape", "dtype", "count", "hashed"}, ...}}

Two layouts (`data.store`):
  files   `<dir>/<name>.npy` per item: the seed's layout (default). Caption hashes live beside the items in
          `captions-<modality>.tsv` (name TAB hash, compacted by the merge step) plus the append-only logs
          `.captions-<modality>.<writer>.log` that writers add to after each batch is renamed into place.
  shards  `<dir>/shards/<modality>-<writer>-<seq>.npy`, each (rows, *shape) (float16 by default) and read through
          a memory map, with `<same>.index.json` {"names": [...], "hashes": [...], "created": ns} naming the row of
          every item. A shard counts only once its index exists; both are written to a temporary name and renamed,
          the index after the array, so a half-written shard is never read. Later shards win for an item written
          twice (a caption edited and re-embedded).

Caption embeddings record the hash of the caption text they were made from (`caption_hash`), so an edited caption
is recomputed by process_embeddings and reported stale by training. Features record the ImageBind checkpoint's
fingerprint, so features of another checkpoint are refused by training as by process_embeddings.

Every value is checked where it is made: `StoreWriter.put` refuses (or, with skip_bad, counts and drops) an item
that is not finite after the cast to the store's dtype (float16 overflows to inf) or has the wrong shape.


Modules: manifest (the format), files / shards (the two layouts), writer, reader, share (merge, sharded
precompute), convert (between layouts, and `python -m nextgpt.store convert|info FOLDER`); and tars, the one
module here about media rather than vectors: webdataset tar shards read in place through a shard index (what
the loaders, the feature precompute and validation read a medium from when no file is there).
"""

from nextgpt.store.manifest import (KINDS, LAYOUTS, MANIFEST, SHARD_BYTES, SHARD_DIR, Manifest, Section, StoreError,
                                    caption_hash, file_fingerprint, item_path, modality_of_name, read_manifest,
                                    write_manifest)
from nextgpt.store.files import compact_file_hashes, read_file_hashes
from nextgpt.store.shards import ShardIndex, remove_orphans, shard_table
from nextgpt.store.writer import StoreWriter
from nextgpt.store.reader import StoreReader, check_item, forget_reader, open_reader, split_item_path
from nextgpt.store.share import count, done_names, finish_share, merge, parse_share, share_batches
from nextgpt.store.convert import convert, info, main

__all__ = ["KINDS", "LAYOUTS", "MANIFEST", "SHARD_BYTES", "SHARD_DIR", "Manifest", "Section", "ShardIndex",
           "StoreError", "StoreReader", "StoreWriter", "caption_hash", "check_item", "compact_file_hashes", "convert",
           "count", "done_names", "file_fingerprint", "finish_share", "forget_reader", "info", "item_path", "main",
           "merge", "modality_of_name", "open_reader", "parse_share", "read_file_hashes", "read_manifest",
           "remove_orphans", "share_batches", "shard_table", "split_item_path", "write_manifest"]
