"""A shard set (`m2d pack`) as one process sees it: its index, and its files: local paths (remote shards
fetched whole into a bounded local cache, the next ones in the background), each shard's SHA-256 checked
on its first read and remembered, clips read by byte offset with a few file handles kept open. Training
from it: m2d/train/shards.py."""
import contextlib
import hashlib
import json
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import webdataset

from m2d.errors import ShardError, UsageError
from m2d.shard_format import DTYPES, FORMAT, INDEX_NAME, VERSION
from m2d.train.data import crop_start
from util.atomic import open_atomic

try:
    import fcntl
except ImportError:  # not on Windows: concurrent fetches of a shard then both download it
    fcntl = None

SHUFFLE_SHARDS = 8     # shards whose clips one shuffle window mixes (per rank)
PREFETCH_BATCHES = 64  # remote shards: fetch those of the next this many batches in the background
OPEN_SHARDS = 32       # open file handles kept per process
READ_CHUNK = 1 << 22


def default_cache() -> Path:
    """~/.cache/m2d/shards (or under $XDG_CACHE_HOME): fetched shards and the checked-shard markers."""
    return Path(os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache') / 'm2d' / 'shards'


def is_remote(location: str) -> bool:
    return '://' in location or location.startswith('pipe:')


def url_of(location: str, name: str) -> str:
    """The URL of file `name` of a remote shard set: `{}` in a pipe: command replaced, else appended."""
    return location.replace('{}', name) if '{}' in location else f'{location.rstrip("/")}/{name}'


@dataclass
class ShardSet:
    """A shard set's index (index.json of m2d pack) and where it lives; len() = its clips. Each clip's offset
    and frames are kept as arrays over the whole set (12 bytes a clip), not the index's lists."""
    location: str
    index: dict

    def __post_init__(self):
        shards = self.index['shards']
        self.counts = np.array([s['samples'] for s in shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)])
        self.offsets = np.array([o for s in shards for o in s.pop('offsets')], dtype=np.int64)
        self.frames = np.array([f for s in shards for f in s.pop('frames')], dtype=np.int32)

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def remote(self) -> bool:
        return is_remote(self.location)

    @property
    def norm_stats(self) -> list[float]:
        return [float(v) for v in self.index['norm_stats']]

    def shard_of(self, sample: int) -> int:
        """The shard that holds clip number `sample`."""
        return int(np.searchsorted(self.starts, sample, side='right')) - 1


def read_index(location: str) -> dict:
    """index.json of a shard set, local or remote; UsageError (one line) when it cannot be read."""
    try:
        if is_remote(location):
            with webdataset.gopen(url_of(location, INDEX_NAME)) as f:
                return json.loads(f.read())
        return json.loads((Path(location) / INDEX_NAME).read_text())
    except FileNotFoundError:
        raise UsageError(f'--shards {location}: no {INDEX_NAME} there; make a shard set with m2d pack '
                         '(or m2d wav2lms --shards)') from None
    except Exception as e:  # a failed download, or not JSON
        raise UsageError(f'--shards {location}: cannot read {INDEX_NAME} ({type(e).__name__}: {e})') from None


def open_shards(location: str, n_mels: int) -> ShardSet:
    """The shard set at `location`, checked before training: its index, every shard's LMS shape and dtype,
    and for a local folder every shard's presence and size. ShardError names the first few bad shards."""
    index = read_index(location)
    found = (index.get('format'), index.get('version')) if isinstance(index, dict) else (type(index).__name__, None)
    if found != (FORMAT, VERSION):
        raise UsageError(f'--shards {location}: {INDEX_NAME} is not a version-{VERSION} {FORMAT} index (format '
                         f'{found[0]!r}, version {found[1]!r}); make it with m2d pack')
    problems = []
    for shard in index['shards']:
        why = None
        if shard.get('n_mels') != n_mels:
            why = f'holds (1, {shard.get("n_mels")}, T) clips; this run needs (1, {n_mels}, T) (--input_size)'
        elif shard.get('dtype') not in DTYPES:
            why = f'stores dtype {shard.get("dtype")!r}, not one of {", ".join(DTYPES)}'
        elif not is_remote(location):
            try:
                size = (Path(location) / shard['name']).stat().st_size
            except FileNotFoundError:
                why = 'missing'
            else:
                if size != shard['bytes']:
                    why = f'truncated or replaced ({size} bytes, the index says {shard["bytes"]})'
        if why:
            problems.append(f'{shard["name"]} {why}')
    if problems:
        more = f'; and {len(problems) - 3} more' if len(problems) > 3 else ''
        raise ShardError(f'--shards {location}: {len(problems)} of {len(index["shards"])} shards are unusable: '
                         + '; '.join(problems[:3]) + more + '. Pack them again (m2d pack resumes) or restore them')
    if not index['shards'] or not sum(s['samples'] for s in index['shards']):
        raise UsageError(f'--shards {location}: the index lists no clips')
    return ShardSet(location, index)


# ----- shard files -------------------------------------------------------------------------------

@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path`.lock among this machine's processes (one fetch or check at a time)."""
    if fcntl is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f'{path}.lock', 'a') as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


class ShardFiles:
    """This process's access to the shards of a set: local paths (fetching remote ones into the cache, at
    most cache_limit bytes of them when given: the least recently used go first), checked once, read by
    offset with a few file handles kept open."""

    def __init__(self, shards: ShardSet, cache: Optional[Path] = None, cache_limit: int = 0):
        self.shards, self.cache_limit = shards, cache_limit
        self.cache = Path(cache) if cache else default_cache()
        where = hashlib.sha1(shards.location.encode()).hexdigest()[:16]
        self.fetched = self.cache / 'fetched' / where
        self.markers = self.cache / 'checked'
        self.handles: OrderedDict[int, int] = OrderedDict()
        self.prefetching: Optional[threading.Thread] = None

    def record(self, shard: int) -> dict:
        return self.shards.index['shards'][shard]

    def path(self, shard: int) -> Path:
        """Where shard `shard` is on this machine, fetched first if remote (and not yet cached)."""
        name = self.record(shard)['name']
        if not self.shards.remote:
            return Path(self.shards.location) / name
        path = self.fetched / name
        if not path.is_file():
            with _locked(path):
                if not path.is_file():
                    self.fetch(shard, path)
        return path

    def fetch(self, shard: int, path: Path) -> None:
        """Download shard `shard` into `path` atomically, checking its SHA-256 on the way."""
        record, url = self.record(shard), url_of(self.shards.location, self.record(shard)['name'])
        digest = hashlib.sha256()
        try:
            with webdataset.gopen(url) as source, open_atomic(path) as f:
                while chunk := source.read(READ_CHUNK):
                    digest.update(chunk)
                    f.write(chunk)
                if digest.hexdigest() != record['sha256']:
                    raise ShardError(f'{url}: checksum mismatch (SHA-256 {digest.hexdigest()[:12]}..., the index '
                                     f'says {record["sha256"][:12]}...): corrupt or replaced; pack it again')
        except ShardError:
            raise
        except Exception as e:
            raise ShardError(f'{url}: cannot fetch it ({type(e).__name__}: {e})') from None
        self.remember(shard, path, path.stat())
        if self.cache_limit:
            self.evict(keep=path)

    def evict(self, keep: Path) -> None:
        """Delete fetched shards, least recently used first, until they fit the cache limit (never `keep`).
        A shard another process has open stays readable to it; one needed again is fetched again."""
        cached = []
        for path in self.fetched.glob('*.tar'):
            with contextlib.suppress(FileNotFoundError):  # another process's eviction
                stat = path.stat()
                cached.append((stat.st_atime_ns, stat.st_size, path))
        total = sum(size for _, size, _ in cached)
        for _, size, path in sorted(cached):
            if total <= self.cache_limit:
                break
            if path != keep:
                path.unlink(missing_ok=True)
                total -= size

    def _marker(self, shard: int, path: Path) -> Path:
        where = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
        return self.markers / f'{self.record(shard)["sha256"]}-{where}'

    def remember(self, shard: int, path: Path, stat: os.stat_result) -> None:
        """Mark `path` (whose stat is `stat`) as checked for as long as its size and modification time stay
        (best effort)."""
        with contextlib.suppress(OSError), open_atomic(self._marker(shard, path), 'w') as f:
            f.write(f'{stat.st_size} {stat.st_mtime_ns}')

    def checked(self, shard: int, path: Path, fd: int) -> bool:
        stat = os.fstat(fd)
        try:
            return self._marker(shard, path).read_text() == f'{stat.st_size} {stat.st_mtime_ns}'
        except OSError:
            return False

    def check(self, shard: int, path: Path, fd: int) -> None:
        """Size and SHA-256 of an open shard file against the index, unless checked before; ShardError if wrong."""
        record = self.record(shard)
        size = os.fstat(fd).st_size
        if size != record['bytes']:
            raise ShardError(f'{path}: truncated or replaced ({size} bytes, the index says {record["bytes"]}); '
                             'pack it again or restore it, then --resume')
        if self.checked(shard, path, fd):
            return
        with _locked(self._marker(shard, path)):
            if self.checked(shard, path, fd):
                return
            digest = hashlib.sha256()
            with open(fd, 'rb', closefd=False) as f:  # a sequential read, which also fills the page cache
                while chunk := f.read(READ_CHUNK):
                    digest.update(chunk)
            if digest.hexdigest() != record['sha256']:
                raise ShardError(f'{path}: checksum mismatch (SHA-256 {digest.hexdigest()[:12]}..., the index says '
                                 f'{record["sha256"][:12]}...): corrupt or replaced; pack it again or restore it, '
                                 'then --resume')
            self.remember(shard, path, os.fstat(fd))

    def open(self, shard: int) -> tuple[Path, int]:
        """(path, open file descriptor) of shard `shard`; a fetched shard another process evicted meanwhile
        is fetched again."""
        path = self.path(shard)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            if not self.shards.remote:
                raise ShardError(f'{path}: missing (it was there when training started); restore it and '
                                 '--resume') from None
            path = self.path(shard)
            fd = os.open(path, os.O_RDONLY)
        return path, fd

    def used(self, fd: int) -> None:
        """Mark a fetched shard as just used (its access time), for the cache's eviction."""
        os.utime(fd, ns=(time.time_ns(), os.fstat(fd).st_mtime_ns))  # its modification time keys its mark

    def handle(self, shard: int) -> int:
        """An open file descriptor of shard `shard`, checked on first use in this process."""
        if shard in self.handles:
            self.handles.move_to_end(shard)
            if self.cache_limit and self.shards.remote:
                self.used(self.handles[shard])
            return self.handles[shard]
        path, fd = self.open(shard)
        try:
            self.check(shard, path, fd)
        except BaseException:
            os.close(fd)
            raise
        self.handles[shard] = fd
        if len(self.handles) > OPEN_SHARDS:
            os.close(self.handles.popitem(last=False)[1])
        return fd

    def byte_range(self, sample: int, start: int, frames: int) -> tuple[int, int, int]:
        """(shard, byte offset, bytes) of `frames` frames of clip number `sample` from frame `start` (the clips
        are stored frame by frame)."""
        shard = self.shards.shard_of(sample)
        record = self.record(shard)
        frame_bytes = record['n_mels'] * np.dtype(record['dtype']).itemsize
        return shard, int(self.shards.offsets[sample]) + start * frame_bytes, frames * frame_bytes

    def read(self, sample: int, start: int, frames: int) -> np.ndarray:
        """`frames` frames of clip number `sample` from frame `start`: (1, F, frames) in the stored dtype (a
        view of the frames as stored, one after the other: the clips' Fortran order)."""
        shard, offset, size = self.byte_range(sample, start, frames)
        data = os.pread(self.handle(shard), size, offset)
        if len(data) != size:
            raise ShardError(f'{self.path(shard)}: truncated (a clip ends past the end of the file); '
                             'pack it again or restore it, then --resume')
        record = self.record(shard)
        return np.frombuffer(data, record['dtype']).reshape(frames, record['n_mels']).T[None]

    def clip(self, sample: int) -> np.ndarray:
        """Clip number `sample` of the set: (1, F, T) in its stored dtype."""
        return self.read(sample, 0, int(self.shards.frames[sample]))

    def crop(self, sample: int, crop_frames: int) -> tuple[int, int]:
        """(start, frames to read) of a random crop of clip number `sample`, drawn as random_crop_of draws it:
        its start from numpy's global RNG; the frames to read are fewer than crop_frames in a shorter clip."""
        frames = int(self.shards.frames[sample])
        return crop_start(frames, crop_frames), min(crop_frames, frames)

    def read_ahead(self, crops: list[tuple[int, int, int]]) -> None:
        """Ask the kernel to read these (sample, start, frames) in the background (only what they need)."""
        if not hasattr(os, 'posix_fadvise'):
            return
        for crop in crops:
            shard, offset, size = self.byte_range(*crop)
            os.posix_fadvise(self.handle(shard), offset, size, os.POSIX_FADV_WILLNEED)

    def prefetch(self, shards: list[int]) -> None:
        """Remote sets: fetch these shards in a background thread unless one is still busy."""
        if self.prefetching is not None and self.prefetching.is_alive():
            return
        missing = [s for s in dict.fromkeys(shards) if not (self.fetched / self.record(s)['name']).is_file()]
        if missing:
            def fetch_all() -> None:
                with contextlib.suppress(Exception):  # a failure is reported when the shard is needed
                    for s in missing:
                        self.path(s)
            self.prefetching = threading.Thread(target=fetch_all, daemon=True)
            self.prefetching.start()

    def close(self) -> None:
        while self.handles:
            os.close(self.handles.popitem()[1])
