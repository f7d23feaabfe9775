"""Weights in one folder: `trident-weights fetch` over a local HTTP server (files this test makes, checksums
given), a checksum mismatch, an unreachable URL, `--print`, and discovery of all three files in weights_dir.
"""
from __future__ import annotations

import functools
import hashlib
import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from trident_ros.config import TridentConfig
from trident_ros.models.weight_files import WeightFile, WeightsError
from trident_ros.models.weights import (
    SAM_CHECKPOINTS,
    NeededWeight,
    fetch_files,
    fetch_weights,
    format_weights,
    needed_weights,
)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(base URL, folder it serves) of an HTTP server on 127.0.0.1."""
    root = tmp_path / 'served'
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f'http://127.0.0.1:{httpd.server_address[1]}', root
    httpd.shutdown()
    httpd.server_close()


def serve(root: Path, relative: str, size: int, seed: int) -> tuple[bytes, str]:
    """Write a file of ``size`` bytes under the served folder; returns its bytes and SHA-256."""
    data = hashlib.sha256(str(seed).encode()).digest() * (size // 32 + 1)
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[:size])
    return data[:size], hashlib.sha256(data[:size]).hexdigest()


def entry(name: str, url: str, sha256: str | None, folder: Path) -> NeededWeight:
    return NeededWeight('sam', f'test {name}', WeightFile(name, url, sha256), folder / name, None, 'sam_checkpoint')


def test_fetch_downloads_verifies_and_keeps_going_past_failures(server, tmp_path):
    base, root = server
    good, good_sha = serve(root, 'a.pth', 300_000, 1)
    _, _ = serve(root, 'b.pth', 1000, 2)
    folder = tmp_path / 'weights'
    entries = [entry('a.pth', f'{base}/a.pth', good_sha, folder),
               entry('b.pth', f'{base}/b.pth', '0' * 64, folder),  # checksum mismatch
               entry('c.pth', 'http://127.0.0.1:9/c.pth', None, folder)]  # nothing listens on port 9
    with pytest.raises(WeightsError) as error:
        fetch_files(entries)
    message = str(error.value)
    assert '2 of 3 weight files could not be fetched' in message
    assert 'corrupt' in message and f'{base}/b.pth' in message and '0' * 64 in message
    assert '127.0.0.1:9' in message and str(folder / 'c.pth') in message
    assert (folder / 'a.pth').read_bytes() == good  # the good one is in place
    assert not (folder / 'b.pth').exists() and not (folder / 'c.pth').exists()
    assert not list(folder.glob('*.part'))  # no partial files left behind
    assert fetch_files(entries[:1]) == {folder / 'a.pth': 'present'}  # verified, not downloaded again
    (root / 'a.pth').unlink()
    (folder / 'a.pth').write_bytes(good[:-1])  # truncated afterwards: named as corrupt
    with pytest.raises(WeightsError, match='corrupt or truncated'):
        fetch_files(entries[:1])


def test_print_lists_every_file_with_url_path_and_checksum(tmp_path):
    result = subprocess.run([sys.executable, '-m', 'trident_ros.tools.fetch_weights',
                             'fetch', '--print',
                             '--weights-dir', str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    sam = SAM_CHECKPOINTS['vit_b']
    for text in (sam.url, sam.sha256, str(tmp_path / sam.name),
                 'https://huggingface.co/timm/vit_base_patch16_224.dino/resolve/main/model.safetensors',
                 str(tmp_path / 'vit_base_patch16_224.dino.safetensors'),
                 'https://huggingface.co/timm/vit_base_patch16_clip_224.openai/resolve/main/open_clip_model.safetensors',
                 str(tmp_path / 'vit_base_patch16_clip_224.openai.safetensors'), 'not published'):
        assert text in result.stdout, text
    assert not any(tmp_path.iterdir())  # --print downloads nothing


def test_offline_error_is_the_same_list(tmp_path, monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('HF_HOME', str(tmp_path / 'hf'))  # an empty hub cache
    config = TridentConfig.from_mapping({'models.weights_dir': str(tmp_path / 'weights'), 'models.download': False})
    with pytest.raises(WeightsError) as error:
        fetch_weights(config)
    assert format_weights(needed_weights(config)) in str(error.value)
    assert 'trident-weights fetch' in str(error.value)


def test_cli_fetches_into_weights_dir_then_everything_is_found_there(server, tmp_path):
    """`trident-weights fetch` against the hub files on a local server (HF_ENDPOINT), method proxy
    (CLIP + DINO ViT-B/8, its preset's): both land in weights_dir under their standard names and are then found
    there.
    """
    base, root = server
    clip, _ = serve(root, 'timm/vit_base_patch16_clip_224.openai/resolve/main/open_clip_model.safetensors', 5000, 3)
    dino, _ = serve(root, 'timm/vit_base_patch8_224.dino/resolve/main/model.safetensors', 7000, 4)
    folder = tmp_path / 'weights'
    env = dict(os.environ, HF_ENDPOINT=base, HF_HOME=str(tmp_path / 'hf'))
    command = [sys.executable, '-m', 'trident_ros.tools.fetch_weights',
                             'fetch', '--method', 'proxy',
               '--weights-dir', str(folder)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert (folder / 'vit_base_patch16_clip_224.openai.safetensors').read_bytes() == clip
    assert (folder / 'vit_base_patch8_224.dino.safetensors').read_bytes() == dino
    assert 'downloaded' in result.stderr and 'all weights of method proxy are in place' in result.stderr
    again = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert again.returncode == 0 and 'present' in again.stderr and 'downloaded' not in again.stderr


def test_all_three_files_are_found_in_weights_dir_by_standard_name(tmp_path, monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('HF_HOME', str(tmp_path / 'hf'))
    folder = tmp_path / 'weights'
    folder.mkdir()
    config = TridentConfig.from_mapping({'models.weights_dir': str(folder), 'models.download': False})
    for needed in needed_weights(config):
        needed.path.write_bytes(b'weights')
        if needed.file.sha256:  # SAM: a verified-file stamp (hash, size, mtime), as a verified download leaves
            stat = needed.path.stat()
            needed.path.with_name(f'.{needed.path.name}.sha256').write_text(
                f'{needed.file.sha256} {stat.st_size} {stat.st_mtime_ns}\n', encoding='ascii')
    sources = fetch_weights(config)
    assert sources.models == ('clip', 'dino', 'sam')
    assert sources.sam == folder / 'sam_vit_b_01ec64.pth'
    assert sources.dino == folder / 'vit_base_patch16_224.dino.safetensors'
    assert sources.clip == str(folder / 'vit_base_patch16_clip_224.openai.safetensors')


