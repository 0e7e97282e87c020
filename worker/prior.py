"""Change since the prior visit: the latest earlier result for the same patient and knee, and the comparison.

A prior is the latest result of the same patient (PatientID) and knee (Laterality) from a study dated before
this one (StudyDate; another study). Two places can hold one:

* this node's own results: :class:`NodePriors`, a Redis hash per patient and knee, written when a job's
  analysis is done (:meth:`NodePriors.record`), one field per study holding the study date, the job id, the
  model and the mean thickness of each region and cartilage (a few hundred bytes: the comparison needs no
  file of the old job, which may have expired);
* an archive: :class:`OrthancPriors`, node SRs already in Orthanc (REST ``/tools/find`` on PatientID,
  Modality SR and the series description the node writes), read back through highdicom.

:func:`compare` gives the change per region (mean thickness, mm and %) and says "not comparable" when the
model name or version differ (another model segments differently: the difference would be the model's). A
prior from another grid or orientation is compared all the same: regions are compared, not voxels.

PatientID is used for the match only. It is never logged, and the Redis key is a SHA-256 of it with the
laterality (:func:`patient_key`), so the node's Redis holds no patient identifier in the clear.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from openmsk.labels import CARTILAGES, LATERALITY
from openmsk.regions import MEASURED, REGIONS, REGIONS_BY_NAME
from worker.dicom.general import knee_laterality

if TYPE_CHECKING:
    import redis
    from pydicom.dataset import Dataset

    from openmsk.config import Settings

__all__ = [
    "SR_SERIES_DESCRIPTION_PREFIX",
    "NodePriors",
    "OrthancPriors",
    "Prior",
    "PriorLookup",
    "PriorSource",
    "compare",
    "find_prior",
    "mean_thicknesses",
    "patient_key",
]

log = logging.getLogger(__name__)

KEY_PREFIX = "openmsk:prior:"
SR_SERIES_DESCRIPTION_PREFIX = "OpenMSK knee measurements"
_SEPARATOR = "\x1f"
# SR codes read back (the node writes them, worker/dicom/sr/content.py).
_THICKNESS = ("59089-3", "LN")
_MEAN = ("373098007", "SCT")
_ALGORITHM_NAME = ("111001", "DCM")
_ALGORITHM_VERSION = ("111003", "DCM")
_LATERALITY_CONCEPT = ("272741003", "SCT")


def patient_key(patient_id: str, laterality: str) -> str:
    """The SHA-256 (hex) of PatientID and laterality: the only form in which the node stores the match."""
    if not patient_id or laterality not in LATERALITY:
        raise ValueError("a prior needs a PatientID and a laterality of R or L")
    return hashlib.sha256(f"{patient_id}{_SEPARATOR}{laterality}".encode()).hexdigest()


@dataclass(frozen=True)
class Prior:
    """One earlier result: its study (date, UID), model, where it came from, and mean thickness per region.

    ``thickness_mean_mm`` maps region and cartilage names to the mean thickness in mm (``None``: not
    measurable then).
    """

    study_date: str  # DA, YYYYMMDD
    study_uid: str
    model_name: str
    model_version: str
    thickness_mean_mm: dict[str, float | None] = field(default_factory=dict)
    job_id: str | None = None
    sr_uid: str | None = None

    def __post_init__(self) -> None:
        if len(self.study_date) != 8 or not self.study_date.isdigit():
            raise ValueError(f"study_date must be a DICOM date YYYYMMDD, got {self.study_date!r}")


class PriorSource(Protocol):
    """Where priors are found: the latest one of a patient's knee dated before *study_date*, else None."""

    def latest_before(
        self, patient_id: str, laterality: str, study_date: str, study_uid: str
    ) -> Prior | None: ...


def _earlier(prior: Prior, study_date: str, study_uid: str) -> bool:
    return prior.study_uid != study_uid and prior.study_date < study_date


def mean_thicknesses(measurements: dict[str, Any]) -> dict[str, float | None]:
    """Region and cartilage name -> mean thickness (mm) of an ``analyse()`` result; ``None`` if not measured."""
    out: dict[str, float | None] = {}
    for table, names in (
        (measurements.get("tissues") or {}, {t.name for t in CARTILAGES}),
        (measurements.get("regions") or {}, set(REGIONS_BY_NAME)),
    ):
        for name, entry in table.items():
            if name not in names:
                continue
            thickness = entry.get("thickness_mm") or {}
            measured = entry.get("status", MEASURED) == MEASURED
            mean = thickness.get("mean") if measured else None
            out[name] = None if mean is None else float(mean)
    return out


class NodePriors:
    """This node's own results, one Redis hash per (patient, knee): field = StudyInstanceUID."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def record(
        self,
        patient_id: str,
        laterality: str,
        prior: Prior,
    ) -> None:
        """Remember *prior* (this job's result) for later visits; a rerun of the same study replaces it."""
        key = KEY_PREFIX + patient_key(patient_id, laterality)
        self.redis.hset(key, prior.study_uid, json.dumps(asdict(prior), sort_keys=True))

    def latest_before(
        self, patient_id: str, laterality: str, study_date: str, study_uid: str
    ) -> Prior | None:
        key = KEY_PREFIX + patient_key(patient_id, laterality)
        found = [Prior(**json.loads(raw)) for raw in self.redis.hvals(key)]
        return _latest(p for p in found if _earlier(p, study_date, study_uid))


def _latest(priors: Iterable[Prior]) -> Prior | None:
    # Latest study date; on the same day, a fixed order (the study UID) so the answer never flips.
    return max(priors, key=lambda p: (p.study_date, p.study_uid), default=None)


class OrthancPriors:
    """Node SRs already in an Orthanc (its REST API): found by PatientID, Modality SR and series description."""

    def __init__(self, url: str, user: str | None = None, password: str | None = None, timeout_s: float = 10):
        self.url = url.rstrip("/")
        self.auth = (user, password) if user is not None and password is not None else None
        self.timeout_s = timeout_s

    def _get(self, path: str) -> Any:
        import requests

        response = requests.get(f"{self.url}{path}", auth=self.auth, timeout=self.timeout_s)
        response.raise_for_status()
        return response

    def latest_before(
        self, patient_id: str, laterality: str, study_date: str, study_uid: str
    ) -> Prior | None:
        import requests

        query = {
            "Level": "Instance",
            "Query": {
                "PatientID": patient_id,
                "Modality": "SR",
                "SeriesDescription": f"{SR_SERIES_DESCRIPTION_PREFIX}*",
                "StudyDate": f"-{study_date}",
            },
            "Expand": True,
        }
        response = requests.post(f"{self.url}/tools/find", json=query, auth=self.auth, timeout=self.timeout_s)
        response.raise_for_status()
        priors = []
        for instance in response.json():
            prior = self._read(str(instance["ID"]))
            if prior is not None and prior[0] == laterality and _earlier(prior[1], study_date, study_uid):
                priors.append(prior[1])
        return _latest(priors)

    def _read(self, instance_id: str) -> tuple[str | None, Prior] | None:
        from io import BytesIO

        import pydicom

        ds = pydicom.dcmread(BytesIO(self._get(f"/instances/{instance_id}/file").content))
        return read_sr(ds)


def _code(item: Any) -> tuple[str, str] | None:
    seq = item.get("ConceptNameCodeSequence")
    return (str(seq[0].CodeValue), str(seq[0].CodingSchemeDesignator)) if seq else None


def _walk(items: Sequence[Any]) -> Iterable[Any]:
    for item in items:
        yield item
        yield from _walk(item.get("ContentSequence", []))


def read_sr(ds: Any) -> tuple[str | None, Prior] | None:
    """(laterality, :class:`Prior`) from a node SR; ``None`` when it is not one (no model, no study date).

    Mean thickness per group whose tracking identifier is a region or cartilage display name (change groups
    are skipped); the model from the groups' Algorithm Name/Version; the laterality from the finding sites.
    """
    names = {r.display_name: r.name for r in REGIONS.values()} | {t.display_name: t.name for t in CARTILAGES}
    model = version = laterality = None
    means: dict[str, float | None] = {}
    for group in _walk(ds.get("ContentSequence", [])):
        if _code(group) != ("125007", "DCM"):  # Measurement Group
            continue
        children = list(group.get("ContentSequence", []))
        identifier = next(
            (str(c.TextValue) for c in children if _code(c) == ("112039", "DCM") and "TextValue" in c), ""
        )
        for item in children:
            # The group's own algorithm is the segmentation model (the measurements' own is the analysis).
            code = _code(item)
            if code == _ALGORITHM_NAME and model is None:
                model = str(item.TextValue)
                version = next(
                    (
                        str(c.TextValue)
                        for c in item.get("ContentSequence", [])
                        if _code(c) == _ALGORITHM_VERSION
                    ),
                    version,
                )
            elif code == _ALGORITHM_VERSION and version is None:
                version = str(item.TextValue)
        for item in _walk(children):
            if _code(item) == _LATERALITY_CONCEPT and "ConceptCodeSequence" in item:
                value = str(item.ConceptCodeSequence[0].CodeValue)
                laterality = next((k for k, v in LATERALITY.items() if v.value == value), laterality)
        name = names.get(identifier)
        if name is None:
            continue
        for item in children:
            derivations = [
                (
                    str(m.ConceptCodeSequence[0].CodeValue),
                    str(m.ConceptCodeSequence[0].CodingSchemeDesignator),
                )
                for m in item.get("ContentSequence", [])
                if "ConceptCodeSequence" in m
            ]
            if _code(item) == _THICKNESS and _MEAN in derivations and "MeasuredValueSequence" in item:
                means[name] = float(item.MeasuredValueSequence[0].NumericValue)
    study_date = str(ds.get("StudyDate", "") or "")
    if model is None or version is None or len(study_date) != 8:
        return None
    prior = Prior(
        study_date=study_date,
        study_uid=str(ds.StudyInstanceUID),
        model_name=model,
        model_version=version,
        thickness_mean_mm=means,
        sr_uid=str(ds.SOPInstanceUID),
    )
    return laterality, prior


def find_prior(
    sources: Sequence[PriorSource], patient_id: str, laterality: str, study_date: str, study_uid: str
) -> Prior | None:
    """The latest prior over *sources* (this node first; an archive may hold older visits).

    A source that fails (Orthanc down) is skipped: the change is a courtesy, never a reason to fail a job.
    """
    found = []
    for source in sources:
        try:
            prior = source.latest_before(patient_id, laterality, study_date, study_uid)
        except Exception as exc:
            # The exception's type only: a message could quote the query, and the query holds the PatientID.
            log.warning(
                "prior lookup in %s failed (%s); going on without it",
                type(source).__name__,
                type(exc).__name__,
            )
            continue
        if prior is not None:
            found.append(prior)
    return _latest(found)


def compare(
    measurements: dict[str, Any], prior: Prior, model_name: str, model_version: str
) -> dict[str, Any]:
    """The ``change`` entry of the measurements: this result against *prior*, region by region.

    ``regions`` (subregions and whole cartilages) give ``thickness_mean_mm`` (this minus prior, mm) and
    ``percent`` (of the prior), with ``current_mm`` and ``prior_mm``; values are ``None`` where either visit
    could not measure the region. ``comparable`` is false, with the reason, when the models differ.
    """
    source = {"job_id": prior.job_id} if prior.job_id else {"sr_uid": prior.sr_uid}
    change: dict[str, Any] = {
        "prior": {
            "study_date": prior.study_date,
            **source,
            "model": f"{prior.model_name} {prior.model_version}",
        },
        "comparable": True,
        "reason": None,
        "regions": {},
    }
    if (prior.model_name, prior.model_version) != (model_name, model_version):
        change["comparable"] = False
        change["reason"] = (
            f"not comparable: the prior was measured with {prior.model_name} {prior.model_version}, "
            f"this visit with {model_name} {model_version}"
        )
        return change
    current = mean_thicknesses(measurements)
    for name in sorted(set(current) & set(prior.thickness_mean_mm)):
        now, then = current[name], prior.thickness_mean_mm[name]
        if now is None or then is None:
            change["regions"][name] = {
                "thickness_mean_mm": None,
                "percent": None,
                "current_mm": now,
                "prior_mm": then,
                "reason": "not measurable at one of the visits",
            }
            continue
        change["regions"][name] = {
            "thickness_mean_mm": now - then,
            "percent": 100.0 * (now - then) / then if then else None,
            "current_mm": now,
            "prior_mm": then,
        }
    return change


@dataclass
class PriorLookup:
    """What a job looks priors up in: this node's (``node``, also where the job's own result is remembered)
    and archives (``archives``, e.g. :class:`OrthancPriors`); ``job_id`` names the job in what is remembered.
    """

    node: NodePriors | None = None
    archives: Sequence[PriorSource] = ()
    job_id: str | None = None

    @classmethod
    def for_job(cls, client: redis.Redis, settings: Settings, job_id: str) -> PriorLookup:
        """This node's priors in *client* (the job store's Redis) and, where one is configured, the Orthanc."""
        archives = (
            [OrthancPriors(settings.orthanc_url, settings.orthanc_user, settings.orthanc_password)]
            if settings.orthanc_url
            else []
        )
        return cls(node=NodePriors(client), archives=archives, job_id=job_id)

    def change_and_remember(
        self, source: Dataset, measurements: dict[str, Any], model_name: str, model_version: str
    ) -> dict[str, Any] | None:
        """The ``change`` entry since the latest prior of this patient's knee (``None`` without one), after
        which this result is remembered as the prior of later visits.

        *source* is an instance of the source series: PatientID, Laterality (or ImageLaterality), StudyDate
        and StudyInstanceUID. Without a PatientID, a laterality or a study date there is nothing to match on.
        """
        patient_id = str(source.get("PatientID", "") or "").strip()
        laterality = knee_laterality(source)
        study_date = str(source.get("StudyDate", "") or "")
        study_uid = str(source.get("StudyInstanceUID", "") or "")
        if not patient_id or laterality is None or len(study_date) != 8 or not study_date.isdigit():
            return None
        sources = [s for s in (self.node, *self.archives) if s is not None]
        prior = find_prior(sources, patient_id, laterality, study_date, study_uid)
        if self.node is not None and study_uid:
            mine = Prior(
                study_date,
                study_uid,
                model_name,
                model_version,
                mean_thicknesses(measurements),
                job_id=self.job_id,
            )
            try:
                self.node.record(patient_id, laterality, mine)
            except Exception as exc:  # Redis down: later visits lose this prior, this job goes on
                log.warning("could not remember the result for later visits (%s)", type(exc).__name__)
        return None if prior is None else compare(measurements, prior, model_name, model_version)
