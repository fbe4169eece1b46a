"""``DST/manifest.csv``: the de-identified images the models package trains on.

Columns are a contract with ``models`` and must not change. Rows are keyed by
path, merged with an earlier manifest (re-runs add or replace, never
duplicate), sorted (so the worker count never changes the file) and written
to a temporary name, then renamed.

A run's new rows go into a :class:`RowSpool`, which keeps at most one chunk
in memory and spills sorted chunks to a private temporary folder; at the end
:func:`write_merged` streams the earlier manifest and the chunks through a
k-way merge into the new file. Memory stays flat in the number of files.
"""

from __future__ import annotations

import csv
import heapq
import io
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from medfed.files import open_atomic_text, write_file

COLUMNS: tuple[str, ...] = ("patient", "study_uid", "series_uid", "sop_uid", "accession", "path", "label")
MANIFEST_FILE = "manifest.csv"


def read_manifest(path: Path) -> list[dict[str, str]]:
    """Rows of an existing manifest ([] if missing or not ours)."""
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            return []
        return [{c: row.get(c) or "" for c in COLUMNS} for row in reader]


def label_counts(path: Path) -> tuple[int, int]:
    """(labelled, unlabelled) images in a manifest: a store with no label cannot train, and should say so early."""
    labelled = unlabelled = 0
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if (row.get("label") or "").strip():
                labelled += 1
            else:
                unlabelled += 1
    return labelled, unlabelled


def merge_rows(
    existing: Iterable[Mapping[str, str]], new: Iterable[Mapping[str, str]], root: Path
) -> list[dict[str, str]]:
    """New rows replace old rows with the same path; old rows whose file is gone are dropped."""
    by_path: dict[str, dict[str, str]] = {}
    for row in existing:
        if row.get("path") and (root / row["path"]).is_file():
            by_path[row["path"]] = {c: row.get(c, "") or "" for c in COLUMNS}
    for row in new:
        by_path[row["path"]] = {c: row.get(c, "") or "" for c in COLUMNS}
    return [by_path[k] for k in sorted(by_path)]


def write_manifest(path: Path, rows: Iterable[Mapping[str, str]]) -> None:
    """Write ``rows`` with exactly :data:`COLUMNS`, atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: row.get(c, "") for c in COLUMNS})
    write_file(path, buffer.getvalue().encode("utf-8"), mode=None)


class RowSpool:
    """Manifest rows in bounded memory (sorted chunks spill to disk), for a streaming merge.

    ``rank`` orders sources for one path: the earlier manifest is rank 0, the rows
    journaled by earlier runs (the done-index) rank 1, this run's rows rank 2; the
    highest rank wins, and within a rank the row added last. Rows hold only
    pseudonyms, so the spill folder may live in the system's temporary directory;
    it is private (0700) and removed by :meth:`close`.
    """

    def __init__(self, chunk_rows: int = 20_000, *, rank: int = 2) -> None:
        self.chunk_rows = chunk_rows
        self.rank = rank
        self._rows: list[tuple[str, int, dict[str, str]]] = []
        self._chunks: list[Path] = []
        self._folder: Path | None = None
        self._seq = 0
        self.count = 0

    def add(self, row: Mapping[str, str]) -> None:
        """Add one row (later rows with the same path win)."""
        self._rows.append((row["path"], self._seq, {c: row.get(c, "") or "" for c in COLUMNS}))
        self._seq += 1
        self.count += 1
        if len(self._rows) >= self.chunk_rows:
            self._spill()

    def _spill(self) -> None:
        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix="medfed-manifest-"))
        self._rows.sort(key=lambda r: (r[0], r[1]))
        chunk = self._folder / f"chunk{len(self._chunks):05d}.csv"
        with open(chunk, "w", encoding="utf-8", newline="") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            for _path, seq, row in self._rows:
                writer.writerow([seq] + [row[c] for c in COLUMNS])
        self._chunks.append(chunk)
        self._rows = []

    def _chunk_rows(self, chunk: Path) -> Iterator[tuple[str, int, int, dict[str, str]]]:
        with open(chunk, encoding="utf-8", newline="") as fh:
            for record in csv.reader(fh):
                row = dict(zip(COLUMNS, record[1:], strict=True))  # chunks are ours: one value per column
                yield row["path"], self.rank, int(record[0]), row

    def streams(self) -> list[Iterator[tuple[str, int, int, dict[str, str]]]]:
        """Sorted streams of ``(path, rank, seq, row)``: the spilled chunks and what is in memory."""
        self._rows.sort(key=lambda r: (r[0], r[1]))
        rank = self.rank
        in_memory = ((path, rank, seq, row) for path, seq, row in self._rows)
        return [self._chunk_rows(c) for c in self._chunks] + [in_memory]

    def close(self) -> None:
        """Remove the spill folder."""
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
        self._rows, self._chunks = [], []


def _existing(path: Path) -> Iterator[tuple[str, int, int, dict[str, str]]]:
    """Rows of an earlier manifest as a sorted stream (rank 0).

    We always write it sorted, so a large one is streamed from disk; one that is
    not sorted (edited by hand) is small enough to sort in memory.
    """
    if not path.exists():
        return iter(())
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            return iter(())
        rows: list[tuple[str, int, int, dict[str, str]]] = []
        last, ordered = "", True
        for i, row in enumerate(reader):
            clean = {c: row.get(c) or "" for c in COLUMNS}
            ordered = ordered and clean["path"] >= last
            last = clean["path"]
            rows.append((clean["path"], 0, i, clean))
            if ordered and len(rows) >= 4096:
                return _stream_existing(path)
    if not ordered:
        rows.sort(key=lambda r: (r[0], r[2]))
    return iter(rows)


def _stream_existing(path: Path) -> Iterator[tuple[str, int, int, dict[str, str]]]:
    """Stream a large earlier manifest from disk (it is sorted: we always write it sorted)."""
    with open(path, newline="", encoding="utf-8") as fh:
        last = ""
        for i, row in enumerate(csv.DictReader(fh)):
            clean = {c: row.get(c) or "" for c in COLUMNS}
            if clean["path"] < last:
                raise ValueError(f"{path} is not sorted by path; remove it and re-run to rebuild it")
            last = clean["path"]
            yield clean["path"], 0, i, clean


def write_merged(
    path: Path,
    spools: RowSpool | Iterable[RowSpool],
    root: Path,
    labels: Mapping[str, str] | None = None,
    label_column: str = "accession",
) -> int:
    """Merge the earlier manifest at ``path`` with ``spools`` into ``path``, streaming; return rows written.

    For each path the row of the highest rank wins (see :class:`RowSpool`). Rows
    of earlier runs (ranks 0 and 1) whose file is gone are dropped. Labels: with
    ``labels`` (pseudonymized ``label_column`` value -> label) every row's label comes from it
    (the labels file of the latest run is the truth); without, a row keeps the
    label the earlier manifest gave its path.
    """
    spools = [spools] if isinstance(spools, RowSpool) else list(spools)
    streams = [_existing(path)] + [stream for spool in spools for stream in spool.streams()]
    merged = heapq.merge(*streams, key=lambda r: (r[0], r[1], r[2]))
    written = 0
    with open_atomic_text(path, mode=None) as fh:
        writer = csv.DictWriter(fh, fieldnames=list(COLUMNS), lineterminator="\n")
        writer.writeheader()
        group: list[tuple[str, int, int, dict[str, str]]] = []
        for item in merged:
            if group and item[0] != group[0][0]:
                written += _emit(writer, group, root, labels, label_column)
                group = []
            group.append(item)
        if group:
            written += _emit(writer, group, root, labels, label_column)
    return written


def _emit(
    writer: csv.DictWriter,
    group: list[tuple[str, int, int, dict[str, str]]],
    root: Path,
    labels: Mapping[str, str] | None,
    label_column: str = "accession",
) -> int:
    """Write the winning row of one path's group (sorted by rank, then sequence)."""
    path, rank, _seq, row = group[-1]
    if not path or (rank < 2 and not (root / path).is_file()):
        return 0
    if labels is not None:
        label = labels.get(row[label_column], "")
    else:
        earlier = [r for _p, k, _s, r in group if k == 0]
        label = earlier[-1]["label"] if earlier else row["label"]
    writer.writerow({**row, "label": label})
    return 1
