"""Config loading and validation (SPEC section 2): good configs, and every error's key path."""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.config import (
    Config,
    ConfigError,
    CredentialSettings,
    expand_template,
    glob_matches,
    is_glob,
    load_config,
    parse_config,
)
from broker.config.presets import PRESETS, PROBLEM_CODES, Preset, default_remedy
from broker.core.expiry import ExpirySource, parse_expiry_source
from broker.core.formats import Selector

SPEC_EXAMPLE = """
[broker]
host_id = "web-1"
state_dir = "/var/lib/credbroker"
resync_interval = "30s"

[mqtt]
url = "mqtt://127.0.0.1:1883"
topic_prefix = "credbroker"

[http]
listen = "127.0.0.1:8790"

[[credentials]]
name = "nebius"
preset = "nebius"

[[credentials]]
name = "svc"
files = { token = "/run/secrets/svc/token" }
format = "jwt"
expiry = "jwt"
expiry_file = "token"
expiring_before = "15m"
expiring_fraction = 0.8
max_size = "1MiB"
refresh = { command = ["nebius", "iam", "get-access-token"], output = "token", timeout = "60s", on = "expiring" }
validate = { url = "https://api.example.com/v1/whoami", header = "Authorization: Bearer {token}", expect = [200], interval = "10m", timeout = "10s" }
"""  # noqa: E501  (the SPEC's lines, verbatim)

EXPIRY_MESSAGE = (
    'unknown source "jwtt"; expected jwt, json:<path>, ini:<section>.<key>, pem, '
    "ttl:<duration>, none"
)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    return path


@pytest.fixture
def env(home: Path) -> dict[str, str]:
    return {"HOME": str(home), "SECRETS": "/run/secrets"}


def cred(name: Any = "svc", **extra: Any) -> dict[str, Any]:
    """A minimal valid credential table, with overrides."""
    return {"name": name, "files": {"token": "/run/secrets/token"}, **extra}


def errors_of(
    data: dict[str, Any], env: dict[str, str], presets: Mapping[str, Preset] = PRESETS
) -> dict[str, str]:
    """parse_config must fail; return {key path: message}."""
    with pytest.raises(ConfigError) as info:
        parse_config(data, env=env, presets=presets)
    return dict(info.value.errors)


def write(tmp_path: Path, text: str, name: str = "broker.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------
# Good configs


def test_spec_example_loads(tmp_path: Path, env: dict[str, str], home: Path) -> None:
    config = load_config(write(tmp_path, SPEC_EXAMPLE), env=env)

    assert config.source_path == tmp_path / "broker.toml"
    assert config.broker.host_id == "web-1"
    assert config.broker.state_dir == Path("/var/lib/credbroker")
    assert config.broker.resync_interval == 30.0
    assert config.mqtt is not None
    assert (config.mqtt.host, config.mqtt.port, config.mqtt.tls) == ("127.0.0.1", 1883, False)
    assert config.mqtt.topic_prefix == "credbroker"
    assert config.http is not None
    assert (config.http.host, config.http.port, config.http.unix_path) == ("127.0.0.1", 8790, None)

    nebius = config.credential("nebius")
    assert nebius.files == {
        "token": home / ".nebius/NEBIUS_IAM_TOKEN.txt",
        "tenant_id": home / ".nebius/NEBIUS_TENANT_ID.txt",
    }
    assert list(nebius.files) == ["token", "tenant_id"]
    assert nebius.expiry == ExpirySource("ttl", ttl=12 * 3600.0)

    svc = config.credential("svc")
    assert svc.files == {"token": Path("/run/secrets/svc/token")}
    assert (svc.format, svc.expiry, svc.expiry_file) == ("jwt", ExpirySource("jwt"), "token")
    assert (svc.expiring_before, svc.expiring_fraction, svc.max_size) == (900.0, 0.8, 1024**2)
    assert svc.refresh is not None
    assert svc.refresh.command == ("nebius", "iam", "get-access-token")
    assert (svc.refresh.output, svc.refresh.timeout, svc.refresh.on) == ("token", 60.0, "expiring")
    assert svc.validate_ is not None
    assert svc.validate_.expect == (200,)
    assert (svc.validate_.interval, svc.validate_.timeout) == (600.0, 10.0)
    assert svc.validate_.placeholders == ("token",)

    with pytest.raises(KeyError):
        config.credential("nope")


def test_minimal_config_defaults(env: dict[str, str], home: Path) -> None:
    config = parse_config({"credentials": [cred()]}, env=env)

    assert config.mqtt is None and config.http is None
    assert config.source_path is None
    broker = config.broker
    assert broker.state_dir == home / ".local/state/credbroker"
    assert broker.resync_interval == 30.0
    assert broker.log_level == "info"
    assert broker.fingerprint_key_file is None
    assert broker.host_id  # the short host name, already validated
    (svc,) = config.credentials
    assert svc.format == "text"
    assert svc.expiry == ExpirySource("none")
    assert svc.expiry_file == "token"
    assert (svc.expiring_before, svc.expiring_fraction, svc.max_size) == (900.0, 0.8, 1024**2)
    assert svc.refresh is None and svc.validate_ is None and svc.preset is None


def test_state_dir_from_xdg(env: dict[str, str]) -> None:
    env["XDG_STATE_HOME"] = "/xdg/state"
    config = parse_config({"credentials": [cred()]}, env=env)
    assert config.broker.state_dir == Path("/xdg/state/credbroker")


def test_state_dir_without_home_is_an_error() -> None:
    errors = errors_of({"credentials": [cred()]}, env={})
    assert "HOME is not set" in errors["broker.state_dir"]


def test_nebius_preset_expands_home(env: dict[str, str], home: Path) -> None:
    config = parse_config({"credentials": [{"preset": "nebius"}]}, env=env)
    (nebius,) = config.credentials
    assert nebius.name == "nebius"  # defaults to the preset's name
    assert nebius.files["token"] == home / ".nebius/NEBIUS_IAM_TOKEN.txt"
    assert nebius.files["tenant_id"] == home / ".nebius/NEBIUS_TENANT_ID.txt"
    assert (nebius.format, nebius.expiry_file) == ("text", "token")
    assert str(nebius.expiry) == "ttl:43200s"

    hint = "nebius iam get-access-token > ~/.nebius/NEBIUS_IAM_TOKEN.txt"
    for code in ("file-missing", "empty", "expired", "expiring"):
        remedy = nebius.remedy(code, "token")
        assert remedy is not None and hint in remedy
    tenant = nebius.remedy("file-missing", "tenant_id")
    assert tenant is not None
    assert "tenant" in tenant and "~/.nebius/NEBIUS_TENANT_ID.txt" in tenant
    assert "get-access-token" not in tenant
    # No preset remedy: the generic one, with the role's path.
    assert nebius.remedy("insecure-permissions", "token") == (
        "chmod 600 ~/.nebius/NEBIUS_IAM_TOKEN.txt"
    )
    assert nebius.remedy("no-such-code", "token") is None


def test_preset_keys_are_overridden_and_files_merged(env: dict[str, str], home: Path) -> None:
    data = {
        "credentials": [
            {
                "name": "neb",
                "preset": "nebius",
                "files": {"token": "/elsewhere/token", "extra": "~/extra"},
                "expiring_before": "1h",
                "remedies": {"expired": "page the on-call"},
            }
        ]
    }
    (neb,) = parse_config(data, env=env).credentials
    assert neb.name == "neb"
    assert neb.files == {
        "token": Path("/elsewhere/token"),
        "tenant_id": home / ".nebius/NEBIUS_TENANT_ID.txt",
        "extra": home / "extra",
    }
    assert neb.expiring_before == 3600.0
    assert neb.remedy("expired", "token") == (
        "run: nebius iam get-access-token > /elsewhere/token"
    )  # the role-specific preset remedy still wins over a plain code
    assert neb.remedy("expired", "extra") == "page the on-call"


def test_kubernetes_preset(env: dict[str, str]) -> None:
    (k8s,) = parse_config({"credentials": [{"preset": "kubernetes"}]}, env=env).credentials
    base = Path("/var/run/secrets/kubernetes.io/serviceaccount")
    assert k8s.files == {"token": base / "token", "ca": base / "ca.crt",
                         "namespace": base / "namespace"}
    assert (k8s.format, k8s.expiry, k8s.expiry_file) == ("jwt", ExpirySource("jwt"), "token")
    # After the kubelet's own rotation at 80% (and its volume sync), before the end.
    assert (k8s.expiring_before, k8s.expiring_fraction) == (60.0, 0.9)


def test_tls_preset_needs_paths(env: dict[str, str]) -> None:
    errors = errors_of({"credentials": [{"preset": "tls"}]}, env)
    assert set(errors) == {"credentials[0].files.cert", "credentials[0].files.key"}
    assert "files = { cert" in errors["credentials[0].files.cert"]

    data = {"credentials": [{"preset": "tls", "files": {"cert": "/c.pem", "key": "/k.pem"}}]}
    (tls,) = parse_config(data, env=env).credentials
    assert (tls.format, tls.expiry, tls.expiry_file) == ("pem", ExpirySource("pem"), "cert")
    assert tls.expiring_fraction == pytest.approx(2 / 3)


def test_path_expansion(tmp_path: Path, env: dict[str, str], home: Path) -> None:
    env["DIR"] = "/srv"
    files = {
        "a": "$SECRETS/a",
        "b": "${SECRETS}/b",
        "c": "~/c",
        "d": "rel/d",
        "e": "/x/$$literal",
        "f": "~",
    }
    path = write(tmp_path, "")
    config = parse_config({"credentials": [cred(files=files)]}, env=env, source_path=path)
    assert config.credentials[0].files == {
        "a": Path("/run/secrets/a"),
        "b": Path("/run/secrets/b"),
        "c": home / "c",
        "d": tmp_path / "rel/d",
        "e": Path("/x/$literal"),
        "f": home,
    }


def test_relative_paths_without_a_file_use_the_cwd(
    tmp_path: Path, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = parse_config({"credentials": [cred(files={"t": "x/t"})]}, env=env)
    assert config.credentials[0].files["t"] == tmp_path / "x/t"


def test_durations_and_sizes(env: dict[str, str]) -> None:
    data = {
        "broker": {"resync_interval": 5},
        "credentials": [cred(expiring_before="250ms", max_size=512, expiry="ttl:7d")],
    }
    config = parse_config(data, env=env)
    assert config.broker.resync_interval == 5.0
    (svc,) = config.credentials
    assert (svc.expiring_before, svc.max_size, svc.expiry.ttl) == (0.25, 512, 7 * 86400.0)


def test_listen_forms(env: dict[str, str]) -> None:
    def http(section: dict[str, Any]) -> Any:
        return parse_config({"http": section, "credentials": [cred()]}, env=env).http

    assert (http({}).host, http({}).port) == ("127.0.0.1", 8790)
    v6 = http({"listen": "[::1]:9000"})
    assert (v6.host, v6.port, v6.unix_path) == ("::1", 9000, None)
    unix = http({"listen": "unix:~/broker.sock"})
    assert (unix.host, unix.port) == (None, None)
    assert unix.unix_path == Path(env["HOME"]) / "broker.sock"
    public = http({"listen": "0.0.0.0:8790", "token_file": "/etc/credbroker/token"})
    assert public.token_file == Path("/etc/credbroker/token")


def test_mqtt_urls(env: dict[str, str]) -> None:
    def mqtt(section: dict[str, Any]) -> Any:
        return parse_config({"mqtt": section, "credentials": [cred()]}, env=env).mqtt

    tls = mqtt({"url": "mqtts://mq.example.com", "password_file": "/p", "username": "u"})
    assert (tls.host, tls.port, tls.tls) == ("mq.example.com", 8883, True)
    assert mqtt({"url": "mqtt://[::1]"}).host == "::1"
    # A password over plain MQTT is fine to loopback, or when explicitly allowed.
    assert mqtt({"url": "mqtt://localhost", "password_file": "/p"}).port == 1883
    assert mqtt({"url": "mqtt://mq:1884", "password_file": "/p", "allow_insecure": True})


def test_config_file_from_env_var(tmp_path: Path, env: dict[str, str]) -> None:
    path = write(tmp_path, '[[credentials]]\nname = "a"\nfiles = { t = "/t" }\n')
    env["CREDBROKER_CONFIG"] = str(path)
    assert load_config(env=env).credentials[0].name == "a"


# ---------------------------------------------------------------------------------------------
# Errors, each at its exact key path


@pytest.mark.parametrize(
    ("data", "path", "message"),
    [
        ({"fromat": 1}, "fromat", 'unknown key "fromat"'),
        ({"credential": []}, "credential", '(did you mean "credentials"?)'),
        ({"broker": {"hostid": "a"}}, "broker.hostid", '(did you mean "host_id"?)'),
        ({"mqtt": {"url": "mqtt://h", "topic": "x"}}, "mqtt.topic", 'unknown key "topic"'),
        ({"http": {"listn": "x"}}, "http.listn", '(did you mean "listen"?)'),
        ({"credentials": [cred(fromat="jwt")]}, "credentials[0].fromat",
         'unknown key "fromat" (did you mean "format"?)'),
        ({"credentials": [cred(refresh={"command": ["x"], "outptu": "t"})]},
         "credentials[0].refresh.outptu", '(did you mean "output"?)'),
        ({"credentials": [cred(validate={"url": "https://a", "expct": [200]})]},
         "credentials[0].validate.expct", '(did you mean "expect"?)'),
        ({"credentials": [cred(validate_={"url": "https://a"})]},
         "credentials[0].validate_", '(did you mean "validate"?)'),
        ({"host_id": "x"}, "host_id", "[broker] table"),
    ],
)
def test_unknown_keys(data: dict[str, Any], path: str, message: str, env: dict[str, str]) -> None:
    data.setdefault("credentials", [cred()])
    errors = errors_of(data, env)
    assert message in errors[path]


def test_bad_expiry_source_message_is_verbatim(tmp_path: Path, env: dict[str, str]) -> None:
    text = SPEC_EXAMPLE + '\n[[credentials]]\nname = "x"\nfiles = { t = "/t" }\nexpiry = "jwtt"\n'
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), env=env)
    assert info.value.errors == [("credentials[2].expiry", EXPIRY_MESSAGE)]
    assert f"credentials[2].expiry: {EXPIRY_MESSAGE}" in str(info.value)
    assert str(info.value).startswith(str(tmp_path / "broker.toml"))


@pytest.mark.parametrize(
    ("credential", "path", "message"),
    [
        (cred(expiring_before="15 minutes"), "expiring_before", "invalid duration"),
        (cred(expiring_before=True), "expiring_before", "expected a duration"),
        (cred(expiring_before="99999d"), "expiring_before", "too long"),
        (cred(expiring_fraction=0), "expiring_fraction", "greater than 0"),
        (cred(expiring_fraction=1.5), "expiring_fraction", "at most 1"),
        (cred(max_size="lots"), "max_size", "invalid size"),
        (cred(max_size=1.5), "max_size", "expected a size"),
        (cred(format="yaml"), "format", '"text", "jwt", "json", "pem" or "ini"'),
        (cred(expiry=3), "expiry", "expected a string"),
        (cred(expiry="ttl:0s"), "expiry", "greater than zero"),
        (cred(name="Svc"), "name", 'invalid name "Svc"'),
        (cred(name="a" * 65), "name", "longer than 64"),
        (cred(name=7), "name", "expected a string"),
        (cred(preset="nebuis"), "preset", 'unknown preset "nebuis" (did you mean "nebius"?); '
         "known presets: aws, aws-sso, cloudflare-r2, gcp, gcp-token, kubeconfig, "
         "kubernetes, nebius, nebius-object-storage, tls"),
        (cred(files={}), "files", "at least one file"),
        (cred(files="/x"), "files", "expected a table"),
        (cred(files={"t": "/x", "u": "/x"}), "files.u", 'same file as role "t"'),
        (cred(files={"ca.crt": "/x"}), 'files."ca.crt"', "invalid role name"),
        (cred(files={"t": 5}), "files.t", "expected a path"),
        (cred(files={"t": ""}), "files.t", "the path is empty"),
        (cred(files={"t": "$UNSET/t"}), "files.t", "environment variable $UNSET is not set"),
        (cred(files={"t": "${EMPTY}/t"}), "files.t", "environment variable $EMPTY is empty"),
        (cred(files={"t": "${oops/t"}), "files.t", 'malformed "${...}"'),
        (cred(files={"t": "~nosuchuser-xyz/t"}), "files.t", "no such user"),
        (cred(expiry_file="cert"), "expiry_file", '"cert" is not a role of this credential'),
        (cred(refresh={"command": ["x"], "output": "cert"}), "refresh.output",
         '"cert" is not a role of this credential; roles: token'),
        (cred(refresh={"command": "nebius iam get-access-token"}), "refresh.command",
         "argv"),
        (cred(refresh={"command": []}), "refresh.command", "must not be empty"),
        (cred(refresh={"command": ["x"], "on": "soon"}), "refresh.on",
         '"expiring" or "expired"'),
        (cred(refresh={"command": ["x"], "timeout": "0s"}), "refresh.timeout",
         "greater than zero"),
        (cred(refresh={"output": "token"}), "refresh.command", "is required"),
        (cred(validate={"url": "http://api.example.com/"}), "validate.url", "https"),
        (cred(validate={"url": "ftp://api.example.com/"}), "validate.url", "scheme"),
        (cred(validate={"url": "https://a", "header": "Authorization: Bearer {tok}"}),
         "validate.header", "placeholder {tok} does not name a role"),
        (cred(validate={"url": "https://a", "header": "no colon"}), "validate.header",
         '"Name: value"'),
        (cred(validate={"url": "https://a", "expect": [200, 999]}), "validate.expect[1]",
         "100-599"),
        (cred(validate={"url": "https://a", "expect": []}), "validate.expect",
         "must not be empty"),
        (cred(remedies={"expird": "x"}), "remedies.expird", '(did you mean "expired"?)'),
        (cred(remedies={"expired:cert": "x"}), 'remedies."expired:cert"', "not a role"),
    ],
)
def test_credential_errors(
    credential: dict[str, Any], path: str, message: str, env: dict[str, str]
) -> None:
    env["EMPTY"] = ""
    errors = errors_of({"credentials": [cred("first"), credential]}, env)
    assert message in errors[f"credentials[1].{path}"], errors
    assert len(errors) == 1, errors


@pytest.mark.parametrize(
    ("data", "path", "message"),
    [
        ({"broker": {"host_id": "Web 1"}}, "broker.host_id", 'invalid host_id "Web 1"'),
        ({"broker": {"resync_interval": "0s"}}, "broker.resync_interval", "greater than zero"),
        ({"broker": {"resync_interval": "soon"}}, "broker.resync_interval", "invalid duration"),
        ({"broker": {"log_level": "loud"}}, "broker.log_level", '"debug", "info"'),
        ({"broker": "x"}, "broker", "expected a table"),
        ({"mqtt": {"url": "http://h"}}, "mqtt.url", "mqtt://host[:port]"),
        ({"mqtt": {"url": "mqtt://"}}, "mqtt.url", "no host"),
        ({"mqtt": {"url": "mqtt://h:99999"}}, "mqtt.url", "malformed url"),
        ({"mqtt": {"url": "mqtt://h/topic"}}, "mqtt.url", "no path"),
        ({"mqtt": {"url": "mqtt://bad host"}}, "mqtt.url", "whitespace"),
        ({"mqtt": {}}, "mqtt.url", "is required"),
        ({"mqtt": {"url": "mqtt://mq.example.com", "password_file": "/p"}}, "mqtt.url",
         "unencrypted"),
        ({"mqtt": {"url": "mqtt://mq", "ca_file": "/ca"}}, "mqtt.url", "use mqtts://"),
        ({"mqtt": {"url": "mqtts://mq", "key_file": "/k"}}, "mqtt.key_file", "needs cert_file"),
        ({"mqtt": {"url": "mqtt://h", "topic_prefix": "a/#"}}, "mqtt.topic_prefix", "wildcard"),
        ({"mqtt": {"url": "mqtt://h", "topic_prefix": "/a"}}, "mqtt.topic_prefix", '"/"'),
        ({"mqtt": {"url": "mqtt://h", "buffer": 0}}, "mqtt.buffer", "between 1 and"),
        ({"mqtt": {"url": "mqtt://h", "buffer": True}}, "mqtt.buffer", "whole number"),
        ({"mqtt": {"url": "mqtt://h", "allow_insecure": "yes"}}, "mqtt.allow_insecure",
         "true or false"),
        ({"http": {"listen": "0.0.0.0:8790"}}, "http.listen", "needs token_file"),
        ({"http": {"listen": "api.example.com:80"}}, "http.listen", "needs token_file"),
        ({"http": {"listen": "8790"}}, "http.listen", "malformed listen address"),
        ({"http": {"listen": "::1:8790"}}, "http.listen", "needs brackets"),
        ({"http": {"listen": "127.0.0.1:http"}}, "http.listen", "port"),
        ({"credentials": []}, "credentials", "no credentials configured"),
        ({"credentials": {"name": "x"}}, "credentials", "array of tables"),
        ({"source_path": "/etc/x"}, "source_path", 'unknown key "source_path"'),
    ],
)
def test_section_errors(
    data: dict[str, Any], path: str, message: str, env: dict[str, str]
) -> None:
    data.setdefault("credentials", [cred()])
    errors = errors_of(data, env)
    assert message in errors[path], errors


def test_duplicate_names(env: dict[str, str]) -> None:
    errors = errors_of({"credentials": [cred("a"), cred("b"), cred("a")]}, env)
    assert errors == {"credentials[2].name": 'duplicate credential name "a"; names must be unique'}


def test_duplicate_of_preset_default_name(env: dict[str, str]) -> None:
    errors = errors_of({"credentials": [{"preset": "nebius"}, cred("nebius")]}, env)
    assert "duplicate" in errors["credentials[1].name"]


def test_unknown_preset_does_not_also_complain_about_files(env: dict[str, str]) -> None:
    errors = errors_of({"credentials": [{"name": "x", "preset": "nope"}]}, env)
    assert list(errors) == ["credentials[0].preset"]


def test_inline_password_is_refused_without_echo(env: dict[str, str]) -> None:
    data = {"mqtt": {"url": "mqtt://127.0.0.1", "password": "hunter2"}, "credentials": [cred()]}
    with pytest.raises(ConfigError) as info:
        parse_config(data, env=env)
    errors = dict(info.value.errors)
    assert "password_file" in errors["mqtt.password"]
    assert "hunter2" not in str(info.value)
    assert "hunter2" not in repr(info.value.args)


def test_secrets_never_appear_in_errors(env: dict[str, str]) -> None:
    data = {
        "mqtt": {"url": "mqtt://user:s3cr3t-pw@mq.example.com:bad"},
        "http": {"listen": "0.0.0.0:1", "token": "s3cr3t-tok"},
        "credentials": [cred(validate={
            "url": "http://api.example.com/?key=s3cr3t-key",
            "header": "Authorization: Bearer s3cr3t-hdr\n",
        })],
    }
    with pytest.raises(ConfigError) as info:
        parse_config(data, env=env)
    text = str(info.value)
    assert "s3cr3t" not in text
    assert {"mqtt.url", "http.token", "credentials[0].validate.url",
            "credentials[0].validate.header"} <= set(dict(info.value.errors))


def test_several_errors_are_reported_together(tmp_path: Path, env: dict[str, str]) -> None:
    text = """
[broker]
host_id = "Bad Host"
resync_interval = "often"

[mqtt]
url = "mqtt://127.0.0.1"
password = "x"

[http]
listen = "0.0.0.0:8790"

[[credentials]]
name = "a"
files = { token = "$NOT_SET/token" }
fromat = "jwt"

[[credentials]]
name = "a"
files = { token = "/t" }
expiry = "jwtt"
expiry_file = "cert"
refresh = { command = ["x"], output = "cert" }
"""
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), env=env)
    paths = [path for path, _ in info.value.errors]
    assert sorted(paths) == sorted([
        "broker.host_id",
        "broker.resync_interval",
        "mqtt.password",
        "http.listen",
        "credentials[0].files.token",
        "credentials[0].fromat",
        "credentials[1].name",
        "credentials[1].expiry",
        "credentials[1].expiry_file",
        "credentials[1].refresh.output",
    ])
    lines = str(info.value).splitlines()
    assert len(lines) == len(paths)
    assert all(line.startswith(f"{tmp_path / 'broker.toml'}: ") for line in lines)


def test_toml_syntax_error(tmp_path: Path, env: dict[str, str]) -> None:
    path = write(tmp_path, '[broker]\nhost_id = "a"\nstate_dir = \n')
    with pytest.raises(ConfigError) as info:
        load_config(path, env=env)
    message = str(info.value)
    assert message.startswith(f"{path}: invalid TOML")
    assert "line 3" in message


def test_not_utf8(tmp_path: Path, env: dict[str, str]) -> None:
    path = tmp_path / "broker.toml"
    path.write_bytes(b'name = "\xff"\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path, env=env)


def test_missing_file(tmp_path: Path, env: dict[str, str]) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path, env=env)
    assert str(info.value) == f"{path}: config file not found"
    assert info.value.source_path == path


def test_directory_instead_of_file(tmp_path: Path, env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="directory"):
        load_config(tmp_path, env=env)


def test_no_config_path(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="CREDBROKER_CONFIG"):
        load_config(env=env)


@pytest.mark.parametrize("strict", [True, False, None])
def test_credentials_inherit_strict_permissions_from_broker(
    env: dict[str, str], strict: bool | None
) -> None:
    broker = {} if strict is None else {"strict_permissions": strict}
    config = parse_config({"broker": broker, "credentials": [
        cred("inherits"), cred("strict", strict_permissions=True),
        cred("lenient", strict_permissions=False),
    ]}, env=env)
    assert [c.strict_permissions for c in config.credentials] == [bool(strict), True, False]


def test_models_built_in_python_are_validated_too(home: Path) -> None:
    spec = CredentialSettings(name="x", files={"t": Path("/t")})
    assert spec.expiry_file == "t"
    config = Config(broker={"state_dir": "/s"}, credentials=(spec,))  # type: ignore[arg-type]
    # The same settings, with strict_permissions inherited from [broker]; the caller's own
    # model is left as it was.
    assert config.credential("x") == spec.model_copy(update={"strict_permissions": False})
    assert spec.strict_permissions is None
    with pytest.raises(ValueError, match="duplicate"):
        Config(broker={"state_dir": "/s"}, credentials=(spec, spec))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Presets are data: every one loads through the generic path, its remedies are well-formed.


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_loads(name: str, env: dict[str, str]) -> None:
    preset = PRESETS[name]
    # Roles with no default path ("" templates) must be supplied by the user.
    files = {role: f"/supplied/{role}" for role, path in preset.files.items() if not path}
    table: dict[str, Any] = {"preset": name}
    if files:
        table["files"] = files
    (spec,) = parse_config({"credentials": [table]}, env=env).credentials
    assert list(spec.files) == list(preset.files)
    assert spec.format == preset.format
    assert str(spec.expiry) == str(ExpirySource(spec.expiry.kind, spec.expiry.path,
                                                spec.expiry.ttl))
    for key in preset.remedies:
        code, _, role = key.partition(":")
        assert code in PROBLEM_CODES
        assert not role or role in preset.files


def test_default_remedies_cover_every_code() -> None:
    for code in PROBLEM_CODES:
        remedy = default_remedy(code, "/p/x y", "token")
        assert remedy, code
        assert "{" not in remedy, code
    assert default_remedy("insecure-permissions", "/p/x y", "t") == "chmod 600 '/p/x y'"
    assert default_remedy("file-missing", "/p", "t") is not None
    assert default_remedy("unknown-code", "/p", "t") is None


# ---------------------------------------------------------------------------------------------
# Property: whatever the data, parse_config answers with a Config or a ConfigError.

_KEYS = st.sampled_from([
    "broker", "mqtt", "http", "credentials", "name", "preset", "files", "format", "expiry",
    "expiry_file", "expiring_before", "expiring_fraction", "max_size", "refresh", "validate",
    "remedies", "url", "listen", "token_file", "password", "command", "output", "header",
    "expect", "host_id", "state_dir", "resync_interval", "log_level", "token", "on", "timeout",
    "select", "key_file", "fallback", "profile", "parameters",
]) | st.text(string.ascii_lowercase + "_-.:", max_size=8)

_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["nebius", "tls", "kubernetes", "jwt", "ttl:1h", "~/x", "$HOME/x", "30s",
                       "mqtt://127.0.0.1", "0.0.0.0:1", "unix:/s", "https://a", "token",
                       "X: {token}", "expired", "aws", "aws-sso", "gcp", "ini-section:x",
                       "/d/*.json", "${X:-~/y}", "${X:-", "dev"])
    | st.datetimes()
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_KEYS, inner, max_size=5),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.dictionaries(_KEYS, _VALUES, max_size=5))
def test_random_data_raises_only_config_error(data: dict[str, Any]) -> None:
    error: ConfigError | None = None
    try:
        config = parse_config(data, env={"HOME": "/home/u"})
    except ConfigError as exc:
        error = exc
    if error is None:
        assert config.credentials
    else:
        assert error.errors
        assert all(isinstance(path, str) and message for path, message in error.errors)
        assert str(error)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=200))
def test_random_files_raise_only_config_error(text: str, tmp_path_factory: Any) -> None:
    path = tmp_path_factory.mktemp("cfg") / "broker.toml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    error: ConfigError | None = None
    try:
        load_config(path, env={"HOME": "/home/u"})
    except ConfigError as exc:
        error = exc
    assert error is None or error.errors


# ---------------------------------------------------------------------------------------------
# ${VAR:-default}: examples, then a property against a reference evaluator


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("${AWS:-~/.aws/credentials}", "/home/u/.aws/credentials"),
        ("${SET:-~/.aws/credentials}", "/set/file"),
        ("${EMPTY:-/fallback}", "/fallback"),  # empty counts as unset, as with :- in sh
        ("${GAC:-${CSC:-~/.config/gcloud}/adc.json}", "/home/u/.config/gcloud/adc.json"),
        ("${GAC:-${SET:-~/.config/gcloud}/adc.json}", "/set/file/adc.json"),
        ("${SET:-${UNSET}}", "/set/file"),  # an unneeded default is not evaluated
        ("${UNSET:-}x", "x"),
        ("${UNSET:-~}", "/home/u"),
        ("/a/${UNSET:-b~c}/d", "/a/b~c/d"),  # ~ expands only at the start of a word
        ("${UNSET:-$$}", "$"),
        ("$SET/x", "/set/file/x"),
        ("a$/b$", "a$/b$"),
        ("~", "/home/u"),
    ],
)
def test_expand_template_examples(template: str, expected: str) -> None:
    env = {"HOME": "/home/u", "SET": "/set/file", "EMPTY": ""}
    assert expand_template(template, env) == expected


@pytest.mark.parametrize(
    ("template", "fragment"),
    [
        ("${UNSET:-${ALSO}}", "$ALSO is not set"),
        ("${EMPTY}", "$EMPTY is empty"),
        ("${UNSET:-/x", 'unclosed "${UNSET:-..."'),
        ("${UNSET-x}", 'malformed "${...}"'),
        ("${:-x}", 'malformed "${...}"'),
        ("${UNSET:-~nosuchuser-xyz/x}", "no such user"),
    ],
)
def test_expand_template_errors(template: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=re.escape(fragment)):
        expand_template(template, {"HOME": "/home/u", "EMPTY": ""})


def test_expand_template_without_home() -> None:
    with pytest.raises(ValueError, match="HOME is not set"):
        expand_template("${UNSET:-~/x}", {})
    assert expand_template("${SET:-~/x}", {"SET": "/s"}) == "/s"


_NAMES = st.sampled_from(["A", "B", "C", "SET_1", "EMPTY", "UNSET"])
_LITERAL = st.text("abcxyz/._-~ ", max_size=5)


@st.composite
def _template(draw: st.DrawFn, depth: int = 0) -> tuple[str, list[object]]:
    """A random template and the same thing as a tree for the reference evaluator."""
    parts: list[object] = []
    text = ""
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["lit", "var", "braced", "default", "dollar"]))
        if kind == "lit":
            literal = draw(_LITERAL)
            if text.endswith("$") or (not text and literal.startswith("~")):
                literal = "q" + literal
            text += literal
            parts.append(literal)
        elif kind == "dollar":
            text += "$$"
            parts.append("$")
        elif kind in ("var", "braced"):
            name = draw(_NAMES.filter(lambda n: n in {"A", "B", "C", "SET_1"}))
            braced = kind == "braced" or draw(st.booleans())
            text += f"${{{name}}}" if braced else f"${name}"
            if not braced:
                text += "/"  # a bare $NAME needs a non-name character after it
            parts.append(("var", name))
            if not braced:
                parts.append("/")
        elif depth < 2:
            name = draw(_NAMES)
            inner_text, inner = draw(_template(depth + 1))
            if inner_text.startswith("~"):
                inner_text, inner = "q" + inner_text, ["q", *inner]
            text += f"${{{name}:-{inner_text}}}"
            parts.append(("default", name, inner))
    return text, parts


def _reference(parts: list[object], env: dict[str, str]) -> str:
    out = ""
    for part in parts:
        if isinstance(part, str):
            out += part
        elif part[0] == "var":
            out += env[str(part[1])]
        else:
            value = env.get(str(part[1]))
            out += value if value else _reference(part[2], env)  # type: ignore[arg-type]
    return out


@settings(max_examples=300, deadline=None)
@given(template=_template(), values=st.lists(st.text("abc/_.", min_size=1, max_size=6),
                                              min_size=4, max_size=4))
def test_expand_template_matches_a_reference(
    template: tuple[str, list[object]], values: list[str]
) -> None:
    text, parts = template
    env = dict(zip(["A", "B", "C", "SET_1"], values, strict=True)) | {"EMPTY": ""}
    assert expand_template(text, env) == _reference(parts, env)


@settings(max_examples=300, deadline=None)
@given(text=st.text("${}:-~/$ABab_x", max_size=24))
def test_expand_template_answers_or_raises_value_error(text: str) -> None:
    env = {"HOME": "/home/u", "A": "/a", "EMPTY": ""}
    try:
        result = expand_template(text, env)
    except ValueError as exc:
        message = str(exc)
        assert message
        return
    if "$" not in text and not text.startswith("~"):
        assert result == text  # nothing to expand: unchanged


def test_presets_paths_follow_the_environment(env: dict[str, str], home: Path) -> None:
    def files(preset: str, **extra: str) -> dict[str, Path]:
        (spec,) = parse_config({"credentials": [{"preset": preset}]}, env={**env, **extra}
                               ).credentials
        return dict(spec.files)

    assert files("aws") == {"credentials": home / ".aws/credentials"}
    assert files("aws", AWS_SHARED_CREDENTIALS_FILE="/etc/aws/creds") == {
        "credentials": Path("/etc/aws/creds")
    }
    adc = "application_default_credentials.json"
    assert files("gcp") == {"credentials": home / ".config/gcloud" / adc}
    assert files("gcp", CLOUDSDK_CONFIG="/cfg") == {"credentials": Path("/cfg") / adc}
    assert files("gcp", CLOUDSDK_CONFIG="/cfg", GOOGLE_APPLICATION_CREDENTIALS="/sa.json") == {
        "credentials": Path("/sa.json")
    }
    assert files("aws-sso") == {"cache": home / ".aws/sso/cache/*.json"}


# ---------------------------------------------------------------------------------------------
# Expiry fallbacks, parameters, selectors, patterns, fallbacks, key_file


def test_expiry_list_and_string(env: dict[str, str]) -> None:
    (one, many) = parse_config({"credentials": [
        cred("one", expiry="jwt"),
        cred("many", format="json", expiry=["json:a.b", "json:c", "none"]),
    ]}, env=env).credentials
    assert one.expiry_sources == (ExpirySource("jwt"),) and one.expiry == ExpirySource("jwt")
    assert many.expiry_sources == tuple(
        parse_expiry_source(t) for t in ("json:a.b", "json:c", "none")
    )
    assert many.expiry == ExpirySource("json", ("a", "b"))
    assert many.model_dump(by_alias=True)["expiry"] == ["json:a.b", "json:c", "none"]


def test_aws_profile_parameter(env: dict[str, str], home: Path) -> None:
    (default, dev) = parse_config({"credentials": [
        {"preset": "aws"}, {"preset": "aws", "name": "dev", "profile": "dev.eu"},
    ]}, env=env).credentials
    assert default.parameters == {"profile": "default"}
    assert default.select == Selector("ini-section", "default")
    assert [str(s) for s in dev.expiry_sources] == [
        "ini:dev.eu.x_security_token_expires", "ini:dev.eu.aws_expiration", "none"
    ]
    assert dev.select == Selector("ini-section", "dev.eu")
    assert dev.parameters == {"profile": "dev.eu"}
    remedy = dev.remedy("section-missing", "credentials")
    assert remedy is not None and "aws configure --profile dev.eu" in remedy
    assert "{profile}" not in (dev.remedy("expired", "credentials") or "{profile}")


def test_fallback_settings(env: dict[str, str], home: Path) -> None:
    (neb,) = parse_config({"credentials": [{"preset": "nebius"}]}, env=env).credentials
    assert neb.fallback is not None
    assert neb.watched_paths == (
        home / ".nebius/NEBIUS_IAM_TOKEN.txt",
        home / ".nebius/NEBIUS_TENANT_ID.txt",
        home / ".nebius/credentials.json",
    )
    alt = neb.with_fallback_files()
    assert alt is not None and alt.fallback is None and alt.name == "nebius"
    assert alt.files == {"credentials": home / ".nebius/credentials.json",
                         "tenant_id": home / ".nebius/NEBIUS_TENANT_ID.txt"}
    assert (alt.format, alt.expiry, alt.expiry_file) == ("json", ExpirySource("none"),
                                                         "credentials")
    # The credential's remedies still apply to the roles both share.
    assert "tenant" in (alt.remedy("file-missing", "tenant_id") or "")
    # Any credential may have one, written in TOML.
    (own,) = parse_config({"credentials": [cred(fallback={
        "files": {"sa": "~/sa.json"}, "format": "json", "expiry": ["json:exp", "none"],
    })]}, env=env).credentials
    assert own.fallback is not None and own.fallback.files == {"sa": home / "sa.json"}
    assert own.fallback.expiry_file == "sa"
    assert (no := parse_config({"credentials": [cred()]}, env=env).credentials[0]).fallback is None
    assert no.with_fallback_files() is None


def test_glob_roles(env: dict[str, str], home: Path) -> None:
    assert is_glob("/a/*.json") and is_glob("/a/b?") and is_glob("/a/[ab]")
    assert not is_glob("/a*/b") and not is_glob("/a/b.json")
    assert glob_matches("x.json", "*.json") and not glob_matches(".x.json", "*.json")
    assert glob_matches(".x.json", ".*.json") and not glob_matches("x.json.tmp", "*.json")
    (spec,) = parse_config({"credentials": [cred(files={"cache": "~/c/*.json"},
                                                   format="json")]}, env=env).credentials
    assert spec.files == {"cache": home / "c/*.json"}


@pytest.mark.parametrize(
    ("credential", "path", "message"),
    [
        (cred(expiry=[]), "expiry", "must not be empty"),
        (cred(expiry=["jwt", "jwtt"]), "expiry[1]", 'unknown source "jwtt"'),
        (cred(expiry=["none", "jwt"]), "expiry[1]", "unreachable"),
        (cred(expiry=["ttl:1h", "jwt"]), "expiry[1]", "unreachable"),
        (cred(expiry=[3]), "expiry[0]", "expected a string"),
        (cred(expiry={"a": 1}), "expiry", "or an array of them"),
        (cred(select="ini-section:"), "select", "needs a section name"),
        (cred(select=["x"]), "select", "expected a string"),
        (cred(files={"t": "/a/*/t"}), "files.t", "only the file name may be a pattern"),
        (cred(files={"t": "/d/*.json"}, refresh={"command": ["x"], "output": "t"}),
         "refresh.output", "is a pattern"),
        (cred(files={"t": "/d/*.json"}, validate={"url": "https://a", "header": "A: {t}"}),
         "validate.header", "is a pattern"),
        (cred(files={"c": "/c", "k": "/k"}, format="pem", key_file="x"), "key_file",
         '"x" is not a role'),
        (cred(files={"c": "/c", "k": "/k"}, format="pem", key_file="c"), "key_file",
         "not the expiry_file"),
        (cred(files={"c": "/c", "k": "/k"}, key_file="k"), "key_file", 'needs format = "pem"'),
        (cred(files={"c": "/d/*.pem", "k": "/k"}, format="pem", key_file="k"), "key_file",
         "not a pattern"),
        (cred(profile="dev"), "profile",
         '"profile" is a parameter of preset aws, nebius-object-storage only'),
        (cred(parameters={"profile": "dev"}), "parameters", 'unknown key "parameters"'),
        ({"preset": "aws", "profile": "has space"}, "profile", 'invalid value "has space"'),
        ({"preset": "aws", "profile": 3}, "profile", "expected a string"),
        ({"preset": "aws", "parameters": {}}, "parameters", 'unknown key "parameters"'),
        (cred(fallback={"files": {}}), "fallback.files", "at least one file"),
        (cred(fallback={"files": {"a": "/a"}, "fromat": "x"}), "fallback.fromat",
         '(did you mean "format"?)'),
        (cred(fallback={"files": {"a": "/a"}, "expiry_file": "b"}), "fallback.expiry_file",
         '"b" is not a role'),
        (cred(fallback="/a"), "fallback", "expected a table"),
    ],
)
def test_new_key_errors(
    credential: dict[str, Any], path: str, message: str, env: dict[str, str]
) -> None:
    errors = errors_of({"credentials": [cred("first"), credential]}, env)
    assert message in errors[f"credentials[1].{path}"], errors
    assert len(errors) == 1, errors


def test_a_new_preset_is_only_data(env: dict[str, str]) -> None:
    # Everything a preset can say, for a made-up cloud: no code knows its name.
    from broker.config.presets import PresetFallback

    made_up = Preset(
        name="acme",
        description="Acme Cloud",
        files={"creds": "${ACME_CREDS:-~/.acme/creds.ini}", "cache": "~/.acme/cache/*.json"},
        format="ini",
        select="ini-section:{region}",
        expiry=("ini:{region}.expires", "none"),
        parameters={"region": "eu"},
        fallback=PresetFallback(files={"sa": "~/.acme/sa.json"}, format="json"),
        refresh={"command": ["acme", "login", "--region", "{region}"]},
        remedies={"section-missing": "acme login --region {region}"},
    )
    presets = {**PRESETS, "acme": made_up}
    (spec,) = parse_config({"credentials": [{"preset": "acme", "region": "us-2"}]},
                           env=env, presets=presets).credentials
    home = Path(env["HOME"])
    assert spec.files == {"creds": home / ".acme/creds.ini", "cache": home / ".acme/cache/*.json"}
    assert spec.select == Selector("ini-section", "us-2")
    assert [str(s) for s in spec.expiry_sources] == ["ini:us-2.expires", "none"]
    assert spec.refresh is not None
    assert spec.refresh.command == ("acme", "login", "--region", "us-2")
    assert spec.fallback is not None and spec.fallback.files == {"sa": home / ".acme/sa.json"}
    assert spec.remedy("section-missing", "creds") == "acme login --region us-2"
    errors = errors_of({"credentials": [{"preset": "aws", "region": "x"}]}, env, presets)
    assert 'parameter of preset acme only' in errors["credentials[0].region"]
