"""Weight files on disk: checksums, verified downloads, and reading state dicts safely.

Downloads go through huggingface_hub, the library made for them: hub files by ``hf_hub_download``
(``HF_ENDPOINT``, ``HF_HUB_OFFLINE``, its cache, ETags, a dropped connection resumed), plain URLs (SAM's)
by its ``http_get`` into a ``.part`` file that a later run resumes with an HTTP Range request.
No knowledge of which model needs which file (that is :mod:`.weights`).
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_RANGE_NOT_SATISFIABLE = 416


class WeightsError(RuntimeError):
    """A weight file is missing, corrupt, or does not fit the model; the message says what to do."""


@dataclass(frozen=True)
class WeightFile:
    """An official weight file: its file name, where to download it, and its SHA-256 (None: not published)."""

    name: str
    url: str
    sha256: str | None = None

def sha256_of(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, 'rb') as stream:
        for block in iter(lambda: stream.read(_CHUNK), b''):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: str | Path, expected: str | None, url: str = '') -> None:
    """Raise :class:`WeightsError` naming ``path`` when its SHA-256 is not ``expected`` (None: no check).

    A successful check leaves a stamp next to the file (``.<name>.sha256``, holding the hash, size
    and modification time) so that an unchanged file is not hashed again on the next start.
    """
    if expected is None:
        return
    path = Path(path)
    stamp, fingerprint = _stamp(path, expected)
    try:
        if stamp.read_text(encoding='ascii').strip() == fingerprint:
            return
    except OSError:
        pass
    actual = sha256_of(path)
    if actual != expected.lower():
        raise WeightsError(
            f'{path} is corrupt or truncated: SHA-256 {actual}, expected {expected} '
            f'({path.stat().st_size} bytes). Delete it and fetch it again'
            + (f' from {url}' if url else '') + '.')
    _write_stamp(path, expected)


def _stamp(path: Path, sha256: str) -> tuple[Path, str]:
    """The stamp file of ``path`` and the line it holds while ``path`` is unchanged and verified."""
    stat = path.stat()
    return path.with_name(f'.{path.name}.sha256'), f'{sha256.lower()} {stat.st_size} {stat.st_mtime_ns}'


def _write_stamp(path: Path, sha256: str) -> None:
    stamp, fingerprint = _stamp(path, sha256)
    try:
        stamp.write_text(fingerprint + '\n', encoding='ascii')
    except OSError:
        log.debug('cannot write the checksum stamp %s', stamp)


def download(url: str, dest: str | Path, sha256: str | None = None) -> Path:
    """Download ``url`` to ``dest``, resumable, with a progress bar, checked, renamed into place.

    The bytes go to ``.<name>.part`` next to ``dest`` (huggingface_hub's ``http_get``: a connection
    dropped mid-way is resumed with an HTTP Range request). A failed download keeps what it got there,
    and the next call resumes from it (a server that ignores Range sends the whole file again; one that
    refuses the range starts it anew). The complete file is checked against ``sha256`` and renamed to
    ``dest``, so ``dest`` is never partial; a file of the wrong checksum is deleted.

    Args:
        url: what to download (http or https).
        dest: the file to create.
        sha256: the expected hex SHA-256; None: not checked.

    Returns:
        ``dest``.

    Raises:
        WeightsError: the download failed (what arrived stays in the ``.part`` file for the next
            call) or the checksum does not match (nothing is left).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f'.{dest.name}.part')
    try:
        try:
            _fetch_into(url, part, dest.name)
        except Exception as error:
            if getattr(getattr(error, 'response', None), 'status_code', None) != _RANGE_NOT_SATISFIABLE:
                raise
            log.warning('%s: the server refuses to resume at %d bytes; downloading it anew', url, part.stat().st_size)
            part.unlink()
            _fetch_into(url, part, dest.name)
        actual = sha256_of(part) if sha256 is not None else None
        if actual is not None and actual != sha256.lower():
            part.unlink()
            raise WeightsError(f'download of {url} is corrupt: SHA-256 {actual}, expected {sha256}')
        os.replace(part, dest)
    except WeightsError:
        raise
    except Exception as error:  # huggingface_hub raises its own, httpx's and OS errors
        if part.is_file() and part.stat().st_size == 0:
            part.unlink()
        raise WeightsError(f'download of {url} failed: {error}') from error
    if sha256 is not None:
        _write_stamp(dest, sha256)  # just hashed: no second read at the next start
    return dest


def _fetch_into(url: str, part: Path, name: str) -> None:
    """Append the rest of ``url`` to ``part`` (created when missing), from its current size on."""
    from huggingface_hub.file_download import http_get

    with open(part, 'ab') as stream:
        resumed = stream.tell()
        if resumed:
            log.info('resuming the download of %s at %d bytes (%s)', url, resumed, part)
        http_get(url, stream, resume_size=resumed, displayed_filename=name)


def download_from_hub(repo: str, filename: str, dest: str | Path) -> Path:
    """Download ``filename`` of the Hugging Face hub repository ``repo`` to ``dest`` by ``hf_hub_download``.

    huggingface_hub honours ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE``, copies a file its cache already
    holds instead of downloading it, and resumes a connection dropped mid-way; the file arrives in a
    temporary folder next to ``dest`` and is renamed into place (``dest`` is never partial).

    Args:
        repo: the repository (``timm/vit_base_patch16_224.dino``).
        filename: the file in it (``model.safetensors``).
        dest: the file to create.

    Returns:
        ``dest``.

    Raises:
        WeightsError: the download failed (nothing is left at ``dest``).
    """
    from huggingface_hub import hf_hub_download, hf_hub_url

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    url = hf_hub_url(repo, filename)
    try:
        with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f'.{dest.name}.') as staging:
            os.replace(hf_hub_download(repo, filename, local_dir=staging), dest)
    except Exception as error:  # huggingface_hub raises its own, httpx's and OS errors
        raise WeightsError(f'download of {url} failed: {error}') from error
    return dest


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict on the CPU.

    ``.safetensors`` through safetensors, anything else through
    ``torch.load(map_location='cpu', weights_only=True)``. A ``{'state_dict': ...}``/``{'model': ...}``
    wrapper is unwrapped.

    Raises:
        WeightsError: unreadable (corrupt, truncated, not a checkpoint), naming the file.
    """
    path = Path(path)
    try:
        if path.suffix == '.safetensors':
            try:
                from safetensors.torch import load_file
            except ImportError as error:
                raise WeightsError(f'{path} is a .safetensors file: pip install safetensors') from error
            state = load_file(str(path), device='cpu')
        else:
            state = torch.load(path, map_location='cpu', weights_only=True)
    except WeightsError:
        raise
    except Exception as error:  # torch/safetensors raise many types for a bad file
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise WeightsError(f'cannot read weights file {path} ({type(error).__name__}: {reason}). It may be '
                           'truncated or corrupt: delete it and fetch it again.') from error
    for key in ('state_dict', 'model'):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f'{path} does not hold a state dict (a mapping of names to tensors).')
    return dict(state)


def load_into(module: torch.nn.Module, path: str | Path, what: str) -> None:
    """Load the state dict in ``path`` into ``module``; every key must match in name and shape.

    Args:
        module: the model to load into.
        path: the weight file.
        what: the expected model, for messages (e.g. ``'SAM vit_b'``).

    Raises:
        WeightsError: unreadable file, or a file of another model (missing/unexpected keys, wrong
            shapes), naming the file.
    """
    state = load_state_dict(path)
    module_state = module.state_dict()
    missing = [k for k in module_state if k not in state]
    unexpected = [k for k in state if k not in module_state]
    wrong_shape = [f'{k} {tuple(state[k].shape)} vs {tuple(v.shape)}'
                   for k, v in module_state.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong_shape:
        problems = [f'{len(items)} {label} (e.g. {", ".join(items[:3])})'
                    for label, items in (('missing keys', missing), ('unexpected keys', unexpected),
                                         ('tensors of the wrong shape', wrong_shape)) if items]
        raise WeightsError(f'{path} is not a {what} checkpoint: {"; ".join(problems)}. '
                           'Check that the file matches the configured model.')
    module.load_state_dict(state, strict=True)
