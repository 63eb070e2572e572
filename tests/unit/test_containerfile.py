"""The image the Containerfile describes fits deploy/base and the runner's own defaults.

``nox -s image`` builds and runs the image (minutes, root, network); these checks read the files only, so CI keeps the
Containerfile, the manifests and the runner's options in step.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import yaml

from runner.config import DEFAULT_PROM_ADDRESS, listen_address, load_settings

ROOT = Path(__file__).resolve().parents[2]


def final_stage() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Containerfile's last stage, continuation lines joined, comments dropped."""
    lines = [line for line in (ROOT / "Containerfile").read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    instructions = [tuple(line.strip().split(None, 1)) for line in joined.splitlines() if line.strip()]
    last_from = max(i for i, (word, *_) in enumerate(instructions) if word.upper() == "FROM")
    return [(word.upper(), rest[0] if rest else "") for word, *rest in instructions[last_from:]]


def one(instruction: str) -> str:
    [value] = [args for word, args in final_stage() if word == instruction]
    return value


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for word, args in final_stage():
        if word == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(args))
    return env


def deployment_container() -> dict[str, Any]:
    deployment = yaml.safe_load((ROOT / "deploy" / "base" / "deployment.yaml").read_text())
    container: dict[str, Any] = deployment["spec"]["template"]["spec"]["containers"][0]
    return container


def test_the_image_runs_as_the_non_root_user_the_deployment_names() -> None:
    user, group = one("USER").split(":")
    assert user.isdigit() and int(user) != 0  # numeric, so that runAsNonRoot can check it
    deployment = yaml.safe_load((ROOT / "deploy" / "base" / "deployment.yaml").read_text())
    security = deployment["spec"]["template"]["spec"]["securityContext"]
    assert (int(user), int(group)) == (security["runAsUser"], security["fsGroup"])


def test_the_runner_in_the_image_keeps_its_files_on_the_volumes_the_deployment_mounts() -> None:
    settings = load_settings([], image_env())
    mounts = [Path(m["mountPath"]) for m in deployment_container()["volumeMounts"]]
    for path in (settings.queue_root, settings.working_dir, settings.cache_dir, settings.env_cache_dir):
        assert any(path.is_relative_to(mount) for mount in mounts), path


def test_the_image_exposes_the_port_the_runner_serves_and_the_deployment_probes() -> None:
    _, port = listen_address(DEFAULT_PROM_ADDRESS)
    assert one("EXPOSE") == str(port)
    assert {"name": "metrics", "containerPort": port} in deployment_container()["ports"]


def test_the_entrypoint_and_the_healthcheck_are_the_runners_commands() -> None:
    entrypoint = json.loads(one("ENTRYPOINT"))
    assert entrypoint[-3:] == ["python", "-m", "runner"]
    healthcheck = one("HEALTHCHECK")
    assert json.loads(healthcheck[healthcheck.index("CMD") + 3 :]) == ["python", "-m", "runner", "check"]


def test_gpu_nodes_get_nvml_from_the_nvidia_runtime() -> None:
    env = image_env()
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert set(env["NVIDIA_DRIVER_CAPABILITIES"].split(",")) >= {"utility", "compute"}
