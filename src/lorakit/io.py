"""Files: atomic writes, and finding an adapter's files in a local folder or on the Hugging Face Hub.

Writes go to a temporary file beside the target, are flushed to disk, and only then renamed over the target, so
a write that fails midway (full disk, killed process) leaves the previous file whole. Several files that belong
together (an adapter's config and weights) are all staged before the first rename.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Mapping, Optional

#: keyword arguments passed on to ``huggingface_hub.hf_hub_download`` when a name is a Hub repo id
HUB_KWARGS = ("cache_dir", "token", "local_files_only", "force_download", "repo_type")


def atomic_write_many(files: Mapping[str | os.PathLike, Callable[[str], None]]) -> None:
    """For each ``path: write``, call ``write(tmp_path)`` on a temporary file beside ``path``; once every file is
    written and flushed to disk, rename them into place.

    If any write fails, no target is touched and the temporary files are removed. The renames come last and
    cannot run out of space, so the files are replaced together (a crash between two renames is the only window).
    """
    staged: list[tuple[str, Path]] = []
    try:
        for path, write in files.items():
            path = Path(path)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a saved file gets ordinary permissions
            os.close(fd)
            staged.append((tmp, path))
            write(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        for tmp, path in staged:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise
    for folder in {path.parent for _, path in staged}:
        _fsync_dir(folder)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``."""
    atomic_write_many({path: write})


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _fsync_dir(folder: Path) -> None:
    """Make the renames themselves durable (where the platform allows opening a folder)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _looks_local(name: str) -> bool:
    """A name a Hub repo id cannot be (``owner/name`` or ``name``): absolute, relative with dots, home, or deeper."""
    return (
        os.path.isabs(name)
        or name.startswith(("./", "../", "~", ".\\", "..\\"))
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
    )


def resolve_file(
    path_or_repo: str | os.PathLike,
    filename: str,
    subfolder: Optional[str] = None,
    revision: Optional[str] = None,
    **kwargs,
) -> str:
    """Path of ``filename`` in a local folder, else in a Hub repo through ``huggingface_hub``.

    A name that is an existing folder (or looks like a path) is local and never sent to the Hub. Otherwise it is a
    repo id, resolved with ``hf_hub_download``, which honours the Hub cache and offline mode (``HF_HUB_OFFLINE``);
    ``kwargs`` named in :data:`HUB_KWARGS` are passed on. Raises ``FileNotFoundError`` naming what was looked for.
    """
    name = os.fspath(path_or_repo)
    folder = Path(name) / subfolder if subfolder else Path(name)
    if Path(name).is_dir():
        candidate = folder / filename
        if not candidate.is_file():
            where = f"{folder} does not exist" if not folder.is_dir() else f"no {filename} in {folder}"
            raise FileNotFoundError(f"{candidate}: {where}")
        return str(candidate)
    if Path(name).exists():
        raise FileNotFoundError(f"{name} is a file; expected a folder holding {filename} (or a Hub repo id)")
    if _looks_local(name):
        raise FileNotFoundError(f"{name}: no such folder (looked for {filename} in it)")
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            HFValidationError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:
        raise FileNotFoundError(
            f"{name} is not a local folder, and huggingface_hub (needed for Hub repo ids) is not installed"
        ) from None
    try:
        hub_kwargs = {k: v for k, v in kwargs.items() if k in HUB_KWARGS}
        return hf_hub_download(name, filename, subfolder=subfolder, revision=revision, **hub_kwargs)
    except HFValidationError as e:
        raise FileNotFoundError(f"{name} is neither a local folder nor a valid Hub repo id ({e})") from None
    except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError) as e:
        # EntryNotFoundError covers LocalEntryNotFoundError: offline (or not cached) and not in the cache.
        where = f"{subfolder}/{filename}" if subfolder else filename
        raise FileNotFoundError(
            f"{where} not found for {name!r}: not a local folder, and the Hub (or its cache, when offline) does not "
            f"have it at revision {revision or 'main'}: {type(e).__name__}: {e}"
        ) from None


def safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata in a safetensors file's header (``{}`` for a file that is not one or cannot be read:
    reading the tensors reports that)."""
    if not str(path).endswith(".safetensors") or not os.path.isfile(path):
        return {}
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:
        return {}


def written_by_lorakit(weights_path: str | os.PathLike) -> bool:
    """Whether lorakit wrote this weights file (it puts its version in the safetensors metadata)."""
    return "lorakit_version" in safetensors_metadata(weights_path)
