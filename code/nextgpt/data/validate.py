"""Check a stage's data before spending GPU hours on it.

    report = validate(cfg, names=None, decode=True)   # names default: cfg.data.datasets
    print(report.format()); report.ok                 # or report.raise_if_bad() (one line; train.py, cheap mode)
    report.bad_records()                              # per-record problems, which data.skip_bad_records skips

Per record: it parses (readers); every input medium exists and decodes — or the ImageBind feature cache
(cfg.data.feature_dir) holds a complete feature for it; every caption embedding exists and has the shape the
configured decoder needs (nextgpt.modalities.conditioning_shape; pooled decoders store (D,)); with decode=True the
values of every embedding and cached feature are read too: the manifest's dtype, all finite. A record is counted
once: corrupt (unparseable record, undecodable medium, truncated / wrong-shaped / non-finite embedding) before
missing (absent file), else ok.

decode=False is the cheap mode train.py runs before training: file existence plus .npy header/size checks (a
truncated or wrong-shaped .npy is still caught), no media decoding, no array loading. With
data.skip_bad_records, train.py leaves out exactly the records in report.bad_records() (parse errors are left
out by the readers themselves, media / embedding problems by train.py) and still fails on anything that is not
confined to one record (report.only_bad_records is False: an unreadable data file, an unknown dataset).
The single-file checks (a medium decodes through nextgpt.imagebind.encode's LOADERS, the exact code training runs;
an embedding's values) are in file_checks.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from nextgpt.data.file_checks import CORRUPT, MISSING, check_media, check_values, expected_shapes
from nextgpt.store.manifest import item_path, read_manifest


@dataclass
class Problem:
    dataset: str
    source: str
    index: int | None               # record index, None for a file- or dataset-level problem
    kind: str                       # missing | corrupt
    reason: str

    def __str__(self) -> str:
        if self.index is None:  # a file-level reason usually names the file already
            return self.reason if self.reason.startswith(self.source) else f"{self.source}: {self.reason}"
        return f"{self.source} record {self.index}: {self.reason}"


@dataclass
class DatasetReport:
    name: str
    file: str
    records: int = 0
    ok: int = 0
    missing: int = 0
    corrupt: int = 0
    problems: list[Problem] = field(default_factory=list)


@dataclass
class Report:
    datasets: list[DatasetReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)      # things not checked, and why
    errors: list[str] = field(default_factory=list)     # config-level problems (unknown name, no file, ...)

    @property
    def ok(self) -> bool:
        return not self.errors and all(d.missing == 0 and d.corrupt == 0 and not d.problems for d in self.datasets)

    def format(self, max_problems: int | None = None) -> str:
        width = max([len(d.name) for d in self.datasets] + [7])
        lines = [f"{'dataset':<{width}}  {'records':>8} {'ok':>8} {'missing':>8} {'corrupt':>8}  file"]
        for d in self.datasets:
            lines.append(f"{d.name:<{width}}  {d.records:>8} {d.ok:>8} {d.missing:>8} {d.corrupt:>8}  {d.file}")
        problems = [p for d in self.datasets for p in d.problems]
        shown = problems if max_problems is None else problems[:max_problems]
        if problems:
            lines.append(f"{len(problems)} problem(s):")
            lines += [f"  [{p.kind}] {p}" for p in shown]
            if len(shown) < len(problems):
                lines.append(f"  ... {len(problems) - len(shown)} more")
        lines += [f"error: {e}" for e in self.errors]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    @property
    def problems(self) -> list[Problem]:
        return [p for d in self.datasets for p in d.problems]

    @property
    def only_bad_records(self) -> bool:
        """Every problem is confined to one record (so skipping those records leaves usable data): no config-level
        error and no file-level problem (unreadable data file)."""
        return not self.errors and all(p.index is not None for p in self.problems)

    def bad_records(self) -> dict[str, dict[tuple[str, int], Problem]]:
        """dataset name -> {(source file, record index): the record's first problem}, in file order."""
        out: dict[str, dict[tuple[str, int], Problem]] = {}
        for p in self.problems:
            if p.index is not None:
                out.setdefault(p.dataset, {}).setdefault((p.source, p.index), p)
        return out

    def error_line(self, full_check: str = "code/validate_data.py") -> str:
        """One line: the first problem (file, record, reason) and how many more there are."""
        found = [*self.errors, *(str(p) for p in self.problems)]
        if not found:
            return "data validation passed"
        more = f"+{len(found) - 1} more; " if len(found) > 1 else ""
        return f"data validation failed: {found[0]} ({more}run {full_check} for the full list)"

    def raise_if_bad(self, full_check: str = "code/validate_data.py") -> None:
        """ValueError with error_line() when anything is wrong (format() has the table and every problem)."""
        if not self.ok:
            raise ValueError(self.error_line(full_check))


def validate(cfg, names: list[str] | None = None, decode: bool = True, log=None,
             decode_media: bool | None = None) -> Report:
    """Check the catalog datasets `names` (default cfg.data.datasets) of cfg; see the module docstring.
    decode_media (default: decode) decodes the media that have no cached feature even in the cheap mode: what
    train.py asks for under data.skip_bad_records, so a file that is present but does not decode is skipped too."""
    decode_media = decode if decode_media is None else decode_media
    from nextgpt import store
    from nextgpt.data.catalog import resolve
    from nextgpt.data.readers import read_entry

    names = list(cfg.data.datasets if names is None else names)
    report = Report()
    if not names:
        report.errors.append("no datasets to validate (data.datasets is empty)")
        return report
    dtypes: dict[str, str] = {}
    shapes = expected_shapes(cfg, report, dtypes)
    feature_dir = cfg.path(cfg.data.feature_dir) if cfg.data.feature_dir else None
    feature_shape = feature_dtype = None
    if feature_dir is not None and feature_dir.is_dir():
        try:
            manifest = read_manifest(feature_dir)
            feature_shape = tuple(manifest.section().shape) if manifest else None
            feature_dtype = manifest.section().dtype if manifest else None
        except ValueError as e:
            report.errors.append(str(e))
    media_cache: dict[tuple[str, str], tuple[str, str] | None] = {}
    embed_cache: dict[tuple[str, str], tuple[str, str] | None] = {}

    def medium_problem(medium) -> tuple[str, str] | None:
        key = (medium.modality, medium.path)
        if key not in media_cache:
            feature = item_path(feature_dir, medium.name) if feature_dir is not None else None
            if feature is not None and store.check_item(feature, feature_shape) is None:
                # cached feature: the file itself is not needed, but the feature's values are (full mode)
                media_cache[key] = check_values(feature, feature_shape, feature_dtype, decode, "ImageBind feature")
            else:
                media_cache[key] = check_media(medium.path, medium.modality, decode_media)
        return media_cache[key]

    def embedding_problem(target) -> tuple[str, str] | None:
        if cfg.data.caption_embeds == "online":      # made in the training step from the caption itself
            return None
        key = (target.embed_path, target.caption)
        if key not in embed_cache:
            embed_cache[key] = check_values(target.embed_path, shapes.get(target.modality),
                                            dtypes.get(target.modality), decode)
            # made from this caption? (the hash recorded with it; an edited caption is stale)
            stale = None if embed_cache[key] else store.check_item(target.embed_path, caption=target.caption)
            if stale is not None:
                embed_cache[key] = (CORRUPT, stale)
        return embed_cache[key]

    captions_seen: dict[str, tuple[str, str]] = {}   # embedding file -> (the first caption, which record)

    def duplicate_problem(target, where: str) -> tuple[str, str] | None:
        """Caption embeddings are keyed by media file name: one name with two captions cannot have both."""
        if cfg.data.caption_embeds == "online":
            return None
        first_caption, first_where = captions_seen.setdefault(target.embed_path, (target.caption, where))
        if first_caption == target.caption:
            return None
        return CORRUPT, (f"{Path(target.embed_path).name[:-len('.npy')]} has two captions: {first_where} "
                         f"({first_caption[:40]!r}) and {where} ({target.caption[:40]!r}); caption embeddings are "
                         "keyed by media file name, so give one of the files another name")

    for name in names:
        try:
            entry = resolve(cfg, name)
        except (ValueError, FileNotFoundError) as e:
            report.errors.append(str(e))
            continue
        root = cfg.path(cfg.data.root)
        shown = str(entry.file.relative_to(root)) if entry.file.is_relative_to(root) else str(entry.file)
        row = DatasetReport(name=name, file=shown)
        report.datasets.append(row)
        try:
            result = read_entry(entry, prompt=cfg.train.prompt, skip_bad=True)
        except (ValueError, FileNotFoundError) as e:
            row.problems.append(Problem(name, str(entry.file), None, CORRUPT, str(e)))
            continue
        row.records = result.records
        for error in result.errors:
            row.problems.append(Problem(name, error.source, error.index, CORRUPT, error.reason))
        row.corrupt += len(result.errors)
        for sample in result.samples:
            found = [p for p in (duplicate_problem(t, sample.where) for t in sample.targets) if p is not None]
            found += [p for p in (medium_problem(m) for m in sample.media) if p is not None]
            found += [p for p in (embedding_problem(t) for t in sample.targets) if p is not None]
            for kind, reason in found:
                row.problems.append(Problem(name, sample.source, sample.index, kind, reason))
            kinds = {kind for kind, _ in found}
            if CORRUPT in kinds:
                row.corrupt += 1
            elif MISSING in kinds:
                row.missing += 1
            else:
                row.ok += 1
        if log is not None:
            log(f"checked {name}: {row.ok}/{row.records} ok")
    return report
