"""Weight files: lookup order, checksums, loading, and errors that say which file to put where (downloads:
test_fetch_weights).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from trident_ros.config import TridentConfig
from trident_ros.models import load_models, tiny_sam
from trident_ros.models.build import clip_weights_error, dino_weights_error
from trident_ros.models.weight_files import (
    WeightFile,
    WeightsError,
    load_into,
    load_state_dict,
    verify_sha256,
)
from trident_ros.models.weights import (
    SAM_CHECKPOINTS,
    dino_checkpoint,
    resolve_sam_checkpoint,
    weights_dir,
)


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def saved_sam(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    sam = tiny_sam()
    path = tmp_path / 'tiny_sam.pth'
    torch.save(sam.state_dict(), path)
    return sam, path


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- where weights live -----------------------------------------------------------------------------

def test_weights_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv('TRIDENT_WEIGHTS_DIR', str(tmp_path / 'env'))
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
    assert weights_dir(TridentConfig.from_mapping({'models.weights_dir': str(tmp_path / 'cfg')})) == tmp_path / 'cfg'
    assert weights_dir(TridentConfig()) == tmp_path / 'env'
    monkeypatch.delenv('TRIDENT_WEIGHTS_DIR')
    assert weights_dir(TridentConfig()) == tmp_path / 'xdg' / 'trident_ros'
    monkeypatch.delenv('XDG_CACHE_HOME')
    monkeypatch.setenv('HOME', str(tmp_path / 'home'))
    assert weights_dir(TridentConfig()) == tmp_path / 'home' / '.cache' / 'trident_ros'


def test_official_sam_files():
    for model, spec in SAM_CHECKPOINTS.items():
        assert spec.name.startswith(f'sam_{model}_') and spec.url == \
            f'https://dl.fbaipublicfiles.com/segment_anything/{spec.name}'
        assert spec.sha256 is not None and len(spec.sha256) == 64


# --- loading ----------------------------------------------------------------------------------------

def test_saved_checkpoint_round_trips_into_a_tiny_sam(saved_sam):
    sam, path = saved_sam
    torch.manual_seed(1)
    fresh = tiny_sam()
    assert not same_state(fresh, sam)
    load_into(fresh, path, 'SAM tiny')
    assert same_state(fresh, sam)


def test_safetensors_round_trip(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    sam = tiny_sam()
    path = tmp_path / 'tiny_sam.safetensors'
    save_file({k: v.contiguous() for k, v in sam.state_dict().items()}, str(path))
    state = load_state_dict(path)
    assert state.keys() == sam.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in sam.state_dict().items())


def test_wrapped_state_dict_is_unwrapped(tmp_path, saved_sam):
    sam, _ = saved_sam
    path = tmp_path / 'wrapped.pth'
    torch.save({'state_dict': sam.state_dict(), 'epoch': 3}, path)
    assert load_state_dict(path).keys() == sam.state_dict().keys()


def test_truncated_file_is_a_clear_error(saved_sam):
    _, path = saved_sam
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match='cannot read weights file') as error:
        load_state_dict(path)
    assert str(path) in str(error.value) and 'corrupt' in str(error.value)


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / 'evil.pth'
    torch.save({'weights': torch.zeros(1), 'object': WeightFile('a', 'b')}, path)
    with pytest.raises(WeightsError, match=str(path)):
        load_state_dict(path)


def test_wrong_model_checkpoint_names_the_file_and_keys(tmp_path):
    from segment_anything.modeling import PromptEncoder

    path = tmp_path / 'prompt_encoder.pth'
    torch.save(PromptEncoder(embed_dim=32, image_embedding_size=(16, 16), input_image_size=(256, 256),
                             mask_in_chans=4).state_dict(), path)
    with pytest.raises(WeightsError) as error:
        load_into(tiny_sam(), path, 'SAM vit_b')
    message = str(error.value)
    assert str(path) in message and 'not a SAM vit_b checkpoint' in message and 'missing keys' in message
    assert 'unexpected keys' in message  # PromptEncoder keys lack the 'prompt_encoder.' prefix


def test_wrong_shapes_are_reported(tmp_path, saved_sam):
    sam, _ = saved_sam
    state = sam.state_dict()
    state['image_encoder.pos_embed'] = torch.zeros(1, 8, 8, 32)
    path = tmp_path / 'other_size.pth'
    torch.save(state, path)
    with pytest.raises(WeightsError, match='wrong shape') as error:
        load_into(tiny_sam(), path, 'SAM tiny')
    assert 'image_encoder.pos_embed' in str(error.value)


# --- checksums and downloads ------------------------------------------------------------------------

def test_checksum_mismatch_names_the_file(saved_sam):
    _, path = saved_sam
    good = file_sha256(path)
    verify_sha256(path, good)
    with open(path, 'r+b') as stream:
        stream.seek(100)
        stream.write(b'\x00\xff\x00\xff')
    with pytest.raises(WeightsError, match='corrupt or truncated') as error:
        verify_sha256(path, good, url='https://example.invalid/file.pth')
    assert str(path) in str(error.value) and good in str(error.value)
    assert 'https://example.invalid/file.pth' in str(error.value)


def test_checksum_stamp_is_invalidated_by_a_changed_file(saved_sam):
    _, path = saved_sam
    good = file_sha256(path)
    verify_sha256(path, good)
    assert path.with_name(f'.{path.name}.sha256').is_file()
    path.write_bytes(path.read_bytes()[:-10])  # new size and mtime: must be hashed again
    with pytest.raises(WeightsError, match='corrupt'):
        verify_sha256(path, good)


# --- resolve_sam_checkpoint -------------------------------------------------------------------------

def test_missing_sam_with_downloads_off_names_url_and_path(tmp_path):
    config = TridentConfig.from_mapping({'models.weights_dir': str(tmp_path), 'models.download': False})
    with pytest.raises(WeightsError) as error:
        resolve_sam_checkpoint(config)
    message = str(error.value)
    assert str(tmp_path / 'sam_vit_b_01ec64.pth') in message
    assert 'https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth' in message
    assert 'download: false' in message and '--random-weights' in message and 'sam_checkpoint' in message


def test_explicit_sam_checkpoint_wins(tmp_path, saved_sam):
    _, path = saved_sam
    config = TridentConfig.from_mapping({'models': {'weights_dir': str(tmp_path / 'empty'), 'download': False,
                                                    'sam_checkpoint': str(path)}})
    assert resolve_sam_checkpoint(config) == path


def test_corrupt_official_file_in_cache_is_named(tmp_path):
    bogus = tmp_path / 'sam_vit_l_0b3195.pth'
    bogus.write_bytes(b'not a checkpoint')
    config = TridentConfig.from_mapping({'models': {'weights_dir': str(tmp_path), 'download': False,
                                                    'sam_model': 'vit_l'}})
    with pytest.raises(WeightsError, match='corrupt or truncated') as error:
        resolve_sam_checkpoint(config)
    assert str(bogus) in str(error.value) and SAM_CHECKPOINTS['vit_l'].url in str(error.value)


# --- CLIP / DINO through open_clip and timm ---------------------------------------------------------

def test_clip_error_says_which_file_and_how_to_pass_it():
    message = str(clip_weights_error(TridentConfig(), RuntimeError('network unreachable')))
    assert 'network unreachable' in message
    assert 'https://huggingface.co/timm/vit_base_patch16_clip_224.openai/resolve/main/open_clip_model.safetensors' \
        in message
    assert 'clip_pretrained' in message and '--random-weights' in message


def test_dino_error_says_which_file_and_where(tmp_path):
    config = TridentConfig.from_mapping({'models.weights_dir': str(tmp_path)})
    message = str(dino_weights_error(config, OSError('offline')))
    assert 'https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth' in message
    assert 'dino_checkpoint' in message and str(tmp_path / 'dino_vitbase16_pretrain.pth') in message


def test_dino_file_lookup(tmp_path):
    config = TridentConfig.from_mapping({'models.weights_dir': str(tmp_path)})
    assert dino_checkpoint(config) is None  # timm's own cache then
    official = tmp_path / 'dino_vitbase16_pretrain.pth'
    official.write_bytes(b'x')
    assert dino_checkpoint(TridentConfig.from_mapping({'models.weights_dir': str(tmp_path)})) == official
    explicit = tmp_path / 'mine.pth'
    explicit.write_bytes(b'x')
    config = TridentConfig.from_mapping({'models.weights_dir': str(tmp_path), 'models.dino_checkpoint': str(explicit)})
    assert dino_checkpoint(config) == explicit


def test_real_mode_never_falls_back_to_random_weights(tmp_path):
    with pytest.raises(WeightsError, match='sam_vit_b_01ec64.pth'):
        load_models(TridentConfig.from_mapping({'models': {'weights_dir': str(tmp_path), 'download': False,
                                                           'device': 'cpu'}}))


def test_missing_local_clip_file_fails_before_building(tmp_path, saved_sam):
    _, sam_path = saved_sam
    config = TridentConfig.from_mapping({'models': {
        'weights_dir': str(tmp_path), 'download': False, 'device': 'cpu', 'sam_checkpoint': str(sam_path),
        'clip_pretrained': str(tmp_path / 'missing.safetensors')}})
    with pytest.raises(WeightsError, match='missing.safetensors'):
        load_models(config)
