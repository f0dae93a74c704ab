"""The TOML configuration (SPEC section 2): loading, validation and error reporting.

Everything a user can get wrong is reported at once, each error naming its key path the way
the TOML reads (``credentials[2].expiry: unknown source "jwtt"; expected ...``), as a
:class:`ConfigError`. Validation is pydantic v2 (the only package that uses it); no value
that may be secret (a url's userinfo, a header, a password) ever gets into a message.

This module is the facade: import from ``broker.config``. Behind it, one job each:

- :mod:`~broker.config.loader`: ``load_config`` / ``parse_config`` (read TOML, validate);
- :mod:`~broker.config.errors`: ``ConfigError`` and the error messages users see;
- :mod:`~broker.config.context`: what one load validates against (env, base dir, presets);
- :mod:`~broker.config.paths`: path templates, patterns, ``~`` in paths shown back;
- :mod:`~broker.config.scalars`: durations, sizes, names, hosts, URLs, listen addresses;
- :mod:`~broker.config.fields`: the pydantic field types and the models' base;
- :mod:`~broker.config.services`: ``[broker]``, ``[mqtt]``, ``[http]``;
- :mod:`~broker.config.filesets`, :mod:`~broker.config.credentials`,
  :mod:`~broker.config.upkeep`: ``[[credentials]]``, its ``fallback``, ``refresh`` and
  ``validate``;
- :mod:`~broker.config.hooks`: ``[[actions]]`` and ``[[webhooks]]``;
- :mod:`~broker.config.document`: ``Config``, the whole file;
- :mod:`~broker.config.presets` (the preset data) and :mod:`~broker.config.preset_merge`
  (laying a preset under the user's table).

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

from broker.config.credentials import DEFAULT_MAX_SIZE, CredentialSettings
from broker.config.document import Config
from broker.config.errors import ConfigError
from broker.config.filesets import FallbackSettings
from broker.config.hooks import ActionSettings, SignalSettings, WebhookSettings
from broker.config.loader import CONFIG_ENV_VAR, load_config, parse_config
from broker.config.paths import expand_template
from broker.config.scalars import default_host_id
from broker.config.services import BrokerSettings, HttpSettings, MqttSettings
from broker.config.upkeep import RefreshSettings, ValidateSettings
from broker.core.globs import glob_matches, is_glob

__all__ = [
    "CONFIG_ENV_VAR",
    "DEFAULT_MAX_SIZE",
    "ActionSettings",
    "BrokerSettings",
    "Config",
    "ConfigError",
    "CredentialSettings",
    "FallbackSettings",
    "HttpSettings",
    "MqttSettings",
    "RefreshSettings",
    "SignalSettings",
    "ValidateSettings",
    "WebhookSettings",
    "default_host_id",
    "expand_template",
    "glob_matches",
    "is_glob",
    "load_config",
    "parse_config",
]
