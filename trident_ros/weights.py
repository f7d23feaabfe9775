"""Weight files: where they live, how they are fetched and checked, and errors that say what to do.

SAM checkpoints are resolved here (explicit file, else the official file in the weights folder,
else a verified download). CLIP and DINO weights come through open_clip's and timm's own caches;
this module only turns their failures into a :class:`WeightsError` that names the file to fetch.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from .config import TridentConfig

log = logging.getLogger(__name__)

SMOKE_HINT = ('To try the pipeline without any weights, run the smoke mode: --random-weights '
              '(random_weights: true); its labels are meaningless.')
_CHUNK = 1 << 20
_DOWNLOAD_TIMEOUT_S = 30.0


class WeightsError(RuntimeError):
    """A weight file is missing, corrupt, or does not fit the model; the message says what to do."""


@dataclass(frozen=True)
class WeightFile:
    """An official weight file: its file name, where to download it, and its SHA-256 (None: unknown)."""

    name: str
    url: str
    sha256: str | None = None


_SAM_URL = 'https://dl.fbaipublicfiles.com/segment_anything/'
SAM_CHECKPOINTS: dict[str, WeightFile] = {
    'vit_b': WeightFile('sam_vit_b_01ec64.pth', _SAM_URL + 'sam_vit_b_01ec64.pth',
                        'ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912'),
    'vit_l': WeightFile('sam_vit_l_0b3195.pth', _SAM_URL + 'sam_vit_l_0b3195.pth',
                        '3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622'),
    'vit_h': WeightFile('sam_vit_h_4b8939.pth', _SAM_URL + 'sam_vit_h_4b8939.pth',
                        'a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e'),
}


def weights_dir(config: TridentConfig) -> Path:
    """The weights folder: ``config.weights_dir``, else ``$TRIDENT_WEIGHTS_DIR``, else
    ``$XDG_CACHE_HOME/trident_ros`` or ``~/.cache/trident_ros``."""
    if config.weights_dir:
        return Path(config.weights_dir).expanduser()
    if os.environ.get('TRIDENT_WEIGHTS_DIR'):
        return Path(os.environ['TRIDENT_WEIGHTS_DIR']).expanduser()
    cache = os.environ.get('XDG_CACHE_HOME') or '~/.cache'
    return Path(cache).expanduser() / 'trident_ros'


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
    """Download ``url`` to ``dest`` with a progress bar, through a temporary file in the same folder
    that is checked against ``sha256`` and then renamed into place (so ``dest`` is never partial).

    :raises WeightsError: the download failed or the checksum does not match (nothing is left at
        ``dest``). ``OSError``/``urllib.error.URLError`` are wrapped.
    """
    from tqdm import tqdm

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.NamedTemporaryFile(dir=dest.parent, prefix=f'.{dest.name}.', suffix='.part', delete=False)
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


def fetch_weight_file(spec: WeightFile, directory: Path, allow_download: bool, what: str,
                      parameter: str = 'the checkpoint parameter') -> Path:
    """The file ``spec.name`` in ``directory``, downloaded from ``spec.url`` when missing and allowed.

    The file is checked against ``spec.sha256`` (when known).

    :param what: the model it is for, for messages (e.g. ``'SAM vit_b'``).
    :param parameter: the config field that takes a local copy instead, for messages.
    :raises WeightsError: missing and not downloadable, or corrupt; the message gives the URL and
        the exact path to put the file at.
    """
    path = directory / spec.name
    if not path.is_file():
        if not allow_download:
            raise WeightsError(_missing_message(what, spec, path, 'downloads are disabled (download: false)',
                                                parameter))
        log.info('downloading %s weights %s to %s', what, spec.url, path)
        try:
            download(spec.url, path, spec.sha256)
        except WeightsError as error:
            raise WeightsError(_missing_message(what, spec, path, str(error), parameter)) from error
    verify_sha256(path, spec.sha256, spec.url)
    return path


def _missing_message(what: str, spec: WeightFile, path: Path, reason: str, parameter: str) -> str:
    return (f'{what} weights {spec.name} are not at {path}, and {reason}.\n'
            f'  Fetch {spec.url}\n'
            f'  and put it at {path}\n'
            f'  (or set {parameter} to a local copy, or weights_dir / $TRIDENT_WEIGHTS_DIR '
            f'at the folder holding it).\n  {SMOKE_HINT}')


def resolve_sam_checkpoint(config: TridentConfig) -> Path:
    """The SAM checkpoint file for ``config.sam_model``.

    ``config.sam_checkpoint`` wins (checked against the official SHA-256 when it carries the official
    file name); else the official file in :func:`weights_dir`; else it is downloaded there when
    ``config.download``.

    :raises WeightsError: missing (with the URL and the path to put it at) or corrupt.
    """
    spec = SAM_CHECKPOINTS[config.sam_model]
    if config.sam_checkpoint:
        path = Path(config.sam_checkpoint).expanduser()
        if not path.is_file():
            raise WeightsError(f'sam_checkpoint {path} does not exist. The official {config.sam_model} file is '
                               f'{spec.url}.\n  {SMOKE_HINT}')
        if path.name == spec.name:
            verify_sha256(path, spec.sha256, spec.url)
        return path
    return fetch_weight_file(spec, weights_dir(config), config.download, f'SAM {config.sam_model}',
                             'sam_checkpoint')


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict on the CPU: ``.safetensors`` through safetensors, anything else through
    ``torch.load(map_location='cpu', weights_only=True)``. A ``{'state_dict': ...}``/``{'model': ...}``
    wrapper is unwrapped.

    :raises WeightsError: unreadable (corrupt, truncated, not a checkpoint), naming the file.
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

    :param what: the expected model, for messages (e.g. ``'SAM vit_b'``).
    :raises WeightsError: unreadable file, or a file of another model (missing/unexpected keys,
        wrong shapes), naming the file.
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


def dino_checkpoint(config: TridentConfig) -> Path | None:
    """A local DINO weight file: ``config.dino_checkpoint``, else DINO's official file for
    ``config.dino_model`` (e.g. ``dino_vitbase16_pretrain.pth``) if it is in :func:`weights_dir`;
    None: use timm's own pretrained weights (its hub cache or download)."""
    if config.dino_checkpoint:
        path = Path(config.dino_checkpoint).expanduser()
        if not path.is_file():
            raise WeightsError(f'dino_checkpoint {path} does not exist.\n  {SMOKE_HINT}')
        return path
    url = _timm_weights_url(config.dino_model)
    if url:
        candidate = weights_dir(config) / url.rsplit('/', 1)[-1]
        if candidate.is_file():
            return candidate
    return None


def _timm_weights_url(model_name: str) -> str:
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(model_name)
    return (cfg.url or '') if cfg is not None else ''


def dino_weights_error(config: TridentConfig, error: Exception) -> WeightsError:
    """The :class:`WeightsError` for timm failing to provide ``config.dino_model``'s weights."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(config.dino_model)
    sources = []
    if cfg is not None and cfg.hf_hub_id:
        sources.append(f'the Hugging Face repo {cfg.hf_hub_id} (file model.safetensors)')
    if cfg is not None and cfg.url:
        sources.append(f'{cfg.url}')
    where = weights_dir(config) / (cfg.url.rsplit('/', 1)[-1] if cfg is not None and cfg.url else 'dino.pth')
    return WeightsError(
        f'timm could not load the pretrained weights of {config.dino_model} ({type(error).__name__}: {error}).\n'
        f'  Fetch ' + (' or '.join(sources) or 'the DINO weights') + ' on a machine with network access,\n'
        f'  then set dino_checkpoint to the local file, or put DINO\'s file at {where}.\n  {SMOKE_HINT}')


def clip_weights_error(config: TridentConfig, error: Exception) -> WeightsError:
    """The :class:`WeightsError` for open_clip failing to provide ``config.clip_pretrained``.

    It points at the Hugging Face file open_clip itself fetches for the tag (OpenAI's own ``.pt``
    is a TorchScript archive, which loading with ``weights_only=True`` refuses).
    """
    import open_clip

    cfg = open_clip.get_pretrained_cfg(config.clip_model, config.clip_pretrained) or {}
    if cfg.get('hf_hub'):
        repo, file_name = os.path.split(cfg['hf_hub'])
        source = f'https://huggingface.co/{repo}/resolve/main/{file_name or "open_clip_model.safetensors"}'
    else:
        source = cfg.get('url') or f'the open_clip weights of {config.clip_model} ({config.clip_pretrained})'
    local_name = source.rsplit('/', 1)[-1] if '/' in source else 'clip_weights.safetensors'
    return WeightsError(
        f'open_clip could not load CLIP weights {config.clip_pretrained!r} for {config.clip_model} '
        f'({type(error).__name__}: {error}).\n'
        f'  Fetch {source}\n'
        f'  on a machine with network access, copy it here and set clip_pretrained to its path '
        f'(e.g. clip_pretrained: {weights_dir(config) / local_name}).\n  {SMOKE_HINT}')
