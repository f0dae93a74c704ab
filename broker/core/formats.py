"""Content checks for credential files: ``text``, ``jwt``, ``json``, ``pem`` and ``ini``.

Pure functions over ``bytes``: no I/O. Every failure is a :class:`ContentError` whose message
says what is wrong and where, but never repeats any part of the content, because that content
is a secret (SPEC section 3, rule 4). That is also why exception text from ``json``,
``base64``, ``configparser`` and ``cryptography`` is never passed on: those libraries quote
their input.

Also here, because they are parsers too: *selectors* (``select = "ini-section:<name>"``), which
cut the part of a file that belongs to one credential out of a file shared by several, and
:func:`check_key_pair`, which tells whether a private key belongs to a certificate.
"""

from __future__ import annotations

import base64
import binascii
import configparser
import io
import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, NoReturn

from broker.core.errors import BrokerError
from broker.core.problems import ProblemCode as Code

if TYPE_CHECKING:
    from cryptography import x509

FORMATS: tuple[str, ...] = ("text", "jwt", "json", "pem", "ini")

# The PEM labels cryptography accepts as certificates. If one is present but loading fails,
# the file is a broken certificate rather than some other kind of PEM file.
_CERT_MARKER = re.compile(rb"-----BEGIN (?:X509 )?CERTIFICATE-----")
# base64url alphabet (RFC 7515 section 2); tolerate the padding some encoders add anyway.
_B64URL_PART = re.compile(r"[A-Za-z0-9_-]*={0,2}")


class ContentError(BrokerError):
    """A credential file's content is not acceptable. Never carries content bytes."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"ContentError({str(self.code)!r}, {self.message!r})"


def check_format(fmt: str, data: bytes) -> None:
    """Raise :class:`ContentError` unless ``data`` is acceptable content for ``fmt``.

    ``fmt`` is one of :data:`FORMATS`; anything else is a programming error (``ValueError``),
    since configuration validation rejects unknown formats before content is ever read.
    """
    if fmt == "text":
        _decode_text(data, "file")
    elif fmt == "jwt":
        decode_jwt_claims(data)
    elif fmt == "json":
        load_json_object(data)
    elif fmt == "pem":
        load_certificates(data)
    elif fmt == "ini":
        load_ini(data)
    else:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


def decode_jwt_claims(data: bytes) -> dict[str, object]:
    """Return the payload claims of a compact JWS/JWT, checking its header on the way.

    The signature is deliberately not verified: the broker reads ``exp``/``iat`` to schedule
    events, it does not authenticate anyone, and it has no key to verify with.
    """
    text = _decode_text(data, "JWT").strip()
    parts = text.split(".")
    if len(parts) != 3:
        raise ContentError(Code.MALFORMED_JWT, f"JWT has {len(parts)} parts, expected 3")
    header_b64, payload_b64, signature_b64 = parts
    for name, part in (("header", header_b64), ("payload", payload_b64)):
        if not part:
            raise ContentError(Code.MALFORMED_JWT, f"JWT {name} is empty")
    if _B64URL_PART.fullmatch(signature_b64) is None:
        raise ContentError(Code.MALFORMED_JWT, "JWT signature is not valid base64url")
    _jwt_object(header_b64, "header")
    return _jwt_object(payload_b64, "payload")


def load_json_object(data: bytes) -> dict[str, object]:
    """Parse ``data`` as a JSON document whose top level is an object."""
    # A UTF-8 byte-order mark is tolerated: some Windows tools write one and it hides nothing.
    text = _decode_text(data, "JSON file", allow_bom=True)
    value = _parse_json(text, "JSON file")
    if not isinstance(value, dict):
        raise ContentError(
            Code.NOT_A_JSON_OBJECT, f"JSON top level is {_json_type(value)}, expected an object"
        )
    return value


def load_certificates(data: bytes) -> list[x509.Certificate]:
    """Return every X.509 certificate in a PEM file, in file order (the leaf first).

    UTF-8 is not required: PEM files often carry free-form explanatory text around the blocks.
    """
    # Imported on first use: most brokers watch no certificate, and it is a tenth of the
    # daemon's start-up imports.
    from cryptography import x509

    if not data.strip():
        raise ContentError(Code.EMPTY, "PEM file is empty")
    try:
        certificates = x509.load_pem_x509_certificates(data)
    # cryptography documents ValueError, but its Rust parser's failure modes are not a stable
    # contract; whatever it raises, the verdict is the same and must not leak its text.
    except Exception:
        if _CERT_MARKER.search(data):
            raise ContentError(
                Code.MALFORMED_PEM, "PEM file has a CERTIFICATE block that cannot be parsed"
            ) from None
        raise ContentError(Code.NO_CERTIFICATE, "no X.509 certificate found in PEM file") from None
    if not certificates:
        raise ContentError(Code.NO_CERTIFICATE, "no X.509 certificate found in PEM file")
    return certificates


def load_ini(data: bytes) -> configparser.ConfigParser:
    """Parse ``data`` as an INI file (no interpolation) with at least one section."""
    text = _decode_text(data, "INI file", allow_bom=True)
    # Interpolation is off because credential values (secrets, URLs) legitimately contain "%".
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(text)
    except configparser.MissingSectionHeaderError as exc:
        raise ContentError(
            Code.MALFORMED_INI, f"INI line {exc.lineno} comes before the first [section] header"
        ) from None
    except configparser.DuplicateSectionError as exc:
        raise ContentError(
            Code.MALFORMED_INI, f"INI line {exc.lineno} repeats a section name"
        ) from None
    except configparser.DuplicateOptionError as exc:
        raise ContentError(Code.MALFORMED_INI, f"INI line {exc.lineno} repeats a key") from None
    except configparser.ParsingError as exc:
        lines = ", ".join(str(lineno) for lineno, _line in exc.errors[:5])
        raise ContentError(
            Code.MALFORMED_INI, f"INI file cannot be parsed (line {lines})"
        ) from None
    except (configparser.Error, ValueError):
        raise ContentError(Code.MALFORMED_INI, "INI file cannot be parsed") from None
    if not parser.sections() and not parser.defaults():
        raise ContentError(Code.MALFORMED_INI, "INI file has no [section]")
    return parser


SelectorKind = Literal["ini-section"]
_SELECTOR_KINDS: tuple[SelectorKind, ...] = ("ini-section",)


@dataclass(frozen=True, slots=True)
class Selector:
    """A parsed ``select = "..."`` setting; ``str()`` gives back its text."""

    kind: SelectorKind
    arg: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.arg}"


def parse_selector(text: str) -> Selector:
    """Parse ``ini-section:<section>``. Raises ``ValueError`` with a message for the config key."""
    kind, colon, arg = text.partition(":")
    if kind not in _SELECTOR_KINDS or not colon:
        raise ValueError(
            f"unknown selector {json.dumps(text, ensure_ascii=False)}; expected ini-section:<name>"
        )
    if not arg or arg != arg.strip() or any(c in arg for c in "[]\r\n\0"):
        raise ValueError(
            'selector "ini-section" needs a section name (no brackets, line breaks or '
            'surrounding spaces), e.g. "ini-section:default"'
        )
    return Selector("ini-section", arg)


def apply_selector(selector: Selector, data: bytes) -> bytes:
    """The part of ``data`` that ``selector`` names, in a canonical form.

    ``ini-section:<name>``: the section's keys and values (``[DEFAULT]`` values included, as
    every INI reader applies them), re-written as INI text in file order. Editing any other
    section leaves the result unchanged, byte for byte. A section that is not there raises
    ``ContentError(Code.SECTION_MISSING)``.

    The result holds secrets like ``data`` does: keep it no longer than the read it came from.
    """
    parser = load_ini(data)
    section = selector.arg
    if section == parser.default_section:
        items = dict(parser.defaults())
    elif parser.has_section(section):
        items = dict(parser.items(section))
    else:
        raise ContentError(Code.SECTION_MISSING, f"INI section [{section}] is missing")
    out = configparser.ConfigParser(interpolation=None)
    out.read_dict({section: items})
    buffer = io.StringIO()
    out.write(buffer, space_around_delimiters=True)
    return buffer.getvalue().encode()


def check_key_pair(cert_pem: bytes, key_pem: bytes) -> None:
    """Raise :class:`ContentError` unless ``key_pem``'s private key belongs to the first
    certificate of ``cert_pem``.

    Codes: ``malformed-key`` (no PEM private key can be read), ``key-mismatch``. A key that
    is encrypted cannot be checked without its passphrase, which the broker never holds: it
    passes. No message says anything about the key beyond that.
    """
    from cryptography.hazmat.primitives import serialization

    certificate = load_certificates(cert_pem)[0]
    if not key_pem.strip():
        raise ContentError(Code.EMPTY, "private key file is empty")
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        return  # encrypted: nothing to compare without the passphrase
    # Whatever cryptography raises, its text may describe the key; never pass it on.
    except Exception:
        raise ContentError(Code.MALFORMED_KEY, "no readable PEM private key found") from None
    try:
        ours = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        theirs = certificate.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    except Exception:
        raise ContentError(
            Code.MALFORMED_KEY, "the key's or the certificate's public key cannot be read"
        ) from None
    if ours != theirs:
        raise ContentError(Code.KEY_MISMATCH, "the private key does not belong to the certificate")


def _decode_text(data: bytes, what: str, *, allow_bom: bool = False) -> str:
    """UTF-8 text that is neither blank nor binary, for every format but ``pem``."""
    if not data.strip():
        raise ContentError(Code.EMPTY, f"{what} is empty")
    nul = data.find(b"\x00")
    if nul >= 0:
        raise ContentError(Code.BINARY_CONTENT, f"{what} contains a NUL byte at offset {nul}")
    try:
        text = data.decode("utf-8-sig" if allow_bom else "utf-8")
    except UnicodeDecodeError as exc:
        raise ContentError(
            "not-utf8", f"{what} is not valid UTF-8 (byte offset {exc.start})"
        ) from None
    # Bytes-level strip only knows ASCII whitespace; this also catches e.g. NBSP-only files.
    if not text.strip():
        raise ContentError(Code.EMPTY, f"{what} is empty")
    return text


def _parse_json(text: str, what: str) -> object:
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        # Only the position: exc.msg is safe today but exc.doc is the secret itself.
        raise ContentError(
            Code.MALFORMED_JSON, f"{what} is not valid JSON (line {exc.lineno} column {exc.colno})"
        ) from None
    except _NonStandardJSON:
        raise ContentError(
            Code.MALFORMED_JSON, f"{what} is not valid JSON (NaN or Infinity literal)"
        ) from None
    except RecursionError:
        raise ContentError(Code.MALFORMED_JSON, f"{what} is nested too deeply") from None
    except ValueError:
        # e.g. an integer literal longer than Python's int/str conversion limit.
        raise ContentError(Code.MALFORMED_JSON, f"{what} is not valid JSON") from None


class _NonStandardJSON(Exception):
    pass


def _reject_constant(_name: str) -> NoReturn:
    # NaN/Infinity are a Python extension, not JSON; no well-behaved issuer writes them.
    raise _NonStandardJSON


def _jwt_object(part: str, name: str) -> dict[str, object]:
    if _B64URL_PART.fullmatch(part) is None:
        raise ContentError(Code.MALFORMED_JWT, f"JWT {name} is not valid base64url")
    unpadded = part.rstrip("=")
    try:
        raw = base64.urlsafe_b64decode(unpadded + "=" * (-len(unpadded) % 4))
    except (binascii.Error, ValueError):
        raise ContentError(Code.MALFORMED_JWT, f"JWT {name} is not valid base64url") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ContentError(Code.MALFORMED_JWT, f"JWT {name} is not valid UTF-8") from None
    try:
        value = _parse_json(text, f"JWT {name}")
    except ContentError as exc:
        raise ContentError(Code.MALFORMED_JWT, exc.message) from None
    if not isinstance(value, dict):
        raise ContentError(
            Code.MALFORMED_JWT, f"JWT {name} is {_json_type(value)}, expected a JSON object"
        )
    return value


def _json_type(value: object) -> str:
    """Name a JSON value's type (never its value) for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
