"""Files written whole and safely: atomic writes, JSON, digests, a bounded set of open files, and
the temp files a killed process leaves behind."""
import collections
import contextlib
import glob
import hashlib
import json
import math
import os
import re


# The temp names atomic_path writes: NAME.tmp<pid>[-<machine tag>][.EXT]. Never slides, results or
# cache files: readers skip them, and a rerun removes those of a process that is gone.
TEMP = re.compile(r"\.tmp(\d+)(-[0-9a-f]{8})?(\.|$)")


def is_temp(name):
    """Whether a file name is a temp name of atomic_path (or a file made beside one)."""
    return TEMP.search(os.path.basename(name)) is not None


@contextlib.contextmanager
def atomic_path(path, tag=""):
    """`with atomic_path(p) as tmp:` write tmp; on success it is synced and renamed to p, so a
    reader (or a resumed run) sees the old file or the new one, never half of one; on failure
    it is removed. The temp name keeps p's extension (np.save, np.load need it) and holds the pid
    (and `tag`, e.g. the machine's, where several machines write into one directory)."""
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{os.getpid()}{tag}{ext}"
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def file_digest(path, algorithm="sha256"):
    """Hex digest of a file's content, read in 1 MiB blocks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json(path, obj, indent=None, tag=""):
    """obj as strict JSON (no NaN or Infinity: finite() first where they may occur), atomically."""
    with atomic_path(path, tag) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=indent, allow_nan=False)


def finite(obj):
    """obj with every NaN or infinite float replaced by None (JSON's null), at any depth."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def remove_orphans(folder, patterns=("*.tmp*.pt",)):
    """Remove the temp files (matching one of the glob `patterns` in `folder`) of saves that a
    kill interrupted: those whose process is gone. Returns the names removed."""
    gone = []
    for pattern in patterns:
        for path in glob.glob(os.path.join(glob.escape(folder), pattern)):
            m = TEMP.search(os.path.basename(path))
            if m and not _alive(int(m.group(1))) and os.path.isfile(path):
                os.remove(path)
                gone.append(os.path.basename(path))
    return gone


def _alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def open_budget(wanted, per_item, reserve=48):
    """How many things holding `per_item` file descriptors each a process may keep open: `wanted`,
    but never more than its descriptor limit (RLIMIT_NOFILE's soft limit: 256 on macOS, often
    1024 on clusters, sometimes less) leaves after `reserve` for everything else; at least 1."""
    try:
        import resource
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):  # no such limit here (Windows)
        return wanted
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, (soft - reserve) // per_item))


class LRU:
    """At most `size` open things (slides, memory maps) by key, the least recently used closed
    first: a process's file descriptors stay bounded whatever the number of slides."""

    def __init__(self, size, open_fn, close_fn=None):
        self.size, self.open_fn, self.close_fn = size, open_fn, close_fn
        self.items = collections.OrderedDict()

    def __getitem__(self, key):
        if key in self.items:
            self.items.move_to_end(key)
        else:
            if len(self.items) >= self.size:
                _, old = self.items.popitem(last=False)
                if self.close_fn:
                    self.close_fn(old)
            self.items[key] = self.open_fn(key)
        return self.items[key]
