"""What the pack writes (images, --tokens-out files, `tiny` folders, `quantize` files) is made under
a temporary name and renamed into place; it must still get the mode a plain open() or mkdir gives
under the user's umask (mkstemp/mkdtemp alone would leave 0600 and 0700), and a failed write must
leave nothing behind."""
from __future__ import annotations

import os
import stat
import sys

import pytest

from nextstep_core import atomic_write
from nextstep_core.atomic_write import atomic_file, atomic_folder, current_umask
from nextstep_core.cli import main
from nextstep_core.tiny import write_tiny

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX modes")

# umask -> (file mode, folder mode), written out rather than computed the way the code does
EXPECTED = {0o022: (0o644, 0o755), 0o077: (0o600, 0o700), 0o002: (0o664, 0o775)}


@pytest.fixture(params=sorted(EXPECTED), ids=lambda m: f"umask{m:03o}")
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def assert_usual(path, mask):
    file_mode, folder_mode = EXPECTED[mask]
    want = folder_mode if os.path.isdir(path) else file_mode
    assert mode(path) == want, f"{path}: {mode(path):04o}, expected {want:04o} under umask {mask:03o}"


def test_images_and_tokens_from_generate(tiny_model, tmp_path, umask):
    out, toks = tmp_path / "new" / "img.png", tmp_path / "t.safetensors"
    assert main(["generate", "--model", tiny_model, "--prompt", "x", "--num-images", "2", "--width", "32", "--height",
                 "32", "--steps", "2", "--quiet", "--out", str(out), "--tokens-out", str(toks)]) == 0
    for path in (tmp_path / "new" / "img-0.png", tmp_path / "new" / "img-1.png", toks, tmp_path / "new"):
        assert_usual(path, umask)
    assert sorted(os.listdir(tmp_path)) == ["new", "t.safetensors"]


def test_images_and_tokens_from_storyboard(tiny_model, tmp_path, umask):
    out, toks = tmp_path / "story.png", tmp_path / "story.safetensors"
    assert main(["storyboard", "--model", tiny_model, "--panel", "a knight", "--panel", "a dragon", "--width", "32",
                 "--height", "32", "--steps", "2", "--quiet", "--out", str(out), "--tokens-out", str(toks)]) == 0
    for path in (tmp_path / "story-0.png", tmp_path / "story-1.png", toks):
        assert_usual(path, umask)
    assert sorted(os.listdir(tmp_path)) == ["story-0.png", "story-1.png", "story.safetensors"]


def test_tiny_folders_and_everything_in_them(tmp_path, umask):
    out = tmp_path / "tiny"
    write_tiny(str(out), hidden=32, layers=1, heads=2, kv_heads=1, mlp=64, head_width=32, head_layers=1)
    paths = [out] + [os.path.join(root, name) for root, dirs, files in os.walk(out) for name in dirs + files]
    assert len(paths) > 5
    for path in paths:
        assert_usual(path, umask)
    assert os.listdir(tmp_path) == ["tiny"]


def test_quantize_files(tiny_model, tmp_path, umask):
    out = tmp_path / "q.safetensors"
    assert main(["quantize", "--model", tiny_model, "--format", "int8", "--out", str(out)]) == 0
    assert_usual(out, umask)
    assert os.listdir(tmp_path) == ["q.safetensors"]


def test_the_umask_is_read_without_changing_it(monkeypatch, umask):
    assert current_umask() == umask and os.umask(umask) == umask  # unchanged by reading it
    # where /proc does not say, it is read once by setting it and setting it back
    def no_proc(*args, **kwargs):
        raise OSError("no /proc here")

    monkeypatch.setattr(atomic_write, "open", no_proc, raising=False)
    monkeypatch.setattr(atomic_write, "_umask_cache", [])
    assert current_umask() == umask and os.umask(umask) == umask


def test_a_failed_write_leaves_the_old_file_and_nothing_else(tmp_path):
    target = tmp_path / "img.png"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_file(str(target)) as tmp:
            with open(tmp, "wb") as fh:
                fh.write(b"half")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["img.png"]
    with pytest.raises(RuntimeError):
        with atomic_folder(str(tmp_path / "tiny")) as tmp:
            open(os.path.join(tmp, "config.json"), "w").close()
            raise RuntimeError("stopped")
    assert os.listdir(tmp_path) == ["img.png"]
