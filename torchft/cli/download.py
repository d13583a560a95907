"""``tune download <repo_id> --output-dir DIR``: fetch a model repo from the Hugging Face Hub.

The files land in DIR as they are on the Hub, and the repo id is written to ``DIR/.torchft_repo_id``
so that adapters saved from a model loaded from DIR can name their base model
(``base_model_name_or_path`` in adapter_config.json).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Sequence

from torchft.cli._common import add_subcommand

REPO_ID_FILE = ".torchft_repo_id"

EPILOG = """\
examples:
  tune download meta-llama/Llama-3.2-1B-Instruct --output-dir /tmp/Llama-3.2-1B-Instruct
  tune download meta-llama/Llama-3.2-1B-Instruct --output-dir /tmp/Llama-3.2-1B-Instruct \\
      --ignore-patterns "original/*"        skip the Meta-format copy of the weights
  HF_TOKEN=hf_... tune download meta-llama/Llama-3.1-8B-Instruct --output-dir /tmp/Llama-3.1-8B-Instruct

gated models (all Llama models): request access on the model's page on huggingface.co, then create an
access token (huggingface.co/settings/tokens) and pass it with --hf-token or the HF_TOKEN variable.
"""


def register(subparsers) -> None:
    parser = add_subcommand(
        subparsers,
        "download",
        help="download a model from the Hugging Face Hub",
        description="Download every file of a Hugging Face Hub model repo into a folder.",
        epilog=EPILOG,
    )
    parser.add_argument("repo_id", help="Hub repo id, e.g. meta-llama/Llama-3.2-1B-Instruct")
    parser.add_argument("--output-dir", required=True, type=Path, help="folder to put the files in")
    parser.add_argument("--hf-token", default=None, help="Hub access token (default: the HF_TOKEN variable)")
    parser.add_argument(
        "--ignore-patterns",
        action="append",
        default=None,
        metavar="GLOB",
        help="skip files matching GLOB (repeatable), e.g. 'original/*' or '*.pth'",
    )
    parser.set_defaults(func=main)


def _hub_error_message(repo_id: str, err: Exception, token_given: bool) -> str | None:
    """One line for the Hub errors a user can meet, or None for anything else."""
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError

    page = f"{constants.ENDPOINT}/{repo_id}"
    status = err.response.status_code if isinstance(err, HfHubHTTPError) and err.response is not None else None
    if isinstance(err, GatedRepoError) or status in (401, 403):
        if token_given:
            return (
                f"{repo_id}: access refused with the given token; request access on {page} and check that "
                "the token (--hf-token or HF_TOKEN) belongs to the account that was granted access"
            )
        return (
            f"{repo_id}: the repo is gated or private; request access on {page}, then pass an access token "
            "with --hf-token TOKEN or set HF_TOKEN"
        )
    if status == 404:
        return f"{repo_id}: no such repo on the Hub ({page}); check the owner/name spelling on the model's page"
    if isinstance(err, LocalEntryNotFoundError) and constants.HF_HUB_OFFLINE:
        return f"cannot download {repo_id}: HF_HUB_OFFLINE is set; unset it to reach the Hub"
    if isinstance(err, LocalEntryNotFoundError):
        # snapshot_download turns connection errors into this, with the network error as the cause.
        return f"cannot reach the Hub at {constants.ENDPOINT} to download {repo_id}: check the network connection"
    if status is not None:
        return f"{repo_id}: the Hub answered {status}: {str(err).splitlines()[0]}"
    return None


def download(
    repo_id: str, output_dir: str | Path, token: str | None = None, ignore_patterns: Sequence[str] | None = None
) -> Path:
    """Download ``repo_id`` into ``output_dir`` and record the repo id there; returns the folder.

    Raises PermissionError (gated/private), FileNotFoundError (no such repo), ConnectionError (no
    network), each with a one-line message saying what to do.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError

    token = token or os.environ.get("HF_TOKEN") or None
    output_dir = Path(output_dir).expanduser()
    try:
        snapshot_download(
            repo_id,
            local_dir=output_dir,
            token=token,
            ignore_patterns=list(ignore_patterns) if ignore_patterns else None,
        )
    except (HfHubHTTPError, LocalEntryNotFoundError) as err:
        message = _hub_error_message(repo_id, err, token_given=token is not None)
        if message is None:
            raise
        status = err.response.status_code if isinstance(err, HfHubHTTPError) and err.response is not None else None
        if isinstance(err, GatedRepoError) or status in (401, 403):
            raise PermissionError(message) from err
        if status == 404:
            raise FileNotFoundError(message) from err
        raise ConnectionError(message) from err
    (output_dir / REPO_ID_FILE).write_text(repo_id + "\n")
    return output_dir


def main(args: argparse.Namespace) -> int:
    output_dir = download(args.repo_id, args.output_dir, token=args.hf_token, ignore_patterns=args.ignore_patterns)
    # count the model's files, not the client's .cache/ bookkeeping nor our .torchft_repo_id
    files = [p.relative_to(output_dir) for p in output_dir.rglob("*") if p.is_file()]
    n_files = sum(1 for p in files if not any(part.startswith(".") for part in p.parts))
    print(f"downloaded {args.repo_id} to {output_dir} ({n_files} files)")
    return 0
