"""The audit trail (``openmsk.audit``): a real storescu send through ``openmsk scp`` and ``openmsk worker`` into the
test Orthanc, then the web's sign-in and downloads — every step one JSON line with UIDs and no patient name or
ID; ``openmsk audit`` filters it; many processes append at once without losing or mixing lines; retention leaves
it alone."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pydicom
import pytest
import redis

from openmsk import audit
from openmsk.cli import build_parser
from openmsk.config import Settings
from openmsk.jobs import Job, JobState, JobStore
from openmsk.managed.orthanc import ManagedOrthanc
from openmsk.phantom import generate, write_series
from tests.processes import openmsk, settings_env, wait_for
from web import create_app
from web.auth import hash_password
from web.retention import cleanup

TOKEN = "audit-test-token-0123456789"
USER, PASSWORD = "auditor", "menisci-are-two"
SEED = 4177  # no other test sends this phantom: its study is ours alone in the shared Orthanc


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _lines(settings: Settings) -> list[dict]:
    return list(audit.AuditLog(settings.data_path).read())


def _csrf(page: str) -> str:
    return page.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]


def _audit_command(env: dict[str, str], *args: str) -> list[dict]:
    """``openmsk audit --json ARGS`` as a process of its own."""
    done = subprocess.run(
        [sys.executable, "-m", "openmsk", "audit", "--json", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def _audit_parsed(capsys: pytest.CaptureFixture[str], *args: str) -> list[dict]:
    """The same command parsed and run in this process (OPENMSK_DATA_DIR set by the caller): 4 s less each."""
    capsys.readouterr()
    parsed = build_parser().parse_args(["audit", "--json", *args])
    assert parsed.func(parsed) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_a_send_and_its_job_leave_one_line_per_step_with_uids_only(
    settings: Settings,
    orthanc_server: ManagedOrthanc,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = settings.model_copy(
        update={
            "orthanc_url": orthanc_server.url,
            "orthanc_user": orthanc_server.user,
            "orthanc_password": orthanc_server.password,
            "orthanc_dicom_port": orthanc_server.dicom_port,
            "orthanc_aet": orthanc_server.aet,
            "api_tokens": [TOKEN],
            "web_users": f"{USER}:{hash_password(PASSWORD)}",
            "device": "cpu",
        }
    )
    env = settings_env(settings, OPENMSK_SCP_ALLOWED_CALLING_AES="SCANNER1")
    logs = {name: tmp_path / f"{name}.log" for name in ("scp", "worker")}
    started = time.monotonic()
    scp = openmsk("scp", env, logs["scp"])
    worker = openmsk("worker", env, logs["worker"])  # its warm-up overlaps with writing the phantom
    store = JobStore.from_url(str(settings.redis_url))
    phantom = tmp_path / "phantom"
    write_series(generate(seed=SEED, size="small"), phantom)
    files = sorted(str(p) for p in (phantom / "dicom").iterdir())
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    patient = [str(first.PatientName), str(first.PatientID)]
    dcmtk = {"PATH": "/usr/bin:/bin"}
    port = str(settings.scp_port)
    try:
        wait_for(lambda: _port_open(settings.scp_port), 30, "SCP listening")
        refused = subprocess.run(
            ["storescu", "-aet", "INTRUDER", "-aec", "OPENMSK", "127.0.0.1", port, files[0]],
            env=dcmtk, capture_output=True, timeout=60,
        )  # fmt: skip
        assert refused.returncode != 0
        subprocess.run(
            ["storescu", "-aet", "SCANNER1", "-aec", "OPENMSK", "127.0.0.1", port, *files],
            check=True, env=dcmtk, timeout=60,
        )  # fmt: skip
        wait_for(lambda: store.count() == 1, 30, "the SCP queued one job")
        job = store.list()[0]
        queued = time.monotonic()
        wait_for(lambda: store.get(job.id).terminal, 180, "the job finished")
        job = store.get(job.id)
        print(
            f"job queued {queued - started:.1f} s after the start, done {time.monotonic() - queued:.1f} s later"
        )
        assert job.state is JobState.DONE, job.error
    finally:
        for proc in (scp, worker):
            proc.terminate()
        for proc in (scp, worker):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()

    # The web: a failed and a good sign-in, a file and the results zip downloaded.
    client = create_app(settings).test_client()
    page = client.get("/login").get_data(as_text=True)
    assert (
        client.post("/login", data={"user": USER, "password": "no", "csrf_token": _csrf(page)}).status_code
        == 401
    )
    assert (
        client.post(
            "/login", data={"user": USER, "password": PASSWORD, "csrf_token": _csrf(page)}
        ).status_code
        == 302
    )
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    seg = client.get(f"/api/jobs/{job.id}/files/seg.dcm", headers=bearer)
    assert seg.status_code == 200
    assert (
        client.get(f"/api/jobs/{job.id}/files/seg.dcm", headers={**bearer, "Range": "bytes=100-"}).status_code
        == 206
    )
    results = client.get(f"/api/jobs/{job.id}/results.zip", headers=bearer)
    assert results.status_code == 200 and zipfile.ZipFile(io.BytesIO(results.data)).namelist()
    # An upload of the same series: imported through the web (its job waits: no worker runs now).
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as bundle:
        for path in files:
            bundle.write(path, arcname=Path(path).name)
    uploaded = client.post(
        "/api/jobs", headers=bearer, data={"file": (io.BytesIO(archive.getvalue()), "knee.zip")}
    )
    assert uploaded.status_code == 202, uploaded.get_data(as_text=True)

    lines = _lines(settings)
    by_kind: dict[str, list[dict]] = {}
    for line in lines:
        assert (
            line["event_id"].startswith("DCM 1101")
            and line["action"] in "CRUDE"
            and line["time"].endswith("Z")
        )
        by_kind.setdefault(line["kind"], []).append(line)

    (rejected,) = by_kind["association-rejected"]
    assert rejected["reason"] == "calling-ae" and rejected["outcome"] == 4
    assert rejected["participants"][0] == {"role": "source", "ae": "INTRUDER", "address": "127.0.0.1"}
    (accepted,) = by_kind["association-accepted"]
    assert accepted["participants"][0]["ae"] == "SCANNER1" and accepted["outcome"] == 0
    (received,) = by_kind["instances-received"]
    assert received["event_id"] == "DCM 110104"
    assert received["objects"] == {
        "study": job.study_uid,
        "series": job.series_uid,
        "instance_count": len(files),
    }
    created, imported = by_kind["job-created"]
    assert created["objects"]["job"] == job.id and created["objects"]["series"] == job.series_uid
    assert created["event_id"] == "DCM 110103" and created["participants"] == [
        {"role": "source", "ae": "SCANNER1"}
    ]
    assert imported["event_id"] == "DCM 110107" and imported["action"] == "C"
    assert (
        imported["objects"]["job"] == uploaded.json["id"] and imported["objects"]["series"] == job.series_uid
    )
    (finished,) = by_kind["job-finished"]
    assert finished["outcome"] == 0 and finished["objects"]["job"] == job.id
    delivered = by_kind["results-delivered"]
    assert [d["participants"][0]["destination"] for d in delivered] == ["orthanc"]
    assert {r.sop_instance_uid for r in job.results} == set(delivered[0]["objects"]["sop_instances"])
    downloads = by_kind["results-downloaded"]
    assert [d["objects"]["file"] for d in downloads] == ["seg.dcm", "results.zip"]  # not the ranged re-fetch
    assert all(d["participants"][0]["principal"].startswith("token:") for d in downloads)
    failed, good = by_kind["sign-in"]
    assert failed["outcome"] == 4 and "principal" not in failed["participants"][0]
    assert good["outcome"] == 0 and good["participants"][0]["principal"] == f"user:{USER}"
    order = [line["kind"] for line in lines]
    assert (
        order.index("association-accepted") < order.index("instances-received") < order.index("job-created")
    )
    assert order.index("job-created") < order.index("results-delivered") <= order.index("job-finished")

    # No patient name or ID, no secret: not in the audit trail, not in the SCP's or the worker's log.
    for path in (audit.AuditLog(settings.data_path).path, *logs.values()):
        text = path.read_text()
        for value in (*patient, TOKEN, orthanc_server.password):
            assert value not in text, f"{value!r} in {path}"

    # `openmsk audit` filters (a separate process reading the same DATA_DIR).
    assert len(_audit_command(env)) == len(lines)
    monkeypatch.setenv("OPENMSK_DATA_DIR", str(settings.data_path))
    assert _audit_parsed(capsys, "--event", "job-finished") == [finished]
    assert _audit_parsed(capsys, "--ae", "INTRUDER") == [rejected]
    for_study = _audit_parsed(capsys, "--study", job.study_uid, "--event", "110104", "--since", "1h")
    assert [line["kind"] for line in for_study] == ["instances-received"] + ["results-delivered"] * len(
        delivered
    )
    assert _audit_parsed(capsys, "--since", "2999-01-01") == []
    table = build_parser().parse_args(["audit", "--ae", "INTRUDER"])  # the table a person reads
    assert table.func(table) == 0
    shown = capsys.readouterr()
    assert "association-rejected  minor-failure (calling-ae)  source=INTRUDER@127.0.0.1" in shown.out
    assert shown.err.startswith("1 event(s) in ")


def test_no_free_text_reaches_the_log(tmp_path: Path) -> None:
    """Every field is typed: a patient name handed over as a UID, an AE title or a job id is not written."""
    log = audit.AuditLog(tmp_path)
    assert not audit.instances_received(
        log, calling_ae="CT1", called_ae="OPENMSK", study_uid="DOE^JANE", series_uid="1.2.3", count=1
    )
    assert not audit.association(log, calling_ae="DOE^JANE\\X", called_ae="OPENMSK", address="10.0.0.1")
    assert not audit.association(log, calling_ae="CT1", called_ae="OPENMSK", address="DOE^JANE")
    assert not audit.study_viewed(log, principal="user:x y", address=None, study_uid="1.2.3")
    assert not log.path.exists()
    with pytest.raises(TypeError):
        audit.sign_in(log, principal=None, address=None, user="DOE^JANE")  # type: ignore[call-arg]
    assert audit.study_viewed(log, principal="user:alice", address="::1", study_uid="1.2.840.10008.1")
    (line,) = log.read()
    assert line["objects"] == {"study": "1.2.840.10008.1"} and line["event_id"] == "DCM 110103"


def _append_many(folder: str, writer: int, count: int) -> None:
    log = audit.AuditLog(Path(folder), rotate_bytes=20_000)
    for n in range(count):
        assert (
            log.append(
                audit.event(
                    audit.Kind.INSTANCES_RECEIVED,
                    audit.Action.CREATE,
                    objects=audit.Objects(
                        study=f"1.2.{writer}", series=f"1.2.{writer}.{n}", instance_count=n
                    ),
                )
            )
            is None
        )


def test_processes_appending_at_once_lose_and_mix_nothing(tmp_path: Path) -> None:
    writers, count = 4, 100
    context = multiprocessing.get_context("fork")
    procs = [context.Process(target=_append_many, args=(str(tmp_path), w, count)) for w in range(writers)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    log = audit.AuditLog(tmp_path)
    assert len(log.rotated()) >= 2  # it rotated several times under contention, numbering up from 1
    assert [p.name for p in log.rotated()][:2] == ["audit.log.1", "audit.log.2"]
    raw = b"".join(p.read_bytes() for p in [*log.rotated(), log.path])
    assert raw.count(b"\n") == writers * count  # every line whole: each one parses
    seen = sorted((e["objects"]["study"], e["objects"]["instance_count"]) for e in log.read())
    assert seen == sorted((f"1.2.{w}", n) for w in range(writers) for n in range(count))
    for w in range(writers):  # each writer's lines in its own order
        mine = [e["objects"]["instance_count"] for e in log.read() if e["objects"]["study"] == f"1.2.{w}"]
        assert mine == list(range(count))
    assert oct(log.path.stat().st_mode & 0o777) == "0o600"


def test_retention_keeps_the_audit_trail(settings: Settings, redis_client: redis.Redis) -> None:
    store = JobStore(redis_client, audit=audit.AuditLog(settings.data_path))
    job = store.create(Job(source="upload", model="demo", input_path="uploads/x"))
    store.transition(job.id, JobState.FAILED)
    (settings.data_path / "uploads" / job.id).mkdir(parents=True)
    before = audit.AuditLog(settings.data_path).path.read_bytes()
    created, finished = (json.loads(line) for line in before.splitlines())
    assert created["kind"] == "job-created" and finished["kind"] == "job-finished"
    assert finished["outcome"] == 8 and finished["reason"] == "FAILED"  # failed, even without an error code
    report = cleanup(settings, store, now=time.time() + 10 * 365 * 86400)
    assert report.jobs == 1 and not (settings.data_path / "uploads" / job.id).exists()
    assert audit.AuditLog(settings.data_path).path.read_bytes() == before
    assert sorted(os.listdir(settings.data_path / "audit")) == [".lock", "audit.log"]
