"""Weight files on disk: checksums, verified downloads, and reading state dicts safely.

No knowledge of which model needs which file (that is :mod:`.weights`).
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_DOWNLOAD_TIMEOUT_S = 30.0


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
    """Download ``url`` to ``dest`` with a progress bar, checked, renamed into place.

    The data goes to a temporary file in the same folder, is checked against ``sha256`` and is then
    renamed to ``dest`` (so ``dest`` is never partial).

    Args:
        url: what to download (http(s) or file URL).
        dest: the file to create.
        sha256: the expected hex SHA-256; None: not checked.

    Returns:
        ``dest``.

    Raises:
        WeightsError: the download failed or the checksum does not match (nothing is left at
            ``dest``); ``OSError``/``urllib.error.URLError`` are wrapped.
    """
    from tqdm import tqdm

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # closed by the `with` below; its name is needed after that (rename, clean-up)
    tmp = tempfile.NamedTemporaryFile(dir=dest.parent, prefix=f'.{dest.name}.', suffix='.part',  # noqa: SIM115
                                      delete=False)
    digest = hashlib.sha256()
    try:
        with tmp, urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response:
            total = int(response.headers.get('Content-Length') or 0) or None
            with tqdm(total=total, unit='B', unit_scale=True, unit_divisor=1024, desc=dest.name) as bar:
                for block in iter(lambda: response.read(_CHUNK), b''):
                    tmp.write(block)
                    digest.update(block)
                    bar.update(len(block))
        if sha256 is not None and digest.hexdigest() != sha256.lower():
            raise WeightsError(f'download of {url} is corrupt: SHA-256 {digest.hexdigest()}, expected {sha256}')
        os.replace(tmp.name, dest)
    except (OSError, ValueError, urllib.error.URLError) as error:
        raise WeightsError(f'download of {url} failed: {error}') from error
    finally:
        if os.path.exists(tmp.name):
            os.unlink(tmp.name)
    if sha256 is not None:
        _write_stamp(dest, sha256)  # hashed while downloading: no second read
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
