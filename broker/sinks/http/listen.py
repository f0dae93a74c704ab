"""Where the API listens: a TCP address, or a unix socket created 0600 and removed after.

``http.listen`` is ``host:port`` or ``unix:/path``. A unix socket left by a crash is
replaced; one another process listens on, or a file that is not a socket, is not.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

import anyio
from aiohttp import web

from broker.config import ConfigError, HttpSettings


@dataclass(frozen=True, slots=True)
class Listening:
    """Where a started runner listens: ``url`` (``http://host:port`` or ``unix:/path``),
    the bound TCP ``port``, and the unix socket's ``(st_dev, st_ino)`` to remove it by."""

    url: str
    port: int | None = None
    unix_inode: tuple[int, int] | None = None


async def listen(runner: web.AppRunner, settings: HttpSettings) -> Listening:
    """Start a site for ``runner`` on ``settings.listen``; ``ConfigError`` if that fails."""
    unix_path = settings.unix_path
    if unix_path is not None:
        sock = await anyio.to_thread.run_sync(bind_unix, unix_path)
        st = os.stat(unix_path)
        await web.SockSite(runner, sock).start()
        return Listening(url=f"unix:{unix_path}", unix_inode=(st.st_dev, st.st_ino))
    host, port = settings.host, settings.port
    assert host is not None and port is not None
    site = web.TCPSite(runner, host, port, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        raise ConfigError([("http.listen", f"cannot listen on {settings.listen}: "
                            f"{exc.strerror or exc}")]) from None
    bound = int(runner.addresses[0][1])
    shown = f"[{host}]" if ":" in host else host
    return Listening(url=f"http://{shown}:{bound}", port=bound)


def remove_unix(path: Path, inode: tuple[int, int]) -> None:
    """Remove the socket at ``path`` if it is still the one created (``inode``)."""
    with contextlib.suppress(OSError):
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == inode:
            os.unlink(path)


def bind_unix(path: Path) -> socket.socket:
    """A listening unix socket at ``path``, created 0600 (never wider, not even briefly)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ConfigError([("http.listen", f"cannot use {path}: {exc.strerror}")]) from None
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError([("http.listen", f"{path} exists and is not a socket; "
                                "refusing to replace it")])
        if _unix_in_use(path):
            raise ConfigError([("http.listen", f"another process is listening on {path}")])
        os.unlink(path)  # a stale socket left by a crash
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # Linux gives the socket file the mode of the socket's inode at bind time, so this
        # closes the window in which a chmod after bind would leave it group/world-usable.
        os.fchmod(sock.fileno(), 0o600)
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(128)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ConfigError([("http.listen", f"cannot listen on {path}: {exc.strerror}")]) from None
    return sock


def _unix_in_use(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError as exc:
        return exc.errno not in (errno.ECONNREFUSED, errno.ENOENT)
    finally:
        probe.close()
    return True
