"""The ``[broker]``, ``[mqtt]`` and ``[http]`` tables: who this broker is and where it talks.

MQTT's rules for text (what a server refuses in a topic, a user name or a client id) are
MQTT's, not the config's: they are imported in :func:`_check_mqtt_text`, the config's one
import of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import Field, ValidationInfo, field_validator, model_validator

from broker.config.context import context_of
from broker.config.errors import Located, errors_at, show
from broker.config.fields import (
    Buffer,
    Duration,
    ExpandedPath,
    Model,
    PositiveDuration,
    StrictBoolField,
)
from broker.config.scalars import (
    check_host,
    check_ident,
    default_host_id,
    is_loopback,
    split_listen,
    split_mqtt_url,
)

__all__ = ["BrokerSettings", "HttpSettings", "MqttSettings"]

#: Leaves room under MQTT's 65,535-byte topic limit for host_id, credential and event type.
_TOPIC_PREFIX_MAX = 1024


class BrokerSettings(Model):
    """``[broker]``: identity and housekeeping of this broker."""

    host_id: str = Field(default_factory=default_host_id)
    state_dir: ExpandedPath
    resync_interval: PositiveDuration = 30.0
    # A change that leaves a credential invalid or missing waits this long for a further
    # change that resolves it (a key landing after its certificate); 0 publishes at once.
    settle: Duration = 1.0
    fingerprint_key_file: ExpandedPath | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Group/other access to a credential file: reported always; `invalid` when strict.
    strict_permissions: StrictBoolField = False

    @model_validator(mode="before")
    @classmethod
    def _default_state_dir(cls, data: Any, info: ValidationInfo) -> Any:
        # A template rather than a computed path, so a missing HOME is reported at
        # broker.state_dir by the normal path expansion.
        if isinstance(data, Mapping) and "state_dir" not in data:
            xdg = context_of(info).env.get("XDG_STATE_HOME", "")
            # XDG says relative values are invalid and must be ignored.
            template = (
                "${XDG_STATE_HOME}/credbroker"
                if xdg.startswith("/")
                else ("~/.local/state/credbroker")
            )
            data = {**data, "state_dir": template}
        return data

    @field_validator("host_id")
    @classmethod
    def _check_host_id(cls, value: str) -> str:
        return check_ident(value, "host_id")


def _check_mqtt_text(value: str) -> None:
    from broker.core.topics import mqtt_text_problem

    problem = mqtt_text_problem(value)
    if problem is not None:
        raise ValueError(f"contains a {problem}, which MQTT servers refuse")
    if len(value.encode()) > 65535:
        raise ValueError("is longer than 65535 bytes (the MQTT limit)")


class MqttSettings(Model):
    """``[mqtt]``: where to publish. The section being absent turns MQTT off."""

    url: str
    topic_prefix: str = "credbroker"
    username: str | None = None
    password_file: ExpandedPath | None = None
    ca_file: ExpandedPath | None = None
    cert_file: ExpandedPath | None = None
    key_file: ExpandedPath | None = None
    client_id: str | None = None
    buffer: Buffer = 10000
    allow_insecure: StrictBoolField = False
    keepalive: PositiveDuration = 30.0

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        split_mqtt_url(value)
        return value

    @field_validator("topic_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        if not value:
            raise ValueError("must not be empty")
        if any(c in value for c in "+#\0"):
            raise ValueError('must not contain "+", "#" or NUL (they are MQTT wildcards)')
        if value.startswith("/") or value.endswith("/"):
            raise ValueError('must not start or end with "/"')
        if "//" in value:
            raise ValueError('must not contain an empty level ("//")')
        if value.startswith("$"):
            raise ValueError('must not start with "$" (reserved for the MQTT server)')
        if len(value.encode()) > _TOPIC_PREFIX_MAX:
            raise ValueError(f"must be at most {_TOPIC_PREFIX_MAX} bytes")
        _check_mqtt_text(value)
        return value

    @field_validator("username", "client_id")
    @classmethod
    def _check_text(cls, value: str | None) -> str | None:
        if value is not None and (not value or "\0" in value):
            raise ValueError("must be non-empty and contain no NUL")
        if value is not None:
            _check_mqtt_text(value)
        return value

    @field_validator("keepalive")
    @classmethod
    def _check_keepalive(cls, value: float) -> float:
        if value > 65535:
            raise ValueError("must be at most 65535s (the MQTT limit)")
        return value

    @model_validator(mode="after")
    def _check_transport(self) -> Self:
        url = split_mqtt_url(self.url)
        problems: list[Located] = []
        if url.scheme == "mqtt":
            tls_keys = [k for k in ("ca_file", "cert_file", "key_file") if getattr(self, k)]
            if tls_keys:
                problems.append(
                    (
                        ("url",),
                        f"{', '.join(tls_keys)} set but the url is mqtt:// (no TLS); use mqtts://",
                    )
                )
            elif self.password_file is not None and not (
                self.allow_insecure or is_loopback(url.host)
            ):
                problems.append(
                    (
                        ("url",),
                        "the password (password_file) would be sent unencrypted over "
                        "mqtt:// to a non-loopback host; "
                        "use mqtts://, or set allow_insecure = true",
                    )
                )
        if self.key_file is not None and self.cert_file is None:
            problems.append((("key_file",), "key_file needs cert_file"))
        if problems:
            raise errors_at(problems)
        return self

    @property
    def host(self) -> str:
        """The MQTT server's host name or address (IPv6 without brackets)."""
        return split_mqtt_url(self.url).host

    @property
    def port(self) -> int:
        """The port from the url, else 1883 (mqtt) or 8883 (mqtts)."""
        return split_mqtt_url(self.url).port

    @property
    def tls(self) -> bool:
        """True for ``mqtts://``."""
        return split_mqtt_url(self.url).scheme == "mqtts"


class HttpSettings(Model):
    """``[http]``: the HTTP API. The section being absent turns it off.

    ``listen`` is kept normalised: a ``unix:`` path is stored expanded and absolute.
    """

    listen: str = "127.0.0.1:8790"
    token_file: ExpandedPath | None = None
    #: ``Host`` values accepted besides loopback names and the listen address (DNS rebinding).
    allowed_hosts: tuple[str, ...] = ()
    #: Origins a browser may read answers from (CORS); none by default.
    cors_origins: tuple[str, ...] = ()

    @field_validator("allowed_hosts")
    @classmethod
    def _check_allowed_hosts(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(check_host(host.strip("[]")) for host in value)

    @field_validator("cors_origins")
    @classmethod
    def _check_origins(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for origin in value:
            scheme, sep, rest = origin.partition("://")
            if scheme not in ("http", "https") or not sep or not rest or "/" in rest:
                raise ValueError(
                    f"{show(origin)} is not an origin; expected "
                    '"https://host" or "https://host:port" (no path, no "*")'
                )
        return tuple(origin.lower() for origin in value)

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str, info: ValidationInfo) -> str:
        if "\0" in value:
            raise ValueError("must not contain NUL")
        _, _, unix = split_listen(value)
        if unix is not None:
            return "unix:" + str(context_of(info).expand(unix))
        return value

    @model_validator(mode="after")
    def _check_exposure(self) -> Self:
        host, _, _ = split_listen(self.listen)
        if host is not None and not is_loopback(host) and self.token_file is None:
            raise errors_at(
                [
                    (
                        ("listen",),
                        "a non-loopback listen address needs token_file (every request must "
                        'then send "Authorization: Bearer <token>"); '
                        "or listen on 127.0.0.1 or a unix: socket",
                    )
                ]
            )
        return self

    @property
    def host(self) -> str | None:
        """The address to bind (IPv6 without brackets); ``None`` for a unix socket."""
        return split_listen(self.listen)[0]

    @property
    def port(self) -> int | None:
        """The TCP port; ``None`` for a unix socket."""
        return split_listen(self.listen)[1]

    @property
    def unix_path(self) -> Path | None:
        """The unix socket path, or ``None`` when listening on TCP."""
        unix = split_listen(self.listen)[2]
        return Path(unix) if unix is not None else None
