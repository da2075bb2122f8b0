"""Journal records a newer release writes and this one does not know (a downgrade after a kill).

Before, any record of an unknown kind refused the spool ("its journal holds an unknown record").
The rule now (FORMATS.md § "The journal", SERVICE.md "Downgrades and the spool journal"): a
record a newer release marks ``optional: true`` carries no frame and changes none, and is skipped
with a warning naming its kind; one without the mark is required, and the spool is refused by
name, the file and its journal kept unchanged."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from cryoptycho.daemon.storage.journal import Journal, iter_records, journal_path
from cryoptycho.daemon.storage.spool import SpoolWriter, read_spool, repair_spool
from test_spool_journal import _append, _spec


def _killed_with(tmp_path: Path, extra: dict, journal_only: bool) -> tuple[Path, np.ndarray]:
    """A spool of 9 frames whose daemon was killed before its close, with ``extra`` (a newer
    release's record) written between its 5th and 6th frames' appends."""
    frames = np.random.default_rng(3).poisson(0.5, (9, 24, 24)).astype(np.uint16)
    live, killed = tmp_path / "live", tmp_path / "killed"
    killed.mkdir()
    w = SpoolWriter.create(live, _spec("newer"), journal_only=journal_only)
    _append(w, frames, 0, 5)
    _append(w, frames, 5, 9)
    for name in (w.path, journal_path(w.path)):  # the files as a kill left them
        shutil.copy(name, killed / name.name)
    w.close()
    path = killed / w.path.name
    # the journal again, as the newer release wrote it: its record among the appends
    records = [r for r in iter_records(journal_path(path)) if not isinstance(r, str)]
    journal_path(path).unlink()
    j = Journal.create(journal_path(path), fsync=False)
    for r in records:
        if r.header["op"] == "append" and r.header["k"] == 5:
            j.write(extra, [b"\x00" * 16])
        j.write(r.header, [r.body])
    j.close()
    return path, frames


@pytest.mark.parametrize("journal_only", [True, False])
def test_an_optional_record_of_a_newer_release_is_skipped_with_a_warning_and_every_frame_kept(
        tmp_path: Path, journal_only: bool, caplog: pytest.LogCaptureFixture) -> None:
    path, frames = _killed_with(tmp_path, {"op": "annotation", "optional": True, "note": "by a newer release"},
                                journal_only)
    with caplog.at_level(logging.WARNING):
        got = read_spool(path)  # (replay, reconstruct: a copy rebuilt from the journal)
    np.testing.assert_array_equal(got.frames, frames)
    assert any("'annotation'" in r.getMessage() and "optional" in r.getMessage() for r in caplog.records)
    done = repair_spool(path)  # (recovery)
    assert done is not None and "skipped 1 journal records" in done and "'annotation'" in done, done
    got = read_spool(path)
    np.testing.assert_array_equal(got.frames, frames)
    np.testing.assert_array_equal(got.indices, np.arange(9))


def test_a_required_record_of_a_newer_release_refuses_the_spool_by_name_and_keeps_it(tmp_path: Path) -> None:
    path, _ = _killed_with(tmp_path, {"op": "reshard", "layout": 2}, journal_only=True)
    before = path.read_bytes(), journal_path(path).read_bytes()
    for read in (repair_spool, read_spool):
        with pytest.raises(ValueError, match="'reshard'.*marked as required.*kept unchanged"):
            read(path)
    assert (path.read_bytes(), journal_path(path).read_bytes()) == before
    assert not list(path.parent.glob("*.rebuild"))


def test_an_existing_journal_without_the_mark_reads_as_before(tmp_path: Path) -> None:
    """Records of this release's kinds carry no mark, nor did any before: they are applied."""
    path, frames = _killed_with(tmp_path, {"op": "options", "options": {"seed": 4}}, journal_only=True)
    assert "skipped" not in (repair_spool(path) or "")
    got = read_spool(path)
    np.testing.assert_array_equal(got.frames, frames)
    assert got.spec.options == {"seed": 4}


def test_every_record_kind_this_build_writes_is_one_it_knows() -> None:
    """A kind added to the writer but not to ``KNOWN_OPS`` would make every crash recovery of
    such a spool refuse it as a newer release's required record; read the writer's own record
    literals (``{"op": "<kind>", …}`` in daemon/storage) and hold them to the known kinds."""
    import ast

    from cryoptycho.daemon.storage import journal

    storage = Path(journal.__file__).parent
    written: set[str] = set()
    for source in storage.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Dict):
                for key, value in zip(node.keys, node.values):
                    if (isinstance(key, ast.Constant) and key.value == "op"
                            and isinstance(value, ast.Constant) and isinstance(value.value, str)):
                        written.add(value.value)
    assert {"base", "append", "closed"} <= written  # the reader found the writer's records
    assert written <= journal.KNOWN_OPS, sorted(written - journal.KNOWN_OPS)


@pytest.mark.parametrize("kind", [["reshard"], {"name": "reshard"}])
def test_a_record_whose_kind_is_no_string_refuses_the_spool_by_name(tmp_path: Path, kind: object) -> None:
    """A record whose ``op`` is a list or a map (a broken writer): before, every read of the spool
    raised TypeError ("unhashable type") naming neither the file nor the record. No kind at all,
    it is refused though marked optional."""
    path, _ = _killed_with(tmp_path, {"op": kind, "optional": True}, journal_only=True)
    before = path.read_bytes(), journal_path(path).read_bytes()
    with pytest.raises(ValueError, match=f"{path.name}: its journal holds a record .*reshard.*kept unchanged"):
        read_spool(path)
    with pytest.raises(ValueError, match="reshard.*kept unchanged"):
        repair_spool(path)
    assert (path.read_bytes(), journal_path(path).read_bytes()) == before
