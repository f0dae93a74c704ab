"""The TOML configuration (SPEC section 2): loading, validation and error reporting.

Everything a user can get wrong is reported at once, each error naming its key path the way
the TOML reads (``credentials[2].expiry: unknown source "jwtt"; expected ...``), as a
:class:`ConfigError`. Validation is pydantic v2; this module turns pydantic's errors into
those lines and never lets a value that may be secret (a url's userinfo, a header, a
password) into a message.

Decisions worth knowing:

- Paths: ``~`` (from ``env["HOME"]``), ``~user``, ``$VAR`` and ``${VAR}`` expand; so does
  ``${VAR:-default}`` (``default`` when VAR is unset or empty; it may hold ``~`` and ``${...}``
  itself); ``$$`` is a literal ``$``. Otherwise an unset or empty variable is an error.
  Relative paths are taken against the config file's directory (the cwd when there is no
  file). Symlinks are *not* resolved: the watcher must see e.g. the Kubernetes ``..data`` swap
  at the path as written.
- A path whose last component holds ``*``, ``?`` or ``[`` is a pattern: the role is the set of
  files matching it, found at read time (the directory part must be a plain path).
- ``expiry`` is one source or an array of sources tried in order: a source that finds no
  field (``no-expiry``) hands over to the next. ``select`` cuts the expiry file down to the
  part that belongs to this credential (``ini-section:<name>``) before anything else looks at
  it. ``key_file`` names the role whose private key must belong to the certificate.
  ``fallback`` is a second set of files used while the expiry file is absent.
- Presets: the preset's values come first and every key the user writes overrides them.
  ``files`` and ``remedies`` merge per key (the user can re-point or add roles, but not remove
  one); ``name`` defaults to the preset's name. A preset's parameters (``profile``) are keys
  of the credential table, accepted only with that preset; ``{profile}`` in its expiry
  sources, selector, remedies and refresh command becomes the value.
- ``remedies`` may be written in TOML too: keys are problem codes, or ``"<code>:<role>"`` for
  one role; values are templates with ``{path}``, ``{path:<role>}`` and ``{role}``.
- At least one ``[[credentials]]`` table is required.
"""

from __future__ import annotations

import difflib
import fnmatch
import ipaddress
import json
import os
import pwd
import re
import shlex
import signal
import socket
import stat
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Annotated, Any, ClassVar, Literal, Self
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from broker.config.presets import (
    PRESETS,
    PROBLEM_CODES,
    Preset,
    PresetFallback,
    default_remedy,
    fill_remedy,
)
from broker.core.durations import parse_duration, parse_size
from broker.core.errors import BrokerError
from broker.core.expiry import ExpirySource, parse_expiry_source
from broker.core.formats import Selector, parse_selector

__all__ = [
    "BrokerSettings",
    "Config",
    "ConfigError",
    "CredentialSettings",
    "FallbackSettings",
    "HttpSettings",
    "MqttSettings",
    "RefreshSettings",
    "ValidateSettings",
    "default_host_id",
    "expand_template",
    "glob_matches",
    "is_glob",
    "load_config",
    "parse_config",
]

CONFIG_ENV_VAR = "CREDBROKER_CONFIG"
DEFAULT_MAX_SIZE = 1024 * 1024
# Bigger than any sane config; stops `-c /dev/zero` from eating memory.
_MAX_CONFIG_BYTES = 4 * 1024 * 1024
# Durations beyond this are typos, and near float limits they break time arithmetic
# (expires_at - expiring_before must still be a representable timestamp).
_MAX_DURATION = 3650 * 86400.0
_MAX_SIZE = 1024**3
_MAX_BUFFER = 10_000_000
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]*")
_NAME_MAX = 64
_HOSTNAME_RE = re.compile(r"[a-z0-9_][a-z0-9_.-]*")
_HEADER_NAME_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_PLACEHOLDER_RE = re.compile(r"\{([^{}]*)\}")
_CTX_KEY = "credbroker"


# --------------------------------------------------------------------------------------------
# Errors


class ConfigError(BrokerError):
    """The configuration cannot be used. ``errors`` lists every problem found.

    Each entry is ``(key path, message)``, e.g. ``("credentials[2].expiry", 'unknown source
    "jwtt"; ...')``; the path is ``""`` for problems with the file as a whole. ``str()`` gives
    one line per error, each prefixed with the config file's path when there is one.
    """

    def __init__(self, errors: Sequence[tuple[str, str]], source_path: Path | None = None) -> None:
        # Both arguments go to Exception so the error pickles and copies faithfully.
        super().__init__(list(errors), source_path)
        self.errors: list[tuple[str, str]] = list(errors)
        self.source_path = source_path

    def __str__(self) -> str:
        prefix = f"{self.source_path}: " if self.source_path is not None else ""
        lines = [f"{prefix}{path}: {msg}" if path else prefix + msg for path, msg in self.errors]
        return "\n".join(lines) or f"{prefix}invalid configuration"


def _errors_at(items: Iterable[tuple[tuple[str | int, ...], str]]) -> ValidationError:
    """A ValidationError with errors below the current location.

    Raised from a validator, pydantic prefixes each ``loc`` with the validator's own location,
    which is how a cross-field check reports ``refresh.output`` rather than ``refresh``.
    """
    details: list[InitErrorDetails] = [
        {
            "type": PydanticCustomError("config", "{message}", {"message": message}),
            "loc": loc,
            "input": None,
        }
        for loc, message in items
    ]
    return ValidationError.from_exception_data("config", details)


def _show(value: str, limit: int = 64) -> str:
    """A user-written (never secret) value quoted for a message, cut short if huge."""
    if len(value) > limit:
        value = value[:limit] + "..."
    return json.dumps(value, ensure_ascii=False)


def _one_of(choices: Iterable[str]) -> str:
    return ", ".join(sorted(choices))


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {_show(close[0])}?)" if close else ""


# --------------------------------------------------------------------------------------------
# Load context: what paths expand from


@dataclass
class _LoadContext:
    """Passed to validators through pydantic's validation context."""

    env: Mapping[str, str]
    base_dir: Path | None  # None: the cwd, looked up only if a relative path needs it
    seen_names: set[str] = field(default_factory=set)

    def expand(self, text: str) -> Path:
        """``~``, ``$VARS``, then relative-to-base. Raises ValueError with a user message."""
        if not text:
            raise ValueError("the path is empty")
        if "\0" in text:
            raise ValueError("the path contains a NUL character")
        expanded = expand_template(text, self.env)
        if not expanded or "\0" in expanded:
            raise ValueError(f"{_show(text)} expands to an empty or invalid path")
        path = Path(expanded)
        if not path.is_absolute():
            try:
                base = self.base_dir if self.base_dir is not None else Path(os.getcwd())
            except OSError:
                raise ValueError(f"{_show(text)} is relative and the cwd is unknown") from None
            path = base / path
        return path


# --------------------------------------------------------------------------------------------
# Path templates: ~, $VAR, ${VAR}, ${VAR:-default}, $$


@dataclass(frozen=True, slots=True)
class _Tilde:
    user: str  # "" = HOME


@dataclass(frozen=True, slots=True)
class _Var:
    name: str
    default: tuple[_Node, ...] | None  # ${NAME:-default}; None for $NAME / ${NAME}


_Node = str | _Tilde | _Var
_NAME_AT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MALFORMED = 'malformed "${...}"; write ${NAME} or ${NAME:-default} (or $$ for a literal $)'


def expand_template(text: str, env: Mapping[str, str]) -> str:
    """Expand a path template the way a POSIX shell expands a word, on a small grammar.

    - ``~`` or ``~user`` at the start of the text, or at the start of a ``:-`` default:
      ``env["HOME"]`` or that user's home directory;
    - ``$NAME`` and ``${NAME}``: the variable, which must be set and non-empty;
    - ``${NAME:-default}``: the variable if set and non-empty, else ``default``, itself a
      template (``~`` and ``${...}`` expand in it). As in the shell, a default that is not
      needed is not evaluated: an unset variable there is no error;
    - ``$$``: a literal ``$``; any other ``$`` not followed by a name stays as it is.

    Values of variables are used literally (no ``~`` or ``$`` expansion inside them), as a
    shell does. Raises ``ValueError`` with a message naming the problem.
    """
    nodes, end = _parse_template(text, 0, nested=False)
    assert end == len(text)
    return _evaluate(nodes, env, text)


def _parse_template(text: str, pos: int, *, nested: bool) -> tuple[tuple[_Node, ...], int]:
    """Parse from ``pos`` to the end (or, ``nested``, to the ``}`` that closes a default)."""
    nodes: list[_Node] = []
    literal: list[str] = []

    def flush() -> None:
        if literal:
            nodes.append("".join(literal))
            literal.clear()

    if text.startswith("~", pos):
        end = pos + 1
        while end < len(text) and text[end] != "/" and not (nested and text[end] == "}"):
            end += 1
        nodes.append(_Tilde(text[pos + 1 : end]))
        pos = end
    while pos < len(text):
        char = text[pos]
        if nested and char == "}":
            break
        if char != "$":
            literal.append(char)
            pos += 1
            continue
        following = text[pos + 1 : pos + 2]
        if following == "$":
            literal.append("$")
            pos += 2
            continue
        if following == "{":
            match = _NAME_AT.match(text, pos + 2)
            if match is None:
                raise ValueError(_MALFORMED)
            after = match.end()
            if text.startswith("}", after):
                flush()
                nodes.append(_Var(match.group(), None))
                pos = after + 1
                continue
            if text.startswith(":-", after):
                default, close = _parse_template(text, after + 2, nested=True)
                if close >= len(text):
                    raise ValueError(f'unclosed "${{{match.group()}:-..."; add the closing "}}"')
                flush()
                nodes.append(_Var(match.group(), default))
                pos = close + 1
                continue
            raise ValueError(_MALFORMED)
        match = _NAME_AT.match(text, pos + 1)
        if match is None:
            literal.append("$")  # "$" before something that is no name: a literal "$"
            pos += 1
            continue
        flush()
        nodes.append(_Var(match.group(), None))
        pos = match.end()
    flush()
    return tuple(nodes), pos


def _evaluate(nodes: tuple[_Node, ...], env: Mapping[str, str], text: str) -> str:
    out: list[str] = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, _Tilde):
            if "$" in node.user or "{" in node.user:
                raise ValueError(f'cannot expand "~{node.user}": no such user')
            if node.user:
                try:
                    out.append(pwd.getpwnam(node.user).pw_dir)
                except KeyError:
                    raise ValueError(f'cannot expand "~{node.user}": no such user') from None
            else:
                home = env.get("HOME")
                if not home:
                    raise ValueError(f'cannot expand "~" in {_show(text)}: HOME is not set')
                out.append(home)
        else:
            value = env.get(node.name)
            if value:
                out.append(value)
            elif node.default is not None:
                out.append(_evaluate(node.default, env, text))
            elif value is None:
                raise ValueError(f"environment variable ${node.name} is not set")
            else:
                raise ValueError(f"environment variable ${node.name} is empty")
    return "".join(out)


# --------------------------------------------------------------------------------------------
# Glob roles: a path whose last component is a pattern is the set of files matching it

_GLOB_CHARS = frozenset("*?[")


def is_glob(path: str | PurePath) -> bool:
    """True when the last component of ``path`` holds ``*``, ``?`` or ``[``."""
    return not _GLOB_CHARS.isdisjoint(os.path.basename(str(path)))


def glob_matches(name: str, pattern: str) -> bool:
    """Whether file ``name`` matches the last-component ``pattern``, as the shell's glob says.

    As in the shell, a name starting with ``.`` matches only a pattern starting with ``.``:
    that keeps the hidden temporary files of atomic writers (``.token.tmp-1234``) out.
    """
    if name.startswith(".") and not pattern.startswith("."):
        return False
    return fnmatch.fnmatchcase(name, pattern)


def _ctx(info: ValidationInfo) -> _LoadContext:
    context = info.context
    if isinstance(context, Mapping):
        found = context.get(_CTX_KEY)
        if isinstance(found, _LoadContext):
            return found
    # Models built directly in Python (tests, embedding) expand from the real environment.
    return _LoadContext(os.environ, None)


# --------------------------------------------------------------------------------------------
# Field types


@dataclass(frozen=True, slots=True)
class _PresetPathRequired:
    """Stands in for a preset role whose path the user must supply (an empty template)."""

    preset: str
    role: str


def _path(value: Any, info: ValidationInfo) -> Path:
    if isinstance(value, _PresetPathRequired):
        raise ValueError(
            f"preset {_show(value.preset)} has no default path for role {_show(value.role)}; "
            f'set it: files = {{ {value.role} = "/path/to/file" }}'
        )
    if isinstance(value, PurePath):
        value = str(value)
    if not isinstance(value, str):
        raise ValueError("expected a path (a string)")
    return _ctx(info).expand(value)


def _duration(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError('expected a duration such as "30s", "15m", "12h" or a number of seconds')
    try:
        seconds = parse_duration(value)
    except OverflowError:
        raise ValueError("the duration is out of range") from None
    if seconds > _MAX_DURATION:
        raise ValueError("the duration is too long (at most 3650d)")
    return seconds


def _positive_duration(value: Any) -> float:
    seconds = _duration(value)
    if seconds <= 0:
        raise ValueError("must be greater than zero")
    return seconds


def _size(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError('expected a size such as "1MiB", "512KiB" or a whole number of bytes')
    try:
        size = parse_size(value)
    except OverflowError:
        raise ValueError("the size is out of range") from None
    if size > _MAX_SIZE:
        raise ValueError("the size is too large (at most 1GiB)")
    return size


def _fraction(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("expected a number greater than 0 and at most 1, e.g. 0.8")
    try:
        number = float(value)
    except OverflowError:
        number = float("inf")
    if not 0.0 < number <= 1.0:  # also rejects NaN
        raise ValueError("must be greater than 0 and at most 1, e.g. 0.8")
    return number


def _count(value: Any, maximum: int) -> int:
    # TOML integers only: pydantic's lax mode would take true, 1.0 and "10" as well.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("expected a whole number")
    if not 0 < value <= maximum:
        raise ValueError(f"must be between 1 and {maximum}")
    return value


def _buffer(value: Any) -> int:
    return _count(value, _MAX_BUFFER)


def _strict_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("expected true or false")
    return value


def _status_code(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("expected an HTTP status code (a whole number)")
    if not 100 <= value <= 599:
        raise ValueError("must be an HTTP status code (100-599)")
    return value


_EXPIRY_EXPECTED = "jwt, json:<path>, ini:<section>.<key>, pem, ttl:<duration>, none"
# Sources that always answer (never "no-expiry"): nothing after one of them could be reached.
_FINAL_SOURCES = frozenset({"none", "ttl", "pem"})


def _expiry(value: Any) -> ExpirySource:
    if isinstance(value, ExpirySource):
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a string: {_EXPIRY_EXPECTED}")
    source = parse_expiry_source(value)  # its ValueError message is shown verbatim
    if source.kind == "ttl" and source.ttl > _MAX_DURATION:
        raise ValueError(f"source {_show(value)}: the duration is too long (at most 3650d)")
    return source


def _expiry_sources(value: Any) -> tuple[ExpirySource, ...]:
    """``expiry = "jwt"`` or ``expiry = ["ini:p.a", "ini:p.b", "none"]`` (tried in order)."""
    if isinstance(value, str | ExpirySource):
        return (_expiry(value),)
    if not isinstance(value, list | tuple):
        raise ValueError(
            f"expected a string ({_EXPIRY_EXPECTED}) or an array of them, tried in order"
        )
    if not value:
        raise ValueError("must not be empty")
    sources: list[ExpirySource] = []
    problems: list[tuple[tuple[str | int, ...], str]] = []
    for index, item in enumerate(value):
        try:
            sources.append(_expiry(item))
        except ValueError as exc:
            problems.append(((index,), str(exc)))
    if problems:
        raise _errors_at(problems)
    for index, source in enumerate(sources[:-1]):
        if source.kind in _FINAL_SOURCES:
            raise _errors_at(
                [
                    (
                        (index + 1,),
                        f"unreachable: source {_show(str(source))} always answers, "
                        "so nothing after "
                        "it is ever tried; put it last",
                    )
                ]
            )
    return tuple(sources)


def _serialize_expiry(sources: tuple[ExpirySource, ...]) -> str | list[str]:
    texts = [str(source) for source in sources]
    return texts[0] if len(texts) == 1 else texts


def _selector(value: Any) -> Selector:
    if isinstance(value, Selector):
        return value
    if not isinstance(value, str):
        raise ValueError('expected a string such as "ini-section:default"')
    return parse_selector(value)


_PARAMETER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@+-]*")
_PARAMETER_MAX = 128


def _parameter(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("expected a string")
    if len(value) > _PARAMETER_MAX or not _PARAMETER_RE.fullmatch(value):
        raise ValueError(
            f"invalid value {_show(value)}: use letters, digits and _ . @ + -, starting with a "
            "letter or digit"
        )
    return value


@dataclass(frozen=True, slots=True)
class _UserWroteParameters:
    """Stands in for a ``parameters`` table written in the config: not a key users may set."""


def _check_ident(value: str, what: str) -> str:
    if len(value) > _NAME_MAX:
        raise ValueError(f"{what} is longer than {_NAME_MAX} characters")
    if not _NAME_RE.fullmatch(value):
        raise ValueError(
            f'invalid {what} {_show(value)}: use lower-case letters, digits, "_" and "-", '
            "starting with a letter or digit"
        )
    return value


def _is_loopback(host: str) -> bool:
    """Only ``localhost`` and literal loopback addresses.

    Not ``*.localhost``: without nss-myhostname such a name is resolved through DNS, and a
    secret sent there in clear would leave the machine.
    """
    name = host.lower().rstrip(".")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _check_host(host: str) -> str:
    """A hostname or IP address as it appears in a URL or listen address."""
    name = host.lower()
    try:
        ipaddress.ip_address(name.split("%", 1)[0])
        return name
    except ValueError:
        pass
    if len(name) > 253 or not _HOSTNAME_RE.fullmatch(name):
        raise ValueError("the host is not a valid hostname or IP address")
    return name


def _split_url(url: str, schemes: Mapping[str, int], example: str) -> tuple[str, str, int]:
    """``(scheme, host, port)`` of a URL. Messages never repeat the URL: it may hold secrets."""
    if "\0" in url or any(c.isspace() for c in url):
        raise ValueError(f"the url contains whitespace or control characters; expected {example}")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError(f"malformed url (bad port or brackets); expected {example}") from None
    scheme = parts.scheme.lower()
    if scheme not in schemes:
        raise ValueError(f"unsupported url scheme; expected {example}")
    if "@" in parts.netloc:
        raise ValueError("credentials in the url are not accepted; use the settings made for them")
    if not parts.hostname:
        raise ValueError(f"the url has no host; expected {example}")
    host = _check_host(parts.hostname)
    return scheme, host, port if port is not None else schemes[scheme]


_MQTT_SCHEMES = {"mqtt": 1883, "mqtts": 8883}
_MQTT_EXAMPLE = "mqtt://host[:port] or mqtts://host[:port]"
_HTTP_SCHEMES = {"https": 443, "http": 80}
_LISTEN_EXAMPLE = '"host:port", "[v6addr]:port" or "unix:/path"'


def _split_mqtt_url(url: str) -> tuple[str, str, int]:
    scheme, host, port = _split_url(url, _MQTT_SCHEMES, _MQTT_EXAMPLE)
    parts = urlsplit(url)
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"the url must have no path, query or fragment; expected {_MQTT_EXAMPLE}")
    return scheme, host, port


def _split_listen(listen: str) -> tuple[str | None, int | None, str | None]:
    """``(host, port, None)`` or ``(None, None, unix path)``."""
    if listen.startswith("unix:"):
        return None, None, listen[5:]
    if listen.startswith("["):
        host, sep, port_text = listen[1:].partition("]:")
        if not sep:
            raise ValueError(f"malformed listen address; expected {_LISTEN_EXAMPLE}")
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise ValueError("the address in brackets is not an IPv6 address") from None
    else:
        host, sep, port_text = listen.rpartition(":")
        if not sep or not host:
            raise ValueError(f"malformed listen address; expected {_LISTEN_EXAMPLE}")
        if ":" in host:
            raise ValueError('an IPv6 listen address needs brackets: "[::1]:8790"')
        host = _check_host(host)
    if not port_text.isascii() or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError("the port must be a number from 0 to 65535")
    return host, int(port_text), None


def default_host_id() -> str:
    """The short host name, lower-cased, with characters a host_id cannot hold made ``-``."""
    name = socket.gethostname().split(".", 1)[0].lower()
    name = re.sub(r"[^a-z0-9_-]", "-", name).lstrip("_-")[:_NAME_MAX]
    return name or "localhost"


ExpandedPath = Annotated[Path, BeforeValidator(_path)]
Duration = Annotated[float, BeforeValidator(_duration)]
PositiveDuration = Annotated[float, BeforeValidator(_positive_duration)]
# Plain: never accept ExpirySource's dataclass fields as a TOML table; dump back as text.
ExpiryField = Annotated[
    tuple[ExpirySource, ...],
    PlainValidator(_expiry_sources),
    PlainSerializer(_serialize_expiry, return_type=str | list[str]),
]
SelectorField = Annotated[
    Selector, PlainValidator(_selector), PlainSerializer(str, return_type=str)
]
ParameterValue = Annotated[str, PlainValidator(_parameter)]
StrictBoolField = Annotated[bool, BeforeValidator(_strict_bool)]
# Checked as a dict key so a bad role name is reported even when its path is bad too.
RoleName = Annotated[str, AfterValidator(lambda value: _check_ident(value, "role name"))]


# --------------------------------------------------------------------------------------------
# Models


class _Model(BaseModel):
    # hide_input_in_errors: should a raw pydantic error ever be printed, it must not carry a
    # value that could be a secret.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


class BrokerSettings(_Model):
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
            xdg = _ctx(info).env.get("XDG_STATE_HOME", "")
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
        return _check_ident(value, "host_id")


#: Leaves room under MQTT's 65,535-byte topic limit for host_id, credential and event type.
_TOPIC_PREFIX_MAX = 1024


def _check_mqtt_text(value: str) -> None:
    # Imported here: config is pure core, and MQTT's rules live with the MQTT sink.
    from broker.sinks.mqtt import mqtt_text_problem

    problem = mqtt_text_problem(value)
    if problem is not None:
        raise ValueError(f"contains a {problem}, which MQTT servers refuse")
    if len(value.encode()) > 65535:
        raise ValueError("is longer than 65535 bytes (the MQTT limit)")


class MqttSettings(_Model):
    """``[mqtt]``: where to publish. The section being absent turns MQTT off."""

    url: str
    topic_prefix: str = "credbroker"
    username: str | None = None
    password_file: ExpandedPath | None = None
    ca_file: ExpandedPath | None = None
    cert_file: ExpandedPath | None = None
    key_file: ExpandedPath | None = None
    client_id: str | None = None
    buffer: Annotated[int, BeforeValidator(_buffer)] = 10000
    allow_insecure: StrictBoolField = False
    keepalive: PositiveDuration = 30.0

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        _split_mqtt_url(value)
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
        scheme, host, _ = _split_mqtt_url(self.url)
        problems: list[tuple[tuple[str | int, ...], str]] = []
        if scheme == "mqtt":
            tls_keys = [k for k in ("ca_file", "cert_file", "key_file") if getattr(self, k)]
            if tls_keys:
                problems.append(
                    (
                        ("url",),
                        f"{', '.join(tls_keys)} set but the url is mqtt:// (no TLS); use mqtts://",
                    )
                )
            elif self.password_file is not None and not (self.allow_insecure or _is_loopback(host)):
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
            raise _errors_at(problems)
        return self

    @property
    def host(self) -> str:
        """The MQTT server's host name or address (IPv6 without brackets)."""
        return _split_mqtt_url(self.url)[1]

    @property
    def port(self) -> int:
        """The port from the url, else 1883 (mqtt) or 8883 (mqtts)."""
        return _split_mqtt_url(self.url)[2]

    @property
    def tls(self) -> bool:
        """True for ``mqtts://``."""
        return _split_mqtt_url(self.url)[0] == "mqtts"


class HttpSettings(_Model):
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
        return tuple(_check_host(host.strip("[]")) for host in value)

    @field_validator("cors_origins")
    @classmethod
    def _check_origins(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for origin in value:
            scheme, sep, rest = origin.partition("://")
            if scheme not in ("http", "https") or not sep or not rest or "/" in rest:
                raise ValueError(
                    f"{_show(origin)} is not an origin; expected "
                    '"https://host" or "https://host:port" (no path, no "*")'
                )
        return tuple(origin.lower() for origin in value)

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str, info: ValidationInfo) -> str:
        if "\0" in value:
            raise ValueError("must not contain NUL")
        _, _, unix = _split_listen(value)
        if unix is not None:
            return "unix:" + str(_ctx(info).expand(unix))
        return value

    @model_validator(mode="after")
    def _check_exposure(self) -> Self:
        host, _, _ = _split_listen(self.listen)
        if host is not None and not _is_loopback(host) and self.token_file is None:
            raise _errors_at(
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
        return _split_listen(self.listen)[0]

    @property
    def port(self) -> int | None:
        """The TCP port; ``None`` for a unix socket."""
        return _split_listen(self.listen)[1]

    @property
    def unix_path(self) -> Path | None:
        """The unix socket path, or ``None`` when listening on TCP."""
        unix = _split_listen(self.listen)[2]
        return Path(unix) if unix is not None else None


class RefreshSettings(_Model):
    """``refresh = {...}``: a command that renews the credential (argv, no shell)."""

    command: tuple[str, ...] = Field(min_length=1)
    output: str | None = None
    timeout: PositiveDuration = 60.0
    on: Literal["expiring", "expired"] = "expiring"

    @field_validator("command", mode="before")
    @classmethod
    def _not_a_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            raise ValueError(
                "expected an array of strings (argv, run without a shell), e.g. "
                '["nebius", "iam", "get-access-token"]'
            )
        return value

    @field_validator("command")
    @classmethod
    def _check_command(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value[0]:
            raise ValueError("the program (first element) must not be empty")
        if any("\0" in arg for arg in value):
            raise ValueError("arguments must not contain NUL")
        return value


class ValidateSettings(_Model):
    """``validate = {...}``: ask the real API whether it still accepts the credential."""

    url: str
    header: str | None = None
    expect: tuple[Annotated[int, BeforeValidator(_status_code)], ...] = Field(
        default=(200,), min_length=1
    )
    interval: PositiveDuration = 600.0
    timeout: PositiveDuration = 10.0

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        example = "https://host/path (or http:// to a loopback host)"
        scheme, host, _ = _split_url(value, _HTTP_SCHEMES, example)
        if scheme == "http" and not _is_loopback(host):
            raise ValueError(
                "plain http:// is only allowed to a loopback host (the credential would be "
                "sent unencrypted); use https://"
            )
        return value

    @field_validator("header")
    @classmethod
    def _check_header(cls, value: str | None) -> str | None:
        # Never echo the header: it is where a literal token would be written.
        if value is None:
            return None
        if any(c in value for c in "\r\n\0"):
            raise ValueError("must be a single line (no CR, LF or NUL)")
        name, sep, rest = value.partition(":")
        if not sep or not _HEADER_NAME_RE.fullmatch(name) or not rest.strip():
            raise ValueError('expected "Name: value", e.g. "Authorization: Bearer {token}"')
        return value

    @property
    def placeholders(self) -> tuple[str, ...]:
        """Roles named by ``{role}`` placeholders in ``header``, in order, without repeats."""
        if self.header is None:
            return ()
        return tuple(dict.fromkeys(_PLACEHOLDER_RE.findall(self.header)))


def _preset_values(preset: Preset) -> dict[str, Any]:
    """A preset as config keys, ready for the user's keys to be laid over it."""
    values: dict[str, Any] = {
        "name": preset.name,
        "files": {
            role: template or _PresetPathRequired(preset.name, role)
            for role, template in preset.files.items()
        },
        "format": preset.format,
        "expiry": _expiry_value(preset.expiry),
        "remedies": dict(preset.remedies),
    }
    optional: dict[str, Any] = {
        "expiry_file": preset.expiry_file,
        "select": preset.select,
        "key_file": preset.key_file,
        "private_roles": list(preset.private_roles) if preset.private_roles is not None else None,
        "expiring_before": preset.expiring_before,
        "expiring_fraction": preset.expiring_fraction,
        "refresh": dict(preset.refresh) if preset.refresh is not None else None,
        "fallback": _fallback_values(preset.fallback) if preset.fallback is not None else None,
    }
    values.update({key: value for key, value in optional.items() if value is not None})
    return values


def _fallback_values(fallback: PresetFallback) -> dict[str, Any]:
    values: dict[str, Any] = {
        "files": dict(fallback.files),
        "format": fallback.format,
        "expiry": _expiry_value(fallback.expiry),
    }
    if fallback.expiry_file is not None:
        values["expiry_file"] = fallback.expiry_file
    if fallback.remedies:
        values["remedies"] = dict(fallback.remedies)
    return values


def _expiry_value(expiry: str | tuple[str, ...]) -> str | list[str]:
    return expiry if isinstance(expiry, str) else list(expiry)


def _substitute(value: Any, parameters: Mapping[str, str], *, quote: bool = False) -> Any:
    """``{name}`` -> the parameter's value in a string, or in each string of a list."""
    if isinstance(value, str):
        for name, replacement in parameters.items():
            value = value.replace(f"{{{name}}}", shlex.quote(replacement) if quote else replacement)
        return value
    if isinstance(value, list | tuple):
        return [_substitute(item, parameters, quote=quote) for item in value]
    return value


def _fill_parameters(data: dict[str, Any], preset: Preset) -> None:
    """Take the preset's parameters out of ``data`` and put their values into its templates:
    the expiry sources, the selector, the remedies (shell-quoted), the refresh command's
    arguments and the fallback's expiry and selector. Paths are left alone.
    """
    parameters: dict[str, Any] = {
        name: data.pop(name, default) for name, default in preset.parameters.items()
    }
    if not parameters:
        return
    data["parameters"] = parameters
    usable: dict[str, str] = {}
    for name, value in parameters.items():
        try:
            usable[name] = _parameter(value)
        except ValueError:
            return  # reported at the parameter's key; leave the templates alone
    for key in ("expiry", "select"):
        if key in data:
            data[key] = _substitute(data[key], usable)
    if isinstance(data.get("remedies"), Mapping):
        data["remedies"] = {
            code: _substitute(text, usable, quote=True) for code, text in data["remedies"].items()
        }
    refresh = data.get("refresh")
    if isinstance(refresh, Mapping) and isinstance(refresh.get("command"), list | tuple):
        data["refresh"] = {**refresh, "command": _substitute(refresh["command"], usable)}
    fallback = data.get("fallback")
    if isinstance(fallback, Mapping):
        data["fallback"] = {
            key: _substitute(value, usable) if key in ("expiry", "select") else value
            for key, value in fallback.items()
        }


def _default_expiry_file(data: dict[str, Any]) -> None:
    files = data.get("files")
    if "expiry_file" not in data and isinstance(files, Mapping) and files:
        first = next(iter(files))
        if isinstance(first, str):
            data["expiry_file"] = first


# Keys whose tables merge per entry over the preset's instead of replacing it.
_MERGED_KEYS = ("files", "remedies")


class _FileSet(_Model):
    """What a set of files holds and how to read it: shared by a credential and its fallback."""

    files: dict[RoleName, ExpandedPath]
    format: Literal["text", "jwt", "json", "pem", "ini"] = "text"
    # `expiry` in TOML: one source, or several tried in order. `.expiry` is the first.
    expiry_sources: ExpiryField = Field(default=(ExpirySource("none"),), alias="expiry")
    expiry_file: str = ""  # filled with the first role before validation when not written
    select: SelectorField | None = None
    key_file: str | None = None
    # The roles whose files must not be open to group or others (None: every role); the
    # tls preset names only the key, as a certificate is public.
    private_roles: tuple[str, ...] | None = None
    remedies: Mapping[str, str] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _fill_expiry_file(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            data = dict(data)
            _default_expiry_file(data)
        return data

    @property
    def expiry(self) -> ExpirySource:
        """The first (often the only) expiry source."""
        return self.expiry_sources[0]

    @field_validator("files")
    @classmethod
    def _check_files(cls, value: dict[str, Path]) -> dict[str, Path]:
        if not value:
            raise ValueError('at least one file is needed: files = { token = "/path/to/file" }')
        problems: list[tuple[tuple[str | int, ...], str]] = []
        first_role: dict[Path, str] = {}
        for role, path in value.items():
            if any(not _GLOB_CHARS.isdisjoint(part) for part in path.parent.parts):
                problems.append(
                    (
                        (role,),
                        "only the file name may be a pattern (*, ? or [); "
                        "the directory part must be a plain path",
                    )
                )
            elif path in first_role:
                problems.append(((role,), f"same file as role {_show(first_role[path])}"))
            first_role.setdefault(path, role)
        if problems:
            raise _errors_at(problems)
        return value

    @field_validator("expiry_file")
    @classmethod
    def _check_expiry_file(cls, value: str, info: ValidationInfo) -> str:
        _must_be_role(value, info)
        return value

    @field_validator("key_file")
    @classmethod
    def _check_key_file(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        _must_be_role(value, info)
        files = info.data.get("files")
        expiry_file = info.data.get("expiry_file")
        if value == expiry_file:
            raise ValueError(
                "must name the role of the private key, not the expiry_file (the certificate)"
            )
        if info.data.get("format", "pem") != "pem":
            raise ValueError('checks a key against a certificate: needs format = "pem"')
        if isinstance(files, dict) and any(
            is_glob(files[role]) for role in (value, expiry_file) if role in files
        ):
            raise ValueError("the key and the certificate must each be one file, not a pattern")
        return value

    @field_validator("private_roles")
    @classmethod
    def _check_private_roles(
        cls, value: tuple[str, ...] | None, info: ValidationInfo
    ) -> tuple[str, ...] | None:
        for role in value or ():
            _must_be_role(role, info)
        return value

    @field_validator("remedies")
    @classmethod
    def _check_remedies(cls, value: Mapping[str, str], info: ValidationInfo) -> Mapping[str, str]:
        roles = _roles(info)
        problems: list[tuple[tuple[str | int, ...], str]] = []
        for key, text in value.items():
            code, colon, role = key.partition(":")
            if code not in PROBLEM_CODES:
                problems.append(
                    (
                        (key,),
                        f"unknown problem code {_show(code)}{_did_you_mean(code, PROBLEM_CODES)}",
                    )
                )
            elif colon and roles is not None and role not in roles:
                problems.append(
                    (
                        (key,),
                        f"{_show(role)} is not a role of this credential; "
                        f"roles: {', '.join(roles)}",
                    )
                )
            elif not text.strip():
                problems.append(((key,), "the remedy text is empty"))
        if problems:
            raise _errors_at(problems)
        return dict(value)


class FallbackSettings(_FileSet):
    """``fallback = {...}``: files to use instead while the expiry file is absent.

    Same keys as a credential's files, format, expiry, expiry_file, select, key_file and
    remedies; everything else (name, expiring window, max_size) is the credential's.
    """


class CredentialSettings(_FileSet):
    """One ``[[credentials]]`` table, with its preset (if any) already applied."""

    name: str
    preset: str | None = None
    # A preset's parameters (`profile = "dev"`), written as keys of the credential's table.
    parameters: Mapping[str, ParameterValue] = Field(default_factory=dict)
    expiring_before: Duration = 900.0
    expiring_fraction: Annotated[float, BeforeValidator(_fraction)] = 0.8
    max_size: Annotated[int, BeforeValidator(_size)] = DEFAULT_MAX_SIZE
    # A consumer still on an older generation this long after a refresh is lagging.
    lag_after: PositiveDuration = 60.0
    # A consumer not heard from this long is forgotten.
    consumer_ttl: PositiveDuration = 600.0
    refresh: RefreshSettings | None = None
    validate_: ValidateSettings | None = Field(default=None, alias="validate")
    fallback: FallbackSettings | None = None
    # None: as [broker] strict_permissions says (filled in by Config).
    strict_permissions: StrictBoolField | None = None

    # HOME at load time, so remedies can show paths the way the preset and the user wrote them.
    _home: str | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data  # pydantic reports "expected a table"
        data = dict(data)
        wrote_parameters = "parameters" in data
        preset = PRESETS.get(data["preset"]) if isinstance(data.get("preset"), str) else None
        if preset is not None:
            merged = _preset_values(preset)
            for key, value in data.items():
                if key in _MERGED_KEYS and isinstance(value, Mapping):
                    merged[key] = {**merged[key], **value}
                else:
                    merged[key] = value
            data = merged
            _fill_parameters(data, preset)
        if wrote_parameters:
            data["parameters"] = _UserWroteParameters()
        _default_expiry_file(data)
        return data

    @field_validator("parameters", mode="before")
    @classmethod
    def _no_parameters_table(cls, value: Any) -> Any:
        if isinstance(value, _UserWroteParameters):
            raise ValueError(_unknown_key(("credentials", 0, "parameters")))
        return value

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str, info: ValidationInfo) -> str:
        _check_ident(value, "name")
        # Uniqueness is checked here, through the shared load context, rather than after the
        # whole list validated: that way a duplicate is reported along with every other error.
        seen = _ctx(info).seen_names
        if value in seen:
            raise ValueError(f"duplicate credential name {_show(value)}; names must be unique")
        seen.add(value)
        return value

    @field_validator("preset")
    @classmethod
    def _check_preset(cls, value: str | None) -> str | None:
        if value is not None and value not in PRESETS:
            raise ValueError(
                f"unknown preset {_show(value)}{_did_you_mean(value, PRESETS)}; "
                f"known presets: {_one_of(PRESETS)}"
            )
        return value

    @field_validator("refresh")
    @classmethod
    def _check_refresh(
        cls, value: RefreshSettings | None, info: ValidationInfo
    ) -> RefreshSettings | None:
        if value is not None and value.output is not None:
            try:
                _must_be_role(value.output, info)
                _must_be_one_file(value.output, info, "the command's output is written to it")
            except ValueError as exc:
                raise _errors_at([(("output",), str(exc))]) from None
        return value

    @field_validator("validate_")
    @classmethod
    def _check_validate(
        cls, value: ValidateSettings | None, info: ValidationInfo
    ) -> ValidateSettings | None:
        if value is None or value.header is None:
            return value
        roles = _roles(info)
        if roles is None:
            return value
        unknown = [p for p in _PLACEHOLDER_RE.findall(value.header) if p not in roles]
        if unknown:
            raise _errors_at(
                [
                    (
                        ("header",),
                        f"placeholder {{{unknown[0]}}} does not name a role of this credential; "
                        f"roles: {', '.join(roles)}",
                    )
                ]
            )
        try:
            for placeholder in value.placeholders:
                _must_be_one_file(placeholder, info, "its content fills the header")
        except ValueError as exc:
            raise _errors_at([(("header",), str(exc))]) from None
        return value

    @model_validator(mode="after")
    def _remember_home(self, info: ValidationInfo) -> Self:
        self._home = _ctx(info).env.get("HOME") or None
        return self

    @property
    def watched_paths(self) -> tuple[Path, ...]:
        """Every path whose changes matter: the files, then the fallback's (patterns as such)."""
        paths = list(self.files.values())
        if self.fallback is not None:
            paths.extend(self.fallback.files.values())
        return tuple(dict.fromkeys(paths))

    def alternative(self) -> CredentialSettings | None:
        """The settings to read the credential by while its expiry file is absent, or ``None``.

        The fallback's files, format, expiry, selector, key check and (added) remedies, with
        everything else of this credential. Not validated again: each part already was.
        """
        fallback = self.fallback
        if fallback is None:
            return None
        return self.model_copy(
            update={
                "files": dict(fallback.files),
                "format": fallback.format,
                "expiry_sources": fallback.expiry_sources,
                "expiry_file": fallback.expiry_file,
                "select": fallback.select,
                "key_file": fallback.key_file,
                "private_roles": fallback.private_roles,
                "remedies": {**self.remedies, **fallback.remedies},
                "fallback": None,
            }
        )

    def remedy(self, code: str, role: str) -> str | None:
        """The remedy text for problem ``code`` on file ``role``, or ``None`` if there is none.

        Looks up ``"<code>:<role>"``, then ``code`` in this credential's remedies (preset and
        config), then :func:`broker.config.presets.default_remedy`. ``{path}`` is the role's
        file (the expiry file's for an unknown role), ``{path:<role>}`` another role's, each
        shown with ``~`` for HOME and shell-quoted.
        """
        path = self.files.get(role) or self.files.get(self.expiry_file)
        shown = self._display(path) if path is not None else ""
        template = self.remedies.get(f"{code}:{role}") or self.remedies.get(code)
        if template is not None:
            paths = {other: self._display(p) for other, p in self.files.items()}
            return fill_remedy(template, shown, role, paths)
        return default_remedy(code, shown, role)

    def _display(self, path: Path) -> str:
        text = str(path)
        home = (self._home or "").rstrip("/")
        if home and text.startswith(home + "/"):
            return "~" + text[len(home) :]
        return text


def _roles(info: ValidationInfo) -> list[str] | None:
    """The credential's roles, or None when ``files`` itself failed (already reported)."""
    files = info.data.get("files")
    return list(files) if isinstance(files, dict) else None


def _must_be_role(value: str, info: ValidationInfo) -> None:
    roles = _roles(info)
    if roles is not None and value not in roles:
        raise ValueError(
            f"{_show(value)} is not a role of this credential; roles: {', '.join(roles)}"
        )


def _must_be_one_file(role: str, info: ValidationInfo, why: str) -> None:
    files = info.data.get("files")
    if isinstance(files, dict) and role in files and is_glob(files[role]):
        raise ValueError(
            f"role {_show(role)} is a pattern (a set of files), but {why}; name one file"
        )


_SIGNAL_NAMES = frozenset(s.name.removeprefix("SIG") for s in signal.Signals)


def _globs(value: Any) -> Any:
    if isinstance(value, str):
        raise ValueError('expected an array of names or globs, e.g. ["web-tls", "api-*"]')
    return value


def _check_globs(value: tuple[str, ...], what: str) -> tuple[str, ...]:
    for item in value:
        if not item or any(c.isspace() or c == "\0" for c in item):
            raise ValueError(f"{what} must be non-empty names or globs without whitespace")
    return value


class SignalSettings(_Model):
    """``signal = {pidfile, name}``: send a signal to the process whose pid is in a file."""

    pidfile: ExpandedPath
    name: str = "HUP"

    @field_validator("name")
    @classmethod
    def _check_signal(cls, value: str) -> str:
        bare = value.upper().removeprefix("SIG")
        if bare not in _SIGNAL_NAMES:
            raise ValueError(f"unknown signal {_show(value)}; e.g. HUP, USR1, USR2, TERM")
        return bare


class _RoutedSettings(_Model):
    """What actions and webhooks share: a name, and which credentials and events they take."""

    _kind: ClassVar[str]
    name: str
    credentials: tuple[str, ...] = ("*",)
    on: tuple[str, ...] = ("credentials.*",)

    @field_validator("credentials", "on", mode="before")
    @classmethod
    def _not_a_string(cls, value: Any) -> Any:
        return _globs(value)

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        return _check_ident(value, f"{cls._kind} name")

    @field_validator("credentials", "on")
    @classmethod
    def _check_patterns(cls, value: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        return _check_globs(value, str(info.field_name))


class ActionSettings(_RoutedSettings):
    """``[[actions]]``: signal a process or run argv (no shell) when credentials change."""

    _kind: ClassVar[str] = "action"
    on: tuple[str, ...] = ("credentials.refreshed",)
    signal: SignalSettings | None = None
    command: tuple[str, ...] | None = Field(default=None, min_length=1)
    coalesce: Duration = 0.5
    timeout: PositiveDuration = 30.0


    @field_validator("command", mode="before")
    @classmethod
    def _command_not_a_string(cls, value: Any) -> Any:
        return RefreshSettings._not_a_string(value)

    @field_validator("command")
    @classmethod
    def _check_command(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        return None if value is None else RefreshSettings._check_command(value)

    @model_validator(mode="after")
    def _signal_xor_command(self) -> Self:
        if (self.signal is None) == (self.command is None):
            raise ValueError(
                'set either signal = {pidfile = "...", name = "HUP"} or command = [...]'
                + ("; not both" if self.signal is not None else "")
            )
        return self


class WebhookSettings(_RoutedSettings):
    """``[[webhooks]]``: POST each matching event (CloudEvents HTTP binding, Standard Webhooks)."""

    _kind: ClassVar[str] = "webhook"
    url: str
    secret_file: ExpandedPath | None = None
    mode: Literal["structured", "binary"] = "structured"
    timeout: PositiveDuration = 10.0


    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        return ValidateSettings._check_url(value)


def _check_unique(items: Sequence[ActionSettings | WebhookSettings], what: str) -> None:
    seen: set[str] = set()
    for index, item in enumerate(items):
        if item.name in seen:
            raise _errors_at(
                [((index, "name"), f"duplicate {what} name {_show(item.name)}; names are unique")]
            )
        seen.add(item.name)


class Config(_Model):
    """The whole configuration file. Build it with :func:`load_config` or :func:`parse_config`."""

    broker: BrokerSettings
    mqtt: MqttSettings | None = None
    http: HttpSettings | None = None
    credentials: tuple[CredentialSettings, ...] = Field(default=(), validate_default=True)
    actions: tuple[ActionSettings, ...] = ()
    webhooks: tuple[WebhookSettings, ...] = ()
    source_path: Path | None = None  # set by the loader; not a TOML key

    @model_validator(mode="before")
    @classmethod
    def _default_broker(cls, data: Any) -> Any:
        # An absent [broker] still needs its defaults computed (host name, state_dir from env).
        if isinstance(data, Mapping) and "broker" not in data:
            data = {**data, "broker": {}}
        return data

    @field_validator("credentials")
    @classmethod
    def _check_credentials(
        cls, value: tuple[CredentialSettings, ...]
    ) -> tuple[CredentialSettings, ...]:
        if not value:
            raise ValueError("no credentials configured; add a [[credentials]] table")
        # Covers models passed in ready-made; parsed tables were already checked one by one.
        seen: set[str] = set()
        for index, credential in enumerate(value):
            if credential.name in seen:
                raise _errors_at(
                    [
                        (
                            (index, "name"),
                            f"duplicate credential name "
                            f"{_show(credential.name)}; names must be unique",
                        )
                    ]
                )
            seen.add(credential.name)
        return value

    @field_validator("actions")
    @classmethod
    def _check_actions(cls, value: tuple[ActionSettings, ...]) -> tuple[ActionSettings, ...]:
        _check_unique(value, "action")
        return value

    @field_validator("webhooks")
    @classmethod
    def _check_webhooks(cls, value: tuple[WebhookSettings, ...]) -> tuple[WebhookSettings, ...]:
        _check_unique(value, "webhook")
        return value

    @model_validator(mode="after")
    def _inherit_strictness(self) -> Self:
        strict = self.broker.strict_permissions
        if any(c.strict_permissions is None for c in self.credentials):
            inherited = tuple(
                c
                if c.strict_permissions is not None
                else c.model_copy(update={"strict_permissions": strict})
                for c in self.credentials
            )
            object.__setattr__(self, "credentials", inherited)
        return self

    def credential(self, name: str) -> CredentialSettings:
        """The credential called ``name``; ``KeyError`` if there is none."""
        for credential in self.credentials:
            if credential.name == name:
                return credential
        raise KeyError(name)


# --------------------------------------------------------------------------------------------
# pydantic errors -> (key path, message)

_SECTION_OF_TOP_KEY: dict[str, str] = {
    key: section
    for section, model in (
        ("broker", BrokerSettings),
        ("mqtt", MqttSettings),
        ("http", HttpSettings),
    )
    for key in model.model_fields
}

# Keys people reach for that must not exist, with what to do instead.
_FORBIDDEN_KEYS: dict[tuple[str, str], str] = {
    ("mqtt", "password"): "inline passwords are not accepted: write the password to a file only "
    'the broker can read (chmod 600) and set password_file = "/path/to/file"',
    ("http", "token"): "inline tokens are not accepted: write the token to a file only the "
    'broker can read (chmod 600) and set token_file = "/path/to/file"',
}


def _model_at(loc: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The model whose table is at ``loc`` (used to list the keys it knows)."""
    match loc:
        case ():
            return Config
        case ("broker",):
            return BrokerSettings
        case ("mqtt",):
            return MqttSettings
        case ("http",):
            return HttpSettings
        case ("credentials", int()):
            return CredentialSettings
        case ("credentials", int(), "refresh"):
            return RefreshSettings
        case ("credentials", int(), "validate"):
            return ValidateSettings
        case ("credentials", int(), "fallback"):
            return FallbackSettings
        case ("actions", int()):
            return ActionSettings
        case ("actions", int(), "signal"):
            return SignalSettings
        case ("webhooks", int()):
            return WebhookSettings
    return None


def _known_keys(model: type[BaseModel]) -> list[str]:
    keys = [info.alias or name for name, info in model.model_fields.items()]
    hidden = {"source_path"} if model is Config else {"parameters"}
    return [k for k in keys if k not in hidden]


def _unknown_key(loc: tuple[str | int, ...]) -> str:
    key = loc[-1]
    parent = loc[:-1]
    if not isinstance(key, str):
        return "keys must be strings"
    forbidden = _FORBIDDEN_KEYS.get((str(parent[0]), key)) if len(parent) == 1 else None
    if forbidden is not None:
        return forbidden
    message = f"unknown key {_show(key)}"
    model = _model_at(parent)
    takers = sorted(name for name, preset in PRESETS.items() if key in preset.parameters)
    if model is CredentialSettings and takers:
        return f"{message}: {_show(key)} is a parameter of preset {', '.join(takers)} only"
    if model is not None:
        hint = _did_you_mean(key, _known_keys(model))
        if not hint and model is Config and key in _SECTION_OF_TOP_KEY:
            # A key written after the wrong [table] header, or before any header.
            hint = f" (it belongs in the [{_SECTION_OF_TOP_KEY[key]}] table)"
        message += hint
    return message


_TYPE_MESSAGES = {
    "string_type": "expected a string",
    "int_type": "expected a whole number",
    "int_parsing": "expected a whole number",
    "int_from_float": "expected a whole number",
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "bool_type": "expected true or false",
    "bool_parsing": "expected true or false",
    "dict_type": "expected a table",
    "model_type": "expected a table",
    "model_attributes_type": "expected a table",
    "mapping_type": "expected a table",
    "tuple_type": "expected an array",
    "list_type": "expected an array",
    "iterable_type": "expected an array",
    "invalid_key": "keys must be strings",
    "missing": "is required",
}


def _message(error: Mapping[str, Any], loc: tuple[str | int, ...]) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    if kind == "value_error" and "error" in ctx:
        return str(ctx["error"])  # our validators' messages, shown verbatim
    if kind == "config":
        return str(error["msg"])
    if kind == "extra_forbidden":
        return _unknown_key(loc)
    if kind == "literal_error":
        return "must be " + str(ctx.get("expected", "")).replace("'", '"')
    if kind == "too_short":
        return "must not be empty"
    if loc == ("credentials",) and kind in ("tuple_type", "list_type"):
        return "expected [[credentials]] tables (an array of tables)"
    if kind == "missing" and loc == ("mqtt", "url"):
        return 'is required, e.g. url = "mqtt://127.0.0.1:1883"'
    return _TYPE_MESSAGES.get(kind, str(error["msg"]))


def _format_loc(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        text = part if re.fullmatch(r"[A-Za-z0-9_-]+", part) else json.dumps(part)
        out += f".{text}" if out else text
    return out


def _convert(exc: ValidationError) -> list[tuple[str, str]]:
    errors: list[tuple[str, str]] = []
    raw = exc.errors(include_url=False, include_input=False, include_context=True)
    # A credential whose preset is unknown got no files from it; "files is required" there
    # would only be noise next to the preset error.
    bad_presets = {e["loc"][:2] for e in raw if e["loc"][0::2] == ("credentials", "preset")}
    for error in raw:
        loc = tuple(error["loc"])
        if error["type"] == "missing" and loc[2:] == ("files",) and loc[:2] in bad_presets:
            continue
        if loc and loc[-1] == "[key]":  # pydantic's marker for "the key itself is wrong"
            loc = loc[:-1]
        if len(loc) == 4 and loc[0] == "credentials" and loc[2] == "parameters":
            loc = (*loc[:2], loc[3])  # a preset's parameter is written as a credential key
        entry = (_format_loc(loc), _message(error, loc))
        if entry not in errors:
            errors.append(entry)
    return errors


# --------------------------------------------------------------------------------------------
# Entry points


def parse_config(
    data: Mapping[str, Any],
    *,
    env: Mapping[str, str] | None = None,
    source_path: Path | None = None,
) -> Config:
    """Validate already-parsed TOML ``data`` into a :class:`Config`.

    ``env`` (default ``os.environ``) is what ``~`` and ``$VARS`` expand from; relative paths
    are taken against ``source_path``'s directory, or the cwd. Raises :class:`ConfigError`
    listing every problem.
    """
    env = os.environ if env is None else env
    if source_path is not None:
        source_path = Path(os.path.abspath(source_path))
    if not isinstance(data, Mapping):
        raise ConfigError([("", "the configuration must be a TOML table")], source_path)
    errors: list[tuple[str, str]] = []
    raw = dict(data)
    if "source_path" in raw:  # a model field, but not something a file may set
        errors.append(("source_path", _unknown_key(("source_path",))))
        del raw["source_path"]
    raw["source_path"] = source_path
    context = _LoadContext(env, source_path.parent if source_path is not None else None)
    try:
        config = Config.model_validate(raw, context={_CTX_KEY: context})
    except ValidationError as exc:
        # `from None`: the pydantic error would only repeat these lines, and a traceback
        # printing it must not show input values.
        raise ConfigError([*errors, *_convert(exc)], source_path) from None
    if errors:
        raise ConfigError(errors, source_path)
    return config


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
) -> Config:
    """Read and validate the TOML config at ``path`` (default: ``$CREDBROKER_CONFIG``).

    Raises :class:`ConfigError` when there is no path, the file cannot be read, is not TOML,
    or does not validate.
    """
    env = os.environ if env is None else env
    if path is None:
        value = env.get(CONFIG_ENV_VAR, "")
        if not value:
            raise ConfigError([("", f"no config file given: pass -c FILE or set {CONFIG_ENV_VAR}")])
        try:
            path = _LoadContext(env, None).expand(value)
        except ValueError as exc:
            raise ConfigError([(CONFIG_ENV_VAR, str(exc))]) from None
    source = Path(os.path.abspath(path))
    try:
        # Non-blocking, and a regular file only: a FIFO (or a device) in the config's place
        # must not hang a start or a SIGHUP reload.
        fd = os.open(source, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            if stat.S_ISDIR(mode):
                raise IsADirectoryError
            if not stat.S_ISREG(mode):
                raise ConfigError([("", "is not a regular file (a FIFO, device or socket)")],
                                  source)
            # Whoever can write the config chooses what the broker reads and runs
            # (refresh commands): refuse one that anybody may write.
            if mode & 0o002:
                raise ConfigError(
                    [("", f"the config file is writable by others; fix: chmod o-w {source}")],
                    source,
                )
            raw = handle.read(_MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError([("", "config file not found")], source) from None
    except IsADirectoryError:
        raise ConfigError([("", "is a directory, not a config file")], source) from None
    except PermissionError:
        raise ConfigError([("", "permission denied reading the config file")], source) from None
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or "invalid path"
        raise ConfigError([("", f"cannot read the config file: {reason}")], source) from None
    if len(raw) > _MAX_CONFIG_BYTES:
        raise ConfigError([("", "config file is larger than 4 MiB")], source)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError([("", f"not UTF-8 text (byte {exc.start})")], source) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib's messages give line and column and do not quote the input.
        raise ConfigError([("", f"invalid TOML: {exc}")], source) from None
    return parse_config(data, env=env, source_path=source)
