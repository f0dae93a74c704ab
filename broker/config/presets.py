"""Credential presets, and the remedy hints attached to problems.

A preset is *data*: the file roles and paths, format, expiry sources, content selector, pair
check, fallback files, parameters and remedy texts of a well-known credential. The config
loader applies any preset the same way (preset values first, then the user's keys), so adding
a preset means adding an entry to :data:`PRESETS` and nothing else: no code anywhere asks
which preset a credential came from.

Path templates may start with ``~`` and use ``$VARS``, ``${VAR}`` and ``${VAR:-default}``
(the default may itself hold ``~`` and ``${...}``); the config loader expands them. An empty
path template means "this role exists, but the user must say where the file is" (see
``tls``). A last path component with ``*``, ``?`` or ``[`` is a pattern: the role is the set
of matching files (see ``aws-sso``).

``parameters`` are credential keys the preset accepts (``profile = "dev"``), with defaults;
``{name}`` in the expiry sources, selector, remedy texts and refresh command is replaced by the
value (see ``aws``).

Remedy templates may use ``{path}`` (the role's file, shell-quoted), ``{path:<role>}`` (another
role's file) and ``{role}``. A remedy key is a problem code (``"file-missing"``) or a code for
one role (``"file-missing:tenant_id"``); the role-specific key wins.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

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
        "section-missing",  # select = "ini-section:..." names a section the file lacks
        "malformed-key",  # key_file holds no readable PEM private key
        "key-mismatch",  # key_file's key does not belong to the certificate
        "no-expiry",
        "bad-expiry",
        "expiry-out-of-range",
        "insecure-permissions",
        "expiring",
        "expired",
        "watch-polling",
        "writer-active",  # a process holds the file open for writing
        "noisy-directory",  # the file's directory floods the broker with unrelated events
        "validator-unreachable",  # SPEC section 2, validate
        "validator-unexpected-status",  # the validator answered neither expect nor 401/403
        "rejected-by-validator",  # 401/403 from the validator: the content is invalid
        "refresh-failed",  # the refresh command failed; retried with backoff
        "settling",  # POST check: a change to invalid/missing is held back by `settle`
    }
)


def _frozen(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    # Presets are module-level shared data: a read-only view stops one caller mutating
    # what every later config load sees.
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True, slots=True)
class PresetFallback:
    """Files to use instead when the preset's expiry file is absent (see ``nebius``)."""

    files: Mapping[str, str]
    format: str = "text"
    expiry: str | tuple[str, ...] = "none"
    expiry_file: str | None = None  # None = the first role
    remedies: Mapping[str, str] = field(default_factory=lambda: _frozen({}))  # its own roles'

    def __post_init__(self) -> None:
        object.__setattr__(self, "files", _frozen(self.files))
        object.__setattr__(self, "remedies", _frozen(self.remedies))


@dataclass(frozen=True, slots=True)
class Preset:
    """Defaults for a well-known credential; every field can be overridden in the config."""

    name: str
    description: str
    files: Mapping[str, str]  # role -> path template, in order; "" = the user must supply it
    format: str = "text"
    expiry: str | tuple[str, ...] = "none"  # a tuple: tried in order (see config `expiry`)
    expiry_file: str | None = None  # None = the first role
    select: str | None = None  # e.g. "ini-section:{profile}"
    key_file: str | None = None  # role holding the private key of the expiry file's certificate
    # Roles whose files must not be open to group or others; None = every role.
    private_roles: tuple[str, ...] | None = None
    expiring_before: str | None = None  # duration text; None = the global default
    expiring_fraction: float | None = None  # None = the global default
    parameters: Mapping[str, str] = field(default_factory=lambda: _frozen({}))  # name -> default
    fallback: PresetFallback | None = None
    # A default `refresh` table (SPEC section 2). No built-in preset sets one: running a
    # cloud CLI on a user's behalf is something they opt into in their config.
    refresh: Mapping[str, Any] | None = None
    remedies: Mapping[str, str] = field(default_factory=lambda: _frozen({}))
    notes: str = ""  # shown by `credbroker presets`

    def __post_init__(self) -> None:
        # Freeze the mappings whatever the caller passed (dataclass(frozen) needs the
        # object.__setattr__ route for that).
        object.__setattr__(self, "files", _frozen(self.files))
        object.__setattr__(self, "remedies", _frozen(self.remedies))
        object.__setattr__(self, "parameters", _frozen(self.parameters))
        if self.refresh is not None:
            object.__setattr__(self, "refresh", _frozen(self.refresh))

    @property
    def expiry_sources(self) -> tuple[str, ...]:
        return (self.expiry,) if isinstance(self.expiry, str) else tuple(self.expiry)


_NEBIUS_RENEW = "nebius iam get-access-token > {path}"
_NEBIUS_TENANT = (
    "find your tenant ID in the Nebius web console or with `nebius iam tenant list`, "
    "then: echo <tenant-id> > {path}"
)
_AWS_CONFIGURE = "aws configure --profile {profile}"
_AWS_SESSION = (
    "renew the temporary credentials of profile {profile} with the tool that wrote them "
    "(e.g. saml2aws login --profile {profile}), or use SSO: aws sso login --profile {profile}"
)
_AWS_SSO_LOGIN = "aws sso login (add --profile NAME or --sso-session NAME for other sessions)"
_GCLOUD_ADC = "gcloud auth application-default login"
_GCLOUD_TOKEN = "gcloud auth print-access-token > {path}"  # noqa: S105 (a command, no secret)
_K8S = "/var/run/secrets/kubernetes.io/serviceaccount"

PRESETS: Mapping[str, Preset] = MappingProxyType(
    {
        "nebius": Preset(
            name="nebius",
            description="Nebius AI Cloud IAM token and tenant ID, as the Nebius CLI and "
            "SkyPilot use them (tokens live 12h); a service account's credentials.json "
            "when there is no token file",
            files={
                "token": "~/.nebius/NEBIUS_IAM_TOKEN.txt",
                "tenant_id": "~/.nebius/NEBIUS_TENANT_ID.txt",
            },
            format="text",
            expiry="ttl:12h",
            expiry_file="token",
            # The Nebius tooling's own order: the token file if it exists, else the service
            # account credentials (which sign their own short-lived tokens: no expiry).
            fallback=PresetFallback(
                files={
                    "credentials": "~/.nebius/credentials.json",
                    "tenant_id": "~/.nebius/NEBIUS_TENANT_ID.txt",
                },
                format="json",
                expiry="none",
                expiry_file="credentials",
                remedies={
                    "malformed-json:credentials": "{path} must hold a service account's "
                    "credentials JSON; re-create it: nebius iam auth-public-key generate "
                    "--parent-id <project-id> --service-account-id <id> --output {path}",
                },
            ),
            remedies={
                # Role-qualified: the token command is no fix for a missing tenant ID file.
                "file-missing:token": f"run: {_NEBIUS_RENEW} (or, for a service account, "
                "put its credentials in ~/.nebius/credentials.json)",
                "empty:token": f"run: {_NEBIUS_RENEW}",
                "expiring:token": f"renew the token now: {_NEBIUS_RENEW}",
                "expired:token": f"run: {_NEBIUS_RENEW}",
                "file-missing:tenant_id": _NEBIUS_TENANT,
                "empty:tenant_id": _NEBIUS_TENANT,
            },
            notes='Renew automatically: refresh = { command = ["nebius", "iam", '
            '"get-access-token"], output = "token" }',
        ),
        "aws": Preset(
            name="aws",
            description="one profile of the AWS shared credentials file (static keys, or "
            "session credentials with an expiry); other profiles do not count",
            files={"credentials": "${AWS_SHARED_CREDENTIALS_FILE:-~/.aws/credentials}"},
            format="ini",
            select="ini-section:{profile}",
            expiry=(
                "ini:{profile}.x_security_token_expires",
                "ini:{profile}.aws_expiration",
                "none",
            ),
            # botocore refreshes its own session credentials 15 min before expiry.
            expiring_before="15m",
            parameters={"profile": "default"},
            remedies={
                "file-missing": f"{_AWS_CONFIGURE} (or aws sso login --profile {{profile}} "
                "for SSO users)",
                "section-missing": f"{_AWS_CONFIGURE} (or aws sso login --profile {{profile}} "
                "for SSO users)",
                "malformed-ini": "{path} must parse as INI; fix its syntax or re-create the "
                f"profile: {_AWS_CONFIGURE}",
                "expiring": _AWS_SESSION,
                "expired": _AWS_SESSION,
            },
        ),
        "aws-sso": Preset(
            name="aws-sso",
            description="AWS IAM Identity Center (SSO) token cache, every file in it; the "
            "soonest expiry among them counts",
            files={"cache": "~/.aws/sso/cache/*.json"},
            format="json",
            expiry="json:expiresAt",
            expiring_before="15m",
            remedies={
                "file-missing": f"run: {_AWS_SSO_LOGIN}",
                "expiring": f"run: {_AWS_SSO_LOGIN}",
                "expired": f"run: {_AWS_SSO_LOGIN}",
                "malformed-json": f"{{path}} is not valid JSON; delete it and run: "
                f"{_AWS_SSO_LOGIN}",
                "not-a-json-object": f"delete {{path}} and run: {_AWS_SSO_LOGIN}",
                "bad-expiry": f"delete {{path}} and run: {_AWS_SSO_LOGIN}",
            },
            notes="Stale cache files of sessions you no longer use count too: "
            "aws sso logout removes them.",
        ),
        "gcp": Preset(
            name="gcp",
            description="Google Cloud application default credentials (refresh-token or "
            "service account key JSON; no expiry of their own)",
            files={
                "credentials": "${GOOGLE_APPLICATION_CREDENTIALS:-"
                "${CLOUDSDK_CONFIG:-~/.config/gcloud}/application_default_credentials.json}"
            },
            format="json",
            expiry="none",
            remedies={
                "file-missing": f"run: {_GCLOUD_ADC}",
                "empty": f"run: {_GCLOUD_ADC}",
                "malformed-json": f"run: {_GCLOUD_ADC}",
                "not-a-json-object": f"run: {_GCLOUD_ADC}",
            },
        ),
        "gcp-token": Preset(
            name="gcp-token",
            description="a Google Cloud access token written to a file by gcloud (tokens "
            "live 1h); set files.token",
            files={"token": ""},
            format="text",
            expiry="ttl:1h",
            expiring_before="15m",
            remedies={
                "file-missing": f"run: {_GCLOUD_TOKEN}",
                "empty": f"run: {_GCLOUD_TOKEN}",
                "expiring": f"renew the token now: {_GCLOUD_TOKEN}",
                "expired": f"run: {_GCLOUD_TOKEN}",
            },
            notes="The lifetime counts from the file's mtime: write the token as soon as "
            "gcloud prints it.",
        ),
        "kubernetes": Preset(
            name="kubernetes",
            description="Kubernetes service account token, CA and namespace mounted into a pod "
            "(the kubelet rotates projected tokens)",
            files={
                "token": f"{_K8S}/token",
                "ca": f"{_K8S}/ca.crt",
                "namespace": f"{_K8S}/namespace",
            },
            format="jwt",
            expiry="jwt",
            expiry_file="token",
            # The kubelet rotates a projected token once it is 80% through its lifetime and
            # writes it out at its next volume sync (a minute or two later). Expiring at 90%
            # leaves it that time, so a healthy pod never sees `expiring`, and still gives
            # consumers a tenth of the lifetime (6 min of the default 1h) to act when the
            # rotation did not happen.
            expiring_before="1m",
            expiring_fraction=0.9,
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
            description="X.509 certificate and its private key (PEM), checked to belong "
            "together; set files.cert and files.key (and files.ca if you like)",
            files={"cert": "", "key": ""},
            format="pem",
            expiry="pem",
            expiry_file="cert",
            key_file="key",
            # A certificate is public (certbot and openssl write it 0644): only the key's
            # permissions matter.
            private_roles=("key",),
            # cert-manager's default: renew when a third of the lifetime is left.
            expiring_fraction=2 / 3,
            remedies={
                "expiring": "renew the certificate (certbot renew, cmctl renew <name> for "
                "cert-manager, or your CA's tooling) and write it to {path}",
                "expired": "the certificate in {path} has expired; renew it and write the new "
                "certificate and key",
                "key-mismatch": "install the key issued with the certificate: compare "
                "`openssl pkey -in {path} -pubout` with "
                "`openssl x509 -in {path:cert} -noout -pubkey`",
                "malformed-key": "{path} must hold the certificate's private key in PEM "
                "(-----BEGIN PRIVATE KEY-----)",
            },
        ),
        # The three below are the files SkyPilot-style services build cached clients from
        # (issue 15); pair them with broker.client's `invalidates` to clear those caches.
        "kubeconfig": Preset(
            name="kubeconfig",
            description="the kubeconfig kubectl and Kubernetes clients read (YAML, checked as "
            "text; exec plugins and tokens inside carry no expiry the broker can read)",
            files={"kubeconfig": "${KUBECONFIG:-~/.kube/config}"},
            format="text",
            expiry="none",
            remedies={
                "file-missing": "write it with your cluster's tool (aws eks update-kubeconfig, "
                "gcloud container clusters get-credentials, az aks get-credentials) or set "
                "KUBECONFIG; kubectl config view checks it",
                "empty": "{path} is empty; write it again with your cluster's tool "
                "(e.g. aws eks update-kubeconfig)",
            },
            notes="KUBECONFIG with several files (a:b) is not split: name one file in files.",
        ),
        "cloudflare-r2": Preset(
            name="cloudflare-r2",
            description="Cloudflare R2 access keys (AWS-style INI, profile r2) and the "
            "account ID, where SkyPilot reads them",
            files={
                "credentials": "~/.cloudflare/r2.credentials",
                "account_id": "~/.cloudflare/accountid",
            },
            format="text",
            expiry="none",
            expiry_file="credentials",
            remedies={
                "file-missing:credentials": "create an R2 API token in the Cloudflare "
                "dashboard, then: AWS_SHARED_CREDENTIALS_FILE={path} aws configure "
                "--profile r2",
                "empty:credentials": "AWS_SHARED_CREDENTIALS_FILE={path} aws configure "
                "--profile r2",
                "file-missing:account_id": "echo <your Cloudflare account ID> > {path}",
                "empty:account_id": "echo <your Cloudflare account ID> > {path}",
            },
        ),
        "nebius-object-storage": Preset(
            name="nebius-object-storage",
            description="the nebius profile of the AWS shared credentials file: Nebius "
            "Object Storage's S3 access keys (no expiry); other profiles do not count",
            files={"credentials": "${AWS_SHARED_CREDENTIALS_FILE:-~/.aws/credentials}"},
            format="ini",
            select="ini-section:{profile}",
            expiry="none",
            parameters={"profile": "nebius"},
            remedies={
                "file-missing": "create an access key (nebius iam access-key create), then: "
                "aws configure --profile {profile}",
                "section-missing": "create an access key (nebius iam access-key create), then: "
                "aws configure --profile {profile}",
                "malformed-ini": "{path} must parse as INI; fix its syntax or re-create the "
                "profile: aws configure --profile {profile}",
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
        "section-missing": "{path} lacks the section the credential's `select` names; add it, "
        "or fix `select` (or the preset's `profile`)",
        "malformed-key": "{path} must hold a PEM private key (-----BEGIN PRIVATE KEY-----)",
        "key-mismatch": "{path} holds a private key that does not belong to the certificate; "
        "install the key that was issued with it (or re-issue both)",
        "no-expiry": "{path} has no expiry where the config's `expiry` says; fix `expiry` "
        'or use expiry = "none"',
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
        "validator-unexpected-status": "check the validate url and its expect codes; "
        "the status stays as it was",
        "rejected-by-validator": "the API refused the credential in {path}: renew it",
        "refresh-failed": "run the credential's refresh command by hand to see why it fails",
        "settling": "nothing to do yet: a writer may still be completing {path}; check again "
        "after the settle window",
        "writer-active": "nothing, if the writer rewrites {path} in place and keeps it open; "
        "otherwise let it finish (the content is published once it holds still)",
        "noisy-directory": "give the credential its own directory: move {path} where nothing "
        "else writes",
    }
)


def display_path(path: str) -> str:
    """``path`` quoted for a shell where needed; a leading ``~/`` stays unquoted to expand."""
    if path.startswith("~/"):
        return "~/" + shlex.quote(path[2:]) if path[2:] else "~/"
    if path == "~":
        return path
    return shlex.quote(path) if path else path


def fill_remedy(template: str, path: str, role: str, paths: Mapping[str, str] | None = None) -> str:
    """Fill ``{path}``, ``{path:<role>}`` (from ``paths``, role -> path) and ``{role}``.

    Plain replacement rather than ``str.format``: remedy texts are free prose (a user may
    write ``{`` in one), and only these placeholders mean anything.
    """
    for other, other_path in (paths or {}).items():
        template = template.replace(f"{{path:{other}}}", display_path(other_path))
    return template.replace("{path}", display_path(path)).replace("{role}", role)


def default_remedy(code: str, path: str, role: str) -> str | None:
    """A generic remedy for problem ``code`` of the file ``path`` (role ``role``), or ``None``."""
    template = _DEFAULT_REMEDIES.get(code)
    return None if template is None else fill_remedy(template, path, role)
