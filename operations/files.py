"""Files written whole and safely: atomic writes, JSON, digests, a bounded set of open files, and
the temp files a killed process leaves behind."""
import collections
import contextlib
import glob
import hashlib
import json
import os
import re


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
    with atomic_path(path, tag) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=indent)


def remove_orphans(folder, pattern="*.tmp*.pt"):
    """Temp files of saves that a kill interrupted (their process is gone)."""
    for path in glob.glob(os.path.join(glob.escape(folder), pattern)):
        m = re.search(r"\.tmp(\d+)", path)
        if m and not _alive(int(m.group(1))):
            os.remove(path)


def _alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


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
