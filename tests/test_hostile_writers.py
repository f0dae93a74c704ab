"""Writers and environments that used to leave new content unpublished (issue 10, part 2).

Real files, real inotify, real programs (``ln``, ``cp -l``, ``mv -T``, ``rsync``, ``sed -i``,
``vim -es``) and a real second process for the held-open writer. Every round asserts the
exact events: one ``refreshed`` for the final content, nothing before or after it, and it
arrives through inotify (the resync interval is left at 30 s, far beyond every timeout).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import Process

from broker.core.state import Status
from tests.conftest import Harness, SecretRegistry, write_atomic
from tests.test_http import serving

pytestmark = pytest.mark.anyio

REFRESHED = "credentials.refreshed"
ROUNDS = 20

# A second process that holds the file open for its whole life and rewrites it in place for
# each line it reads: "seek" (seek(0); write; truncate; flush) or "pwrite" (pwrite; ftruncate).
HELD_WRITER = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
f = os.fdopen(fd, "r+b", buffering=0)
print("open", flush=True)
for line in sys.stdin:
    mode, _, content = line.rstrip("\n").partition(" ")
    data = content.encode()
    if mode == "seek":
        f.seek(0); f.write(data); f.truncate(); f.flush()
    else:
        os.pwrite(fd, data, 0); os.ftruncate(fd, len(data))
    print("done", flush=True)
"""


def cred(path: Path | str, **extra: Any) -> dict[str, Any]:
    return {"name": "svc", "files": {"token": str(path)}, **extra}


class HeldWriter:
    def __init__(self, process: Process) -> None:
        self.process = process
        self._buffer = b""

    async def _line(self) -> str:
        assert self.process.stdout is not None
        with anyio.fail_after(5):
            while b"\n" not in self._buffer:
                self._buffer += await self.process.stdout.receive()
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()

    async def rewrite(self, content: str, mode: str = "seek") -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send(f"{mode} {content}\n".encode())
        assert await self._line() == "done"


@asynccontextmanager
async def held_writer(path: Path) -> AsyncIterator[HeldWriter]:
    process = await anyio.open_process([sys.executable, "-c", HELD_WRITER, str(path)])
    writer = HeldWriter(process)
    try:
        assert await writer._line() == "open"
        yield writer
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def expect_refresh(h: Harness, size: int, generation: int, timeout: float = 3.0) -> Any:
    """The next event of svc is the refreshed for content of ``size`` bytes, generation
    ``generation`` (nothing transient before it)."""
    event = await h.next("svc", timeout=timeout)
    assert (event.type, event.data.generation, event.data.files[0].size) == (
        REFRESHED,
        generation,
        size,
    ), (event.type, event.data.generation, event.data.reason)
    return event


async def assert_only_refreshes(h: Harness, count: int) -> None:
    await h.fence()
    assert h.types("svc") == [REFRESHED] * count


@pytest.fixture
def token_path(tmp_path: Path) -> Path:
    (tmp_path / "creds").mkdir()
    return tmp_path / "creds" / "token"


# -- held-open writers ------------------------------------------------------------------------


async def test_held_open_writer_rewriting_in_place_is_published_each_time(
    harness_factory: Any,
    token_path: Path,
    secrets: SecretRegistry,
) -> None:
    write_atomic(token_path, secrets.token())
    async with harness_factory([cred(token_path)]) as h, held_writer(token_path) as writer:
        # A shorter quiet period keeps 20 rounds quick; the rule is the same.
        h.broker.engine.tuning = replace(h.broker.engine.tuning, writer_quiet=0.08)
        await h.fence()
        h.seen.clear()
        for i in range(ROUNDS):
            content = secrets.token() + "x" * i
            await writer.rewrite(content, "seek" if i % 2 else "pwrite")
            event = await expect_refresh(h, len(content), 2 + i)
            assert "writer-active" in [p.code for p in event.data.problems]
            assert event.data.status is Status.VALID
            # POST check agrees, and says a writer still holds the file.
            checked = await h.broker.check("svc")
            assert checked.generation == 2 + i
            assert "writer-active" in [p.code for p in checked.problems]
        await assert_only_refreshes(h, ROUNDS)


async def test_check_right_after_an_in_place_rewrite_is_never_stale(
    harness_factory: Any, token_path: Path, secrets: SecretRegistry
) -> None:
    write_atomic(token_path, secrets.token())
    async with harness_factory([cred(token_path)]) as h, held_writer(token_path) as writer:
        await h.fence()
        h.seen.clear()
        for i in range(ROUNDS):
            content = secrets.token() + "y" * i
            await writer.rewrite(content)
            # Before the writer loop could publish: what the file says now, flagged, with the
            # generation it gets once published (not yet published itself).
            checked = await h.broker.check("svc")
            published = h.broker.state("svc").generation
            assert checked.files[0].size == len(content)
            assert checked.generation in (published, published + 1)
            assert "writer-active" in [p.code for p in checked.problems]
        # The last content holds still: it is published, once; nothing else is.
        with anyio.fail_after(5):
            while h.broker.state("svc").files[0].size != len(content):
                await h.next("svc")
        await h.fence()
        assert set(h.types("svc")) == {REFRESHED}
        sizes = [e.data.files[0].size for e in h.of("svc")]
        assert sizes[-1] == len(content) and len(sizes) == len(set(sizes))


async def test_post_check_over_http_is_never_stale(
    harness_factory: Any, token_path: Path, secrets: SecretRegistry
) -> None:
    write_atomic(token_path, secrets.token())
    async with serving(harness_factory, [cred(token_path)], secrets) as (h, _api, client):
        async with held_writer(token_path) as writer:
            content = secrets.token() + "http"
            await writer.rewrite(content)
            reply = await client.call("POST", "/v1/credentials/{name}/check", name="svc")
            state = reply.json()
            assert (state["generation"], state["files"][0]["size"]) == (2, len(content))
            assert "writer-active" in [p["code"] for p in state["problems"]]
        # The writer is gone: the next check says so, and nothing was published for it.
        reply = await client.call("POST", "/v1/credentials/{name}/check", name="svc")
        assert reply.json()["generation"] == 2
        assert "writer-active" not in [p["code"] for p in reply.json()["problems"]]
        await h.fence()
        assert h.types("svc") == [REFRESHED, REFRESHED]


async def test_held_open_writer_across_a_restart(
    harness_factory: Any, token_path: Path, secrets: SecretRegistry
) -> None:
    write_atomic(token_path, secrets.token())
    async with harness_factory([cred(token_path)]) as h:
        await h.fence()
        assert h.broker.state("svc").generation == 1
    async with held_writer(token_path) as writer:
        content = secrets.token() + "while-stopped"
        await writer.rewrite(content)
        async with harness_factory([cred(token_path)]) as h:
            # Found by the start-up scan while the writer holds it: published once it held
            # still, not left stale until a close that never comes.
            await expect_refresh(h, len(content), 2)
            newer = secrets.token() + "after-restart"
            await writer.rewrite(newer)
            await expect_refresh(h, len(newer), 3)
            await assert_only_refreshes(h, 2)
        # The writer lets go: the writer-active problem goes too, without an event.
        writer.process.kill()
        await writer.process.wait()
        async with harness_factory([cred(token_path)]) as h:
            checked = await h.broker.check("svc")
            assert checked.generation == 3
            assert "writer-active" not in [p.code for p in checked.problems]
            await h.fence()
            assert h.types("svc") == []


async def test_a_held_open_empty_file_is_not_published_as_invalid_at_once(
    harness_factory: Any, token_path: Path, secrets: SecretRegistry
) -> None:
    # `cmd > file` holding the empty file while the command works: unparsable content a
    # writer holds must hold still much longer than valid content before it counts.
    write_atomic(token_path, secrets.token())
    async with harness_factory([cred(token_path)]) as h, held_writer(token_path) as writer:
        await h.fence()
        h.seen.clear()
        await writer.rewrite("")
        with anyio.move_on_after(4 * h.broker.engine.tuning.writer_quiet):
            await h.next("svc")
        assert h.types("svc") == []
        content = secrets.token()
        await writer.rewrite(content)
        await expect_refresh(h, len(content), 2)


# -- link(2) ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        ["sh", "-c", 'rm "$2" && ln "$1" "$2"', "sh"],
        ["ln", "-f"],
        ["cp", "-l", "-f"],
    ],
    ids=["rm-then-ln", "ln-f", "cp-l"],
)
async def test_a_file_linked_into_place_is_published_at_once(
    harness_factory: Any, token_path: Path, secrets: SecretRegistry, command: list[str]
) -> None:
    write_atomic(token_path, secrets.token())
    staging = token_path.parent.parent / "staging"
    staging.mkdir()
    async with harness_factory([cred(token_path)]) as h:
        await h.fence()
        h.seen.clear()
        for i in range(ROUNDS):
            source = staging / f"new-{i}"
            content = secrets.token() + "z" * i
            write_atomic(source, content)
            subprocess.run([*command, str(source), str(token_path)], check=True)
            await expect_refresh(h, len(content), 2 + i)
        await assert_only_refreshes(h, ROUNDS)
        # Nothing left believed "being written": a full re-hash finds nothing new to say.
        assert h.broker.engine.watcher.writing == set()
        await h.broker.engine.resync(full=True)
        await assert_only_refreshes(h, ROUNDS)


# -- symlinked directories ----------------------------------------------------------------------


async def test_symlinked_directory_swapped_with_mv_t(
    harness_factory: Any, tmp_path: Path, secrets: SecretRegistry
) -> None:
    root = tmp_path / "app"
    (root / "v0").mkdir(parents=True)
    write_atomic(root / "v0" / "token", secrets.token())
    os.symlink("v0", root / "current")
    async with harness_factory([cred(root / "current" / "token")]) as h:
        await h.fence()
        h.seen.clear()
        generation = 1
        for i in range(1, ROUNDS // 2 + 1):
            # A new version directory, then the link swapped atomically onto it ...
            (root / f"v{i}").mkdir()
            content = secrets.token() + "v" * i
            write_atomic(root / f"v{i}" / "token", content)
            os.symlink(f"v{i}", root / "current.new")
            subprocess.run(["mv", "-T", str(root / "current.new"), str(root / "current")],
                           check=True)
            generation += 1
            await expect_refresh(h, len(content), generation)
            shutil.rmtree(root / f"v{i - 1}")
            # ... and a rotation inside the new target is seen at once too.
            content = secrets.token() + "w" * i
            write_atomic(root / f"v{i}" / "token", content)
            generation += 1
            await expect_refresh(h, len(content), generation)
        await assert_only_refreshes(h, ROUNDS)


async def test_symlink_chain_in_the_middle_of_the_path(
    harness_factory: Any, tmp_path: Path, secrets: SecretRegistry
) -> None:
    # etc/app -> ../opt/app, and opt/app/live -> releases/r1: two links on one path.
    (tmp_path / "etc").mkdir()
    releases = tmp_path / "opt" / "app" / "releases"
    (releases / "r1").mkdir(parents=True)
    write_atomic(releases / "r1" / "token", secrets.token())
    os.symlink("../opt/app", tmp_path / "etc" / "app")
    os.symlink("releases/r1", tmp_path / "opt" / "app" / "live")
    path = tmp_path / "etc" / "app" / "live" / "token"
    async with harness_factory([cred(path)]) as h:
        await h.fence()
        h.seen.clear()
        (releases / "r2").mkdir()
        content = secrets.token() + "r2"
        write_atomic(releases / "r2" / "token", content)
        os.symlink("releases/r2", tmp_path / "opt" / "app" / "live.new")
        os.replace(tmp_path / "opt" / "app" / "live.new", tmp_path / "opt" / "app" / "live")
        await expect_refresh(h, len(content), 2)
        content = secrets.token() + "r2-again"
        write_atomic(releases / "r2" / "token", content)
        await expect_refresh(h, len(content), 3)
        await assert_only_refreshes(h, 2)


# -- inotify queue overflow ---------------------------------------------------------------------

FLOOD = r"""
import os, sys
d, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    p = os.path.join(d, f"flood-{os.getpid()}-{i % 50}")
    open(p, "w").close()
    os.unlink(p)
"""


def flood(directory: Path, processes: int, each: int) -> None:
    """``processes`` processes creating and deleting files in ``directory`` (3 events per
    file), run to completion."""
    procs = [
        subprocess.Popen([sys.executable, "-c", FLOOD, str(directory), str(each)])
        for _ in range(processes)
    ]
    for proc in procs:
        assert proc.wait(timeout=60) == 0


async def test_a_queue_overflow_that_swallows_the_close_write(
    harness_factory: Any, token_path: Path, secrets: SecretRegistry
) -> None:
    write_atomic(token_path, secrets.token())
    async with harness_factory([cred(token_path)]) as h:
        await h.fence()
        h.seen.clear()
        watcher = h.broker.engine.watcher
        for i in range(12):
            overflows = watcher.overflows
            content = secrets.token() + "o" * i
            # Blocking calls on purpose: the broker shares this event loop, so it reads no
            # event until this block ends, and the kernel queue (16,384) overflows between
            # the writer's first write and its close.
            with open(token_path, "w") as fh:
                fh.write(content[:5])
                fh.flush()
                flood(token_path.parent, 6, 1000)  # 18,000 events
                fh.write(content[5:])
            await expect_refresh(h, len(content), 2 + i)
            assert watcher.overflows == overflows + 1
        await assert_only_refreshes(h, 12)


async def test_flooders_running_while_a_writer_rotates(
    harness_factory: Any, token_path: Path, secrets: SecretRegistry
) -> None:
    # Six unprivileged processes flood the credential's directory the whole time while a
    # real `cmd > file` writer rotates it 12 times: every rotation is published, once.
    write_atomic(token_path, secrets.token())
    async with harness_factory([cred(token_path)], broker={"resync_interval": "1s"}) as h:
        await h.fence()
        h.seen.clear()
        procs = [
            subprocess.Popen([sys.executable, "-c", FLOOD, str(token_path.parent), "100000000"])
            for _ in range(6)
        ]
        try:
            for i in range(12):
                content = secrets.token() + "f" * i
                await anyio.run_process(
                    ["sh", "-c", 'printf %s "$2" > "$1"', "sh", str(token_path), content]
                )
                # At most one resync late, whatever the flood did to the queue.
                await expect_refresh(h, len(content), 2 + i, timeout=3.0)
            # The flood is reported once, as a problem: no event, the status unchanged.
            with anyio.fail_after(5):
                while "noisy-directory" not in [
                    p.code for p in h.broker.state("svc").problems
                ]:
                    await anyio.sleep(0.1)
        finally:
            for proc in procs:
                proc.kill()
                proc.wait()
        state = h.broker.state("svc")
        assert state.status is Status.VALID and state.generation == 13
        noisy = [p for p in state.problems if p.code == "noisy-directory"]
        assert noisy[0].remedy is not None and "own directory" in noisy[0].remedy
        await assert_only_refreshes(h, 12)
        # Calm again: the annotation goes, still without an event.
        with anyio.fail_after(5):
            while "noisy-directory" in [p.code for p in h.broker.state("svc").problems]:
                await anyio.sleep(0.1)
        await assert_only_refreshes(h, 12)


# -- unrelated names ----------------------------------------------------------------------------


async def test_unrelated_names_are_dropped_before_any_work(
    harness_factory: Any, token_path: Path, secrets: SecretRegistry
) -> None:
    write_atomic(token_path, secrets.token())
    async with harness_factory([cred(token_path)]) as h:
        await h.fence()
        h.seen.clear()
        engine = h.broker.engine
        before = engine.watcher.unrelated_total
        sequence = engine.sequence
        fds = [os.open(token_path.parent / f"app-{i}.log", os.O_WRONLY | os.O_CREAT, 0o600)
               for i in range(4)]
        try:
            for i in range(4000):
                os.pwrite(fds[i % 4], b"line\n", 0)
        finally:
            for fd in fds:
                os.close(fd)
        await h.fence()
        # Every one of those events was counted by the name filter and went no further.
        assert engine.watcher.unrelated_total - before >= 4000
        assert engine.sequence == sequence + 1  # the fence's event only
        assert h.types("svc") == []


# -- other real writers ----------------------------------------------------------------------


@pytest.mark.parametrize("tool", ["rsync", "sed -i", "vim -es"])
async def test_real_editing_tools(
    harness_factory: Any,
    token_path: Path,
    tmp_path: Path,
    secrets: SecretRegistry,
    tool: str,
) -> None:
    if shutil.which(tool.split()[0]) is None:
        pytest.skip(f"{tool} is not installed (.ci/apt-packages installs it)")
    write_atomic(token_path, secrets.token())
    source = tmp_path / "source"
    async with harness_factory([cred(token_path)]) as h:
        await h.fence()
        h.seen.clear()
        for i in range(ROUNDS):
            if tool == "rsync":
                # A temporary name, then a rename: the temporary name is filtered out. Sizes
                # differ: rsync skips a file of the same size and mtime second.
                write_atomic(source, secrets.token() + "r" * (i + 1))
                subprocess.run(["rsync", str(source), str(token_path)], check=True)
            elif tool == "sed -i":
                subprocess.run(["sed", "-i", "s/$/s/", str(token_path)], check=True)
            else:
                subprocess.run(
                    ["vim", "-es", "-u", "NONE", "-c", "s/$/v/", "-c", "wq", str(token_path)],
                    check=True,
                )
            await expect_refresh(h, os.path.getsize(token_path), 2 + i)
        await assert_only_refreshes(h, ROUNDS)
