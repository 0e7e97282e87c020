"""`openmsk up`: the whole node starts, reports healthy, and stops on SIGTERM leaving no process behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from openmsk.managed.process import free_port
from tests.processes import alive, descendants, health, wait_for


def test_up_starts_healthy_and_stops_cleanly(tmp_path: Path) -> None:
    ports = {name: free_port() for name in ("web", "scp", "orthanc_http", "orthanc_dicom", "viewer")}
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENMSK_")}
    env.update(
        OPENMSK_DATA_DIR=str(tmp_path / "data"),
        OPENMSK_WEB_PORT=str(ports["web"]),
        OPENMSK_VIEWER_PORT=str(ports["viewer"]),
        OPENMSK_SCP_PORT=str(ports["scp"]),
        OPENMSK_SCP_HOST="127.0.0.1",
        OPENMSK_ORTHANC_HTTP_PORT=str(ports["orthanc_http"]),
        OPENMSK_ORTHANC_DICOM_PORT=str(ports["orthanc_dicom"]),
        OPENMSK_MIN_FREE_DISK_MB="0",
    )
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        node = subprocess.Popen(
            [sys.executable, "-m", "openmsk", "up"], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        started = time.monotonic()
        wait_for(lambda: health(ports["web"])[0] == 200, 60, f"healthy node (log: {log})")
        took = time.monotonic() - started
        _, report = health(ports["web"])
        assert report["redis"] == report["worker"] == report["orthanc"] == "available"
        printed = log.read_text()
        assert (
            f"http://127.0.0.1:{ports['web']}" in printed and f"OPENMSK@127.0.0.1:{ports['scp']}" in printed
        )

        # The generated Orthanc credentials: kept, the only way into Orthanc, and never printed (the output is
        # the journal under systemd): the banner says where they are.
        secrets = tmp_path / "data" / "secrets"
        auth = ("openmsk", (secrets / "orthanc_password").read_text().strip())
        assert str(secrets / "orthanc_password") in printed
        orthanc = f"http://127.0.0.1:{ports['orthanc_http']}"
        assert requests.get(f"{orthanc}/system", timeout=5).status_code == 401
        assert requests.get(f"{orthanc}/system", auth=auth, timeout=5).status_code == 200
        modalities = requests.get(f"{orthanc}/modalities?expand", auth=auth, timeout=5)
        assert modalities.json()["openmsk"]["AET"] == "OPENMSK"
        assert (tmp_path / "data" / "redis" / "appendonlydir").is_dir()  # AOF persistence is on
        # No token configured: the node made one, says where it is, and the API accepts it (and nothing else).
        token = (secrets / "api_token").read_text().strip()
        assert str(secrets / "api_token") in printed
        api = f"http://127.0.0.1:{ports['web']}/api/models"
        assert requests.get(api, timeout=5).status_code == 401
        assert requests.get(api, headers={"Authorization": f"Bearer {token}"}, timeout=5).status_code == 200
        assert requests.get(api, headers={"Authorization": f"Bearer {token}x"}, timeout=5).status_code == 401
        shown = subprocess.run(
            [sys.executable, "-m", "openmsk", "secrets", "show", "api-token"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert shown.returncode == 0 and shown.stdout.strip() == token
        print(f"node healthy after {took:.1f} s")

        children = descendants(node.pid)
        assert len(children) >= 6  # redis, orthanc, scp, worker, web, viewer
        started = time.monotonic()
        node.send_signal(signal.SIGTERM)
        assert node.wait(timeout=12) == 0
        assert time.monotonic() - started < 10
        left = [pid for pid in children if alive(pid)]
        assert not left, f"processes left behind: {left}"

        # Neither secret in anything the node wrote: its output (every child's too) and every log file.
        logs = [log, *(tmp_path / "data").rglob("*.log")]
        assert len(logs) >= 2  # up.log, Orthanc's log, the audit log
        for path in logs:
            text = path.read_bytes()
            assert token.encode() not in text and auth[1].encode() not in text, f"a secret in {path}"
        kinds = [
            json.loads(line)["kind"] for line in (tmp_path / "data/audit/audit.log").read_text().splitlines()
        ]
        assert kinds[0] == "application-start" and kinds[-1] == "application-stop"
    finally:
        if node.poll() is None:
            node.kill()
