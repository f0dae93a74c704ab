"""Start-up's read worker process: it finds what a thread finds, stays one pass ahead, and
a worker that fails leaves start-up to threads, never to a wrong or missing state."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from asyncinotify import Inotify, Mask

import broker.engine.readahead as readahead_module
from broker.core.fingerprint import Fingerprinter
from broker.core.state import State
from broker.engine.bus import Bus
from broker.engine.engine import Engine
from broker.engine.readahead import ReadWorker
from broker.engine.store import Store
from broker.engine.tuning import EngineTuning
from tests.conftest import make_config, write_atomic

FP = Fingerprinter(b"k" * 32)


def _kinds(tmp_path: Path) -> list[dict[str, Any]]:
    """A credential of every kind a read can find: whole, absent, a symlink (good and
    dangling), a directory, too large, empty, a pattern role, a fallback in use."""
    d = tmp_path / "creds"
    d.mkdir()
    write_atomic(d / "plain", "secret-value-plain")
    write_atomic(d / "target", "secret-value-target")
    (d / "link").symlink_to(d / "target")
    (d / "dangling").symlink_to(d / "nowhere")
    (d / "adir").mkdir()
    write_atomic(d / "large", "x" * 5000)
    write_atomic(d / "empty", "")
    (d / "sso").mkdir()
    for n in ("a", "b"):
        write_atomic(d / "sso" / f"{n}.json", f'{{"accessToken": "secret-sso-{n}"}}')
    write_atomic(d / "fallback", "secret-value-fallback")
    raw = [
        {"name": "plain", "files": {"token": str(d / "plain")}},
        {"name": "absent", "files": {"token": str(d / "absent")}},
        {"name": "link", "files": {"token": str(d / "link")}},
        {"name": "dangling", "files": {"token": str(d / "dangling")}},
        {"name": "adir", "files": {"token": str(d / "adir")}},
        {"name": "large", "files": {"token": str(d / "large")}, "max_size": 4096},
        {"name": "empty", "files": {"token": str(d / "empty")}},
        {"name": "two", "files": {"token": str(d / "plain"), "extra": str(d / "target")}},
        {"name": "pattern", "files": {"token": str(d / "sso" / "*.json")}, "format": "json"},
        {"name": "fallen", "files": {"token": str(d / "gone")},
         "fallback": {"files": {"token": str(d / "fallback")}}},
    ]
    return raw


async def _start_up(
    tmp_path: Path, raw: list[dict[str, Any]], *, worker: bool, state: str
) -> dict[str, dict[str, Any]]:
    config = make_config(tmp_path, raw, broker={"state_dir": str(tmp_path / state)})
    store = Store(config.broker.state_dir)
    store.prepare()
    engine = Engine(
        config.credentials, bus=Bus(), store=store, fingerprinter=FP,
        source="urn:credbroker:t", resync_interval=30.0,
        tuning=EngineTuning(max_batch=3, read_worker=worker),
    )
    async with anyio.create_task_group() as tg:
        await tg.start(engine.run)
        states = {s.credential: _comparable(s) for s in engine.read_states()}
        tg.cancel_scope.cancel()
    return states


def _comparable(state: State) -> dict[str, Any]:
    doc = state.to_dict()
    del doc["changed_at"]  # when it was evaluated
    return doc


def _workers() -> list[int]:
    """This process's children that are read workers."""
    found = []
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/children") as fh:
            for pid in fh.read().split():
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as cmd:
                        if b"read_worker" in cmd.read():
                            found.append(int(pid))
                except FileNotFoundError:
                    continue
    return found


@pytest.mark.anyio
async def test_the_worker_reads_what_a_thread_reads_and_is_gone_after_start_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    raw = _kinds(tmp_path)
    with caplog.at_level(logging.WARNING, logger="broker.engine"):
        by_worker = await _start_up(tmp_path, raw, worker=True, state="s1")
    by_thread = await _start_up(tmp_path, raw, worker=False, state="s2")
    assert by_worker == by_thread
    assert set(by_worker) == {r["name"] for r in raw}
    # Every kind of outcome was there to compare, not ten copies of one.
    statuses = {n: d["status"] for n, d in by_worker.items()}
    assert statuses["plain"] == statuses["link"] == statuses["pattern"] == "valid"
    assert statuses["absent"] == statuses["dangling"] == "missing"
    assert statuses["adir"] == statuses["large"] == statuses["empty"] == "invalid"
    assert "fallback" in by_worker["fallen"]["reason"]
    assert not [r for r in caplog.records if "read worker" in r.getMessage()]
    assert _workers() == []


@pytest.mark.anyio
@pytest.mark.parametrize("boot", [
    "import sys; sys.exit(3)",
    "import sys; sys.stdout.buffer.write(bytes([0, 0, 0, 3]) + b'bad'); sys.stdout.flush()",
    "import marshal, sys; b = marshal.dumps(('someone-else', 1));"
    " sys.stdout.buffer.write(len(b).to_bytes(4, 'big') + b); sys.stdout.flush()",
])
async def test_a_worker_that_fails_leaves_start_up_to_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    boot: str,
) -> None:
    raw = _kinds(tmp_path)
    expected = await _start_up(tmp_path, raw, worker=False, state="s1")
    monkeypatch.setattr(readahead_module, "_BOOT", boot)
    with caplog.at_level(logging.WARNING, logger="broker.engine"):
        got = await _start_up(tmp_path, raw, worker=True, state="s2")
    assert got == expected
    assert [r.getMessage() for r in caplog.records if "read worker" in r.getMessage()] == [
        "the read worker failed; start-up reads the rest in threads"
    ]
    assert _workers() == []


@pytest.mark.anyio
async def test_a_worker_that_cannot_start_leaves_start_up_to_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    raw = _kinds(tmp_path)
    expected = await _start_up(tmp_path, raw, worker=False, state="s1")
    monkeypatch.setattr(readahead_module.sys, "executable", str(tmp_path / "no-python"))
    with caplog.at_level(logging.WARNING, logger="broker.engine"):
        got = await _start_up(tmp_path, raw, worker=True, state="s2")
    assert got == expected
    assert any("cannot start the read worker" in r.getMessage() for r in caplog.records)


@pytest.mark.anyio
async def test_the_worker_is_one_answer_ahead_at_most(tmp_path: Path) -> None:
    # Each answer (512 KiB) is larger than the pipe and the event loop's read buffer
    # together: the worker reads the next request's file only once the last answer has
    # been taken. Its opens are counted by inotify.
    count = 6
    for i in range(count):
        write_atomic(tmp_path / f"f{i}", "s" * (512 << 10))
    requests = [([(str(tmp_path / f"f{i}"), 1 << 20)], []) for i in range(count)]
    send, opened = anyio.create_memory_object_stream[str](100)
    order: list[str] = []
    answers: list[tuple[bool, Any, Any]] = []
    with Inotify() as inotify:
        inotify.add_watch(tmp_path, Mask.OPEN)

        async def count_opens() -> None:
            async for event in inotify:
                if event.name is not None:
                    await send.send(str(event.name))

        async with ReadWorker.started() as worker, anyio.create_task_group() as tg:
            assert worker is not None
            tg.start_soon(count_opens)
            to_send, sent = anyio.create_memory_object_stream[Any](count)
            for request in requests:
                to_send.send_nowait(request)
            tg.start_soon(worker.feed, sent)
            for _ in range(count):
                with anyio.fail_after(10):
                    order.append(await opened.receive())
                # Given the time to run ahead, it does not.
                with anyio.move_on_after(0.2):
                    order.append(await opened.receive())
                    break
                raws, signatures, busy = await worker.answer(1)
                answers.append((raws[0][3] == b"s" * (512 << 10), signatures, busy))
            tg.cancel_scope.cancel()
    # (Asserted outside the task group: a failure reads as itself, not as a group.)
    assert order == [f"f{i}" for i in range(count)]
    assert answers == [(True, {}, set())] * count
    assert _workers() == []


def test_the_worker_imports_nothing_but_the_standard_library_and_its_two_modules() -> None:
    code = readahead_module._BOOT.replace(
        "main()", "print(sorted(m for m in sys.modules if m.startswith(('broker', 'pyd'))))"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code, readahead_module._PACKAGE_ROOT],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout
    assert out.strip() == str(sorted([
        "broker", "broker.engine", "broker.engine.rawread", "broker.engine.read_worker",
        "broker.engine.writers",
    ]))
