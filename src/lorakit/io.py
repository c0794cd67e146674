"""Files: atomic writes and finding an adapter's files in a folder or on the Hugging Face Hub."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Optional


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``.

    A write that fails midway (full disk, killed process) leaves the previous file whole.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with _suppress():
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return True


def resolve_file(
    path_or_repo: str | os.PathLike,
    filename: str,
    subfolder: Optional[str] = None,
    revision: Optional[str] = None,
    **kwargs,
) -> str:
    """Path of ``filename`` in a local folder, else in a Hub repo through huggingface_hub (cache and offline mode
    honoured). Raises ``FileNotFoundError`` naming what was looked for."""
    folder = Path(path_or_repo) / subfolder if subfolder else Path(path_or_repo)
    if folder.is_dir():
        candidate = folder / filename
        if not candidate.is_file():
            raise FileNotFoundError(f"{candidate} does not exist (looked for {filename} in {folder})")
        return str(candidate)
    if Path(path_or_repo).exists() or os.sep in str(path_or_repo).rstrip(os.sep).lstrip(".") and str(path_or_repo).count("/") > 1:
        raise FileNotFoundError(f"{folder} is not a folder holding {filename}")
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import EntryNotFoundError, HFValidationError
    except ImportError:
        raise FileNotFoundError(
            f"{path_or_repo} is not a local folder, and huggingface_hub (needed for Hub repo ids) is not installed"
        ) from None
    try:
        return hf_hub_download(
            str(path_or_repo), filename, subfolder=subfolder, revision=revision,
            **{k: v for k, v in kwargs.items() if k in ("cache_dir", "token", "local_files_only")},
        )
    except (HFValidationError, EntryNotFoundError) as e:
        raise FileNotFoundError(f"{path_or_repo}: no folder of that name, and no {filename} in a Hub repo: {e}") from None
    except Exception as e:  # offline, network, missing repo: all mean "not found" for the user
        raise FileNotFoundError(f"could not find {filename} for {path_or_repo!r} locally or on the Hub: {e}") from None
