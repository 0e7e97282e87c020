"""Settings: defaults, environment parsing, and one clear line for every bad value."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from openmsk.config import ConfigError, Settings, load_settings

REPO = Path(__file__).resolve().parents[1]


def test_defaults() -> None:
    s = load_settings()
    assert s.data_dir == Path("./data")
    assert s.redis_url is None and s.orthanc_url is None
    assert (s.orthanc_http_port, s.orthanc_dicom_port) == (8042, 4242)
    assert (s.scp_ae_title, s.scp_port, s.web_port) == ("OPENMSK", 11112, 8000)
    assert s.api_tokens == [] and s.available_models is None and s.device == "auto"


def test_environment_values_are_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENMSK_API_TOKENS", " abc, def ,,")
    monkeypatch.setenv("OPENMSK_AVAILABLE_MODELS", "nnunet_fullres,dosma_2d")
    monkeypatch.setenv("OPENMSK_SCP_PORT", "104")
    monkeypatch.setenv("OPENMSK_DEVICE", "cpu")
    monkeypatch.setenv("OPENMSK_ORTHANC_URL", "http://pacs:8042/")
    s = load_settings()
    assert s.api_tokens == ["abc", "def"]
    assert s.available_models == ["nnunet_fullres", "dosma_2d"]
    assert s.scp_port == 104 and s.device == "cpu"
    assert s.orthanc_url == "http://pacs:8042"


def test_dotenv_file_is_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("OPENMSK_WEB_PORT=9001\n")
    monkeypatch.chdir(tmp_path)
    assert load_settings().web_port == 9001


@pytest.mark.parametrize(
    ("variable", "value", "expects"),
    [
        ("OPENMSK_SCP_PORT", "abc", "TCP port"),
        ("OPENMSK_WEB_PORT", "70000", "TCP port"),
        ("OPENMSK_DEVICE", "tpu", "auto, cpu, cuda"),
        ("OPENMSK_SCP_AE_TITLE", "THIS_AE_TITLE_IS_TOO_LONG", "AE title"),
        ("OPENMSK_SCP_AE_TITLE", "BAD\\AE", "AE title"),
        ("OPENMSK_REDIS_URL", "localhost:6379", "redis://"),
        ("OPENMSK_ORTHANC_URL", "pacs:8042", "http"),
        ("OPENMSK_WORKER_STALE_S", "0", "seconds"),
    ],
)
def test_bad_value_names_variable_and_expectation(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, expects: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{variable}={value!r} is invalid")
    assert expects in message


def test_cli_stops_with_one_line_on_bad_config(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "OPENMSK_SCP_PORT": "nope"}
    result = subprocess.run(
        [sys.executable, "-m", "openmsk", "up"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "OPENMSK_SCP_PORT='nope' is invalid: expected a TCP port" in lines[0]


def test_readme_documents_every_setting() -> None:
    readme = (REPO / "README.md").read_text()
    missing = [
        f"OPENMSK_{name.upper()}"
        for name in Settings.model_fields
        if f"`OPENMSK_{name.upper()}`" not in readme
    ]
    assert not missing, f"README.md lacks rows for {missing}"
