"""Serve-time settings: where the upstream is, which keys, where to listen.

Built once at the edge (`railproxy serve`, or a test) and passed to
`create_app`. Secrets are `Secret`s, whose repr never shows the value. The
`server` overrides replace keys of the rails' `server:` section; from the
environment they are `RAILPROXY_MAX_BODY_BYTES`, `RAILPROXY_MAX_INPUT_CHARS`,
`RAILPROXY_MAX_TOKENS_CAP`, `RAILPROXY_MAX_IN_FLIGHT`, `RAILPROXY_RELOAD`,
`RAILPROXY_AUDIT_LOG`, `RAILPROXY_LOG_PROMPTS` and `RAILPROXY_TIMEOUT_<NAME>`
(e.g. `RAILPROXY_TIMEOUT_UPSTREAM_FIRST_BYTE=60`).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import ValidationError

from railproxy.errors import RailproxyError
from railproxy.settings import ServerConfig, Timeouts

_SCALARS = (
    "max_body_bytes",
    "max_input_chars",
    "max_tokens_cap",
    "max_in_flight",
    "reload",
    "audit_log",
    "log_prompts",
)


class SettingsError(RailproxyError):
    """A serve-time setting is invalid; the message names it."""


class Secret:
    """A string that does not show itself in repr, str or logs."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__


class ClientKeys:
    """The keys clients may present. Stored as sha256; compared in constant time."""

    def __init__(self, keys: tuple[Secret, ...]) -> None:
        self._digests = tuple(hashlib.sha256(k.reveal().encode()).digest() for k in keys)

    def __bool__(self) -> bool:
        return bool(self._digests)

    def __repr__(self) -> str:
        return f"ClientKeys({len(self._digests)} keys)"

    def accepts(self, presented: str) -> bool:
        digest = hashlib.sha256(presented.encode()).digest()
        found = False
        for known in self._digests:  # no early exit: the time does not depend on which key
            found |= hmac.compare_digest(digest, known)
        return found


@dataclass(frozen=True)
class ProxySettings:
    rails_dir: Path
    upstream_url: str | None = None  # None: the built-in demo upstream
    upstream_api_key: Secret | None = None
    client_keys: tuple[Secret, ...] = ()
    host: str = "127.0.0.1"
    port: int = 8000
    server: Mapping[str, Any] = field(default_factory=dict)  # overrides of ServerConfig

    @classmethod
    def from_env(
        cls,
        rails_dir: Path,
        *,
        environ: Mapping[str, str] | None = None,
        upstream_url: str | None = None,
        host: str = "127.0.0.1",
        port: int = 8000,
    ) -> ProxySettings:
        env = os.environ if environ is None else environ
        key = env.get("RAILPROXY_UPSTREAM_API_KEY") or env.get("OPENAI_API_KEY")
        clients = [k.strip() for k in env.get("RAILPROXY_API_KEYS", "").split(",") if k.strip()]
        return cls(
            rails_dir=Path(rails_dir),
            upstream_url=check_upstream_url(upstream_url) if upstream_url else None,
            upstream_api_key=Secret(key) if key else None,
            client_keys=tuple(Secret(k) for k in clients),
            host=host,
            port=port,
            server=server_overrides(env),
        )

    def server_config(self, base: ServerConfig) -> ServerConfig:
        """The rails' server settings with these overrides applied and validated."""
        merged = base.model_dump()
        for name, value in self.server.items():
            if name == "timeouts":
                merged["timeouts"] = {**merged["timeouts"], **dict(value)}
            else:
                merged[name] = value
        try:
            return ServerConfig.model_validate(merged)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
            )
            raise SettingsError(f"invalid server setting: {problems}") from exc

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)


def server_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for name in _SCALARS:
        value = env.get(f"RAILPROXY_{name.upper()}")
        if value is not None:
            found[name] = value
    timeouts = {
        name: env[f"RAILPROXY_TIMEOUT_{name.upper()}"]
        for name in Timeouts.model_fields
        if f"RAILPROXY_TIMEOUT_{name.upper()}" in env
    }
    if timeouts:
        found["timeouts"] = timeouts
    return found


def check_upstream_url(url: str) -> str:
    """An operator-given upstream base URL, refused if it could hide anything."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SettingsError("--upstream must be an http(s) URL with a host")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise SettingsError("--upstream must not contain credentials, a query or a fragment")
    return url.rstrip("/")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
