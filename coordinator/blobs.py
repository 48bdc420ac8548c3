"""The content-addressed blob directory beside the database: bundle files, model versions,
optimizer state and uploaded update payloads, each stored once under its sha256.

Writes are atomic and durable: write to a temporary file, fsync it, rename it into place,
fsync the directory. A blob therefore either exists whole or not at all, and the database
row that refers to it is committed only after :meth:`BlobStore.put` returned. A crash between
those steps, or between a commit and the deletion of what it made obsolete, leaves blobs no
record needs; :meth:`BlobStore.collect` removes them, given the set still referenced.

Group commit (:meth:`BlobStore.stage`, then :meth:`BlobStore.install` of several at once):
each payload is written to a temporary file without waiting for the disk, and the batch is
made durable together: the write-back of every file started at once, then every file
fsync'ed in turn (the first fsync's journal commit carries what the others need, so the
rest return soon), renamed into place, and each directory holding one fsync'ed once. All or
nothing for the callers: an error refuses the whole batch. Files it renamed before the error
stay (their bytes were synced first; :class:`BlobStore` says why none is removed), named by
no record, and no name is trusted before its directory is synced again.

The directory belongs to one database (``store.json``, :meth:`BlobStore.claim`): a
coordinator on another one is refused before it reads or deletes anything here.

A blob may have *derived* files beside it (:meth:`BlobStore.derived`: a version's parameter
frame, encoded once and then served from disk). They are caches, made again if missing, and
go with their blob (:meth:`BlobStore.delete`, :meth:`BlobStore.collect`).

::

    >>> blobs = BlobStore(Path("fedge.db.blobs"))
    >>> sha = blobs.put(b"payload")
    >>> blobs.read(sha)
    b'payload'
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Set
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_sdk.durable import fsync_dir

if TYPE_CHECKING:
    from coordinator.store import Store
    from coordinator.store.base import StoreIdentity

__all__ = [
    "DERIVED_KINDS",
    "BackgroundDeletes",
    "BlobStore",
    "Collected",
    "Staged",
    "WrongBlobDirectory",
    "delete_unneeded",
    "fsync_dir",
]

log = logging.getLogger(__name__)
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_FANOUT_RE = re.compile(r"^[0-9a-f]{2}$")
# What a blob's derived files may be (the suffix of their name, "<sha[2:]>.<kind>").
DERIVED_KINDS = frozenset({"frame"})


# The file in a blob directory naming the database it belongs to (BlobStore.claim).
OWNER_FILE = "store.json"


class WrongBlobDirectory(RuntimeError):
    """The blob directory is not the opened database's: another database's, or a new one
    without its blobs."""


@dataclass(frozen=True)
class Collected:
    blobs: int = 0
    bytes: int = 0


@dataclass
class Staged:
    """A blob written to a temporary file, not yet durable nor in place. The file stays
    open until installed or discarded: a write-back error is reported to descriptors open
    when it happened, so the fsync must use this one."""

    sha: str
    tmp: Path
    fd: int | None  # None once closed


def _start_writeback(fd: int) -> None:
    """Have the kernel start writing a file's dirty pages, without waiting (Linux's
    ``POSIX_FADV_DONTNEED`` starts write-back and drops only pages already clean). An
    optimisation only: the fsync that follows is what makes the file durable, and reports
    any write-back error."""
    if hasattr(os, "posix_fadvise"):
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


class BlobStore:
    """``unlink_later``: :meth:`delete` only marks a blob gone (:meth:`exists` says so at
    once) and a thread of its own unlinks the files, off the caller's thread (a closed
    round's payloads, hundreds of unlinks, would otherwise hold up the service's worker).
    Writing the same bytes again waits for that unlink first. Only for a blob directory one
    process writes: another process would still see the file. :meth:`close` waits for the
    unlinks; a crash leaves them to the start-up sweep (:meth:`collect`).

    A name is durable once its directory was synced after it appeared. A write that fails
    after its rename leaves the file (its bytes were synced first): whoever relies on a name
    syncs its directory before it answers (:meth:`install` and :meth:`put` do so for blobs
    they find already there), so a leftover is never trusted unsynced, and removing it could
    take away what another batch or process just found and relies on. Fan-out directories
    are all made, durably, when the store opens: none is made while blobs are written."""

    def __init__(
        self,
        root: Path | str,
        *,
        unlink_later: bool = False,
        shared_after_s: float | None = None,
        drop_leftovers: bool = True,
    ) -> None:
        """``shared_after_s``: other processes write here too (replicas): their temporary
        files are theirs, so only leftovers older than this are dropped at start.
        ``drop_leftovers`` False: not yet, the owner calls :meth:`drop_leftovers` once it
        knows the directory is its own (:meth:`claim`): in another deployment's directory
        they are that deployment's writes under way."""
        self.root = Path(root)
        self._shared_after_s = shared_after_s
        # Blobs deleted and not yet unlinked: hash -> unlinks pending.
        self._doomed: Counter[str] = Counter()
        self._doomed_changed = threading.Condition()
        self._unlinker = (
            ThreadPoolExecutor(1, thread_name_prefix="fedge-unlink") if unlink_later else None
        )
        self._tmp = self.root / "tmp"
        self._tmp.mkdir(parents=True, exist_ok=True)
        # Blobs an install() under way is placing anew: not there for exists() until their
        # directory is synced (another batch must not acknowledge on an unsynced name).
        self._installing: Counter[str] = Counter()
        # Every fan-out directory exists, durably, before any blob goes in: a directory made
        # on the way, and not yet synced into the root (by another process, or by a write
        # that failed), could carry an acknowledged blob away in a power cut.
        for i in range(256):
            (self.root / f"{i:02x}").mkdir(exist_ok=True)
        fsync_dir(self.root)
        if drop_leftovers:
            self.drop_leftovers()

    def drop_leftovers(self) -> None:
        """Leftovers of writes a crash interrupted are never referenced: drop them (files of
        put(), directories of a bundle upload being unpacked)."""
        shared_after_s = self._shared_after_s
        cutoff = None if shared_after_s is None else time.time() - shared_after_s
        for stale in self._tmp.iterdir():
            with contextlib.suppress(FileNotFoundError):  # another process's, just removed
                if cutoff is not None and stale.lstat().st_mtime >= cutoff:
                    continue
                if stale.is_dir() and not stale.is_symlink():
                    shutil.rmtree(stale)
                else:
                    stale.unlink(missing_ok=True)

    def _marker(self) -> dict[str, Any] | None:
        owner = self.root / OWNER_FILE
        try:
            found = json.loads(owner.read_bytes())
        except FileNotFoundError:
            return None
        except ValueError as e:
            raise WrongBlobDirectory(f"{owner} is not the file fedge wrote: {e}") from e
        if not isinstance(found, dict):
            raise WrongBlobDirectory(f"{owner} is not the file fedge wrote: {found!r}")
        return found

    def owner(self) -> str | None:
        """The ``store_id`` of the database this directory belongs to (None: none yet)."""
        found = self._marker()
        return None if found is None else str(found.get("store_id"))

    def claim(self, identity: StoreIdentity) -> None:
        """Make this directory the blobs of the database ``identity`` names (as its latest
        start, :meth:`~coordinator.store.base.Store.start`, left it), or refuse with
        :class:`WrongBlobDirectory` if it holds another database's.

        A coordinator alone on its database deletes at start every blob its records do not
        name, so a wrong ``--db`` (a mistyped file, a fresh one, a database migrated away
        from and served again) on a directory in use would delete that deployment's models
        and acknowledged updates. A directory naming no database (new, or from before this
        file) is taken; one naming the database's predecessor passes to it if that one has
        not served here since the copy (its generation then is the one the copy recorded:
        else the copy would delete what it wrote since); after that, the database copied
        from is refused here."""
        owner = self.root / OWNER_FILE
        mine = json.dumps({"store_id": identity.store_id, "generation": identity.generation,
                           "predecessor": identity.predecessor}).encode()  # fmt: skip
        for _ in range(2):
            current = self._marker()
            if current is not None and current.get("store_id") != identity.store_id:
                _check_hand_over(self.root, identity, current)
            fd, tmp_name = tempfile.mkstemp(dir=self._tmp)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(mine)
                    f.flush()
                    os.fsync(f.fileno())
                if current is None:
                    try:  # only if still unclaimed: another database may be claiming it now
                        os.link(tmp_name, owner)
                    except FileExistsError:
                        continue
                else:
                    os.replace(tmp_name, owner)
            finally:
                Path(tmp_name).unlink(missing_ok=True)
            fsync_dir(self.root)
            if current is not None and current.get("store_id") != identity.store_id:
                log.info("blob directory %s passes from database %s to %s, migrated from it",
                         self.root, identity.predecessor, identity.store_id)  # fmt: skip
            return
        raise WrongBlobDirectory(f"{owner} changed while it was claimed; try again")

    def path(self, sha: str) -> Path:
        if not _SHA_RE.match(sha):
            raise ValueError(f"not a sha256 hex digest: {sha!r}")
        return self.root / sha[:2] / sha[2:]

    def exists(self, sha: str) -> bool:
        with self._doomed_changed:
            if sha in self._doomed or sha in self._installing:
                return False
        return self.path(sha).is_file()

    def installing(self, sha: str) -> bool:
        """Whether an :meth:`install` under way is placing this blob anew."""
        with self._doomed_changed:
            return sha in self._installing

    def sync_names(self, shas: Iterable[str]) -> None:
        """Make blobs' names durable (found there, maybe placed by another process whose
        directory sync is still to come): each directory holding one synced once."""
        for directory in sorted({self.path(sha).parent for sha in shas}):
            fsync_dir(directory)

    def _found(self, path: Path) -> None:
        """A write skipped because ``path`` is there: its name synced, and its time
        refreshed (the replicas' orphan sweep goes by age)."""
        fsync_dir(path.parent)
        with contextlib.suppress(FileNotFoundError):
            os.utime(path)

    def _wait_unlinked(self, shas: Sequence[str]) -> None:
        """Before writing blobs: a pending unlink of the same bytes must not remove them."""
        if self._unlinker is not None:
            with self._doomed_changed:
                self._doomed_changed.wait_for(lambda: self._doomed.keys().isdisjoint(shas))

    def wait_unlinked(self) -> None:
        """Return once every blob deleted so far is unlinked (``unlink_later``)."""
        with self._doomed_changed:
            self._doomed_changed.wait_for(lambda: not self._doomed)

    def close(self) -> None:
        """Wait for the unlinks under way (``unlink_later``); later deletes unlink at once."""
        if self._unlinker is not None:
            self._unlinker.shutdown(wait=True)

    def put(self, data: bytes | bytearray | memoryview) -> str:
        sha = hashlib.sha256(data).hexdigest()
        self._install(sha, lambda f: f.write(data))
        return sha

    def stage(self, data: bytes | bytearray | memoryview) -> Staged:
        """Write ``data`` to a temporary file (not synced): :meth:`install` makes it a blob,
        :meth:`discard` drops it. Safe from any thread."""
        sha = hashlib.sha256(data).hexdigest()
        fd, tmp_name = tempfile.mkstemp(dir=self._tmp)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        except BaseException:
            os.close(fd)
            os.unlink(tmp_name)
            raise
        return Staged(sha, Path(tmp_name), fd)

    def discard(self, staged: Sequence[Staged]) -> None:
        """Drop staged files not (or no longer) needed (again: no harm)."""
        for s in staged:
            fd, s.fd = s.fd, None
            if fd is not None:
                os.close(fd)
            s.tmp.unlink(missing_ok=True)

    def install(self, staged: Sequence[Staged]) -> None:
        """Make staged blobs durable and visible together (see the module docstring): one
        fsync per file, then one per directory, all on the calling thread. On any error the
        error is raised (files renamed already stay: see the class); the temporary files
        are gone either way. The directories of blobs found already there are synced too:
        such a name may be another batch's or process's, not yet synced.

        One thread, not one per fsync: started together, the files' write-back leaves the
        fsyncs after the first little to wait for, and a thread per fsync cost each upload
        more CPU in wake-ups and GIL hand-offs than the waits it overlapped."""
        self._wait_unlinked([s.sha for s in staged])
        fresh = {s.sha: s for s in staged if not self.path(s.sha).is_file()}
        with self._doomed_changed:
            self._installing.update(list(fresh))
        try:
            fds = [s.fd for s in fresh.values() if s.fd is not None]
            for fd in fds:
                _start_writeback(fd)
            for fd in fds:
                os.fsync(fd)
            for s in fresh.values():
                os.replace(s.tmp, self.path(s.sha))
            for directory in sorted({self.path(s.sha).parent for s in staged}):
                fsync_dir(directory)
            for s in staged:
                if s.sha not in fresh:
                    with contextlib.suppress(FileNotFoundError):
                        os.utime(self.path(s.sha))
        finally:
            with self._doomed_changed:
                self._installing.subtract(list(fresh))
                self._installing += Counter()  # drops the zero counts
            self.discard(staged)

    def put_file(self, source: Path, sha: str | None = None) -> str:
        """Copy a file in (its sha256 computed while copying, checked against ``sha`` if given)."""
        h = hashlib.sha256()

        def copy(f: object) -> None:
            with open(source, "rb") as src:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    h.update(chunk)
                    f.write(chunk)  # type: ignore[attr-defined]

        fd, tmp_name = tempfile.mkstemp(dir=self._tmp)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as f:
                copy(f)
                f.flush()
                os.fsync(f.fileno())
            digest = h.hexdigest()
            if sha is not None and digest != sha:
                raise ValueError(f"{source} has sha256 {digest}, expected {sha}")
            self._wait_unlinked([digest])
            self._rename_into_place(tmp, digest)
        finally:
            tmp.unlink(missing_ok=True)
        return digest

    def _install(self, sha: str, write: object, dest: Path | None = None) -> None:
        self._wait_unlinked([sha])
        if (dest or self.path(sha)).is_file():
            self._found(dest or self.path(sha))
            return
        fd, tmp_name = tempfile.mkstemp(dir=self._tmp)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)  # type: ignore[operator]
                f.flush()
                os.fsync(f.fileno())
            self._rename_into_place(tmp, sha, dest)
        finally:
            tmp.unlink(missing_ok=True)

    def derived_path(self, sha: str, kind: str) -> Path:
        if kind not in DERIVED_KINDS:
            raise ValueError(f"unknown derived kind {kind!r}")
        blob = self.path(sha)
        return blob.with_name(f"{blob.name}.{kind}")

    def derived(self, sha: str, kind: str, make: Callable[[bytes], bytes]) -> Path:
        """The file ``make(blob)`` of blob ``sha``, made (atomically, durably) on first use.

        ``make`` must be deterministic: the file is only made again if it is missing.
        Raises FileNotFoundError if the blob is gone.
        """
        dest = self.derived_path(sha, kind)
        if not dest.is_file():
            data = make(self.read(sha))
            self._install(sha, lambda f: f.write(data), dest)
        return dest

    def put_with_derived(self, data: bytes, derived: Mapping[str, bytes]) -> str:
        """:meth:`put` a blob together with derived files (``{kind: bytes}``, what
        :meth:`derived` would make), in one round of fsyncs: every file synced, the blob
        renamed into place before its derived files, their directory synced once. A version
        committed so is served without a write on its first download."""
        sha = hashlib.sha256(data).hexdigest()
        self._wait_unlinked([sha])
        files = {self.path(sha): data, **{self.derived_path(sha, k): v for k, v in derived.items()}}
        todo = [(dest, self.stage(body)) for dest, body in files.items() if not dest.is_file()]
        try:
            for _, staged in todo:
                os.fsync(staged.fd)  # type: ignore[arg-type]
            for dest, staged in todo:  # the blob before its derived files
                os.replace(staged.tmp, dest)
            if todo:
                fsync_dir(self.path(sha).parent)
            else:
                self._found(self.path(sha))
        finally:
            self.discard([staged for _, staged in todo])
        return sha

    def _rename_into_place(self, tmp: Path, sha: str, dest: Path | None = None) -> None:
        dest = dest or self.path(sha)
        os.replace(tmp, dest)
        fsync_dir(dest.parent)  # failing, the file stays: see the class

    def read(self, sha: str) -> bytes:
        return self.path(sha).read_bytes()

    def size(self, sha: str) -> int:
        return self.path(sha).stat().st_size

    def delete(self, sha: str) -> None:
        """Delete a blob and its derived files (now, or soon with ``unlink_later``)."""
        self.path(sha)  # a bad hash raises here, on the caller's thread
        if self._unlinker is not None:
            with self._doomed_changed:
                self._doomed[sha] += 1
            try:
                self._unlinker.submit(self._unlink_doomed, sha)
                return
            except RuntimeError:  # closed: unlink here
                self._undoom(sha)
        self._unlink(sha)

    def _unlink(self, sha: str) -> None:
        for kind in DERIVED_KINDS:  # derived first: none outlives its blob
            self.derived_path(sha, kind).unlink(missing_ok=True)
        self.path(sha).unlink(missing_ok=True)

    def _unlink_doomed(self, sha: str) -> None:
        try:
            self._unlink(sha)
        except OSError as e:  # unreferenced: the start-up sweep removes it
            log.warning("blob %s not deleted: %s", sha, e)
        finally:
            self._undoom(sha)

    def _undoom(self, sha: str) -> None:
        with self._doomed_changed:
            self._doomed[sha] -= 1
            if self._doomed[sha] <= 0:
                del self._doomed[sha]
            self._doomed_changed.notify_all()

    def _fanouts(self) -> Iterator[Path]:
        for fanout in sorted(self.root.iterdir()):
            if fanout.is_dir() and _FANOUT_RE.match(fanout.name):
                yield fanout

    def shas(self) -> Iterator[str]:
        """Every stored blob's hash (files that do not look like blobs are not ours: skipped;
        nor are blobs deleted and not yet unlinked)."""
        for fanout in self._fanouts():
            for f in sorted(fanout.iterdir()):
                sha = fanout.name + f.name
                if f.is_file() and _SHA_RE.match(sha) and self.exists(sha):
                    yield sha

    def collect(self, keep: Set[str]) -> Collected:
        """Delete every blob not in ``keep``, and derived files whose blob is gone or not
        kept (counted in ``bytes`` only). Only safe while nothing is being written."""
        self.wait_unlinked()  # they would race the walk
        count = size = 0
        for sha in list(self.shas()):
            if sha not in keep:
                path = self.path(sha)
                size += path.stat().st_size
                path.unlink()
                count += 1
        for fanout in self._fanouts():
            for f in list(fanout.iterdir()):
                stem, _, kind = f.name.partition(".")
                sha = fanout.name + stem
                if kind in DERIVED_KINDS and _SHA_RE.match(sha) and not self.exists(sha):
                    size += f.stat().st_size
                    f.unlink()
        return Collected(count, size)


def _check_hand_over(root: Path, identity: StoreIdentity, current: dict[str, Any]) -> None:
    """Refuses unless the directory's database is ``identity``'s predecessor and has not
    started here since the copy."""
    owner, this = current.get("store_id"), identity.store_id
    if current.get("predecessor") == this:
        raise WrongBlobDirectory(
            f"blob directory {root} belongs to database {owner}, migrated from this one "
            f"({this}), which has served from it since: serving this one on it would delete "
            "what that one wrote. Give this database a directory of its own (--blobs)"
        )
    if owner != identity.predecessor or identity.predecessor is None:
        copied = f", migrated from {identity.predecessor}" if identity.predecessor else ""
        raise WrongBlobDirectory(
            f"blob directory {root} belongs to database {owner}, not to this one "
            f"({this}{copied}): give this database's own directory (--blobs), or an empty one "
            "for a new deployment"
        )
    if int(current.get("generation") or 0) > (identity.predecessor_generation or 0):
        raise WrongBlobDirectory(
            f"blob directory {root} belongs to database {owner}, which this one ({this}) was "
            "copied from and which has served from it since the copy: taking it over would "
            "delete what that one wrote since. Copy again (fedge db migrate into an empty "
            "database) or give this database a directory of its own (--blobs)"
        )


def held(store: Store, blobs: BlobStore, shas: Iterable[str]) -> bool:
    """Inside ``store``'s transaction, before the row that names ``shas``: each blob locked
    shared to the commit, so that a :func:`delete_unneeded` of the same bytes (here or on
    another replica) waits for it and then sees the row; and whether all are still there.
    Among replicas a blob can be gone since it was put: identical bytes were there already
    (left by a row that failed), so the put skipped its write, and another replica's orphan
    sweep found them old and named by nothing. The caller writes them again or refuses."""
    wanted = sorted(set(shas))  # one lock order for every transaction
    for sha in wanted:
        store.lock_blob(sha, shared=True)
    return all(blobs.exists(sha) for sha in wanted)


# Blobs decided in one transaction: among replicas each is an advisory lock held to the
# commit (PostgreSQL's lock table has about 64 per connection to spare), and on SQLite each
# transaction is a turn of the file's one writer, so a round's thousands of payloads go in a
# few dozen turns rather than one each.
DELETE_CHUNK = 128


def delete_unneeded(
    blobs: BlobStore, store: Store, shas: Iterable[str], needed: Callable[[str], bool]
) -> list[str]:
    """Delete each blob of ``shas`` unless ``needed(sha)``, deciding and deleting under the
    store's exclusive :meth:`~coordinator.store.Store.lock_blob`: a transaction storing a
    row that names the same bytes (on this process or another replica) holds it shared from
    its existence check to its commit, so it either commits first (and ``needed`` sees its
    row) or finds the file gone (and refuses its upload). ``DELETE_CHUNK`` blobs per
    transaction, none waited for there (holding some blobs' locks while waiting for another
    could deadlock with an upload holding that one and waiting for ours); those another
    transaction held are decided again at the end, one per transaction, waiting for their
    lock while holding none. Returns the hashes deleted."""
    deleted: list[str] = []
    held: list[str] = []

    def decide(sha: str) -> None:
        if not needed(sha):
            blobs.delete(sha)
            deleted.append(sha)

    todo = list(dict.fromkeys(shas))
    for start in range(0, len(todo), DELETE_CHUNK):
        with store.atomic():
            for sha in todo[start : start + DELETE_CHUNK]:
                if store.lock_blob(sha, wait=False):
                    decide(sha)
                else:
                    held.append(sha)
    for sha in held:
        with store.atomic():
            store.lock_blob(sha)
            decide(sha)
    return deleted


class BackgroundDeletes:
    """:func:`delete_unneeded` on a thread of its own, through a store connection of its own
    (``open_store``, opened on that thread when first needed), for a process among replicas:
    the closed round's thousands of payloads are decided and unlinked as another replica
    would, chunk by chunk, while this process's worker goes on answering (it would otherwise
    hold up the answers of the batch that closed the round for as long). A blob is decided
    under its lock, so what the worker stores meanwhile is never taken away; a failure (or
    a crash) leaves the payloads to the orphan sweep."""

    def __init__(self, blobs: BlobStore, open_store: Callable[[], Store]) -> None:
        self.blobs = blobs
        self._open = open_store
        self._store: Store | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="fedge-deletes")

    def submit(self, shas: Sequence[str]) -> None:
        self._pool.submit(self._delete, list(shas))

    def _delete(self, shas: list[str]) -> None:
        try:
            if self._store is None:
                self._store = self._open()
            delete_unneeded(self.blobs, self._store, shas, self._store.payload_in_open_round)
        except Exception as e:
            log.warning("%d payloads not deleted (left to the orphan sweep): %s", len(shas), e)

    def wait(self) -> None:
        """Return once the deletes submitted so far are done."""
        self._pool.submit(lambda: None).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        if self._store is not None:
            self._store.close()
