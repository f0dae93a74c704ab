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
