"""``push_to_hub``: save the adapters as ``save_pretrained`` does and upload the folder to a Hugging Face Hub repo.

The repo's own ``README.md`` is fetched first, so the model card is merged into it (:mod:`lorakit.model_card`),
never replaced. Everything goes through ``huggingface_hub.HfApi`` (imported only here, when pushing); offline, or
when the Hub cannot be reached, a ``ConnectionError`` says so and nothing is uploaded.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

from .model_card import CARD_NAME

__all__ = ["push_to_hub"]

# errors that mean "the call was wrong", not "the Hub could not be reached": raised as they are
_CALLER_ERRORS = (TypeError, AttributeError, NotImplementedError, KeyError)


def _hub_api(token):
    try:
        import huggingface_hub
        from huggingface_hub import constants
    except ImportError:
        raise ImportError("push_to_hub needs huggingface_hub (pip install huggingface_hub)") from None
    if constants.HF_HUB_OFFLINE:
        raise ConnectionError(
            "push_to_hub cannot upload: the Hugging Face Hub is in offline mode (HF_HUB_OFFLINE is set); "
            "save_pretrained(folder) writes the same files locally"
        )
    return huggingface_hub.HfApi(token=token)


def _unreachable(what: str, repo_id: str, error: Exception) -> ConnectionError:
    return ConnectionError(
        f"push_to_hub could not {what} Hub repo {repo_id!r} (offline, no access, or not logged in?); nothing was "
        f"uploaded: {type(error).__name__}: {error}"
    )


def _fetch_card(api, repo_id: str, revision: Optional[str], folder: str) -> None:
    """Copy the repo's README.md into ``folder``, if it has one, so the new card merges into it."""
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        path = api.hf_hub_download(repo_id=repo_id, filename=CARD_NAME, revision=revision)
    except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError):
        return  # a new repo, branch or card
    except _CALLER_ERRORS:
        raise
    except Exception as e:
        raise _unreachable("read the model card of", repo_id, e) from e
    shutil.copyfile(path, Path(folder) / CARD_NAME)


def push_to_hub(
    peft_model,
    repo_id: str,
    *,
    commit_message: Optional[str] = None,
    commit_description: Optional[str] = None,
    private: Optional[bool] = None,
    token: Optional[bool | str] = None,
    revision: Optional[str] = None,
    create_pr: bool = False,
    **save_kwargs: Any,
):
    """Upload ``peft_model``'s adapters (``save_kwargs`` go to ``save_pretrained``: ``selected_adapters``,
    ``safe_serialization``, …) to ``repo_id``, creating the repo if needed; returns the Hub's commit info."""
    if not isinstance(repo_id, str) or not repo_id:
        raise ValueError(f"repo_id must be a Hub repo id such as 'user/my-adapter', got {repo_id!r}")
    api = _hub_api(token)
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    except _CALLER_ERRORS:
        raise
    except Exception as e:
        raise _unreachable("create or reach", repo_id, e) from e
    with tempfile.TemporaryDirectory() as folder:
        _fetch_card(api, repo_id, revision, folder)
        peft_model.save_pretrained(folder, **save_kwargs)
        try:
            return api.upload_folder(
                repo_id=repo_id, folder_path=folder, commit_message=commit_message or "Upload LoRA adapter",
                commit_description=commit_description, revision=revision, create_pr=create_pr,
            )
        except _CALLER_ERRORS:
            raise
        except Exception as e:
            raise _unreachable("upload to", repo_id, e) from e
