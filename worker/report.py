"""The knee report as files: ``report.json`` for programs and ``report.csv`` for spreadsheets.

``report.json`` holds everything needed to interpret the numbers without the code: the measurements per
tissue, the methods in words with their parameters, the units and the provenance (model, versions, source
series UIDs, timings) that the caller passes, and the same entries per cartilage subregion (``regions``,
with ``status`` and the ``reason`` a region was not measurable; its values are then null, never 0).
``report.csv`` has one row per tissue or subregion and measure (volume; interface area; thickness — and
T2 where measured — mean, median, std and 95th percentile), long format, so a spreadsheet can pivot it.

The provenance is written as given: callers pass identifiers of the run (UIDs, model, job id), never patient
names or IDs, because these files are shown in the web UI and may be downloaded.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from openmsk.atomic import write_atomic
from openmsk.labels import BY_NAME
from openmsk.regions import MEASUREMENT_KEYS, REGIONS_BY_NAME

__all__ = ["CSV_COLUMNS", "REPORT_SCHEMA", "STATISTIC_KEYS", "THICKNESS_KEYS", "csv_rows", "write_report"]

#: /2 added ``regions`` (cartilage subregions, same entry shape as the tissues), ``region_frame``, the
#: tissues' ``interface_area_mm2`` and, in report.csv, the ``region`` and ``status`` columns and the
#: ``interface_area`` (and any other statistics, e.g. ``t2``) rows; every /1 key is still there.
REPORT_SCHEMA = "openmsk.knee-report/2"
CSV_COLUMNS = ("tissue", "label", "display_name", "measure", "statistic", "value", "unit", "region", "status")
#: The statistics of a statistics dict (``thickness_mm``, ``t2_ms``) that become report.csv rows, in order.
STATISTIC_KEYS = ("mean", "median", "std", "p95")
THICKNESS_KEYS = STATISTIC_KEYS  # the /1 name


def _plain(value: Any) -> Any:
    """*value* with numpy scalars and arrays turned into JSON types, so json.dumps never meets them."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, str | bytes):
        return _plain(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN or infinity
    if isinstance(value, Path):
        return str(value)
    return value


def _measure_and_unit(key: str) -> tuple[str, str]:
    """``volume_mm3`` -> (``volume``, ``mm3``): the measurement keys end in their unit."""
    measure, _, unit = key.rpartition("_")
    return measure, unit


def _entry_rows(
    base: Mapping[str, Any], entry: Mapping[str, Any], *, always_volume: bool
) -> list[dict[str, Any]]:
    """Rows of one measurement entry: scalars (volume, interface area) then every statistics dict."""
    rows: list[dict[str, Any]] = []
    for key in MEASUREMENT_KEYS:
        if key in ("status", "reason") or key not in entry:
            continue
        value = entry[key]
        measure, unit = _measure_and_unit(key)
        if isinstance(value, Mapping):
            rows.extend(
                {**base, "measure": measure, "statistic": stat, "value": value[stat], "unit": unit}
                for stat in STATISTIC_KEYS
                if stat in value
            )
        elif value is not None or (always_volume and key == "volume_mm3"):
            rows.append({**base, "measure": measure, "statistic": "", "value": value, "unit": unit})
    return rows


def csv_rows(measurements: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The report rows of *measurements* (``analyse()`` output): tissues in label order, then subregions.

    Every measurement key of an entry (:data:`openmsk.regions.MEASUREMENT_KEYS`) that is a number gives one
    row, and every one that is a dict of statistics (thickness, T2) one row per statistic, with the measure
    and unit taken from the key (``thickness_mm`` -> ``thickness``, ``mm``). A subregion row names its
    tissue, its ``region`` and its ``status``; a region that is not measurable keeps a volume row with an
    empty value, so the spreadsheet shows it.
    """
    tissues = measurements.get("tissues", {})
    rows: list[dict[str, Any]] = []
    for name in sorted(tissues, key=lambda n: BY_NAME[n].label if n in BY_NAME else 256):
        entry = tissues[name]
        base = {
            "tissue": name,
            "label": entry.get("label", ""),
            "display_name": entry.get("display_name", name),
            "region": "",
            "status": entry.get("status", ""),
        }
        rows.extend(_entry_rows(base, entry, always_volume=True))
    regions = measurements.get("regions") or {}
    for name in sorted(regions, key=lambda n: REGIONS_BY_NAME[n].label if n in REGIONS_BY_NAME else 256):
        entry = regions[name]
        base = {
            "tissue": entry.get("tissue", ""),
            "label": entry.get("label", ""),
            "display_name": entry.get("display_name", name),
            "region": name,
            "status": entry.get("status", ""),
        }
        rows.extend(_entry_rows(base, entry, always_volume=True))
    return rows


def write_report(
    measurements: Mapping[str, Any], provenance: Mapping[str, Any], out_dir: str | Path
) -> list[Path]:
    """Write ``report.json`` and ``report.csv`` into *out_dir* (created if needed); return their paths.

    Parameters
    ----------
    measurements: Mapping
        ``worker.analysis.analyse()`` output.
    provenance: Mapping
        How the numbers came about: model name and version, node version, source series UIDs, job id, timings.
        Must be JSON-serialisable (numpy scalars are converted) and free of patient data.
    out_dir: str | pathlib.Path
        Folder for the two files; each is written atomically.

    Raises
    ------
    ValueError
        When *measurements* has no ``tissues``.
    """
    if "tissues" not in measurements:
        raise ValueError("measurements must be analyse() output (a 'tissues' key)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    document = {
        "schema": REPORT_SCHEMA,
        "units": _plain(measurements.get("units", {})),
        "method": _plain(measurements.get("method", {})),
        "spacing_mm": _plain(measurements.get("spacing_mm")),
        "voxel_volume_mm3": _plain(measurements.get("voxel_volume_mm3")),
        "provenance": _plain(provenance),
        "tissues": _plain(measurements["tissues"]),
    }
    for key in ("regions", "region_frame", "change"):  # change: since the prior visit (worker/prior.py)
        if key in measurements:
            document[key] = _plain(measurements[key])
    json_text = json.dumps(document, indent=2, ensure_ascii=False, allow_nan=False) + "\n"

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in csv_rows(measurements):
        value = row["value"]
        # Fixed decimals: thousandths of a mm3 and of a mm are below anything a segmentation resolves.
        row["value"] = "" if value is None else f"{float(value):.3f}"
        writer.writerow(row)

    return [
        write_atomic(out / "report.json", json_text),
        write_atomic(out / "report.csv", buffer.getvalue()),
    ]
