"""Published file metadata describes the bytes that were fingerprinted (issue 18).

A real writer process rewrites the file in place (truncate, write, close) with contents of
different lengths while the broker reads it; every published ``files[].size`` must be the
length of the content whose fingerprint was published, recomputed here with the broker's key.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from broker.config import parse_config
from broker.core.fingerprint import Fingerprinter
from broker.core.machine import observe
from broker.core.state import FileInfo, State, Status
from broker.engine.reader import FileRead, read_file
from broker.engine.store import KEY_FILE, Store
from tests.conftest import SecretRegistry, write_atomic

pytestmark = pytest.mark.anyio

CHANGES = 240

# Each version: open, truncate, a short gap (a writer's own work: formatting, a second
# syscall), write, close; then a pause of up to 2 ms. Spinning, not sleeping: a sleep is
# far coarser than the gap between a reader's fstat and its read.
_WRITER = r"""
import json, os, random, sys, time
path, versions = sys.argv[1], json.load(open(sys.argv[2]))
rng = random.Random(7)
def spin(seconds):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
for text in versions:
    fd = os.open(path, os.O_WRONLY)
    os.ftruncate(fd, 0)
    spin(rng.uniform(0, 0.0002))
    os.write(fd, text.encode())
    os.close(fd)
    time.sleep(rng.uniform(0, 0.002))
"""


async def test_size_matches_the_fingerprinted_content_under_a_racing_writer(
    harness_factory: Any, tmp_path: Path, secrets: SecretRegistry
) -> None:
    (tmp_path / "creds").mkdir()
    token = tmp_path / "creds" / "token"
    rng = random.Random(18)
    # Lengths from a few bytes to most of a page, so a stale size is a wrong one.
    versions = [secrets.token(f"v{i:04d}") + "x" * rng.randint(1, 3000) for i in range(CHANGES)]
    plan = tmp_path / "versions.json"
    plan.write_text(json.dumps(versions))
    initial = secrets.token()
    write_atomic(token, initial)
    checked: list[State] = []
    async with harness_factory([{"name": "svc", "files": {"token": str(token)}}]) as h:
        await h.fence()
        key = (tmp_path / "state" / KEY_FILE).read_bytes().strip()
        fp = Fingerprinter(key)
        lengths = {fp.fingerprint([("token", v.encode())]): len(v.encode()) for v in versions}
        lengths[fp.fingerprint([("token", b"")])] = 0  # caught between truncate and write
        lengths[fp.fingerprint([("token", initial.encode())])] = len(initial)
        h.seen.clear()
        writer = await anyio.open_process(
            [sys.executable, "-c", _WRITER, str(token), str(plan)]
        )
        async with writer:
            # POST check reads whatever is there at once, writer or not: the hardest reader.
            with anyio.fail_after(60):
                while writer.returncode is None:
                    checked.append(await h.broker.check("svc"))
                    await anyio.sleep(0)
                assert await writer.wait() == 0
        await h.fence()
        events = h.of("svc")
        final = await h.broker.check("svc")
    persisted = Store(tmp_path / "state").load().states["svc"]
    # The race was actually run, many times (how many depends on the machine's load).
    assert len(checked) >= 10, len(checked)
    for state in [*(e.data for e in events), *checked, final, persisted]:
        assert state.fingerprint in lengths, "a version no writer completed"
        assert state.files[0].size == lengths[state.fingerprint], state.files[0]
    assert all(e.type == "credentials.refreshed" for e in events), [e.type for e in events]
    assert final.fingerprint == fp.fingerprint([("token", versions[-1].encode())])
    assert final == h.broker.state("svc") == events[-1].data
    # As persisted (mtime kept to the millisecond, as the state document has it).
    assert persisted.fingerprint == final.fingerprint
    assert [(f.size, f.mode, f.present) for f in persisted.files] == [
        (f.size, f.mode, f.present) for f in final.files
    ]


def test_read_file_metadata_is_that_of_the_read_descriptor(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_bytes(b"abc")
    path.chmod(0o640)
    read = read_file("token", str(path), 1 << 20)
    st = path.stat()
    assert read.content == b"abc"
    assert (read.info.size, read.info.mtime, read.info.mode) == (3, st.st_mtime, 0o640)
    assert read.fault is None and read.problem is None


def test_a_fault_read_is_only_unreadable_to_a_one_shot_reader(tmp_path: Path) -> None:
    # `credbroker check` has no retry: it says "cannot read it now"; the engine never gets here.
    config = parse_config({
        "broker": {"state_dir": str(tmp_path / "s")},
        "credentials": [{"name": "svc", "files": {"token": str(tmp_path / "t")}}],
    })
    info = FileInfo(role="token", path=str(tmp_path / "t"), present=False)
    fault = FileRead(info, fault="cannot read it now: Too many open files")
    obs = observe(config.credentials[0], [fault], Fingerprinter(b"k" * 16))
    assert obs.outcome is Status.MISSING
    assert [(p.code, p.message) for p in obs.problems] == [
        ("file-unreadable", "cannot read it now: Too many open files")
    ]


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, (1 << 20) + 3, 3 * (1 << 20)])
def test_every_byte_is_read_whatever_the_size(tmp_path: Path, size: int) -> None:
    # The first read asks for the fstat size plus one byte and stops when it ends there;
    # a larger file goes on in 1 MiB chunks.
    path = tmp_path / "token"
    data = random.Random(size).randbytes(size)
    path.write_bytes(data)
    read = read_file("token", str(path), 4 << 20)
    assert read.problem is None and read.fault is None
    assert read.content == data and read.info.size == size


def test_a_file_whose_size_is_no_byte_count_is_read_whole() -> None:
    # /proc says 0 bytes for a file that has some: read on until the end, size as read.
    expected = Path("/proc/self/cmdline").read_bytes()
    assert Path("/proc/self/cmdline").stat().st_size == 0 and expected
    read = read_file("cmdline", "/proc/self/cmdline", 1 << 20)
    assert read.content == expected and read.info.size == len(expected)


def test_a_symlink_is_followed_and_said_to_be_one(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (real / "token").write_bytes(b"abc")
    (tmp_path / "link").symlink_to(real / "token")
    (tmp_path / "chain").symlink_to(tmp_path / "link")
    (tmp_path / "dir").symlink_to(real)  # a symlinked directory, a plain file in it
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    cases = {"real/token": False, "link": True, "chain": True, "dir/token": False}
    for name, is_symlink in cases.items():
        read = read_file("token", str(tmp_path / name), 1 << 20)
        assert (read.content, read.is_symlink, read.problem) == (b"abc", is_symlink, None), name
    dangling = read_file("token", str(tmp_path / "dangling"), 1 << 20)
    assert dangling.problem is not None and dangling.problem.code == "file-missing"
    assert "symlink to nothing" in dangling.problem.message
    loop = read_file("token", str(tmp_path / "loop"), 1 << 20)
    assert loop.problem is not None and loop.problem.code == "symlink-loop"
