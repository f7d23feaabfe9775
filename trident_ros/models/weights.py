"""Weight files: where they live, how they are found, fetched and checked, and errors that say what to do.

All three models' files have a standard name in one folder (:func:`weights_dir`): SAM's official
checkpoint, and the Hugging Face hub files open_clip (CLIP) and timm (DINO) load, named after
their hub repository (:func:`needed_weights`). :func:`fetch_weights` finds every file the
configured method needs -- an explicit file, else the standard file in that folder, else (CLIP,
DINO) the hub's own cache, else a verified download into the folder -- and reports every missing
one at once, with the same list ``trident-weights fetch --print`` gives (:func:`format_weights`).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from trident_ros.models.weight_files import WeightFile, WeightsError, download, download_from_hub, verify_sha256

T = TypeVar('T')


class ModelSettings(Protocol):
    """What the model room reads of a :class:`trident_ros.config.TridentConfig` (which it does not import: the
    configuration imports the methods, which import this room).
    """

    @property
    def models(self) -> Any:
        """The section ``models`` (architectures, weight files, device, precision)."""

    @property
    def method_models(self) -> tuple[str, ...]:
        """The models the configured method needs, of ``clip``, ``dino``, ``sam``."""

log = logging.getLogger(__name__)

SMOKE_HINT = ('To try the pipeline without any weights, run the smoke mode: --random-weights '
              '(random_weights: true); its labels are meaningless.')
RANDOM_WEIGHTS_BANNER = (  # trident-segment and make demo, before and after a smoke run
    '\n' + '!' * 78 + '\n'
    '!!  SMOKE TEST: RANDOM WEIGHTS. The pipeline runs, but LABELS ARE MEANINGLESS.  !!\n'
    + '!' * 78)
_WEIGHT_SUFFIXES = ('.pt', '.pth', '.bin', '.safetensors', '.ckpt')

_SAM_URL = 'https://dl.fbaipublicfiles.com/segment_anything/'
SAM_CHECKPOINTS: dict[str, WeightFile] = {
    'vit_b': WeightFile('sam_vit_b_01ec64.pth', _SAM_URL + 'sam_vit_b_01ec64.pth',
                        'ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912'),
    'vit_l': WeightFile('sam_vit_l_0b3195.pth', _SAM_URL + 'sam_vit_l_0b3195.pth',
                        '3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622'),
    'vit_h': WeightFile('sam_vit_h_4b8939.pth', _SAM_URL + 'sam_vit_h_4b8939.pth',
                        'a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e'),
}


def weights_dir(config: ModelSettings) -> Path:
    """The weights folder.

    ``config.models.weights_dir``, else ``$TRIDENT_WEIGHTS_DIR``, else ``$XDG_CACHE_HOME/trident_ros`` or
    ``~/.cache/trident_ros``.
    """
    if config.models.weights_dir:
        return Path(config.models.weights_dir).expanduser()
    if os.environ.get('TRIDENT_WEIGHTS_DIR'):
        return Path(os.environ['TRIDENT_WEIGHTS_DIR']).expanduser()
    cache = os.environ.get('XDG_CACHE_HOME') or '~/.cache'
    return Path(cache).expanduser() / 'trident_ros'


def fetch_weight_file(spec: WeightFile, directory: Path, allow_download: bool, what: str,
                      parameter: str = 'the checkpoint parameter') -> Path:
    """The file ``spec.name`` in ``directory``, downloaded from ``spec.url`` when missing and allowed.

    The file is checked against ``spec.sha256`` (when known).

    Args:
        spec: the official file.
        directory: the weights folder.
        allow_download: download a missing file.
        what: the model it is for, for messages (e.g. ``'SAM vit_b'``).
        parameter: the config field that takes a local copy instead, for messages.

    Returns:
        The file's path.

    Raises:
        WeightsError: missing and not downloadable, or corrupt; the message gives the URL and the
            exact path to put the file at.
    """
    path = directory / spec.name
    if not path.is_file():
        if not allow_download:
            raise WeightsError(_missing_message(what, spec, path, 'downloads are disabled (models.download: false)',
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


def resolve_sam_checkpoint(config: ModelSettings) -> Path:
    """The SAM checkpoint file for ``config.models.sam_model``.

    ``config.models.sam_checkpoint`` wins (checked against the official SHA-256 when it carries the official
    file name); else the official file in :func:`weights_dir`; else it is downloaded there when
    ``config.models.download``.

    Raises:
        WeightsError: missing (with the URL and the path to put it at) or corrupt.
    """
    spec = SAM_CHECKPOINTS[config.models.sam_model]
    if config.models.sam_checkpoint:
        path = Path(config.models.sam_checkpoint).expanduser()
        if not path.is_file():
            raise WeightsError(f'models.sam_checkpoint {path} does not exist. The official '
                               f'{config.models.sam_model} file is {spec.url}.\n  {SMOKE_HINT}')
        if path.name == spec.name:
            verify_sha256(path, spec.sha256, spec.url)
        return path
    return fetch_weight_file(spec, weights_dir(config), config.models.download, f'SAM {config.models.sam_model}',
                             'sam_checkpoint')

def _hub_url(repo: str, filename: str) -> str:
    """The download URL of ``filename`` in the Hugging Face hub repository ``repo`` (``$HF_ENDPOINT`` honoured)."""
    from huggingface_hub import hf_hub_url

    return hf_hub_url(repo, filename)


def _hub_offline() -> bool:
    return os.environ.get('HF_HUB_OFFLINE', '').lower() in ('1', 'true', 'yes', 'on')


def _sha256_in_url(url: str) -> str | None:
    """The SHA-256 a URL publishes in its path (OpenAI's CLIP URLs: ``.../<sha256>/ViT-B-16.pt``)."""
    parts = url.split('/')
    digest = parts[-2].lower() if len(parts) > 1 else ''
    return digest if len(digest) == 64 and all(c in '0123456789abcdef' for c in digest) else None


@dataclass(frozen=True)
class NeededWeight:
    """One weight file the configured method needs, and its standard place in the weights folder.

    Attributes:
        model: ``'sam'``, ``'dino'`` or ``'clip'``.
        what: the model, for messages (e.g. ``'SAM vit_b'``).
        file: name (in the folder), URL and SHA-256 (None: not published).
        path: ``weights_dir / file.name``.
        hub: ``(repo, file names)`` of the Hugging Face hub files the upstream library itself loads
            (its cache is looked in too); None for SAM.
        parameter: the config field that takes a local copy instead.
    """

    model: str
    what: str
    file: WeightFile
    path: Path
    hub: tuple[str, tuple[str, ...]] | None
    parameter: str


def _dino_file(config: ModelSettings) -> tuple[WeightFile, tuple[str, tuple[str, ...]] | None] | None:
    """Timm's file for ``config.models.dino_model``: its hub file, named after the repository."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(config.models.dino_model)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        repo, filename = cfg.hf_hub_id, cfg.hf_hub_filename or 'model.safetensors'
        name = repo.rsplit('/', 1)[-1] + Path(filename).suffix
        return WeightFile(name, _hub_url(repo, filename)), (repo, (filename, 'pytorch_model.bin'))
    if cfg.url:
        return WeightFile(cfg.url.rsplit('/', 1)[-1], cfg.url, _sha256_in_url(cfg.url)), None
    return None


def _clip_file(config: ModelSettings) -> tuple[WeightFile, tuple[str, tuple[str, ...]] | None] | None:
    """open_clip's file for ``config.models.clip_model`` / ``config.models.clip_pretrained``: its hub file, named
    after the repository (OpenAI's own ``.pt`` is a TorchScript archive, which ``weights_only``
    loading refuses).
    """
    import open_clip

    cfg = open_clip.get_pretrained_cfg(config.models.clip_model, config.models.clip_pretrained) or {}
    if cfg.get('hf_hub'):
        parts = cfg['hf_hub'].strip('/').split('/')
        repo, filename = '/'.join(parts[:2]), '/'.join(parts[2:]) or 'open_clip_model.safetensors'
        name = repo.rsplit('/', 1)[-1] + Path(filename).suffix
        return WeightFile(name, _hub_url(repo, filename)), (repo, (filename, 'open_clip_pytorch_model.bin'))
    if cfg.get('url'):
        return WeightFile(cfg['url'].rsplit('/', 1)[-1], cfg['url'], _sha256_in_url(cfg['url'])), None
    return None


def _is_local_file(value: str) -> bool:
    return Path(value).suffix in _WEIGHT_SUFFIXES or '/' in value or value.startswith('~')


def needed_weights(config: ModelSettings) -> list[NeededWeight]:
    """The standard weight files of the models ``config.method`` needs, in :func:`weights_dir`.

    A model given a local file (``sam_checkpoint``, ``dino_checkpoint``, a ``clip_pretrained``
    path) is left out, and so is one whose library knows no file for it.

    Args:
        config: the configuration (method, model names, weights folder).

    Returns:
        One entry per file, in the order SAM, DINO, CLIP.
    """
    folder = weights_dir(config)
    models = config.method_models
    entries = []
    if 'sam' in models and not config.models.sam_checkpoint:
        spec = SAM_CHECKPOINTS[config.models.sam_model]
        entries.append(NeededWeight('sam', f'SAM {config.models.sam_model}', spec, folder / spec.name, None,
                                    'models.sam_checkpoint'))
    if 'dino' in models and not config.models.dino_checkpoint and (found := _dino_file(config)) is not None:
        entries.append(NeededWeight('dino', f'DINO {config.models.dino_model}', found[0], folder / found[0].name,
                                    found[1], 'models.dino_checkpoint'))
    if not _is_local_file(config.models.clip_pretrained) and (found := _clip_file(config)) is not None:
        clip = f'CLIP {config.models.clip_model} ({config.models.clip_pretrained})'
        entries.append(NeededWeight('clip', clip, found[0], folder / found[0].name, found[1], 'models.clip_pretrained'))
    return entries


def format_weights(entries: Sequence[NeededWeight]) -> str:
    """The list ``trident-weights fetch --print`` shows, and missing-weights errors repeat.

    Per file: the model, the URL, the path to put it at, and its SHA-256 (or that none is published).
    """
    lines = []
    for entry in entries:
        digest = entry.file.sha256 or 'not published (the download is not checked)'
        lines += [f'  {entry.what}: {entry.file.name}', f'    url     {entry.file.url}', f'    path    {entry.path}',
                  f'    sha256  {digest}']
    return '\n'.join(lines)


def fetch_files(entries: Sequence[NeededWeight]) -> dict[Path, str]:
    """Make every file of ``entries`` present at its path: downloaded (progress bar, SHA-256) or verified.

    Every entry is tried, whatever happens to the others.

    Args:
        entries: the files (e.g. :func:`needed_weights`).

    Returns:
        ``path -> 'present' | 'downloaded'``.

    Raises:
        WeightsError: some files could not be fetched or are corrupt; the message names each with
            its reason, then lists them as :func:`format_weights` does. The others are in place.
    """
    done: dict[Path, str] = {}
    failed: list[tuple[NeededWeight, str]] = []
    for entry in entries:
        try:
            if entry.path.is_file():
                verify_sha256(entry.path, entry.file.sha256, entry.file.url)
                done[entry.path] = 'present'
            else:
                _download(entry)
                done[entry.path] = 'downloaded'
        except WeightsError as error:
            failed.append((entry, str(error)))
    if failed:
        reasons = '\n'.join(f'  {entry.what}: {reason}' for entry, reason in failed)
        raise WeightsError(f'{len(failed)} of {len(entries)} weight files could not be fetched:\n{reasons}\n'
                           f'Fetch them elsewhere and put each at its path:\n'
                           f'{format_weights([entry for entry, _ in failed])}')
    return done


@dataclass
class WeightSources:
    """Where each needed model's weights come from, all checked present (see :func:`fetch_weights`).

    Attributes:
        models: the models ``config.method`` needs (``METHOD_MODELS``).
        sam: the SAM checkpoint; None: SAM not needed.
        dino: a local DINO file; None: timm's hub cache (already fetched), or DINO not needed.
        clip: a local file, or an open_clip pretrained tag whose file is in the hub cache.
    """

    models: tuple[str, ...]
    sam: Path | None
    dino: Path | None
    clip: str

    def describe(self, config: ModelSettings) -> str:
        parts = [f'CLIP {config.models.clip_model} ({self.clip})']
        if 'dino' in self.models:
            parts.append(f'DINO {config.models.dino_model} ({self.dino or "timm hub cache"})')
        if 'sam' in self.models:
            parts.append(f'SAM {config.models.sam_model} ({self.sam})')
        return ', '.join(parts)


def _download(entry: NeededWeight) -> Path:
    """``entry``'s file downloaded to its path: a hub file through huggingface_hub's hub download, others resumably."""
    log.info('downloading %s weights %s to %s', entry.what, entry.file.url, entry.path)
    if entry.hub is not None:
        return download_from_hub(entry.hub[0], entry.hub[1][0], entry.path)
    return download(entry.file.url, entry.path, entry.file.sha256)


def _in_hub_cache(entry: NeededWeight) -> bool:
    from huggingface_hub import try_to_load_from_cache

    if entry.hub is None:
        return False
    repo, names = entry.hub
    return any(isinstance(try_to_load_from_cache(repo, name), str) for name in names)


def _find(entry: NeededWeight, allow_download: bool, problems: list[str],
          missing: list[NeededWeight]) -> Path | None:
    """``entry``'s file at its standard path (verified), else downloaded there when allowed; None:
    missing (``missing`` and ``problems`` say why) or in the library's hub cache (``missing`` unchanged).
    """
    if entry.path.is_file():
        try:
            verify_sha256(entry.path, entry.file.sha256, entry.file.url)
            return entry.path
        except WeightsError as error:
            problems.append(str(error))
            return None
    if _in_hub_cache(entry):
        return None
    if not allow_download:
        problems.append(f'{entry.what} weights {entry.file.name} are not at {entry.path.parent}, and downloads are '
                        'disabled (models.download: false)')
    elif entry.hub is not None and _hub_offline():
        problems.append(f'{entry.what}: the Hugging Face hub is off (HF_HUB_OFFLINE is set)')
    else:
        try:
            return _download(entry)
        except WeightsError as error:
            problems.append(f'{entry.what}: {error}')
    missing.append(entry)
    return None


def _attempt(load: Callable[[], T], problems: list[str]) -> T | None:
    try:
        return load()
    except WeightsError as error:
        problems.append(str(error).replace(f'\n  {SMOKE_HINT}', ''))
        return None


def fetch_weights(config: ModelSettings) -> WeightSources:
    """Find (or download, where allowed) every weight file the models of ``config.method`` need, no others.

    Per model: the file the config names (``sam_checkpoint``, ``dino_checkpoint``, a
    ``clip_pretrained`` path), else its standard file in :func:`weights_dir` (:func:`needed_weights`;
    DINO's official ``.pth`` there too), else (CLIP, DINO) the file in the Hugging Face hub cache
    that open_clip/timm load themselves, else a verified download into :func:`weights_dir` when
    ``config.models.download``. Nothing is built here.

    Args:
        config: the configuration.

    Returns:
        Where each model's weights come from.

    Raises:
        WeightsError: one error naming EVERY missing file (the list :func:`format_weights` gives,
            as ``trident-weights fetch --print``) with the reasons, so a user offline learns all
            of them at once.
    """
    problems: list[str] = []
    missing: list[NeededWeight] = []
    models = config.method_models
    standard = {entry.model: entry for entry in needed_weights(config)}
    sam_path = dino_path = None
    if 'sam' in models:
        if 'sam' in standard:
            sam_path = _find(standard['sam'], config.models.download, problems, missing)
        else:
            sam_path = _attempt(lambda: resolve_sam_checkpoint(config), problems)
    if 'dino' in models:
        dino_path = _attempt(lambda: dino_checkpoint(config), problems)
        if dino_path is None and 'dino' in standard:
            dino_path = _find(standard['dino'], config.models.download, problems, missing)
    clip_source = config.models.clip_pretrained
    if 'clip' in standard:
        found = _find(standard['clip'], config.models.download, problems, missing)
        clip_source = str(found) if found is not None else clip_source
    elif _is_local_file(clip_source):
        clip_file = Path(clip_source).expanduser()
        if not clip_file.is_file():
            problems.append(f'clip_pretrained {clip_file} does not exist (a local CLIP weight file, or an '
                            "open_clip tag such as 'openai').")
        clip_source = str(clip_file)
    if problems:
        listing = ''
        if missing:
            listing = (f'\nMissing weight files (fetch them with `trident-weights fetch` or '
                       f'`ros2 run trident_ros fetch_weights`, or download each URL to its path; or set '
                       f'{" / ".join(entry.parameter for entry in missing)} to a local copy):\n'
                       f'{format_weights(missing)}')
        raise WeightsError('\n'.join(problems) + listing + f'\n  {SMOKE_HINT}')
    return WeightSources(models=models, sam=sam_path, dino=dino_path, clip=clip_source)


def dino_checkpoint(config: ModelSettings) -> Path | None:
    """A local DINO weight file given by the config or found in the weights folder.

    ``config.models.dino_checkpoint``, else DINO's official file for ``config.models.dino_model`` (e.g.
    ``dino_vitbase16_pretrain.pth``) if it is in :func:`weights_dir`; None: look for the standard
    hub file (:func:`needed_weights`).

    Raises:
        WeightsError: ``config.models.dino_checkpoint`` names a file that does not exist.
    """
    if config.models.dino_checkpoint:
        path = Path(config.models.dino_checkpoint).expanduser()
        if not path.is_file():
            raise WeightsError(f'dino_checkpoint {path} does not exist.\n  {SMOKE_HINT}')
        return path
    url = _timm_weights_url(config.models.dino_model)
    if url:
        candidate = weights_dir(config) / url.rsplit('/', 1)[-1]
        if candidate.is_file():
            return candidate
    return None


def _timm_weights_url(model_name: str) -> str:
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(model_name)
    return (cfg.url or '') if cfg is not None else ''
