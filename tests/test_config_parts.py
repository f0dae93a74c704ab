"""The parts the config is built from: URL splitting and the careful small-file read."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import broker.config
from broker.aio.secretfile import SecretFileError, read_secret_file
from broker.core.errors import BrokerError
from broker.core.urls import MQTT_SCHEMES, UrlError, split_url

EXAMPLE = "mqtt://host[:port]"


def test_split_url_defaults_the_port_and_lowercases() -> None:
    parts = split_url("MQTTS://Broker.Example:8884/", MQTT_SCHEMES, EXAMPLE)
    assert (parts.scheme, parts.host, parts.port, parts.path) == ("mqtts", "broker.example",
                                                                  8884, "/")
    v6 = split_url("mqtt://[::1]", MQTT_SCHEMES, EXAMPLE)
    assert (v6.host, v6.port, v6.authority) == ("::1", 1883, "[::1]:1883")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mqtt://h ost", "whitespace"),
        ("mqtt://h:99999", "malformed url"),
        ("http://h", "unsupported url scheme"),
        ("mqtt://user:hunter2@h", "credentials in the url are not accepted; pass a file"),
        ("mqtt://", "the url has no host"),
    ],
)
def test_split_url_errors_never_repeat_the_url(url: str, message: str) -> None:
    with pytest.raises(UrlError) as info:
        split_url(url, MQTT_SCHEMES, EXAMPLE, credentials_hint="pass a file")
    assert message in str(info.value)
    assert "hunter2" not in str(info.value)
    assert isinstance(info.value, BrokerError) and isinstance(info.value, ValueError)


def test_read_secret_file(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_bytes(b"s3cret\n")
    path.chmod(0o640)
    read = read_secret_file(path)
    assert read.data == b"s3cret\n" and read.shared
    with pytest.raises(SecretFileError) as info:
        read_secret_file(path, refuse_mode=0o077)
    assert info.value.reason == "permissions" and "s3cret" not in str(info.value)
    with pytest.raises(SecretFileError) as info:
        read_secret_file(path, limit=3)
    assert info.value.reason == "too-large"


def test_read_secret_file_refuses_what_is_no_regular_file(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    # Nobody writes the FIFO: a blocking open would hang here.
    for path, reason in ((fifo, "not-regular"), (tmp_path, "directory"),
                         (tmp_path / "absent", "missing")):
        with pytest.raises(SecretFileError) as info:
            read_secret_file(path)
        assert info.value.reason == reason


def test_the_facade_exports_what_it_lists() -> None:
    for name in broker.config.__all__:
        assert getattr(broker.config, name) is not None
