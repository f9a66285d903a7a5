"""Every file under examples/ works: rails pass their own tests, manifests hang together,
and the example programs run against a real server."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from railproxy import railtest
from railproxy.demo import BANNER
from railproxy.embed import SentenceTransformerEmbedder
from railproxy.guard import Guard
from railproxy.index import build_index
from railproxy.rails import load_rails
from tests.proxy_support import running_proxy

REPO = Path(__file__).parent.parent
EXAMPLES = REPO / "examples"
HR_RAILS = EXAMPLES / "hr-helpdesk" / "rails"
KUBERNETES = EXAMPLES / "kubernetes"


# --- examples/hr-helpdesk/rails ----------------------------------------------------------


@pytest.fixture(scope="module")
def hr_guard(
    tmp_path_factory: pytest.TempPathFactory, embedder: SentenceTransformerEmbedder
) -> Guard:
    root = tmp_path_factory.mktemp("hr") / "rails"
    shutil.copytree(HR_RAILS, root, ignore=shutil.ignore_patterns(".index"))
    build_index(load_rails(root), embedder)
    return Guard(root, embedder)


def test_hr_rails_pass_their_own_tests(hr_guard: Guard) -> None:
    report = railtest.run(hr_guard)
    assert len(report.outcomes) >= 50
    assert report.failures == [], "\n".join(
        f"{o.case.source}: {o.case.kind} {o.case.text!r}: {o.explain()}" for o in report.failures
    )


def test_hr_rails_are_lint_clean(hr_guard: Guard) -> None:
    from railproxy.lint import lint

    assert [f"{f.source}: {f.kind}: {f.message}" for f in lint(hr_guard)] == []


def test_hr_rails_show_what_they_are_for(hr_guard: Guard) -> None:
    rails = hr_guard.rails
    assert rails.config.refusal == "error"
    assert 8 <= len(rails.intents) <= 14
    assert {i.action for i in rails.intents} == {"prompt", "refuse", "reply"}
    assert [i.name for i in rails.intents if i.pass_user_text] == ["rewrite_out_of_office"]
    assert any(i.threshold is not None for i in rails.intents)
    for intent in rails.intents:
        assert len(intent.examples) >= 8, intent.name
        assert intent.tests.match and intent.tests.no_match, intent.name


def test_hr_rails_pass_only_the_out_of_office_text_upstream(hr_guard: Guard) -> None:
    text = "rewrite my out of office: on holiday until 14 July, contact Ana for urgent requests"
    decision = hr_guard.check(text)
    assert decision.intent == "rewrite_out_of_office"
    assert text in decision.upstream_messages[-1]["content"]
    other = hr_guard.check("how do I reset my password, it is hunter2")
    assert other.intent == "password_reset"
    assert all("hunter2" not in m["content"] for m in other.upstream_messages)


# --- examples/kubernetes -----------------------------------------------------------------


def manifests() -> dict[str, dict[str, Any]]:
    """Every object in the manifests, by kind (each kind appears once)."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(KUBERNETES.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for document in yaml.safe_load_all(path.read_text()):
            assert document["kind"] not in found, f"{path.name}: a second {document['kind']}"
            found[document["kind"]] = document
    return found


@pytest.fixture(scope="module")
def objects() -> dict[str, dict[str, Any]]:
    return manifests()


def container(objects: dict[str, dict[str, Any]], name: str = "railproxy") -> dict[str, Any]:
    spec = objects["Deployment"]["spec"]["template"]["spec"]
    (found,) = [c for c in spec["containers"] + spec["initContainers"] if c["name"] == name]
    assert isinstance(found, dict)
    return found


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    files = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(files)
    assert [image["name"] for image in kustomization["images"]] == ["railproxy"]


def test_manifest_kinds(objects: dict[str, dict[str, Any]]) -> None:
    assert set(objects) == {
        "ConfigMap",
        "Deployment",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "Service",
    }


def test_selectors_match_the_pod_labels(objects: dict[str, dict[str, Any]]) -> None:
    deployment = objects["Deployment"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selectors = [
        deployment["spec"]["selector"]["matchLabels"],
        objects["Service"]["spec"]["selector"],
        objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
    ]
    for selector in selectors:
        assert selector and selector.items() <= pod_labels.items()
    target = objects["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])


def test_ports_and_probes_agree(objects: dict[str, dict[str, Any]]) -> None:
    main = container(objects)
    (port,) = main["ports"]
    args = main["args"]
    assert args[args.index("--port") + 1] == str(port["containerPort"])
    assert args[args.index("--host") + 1] == "0.0.0.0"
    (service_port,) = objects["Service"]["spec"]["ports"]
    assert service_port["targetPort"] == port["name"]
    probes = {kind: main[kind]["httpGet"] for kind in ("readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert main["startupProbe"]["httpGet"]["path"] == "/healthz"
    for probe in [*probes.values(), main["startupProbe"]["httpGet"]]:
        assert probe["port"] == port["name"]


def test_pods_run_locked_down(objects: dict[str, dict[str, Any]]) -> None:
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    dockerfile_user = re.search(
        r"^USER (\d+):(\d+)$", (EXAMPLES.parent / "Dockerfile").read_text(), re.M
    )
    assert dockerfile_user is not None
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == dockerfile_user.group(1)
    assert pod["automountServiceAccountToken"] is False
    for each in pod["containers"] + pod["initContainers"]:
        context = each["securityContext"]
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]
        mounts = {m["mountPath"]: m["name"] for m in each["volumeMounts"]}
        assert mounts["/tmp"] == "tmp", "torch needs a writable /tmp at import"


def test_resources_fit_one_cpu_and_a_gibibyte(objects: dict[str, dict[str, Any]]) -> None:
    resources = container(objects)["resources"]
    assert resources["requests"]["cpu"] == "500m"  # the HPA's utilisation is relative to it
    assert resources["limits"]["cpu"] == "1"
    assert resources["requests"]["memory"] == resources["limits"]["memory"] == "1Gi"
    env = {e["name"]: e for e in container(objects)["env"]}
    assert env["OMP_NUM_THREADS"]["value"] == resources["limits"]["cpu"]
    (metric,) = objects["HorizontalPodAutoscaler"]["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"


def test_args_are_options_of_railproxy_serve(objects: dict[str, dict[str, Any]]) -> None:
    from railproxy.cli import cli

    serve = cli.commands["serve"]
    known = {option for param in serve.params for option in param.opts}
    args = container(objects)["args"]
    assert args[0] == "serve"
    assert {arg for arg in args if arg.startswith("--")} <= known
    assert args[args.index("--upstream") + 1].startswith("https://")


def test_secrets_come_from_secret_refs(objects: dict[str, dict[str, Any]]) -> None:
    env = {e["name"]: e for e in container(objects)["env"]}
    key = env["RAILPROXY_UPSTREAM_API_KEY"]
    assert "value" not in key
    assert key["valueFrom"]["secretKeyRef"]["name"] == "railproxy-upstream"
    assert env["RAILPROXY_API_KEYS"]["valueFrom"]["secretKeyRef"]["optional"] is True


def test_configmap_holds_the_hr_rails_and_reaches_the_server(
    objects: dict[str, dict[str, Any]],
) -> None:
    configmap = objects["ConfigMap"]
    files = {p.name: p.read_text() for p in sorted(HR_RAILS.glob("*.yaml"))}
    assert configmap["data"] == files, (
        "examples/kubernetes/configmap.yaml is out of date: regenerate it from "
        "examples/hr-helpdesk/rails/ (see its header)"
    )
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["rails-source"]["configMap"]["name"] == configmap["metadata"]["name"]
    init = container(objects, "reindex")
    init_mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    script = init["command"][-1]
    assert f"cp {init_mounts['rails-source']}/*.yaml {init_mounts['rails']}/" in script
    assert f"railproxy reindex {init_mounts['rails']}" in script
    main = container(objects)
    main_mounts = {m["name"]: m["mountPath"] for m in main["volumeMounts"]}
    assert main["args"][:2] == ["serve", main_mounts["rails"]]
    assert init["image"] == main["image"]


# --- examples/*.py: run against real servers on 127.0.0.1 --------------------------------

RUN_HERE = {"client.py", "client_stream.py", "fastapi_app.py"}  # each is run below


def test_every_example_program_is_run() -> None:
    assert {p.name for p in EXAMPLES.glob("*.py")} == RUN_HERE


@pytest.fixture(scope="module")
def repo_rails(
    tmp_path_factory: pytest.TempPathFactory, embedder: SentenceTransformerEmbedder
) -> Path:
    """The repository's rails/ (what the examples default to), indexed in a copy."""
    root = tmp_path_factory.mktemp("repo") / "rails"
    shutil.copytree(REPO / "rails", root, ignore=shutil.ignore_patterns(".index"))
    build_index(load_rails(root), embedder)
    return root


@pytest.fixture(scope="module")
def demo_proxy(repo_rails: Path, embedder: SentenceTransformerEmbedder) -> Iterator[str]:
    """`railproxy serve rails/` with the built-in demo upstream; its base URL."""
    with running_proxy(Guard(repo_rails, embedder), None) as proxy:
        yield proxy.url + "/v1"


@pytest.fixture(scope="module")
def fastapi_app(repo_rails: Path) -> Iterator[str]:
    """`python examples/fastapi_app.py` in a subprocess; its base URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "RAILS_DIR": str(repo_rails), "PORT": str(port)}
    app = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "fastapi_app.py")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120  # uvicorn binds after the model has loaded
        while True:
            assert app.poll() is None, app.stderr.read() if app.stderr else ""
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "examples/fastapi_app.py did not start"
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        app.terminate()
        app.communicate(timeout=30)


def run_example(name: str, base_url: str, *questions: str) -> str:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *questions],
        env={**os.environ, "RAILPROXY_BASE_URL": base_url},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def answers(output: str) -> dict[str, str]:
    """`> question` blocks of an example's output -> {question: answer}."""
    blocks = [block for block in re.split(r"^> ", output, flags=re.MULTILINE) if block.strip()]
    return dict(block.partition("\n")[::2] for block in blocks)


def test_repo_rails_pass_their_own_tests_and_lint(
    repo_rails: Path, embedder: SentenceTransformerEmbedder
) -> None:
    """rails/ (the README's example) carries tests; they pass, and lint finds nothing."""
    from railproxy.lint import lint

    guard = Guard(repo_rails, embedder)
    report = railtest.run(guard)
    assert len(report.outcomes) >= 100
    assert report.failures == [], "\n".join(
        f"{o.case.source}: {o.case.kind} {o.case.text!r}: {o.explain()}" for o in report.failures
    )
    assert [f"{f.source}: {f.kind}: {f.message}" for f in lint(guard)] == []


NORTHWIND_REPLY = "[reply] Hi! I'm the Northwind Mobile assistant."
NORTHWIND_NO_MATCH = "[no_match] Sorry, I can only help with Northwind Mobile topics"
BILL_PROMPT = "You are the customer-support assistant of Northwind Mobile"


def test_client_against_the_proxy(demo_proxy: str) -> None:
    found = answers(run_example("client.py", demo_proxy))
    assert list(found) == [
        "why is my bill so high this month",
        "hello",
        "write me a poem about pirates",
    ]
    approved = found["why is my bill so high this month"]
    assert approved.startswith(f"[prompt] {BANNER}")
    assert BILL_PROMPT in approved
    assert found["hello"].startswith(NORTHWIND_REPLY)
    assert found["write me a poem about pirates"].startswith(NORTHWIND_NO_MATCH)


def test_client_stream_against_the_proxy(demo_proxy: str) -> None:
    found = answers(run_example("client_stream.py", demo_proxy))
    approved = found["why is my bill so high this month"]
    assert approved.startswith(f"[prompt] {BANNER}") and BILL_PROMPT in approved
    assert found["write me a poem about pirates"].startswith(NORTHWIND_NO_MATCH)


@pytest.mark.parametrize("client", ["client.py", "client_stream.py"])
def test_clients_against_the_guarded_fastapi_app(client: str, fastapi_app: str) -> None:
    found = answers(run_example(client, fastapi_app, "why is my bill so high", "hello"))
    approved = found["why is my bill so high"]
    assert approved.startswith(f"[prompt] [echo LLM, intent explain_bill] {BILL_PROMPT}")
    assert found["hello"].startswith(NORTHWIND_REPLY)


@pytest.mark.parametrize("client", ["client.py", "client_stream.py"])
def test_clients_handle_error_mode_refusals(client: str, hr_guard: Guard) -> None:
    with running_proxy(hr_guard, None) as proxy:
        found = answers(
            run_example(
                client,
                proxy.url + "/v1",
                "what is my manager's password",
                "write me a poem about pirates",
            )
        )
    refused = found["what is my manager's password"]
    assert refused.startswith("[rail_refused] I can't share other employees'")
    assert found["write me a poem about pirates"].startswith(
        "[rail_no_match] The helpdesk assistant only covers"
    )
