"""``openmsk orthanc studies|series|jobs``: what Orthanc holds, with the node's results next to each source series.

A result is recognised by what the node writes into every SEG: the referenced source series and the algorithm
identification (model name and version). Patient names and IDs are not printed. Studies and jobs carry a link
that opens the study in the node's viewer (:mod:`openmsk.viewer_links`).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from typing import Any

from orthanc_api_client import OrthancApiClient

from openmsk.config import Settings
from openmsk.viewer_links import study_link  # the viewer's own origin: OPENMSK_VIEWER_URL or its port


@dataclass
class SeriesRow:
    study_uid: str
    series_uid: str
    modality: str
    description: str
    instances: int
    results: list[str] = field(default_factory=list)  # "model version" of the runs whose SEGs reference it


def client_for(settings: Settings) -> OrthancApiClient:
    if settings.orthanc_url is None:
        raise RuntimeError("OPENMSK_ORTHANC_URL is not set: which Orthanc should be asked?")
    return OrthancApiClient(settings.orthanc_url, user=settings.orthanc_user, pwd=settings.orthanc_password)


def _seg_source_and_model(client: OrthancApiClient, instance_id: str) -> tuple[str | None, str]:
    tags: dict[str, Any] = client.get_json(f"instances/{instance_id}/tags?simplify")
    referenced = tags.get("ReferencedSeriesSequence") or [{}]
    source = referenced[0].get("SeriesInstanceUID")
    segments = tags.get("SegmentSequence") or [{}]
    algorithm = (segments[0].get("SegmentationAlgorithmIdentificationSequence") or [{}])[0]
    model = " ".join(v for v in (algorithm.get("AlgorithmName"), algorithm.get("AlgorithmVersion")) if v)
    return source, model or segments[0].get("SegmentAlgorithmName", "unknown model")


def list_series(client: OrthancApiClient) -> list[SeriesRow]:
    """Every series in Orthanc; each source series carries the models whose SEG references it."""
    rows: dict[str, SeriesRow] = {}
    results: dict[str, list[str]] = {}
    for study_id in client.get_json("studies"):
        study = client.get_json(f"studies/{study_id}")
        study_uid = study["MainDicomTags"].get("StudyInstanceUID", "")
        for series_id in study.get("Series", []):
            series = client.get_json(f"series/{series_id}")
            tags = series["MainDicomTags"]
            modality = tags.get("Modality", "")
            if modality == "SEG" and series.get("Instances"):
                source, model = _seg_source_and_model(client, series["Instances"][0])
                if source:
                    results.setdefault(source, []).append(model)
            rows[tags.get("SeriesInstanceUID", series_id)] = SeriesRow(
                study_uid=study_uid,
                series_uid=tags.get("SeriesInstanceUID", ""),
                modality=modality,
                description=tags.get("SeriesDescription", ""),
                instances=len(series.get("Instances", [])),
            )
    for source, models in results.items():
        if source in rows:
            rows[source].results = sorted(set(models))  # one run writes two SEGs: tissues, subregions
    return sorted(rows.values(), key=lambda r: (r.study_uid, r.modality, r.series_uid))


def list_studies(client: OrthancApiClient) -> list[dict[str, Any]]:
    series = list_series(client)
    studies: dict[str, dict[str, Any]] = {}
    for row in series:
        study = studies.setdefault(
            row.study_uid, {"study_uid": row.study_uid, "series": 0, "segmented_series": 0}
        )
        study["series"] += 1
        study["segmented_series"] += bool(row.results)
    return list(studies.values())


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("orthanc", help="list what Orthanc holds, with the node's results")
    parser.add_argument("what", choices=("studies", "series", "jobs"))
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from openmsk.config import load_settings

    settings = load_settings()
    client = client_for(settings)
    if args.what == "studies":
        rows: list[dict[str, Any]] = [
            {**study, "viewer": study_link(settings, study["study_uid"])} for study in list_studies(client)
        ]
    elif args.what == "series":
        rows = [row.__dict__ for row in list_series(client)]
    else:
        rows = _jobs(settings, client)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        print("  ".join(f"{k}={', '.join(v) if isinstance(v, list) else v}" for k, v in row.items()))
    return 0


def _jobs(settings: Settings, client: OrthancApiClient) -> list[dict[str, Any]]:
    """The node's recent jobs, each with whether its SEG is in Orthanc."""
    from openmsk.jobs import JobStore

    if settings.redis_url is None:
        raise RuntimeError("OPENMSK_REDIS_URL is not set: the job list lives in Redis")
    by_source = {row.series_uid: row.results for row in list_series(client)}
    return [
        {
            "job": job.id,
            "state": job.state.value,
            "model": job.model,
            "series_uid": job.series_uid,
            "results_in_orthanc": by_source.get(job.series_uid, []),
            "viewer": study_link(settings, job.study_uid) if job.study_uid else "",
        }
        for job in JobStore.from_url(settings.redis_url).list(limit=100)
    ]
