"""Files Plexus writes for the user (the demo models, the kernel cache): their modes come from
the user's umask, like any other tool's, whatever mode the writer (a temp file, safetensors)
created them with."""

from __future__ import annotations

import os
from pathlib import Path


def umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def apply_umask(path: str | Path, executable: bool = False) -> None:
    """Give ``path`` the mode a plain ``open``/``mkdir`` would have: 0666 or (directories and
    ``executable`` files) 0777, less the umask; a directory's files too."""
    path, mask = Path(path), umask()
    if path.is_dir():
        path.chmod(0o777 & ~mask)
        for child in path.iterdir():
            child.chmod((0o777 if child.is_dir() else 0o666) & ~mask)
    else:
        path.chmod((0o777 if executable else 0o666) & ~mask)
