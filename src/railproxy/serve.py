"""`railproxy serve RAILS_DIR`: run the OpenAI-compatible proxy under uvicorn.

Environment: RAILPROXY_UPSTREAM_API_KEY (else OPENAI_API_KEY) is the upstream
key; RAILPROXY_API_KEYS (comma-separated) are the keys clients must present;
RAILPROXY_* overrides of the rails' `server:` settings (see proxy_settings).
Without --upstream the built-in demo upstream answers (and says so loudly).
SIGTERM stops accepting, drains in-flight requests, then exits 0.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    import uvicorn

logger = logging.getLogger("railproxy.serve")

DRAIN_SECONDS = 30
_SECRET_SHAPES = re.compile(r"(?i)\b(bearer\s+)\S+|\b(sk|rp)-[A-Za-z0-9_\-]{8,}")


class Redact(logging.Filter):
    """Masks the configured keys and key-shaped strings in every log record."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self._secrets = sorted((s for s in secrets if len(s) >= 4), key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = message
        for secret in self._secrets:
            cleaned = cleaned.replace(secret, "[redacted]")
        cleaned = _SECRET_SHAPES.sub(lambda m: (m.group(1) or "") + "[redacted]", cleaned)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def install_redaction(secrets: Iterable[str]) -> Redact:
    """Put one redaction filter on every handler of the root logger (where all logs end)."""
    redact = Redact(secrets)
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for handler in root.handlers:
        handler.addFilter(redact)
    return redact


@click.command()
@click.argument("rails_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--upstream",
    "upstream_url",
    metavar="URL",
    help="Upstream base URL, e.g. https://api.openai.com/v1 (requests go to "
    "URL/chat/completions). Default: the built-in demo upstream.",
)
def serve(rails_dir: Path, host: str, port: int, upstream_url: str | None) -> None:
    """Run the OpenAI-compatible proxy for RAILS_DIR."""
    import uvicorn

    from railproxy.errors import RailproxyError
    from railproxy.proxy import create_app
    from railproxy.proxy_settings import ProxySettings

    try:
        settings = ProxySettings.from_env(
            rails_dir, upstream_url=upstream_url, host=host, port=port
        )
        secrets = [k.reveal() for k in settings.client_keys]
        if settings.upstream_api_key is not None:
            secrets.append(settings.upstream_api_key.reveal())
        install_redaction(secrets)
        if not settings.client_keys and not settings.loopback:
            logger.warning(
                "client authentication is OFF and railproxy listens on %s: anyone who can "
                "reach it can use it. Set RAILPROXY_API_KEYS.",
                host,
            )
        if upstream_url and settings.upstream_api_key is None:
            logger.warning("no RAILPROXY_UPSTREAM_API_KEY or OPENAI_API_KEY: sending no key")
        app = create_app(settings)
    except RailproxyError as exc:
        raise click.ClickException(str(exc)) from exc
    from railproxy.server_protocol import header_deadline_protocol

    logger.info("railproxy serving %s on http://%s:%d", rails_dir, host, port)
    limits = app.state.railproxy.limits
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=header_deadline_protocol(limits.timeouts.client_header),
        log_config=None,  # keep the handlers (and the redaction filter) set up above
        access_log=False,  # railproxy.access logs paths without query strings instead
        proxy_headers=False,
        server_header=False,
        timeout_graceful_shutdown=DRAIN_SECONDS,
    )
    _draining_server_class()(config).run()


def _draining_server_class() -> type[uvicorn.Server]:
    import signal
    from types import FrameType

    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn, except that a drained SIGTERM exits 0 (uvicorn re-raises the signal)."""

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            super().handle_exit(sig, frame)
            captured = getattr(self, "_captured_signals", None)
            if sig == signal.SIGTERM and isinstance(captured, list) and sig in captured:
                captured.remove(sig)

    return DrainingServer
