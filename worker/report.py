"""The knee report as files: ``report.json`` for programs and ``report.csv`` for spreadsheets.

``report.json`` holds everything needed to interpret the numbers without the code: the measurements per
tissue, the methods in words with their parameters, the units and the provenance (model, versions, source
series UIDs, timings) that the caller passes. ``report.csv`` has one row per tissue and measure (volume;
thickness mean, median, std and 95th percentile for cartilage), long format, so a spreadsheet can pivot it.

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

__all__ = ["CSV_COLUMNS", "REPORT_SCHEMA", "THICKNESS_KEYS", "csv_rows", "write_report"]

REPORT_SCHEMA = "openmsk.knee-report/1"
CSV_COLUMNS = ("tissue", "label", "display_name", "measure", "statistic", "value", "unit")
THICKNESS_KEYS = ("mean", "median", "std", "p95")


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


def csv_rows(measurements: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The report rows of *measurements* (``analyse()`` output), tissues in label order."""
    units = measurements.get("units", {"volume": "mm3", "thickness": "mm"})
    tissues = measurements.get("tissues", {})
    rows: list[dict[str, Any]] = []
    for name in sorted(tissues, key=lambda n: BY_NAME[n].label if n in BY_NAME else 256):
        entry = tissues[name]
        base = {
            "tissue": name,
            "label": entry.get("label", ""),
            "display_name": entry.get("display_name", name),
        }
        rows.append(
            {
                **base,
                "measure": "volume",
                "statistic": "",
                "value": entry["volume_mm3"],
                "unit": units["volume"],
            }
        )
        thickness = entry.get("thickness_mm")
        if thickness:
            for key in THICKNESS_KEYS:
                rows.append(
                    {
                        **base,
                        "measure": "thickness",
                        "statistic": key,
                        "value": thickness[key],
                        "unit": units["thickness"],
                    }
                )
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
