"""Writing output files: checked before any work, written whole or not at all.

Every file idap_fx writes (ONNX model, saved GraphModule, viewer page, JSON / Markdown
reports) goes through ``atomic_output``: a temporary file is created next to the target
(same folder, so ``os.replace`` is an atomic rename), the caller writes it, and it is moved
onto the target only if the block succeeds. On any exception, ``KeyboardInterrupt``
included, the temporary file is removed and an existing target is left as it was.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator

from idap_fx.errors import ExportError


def check_writable(path: str | os.PathLike[str]) -> str:
    """The absolute ``path``, or ``ExportError`` naming it: missing folder, a folder itself, folder read-only."""
    target = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(target)
    if not os.path.isdir(directory):
        raise ExportError(f"cannot write {target}: directory {directory} does not exist")
    if os.path.isdir(target):
        raise ExportError(f"cannot write {target}: it is a directory")
    if not os.access(directory, os.W_OK):
        raise ExportError(f"cannot write {target}: directory {directory} is not writable")
    return target


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[str]:
    """Yield a fresh temporary path next to ``path``; move it onto ``path`` only if the block succeeds.

    The path is checked (``check_writable``, then by creating the temporary file, with the
    permissions a plain ``open`` would give) on entry, so a bad path raises ``ExportError``
    naming it before the block runs.
    """
    target = check_writable(path)
    directory, name = os.path.split(target)
    tmp = os.path.join(directory, f".{name}.{secrets.token_hex(4)}.tmp")
    try:
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    except OSError as exc:
        raise ExportError(f"cannot write {target}: {exc.strerror} in {directory}") from exc
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_text(path: str | os.PathLike[str], text: str) -> str:
    """Write ``text`` (UTF-8) to ``path`` atomically; return the path as given."""
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    return os.fspath(path)
