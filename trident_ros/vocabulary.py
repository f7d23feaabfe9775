"""Vocabulary parsing and CLIP text features (cached per name).

A vocabulary is text such as ``"sofa; couch, door"``: classes are separated by ``,`` and the
synonyms of one class by ``;``. Every name is embedded with the 80 OpenAI ImageNet prompt
templates (encode, L2-normalise, average, L2-normalise), as the Trident reference does.
"""
from __future__ import annotations

import logging
import re
import threading
import unicodedata
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F  # noqa: N812 (the PyTorch convention)
from open_clip.model import CLIP
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

logger = logging.getLogger(__name__)

IMAGENET_TEMPLATES: tuple[Callable[[str], str], ...] = tuple(OPENAI_IMAGENET_TEMPLATES)
"""The 80 OpenAI ImageNet prompt templates, each ``name -> prompt`` (same list as the reference)."""

CLASS_SEPARATOR = ','
SYNONYM_SEPARATOR = ';'
MAX_TEXT_CHARS = 65536
"""Longest vocabulary text accepted (characters); ADE20K-847's class file is about 12 000."""

Tokenizer = Callable[..., torch.Tensor]
"""An open_clip tokenizer: ``tokenizer(texts, context_length=None) -> LongTensor (len(texts), context)``."""


class VocabularyError(ValueError):
    """A vocabulary cannot be used; the message gives the reason."""


@dataclass
class ParsedVocabulary:
    """Result of :func:`parse_vocabulary`.

    Attributes:
        classes: names of each class, synonyms in the order given; at least one class, no empty
            class, every name unique (case-insensitively) across the vocabulary.
        warnings: what was dropped and why, for the user.
    """

    classes: list[list[str]]
    warnings: list[str] = field(default_factory=list)


# Terminal escape sequences (ECMA-48): CSI ``ESC [ ... final`` (also the 8-bit CSI), OSC
# ``ESC ] ... BEL`` or ``ESC ] ... ESC \\``, and two-character escapes. Removed whole, before the text
# is split (their parameters contain ";"), so that no part of one is left in a name.
_ESCAPE_SEQUENCE = re.compile(r'(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\^_]')
_ESCAPE_START = re.compile(r'\x1b[\[\]]|\x9b')


class EncodingCancelledError(Exception):
    """:func:`encode_vocabulary` stopped at a chunk boundary because ``cancelled()`` said so."""


def _remove_escape_sequences(text: str, warnings: list[str]) -> str:
    """``text`` without terminal escape sequences (a warning says how many went).

    Raises:
        VocabularyError: an escape sequence is left unterminated (it cannot be removed whole).
    """
    cleaned, removed = _ESCAPE_SEQUENCE.subn('', text)
    unterminated = _ESCAPE_START.search(cleaned)
    if unterminated:
        raise VocabularyError(f'unterminated terminal escape sequence at character {unterminated.start()} '
                              f'({_shorten(cleaned[unterminated.start():], 20)!r}): remove it')
    if removed:
        warnings.append(f'{removed} terminal escape sequence(s) (e.g. colour codes) removed')
    return cleaned


def _clean_name(raw: str) -> str:
    """Control characters dropped (whitespace ones become spaces), inner whitespace collapsed."""
    chars = (' ' if ch.isspace() else ch for ch in raw if ch.isspace() or unicodedata.category(ch) != 'Cc')
    return ' '.join(''.join(chars).split())


def _shorten(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit - 1] + '…'


def parse_vocabulary(text: str, max_classes: int = 1000, max_name_chars: int = 256,
                     max_text_chars: int = MAX_TEXT_CHARS) -> ParsedVocabulary:
    """Parse ``"sofa; couch, door"`` into ``[['sofa', 'couch'], ['door']]``.

    Terminal escape sequences (e.g. ANSI colour codes) are removed whole, with a warning; names are
    stripped, other control characters removed and inner whitespace collapsed. Empty names
    are dropped silently. A name that repeats an earlier one (compared case-insensitively, as the
    CLIP tokenizer lowercases) is dropped with a warning, and so is a class left without names.

    Args:
        text: the vocabulary; Unicode is fine.
        max_classes: most classes accepted (after dropping).
        max_name_chars: longest name accepted (after cleaning).
        max_text_chars: longest ``text`` accepted.

    Raises:
        VocabularyError: the text is too long, a name is too long, there are more than
            ``max_classes`` classes, no name is left, or an escape sequence is unterminated.
    """
    if len(text) > max_text_chars:
        raise VocabularyError(f'vocabulary text has {len(text)} characters, more than the limit of {max_text_chars}')
    classes: list[list[str]] = []
    warnings: list[str] = []
    text = _remove_escape_sequences(text, warnings)
    first_class: dict[str, int] = {}  # casefolded name -> 1-based class position in the input
    for position, raw_class in enumerate(text.split(CLASS_SEPARATOR), start=1):
        kept: list[str] = []
        had_names = False
        for raw_name in raw_class.split(SYNONYM_SEPARATOR):
            name = _clean_name(raw_name)
            if not name:
                continue
            had_names = True
            if len(name) > max_name_chars:
                raise VocabularyError(
                    f'name {_shorten(name)!r} has {len(name)} characters, more than the limit of {max_name_chars}'
                    ' (missing separators?)')
            key = name.casefold()
            if key in first_class:
                warnings.append(f'duplicate name {name!r} in class {position} dropped '
                                f'(already in class {first_class[key]})')
                continue
            first_class[key] = position
            kept.append(name)
        if kept:
            classes.append(kept)
        elif had_names:
            warnings.append(f'class {position} dropped: all its names are duplicates')
    if not classes:
        raise VocabularyError('vocabulary is empty: give class names separated by "," '
                              '(synonyms of one class separated by ";")')
    if len(classes) > max_classes:
        raise VocabularyError(f'vocabulary has {len(classes)} classes, more than the limit of {max_classes}')
    return ParsedVocabulary(classes, warnings)


@dataclass
class Vocabulary:
    """Classes with the text features of all their names.

    Attributes:
        classes: names per class; class ``k`` has label ``k + 1`` in label images.
        names: display name per class, its names joined with ``'; '``.
        text_features: ``(N, E)`` L2-normalised features of all N names, class by class in order.
        name_to_class: ``(N,)`` int64 class index of each name.
        warnings: problems met while encoding (e.g. a name truncated to the context length).
    """

    classes: list[list[str]]
    names: list[str]
    text_features: torch.Tensor
    name_to_class: torch.Tensor
    warnings: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def first_names(self) -> list[str]:
        """The first name of each class (what a user writes in Nav2's ``classes``); class ``k`` at ``k - 1``."""
        return [names[0] for names in self.classes]


@dataclass
class TextFeatures:
    """Result of :meth:`TextFeatureCache.lookup`.

    Attributes:
        features: ``(len(names), E)`` L2-normalised text features.
        truncated: the names whose prompts were truncated to the tokenizer's context length.
    """

    features: torch.Tensor
    truncated: list[str]


@dataclass
class _Entry:
    feature: torch.Tensor  # (E,)
    truncated: bool


class TextFeatureCache:
    """Prompt-ensembled CLIP text features per name, in a bounded LRU cache.

    Names missing from the cache are encoded together (all templates of all of them, in batches
    of at most ``max_batch_prompts`` prompts). Since CLIP's text transformer is causal and pools
    at the end-of-text token, each batch runs only up to its longest prompt's end-of-text token;
    the result equals ``clip_model.encode_text`` on the full context.

    Args:
        clip_model: an open_clip ``CLIP`` (causal text mask, ``argmax`` or ``eos`` pooling).
        tokenizer: its open_clip tokenizer.
        device: where the model runs and the features are returned.
        dtype: dtype of the returned features (averaging is done in float32).
        capacity: most names kept.
        max_batch_prompts: most prompts per text-transformer batch (a memory bound).

    Attributes:
        encoded_names: how many names have been encoded so far (cache misses).
    """

    def __init__(self, clip_model: CLIP, tokenizer: Tokenizer, device: torch.device | str = 'cpu',
                 dtype: torch.dtype = torch.float32, capacity: int = 1024, max_batch_prompts: int = 5120) -> None:
        if not isinstance(clip_model, CLIP):
            raise TypeError(f'expected an open_clip CLIP, got {type(clip_model).__name__}')
        if clip_model.attn_mask is None or clip_model.text_pool_type not in ('argmax', 'eos'):
            raise ValueError('the text tower must be causal and pool at the end-of-text token '
                             f'(text_pool_type={clip_model.text_pool_type!r})')
        if capacity <= 0 or max_batch_prompts <= 0:
            raise ValueError('capacity and max_batch_prompts must be positive')
        self.model = clip_model
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.dtype = dtype
        self.capacity = capacity
        self.max_batch_prompts = max_batch_prompts
        self.encoded_names = 0
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def features(self, names: Sequence[str]) -> torch.Tensor:
        """``(len(names), E)`` L2-normalised text features, one row per name."""
        return self.lookup(names).features

    @torch.inference_mode()
    def lookup(self, names: Sequence[str]) -> TextFeatures:
        """Features of ``names`` (encoding the ones not cached) and which of them were truncated."""
        if not names:
            raise ValueError('no names given')
        unique = list(dict.fromkeys(names))
        with self._lock:
            found: dict[str, _Entry] = {}
            for name in unique:
                if name in self._entries:
                    self._entries.move_to_end(name)
                    found[name] = self._entries[name]
            missing = [name for name in unique if name not in found]
            if missing:
                fresh = self._encode_names(missing)
                found.update(fresh)
                self._entries.update(fresh)
                while len(self._entries) > self.capacity:
                    self._entries.popitem(last=False)
        features = torch.stack([found[name].feature for name in names])
        return TextFeatures(features, [name for name in unique if found[name].truncated])

    def _encode_names(self, names: list[str]) -> dict[str, _Entry]:
        prompts = [template(name) for name in names for template in IMAGENET_TEMPLATES]
        tokens = self.tokenizer(prompts)
        context = tokens.shape[1]
        eot = self._eot_positions(tokens)
        overflow = torch.zeros(len(prompts), dtype=torch.bool)
        full_rows = (eot == context - 1).nonzero().flatten().tolist()
        if full_rows:  # a full row either fits exactly or was cut: one more position tells
            longer = self.tokenizer([prompts[i] for i in full_rows], context_length=context + 1)
            overflow[full_rows] = self._eot_positions(longer) == context
        per_prompt = self._encode_tokens(tokens.to(self.device), eot.to(self.device)).float()
        per_name = F.normalize(per_prompt, dim=-1).view(len(names), len(IMAGENET_TEMPLATES), -1).mean(dim=1)
        per_name = F.normalize(per_name, dim=-1).to(self.dtype)
        truncated = overflow.view(len(names), -1).any(dim=1).tolist()
        for name, cut in zip(names, truncated, strict=True):
            if cut:
                logger.warning('prompts for name %r exceed the %d-token context and were truncated',
                               _shorten(name), context)
        self.encoded_names += len(names)
        return {name: _Entry(feature, cut) for name, feature, cut in zip(names, per_name, truncated, strict=True)}

    def _eot_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(P, context)`` tokens -> ``(P,)`` position pooled by the text tower (end of text)."""
        if self.model.text_pool_type == 'argmax':
            return tokens.argmax(dim=-1)
        return (tokens == self.model.text_eos_id).int().argmax(dim=-1)

    def _encode_tokens(self, tokens: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        """``(P, context)`` tokens -> ``(P, E)`` unnormalised text features, as ``encode_text``.

        Prompts are sorted by end-of-text position and batched; each batch is cut after its last
        end-of-text token (causal mask: the pooled feature never sees later positions).
        """
        order = eot.argsort()
        batches = [order[start:start + self.max_batch_prompts]
                   for start in range(0, len(order), self.max_batch_prompts)]
        pooled = torch.cat([self._encode_truncated(tokens[rows], eot[rows]) for rows in batches])
        return pooled[order.argsort()]

    def _encode_truncated(self, tokens: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        """open_clip ``CLIP.encode_text`` restricted to the first ``eot.max() + 1`` positions."""
        model = self.model
        length = int(eot.max()) + 1
        cast_dtype = model.transformer.get_cast_dtype()
        x = model.token_embedding(tokens[:, :length]).to(cast_dtype)
        x = x + model.positional_embedding[:length].to(cast_dtype)
        x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
        x = model.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot]
        if isinstance(model.text_projection, torch.nn.Linear):
            return model.text_projection(x)
        if model.text_projection is not None:
            return x @ model.text_projection
        return x


def encode_vocabulary(classes: Sequence[Sequence[str]], cache: TextFeatureCache, chunk_names: int | None = None,
                      progress: Callable[[int, int], None] | None = None,
                      cancelled: Callable[[], bool] | None = None) -> Vocabulary:
    """Text features of every name of ``classes`` (e.g. ``parse_vocabulary(text).classes``).

    Args:
        classes: names per class.
        cache: the text features cache that encodes missing names.
        chunk_names: encode at most this many names at a time (None: all at once); between
            chunks, ``progress`` is told and ``cancelled`` asked.
        progress: ``progress(names_done, names_total)`` after each chunk.
        cancelled: ``cancelled() -> True`` stops the encoding at the next chunk boundary.

    Returns:
        The vocabulary; its ``text_features`` are ``(N, E)`` for the N names, class by class.

    Raises:
        VocabularyError: no class, or a class without names.
        EncodingCancelledError: ``cancelled()`` returned True (names of finished chunks stay cached).
    """
    if not classes or not all(classes):
        raise VocabularyError('every class needs at least one name, and there must be a class')
    all_names = [name for names in classes for name in names]
    step = len(all_names) if chunk_names is None else max(1, chunk_names)
    features, truncated = [], []
    for start in range(0, len(all_names), step):
        if cancelled is not None and cancelled():
            raise EncodingCancelledError(f'stopped after {start} of {len(all_names)} names')
        found = cache.lookup(all_names[start:start + step])
        features.append(found.features)
        truncated += found.truncated
        if progress is not None:
            progress(min(start + step, len(all_names)), len(all_names))
    text_features = torch.cat(features)
    name_to_class = torch.tensor([k for k, names in enumerate(classes) for _ in names],
                                 dtype=torch.long, device=text_features.device)
    warnings = [f'name {_shorten(name)!r} is too long: its prompts were truncated to the text context'
                for name in dict.fromkeys(truncated)]
    return Vocabulary(classes=[list(names) for names in classes],
                      names=['; '.join(names) for names in classes],
                      text_features=text_features,
                      name_to_class=name_to_class,
                      warnings=warnings)
