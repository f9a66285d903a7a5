"""Hot reload of a guard when the index changes on disk."""

from __future__ import annotations

import anyio

from railproxy.embed import Embedder
from railproxy.guard import Guard
from railproxy.index import build_index
from railproxy.rails import load_rails
from railproxy.reload import Reloader
from tests.conftest import RailsFactory

WEATHER = """\
intents:
  - name: weather
    examples: [is it raining, will it be sunny]
    reply: Sunny.
"""


def test_reindex_is_picked_up_and_broken_rails_keep_old(
    make_rails: RailsFactory, embedder: Embedder
) -> None:
    root = make_rails()
    guard = Guard(root, embedder)
    reloader = Reloader(guard, interval=0.05)

    async def main() -> None:
        assert await reloader.check() is False  # nothing changed
        (root / "weather.yaml").write_text(WEATHER)
        build_index(load_rails(root), embedder)
        assert await reloader.check() is True
        assert guard.check("is it going to rain today").intent == "weather"

        old = guard.snapshot
        (root / "weather.yaml").write_text("intents: [oops\n")  # rails broken, index untouched
        assert await reloader.check(force=True) is False
        assert guard.snapshot is old
        assert reloader.failures == 1 and "weather.yaml" in (reloader.last_error or "")

    anyio.run(main)


def test_run_loop_reloads_on_request(make_rails: RailsFactory, embedder: Embedder) -> None:
    root = make_rails()
    guard = Guard(root, embedder)
    reloader = Reloader(guard, interval=30)  # only request() can wake it in time

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(reloader.run)
            (root / "weather.yaml").write_text(WEATHER)
            build_index(load_rails(root), embedder)
            reloader.request()
            with anyio.fail_after(10):
                while reloader.reloads == 0:  # noqa: ASYNC110 - the run task bumps it
                    await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
        assert guard.check("will it be sunny tomorrow").intent == "weather"

    anyio.run(main)


def test_an_unreadable_rails_file_fails_the_reload_and_the_old_rails_serve(
    make_rails: RailsFactory, embedder: Embedder
) -> None:
    root = make_rails()
    guard = Guard(root, embedder)
    reloader = Reloader(guard, interval=None)
    old = guard.snapshot
    (root / "broken.yaml").symlink_to("/proc/self/mem")  # reading it fails with EIO

    async def main() -> None:
        assert await reloader.check(force=True) is False

    anyio.run(main)
    assert guard.snapshot is old
    assert reloader.failures == 1
    assert "broken.yaml: cannot read" in (reloader.last_error or "")
    assert guard.check("where is my refund").intent == "refund_status"
