"""Credential presets, and the remedy hints attached to problems.

A preset is *data*: the file roles and paths, format, expiry source and remedy texts of a
well-known credential. The config loader applies any preset the same way (preset values first,
then the user's keys), so adding a preset means adding an entry to :data:`PRESETS` and nothing
else.

Path templates may start with ``~`` and use ``$VARS``; the config loader expands them. An empty
path template means "this role exists, but the user must say where the file is" (see ``tls``).

Remedy templates may use ``{path}`` (the role's file, shell-quoted) and ``{role}``. A remedy key
is a problem code (``"file-missing"``) or a code for one role (``"file-missing:tenant_id"``);
the role-specific key wins.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

#: Every problem code the project reports; remedy keys are checked against this set.
PROBLEM_CODES: frozenset[str] = frozenset(
    {
        "file-missing",
        "file-unreadable",
        "not-a-file",
        "symlink-loop",
        "too-large",
        "empty",
        "binary-content",
        "not-utf8",
        "malformed-jwt",
        "malformed-json",
        "not-a-json-object",
        "no-certificate",
        "malformed-pem",
        "malformed-ini",
        "no-expiry",
        "bad-expiry",
        "expiry-out-of-range",
        "insecure-permissions",
        "expiring",
        "expired",
        "watch-polling",
        "validator-unreachable",  # SPEC section 2, validate
    }
)


def _frozen(mapping: Mapping[str, str]) -> Mapping[str, str]:
    # Presets are module-level shared data: a read-only view stops one caller mutating
    # what every later config load sees.
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True, slots=True)
class Preset:
    """Defaults for a well-known credential; every field can be overridden in the config."""

    name: str
    description: str
    files: Mapping[str, str]  # role -> path template, in order; "" = the user must supply it
    format: str = "text"
    expiry: str = "none"
    expiry_file: str | None = None  # None = the first role
    expiring_before: str | None = None  # duration text; None = the global default
    expiring_fraction: float | None = None  # None = the global default
    remedies: Mapping[str, str] = field(default_factory=lambda: _frozen({}))

    def __post_init__(self) -> None:
        # Freeze the mappings whatever the caller passed (dataclass(frozen) needs the
        # object.__setattr__ route for that).
        object.__setattr__(self, "files", _frozen(self.files))
        object.__setattr__(self, "remedies", _frozen(self.remedies))


_NEBIUS_RENEW = "nebius iam get-access-token > {path}"

PRESETS: Mapping[str, Preset] = MappingProxyType(
    {
        "nebius": Preset(
            name="nebius",
            description="Nebius AI Cloud IAM token and tenant ID, as the Nebius CLI and "
            "SkyPilot use them (tokens live 12h)",
            files={
                "token": "~/.nebius/NEBIUS_IAM_TOKEN.txt",
                "tenant_id": "~/.nebius/NEBIUS_TENANT_ID.txt",
            },
            format="text",
            expiry="ttl:12h",
            expiry_file="token",
            remedies={
                # Role-qualified: the token command is no fix for a missing tenant ID file.
                "file-missing:token": f"run: {_NEBIUS_RENEW}",
                "empty:token": f"run: {_NEBIUS_RENEW}",
                "expiring:token": f"renew the token now: {_NEBIUS_RENEW}",
                "expired:token": f"run: {_NEBIUS_RENEW}",
                "file-missing:tenant_id": "find your tenant ID in the Nebius web console or "
                "with `nebius iam tenant list`, then: echo <tenant-id> > {path}",
                "empty:tenant_id": "find your tenant ID in the Nebius web console or "
                "with `nebius iam tenant list`, then: echo <tenant-id> > {path}",
            },
        ),
        "kubernetes": Preset(
            name="kubernetes",
            description="Kubernetes service account token, CA and namespace mounted into a pod "
            "(the kubelet rotates projected tokens)",
            files={
                "token": "/var/run/secrets/kubernetes.io/serviceaccount/token",
                "ca": "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt",
                "namespace": "/var/run/secrets/kubernetes.io/serviceaccount/namespace",
            },
            format="jwt",
            expiry="jwt",
            expiry_file="token",
            expiring_before="10m",
            expiring_fraction=0.8,
            remedies={
                "file-missing": "the kubelet mounts {path}; check the pod's serviceAccountName "
                "and that automountServiceAccountToken is not false",
                "expiring": "the kubelet should rotate {path} by itself; if it does not, check "
                "the kubelet and the pod's projected token volume (expirationSeconds)",
                "expired": "the kubelet did not rotate {path}; check the kubelet and the pod's "
                "projected token volume, or restart the pod",
            },
        ),
        "tls": Preset(
            name="tls",
            description="X.509 certificate and private key (PEM); set files.cert and files.key",
            files={"cert": "", "key": ""},
            format="pem",
            expiry="pem",
            expiry_file="cert",
            expiring_fraction=2 / 3,
            remedies={
                "expiring": "renew the certificate (e.g. certbot renew, or your CA's tooling) "
                "and write it to {path}",
                "expired": "the certificate in {path} has expired; renew it and write the new "
                "certificate and key",
            },
        ),
    }
)

# Generic remedies, used when the preset (or the credential's own `remedies`) has none.
_DEFAULT_REMEDIES: Mapping[str, str] = MappingProxyType(
    {
        "file-missing": "create {path} (or fix files.{role} in the config)",
        "file-unreadable": "check the owner and mode of {path} (ls -l {path})",
        "not-a-file": "{path} must be a regular file or a symlink to one (ls -l {path})",
        "symlink-loop": "fix the symlink loop at {path} (ls -l {path})",
        "too-large": "{path} is larger than the credential's max_size; check that files.{role} "
        "points at the right file, or raise max_size",
        "empty": "write the credential to {path}",
        "binary-content": "{path} holds binary data; write the credential to it as text",
        "not-utf8": "{path} is not UTF-8 text; rewrite it as UTF-8",
        "malformed-jwt": "{path} must hold one JWT (three base64url parts joined by dots); "
        "fetch a new token and write it there",
        "malformed-json": "{path} must hold valid JSON; fetch the credential again or fix it",
        "not-a-json-object": "{path} must hold a JSON object; check that files.{role} points "
        "at the right file",
        "no-certificate": "{path} must contain at least one PEM certificate "
        "(-----BEGIN CERTIFICATE-----)",
        "malformed-pem": "{path} is not valid PEM; re-issue or re-export the certificate",
        "malformed-ini": "{path} must parse as an INI file; fix its syntax",
        "no-expiry": "{path} has no expiry where the config's `expiry` says; fix `expiry` "
        "or use expiry = \"none\"",
        "bad-expiry": "the expiry in {path} is not a time; check the config's `expiry` setting",
        "expiry-out-of-range": "the expiry in {path} is implausible; check the issuer and the "
        "config's `expiry` setting",
        "insecure-permissions": "chmod 600 {path}",
        "expiring": "renew the credential soon and write it to {path}",
        "expired": "renew the credential and write it to {path}",
        "watch-polling": "changes to {path} are found by polling, not inotify; raise "
        "fs.inotify.max_user_watches / max_user_instances (sysctl)",
        "validator-unreachable": "check network access to the credential's validate url; "
        "the status stays as it was until a check gets an answer",
    }
)


def display_path(path: str) -> str:
    """``path`` quoted for a shell where needed; a leading ``~/`` stays unquoted to expand."""
    if path.startswith("~/"):
        return "~/" + shlex.quote(path[2:]) if path[2:] else "~/"
    if path == "~":
        return path
    return shlex.quote(path) if path else path


def fill_remedy(template: str, path: str, role: str) -> str:
    """Fill ``{path}`` and ``{role}`` in a remedy template.

    Plain replacement rather than ``str.format``: remedy texts are free prose (a user may
    write ``{`` in one), and only these two placeholders mean anything.
    """
    return template.replace("{path}", display_path(path)).replace("{role}", role)


def default_remedy(code: str, path: str, role: str) -> str | None:
    """A generic remedy for problem ``code`` of the file ``path`` (role ``role``), or ``None``."""
    template = _DEFAULT_REMEDIES.get(code)
    return None if template is None else fill_remedy(template, path, role)
