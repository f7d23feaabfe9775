"""Downloads and weights in one folder, over a local HTTP server on 127.0.0.1 (files this test makes): plain URLs
resumed from a ``.part`` file (Range), a connection dropped mid-way, checksum mismatches, unreachable URLs; hub
files through huggingface_hub against ``HF_ENDPOINT`` (HEAD with X-Repo-Commit / ETag / Content-Length, then
GET); `trident-weights fetch`, `--print`, and discovery of all three files in weights_dir.
"""
from __future__ import annotations

import hashlib
import http.server
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from huggingface_hub import constants

from trident_ros.config import TridentConfig
from trident_ros.models.weight_files import WeightFile, WeightsError, download
from trident_ros.models.weights import (
    SAM_CHECKPOINTS,
    NeededWeight,
    fetch_files,
    fetch_weight_file,
    fetch_weights,
    format_weights,
    needed_weights,
)

COMMIT = 'c0ffee' * 6 + 'c0ff'
"""The X-Repo-Commit every response carries (huggingface_hub needs one from a hub endpoint)."""


@dataclass
class Served:
    """What the test server serves and what it saw.

    Attributes:
        base: its URL.
        root: the folder it serves (URL path = path under it).
        requests: ``(method, path, Range header or None, body bytes sent)`` per request.
        ranges: honour ``Range`` (206 from the offset); False: ignore it (200, the whole file).
        cut: URL path -> bytes after which the next GET of it is cut off (the connection closed), once.
    """

    base: str
    root: Path
    requests: list[tuple[str, str, str | None, int]] = field(default_factory=list)
    ranges: bool = True
    cut: dict[str, int] = field(default_factory=dict)


def handler_for(served: Served) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_HEAD(self) -> None:  # noqa: N802 (http.server's name)
            self.respond(body=False)

        def do_GET(self) -> None:  # noqa: N802
            self.respond(body=True)

        def respond(self, body: bool) -> None:
            path = served.root / self.path.lstrip('/')
            requested = self.headers.get('Range')
            if not path.is_file():
                served.requests.append((self.command, self.path, requested, 0))
                self.send_error(404)
                return
            data = path.read_bytes()
            start = int(requested.removeprefix('bytes=').split('-')[0]) if requested and served.ranges else 0
            if start >= len(data) > 0:
                served.requests.append((self.command, self.path, requested, 0))
                self.send_response(416)
                self.send_header('Content-Range', f'bytes */{len(data)}')
                self.send_header('Content-Length', '0')
                self.end_headers()
                return
            self.send_response(206 if start else 200)
            if start:
                self.send_header('Content-Range', f'bytes {start}-{len(data) - 1}/{len(data)}')
            self.send_header('Content-Length', str(len(data) - start))
            self.send_header('ETag', f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header('X-Repo-Commit', COMMIT)
            self.end_headers()
            sent = data[start:start + served.cut.pop(self.path, len(data))] if body else b''
            served.requests.append((self.command, self.path, requested, len(sent)))  # before the client may go on
            self.wfile.write(sent)

    return Handler


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Served]:
    """An HTTP server on 127.0.0.1 serving ``tmp_path / 'served'``: HEAD and GET, Range, hub headers."""
    root = tmp_path / 'served'
    root.mkdir()
    served = Served('', root)
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler_for(served))
    served.base = f'http://127.0.0.1:{httpd.server_address[1]}'
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield served
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
    base, root = server.base, server.root
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


def test_metaclip_of_the_corrclip_authors_is_a_clip_pretrained_with_its_file(tmp_path):
    """CorrCLIP's authors use MetaCLIP 2.5B (open_clip ``metaclip_fullcc``, QuickGELU); OpenAI's stays the default."""
    from trident_ros.models.build import clip_quick_gelu

    config = tmp_path / 'metaclip.yaml'
    config.write_text('models:\n  clip_pretrained: metaclip_fullcc\n')
    result = subprocess.run([sys.executable, '-m', 'trident_ros.tools.fetch_weights', 'fetch', '--print',
                             '--method', 'corrclip', '--config', str(config), '--weights-dir', str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for text in ('CLIP ViT-B-16 (metaclip_fullcc)',
                 'https://huggingface.co/timm/vit_base_patch16_clip_224.metaclip_2pt5b/resolve/main/'
                 'open_clip_model.safetensors',
                 str(tmp_path / 'vit_base_patch16_clip_224.metaclip_2pt5b.safetensors'),
                 'https://huggingface.co/timm/vit_base_patch8_224.dino/resolve/main/model.safetensors'):
        assert text in result.stdout, text
    assert clip_quick_gelu(TridentConfig.from_mapping({'models.clip_pretrained': 'metaclip_fullcc'}))
    assert TridentConfig.from_mapping({'method': 'corrclip'}).models.clip_pretrained == 'openai'


def test_offline_error_is_the_same_list(tmp_path, monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('HF_HOME', str(tmp_path / 'hf'))  # an empty hub cache
    config = TridentConfig.from_mapping({'models.weights_dir': str(tmp_path / 'weights'), 'models.download': False})
    with pytest.raises(WeightsError) as error:
        fetch_weights(config)
    assert format_weights(needed_weights(config)) in str(error.value)
    assert 'trident-weights fetch' in str(error.value)


def test_cli_fetches_hub_files_through_huggingface_hub_into_weights_dir(server, tmp_path):
    """`trident-weights fetch` against the hub files on a local server (HF_ENDPOINT), method proxy
    (CLIP + DINO ViT-B/8, its preset's): huggingface_hub's HEAD then GET per file, a connection cut mid-way
    resumed with a Range request, both files in weights_dir under their standard names, then found there.
    """
    clip_path = '/timm/vit_base_patch16_clip_224.openai/resolve/main/open_clip_model.safetensors'
    dino_path = '/timm/vit_base_patch8_224.dino/resolve/main/model.safetensors'
    chunk = constants.DOWNLOAD_CHUNK_SIZE  # what huggingface_hub writes at once: a cut resumes at a multiple
    clip, _ = serve(server.root, clip_path.lstrip('/'), 5000, 3)
    dino, _ = serve(server.root, dino_path.lstrip('/'), chunk + 70_000, 4)
    server.cut[dino_path] = chunk + 30_000
    folder = tmp_path / 'weights'
    env = dict(os.environ, HF_ENDPOINT=server.base, HF_HOME=str(tmp_path / 'hf'))
    command = [sys.executable, '-m', 'trident_ros.tools.fetch_weights', 'fetch', '--method', 'proxy',
               '--weights-dir', str(folder)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert (folder / 'vit_base_patch16_clip_224.openai.safetensors').read_bytes() == clip
    assert (folder / 'vit_base_patch8_224.dino.safetensors').read_bytes() == dino
    assert sorted(p.name for p in folder.iterdir()) == ['vit_base_patch16_clip_224.openai.safetensors',
                                                        'vit_base_patch8_224.dino.safetensors']
    assert [(method, range_) for method, path, range_, _ in server.requests if path == clip_path] == [
        ('HEAD', None), ('GET', None)]
    assert [(method, range_, sent) for method, path, range_, sent in server.requests if path == dino_path] == [
        ('HEAD', None, 0), ('GET', None, chunk + 30_000), ('GET', f'bytes={chunk}-', 70_000)]
    assert 'downloaded' in result.stderr and 'all weights of method proxy are in place' in result.stderr
    again = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert again.returncode == 0 and 'present' in again.stderr and 'downloaded' not in again.stderr


@pytest.mark.parametrize('ranges', [True, False], ids=['server-resumes', 'server-ignores-range'])
def test_an_interrupted_download_resumes_from_its_part_file(server, tmp_path, ranges):
    """A ``.part`` left by an earlier run is continued with ``Range: bytes=<its size>-``; a server that
    ignores Range sends the whole file, which replaces the part. Either way the file is complete and checked.
    """
    data, sha = serve(server.root, 'sam.pth', 300_000, 5)
    dest = tmp_path / 'weights' / 'sam.pth'
    dest.parent.mkdir()
    dest.with_name('.sam.pth.part').write_bytes(data[:120_000])
    server.ranges = ranges
    assert download(f'{server.base}/sam.pth', dest, sha) == dest
    assert dest.read_bytes() == data and not dest.with_name('.sam.pth.part').exists()
    expected = ('GET', '/sam.pth', 'bytes=120000-', 180_000 if ranges else 300_000)
    assert server.requests == [expected]


def test_a_dropped_connection_is_resumed_within_the_call(server, tmp_path, monkeypatch):
    """huggingface_hub writes whole chunks (10 MiB; 10 kB here): a connection cut at 105 kB resumes at 100 kB."""
    monkeypatch.setattr(constants, 'DOWNLOAD_CHUNK_SIZE', 10_000)
    data, sha = serve(server.root, 'sam.pth', 300_000, 6)
    server.cut['/sam.pth'] = 105_000
    dest = tmp_path / 'sam.pth'
    assert download(f'{server.base}/sam.pth', dest, sha) == dest
    assert dest.read_bytes() == data
    assert [(r[2], r[3]) for r in server.requests] == [(None, 105_000), ('bytes=100000-', 200_000)]


def test_a_part_of_another_file_fails_its_checksum_and_is_dropped(server, tmp_path):
    """A stale part (another file's bytes): the download completes, the checksum fails, the part is deleted,
    and the next call downloads the whole file. A part as long as the file (416) starts anew at once.
    """
    data, sha = serve(server.root, 'sam.pth', 50_000, 7)
    dest = tmp_path / 'sam.pth'
    part = tmp_path / '.sam.pth.part'
    part.write_bytes(b'x' * 10_000)
    with pytest.raises(WeightsError, match=f'download of {server.base}/sam.pth is corrupt: SHA-256 [0-9a-f]{{64}}, '
                                           f'expected {sha}'):
        download(f'{server.base}/sam.pth', dest, sha)
    assert not dest.exists() and not part.exists()
    assert download(f'{server.base}/sam.pth', dest, sha).read_bytes() == data
    dest.unlink()
    part.write_bytes(data)
    assert download(f'{server.base}/sam.pth', dest, sha).read_bytes() == data
    assert [(r[2], r[3]) for r in server.requests[-2:]] == [('bytes=50000-', 0), (None, 50_000)]


def test_fetch_downloads_a_missing_file_once(server, tmp_path):
    data, sha = serve(server.root, 'weights.pth', 4000, 8)
    spec = WeightFile('weights.pth', f'{server.base}/weights.pth', sha)
    path = fetch_weight_file(spec, tmp_path / 'cache', allow_download=True, what='SAM tiny')
    assert path == tmp_path / 'cache' / 'weights.pth' and path.read_bytes() == data
    (server.root / 'weights.pth').unlink()  # a second fetch finds the file and does not download
    assert fetch_weight_file(spec, tmp_path / 'cache', allow_download=True, what='SAM tiny') == path
    assert len(server.requests) == 1


def test_a_missing_url_gives_an_actionable_error(server, tmp_path):
    url = f'{server.base}/nowhere/weights.pth'
    spec = WeightFile('weights.pth', url, None)
    with pytest.raises(WeightsError) as error:
        fetch_weight_file(spec, tmp_path / 'cache', allow_download=True, what='SAM vit_b')
    message = str(error.value)
    assert url in message and '404' in message and str(tmp_path / 'cache' / 'weights.pth') in message
    assert '--random-weights' in message
    assert not any((tmp_path / 'cache').iterdir())  # neither the file nor an empty part


def test_an_unreachable_server_fails_after_a_few_retries(tmp_path):
    spec = WeightFile('weights.pth', 'http://127.0.0.1:9/weights.pth', None)  # nothing listens on port 9
    began = time.monotonic()
    with pytest.raises(WeightsError, match='127.0.0.1:9'):
        fetch_weight_file(spec, tmp_path, allow_download=True, what='SAM vit_b')
    assert time.monotonic() - began < 20  # huggingface_hub retries a refused connection 5 times, 1 s apart
    assert not any(tmp_path.iterdir())


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


