"""Contents as blobs: hashing files, storing them whole or in pieces, and fetching them back checked.

A file's content is stored as the blob named by its SHA-256 (``blobs/ab/ab12...``), or, from
:data:`~.manifest.CHUNK_THRESHOLD_BYTES` on, as :data:`~.manifest.CHUNK_BYTES` pieces, each a blob. Contents are
read through descriptors (never whole in memory): a large file's pieces are copied (in the kernel) to private
temporary files on their way to and from the store. What reads the files (a local workspace, a remote server) is
the caller's: :class:`BlobWriter` only sees a descriptor and the hashes, and :func:`fetch_verified` only a
descriptor to fill.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from .manifest import BLOB_PREFIX, CHUNK_BYTES, CHUNK_THRESHOLD_BYTES, FileRecord, blob_key
from .store import ObjectNotFound, ObjectStore, StoreError
from .workspace import fd_path

__all__ = ["BlobWriter", "Progress", "copy_range", "fetch_verified", "get_piece", "hash_content", "hash_fd"]

#: ``progress(done_bytes, total_bytes)``, called from worker threads.
Progress = Callable[[int, int], None]

_READ_CHUNK = 1 << 20


class BlobWriter:
    r"""What a backup's pool threads share: the contents the store holds (``known``), those being uploaded now
    (``claimed``, so two files with one content upload it once), the counts, and the progress. A worker hashes a
    file it holds open, :meth:`claim`\ s the pieces the store lacks, :meth:`put`\ s them, then :meth:`account`\ s
    for it."""

    def __init__(self, store: ObjectStore, known: set[str], total_bytes: int, progress: Progress | None) -> None:
        self.store = store
        self.known = set(known)
        self.claimed: set[str] = set()
        self.lock = threading.Lock()
        self.total_bytes = total_bytes
        self.progress = progress
        self.done_bytes = 0
        self.hashed = self.uploaded = self.uploaded_bytes = 0
        self.cancelled = False
        #: Where a large file's pieces are copied before their upload (a private folder of the sync's).
        self.pieces_dir = Path(tempfile.gettempdir())
        #: Set once ``known`` holds what the store lists (:meth:`list_stored`), or when it need not be listed.
        self.listed = threading.Event()

    def list_stored(self) -> None:
        """Add every blob the store holds to the known ones (claims wait for this)."""
        try:
            stored = {info.key.rsplit("/", 1)[-1] for info in self.store.list(BLOB_PREFIX)}
            with self.lock:
                self.known |= stored
        finally:
            self.listed.set()

    def claim(self, sha: str, chunks: tuple[str, ...]) -> list[str]:
        """The content's pieces (its whole hash when it has none) that no one has stored or is uploading: now
        this worker's to upload. Waits until the store's blobs are known."""
        self.listed.wait()
        pieces = list(dict.fromkeys(chunks or (sha,)))
        with self.lock:
            self.hashed += 1
            upload = [h for h in pieces if h not in self.known and h not in self.claimed]
            self.claimed.update(upload)
        return upload

    def release(self, upload: list[str]) -> None:
        """Give claimed pieces back (their upload failed or was dropped)."""
        with self.lock:
            self.claimed.difference_update(upload)

    def put(self, fd: int, sha: str, chunks: tuple[str, ...], upload: list[str]) -> None:
        """Upload the claimed pieces of the content open at ``fd``; a failure gives them back and propagates."""
        try:
            for h in upload:
                if chunks:
                    self._put_piece(fd, h, chunks.index(h))
                else:
                    self.store.put_file(blob_key(sha), fd_path(fd))
        except BaseException:
            self.release(upload)
            raise

    def account(self, size: int, listed_size: int, chunks: tuple[str, ...], upload: list[str]) -> None:
        """Count a file done: ``size`` bytes as read, ``listed_size`` as the scan saw it (for the progress)."""
        with self.lock:
            if upload:
                self.known.update(upload)
                self.uploaded += 1
                self.uploaded_bytes += (
                    size if not chunks else sum(min(CHUNK_BYTES, size - chunks.index(h) * CHUNK_BYTES) for h in upload)
                )
            self.done_bytes += listed_size
            if self.progress is not None:
                self.progress(self.done_bytes, self.total_bytes)

    def _put_piece(self, fd: int, sha: str, index: int) -> None:
        """Upload piece ``index`` of a large file: copied (in the kernel) to a private temporary file first."""
        tmp_fd, tmp = tempfile.mkstemp(dir=self.pieces_dir)
        try:
            copy_range(fd, tmp_fd, index * CHUNK_BYTES, 0, CHUNK_BYTES)
            self.store.put_file(blob_key(sha), Path(tmp))
        finally:
            os.close(tmp_fd)
            os.unlink(tmp)


def hash_content(fd: int, size: int) -> tuple[str, tuple[str, ...]]:
    """The content's hash, and its pieces' hashes when it is large enough to be stored in pieces."""
    return hash_pieces(fd) if size >= CHUNK_THRESHOLD_BYTES else (hash_fd(fd), ())


def copy_range(src: int, dst: int, src_offset: int, dst_offset: int, count: int) -> None:
    """Copy up to ``count`` bytes between descriptors (stops at the source's end)."""
    while count > 0:
        try:
            n = os.copy_file_range(src, dst, count, src_offset, dst_offset)
        except OSError:  # a file system without it: through a small buffer
            data = os.pread(src, min(count, _READ_CHUNK), src_offset)
            n = os.pwrite(dst, data, dst_offset) if data else 0
        if n == 0:
            return
        src_offset, dst_offset, count = src_offset + n, dst_offset + n, count - n


def get_piece(store: ObjectStore, sha: str, fd: int, offset: int, pieces_dir: Path) -> None:
    """Download one piece of a large file and write it at ``offset`` of ``fd``."""
    tmp_fd, tmp = tempfile.mkstemp(dir=pieces_dir)
    try:
        store.get_file(blob_key(sha), fd_path(tmp_fd))
        copy_range(tmp_fd, fd, 0, offset, os.fstat(tmp_fd).st_size)
    finally:
        os.close(tmp_fd)
        os.unlink(tmp)


def hash_pieces(fd: int) -> tuple[str, tuple[str, ...]]:
    """The whole content's hash and each CHUNK_BYTES piece's, in one read."""
    whole = hashlib.sha256()
    pieces = []
    offset = 0
    while True:
        piece = hashlib.sha256()
        end = offset + CHUNK_BYTES
        while offset < end:
            data = os.pread(fd, min(_READ_CHUNK, end - offset), offset)
            if not data:
                break
            whole.update(data)
            piece.update(data)
            offset += len(data)
        if offset > end - CHUNK_BYTES:  # this piece has bytes (a whole one, or the last, shorter one)
            pieces.append(piece.hexdigest())
        if offset < end:
            return whole.hexdigest(), tuple(pieces)


def hash_fd(fd: int) -> str:
    """The SHA-256 of the whole content open at ``fd`` (read from offset 0)."""
    h = hashlib.sha256()
    offset = 0
    while True:
        chunk = os.pread(fd, _READ_CHUNK, offset)
        if not chunk:
            return h.hexdigest()
        h.update(chunk)
        offset += len(chunk)


def fetch_verified(store: ObjectStore, rec: FileRecord, fd: int, pieces_dir: Path) -> None:
    """Download the content of ``rec`` (whole, or piece by piece through ``pieces_dir``) into the empty file open
    at ``fd``, then check it against its hash and size; StoreError with a sentence when it is missing or damaged."""
    try:
        if rec.chunks:
            for index, piece in enumerate(rec.chunks):
                get_piece(store, piece, fd, index * CHUNK_BYTES, pieces_dir)
        else:
            store.get_file(blob_key(rec.sha256), fd_path(fd))
    except ObjectNotFound:
        raise StoreError(
            f"The backup of {rec.path} is missing its content; restore it from another restore point."
        ) from None
    if hash_fd(fd) != rec.sha256 or os.fstat(fd).st_size != rec.size:
        raise StoreError(f"The backup of {rec.path} is damaged; restore it from another restore point.")
