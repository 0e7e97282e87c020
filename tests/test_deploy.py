"""The production deployment files: compose validates, units verify, every prod-* target does what it says."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
PROD_TARGETS = (
    "prod-setup", "prod-start", "prod-stop", "prod-restart", "prod-status",
    "prod-logs", "prod-logs-worker", "prod-logs-web", "prod-logs-scp",
)  # fmt: skip


def test_compose_file_validates() -> None:
    env = {**os.environ, "OPENMSK_ENV_FILE": ".env.example"}
    result = subprocess.run(
        ["docker-compose", "-f", "docker-compose.yml", "--env-file", ".env.example", "config"],
        cwd=DEPLOY, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    config = result.stdout
    for service in ("caddy:", "redis:", "orthanc:", "web:", "scp:", "objectstore:"):
        assert service in config
    assert "127.0.0.1:6379" in config.replace('"', "") or "host_ip: 127.0.0.1" in config  # Redis stays local
    assert "--requirepass" in config and "appendonly" in config
    assert config.count("healthcheck:") == 6
    assert "127.0.0.1:8333:8333" in config.replace('"', "")  # the object store's S3 port stays local too
    assert "8042:8042" not in config.replace(
        "127.0.0.1:8042:8042", ""
    )  # Orthanc HTTP never published beyond localhost


def test_env_example_lists_every_variable_the_compose_file_uses() -> None:
    import re

    used = set(re.findall(r"\$\{([A-Z0-9_]+)", (DEPLOY / "docker-compose.yml").read_text()))
    used |= set(re.findall(r"\{\$([A-Z0-9_]+)\}", (DEPLOY / "Caddyfile").read_text()))
    listed = {
        line.split("=", 1)[0] for line in (DEPLOY / ".env.example").read_text().splitlines() if "=" in line
    }
    assert used - {"OPENMSK_ENV_FILE"} <= listed, f"not in .env.example: {sorted(used - listed)}"


@pytest.mark.parametrize("unit", sorted(p.name for p in (DEPLOY / "systemd").glob("*.service")))
def test_systemd_unit(unit: str, tmp_path: Path) -> None:
    text = (DEPLOY / "systemd" / unit).read_text()
    parser = configparser.ConfigParser(strict=True, interpolation=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(text)
    service = parser["Service"]
    assert service["Restart"] == "on-failure" and service["User"] == "openmsk"
    assert service["EnvironmentFile"] and service["StandardOutput"] == "journal"
    assert parser["Unit"]["StartLimitBurst"] and parser["Install"]["WantedBy"] == "multi-user.target"
    assert service["ExecStart"].split()[0].endswith("/openmsk")

    if shutil.which("systemd-analyze"):
        # Point the unit at files that exist here so verify checks the unit itself, not this machine's layout.
        local = text.replace("/opt/openmsk/.venv/bin/openmsk", shutil.which("true") or "/bin/true")
        local = local.replace("/etc/openmsk/openmsk.env", str(tmp_path / "env")).replace(
            "User=openmsk", "User=root"
        )
        local = local.replace("Group=openmsk", "Group=root").replace("/opt/openmsk", str(tmp_path))
        (tmp_path / "env").write_text("OPENMSK_DEVICE=auto\n")
        (tmp_path / unit).write_text(local)
        result = subprocess.run(
            ["systemd-analyze", "verify", "--man=no", str(tmp_path / unit)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        problems = [line for line in result.stderr.splitlines() if unit in line]
        assert not problems, result.stderr


@pytest.mark.parametrize("target", PROD_TARGETS)
def test_prod_target_dry_run(target: str) -> None:
    result = subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    commands = result.stdout
    expected = {
        "prod-setup": ["systemctl enable openmsk-worker.service", "useradd", "docker compose", "build"],
        "prod-start": ["up -d", "systemctl start openmsk-worker.service"],
        "prod-stop": ["systemctl stop openmsk-worker.service", " down"],
        "prod-restart": ["systemctl stop", " down", "up -d", "systemctl start"],
        "prod-status": [" ps", "systemctl --no-pager status openmsk-worker.service", "/health"],
        "prod-logs": ["logs -f", "journalctl -f"],
        "prod-logs-worker": ["journalctl -f -n 200 -u openmsk-worker"],
        "prod-logs-web": ["logs -f --tail=200 web"],
        "prod-logs-scp": ["logs -f --tail=200 scp"],
    }[target]
    for fragment in expected:
        assert fragment in commands, f"{target}: {fragment!r} not in:\n{commands}"
    assert "deploy/docker-compose.yml" in commands or target == "prod-logs-worker"
