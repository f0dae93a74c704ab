"""Every way a credential file gets written yields exactly one event for the final content.

Real files in tmp_path, real inotify, real subprocesses for the shell patterns.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import anyio
import pytest

from broker.core.state import Status
from tests.conftest import Harness, SecretRegistry, write_atomic

pytestmark = pytest.mark.anyio

REFRESHED = "credentials.refreshed"


def cred(path: Path, **extra: Any) -> dict[str, Any]:
    return {"name": "svc", "files": {"token": str(path)}, **extra}


@pytest.fixture
def token_path(tmp_path: Path) -> Path:
    (tmp_path / "creds").mkdir()
    return tmp_path / "creds" / "token"


async def start_valid(
    harness_factory: Any, token_path: Path, secrets: SecretRegistry, **kw: Any
) -> Any:
    write_atomic(token_path, secrets.token())
    return harness_factory([cred(token_path)], **kw)


async def assert_one_refresh(h: Harness, expected_content_size: int) -> None:
    await h.fence()
    events = h.of("svc")
    assert [e.type for e in events] == [REFRESHED], [e.type for e in events]
    state = events[0].data
    assert state.generation == 2
    assert state.status is Status.VALID
    assert state.files[0].size == expected_content_size
    assert h.broker.state("svc") == state


async def test_first_sight_is_one_refreshed(
    harness_factory: Any, token_path: Path, secrets: SecretRegistry
) -> None:
    async with await start_valid(harness_factory, token_path, secrets) as h:
        await h.fence()
        events = h.of("svc")
        assert [e.type for e in events] == [REFRESHED]
        assert events[0].data.generation == 1
        assert events[0].data.reason == "first seen"


async def test_atomic_rename(
    harness_factory: Any, token_path: Path, secrets: SecretRegistry
) -> None:
    async with await start_valid(harness_factory, token_path, secrets) as h:
        await h.fence()
        h.seen.clear()
        new = secrets.token()
        write_atomic(token_path, new)
        await assert_one_refresh(h, len(new))


async def test_shell_redirect_with_a_one_second_gap(
    harness_factory: Any, token_path: Path, secrets: SecretRegistry
) -> None:
    # `cmd > file`: the shell truncates at once, the command writes a second later. A fast
    # resync runs during the gap and must not publish the empty file.
    write_atomic(token_path, secrets.token())
    async with harness_factory([cred(token_path)], broker={"resync_interval": "0.2s"}) as h:
        await h.fence()
        h.seen.clear()
        new = secrets.token()
        result = await anyio.run_process(
            ["sh", "-c", 'exec > "$1"; sleep 1; printf %s "$2"', "sh", str(token_path), new]
        )
        assert result.returncode == 0
        await assert_one_refresh(h, len(new))


async def test_chunked_writes_through_one_open(
    harness_factory: Any, token_path: Path, secrets: SecretRegistry
) -> None:
    write_atomic(token_path, secrets.token())
    async with harness_factory([cred(token_path)], broker={"resync_interval": "0.1s"}) as h:
        await h.fence()
        h.seen.clear()
        new = secrets.token() * 8
        with open(token_path, "w") as fh:
            for i in range(0, len(new), 37):
                fh.write(new[i : i + 37])
                fh.flush()
                await anyio.sleep(0.05)  # the writer is slow; resyncs run in between
        await assert_one_refresh(h, len(new))


async def test_kubernetes_data_symlink_swap(
    harness_factory: Any, tmp_path: Path, secrets: SecretRegistry
) -> None:
    # kubelet's AtomicWriter: files are symlinks through ..data to a timestamped directory;
    # an update writes a new directory and renames a new ..data symlink over the old one.
    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    old_dir = sa / "..2026_11_25_06_00_00.1"
    old_dir.mkdir()
    (old_dir / "token").write_text(secrets.token())
    (old_dir / "namespace").write_text("default")
    os.symlink(old_dir.name, sa / "..data")
    for name in ("token", "namespace"):
        os.symlink(f"..data/{name}", sa / name)
    creds = [
        {"name": "svc", "files": {"token": str(sa / "token"), "namespace": str(sa / "namespace")}}
    ]
    async with harness_factory(creds) as h:
        await h.fence()
        assert h.types("svc") == [REFRESHED]
        h.seen.clear()

        new_dir = sa / "..2026_11_25_07_00_00.2"
        new_dir.mkdir()
        new = secrets.token()
        (new_dir / "token").write_text(new)
        (new_dir / "namespace").write_text("default")
        os.symlink(new_dir.name, sa / "..data_tmp")
        os.rename(sa / "..data_tmp", sa / "..data")
        shutil.rmtree(old_dir)
        await assert_one_refresh(h, len(new))

        # And again, now that the watched target directory is the new one.
        h.seen.clear()
        third_dir = sa / "..2026_11_25_08_00_00.3"
        third_dir.mkdir()
        third = secrets.token() + "x"
        (third_dir / "token").write_text(third)
        (third_dir / "namespace").write_text("default")
        os.symlink(third_dir.name, sa / "..data_tmp")
        os.rename(sa / "..data_tmp", sa / "..data")
        shutil.rmtree(new_dir)
        await h.fence()
        assert h.types("svc") == [REFRESHED]
        assert h.of("svc")[0].data.generation == 3


async def test_delete_and_recreate(
    harness_factory: Any, token_path: Path, secrets: SecretRegistry
) -> None:
    async with await start_valid(harness_factory, token_path, secrets) as h:
        await h.fence()
        h.seen.clear()
        os.unlink(token_path)
        # The tool that recreates it takes a moment (part of the pattern, not a wait for
        # the broker): the deletion has been seen by then and must not be published.
        await anyio.sleep(0.3)
        new = secrets.token()
        token_path.write_text(new)
        await assert_one_refresh(h, len(new))


async def test_delete_is_missing_after_the_grace(
    harness_factory: Any, token_path: Path, secrets: SecretRegistry
) -> None:
    async with await start_valid(harness_factory, token_path, secrets) as h:
        await h.fence()
        h.seen.clear()
        os.unlink(token_path)
        event = await h.next("svc")
        assert event.type == "credentials.missing"
        assert event.data.generation == 1
        assert [p.code for p in event.data.problems] == ["file-missing"]
        # Coming back with the same bytes is a refresh (consumers were told it was gone),
        # not a new generation.
        h.seen.clear()
        write_atomic(token_path, "restored-" + secrets.token())
        event = await h.next("svc")
        assert event.type == REFRESHED
        assert event.data.generation == 2


async def test_directory_that_appears_later(
    harness_factory: Any, tmp_path: Path, secrets: SecretRegistry
) -> None:
    path = tmp_path / "later" / "a" / "b" / "token"
    async with harness_factory([cred(path)]) as h:
        await h.fence()
        assert h.types("svc") == ["credentials.missing"]
        h.seen.clear()
        path.parent.mkdir(parents=True)
        new = secrets.token()
        path.write_text(new)
        await h.fence()
        assert h.types("svc") == [REFRESHED]
        assert h.of("svc")[0].data.generation == 1
        # The watch moved down: a later change is seen by inotify, not by a resync.
        h.seen.clear()
        write_atomic(path, secrets.token())
        event = await h.next("svc", timeout=2)
        assert event.type == REFRESHED


async def test_directory_removed_and_recreated(
    harness_factory: Any, tmp_path: Path, secrets: SecretRegistry
) -> None:
    path = tmp_path / "gone" / "token"
    path.parent.mkdir()
    write_atomic(path, secrets.token())
    async with harness_factory([cred(path)]) as h:
        await h.fence()
        h.seen.clear()
        shutil.rmtree(path.parent)
        assert (await h.next("svc")).type == "credentials.missing"
        path.parent.mkdir()
        write_atomic(path, secrets.token())
        assert (await h.next("svc")).type == REFRESHED


async def test_touch_and_identical_rewrite_are_silent(
    harness_factory: Any, token_path: Path, secrets: SecretRegistry
) -> None:
    content = secrets.token()
    write_atomic(token_path, content)
    async with harness_factory([cred(token_path)]) as h:
        await h.fence()
        h.seen.clear()
        subprocess.run(["touch", str(token_path)], check=True)
        token_path.write_text(content)
        write_atomic(token_path, content)
        os.chmod(token_path, 0o600)
        await h.fence()
        assert h.types("svc") == []
        assert h.broker.state("svc").generation == 1


async def test_resync_finds_a_change_inotify_missed(
    harness_factory: Any, token_path: Path, secrets: SecretRegistry
) -> None:
    write_atomic(token_path, secrets.token())
    async with harness_factory([cred(token_path)], broker={"resync_interval": "0.2s"}) as h:
        await h.fence()
        h.seen.clear()
        # Stop watching this path, as on a filesystem without inotify, then change it.
        h.broker.engine.watcher.watch([h.broker.engine.spec("fence").files["token"].as_posix()])
        new = secrets.token()
        write_atomic(token_path, new)
        event = await h.next("svc")
        assert event.type == REFRESHED
        assert event.data.files[0].size == len(new)


async def test_file_open_for_writing_at_start_waits_for_its_close(
    harness_factory: Any, token_path: Path, secrets: SecretRegistry
) -> None:
    # Found by the start-up scan, not by an event: only the open-writer check can tell that
    # this half-written JSON is not the final content.
    value = secrets.token()
    with open(token_path, "w") as writer:
        writer.write('{"token": "' + value[:5])
        writer.flush()
        async with harness_factory([cred(token_path, format="json")]) as h:
            await h.fence()
            assert h.types("svc") == []
            writer.write(value[5:] + '"}')
            writer.close()
            await h.fence()
            assert h.types("svc") == [REFRESHED]
            assert h.broker.state("svc").status is Status.VALID
