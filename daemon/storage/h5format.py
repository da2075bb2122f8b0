"""The checks every reader of a cryoptycho HDF5 file makes before it trusts the file.

Each file kind stamps its root with ``format`` (``"cryoptycho-dataset"``, ``-result``,
``-spool``) and ``format_version``; a reader must find the file, its own format and the
datasets or groups it cannot do without, and otherwise fail naming the one that is wrong.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import h5py


@contextmanager
def open_checked(
    path: str | Path, fmt: str, kind: str, required: Iterable[str]
) -> Iterator[h5py.File]:
    """``path`` opened for reading, once it is a ``fmt`` file holding every ``required`` path.

    ``kind`` names the file in errors: FileNotFoundError when it is absent, ValueError when the
    format differs or a required path is missing.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{kind} file {path} does not exist")
    with h5py.File(path, "r") as f:
        if f.attrs.get("format") != fmt:
            raise ValueError(f"{path}: not a cryoptycho {kind} (attribute 'format' != {fmt!r})")
        for name in required:
            if name not in f:
                raise ValueError(f"{path}: missing required '/{name}'")
        yield f
