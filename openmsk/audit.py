"""The audit trail: who sent, processed, delivered, downloaded and viewed which study — one JSON line per event.

Modelled on the DICOM audit messages of PS3.15 Annex A.5: every line carries an event ID code (``DCM 110104``
"DICOM Instances Transferred" and so on), an action code (C create, R read, U update, D delete, E execute), an
outcome (0 success, 4 minor failure, 8 serious failure, 12 major failure), the active participants (AE
titles, network addresses, the signed-in principal) and the participating objects — **UIDs only**. The event
types below are built from typed, validated fields (UIDs must look like UIDs, AE titles like AE titles, job
ids like job ids, reasons come from fixed lists): there is no free-text field, so a patient name or ID cannot
be handed to this module at all.

Where it goes: ``DATA_DIR/audit/audit.log``, appended to by every process of a node (SCP, worker, web,
viewer). Each event is written under an exclusive ``flock`` on ``DATA_DIR/audit/.lock`` as one ``write`` of
one line to a file opened ``O_APPEND``, then ``fsync``ed before the call returns: a line is either whole or
absent after a crash, lines of concurrent processes never interleave, and an acknowledged event is on disk.
Events are per association, series, job, download or viewed study (never per instance or frame), so one
``fsync`` each costs nothing measurable. Past :data:`ROTATE_BYTES` the file is renamed to ``audit.log.<N>``
(``N`` counting up from 1) under the same lock; the node never deletes or shortens any of these files —
retention (``OPENMSK_RETENTION_HOURS``) is for data, not for the audit trail; archiving them is the site's
business.

A failure to write the audit line is logged (without the event) and does not stop the operation it describes:
a full disk must not also stop the SCP from answering.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import ipaddress
import json
import logging
import os
import re
import socket
import sys
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from enum import IntEnum, StrEnum
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from openmsk.atomic import fsync_folder

log = logging.getLogger("openmsk.audit")

FOLDER = "audit"
FILE = "audit.log"
LOCK = ".lock"
ROTATE_BYTES = 64 * 1024 * 1024  # one file of ~200 000 events; then audit.log.<N>

# ----------------------------------------------------------------------------------------- typed fields

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_AE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")
_JOB_ID = re.compile(r"^[0-9a-f]{32}$")
_PRINCIPAL = re.compile(r"^(token:[0-9a-f]{16}|user:[\w.@+-]{1,64})$")
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")  # destination names, job file names
_ERROR_CODE = re.compile(r"^[A-Z][A-Z_]{0,39}$")


def _uid(value: str) -> str:
    if len(value) > 64 or not _UID.match(value):
        raise ValueError("not a DICOM UID")
    return value


def _ae(value: str) -> str:
    value = value.strip()
    if not _AE.match(value) or not value:
        raise ValueError("not an AE title")
    return value


def _address(value: str) -> str:
    return str(ipaddress.ip_address(value))  # ValueError for anything that is not an IP address


def _pattern(expression: re.Pattern[str], what: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        if not expression.match(value):
            raise ValueError(f"not a {what}")
        return value

    return check


Uid = Annotated[str, AfterValidator(_uid)]
AETitle = Annotated[str, AfterValidator(_ae)]
Address = Annotated[str, AfterValidator(_address)]
JobId = Annotated[str, AfterValidator(_pattern(_JOB_ID, "job id"))]
Principal = Annotated[str, AfterValidator(_pattern(_PRINCIPAL, "principal (token:<digest> or user:<name>)"))]
Name = Annotated[str, AfterValidator(_pattern(_NAME, "name"))]
ErrorCodeName = Annotated[str, AfterValidator(_pattern(_ERROR_CODE, "error code"))]


class Outcome(IntEnum):
    """PS3.15 EventOutcomeIndicator."""

    SUCCESS = 0
    MINOR_FAILURE = 4
    SERIOUS_FAILURE = 8
    MAJOR_FAILURE = 12


class Action(StrEnum):
    """PS3.15 EventActionCode."""

    CREATE = "C"
    READ = "R"
    UPDATE = "U"
    DELETE = "D"
    EXECUTE = "E"


class Kind(StrEnum):
    """The node's event names (what ``openmsk audit --event`` takes), each with its PS3.15 event ID below."""

    APPLICATION_START = "application-start"
    APPLICATION_STOP = "application-stop"
    ASSOCIATION_ACCEPTED = "association-accepted"
    ASSOCIATION_REJECTED = "association-rejected"
    INSTANCES_RECEIVED = "instances-received"
    JOB_CREATED = "job-created"
    JOB_FINISHED = "job-finished"
    RESULTS_DELIVERED = "results-delivered"
    RESULTS_DOWNLOADED = "results-downloaded"
    STUDY_VIEWED = "study-viewed"
    SIGN_IN = "sign-in"
    SIGN_OUT = "sign-out"


# (EventID code, its meaning, EventTypeCode or None) — DCM codes of PS3.16 CID 400/401 as PS3.15 uses them.
EVENT_CODES: dict[Kind, tuple[str, str, tuple[str, str] | None]] = {
    Kind.APPLICATION_START: ("110100", "Application Activity", ("110120", "Application Start")),
    Kind.APPLICATION_STOP: ("110100", "Application Activity", ("110121", "Application Stop")),
    Kind.ASSOCIATION_ACCEPTED: ("110114", "User Authentication", ("110122", "Login")),
    Kind.ASSOCIATION_REJECTED: ("110113", "Security Alert", ("110126", "Node Authentication")),
    Kind.INSTANCES_RECEIVED: ("110104", "DICOM Instances Transferred", None),
    Kind.JOB_CREATED: ("110103", "DICOM Instances Accessed", None),
    Kind.JOB_FINISHED: ("110103", "DICOM Instances Accessed", None),
    Kind.RESULTS_DELIVERED: ("110104", "DICOM Instances Transferred", None),
    Kind.RESULTS_DOWNLOADED: ("110106", "Export", None),
    Kind.STUDY_VIEWED: ("110103", "DICOM Instances Accessed", None),
    Kind.SIGN_IN: ("110114", "User Authentication", ("110122", "Login")),
    Kind.SIGN_OUT: ("110114", "User Authentication", ("110123", "Logout")),
}

IMPORT_CODES = ("110107", "Import", None)  # a job made from an upload

RejectReason = Literal["called-ae", "calling-ae", "no-space", "association-limit"]
SignInFailure = Literal["wrong-credentials", "wrong-token"]


class Participant(BaseModel):
    """An ActiveParticipant: a DICOM peer (AE title, address), a web client (address, principal), or the node."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["source", "destination", "user", "node"]
    ae: AETitle | None = None
    address: Address | None = None
    principal: Principal | None = None
    destination: Name | None = Field(None, description="a configured destination's name")


class Objects(BaseModel):
    """The ParticipantObjects: UIDs, counts and the job — nothing that identifies a patient."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    study: Uid | None = None
    series: Uid | None = None
    sop_instances: list[Uid] = Field(default_factory=list, max_length=16)  # results (SEG, SR), not the images
    instance_count: int | None = Field(None, ge=0)
    job: JobId | None = None
    model: Name | None = None
    file: Name | None = None


class Event(BaseModel):
    """One audit line. Build it through the functions below rather than by hand."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    time: str
    kind: Kind
    event_id: str
    event_name: str
    event_type: str | None = None
    action: Action
    outcome: Outcome
    reason: RejectReason | SignInFailure | ErrorCodeName | None = None
    source: str = Field(description="AuditSourceID: the host and the node's process that saw the event")
    participants: list[Participant] = Field(default_factory=list)
    objects: Objects = Field(default_factory=Objects)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _source() -> str:
    process = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    if len(sys.argv) > 1 and process in ("__main__.py", "openmsk"):
        process = f"openmsk {sys.argv[1]}"
    return f"{socket.gethostname()}/{process}"[:128]


def event(
    kind: Kind,
    action: Action,
    outcome: Outcome = Outcome.SUCCESS,
    *,
    participants: Iterable[Participant] = (),
    objects: Objects | None = None,
    reason: str | None = None,
    codes: tuple[str, str, tuple[str, str] | None] | None = None,
) -> Event:
    """An :class:`Event` of ``kind`` with its PS3.15 codes (``codes``, else the kind's) filled in and validated."""
    code, name, event_type = codes or EVENT_CODES[kind]
    return Event(
        time=_now(),
        kind=kind,
        event_id=f"DCM {code}",
        event_name=name,
        event_type=f"DCM {event_type[0]} {event_type[1]}" if event_type else None,
        action=action,
        outcome=outcome,
        reason=reason,
        source=_source(),
        participants=list(participants),
        objects=objects or Objects(),
    )


# --------------------------------------------------------------------------------------------- the log


class AuditLog:
    """``DATA_DIR/audit/audit.log`` and its rotated predecessors; safe for many processes at once."""

    def __init__(self, data_dir: Path, rotate_bytes: int = ROTATE_BYTES) -> None:
        self.folder = Path(data_dir) / FOLDER
        self.path = self.folder / FILE
        self.rotate_bytes = rotate_bytes

    def __repr__(self) -> str:
        return f"AuditLog({self.path})"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.folder / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def rotated(self) -> list[Path]:
        """The rotated files, oldest first."""
        numbered = []
        for path in self.folder.glob(FILE + ".*"):
            suffix = path.name[len(FILE) + 1 :]
            if suffix.isdigit():
                numbered.append((int(suffix), path))
        return [path for _, path in sorted(numbered)]

    def _rotate_if_full(self) -> None:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return
        if size < self.rotate_bytes:
            return
        last = self.rotated()
        number = int(last[-1].name.rsplit(".", 1)[1]) + 1 if last else 1
        os.rename(self.path, self.folder / f"{FILE}.{number}")
        fsync_folder(self.folder)

    def append(self, entry: Event) -> None:
        """Write ``entry`` as one line, durably; raises ``OSError`` if it could not be written."""
        line = (entry.model_dump_json(exclude_defaults=True) + "\n").encode()
        with self._locked():
            self._rotate_if_full()
            created = not self.path.exists()
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                written = os.write(fd, line)
                if written != len(line):  # a short write (disk full): never leave half a line behind
                    os.ftruncate(fd, os.fstat(fd).st_size - written)
                    raise OSError(28, "short write to the audit log")
                os.fsync(fd)
            finally:
                os.close(fd)
            if created:
                fsync_folder(self.folder)

    def record(self, entry: Event) -> bool:
        """:meth:`append`, logging instead of raising (the operation being audited goes on); True if written."""
        try:
            self.append(entry)
        except OSError as exc:
            log.error(
                "cannot write the audit log %s: %s (event %s lost)", self.path, exc.strerror, entry.kind
            )
            return False
        return True

    def read(self) -> Iterator[dict]:
        """Every event, oldest first, as the dictionaries written (a line that does not parse is skipped)."""
        for path in [*self.rotated(), self.path]:
            try:
                handle = path.open("rb")
            except FileNotFoundError:
                continue
            with handle:
                for raw in handle:
                    try:
                        yield json.loads(raw)
                    except ValueError:
                        continue


# The process's audit log, installed once by the ``openmsk`` command (openmsk/cli.py) from the settings, for
# code that has no settings at hand (the job store in the worker). Rooms that build their own pieces in one
# process (web app, SCP) pass their AuditLog explicitly instead.
_installed: AuditLog | None = None


def install(audit: AuditLog | None) -> None:
    global _installed
    _installed = audit


def installed() -> AuditLog | None:
    return _installed


# -------------------------------------------------------------------------------- the events, one by one


def _guarded(build: Callable[..., bool]) -> Callable[..., bool]:
    """A field that fails validation (not a UID, not an AE title) drops the event with an error naming the
    field only: the value may be exactly what must not be written."""

    @functools.wraps(build)
    def wrapper(*args: object, **kwargs: object) -> bool:
        try:
            return build(*args, **kwargs)
        except ValidationError as exc:
            fields = ", ".join(".".join(str(p) for p in err["loc"]) for err in exc.errors())
            log.error("audit event %s not written: invalid %s", build.__name__, fields)
            return False

    return wrapper


@_guarded
def association(
    audit: AuditLog,
    *,
    calling_ae: str,
    called_ae: str,
    address: str,
    rejected: RejectReason | None = None,
) -> bool:
    """An A-ASSOCIATE-RQ accepted, or rejected for ``rejected``."""
    participants = [
        Participant(role="source", ae=calling_ae or None, address=address or None),
        Participant(role="destination", ae=called_ae or None),
    ]
    if rejected is None:
        entry = event(Kind.ASSOCIATION_ACCEPTED, Action.EXECUTE, participants=participants)
    else:
        entry = event(
            Kind.ASSOCIATION_REJECTED,
            Action.EXECUTE,
            Outcome.MINOR_FAILURE,
            participants=participants,
            reason=rejected,
        )
    return audit.record(entry)


@_guarded
def instances_received(
    audit: AuditLog, *, calling_ae: str, called_ae: str, study_uid: str, series_uid: str, count: int
) -> bool:
    """A series' instances stored (one line per series when it completes, not per instance)."""
    return audit.record(
        event(
            Kind.INSTANCES_RECEIVED,
            Action.CREATE,
            participants=[
                Participant(role="source", ae=calling_ae or None),
                Participant(role="node", ae=called_ae or None),
            ],
            objects=Objects(study=study_uid, series=series_uid, instance_count=count),
        )
    )


def _job_objects(job_id: str, study_uid: str, series_uid: str, count: int, model: str) -> Objects:
    return Objects(
        study=study_uid or None,
        series=series_uid or None,
        instance_count=count,
        job=job_id,
        model=model or None,
    )


@_guarded
def job_created(
    audit: AuditLog,
    *,
    job_id: str,
    source: Literal["scp", "upload"],
    calling_ae: str | None,
    study_uid: str,
    series_uid: str,
    count: int,
    model: str,
) -> bool:
    """A job queued: for received DICOM the instances are now processed (110103, E); an upload is also the
    moment its data entered the node (110107 Import, C)."""
    participants = [Participant(role="source", ae=calling_ae)] if calling_ae else []
    upload = source == "upload"
    return audit.record(
        event(
            Kind.JOB_CREATED,
            Action.CREATE if upload else Action.EXECUTE,
            participants=participants,
            objects=_job_objects(job_id, study_uid, series_uid, count, model),
            codes=IMPORT_CODES if upload else None,
        )
    )


@_guarded
def job_finished(
    audit: AuditLog,
    *,
    job_id: str,
    study_uid: str,
    series_uid: str,
    count: int,
    model: str,
    error_code: str | None,
) -> bool:
    """A job done (outcome 0) or failed (8, with its error code; a superseded one is 4)."""
    if error_code is None:
        outcome = Outcome.SUCCESS
    else:
        outcome = Outcome.MINOR_FAILURE if error_code == "SUPERSEDED" else Outcome.SERIOUS_FAILURE
    return audit.record(
        event(
            Kind.JOB_FINISHED,
            Action.EXECUTE,
            outcome,
            objects=_job_objects(job_id, study_uid, series_uid, count, model),
            reason=error_code,
        )
    )


@_guarded
def results_delivered(
    audit: AuditLog, *, job_id: str, destination: str, study_uid: str, series_uid: str, sop_uids: list[str]
) -> bool:
    """A job's SEG/SR stored at ``destination`` (the source series is the one the results refer to)."""
    return audit.record(
        event(
            Kind.RESULTS_DELIVERED,
            Action.READ,
            participants=[Participant(role="destination", destination=destination)],
            objects=Objects(
                study=study_uid or None, series=series_uid or None, sop_instances=sop_uids[:16], job=job_id
            ),
        )
    )


@_guarded
def results_downloaded(
    audit: AuditLog,
    *,
    job_id: str,
    principal: str | None,
    address: str | None,
    study_uid: str,
    series_uid: str,
    file: str,
) -> bool:
    """A job's outputs (one file or the results zip) sent to a web client."""
    return audit.record(
        event(
            Kind.RESULTS_DOWNLOADED,
            Action.READ,
            participants=[Participant(role="user", principal=principal, address=address)],
            objects=Objects(study=study_uid or None, series=series_uid or None, job=job_id, file=file),
        )
    )


@_guarded
def study_viewed(audit: AuditLog, *, principal: str | None, address: str | None, study_uid: str) -> bool:
    """A study opened in the viewer (its first DICOMweb/WADO request of a session)."""
    return audit.record(
        event(
            Kind.STUDY_VIEWED,
            Action.READ,
            participants=[Participant(role="user", principal=principal, address=address)],
            objects=Objects(study=study_uid),
        )
    )


@_guarded
def sign_in(
    audit: AuditLog,
    *,
    principal: str | None,
    address: str | None,
    reason: SignInFailure = "wrong-credentials",
) -> bool:
    """A sign-in to the pages or the viewer: ``principal`` when it succeeded, ``None`` when it failed.

    A failed attempt names only the address: the user name typed may be anything (a password in the wrong
    field, a patient's name), so it is not written."""
    if principal is None:
        entry = event(
            Kind.SIGN_IN,
            Action.EXECUTE,
            Outcome.MINOR_FAILURE,
            participants=[Participant(role="user", address=address)],
            reason=reason,
        )
    else:
        entry = event(
            Kind.SIGN_IN,
            Action.EXECUTE,
            participants=[Participant(role="user", principal=principal, address=address)],
        )
    return audit.record(entry)


@_guarded
def sign_out(audit: AuditLog, *, principal: str, address: str | None) -> bool:
    return audit.record(
        event(
            Kind.SIGN_OUT,
            Action.EXECUTE,
            participants=[Participant(role="user", principal=principal, address=address)],
        )
    )


@_guarded
def application(audit: AuditLog, *, started: bool) -> bool:
    """``openmsk up`` started or stopped the node."""
    return audit.record(event(Kind.APPLICATION_START if started else Kind.APPLICATION_STOP, Action.EXECUTE))


# ------------------------------------------------------------------------------------ ``openmsk audit``

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_since(value: str, now: datetime | None = None) -> datetime:
    """``--since``: an ISO date or date-time (UTC unless it says otherwise), or a span back from now (``90m``,
    ``12h``, ``7d``)."""
    now = now or datetime.now(UTC)
    match = _RELATIVE.match(value.strip())
    if match:
        return now - timedelta(**{_UNITS[match.group(2)]: float(match.group(1))})
    try:
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--since {value!r}: expected an ISO date/time (2026-01-31, 2026-01-31T08:00) or a span (90m, 12h, 7d)"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def matches(
    entry: dict,
    *,
    since: datetime | None = None,
    events: Iterable[str] = (),
    study: str | None = None,
    ae: str | None = None,
) -> bool:
    """Whether one line passes ``openmsk audit``'s filters. ``events`` are kinds or DCM codes (``110104``)."""
    if since is not None:
        try:
            when = datetime.fromisoformat(str(entry.get("time", "")).replace("Z", "+00:00"))
        except ValueError:
            return False
        if when < since:
            return False
    wanted = {e.strip().removeprefix("DCM").strip() for e in events if e.strip()}
    if wanted and not wanted & {entry.get("kind"), str(entry.get("event_id", "")).removeprefix("DCM ")}:
        return False
    if study and entry.get("objects", {}).get("study") != study:
        return False
    if ae:
        aes = {p.get("ae") for p in entry.get("participants", [])}
        if ae.strip() not in aes:
            return False
    return True


def _line(entry: dict) -> str:
    who = []
    for p in entry.get("participants", []):
        parts = [p.get(k) for k in ("ae", "destination", "principal", "address") if p.get(k)]
        if parts:
            who.append(f"{p.get('role')}={'@'.join(parts)}")
    objects = entry.get("objects", {})
    what = [
        f"{k}={objects[k]}" for k in ("study", "series", "instance_count", "job", "file") if objects.get(k)
    ]
    outcome = {0: "ok", 4: "minor-failure", 8: "failure", 12: "major-failure"}.get(entry.get("outcome"), "?")
    reason = f" ({entry['reason']})" if entry.get("reason") else ""
    return f"{entry.get('time')}  {entry.get('kind')}  {outcome}{reason}  {' '.join(who)}  {' '.join(what)}".rstrip()


def _command(args: argparse.Namespace) -> int:
    from openmsk.config import load_settings

    audit = AuditLog(load_settings().data_path)
    shown = 0
    for entry in audit.read():
        if not matches(entry, since=args.since, events=args.event or (), study=args.study, ae=args.ae):
            continue
        print(json.dumps(entry, separators=(",", ":")) if args.json else _line(entry))
        shown += 1
    if not args.json:
        sys.stdout.flush()  # the count comes after the lines, also when both go to one terminal or file
        print(f"{shown} event(s) in {audit.folder}", file=sys.stderr)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """``openmsk audit``: the audit trail, filtered."""
    parser = subparsers.add_parser(
        "audit",
        help="show the audit trail (DATA_DIR/audit): associations, jobs, deliveries, downloads, sign-ins",
        description="Show the audit trail, oldest first. Filters combine (all must match).",
    )
    parser.add_argument(
        "--since", type=parse_since, help="from this ISO date/time (UTC) or span back (12h, 7d)"
    )
    parser.add_argument(
        "--event",
        action="append",
        metavar="KIND",
        help=f"only this event kind or DCM code (repeatable): {', '.join(k.value for k in Kind)}",
    )
    parser.add_argument("--study", metavar="UID", help="only events about this Study Instance UID")
    parser.add_argument("--ae", metavar="AE", help="only events with this AE title as a participant")
    parser.add_argument("--json", action="store_true", help="print the JSON lines as stored")
    parser.set_defaults(func=_command)
