"""The resync safety net with real files: what inotify missed is found by the next resync,
every kind of change, for exactly the credentials whose files changed, and still after a
reload changed which files there are (the resync keeps its list of paths between rounds)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

from broker.core.events import MISSING, REFRESHED
from broker.core.state import Status
from broker.engine.reader import stat_signature
from tests.conftest import SecretRegistry, make_config, write_atomic

pytestmark = pytest.mark.anyio


def cred(name: str, path: Path) -> dict[str, Any]:
    return {"name": name, "files": {"token": str(path)}}


def blind(h: Any) -> None:
    """Stop inotify for every credential but the fence, as on a filesystem without it."""
    h.broker.engine.watcher.watch([str(h.fence_path)])


async def test_a_resync_finds_each_kind_of_change_inotify_missed_and_nothing_else(
    harness_factory: Any, tmp_path: Path, secrets: SecretRegistry
) -> None:
    paths = {name: tmp_path / name / "token" for name in ("renamed", "rewritten", "deleted",
                                                          "same", "other-dir")}
    for path in paths.values():
        path.parent.mkdir()
        write_atomic(path, secrets.token())
    creds = [cred(name, path) for name, path in paths.items()]
    async with harness_factory(creds) as h:  # resync_interval 30 s: only ours runs
        await h.fence()
        h.seen.clear()
        blind(h)
        new = secrets.token() + "x"
        write_atomic(paths["renamed"], new)
        # In place, the same length: only the inode's times tell.
        same_length = secrets.token()
        with open(paths["rewritten"], "r+") as fh:
            old = fh.read()
            fh.seek(0)
            fh.write(same_length[: len(old)].ljust(len(old), "y"))
        paths["deleted"].unlink()
        await h.fence()
        assert h.seen == [e for e in h.seen if e.subject == "fence"]  # nothing seen yet
        await h.broker.engine.resync()
        await h.fence()
        with anyio.fail_after(10):
            while h.broker.state("deleted").status is not Status.MISSING:
                await h.fence()
        assert h.types("renamed") == [REFRESHED]
        assert h.of("renamed")[0].data.files[0].size == len(new)
        assert h.types("rewritten") == [REFRESHED]
        assert h.types("deleted") == [MISSING]
        assert h.types("same") == []
        assert h.types("other-dir") == []


async def test_a_resync_after_a_reload_stats_the_files_the_new_config_names(
    harness_factory: Any, tmp_path: Path, secrets: SecretRegistry
) -> None:
    old, moved, added = tmp_path / "old", tmp_path / "moved", tmp_path / "added"
    for path in (old, moved, added):
        write_atomic(path, secrets.token())
    async with harness_factory([cred("svc", old)]) as h:
        await h.fence()
        await h.broker.engine.resync()  # the resync has its list of paths now
        fence = cred("fence", h.fence_path)
        await h.broker.reload(make_config(tmp_path, [cred("svc", moved), cred("new", added),
                                                     fence]))
        await h.fence()
        h.seen.clear()
        blind(h)
        write_atomic(moved, secrets.token() + "moved")
        write_atomic(added, secrets.token() + "added")
        write_atomic(old, secrets.token())  # no longer anybody's
        await h.fence()
        assert h.types("svc") == h.types("new") == []
        await h.broker.engine.resync()
        await h.fence()
        assert h.types("svc") == [REFRESHED]
        assert h.of("svc")[0].data.files[0].path == str(moved)
        assert h.types("new") == [REFRESHED]


def pretend_the_last_read_saw_this(h: Any, name: str) -> None:
    """Make the engine believe its last read of ``name`` saw the inode metadata there is now.

    A change under the same (size, mtime, ctime, inode) is what only the full re-hash can
    find (a write inside the filesystem's timestamp tick, a network filesystem), and ctime
    cannot be set from userspace: so the recorded side is moved instead of the file.
    """
    tracked = h.broker.engine._table[name]
    tracked.signatures = {path: stat_signature(path) for path in tracked.signatures}


async def test_only_the_full_rehash_finds_content_changed_under_the_same_signature(
    harness_factory: Any, tmp_path: Path, secrets: SecretRegistry
) -> None:
    paths = {name: tmp_path / name for name in ("plain", "two-files", "section", "same")}
    ini = "[default]\ntoken = {}\n[other]\ntoken = {}\n"
    write_atomic(paths["plain"], secrets.token())
    write_atomic(paths["two-files"], secrets.token())
    write_atomic(tmp_path / "two-files.key", secrets.token())
    write_atomic(paths["section"], ini.format(secrets.token(), secrets.token()), mode=0o600)
    write_atomic(paths["same"], secrets.token())
    creds = [
        cred("plain", paths["plain"]),
        {"name": "two-files",
         "files": {"token": str(paths["two-files"]), "key": str(tmp_path / "two-files.key")}},
        {"name": "section", "files": {"token": str(paths["section"])}, "format": "ini",
         "select": "ini-section:default"},
        cred("same", paths["same"]),
    ]
    async with harness_factory(creds) as h:
        await h.fence()
        h.seen.clear()
        blind(h)
        write_atomic(paths["plain"], secrets.token() + "p")
        write_atomic(tmp_path / "two-files.key", secrets.token() + "k")  # the second role
        write_atomic(paths["section"], ini.format(secrets.token() + "s", secrets.token()))
        for name in ("plain", "two-files", "section", "same"):
            pretend_the_last_read_saw_this(h, name)
        await h.broker.engine.resync()
        await h.fence()
        assert [e for e in h.seen if e.subject != "fence"] == []  # the stat saw nothing
        await h.broker.engine.resync(full=True)
        await h.fence()
        assert h.types("plain") == [REFRESHED]
        assert h.types("two-files") == [REFRESHED]
        assert h.types("section") == [REFRESHED]  # a selector: re-read and evaluated whole
        assert h.types("same") == []
        # Nothing left to find: a second full re-hash publishes nothing.
        h.seen.clear()
        await h.broker.engine.resync(full=True)
        await h.fence()
        assert [e.subject for e in h.seen if e.subject != "fence"] == []


async def test_a_file_two_credentials_share_is_stat_once_and_re_reads_both(
    harness_factory: Any, tmp_path: Path, secrets: SecretRegistry
) -> None:
    shared = tmp_path / "shared"
    write_atomic(shared, secrets.token())
    async with harness_factory([cred("one", shared), cred("two", shared)]) as h:
        await h.fence()
        h.seen.clear()
        blind(h)
        write_atomic(shared, secrets.token() + "new")
        await h.broker.engine.resync()
        await h.fence()
        assert h.types("one") == [REFRESHED]
        assert h.types("two") == [REFRESHED]
