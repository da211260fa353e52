"""Rules for untrusted zip archives, written once for every door that reads one.

The command line's zip loader (scan_engine.data.load_zip), the service's dataset upload and its
prediction upload all open zips through `open_untrusted_zip`, so a rule added here holds for all
three. Each caller keeps its own error shape: the engine raises the exceptions below, the service
turns them into HTTP answers.

Whole-archive problems raise: NotAZipError (not a zip, or a truncated or corrupt one) and
ArchiveLimitError (entry count, declared total size, overall compression ratio, and, while
reading, a running total that passes the limit because a header lied). The entry count comes
from the end record before zipfile parses the central directory, so a huge directory costs no
memory first.

Single-entry problems skip the entry with a reason (RefusedEntry): unsafe paths (.., absolute,
NUL or control characters, too long), duplicates, encrypted entries, symbolic links, nested
archives (by name, and by content when read), entries over the size limit or with a per-entry
compression ratio over the limit. Hidden names (".*", so .DS_Store), "__MACOSX", "Thumbs.db" and
"desktop.ini" are ignored without a reason: they are not content.
"""

from __future__ import annotations

import hashlib
import re
import struct
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

__all__ = [
    "ArchiveLimits",
    "ArchiveError",
    "NotAZipError",
    "ArchiveLimitError",
    "EntryRefused",
    "RefusedEntry",
    "UntrustedZip",
    "open_untrusted_zip",
    "entry_path",
    "is_ignored_name",
    "looks_like_zip",
    "looks_like_archive",
    "declared_entry_count",
    "folder_labels",
    "IGNORED_NAMES",
    "RATIO_CHECK_MIN_BYTES",
]

MiB = 1024**2
GiB = 1024**3

# Names skipped silently, like any file or folder whose name starts with a dot.
IGNORED_NAMES = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini"})
# Compression ratios are judged only above this many bytes: small files of one colour or of text
# legitimately compress 1000:1, and cannot make a bomb.
RATIO_CHECK_MIN_BYTES = MiB
ARCHIVE_EXTENSIONS = (".zip", ".jar", ".tar", ".tgz", ".gz", ".bz2", ".xz", ".7z", ".rar")
# Leading bytes of zip: a local header, or the end record of an empty zip.
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
# ... and of the other archives: gzip, bzip2, xz, 7z, rar. No image format starts like these.
_ARCHIVE_MAGIC = (*_ZIP_MAGIC, b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"7z\xbc\xaf", b"Rar!")
_READ_CHUNK = MiB
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SYMLINK_MODE = 0o120000
NESTED_ARCHIVE = "nested archive (archives inside the zip are not extracted)"
NOT_A_ZIP = (
    "not a zip archive (or a truncated or corrupt one: its central directory cannot be read)"
)


@dataclass(frozen=True)
class ArchiveLimits:
    """How much one untrusted zip may hold. The defaults are the service's default settings."""

    max_entries: int = 200_000  # entries in the zip, directories included -> refused
    max_total_bytes: int = 8 * GiB  # sum of uncompressed sizes -> refused
    max_entry_bytes: int = 100 * MiB  # one entry's uncompressed size -> skipped
    max_compression_ratio: float = 200.0  # whole zip -> refused; one entry -> skipped
    max_path_chars: int = 1024  # one entry's normalised path -> skipped

    def __post_init__(self) -> None:
        for name in ("max_entries", "max_total_bytes", "max_entry_bytes", "max_path_chars"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not self.max_compression_ratio > 1:
            raise ValueError(
                f"max_compression_ratio must be over 1, got {self.max_compression_ratio!r}"
            )


class ArchiveError(ValueError):
    """The whole archive is refused; the message says why."""


class NotAZipError(ArchiveError, zipfile.BadZipFile):
    """Not a zip archive, or one whose central directory cannot be read."""


class ArchiveLimitError(ArchiveError):
    """Over a whole-archive limit (entries, total size, compression ratio): a bomb or too big."""


class EntryRefused(ValueError):
    """One entry cannot be used (corrupt, unsupported, nested archive); the message says why."""


@dataclass(frozen=True)
class RefusedEntry:
    """An entry that was not read, with a human-readable reason."""

    path: str
    reason: str


# ---------------------------------------------------------------------------------------------
# Names and contents


def is_ignored_name(part: str) -> bool:
    """Hidden files and folders, macOS resource forks, Windows thumbnails: not content."""
    return part.startswith(".") or part in IGNORED_NAMES


def entry_path(name: str, max_chars: int = 1024) -> tuple[str | None, str | None]:
    """(normalised relative path, None), (None, reason) when unsafe, or (None, None) to ignore.

    A normalised path has "/" separators, no empty, "." or ".." parts, no drive letter and no
    control character, so it cannot lead outside the folder it is joined to.
    """
    name = name.replace("\\", "/")  # some Windows tools write backslashes
    if "\x00" in name:
        return None, "unsafe path (NUL character)"
    if name.startswith("/") or _WINDOWS_DRIVE.match(name):
        return None, "unsafe path: escapes the archive's folder (absolute path)"
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        return None, "unsafe path: escapes the archive's folder (..)"
    if not parts or any(is_ignored_name(part) for part in parts):
        return None, None
    if _CONTROL.search(name):
        return None, "unsafe path (control character)"
    relative = "/".join(parts)
    if len(relative) > max_chars:
        return None, f"path longer than {max_chars} characters"
    return relative, None


def looks_like_zip(head: bytes) -> bool:
    """Whether a file starting with `head` (its first 4+ bytes) is meant to be a zip."""
    return head.startswith(_ZIP_MAGIC)


def looks_like_archive(head: bytes) -> bool:
    """Whether a file starting with `head` is a zip, gzip, bzip2, xz, 7z or rar archive."""
    return head.startswith(_ARCHIVE_MAGIC)


def folder_labels(paths: Sequence[str]) -> tuple[list[int] | None, list[str] | None]:
    """(label per path, class names) from each path's top-level folder; (None, None) when any
    path sits at the top level.

    When every path sits under one common wrapping folder with class folders inside (what zipping
    a folder usually produces: photos/cat/1.jpg), the wrapper is looked through.
    """
    parts = [path.split("/") for path in paths]
    if not parts or any(len(p) < 2 for p in parts):
        return None, None
    depth = 1 if len({p[0] for p in parts}) == 1 and all(len(p) >= 3 for p in parts) else 0
    class_names = sorted({p[depth] for p in parts})
    index = {name: i for i, name in enumerate(class_names)}
    return [index[p[depth]] for p in parts], class_names


# ---------------------------------------------------------------------------------------------
# Whole-archive and entry rules


def declared_entry_count(path: str | Path) -> int | None:
    """Entries the zip's end record declares, read before zipfile parses the central directory
    (a huge directory would otherwise cost memory first); None when there is no end record."""
    try:
        with Path(path).open("rb") as handle:
            end = zipfile._EndRecData(handle)  # type: ignore[attr-defined]
    except (OSError, struct.error, ValueError):
        return None
    return None if end is None else int(end[zipfile._ECD_ENTRIES_TOTAL])  # type: ignore[attr-defined]


def _check_entry_count(count: int, limits: ArchiveLimits) -> None:
    if count > limits.max_entries:
        raise ArchiveLimitError(f"zip has {count} entries; the limit is {limits.max_entries}")


def _check_archive(infos: Sequence[zipfile.ZipInfo], limits: ArchiveLimits) -> None:
    """Whole-archive zip-bomb limits on the declared sizes: count, total size, overall ratio."""
    _check_entry_count(len(infos), limits)
    total = sum(info.file_size for info in infos)
    if total > limits.max_total_bytes:
        raise ArchiveLimitError(
            f"zip expands to {total} bytes; the limit is {limits.max_total_bytes}"
        )
    ratio = total / max(sum(info.compress_size for info in infos), 1)
    if total > RATIO_CHECK_MIN_BYTES and ratio > limits.max_compression_ratio:
        raise ArchiveLimitError(
            f"zip compression ratio {ratio:.0f} is over the limit of "
            f"{limits.max_compression_ratio:.0f} (zip bomb?)"
        )


def _entry_problem(info: zipfile.ZipInfo, relative: str, limits: ArchiveLimits) -> str | None:
    """Why one entry (with a safe path) is skipped, from its header alone; None when it is not."""
    if info.flag_bits & 0x1:
        return "encrypted zip entry"
    if (info.external_attr >> 16) & 0o170000 == _SYMLINK_MODE:
        return "symbolic link"
    if relative.lower().endswith(ARCHIVE_EXTENSIONS):
        return NESTED_ARCHIVE
    ratio = info.file_size / max(info.compress_size, 1)
    if info.file_size > RATIO_CHECK_MIN_BYTES and ratio > limits.max_compression_ratio:
        return f"compression ratio {ratio:.0f} is over the limit (zip bomb?)"
    if info.file_size > limits.max_entry_bytes:
        return f"file too large ({info.file_size} bytes; the limit is {limits.max_entry_bytes})"
    return None


# ---------------------------------------------------------------------------------------------
# Reading


class UntrustedZip:
    """An opened zip whose entries have been sorted into usable members and refused entries.

    `members` maps normalised relative paths (sorted) to their entries; `refused` lists the
    skipped entries with reasons (paths as in the zip for unsafe names, normalised otherwise).
    Reading goes through `read` or `copy_to`, which never yield more than an entry declares and
    keep the running total under the limit. Use as a context manager; not thread-safe.
    """

    def __init__(self, archive: zipfile.ZipFile, limits: ArchiveLimits) -> None:
        self._archive = archive
        self.limits = limits
        self.members: dict[str, zipfile.ZipInfo] = {}
        self.refused: list[RefusedEntry] = []
        self._read_total = 0
        infos = [info for info in archive.infolist() if not info.is_dir()]
        _check_archive(infos, limits)
        found: dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            relative, problem = entry_path(info.filename, limits.max_path_chars)
            if problem is not None:
                self.refused.append(RefusedEntry(info.filename, problem))
            elif relative is None:
                continue
            elif relative in found:
                self.refused.append(RefusedEntry(info.filename, "duplicate path in the zip"))
            elif (problem := _entry_problem(info, relative, limits)) is not None:
                self.refused.append(RefusedEntry(relative, problem))
            else:
                found[relative] = info
        self.members = {relative: found[relative] for relative in sorted(found)}

    def _chunks(self, relative: str) -> Iterator[bytes]:
        """The entry's bytes in chunks. EntryRefused for a corrupt, unsupported or archive entry;
        ArchiveLimitError once the bytes read from the whole zip pass the total limit."""
        info = self.members[relative]
        written = 0
        try:
            with self._archive.open(info) as source:
                while chunk := source.read(_READ_CHUNK):
                    if written == 0 and looks_like_archive(chunk[:8]):
                        raise EntryRefused(NESTED_ARCHIVE)
                    written += len(chunk)
                    self._read_total += len(chunk)
                    if written > info.file_size:  # zipfile bounds this too; a lying header
                        raise zipfile.BadZipFile("entry is longer than its header says")
                    if self._read_total > self.limits.max_total_bytes:
                        raise ArchiveLimitError(
                            f"zip expands to more than {self.limits.max_total_bytes} bytes"
                        )
                    yield chunk
        except NotImplementedError as error:  # compression methods zipfile cannot read
            raise EntryRefused(f"unsupported zip entry: {error}") from None
        except (zipfile.BadZipFile, zlib.error, EOFError, struct.error, OSError) as error:
            raise EntryRefused(f"corrupt zip entry: {error}") from None

    def read(self, relative: str) -> bytes:
        """One member's bytes (at most limits.max_entry_bytes)."""
        return b"".join(self._chunks(relative))

    def copy_to(self, relative: str, target: Path) -> tuple[int, str]:
        """Stream one member to `target`: (bytes written, sha256 hex). On any error `target` is
        removed again and the error raised."""
        digest = hashlib.sha256()
        written = 0
        try:
            with target.open("wb") as out:
                for chunk in self._chunks(relative):
                    digest.update(chunk)
                    out.write(chunk)
                    written += len(chunk)
        except BaseException:
            target.unlink(missing_ok=True)
            raise
        return written, digest.hexdigest()

    def close(self) -> None:
        self._archive.close()

    def __enter__(self) -> UntrustedZip:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def open_untrusted_zip(path: str | Path, limits: ArchiveLimits | None = None) -> UntrustedZip:
    """Open a zip from an untrusted source and apply the whole-archive and entry rules.

    Raises ArchiveLimitError (over a limit) or NotAZipError (not a zip, or truncated or corrupt).
    """
    limits = limits or ArchiveLimits()
    declared = declared_entry_count(path)
    if declared is not None:
        _check_entry_count(declared, limits)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error):
        raise NotAZipError(NOT_A_ZIP) from None
    try:
        return UntrustedZip(archive, limits)
    except BaseException:
        archive.close()
        raise
