"""Rails validation: every mistake names file and line, and nothing is executed."""

from __future__ import annotations

from pathlib import Path

import pytest

from railproxy.errors import RailsError
from railproxy.rails import load_rails, rails_digest
from tests.conftest import SUPPORT_RAILS, write_rails

GOOD_INTENT = """\
intents:
  - name: ok
    examples: [hello]
    reply: hi
"""

# (file contents, expected fragment of the error, expected line)
MISTAKES = [
    pytest.param(
        GOOD_INTENT.replace("    reply: hi\n", "    reply: hi\n    colour: blue\n"),
        "intent 'ok': unknown key 'colour'",
        5,
        id="unknown-intent-key",
    ),
    pytest.param("intents: []\nextra: 1\n", "unknown key 'extra'", 2, id="unknown-top-key"),
    pytest.param(
        GOOD_INTENT + "  - name: ok\n    examples: [bye]\n    reply: bye\n",
        "intent 'ok': duplicate name",
        5,
        id="duplicate-name",
    ),
    pytest.param(
        "intents:\n  - name: empty\n    examples: []\n    reply: hi\n",
        "intent 'empty': examples",
        3,
        id="no-examples",
    ),
    pytest.param(
        "intents:\n  - name: none\n    examples: [a]\n",
        "needs exactly one of prompt, refuse, reply (found: none)",
        2,
        id="zero-actions",
    ),
    pytest.param(
        "intents:\n  - name: two\n    examples: [a]\n    reply: x\n    refuse: y\n",
        "needs exactly one of prompt, refuse, reply (found: refuse, reply)",
        2,
        id="two-actions",
    ),
    pytest.param(
        "intents:\n  - name: leak\n    examples: [a]\n    prompt: 'Say {user_text}'\n",
        "prompt uses {user_text} but pass_user_text is not true",
        2,
        id="user-text-without-opt-in",
    ),
    pytest.param(
        "intents:\n  - name: bad\n    examples: [a]\n    reply: [unclosed\n",
        "invalid YAML",
        5,
        id="bad-yaml",
    ),
    pytest.param(
        "intents:\n  - name: x\n    examples: [a]\n"
        "    reply: !!python/object/apply:os.system ['touch pwned']\n",
        "invalid YAML",
        4,
        id="python-tag",
    ),
    pytest.param(
        "intents:\n  - name: x\n    name: y\n    examples: [a]\n    reply: b\n",
        "duplicate key 'name'",
        3,
        id="duplicate-key",
    ),
    pytest.param(
        "base: &b [a, b]\nintents:\n  - name: x\n    examples: *b\n    reply: b\n",
        "YAML aliases are not supported",
        1,
        id="alias",
    ),
    pytest.param(
        "intents:\n  - name: 'bad name!'\n    examples: [a]\n    reply: b\n",
        "names use letters",
        2,
        id="bad-name",
    ),
    pytest.param(
        "intents:\n  - name: x\n    examples: [a]\n    reply: b\n    threshold: 1.5\n",
        "threshold",
        5,
        id="threshold-out-of-range",
    ),
]


@pytest.mark.parametrize(("text", "fragment", "line"), MISTAKES)
def test_mistakes_name_file_and_line(tmp_path: Path, text: str, fragment: str, line: int) -> None:
    (tmp_path / "intents.yaml").write_text(text, encoding="utf-8")
    with pytest.raises(RailsError) as caught:
        load_rails(tmp_path)
    message = str(caught.value)
    assert fragment in message
    assert f"{tmp_path / 'intents.yaml'}:{line}:" in message


def test_python_tag_is_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    (tmp_path / "intents.yaml").write_text(
        f"intents: !!python/object/apply:os.system ['touch {marker}']\n", encoding="utf-8"
    )
    with pytest.raises(RailsError, match="invalid YAML"):
        load_rails(tmp_path)
    assert not marker.exists()


def test_non_utf8_names_the_line(tmp_path: Path) -> None:
    (tmp_path / "intents.yaml").write_bytes(b"intents:\n  - name: caf\xe9\n")
    with pytest.raises(RailsError, match=r"intents.yaml:2: not valid UTF-8"):
        load_rails(tmp_path)


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    write_rails(tmp_path, {"config.yaml": "refusal: shout\n", "a.yaml": GOOD_INTENT})
    with pytest.raises(RailsError, match=r"config.yaml:1: refusal: Input should be"):
        load_rails(tmp_path)


def test_unknown_server_setting(tmp_path: Path) -> None:
    write_rails(tmp_path, {"config.yaml": "server:\n  max_bodyy: 3\n", "a.yaml": GOOD_INTENT})
    with pytest.raises(RailsError, match=r"config.yaml:2: server: unknown key 'max_bodyy'"):
        load_rails(tmp_path)


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("intents:\n  - name: a\n    examples: [x]\n", "utf-8")
    (tmp_path / "b.yaml").write_text("intents:\n  - name: b\n    reply: y\n", "utf-8")
    with pytest.raises(RailsError) as caught:
        load_rails(tmp_path)
    assert "a.yaml:2" in str(caught.value)
    assert "b.yaml:3" in str(caught.value) or "b.yaml:2" in str(caught.value)


def test_empty_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(RailsError, match="no intents found"):
        load_rails(tmp_path)


def test_valid_rails_load(tmp_path: Path) -> None:
    rails = load_rails(write_rails(tmp_path, SUPPORT_RAILS))
    assert [i.name for i in rails.intents] == [
        "refund_status",
        "medical_advice",
        "greeting",
        "translate_to_french",
    ]
    assert [i.action for i in rails.intents] == ["prompt", "refuse", "reply", "prompt"]
    assert rails.config.no_match == "Sorry, I can only help with ACME billing."
    assert rails.upstream_models() == ["gpt-4o", "gpt-4o-mini"]
    assert rails.sources["greeting"].line == 14


def test_user_text_is_substituted_only_for_opted_in_rails(tmp_path: Path) -> None:
    rails = load_rails(write_rails(tmp_path, SUPPORT_RAILS))
    french = rails.by_name["translate_to_french"].messages("good {night}")
    assert french[-1] == {"role": "user", "content": "Translate into French: good {night}"}
    refund = rails.by_name["refund_status"].messages("CANARY")
    assert "CANARY" not in str(refund)


def test_digest_covers_config_and_every_file(tmp_path: Path) -> None:
    root = write_rails(tmp_path, SUPPORT_RAILS)
    before = rails_digest(root)
    (root / "config.yaml").write_text("threshold: 0.7\n", encoding="utf-8")
    after_config = rails_digest(root)
    (root / "more.yml").write_text(GOOD_INTENT, encoding="utf-8")
    assert len({before, after_config, rails_digest(root)}) == 3
