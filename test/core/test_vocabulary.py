"""Vocabulary parsing and cached text features, checked on a tiny random open_clip CLIP."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F  # noqa: N812 (the PyTorch convention)
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

from trident_ros.config import TridentConfig
from trident_ros.models import TridentModels, load_models
from trident_ros.vocabulary import (
    IMAGENET_TEMPLATES,
    EncodingCancelledError,
    TextFeatureCache,
    Vocabulary,
    VocabularyError,
    encode_vocabulary,
    parse_vocabulary,
)


@pytest.fixture(scope='module')
def models() -> TridentModels:
    """Tiny real open_clip CLIP (random weights) and the ViT-B-16 tokenizer."""
    return load_models(TridentConfig.from_mapping({'models': {'model_scale': 'tiny', 'random_weights': True,
                                                              'device': 'cpu'}}))


@pytest.fixture(scope='module')
def clip_model(models) -> CLIP:
    return models.clip.model


@pytest.fixture(scope='module')
def tokenizer(models):
    return models.tokenizer


def naive_features(model: CLIP, tokenizer, name: str) -> torch.Tensor:
    """The reference's recipe: full-context encode_text of all templates, normalise, mean, normalise."""
    with torch.no_grad():
        per_prompt = model.encode_text(tokenizer([template(name) for template in IMAGENET_TEMPLATES]))
    return F.normalize(F.normalize(per_prompt, dim=-1).mean(dim=0), dim=0)


@pytest.fixture
def logged(log_records) -> list[logging.LogRecord]:
    return log_records('trident_ros.vocabulary')


def transformer_lengths(model: CLIP) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    """Sequence length of every text-transformer call."""
    lengths: list[int] = []
    handle = model.transformer.register_forward_hook(lambda module, args, out: lengths.append(out.shape[1]))
    return lengths, handle


# --- parsing ----------------------------------------------------------------------------------------

def test_classes_and_synonyms():
    parsed = parse_vocabulary('sofa; couch, door')
    assert parsed.classes == [['sofa', 'couch'], ['door']]
    assert parsed.warnings == []


def test_whitespace_and_control_characters_cleaned():
    parsed = parse_vocabulary('  living\t  room ;\x00couch\x07 ,\n door\r\n, ,;, tv\x1b monitor')
    assert parsed.classes == [['living room', 'couch'], ['door'], ['tv monitor']]
    assert parsed.warnings == []


@pytest.mark.parametrize('text, classes', [
    ('\x1b[31mred\x1b[0m car, tree', [['red car'], ['tree']]),
    ('\x1b[1;31mdoor\x1b[0m; gate, sky', [['door', 'gate'], ['sky']]),  # ";" inside the sequence
    ('\x1b]0;window title\x07lamp, \x9b2Jrug', [['lamp'], ['rug']]),  # OSC title, 8-bit CSI
])
def test_terminal_escape_sequences_removed_whole_with_a_warning(text, classes):
    parsed = parse_vocabulary(text)
    assert parsed.classes == classes
    assert any('terminal escape sequence' in warning for warning in parsed.warnings)


@pytest.mark.parametrize('text', ['door, \x1b[31', 'door\x1b]0;title, chair'])
def test_unterminated_escape_sequences_refused_with_the_reason(text):
    with pytest.raises(VocabularyError, match='unterminated terminal escape sequence'):
        parse_vocabulary(text)


def test_duplicates_dropped_with_warnings():
    parsed = parse_vocabulary('sofa; couch; sofa, Couch, door, SOFA; bed')
    assert parsed.classes == [['sofa', 'couch'], ['door'], ['bed']]
    assert len(parsed.warnings) == 4
    assert "'sofa' in class 1" in parsed.warnings[0]
    assert "'Couch' in class 2" in parsed.warnings[1] and 'already in class 1' in parsed.warnings[1]
    assert 'class 2 dropped' in parsed.warnings[2]
    assert "'SOFA' in class 4" in parsed.warnings[3]


def test_unicode_and_emoji_kept():
    family = '\U0001F468\u200d\U0001F469\u200d\U0001F467'  # ZWJ sequence: format chars must survive
    parsed = parse_vocabulary(f'沙发; chaise longue, \U0001F6AA door, café, {family}')
    assert parsed.classes == [['沙发', 'chaise longue'], ['\U0001F6AA door'], ['café'], [family]]


@pytest.mark.parametrize('text', ['', '   ', ', ; ,', ';;', '\n\t\x00'])
def test_nothing_left_refused(text):
    with pytest.raises(VocabularyError, match='vocabulary is empty'):
        parse_vocabulary(text)
    assert issubclass(VocabularyError, ValueError)


def test_class_limit():
    names = [f'class {i}' for i in range(1001)]
    assert len(parse_vocabulary(', '.join(names[:1000])).classes) == 1000
    with pytest.raises(VocabularyError, match='1001 classes, more than the limit of 1000'):
        parse_vocabulary(', '.join(names))
    assert len(parse_vocabulary(', '.join(names[:3]), max_classes=3).classes) == 3


def test_huge_text_refused():
    text = ', '.join(f'n{i}' for i in range(20000))[:100_000]
    assert len(text) == 100_000
    with pytest.raises(VocabularyError, match='100000 characters, more than the limit'):
        parse_vocabulary(text, max_classes=10**6)


def test_overlong_name_refused():
    assert parse_vocabulary('x' * 256).classes == [['x' * 256]]
    with pytest.raises(VocabularyError, match='257 characters'):
        parse_vocabulary('door, ' + 'x' * 257)


def test_templates_are_openai_imagenet_80():
    prompts = [template('dog') for template in IMAGENET_TEMPLATES]
    assert len(prompts) == len(set(prompts)) == 80
    assert prompts[0] == 'a bad photo of a dog.'
    assert prompts[-1] == 'a tattoo of the dog.'
    assert 'itap of my dog.' in prompts


# --- text features ----------------------------------------------------------------------------------

NAMES = ['dog', 'traffic light', 'a rather long name made of quite a few different words', 'café 🚪']


@pytest.mark.parametrize('max_batch_prompts', [5120, 37])
def test_fast_path_equals_encode_text(clip_model, tokenizer, max_batch_prompts):
    cache = TextFeatureCache(clip_model, tokenizer, max_batch_prompts=max_batch_prompts)
    lengths, handle = transformer_lengths(clip_model)
    try:
        features = cache.features(NAMES)
    finally:
        handle.remove()
    expected = torch.stack([naive_features(clip_model, tokenizer, name) for name in NAMES])
    assert features.shape == (len(NAMES), clip_model.text_projection.shape[1])
    torch.testing.assert_close(features, expected, rtol=0, atol=2e-6)
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(len(NAMES)))
    # the transformer ran on cut sequences only, in one batch unless bounded
    assert max(lengths) < 30
    assert len(lengths) == (1 if max_batch_prompts >= 80 * len(NAMES) else -(-80 * len(NAMES) // 37))


def test_features_dtype(clip_model, tokenizer):
    cache = TextFeatureCache(clip_model, tokenizer, dtype=torch.float16)
    features = cache.features(['dog'])
    assert features.dtype == torch.float16
    torch.testing.assert_close(features[0].float(), naive_features(clip_model, tokenizer, 'dog'),
                               rtol=0, atol=1e-3)


def test_cached_names_not_reencoded(clip_model, tokenizer):
    cache = TextFeatureCache(clip_model, tokenizer)
    lengths, handle = transformer_lengths(clip_model)
    try:
        first = cache.features(['dog', 'cat'])
        assert cache.encoded_names == 2 and len(lengths) == 1
        again = cache.features(['cat', 'dog', 'dog'])
        assert cache.encoded_names == 2 and len(lengths) == 1
        torch.testing.assert_close(again, first[[1, 0, 0]], rtol=0, atol=0)
        cache.features(['cat', 'bird', 'fish'])
        assert cache.encoded_names == 4 and len(lengths) == 2  # both new names in one batch
    finally:
        handle.remove()


def test_lru_eviction(clip_model, tokenizer):
    cache = TextFeatureCache(clip_model, tokenizer, capacity=2)
    cache.features(['a'])
    cache.features(['b'])
    cache.features(['a'])  # touch: 'b' is now the least recently used
    cache.features(['c'])
    assert len(cache) == 2 and 'a' in cache and 'c' in cache and 'b' not in cache
    assert cache.encoded_names == 3
    cache.features(['a'])
    assert cache.encoded_names == 3
    cache.features(['b'])
    assert cache.encoded_names == 4 and 'c' not in cache
    # a request larger than the capacity still returns every name
    assert cache.features(['p', 'q', 'r']).shape[0] == 3 and len(cache) == 2


def test_long_name_truncated_with_warning(clip_model, tokenizer, logged):
    long_name = ' '.join(['word'] * 100)
    cache = TextFeatureCache(clip_model, tokenizer)
    found = cache.lookup(['dog', long_name])
    assert found.truncated == [long_name]
    assert [record.levelno for record in logged] == [logging.WARNING]
    assert 'exceed the 77-token context' in logged[0].getMessage()
    torch.testing.assert_close(found.features[1], naive_features(clip_model, tokenizer, long_name),
                               rtol=0, atol=2e-6)
    # a name filling the context exactly is not truncated: longest template has 10 tokens + sot/eot
    longest = max(len(tokenizer.encode(template('x'))) for template in IMAGENET_TEMPLATES) - 1
    exact = ' '.join(['word'] * (77 - 2 - longest))
    assert cache.lookup([exact]).truncated == []
    vocabulary = encode_vocabulary([['dog'], [long_name]], cache)
    assert len(vocabulary.warnings) == 1 and 'too long' in vocabulary.warnings[0]


def test_encode_vocabulary(clip_model, tokenizer):
    cache = TextFeatureCache(clip_model, tokenizer)
    vocabulary = encode_vocabulary(parse_vocabulary('sofa; couch, door').classes, cache)
    assert isinstance(vocabulary, Vocabulary)
    assert vocabulary.classes == [['sofa', 'couch'], ['door']]
    assert vocabulary.names == ['sofa; couch', 'door']
    assert vocabulary.num_classes == 2
    assert vocabulary.name_to_class.tolist() == [0, 0, 1] and vocabulary.name_to_class.dtype == torch.long
    torch.testing.assert_close(vocabulary.text_features, cache.features(['sofa', 'couch', 'door']), rtol=0, atol=0)
    assert vocabulary.warnings == []
    with pytest.raises(VocabularyError):
        encode_vocabulary([['sofa'], []], cache)


def test_rejects_models_the_fast_path_does_not_fit(clip_model, tokenizer):
    with pytest.raises(TypeError, match='open_clip CLIP'):
        TextFeatureCache(clip_model.visual, tokenizer)
    last_token_pooling = CLIP(embed_dim=8, vision_cfg=CLIPVisionCfg(layers=1, width=16, head_width=16, image_size=32),
                              text_cfg=CLIPTextCfg(vocab_size=64, width=16, heads=1, layers=1, pool_type='last'))
    with pytest.raises(ValueError, match="text_pool_type='last'"):
        TextFeatureCache(last_token_pooling, tokenizer)


def test_chunked_encoding_reports_progress_and_equals_one_lookup(clip_model, tokenizer):
    classes = [[f'thing {i}'] for i in range(10)] + [['sofa', 'couch']]
    whole = encode_vocabulary(classes, TextFeatureCache(clip_model, tokenizer))
    progress = []
    chunked = encode_vocabulary(classes, TextFeatureCache(clip_model, tokenizer), chunk_names=4,
                                progress=lambda done, total: progress.append((done, total)))
    assert progress == [(4, 12), (8, 12), (12, 12)]
    torch.testing.assert_close(chunked.text_features, whole.text_features)
    assert chunked.name_to_class.tolist() == whole.name_to_class.tolist()


def test_cancelled_encoding_stops_at_a_chunk_boundary_and_keeps_what_it_encoded(clip_model, tokenizer):
    cache = TextFeatureCache(clip_model, tokenizer)
    progress = []
    with pytest.raises(EncodingCancelledError, match='after 3 of 9 names'):
        encode_vocabulary([[f'name {i}'] for i in range(9)], cache, chunk_names=3,
                          progress=lambda done, total: progress.append(done), cancelled=lambda: len(progress) == 1)
    assert cache.encoded_names == 3 and progress == [3]
    assert all(f'name {i}' in cache for i in range(3))
