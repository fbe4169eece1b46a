"""A site's preprocessed images on its own disk: built once, memory-mapped afterwards.

Decoding and resizing DICOM costs far more than a training step, and a site may hold
more images than memory, so every example is preprocessed once into ``.npy`` shards
(float32 ``(n, C, S, S)``) with a JSON index, under a folder named by the study's
preprocessing digest: a change of preprocessing uses a new folder, any other change
of the study reuses it. Source files are recognised by size, mtime and inode, so a
re-run of de-identification that rewrites a file rebuilds only that file's examples.

Every file is written to a temporary name, fsynced and renamed (medfed.files.write_file),
the index after each shard, so a crash loses at most the shard in progress. A shard that
is missing, truncated or not the expected shape is dropped with its entries and rebuilt.
Builders hold an exclusive lock (``fcntl.flock``), readers a shared one while they read
the index; training then reads shards through a few memory maps at a time, so the
resident memory stays bounded whatever the cache's size.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import logging
import os
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from medfed.files import write_file
from models.preprocess import Preprocessed, output_shape
from models.study import Study

logger = logging.getLogger(__name__)

#: Default cache location inside a de-identified store: DEID_DIR/.cache/<preprocessing digest>/.
CACHE_DIR_NAME = ".cache"
INDEX_NAME = "index.json"
LOCK_NAME = ".lock"
SHARD_PREFIX = "shard-"
#: Bytes of examples buffered before a shard is written (bounds the builder's memory).
SHARD_BYTES = 64 * 1024**2
#: Shards a reader keeps mapped at once (bounds resident memory: at most this many shards' pages).
OPEN_SHARDS = 8
INDEX_FORMAT = 1
#: Packages whose presence decides which transfer syntaxes decode: a refusal is re-examined when they change.
_DECODER_PACKAGES = ("pydicom", "pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle",
                     "python-gdcm", "pillow", "numpy")


class CacheError(Exception):
    """The image cache cannot be used; the message says what to do."""


@dataclass(frozen=True)
class Entry:
    """What one source file gave: its examples' place in a shard, or the reason it gave none."""

    fingerprint: str
    shard: str | None = None
    offset: int = 0
    frames: tuple[int, ...] = ()
    size: str | None = None
    reason: str | None = None
    env: str | None = None

    @property
    def usable(self) -> bool:
        return self.shard is not None and bool(self.frames)

    def to_json(self) -> list:
        return [self.fingerprint, self.shard, self.offset, list(self.frames), self.size, self.reason, self.env]

    @classmethod
    def from_json(cls, v: list) -> Entry:
        fp, shard, offset, frames, size, reason, env = v
        return cls(str(fp), shard, int(offset), tuple(int(f) for f in frames), size, reason, env)


@dataclass
class BuildStats:
    """What the last :meth:`ImageCache.ensure` did (tests and `medfed data check` report it)."""

    built: int = 0
    reused: int = 0
    shards_written: int = 0
    shards_dropped: int = 0


def fingerprint(path: Path) -> str:
    """Size, modification time and inode of a source file: cheap, and changed by any rewrite."""
    st = os.stat(path)
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


def decoder_env() -> str:
    """Versions of the packages that decode pixel data; refusals made under others are re-examined."""
    parts = []
    for name in _DECODER_PACKAGES:
        try:
            parts.append(f"{name}={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return ",".join(parts)


def default_cache_root(deid_dir: Path) -> Path:
    return Path(deid_dir) / CACHE_DIR_NAME


class ImageCache:
    """The cache of one study's preprocessing for one store (``root`` is its digest folder)."""

    def __init__(self, root: Path, study: Study) -> None:
        self.root = Path(root)
        self.study = study
        self.digest = study.preprocessing_digest()
        self.shape = output_shape(study)
        self.stats = BuildStats()

    @classmethod
    def for_store(cls, deid_dir: Path, study: Study, cache_dir: Path | None = None) -> ImageCache:
        """``cache_dir`` (default ``DEID_DIR/.cache``) / the study's preprocessing digest."""
        base = Path(cache_dir) if cache_dir is not None else default_cache_root(deid_dir)
        return cls(base / study.preprocessing_digest(), study)

    # ---- locking -----------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self, mode: int) -> Iterator[None]:
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as err:
            raise CacheError(f"cannot use the image cache folder {self.root} ({err.strerror}); make it writable "
                             "or give another folder (--cache-dir)") from None
        try:
            fcntl.flock(fd, mode)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    # ---- index -------------------------------------------------------------------------
    def _load_index(self) -> tuple[dict[str, Entry], dict[str, int]]:
        """Entries and shard sizes of the index; empty when it is absent, corrupt or for other settings."""
        path = self.root / INDEX_NAME
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format") != INDEX_FORMAT or data.get("digest") != self.digest \
                    or list(data.get("shape", ())) != list(self.shape):
                raise ValueError("index of other settings")
            entries = {str(k): Entry.from_json(v) for k, v in data["entries"].items()}
            shards = {str(k): int(v) for k, v in data["shards"].items()}
        except FileNotFoundError:
            return {}, {}
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
            logger.warning("image cache index %s is unreadable (%s): rebuilding the cache", path, type(err).__name__)
            return {}, {}
        return entries, shards

    def _write_index(self, entries: dict[str, Entry], shards: dict[str, int]) -> None:
        data = {"format": INDEX_FORMAT, "digest": self.digest, "shape": list(self.shape), "shards": shards,
                "entries": {k: e.to_json() for k, e in entries.items()}}
        write_file(self.root / INDEX_NAME, json.dumps(data, separators=(",", ":")).encode(), 0o600)

    def _valid_shards(self, shards: dict[str, int]) -> set[str]:
        """Shards present with the expected header and length (a truncated file does not map)."""
        good = set()
        for name, count in shards.items():
            try:
                arr = np.load(self.root / name, mmap_mode="r", allow_pickle=False)
                ok = arr.shape == (count, *self.shape) and arr.dtype == np.float32
                del arr
            except Exception:  # noqa: BLE001 - missing, truncated or garbage: all mean "rebuild"
                ok = False
            if ok:
                good.add(name)
            else:
                logger.warning("image cache shard %s is missing or damaged: its images are rebuilt", name)
        return good

    def _stale(self, items: Sequence[tuple[str, str, Path]], entries: dict[str, Entry], env: str) -> list[int]:
        todo = []
        for i, (key, fp, _path) in enumerate(items):
            e = entries.get(key)
            if e is None or e.fingerprint != fp or (not e.usable and e.env != env):
                todo.append(i)
        return todo

    def _checked(self) -> tuple[dict[str, Entry], dict[str, int], int]:
        """The index with entries of bad shards removed; and how many shards were bad."""
        entries, shards = self._load_index()
        good = self._valid_shards(shards)
        bad = len(shards) - len(good)
        if bad:
            shards = {k: v for k, v in shards.items() if k in good}
            entries = {k: e for k, e in entries.items() if e.shard is None or e.shard in good}
        return entries, shards, bad

    # ---- the build ---------------------------------------------------------------------
    def ensure(
        self,
        items: Sequence[tuple[str, str, Path]],
        produce: Callable[[str, Path], Preprocessed | None],
    ) -> dict[str, Entry]:
        """The entry of every ``(key, fingerprint, path)``, preprocessing with ``produce`` what is missing.

        ``produce`` may raise (a store that must not be trained on): what was built until
        then is kept, and the exception propagates. It returns None for a file that is
        neither usable nor to be remembered as refused (it gets no entry, and is read again next time).
        """
        env = decoder_env()
        self.stats = BuildStats()
        with self._locked(fcntl.LOCK_SH):
            entries, shards, bad = self._checked()
            todo = self._stale(items, entries, env)
        if todo or bad:
            with self._locked(fcntl.LOCK_EX):  # reload: another process may have built it meanwhile
                entries, shards, bad = self._checked()
                todo = self._stale(items, entries, env)
                self.stats.shards_dropped = bad
                self._build(items, todo, produce, entries, shards, env)
        self.stats.reused = len(items) - self.stats.built
        return {key: entries[key] for key, _fp, _p in items if key in entries}

    def _build(self, items: Sequence[tuple[str, str, Path]], todo: list[int],
               produce: Callable[[str, Path], Preprocessed | None], entries: dict[str, Entry],
               shards: dict[str, int], env: str) -> None:
        per_example = int(np.prod(self.shape)) * 4
        budget = max(1, SHARD_BYTES // per_example)
        buffer: list[np.ndarray] = []
        pending: list[tuple[str, Entry]] = []  # entries whose examples are in ``buffer``
        shard_name = f"{SHARD_PREFIX}{uuid.uuid4().hex}.npy"

        def flush() -> None:
            nonlocal buffer, pending, shard_name
            if buffer:
                raw = io.BytesIO()
                np.save(raw, np.stack(buffer), allow_pickle=False)
                write_file(self.root / shard_name, raw.getvalue(), 0o600)
                shards[shard_name] = len(buffer)
                self.stats.shards_written += 1
            for key, entry in pending:
                entries[key] = entry
            if buffer or pending:
                self._write_index(entries, shards)
            buffer, pending = [], []
            shard_name = f"{SHARD_PREFIX}{uuid.uuid4().hex}.npy"

        try:
            for i in todo:
                key, fp, path = items[i]
                result = produce(key, path)
                self.stats.built += 1
                if result is None:
                    entries.pop(key, None)
                    continue
                size = result.source.size if result.source is not None else None
                if not result.usable:
                    pending.append((key, Entry(fp, size=size, reason=result.reason or "no example", env=env)))
                    continue
                for a in result.arrays:
                    if a.shape != self.shape:
                        raise CacheError(f"preprocessing gave shape {a.shape}, expected {self.shape}")
                pending.append((key, Entry(fp, shard_name, len(buffer), result.frames, size)))
                buffer.extend(result.arrays)
                if len(buffer) >= budget:
                    flush()
        finally:
            flush()
            self._collect(shards)

    def _collect(self, shards: dict[str, int]) -> None:
        """Delete shards no index names and temporaries of crashed builders (under the exclusive lock)."""
        for p in self.root.iterdir():
            name = p.name
            leftover = name.startswith(f".{SHARD_PREFIX}") or name == f".{INDEX_NAME}.tmp"
            orphan = name.startswith(SHARD_PREFIX) and name not in shards
            if leftover or orphan:
                p.unlink(missing_ok=True)

    def reader(self) -> ShardReader:
        return ShardReader(self.root, self.shape)


class ShardReader:
    """Reads examples from shards through at most :data:`OPEN_SHARDS` memory maps, opened lazily.

    Pickles without its maps, so each DataLoader worker opens its own.
    """

    def __init__(self, root: Path, shape: tuple[int, int, int], max_open: int = OPEN_SHARDS) -> None:
        self.root = Path(root)
        self.shape = shape
        self.max_open = max_open
        self._maps: OrderedDict[str, np.ndarray] = OrderedDict()

    def __getstate__(self) -> dict:
        return {"root": self.root, "shape": self.shape, "max_open": self.max_open}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["root"], state["shape"], state["max_open"])  # type: ignore[misc]

    def _map(self, shard: str) -> np.ndarray:
        arr = self._maps.get(shard)
        if arr is not None:
            self._maps.move_to_end(shard)
            return arr
        try:
            arr = np.load(self.root / shard, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as err:
            raise CacheError(f"image cache shard {self.root / shard} vanished or is damaged ({type(err).__name__}): "
                             "another process rebuilt the cache, or the disk failed; start again") from None
        self._maps[shard] = arr
        while len(self._maps) > self.max_open:
            self._maps.popitem(last=False)  # dropping the last reference unmaps it
        return arr

    def read(self, shard: str, offset: int) -> np.ndarray:
        """A private float32 copy of one example."""
        return np.array(self._map(shard)[offset], dtype=np.float32, copy=True)
