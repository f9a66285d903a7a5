"""Operational settings: the `server:` section of config.yaml.

Rails are data; these are knobs. Each has a default, can be set in
`config.yaml` under `server:`, and can be overridden by a `RAILPROXY_*`
environment variable or a CLI flag at the edge (see `proxy_settings.py`).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Timeouts(BaseModel):
    """Deadlines in seconds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    client_header: float = Field(10.0, gt=0)
    client_body: float = Field(10.0, gt=0)
    guard: float = Field(2.0, gt=0)
    upstream_connect: float = Field(3.0, gt=0)
    upstream_first_byte: float = Field(120.0, gt=0)
    upstream_stream_idle: float = Field(30.0, gt=0)
    upstream_total: float = Field(300.0, gt=0)


class ServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_body_bytes: int = Field(1_048_576, gt=0)
    max_input_chars: int = Field(16_000, gt=0)
    max_tokens_cap: int = Field(4096, gt=0)
    max_in_flight: int = Field(64, gt=0)
    timeouts: Timeouts = Timeouts()
    reload: bool = True
    audit_log: str | None = None
    log_prompts: bool = False
