"""Every `ctrlora` command ends a bad input in one line naming the file and what is wrong, exit
status 2, no traceback (unless --debug), and leaves no half-written output behind."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from _models_helpers import REF

from ctrlora.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TINY_CONFIG = REF / "tiny_config.json"


class _RunsCode:
    """Pickles as a call of os.getpid (harmless if it ever ran; torch must refuse to run it)."""

    def __reduce__(self):
        return (os.getpid, ())


def _truncated(path: Path, source: Path) -> Path:
    data = source.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _one_error_line(err: str, *must: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and lines[0].startswith("ctrlora ") and ": error: " in lines[0], err
    for text in must:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _convert(tmp_path, base, *adapters, out=None, names=()):
    argv = ["convert", "--base", str(base), "--ldm-config", str(TINY_CONFIG), "--out", str(out or tmp_path / "out")]
    for a in adapters:
        argv += ["--adapter", str(a)]
    for n in names:
        argv += ["--name", n]
    return main(argv)


def test_convert_truncated_safetensors(tmp_path, capsys):
    bad = _truncated(tmp_path / "base.safetensors", REF / "tiny_base.safetensors")
    assert _convert(tmp_path, bad) == 2
    _one_error_line(capsys.readouterr().err, str(bad), "not a complete safetensors file")
    assert _leftovers(tmp_path) == ["base.safetensors"]


def test_convert_refuses_code_in_a_pickle_without_torch_hint(tmp_path, capsys):
    evil = tmp_path / "base.ckpt"
    torch.save({"state_dict": {"x": _RunsCode()}}, evil)
    assert _convert(tmp_path, evil) == 2
    line = _one_error_line(capsys.readouterr().err, str(evil), "refused", "getpid")
    assert "weights_only" not in line
    assert _leftovers(tmp_path) == ["base.ckpt"]


def test_convert_truncated_pickle_and_unknown_suffix(tmp_path, capsys):
    bad = _truncated(tmp_path / "base.ckpt", REF / "tiny_base.ckpt")
    assert _convert(tmp_path, bad) == 2
    _one_error_line(capsys.readouterr().err, str(bad), "not a readable torch checkpoint")
    odd = tmp_path / "base.npz"
    odd.write_bytes(b"x")
    assert _convert(tmp_path, odd) == 2
    _one_error_line(capsys.readouterr().err, str(odd), "unsupported checkpoint format")


def test_convert_adapter_failure_leaves_no_output(tmp_path, capsys):
    """The base converts, then the second adapter is refused (it is a base file): no output
    folder, no temporary folder, nothing of the first adapter."""
    out = tmp_path / "out"
    assert _convert(tmp_path, REF / "tiny_base.ckpt", REF / "tiny_adapter.safetensors", REF / "tiny_base.safetensors",
                    out=out, names=("lighting", "wrong")) == 2
    _one_error_line(capsys.readouterr().err, str(REF / "tiny_base.safetensors"), "unknown keys")
    assert _leftovers(tmp_path) == []
    # the same request without the bad file succeeds into the same place
    assert _convert(tmp_path, REF / "tiny_base.ckpt", REF / "tiny_adapter.safetensors", out=out,
                    names=("lighting",)) == 0
    assert _leftovers(out) == ["adapters", "base"] and _leftovers(out / "adapters") == ["lighting"]
    assert _leftovers(tmp_path) == ["out"]
    capsys.readouterr()
    # a non-empty output folder is refused before any work
    assert _convert(tmp_path, REF / "tiny_base.ckpt", out=out) == 2
    _one_error_line(capsys.readouterr().err, str(out), "not empty")


def test_convert_bad_request(tmp_path, capsys):
    cases = [
        (["--adapter", str(REF / "tiny_adapter.safetensors"), "--name", "a", "--name", "b"], "one --name per --adapter"),
        (["--adapter", str(tmp_path / "missing.safetensors")], "checkpoint not found"),
    ]
    for extra, message in cases:
        argv = ["convert", "--base", str(REF / "tiny_base.ckpt"), "--ldm-config", str(TINY_CONFIG),
                "--out", str(tmp_path / "out"), *extra]
        assert main(argv) == 2, extra
        _one_error_line(capsys.readouterr().err, message)
    config = tmp_path / "config.json"
    config.write_text("{not json")
    assert main(["convert", "--base", str(REF / "tiny_base.ckpt"), "--ldm-config", str(config),
                 "--out", str(tmp_path / "out")]) == 2
    _one_error_line(capsys.readouterr().err, str(config), "not valid JSON")
    assert _leftovers(tmp_path) == ["config.json"]


def test_debug_shows_the_traceback(tmp_path):
    bad = _truncated(tmp_path / "base.safetensors", REF / "tiny_base.safetensors")
    with pytest.raises(ValueError, match="not a complete safetensors file"):
        main(["--debug", "convert", "--base", str(bad), "--out", str(tmp_path / "out")])
    with pytest.raises(ValueError, match="not a complete safetensors file"):
        main(["convert", "--debug", "--base", str(bad), "--out", str(tmp_path / "out")])


def _generate_parts(tmp_path: Path) -> tuple[list[str], Path]:
    """Folders for `ctrlora generate` whose problems are found before any model loads, and a
    valid condition image."""
    from PIL import Image

    for d in ("backbone", "base", "lighting"):
        (tmp_path / d).mkdir()
    img = tmp_path / "light.png"
    Image.new("RGB", (8, 8), (10, 20, 30)).save(img)
    head = ["generate", "--backbone", str(tmp_path / "backbone"), "--base", str(tmp_path / "base"),
            "--adapter", f"lighting={tmp_path / 'lighting'}", "--steps", "1", "--device", "cpu",
            "--out", str(tmp_path / "o")]
    return head, img


def test_generate_bad_conditions_and_weights(tmp_path, capsys):
    head, img = _generate_parts(tmp_path)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    cases = [
        (["--condition", f"lighting={img}", "--condition", "x=notanimage"], ["unknown condition(s) ['x']"]),
        (["--condition", f"lighting={tmp_path / 'missing.png'}"], ["does not exist", "missing.png"]),
        (["--condition", f"lighting={text}"], ["is not a readable image", str(text)]),
        (["--condition", "lighting=notanimage"], ["notanimage", "does not exist"]),
    ]
    for extra, messages in cases:
        assert main(head + extra) == 2, extra
        _one_error_line(capsys.readouterr().err, *messages)
    weights = tmp_path / "lighting" / "adapter_model.safetensors"
    save_file({"w": torch.zeros(64)}, str(tmp_path / "whole.safetensors"))
    _truncated(weights, tmp_path / "whole.safetensors")
    assert main(head + ["--condition", f"lighting={img}"]) == 2
    _one_error_line(capsys.readouterr().err, str(weights), "not a complete safetensors file")
    assert not (tmp_path / "o").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.tmp-")]


def test_entry_point_process_exit_status_and_stderr(tmp_path):
    """The installed way of running it: a fresh process, exit status 2, one line on stderr."""
    bad = _truncated(tmp_path / "base.safetensors", REF / "tiny_base.safetensors")
    proc = subprocess.run([sys.executable, "-m", "ctrlora.cli", "convert", "--base", str(bad),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 2, proc.stderr
    _one_error_line(proc.stderr, str(bad), "not a complete safetensors file")
    assert proc.stdout == ""
