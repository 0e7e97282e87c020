"""Routing rules as typed models, the ``archive`` action, typed destination configurations, and the start-up
check of the SCP, the worker and ``openmsk route test`` that every destination the rules name exists."""

from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from destinations import (
    DestinationConfigError,
    check_routing,
    configured_destination_names,
    default_archive,
    load_destinations,
)
from destinations.dicom import DicomDestination
from destinations.orthanc import OrthancDestination
from openmsk.config import Settings, load_settings
from scp.cli import register
from scp.routing import Decision, RoutingError, RoutingRules, Rule, SeriesInfo, format_decision
from tests.mr_series import write_mr_series

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "scp" / "routing.toml"

KNEE_RULE = 'name = "knee"\nmodality = "MR"\nmodel = "default"\n'


def series(**changes: object) -> SeriesInfo:
    values: dict[str, object] = {
        "study_uid": "1.2",
        "series_uid": "1.2.3",
        "modality": "MR",
        "body_part": "KNEE",
        "mr_acquisition_type": "3D",
        "image_type": ("ORIGINAL", "PRIMARY"),
        "instances": 40,
        "calling_ae": "SCANNER1",
    }
    values.update(changes)
    return SeriesInfo(**values)  # type: ignore[arg-type]


def rules_of(*items: dict) -> RoutingRules:
    return RoutingRules.from_dict({"rules": list(items)}, "nnunet_fullres", known_models=["nnunet_fullres"])


def node_settings(tmp_path: Path, **overrides: object) -> Settings:
    return load_settings(data_dir=tmp_path / "data", **overrides)


# ------------------------------------------------------------------------------------------------ archive


def test_archive_defaults_for_model_ignore_and_unmatched_series() -> None:
    rules = rules_of(
        {"name": "loc", "image_type_includes": "LOCALIZER", "ignore": True},
        {"name": "knee", "body_part": "KNEE", "model": "default"},
    )
    assert all(rule.archive is None for rule in rules.rules)
    knee, loc, other = (
        rules.route(series()),
        rules.route(series(image_type=("ORIGINAL", "LOCALIZER"))),
        rules.route(series(body_part="HIP")),
    )
    assert knee.rule is not None and knee.rule.name == "knee"
    assert loc.ignore and loc.rule is not None and loc.rule.name == "loc"
    assert other.rule is None and other.ignore
    for decision in (knee, loc, other):
        assert rules.archive_for(decision, ["orthanc"]) == ["orthanc"]
        assert rules.archive_for(decision, []) == []


def test_archive_explicit_and_off_on_model_and_ignore_rules() -> None:
    rules = rules_of(
        {"name": "off", "calling_ae": "QUIET", "model": "default", "archive": []},
        {"name": "sr", "modality": ["SR", "SEG"], "ignore": True, "archive": "pacs"},
        {"name": "knee", "model": "default", "destinations": "orthanc", "archive": ["orthanc", " pacs "]},
    )
    quiet, sr, knee = (
        rules.route(series(calling_ae="QUIET")),
        rules.route(series(modality="sr")),
        rules.route(series()),
    )
    assert rules.archive_for(quiet, ["orthanc"]) == []
    assert not quiet.ignore and quiet.models == ("nnunet_fullres",)
    assert rules.archive_for(sr, ["orthanc"]) == ["pacs"] and sr.ignore and sr.models == ()
    assert rules.archive_for(knee, []) == ["orthanc", "pacs"]
    assert rules.named_destinations() == {"sr": ["pacs"], "knee": ["orthanc", "pacs"]}


def test_archive_is_shown_in_the_action_and_the_route_test_report() -> None:
    ignore = Rule(name="loc", ignore=True)
    assert ignore.describe_action() == "ignore"
    assert ignore.describe_action(["orthanc"]) == "ignore; archive → orthanc"
    assert ignore.describe_action([]) == "ignore; no archive"
    explicit = Rule(name="k", models=("a",), destinations=("orthanc",), archive=("pacs",))
    assert explicit.describe_action() == "models a → orthanc (priority default); archive → pacs"
    assert Rule(name="k", models=("a",), archive=()).describe_action(["orthanc"]).endswith("; no archive")
    unmatched = format_decision(series(), Decision(None, []), ["orthanc"])
    assert "=> no rule matched: ignored; archive → orthanc" in unmatched


def test_shipped_rules_keep_the_default_archive() -> None:
    rules = RoutingRules.load(SHIPPED, "nnunet_fullres")
    assert all(rule.archive is None for rule in rules.rules)
    sr_back_from_orthanc = rules.route(series(modality="SR", mr_acquisition_type="", calling_ae="ORTHANC"))
    assert sr_back_from_orthanc.ignore
    assert rules.archive_for(sr_back_from_orthanc, ["orthanc"]) == [
        "orthanc"
    ]  # the forwarder skips the origin
    assert "archive" in SHIPPED.read_text()


def test_default_archive_is_orthanc_when_configured(tmp_path: Path) -> None:
    assert default_archive(node_settings(tmp_path)) == []
    assert default_archive(node_settings(tmp_path, orthanc_url="http://127.0.0.1:8042")) == ["orthanc"]


# ------------------------------------------------------------------------------------------- typed rules


def test_rules_are_typed_and_normalised() -> None:
    rule = rules_of(
        {
            "name": " knee ",
            "modality": "mr",
            "body_part": ["knee", "Leg"],
            "calling_ae": "Scanner1",
            "series_description": "(?i)pd",
            "image_type_excludes": "localizer",
            "models": ["default"],
            "priority": "urgent",
            "min_instances": 0,
        }
    ).rules[0]
    assert rule.name == "knee"
    assert (rule.modality, rule.body_part, rule.calling_ae) == (("MR",), ("KNEE", "LEG"), ("Scanner1",))
    assert rule.image_type_excludes == ("LOCALIZER",) and rule.models == ("nnunet_fullres",)
    assert isinstance(rule.series_description, re.Pattern) and rule.priority == "urgent"
    with pytest.raises(Exception, match="frozen"):
        rule.name = "other"  # type: ignore[misc]
    # no destinations: left out or an empty list, alike (as archive = [])
    assert rules_of({"name": "n", "model": "default", "destinations": []}).rules[0].destinations == ()
    unnamed = rules_of({"ignore": True}, {"ignore": True})
    assert [r.name for r in unnamed.rules] == ["rule-1", "rule-2"]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ('priority = "now"', "'priority' must be one of ['urgent', 'default']"),
        ("min_instances = -1", "'min_instances' must be a whole number >= 0"),
        ('max_instances = "many"', "'max_instances' must be a whole number >= 0"),
        ("min_instances = true", "'min_instances' must be a whole number >= 0"),
        ("body_part = []", "'body_part' must be a non-empty string or list of strings"),
        ("archive = [1]", "'archive' must be a string or list of strings"),
        ('destinations = [""]', "'destinations' must be a string or list of strings"),
        ('series_description = "("', "'series_description' is not a valid regular expression"),
        ("series_description = 3", "'series_description' must be a regular expression string"),
        ('bodypart = "KNEE"', "unknown key(s) ['bodypart']"),
        ('models = ["default"]', "give 'model' or 'models', not both"),
        ("ignore = true", "needs either models"),
        ('ignore = "yes"', "'ignore' must be true or false"),
    ],
)
def test_a_bad_rule_is_one_line_naming_the_file_the_rule_and_the_key(
    tmp_path: Path, entry: str, message: str
) -> None:
    path = tmp_path / "routing.toml"
    path.write_text(f"[[rules]]\nname = 'first'\nignore = true\n\n[[rules]]\n{KNEE_RULE}{entry}\n")
    with pytest.raises(RoutingError) as info:
        RoutingRules.load(path, "nnunet_fullres", known_models=["nnunet_fullres"])
    text = str(info.value)
    assert "\n" not in text and "validation error" not in text.lower()
    assert text.startswith(f"{path}: rule 2 ('knee'): {message}")


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        (
            {"name": "x", "model": "nope"},
            "rule 1 ('x'): unknown model(s) ['nope']; installed: ['nnunet_fullres']",
        ),
        ({"name": "x", "ignore": True, "destinations": "orthanc"}, "rule 1 ('x'): an ignore rule has no"),
        ({"name": "", "ignore": True}, "rule 1 (''): 'name' must be a non-empty string"),
        ({"name": 3, "ignore": True}, "rule 1: 'name' must be a non-empty string"),
    ],
)
def test_more_bad_rules(rule: dict, message: str) -> None:
    with pytest.raises(RoutingError, match=re.escape(message)):
        rules_of(rule)


def test_a_name_used_twice_is_refused() -> None:
    with pytest.raises(RoutingError, match=r"rule 2 \('a'\): the name 'a' is used twice"):
        rules_of({"name": "a", "ignore": True}, {"name": "a", "ignore": True})


# ------------------------------------------------------------------------------------ destination configs


def with_destinations(tmp_path: Path, text: str, **overrides: object) -> Settings:
    path = tmp_path / "destinations.toml"
    path.write_text(text)
    return node_settings(tmp_path, destinations=path, **overrides)


PACS = '[destinations.pacs]\ntype = "dicom"\nae_title = "PACS"\nhost = "10.0.0.5"\n'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (PACS + "port = 0\n", "destination 'pacs': 'port' must be a TCP port (1-65535)"),
        (PACS + 'port = "104"\n', "destination 'pacs': 'port' must be a TCP port (1-65535)"),
        (PACS, "destination 'pacs': 'port' is required"),
        (
            PACS + "port = 104\ncalling_ae_title = 'A\\\\B'\n",
            "destination 'pacs': 'calling_ae_title' must be a DICOM",
        ),
        (PACS.replace('"PACS"', '"WAY-TOO-LONG-AE-TITLE"') + "port = 104\n", "'ae_title' must be a DICOM AE"),
        (PACS + "port = 104\ncolour = 'red'\n", "destination 'pacs': unknown key(s) ['colour']"),
        (
            '[destinations.pacs]\ntype = "dicomweb"\nurl = "ftp://x"\n',
            "destination 'pacs': 'url' must be an http",
        ),
        (
            '[destinations.pacs]\ntype = "orthanc"\nurl = "http://o"\ndicom_port = 70000\n',
            "'dicom_port' must be",
        ),
        ('[destinations.pacs]\ntype = "ftp"\n', "destination 'pacs': type must be one of"),
        ("[destinations]\npacs = 3\n", "destination 'pacs' must be a table"),
        ("[destination.pacs]\n", "unknown top-level key(s) ['destination']"),
        ("[destinations.pacs\n", "not valid TOML"),
    ],
)
def test_a_bad_destination_is_one_line_naming_it_and_the_key(tmp_path: Path, text: str, message: str) -> None:
    configured = with_destinations(tmp_path, text)
    for load in (configured_destination_names, load_destinations):
        with pytest.raises(DestinationConfigError) as info:
            load(configured)
        assert isinstance(info.value, ValueError)
        line = str(info.value)
        assert "\n" not in line and line.startswith(f"{configured.destinations}: ") and message in line


def test_destination_names_come_without_connecting_and_types_build(tmp_path: Path) -> None:
    # Nothing listens on these addresses: the names and the configurations must not need them.
    configured = with_destinations(
        tmp_path,
        PACS + "port = 104\n\n[destinations.web]\ntype = 'dicomweb'\nurl = 'http://192.0.2.1:9/dicom-web'\n",
        orthanc_url="http://192.0.2.1:9",
        scp_ae_title="NODE1",
        orthanc_aet="ARCHIVE",
        orthanc_dicom_port=4343,
    )
    assert configured_destination_names(configured) == {"orthanc", "pacs", "web"}
    assert configured_destination_names(node_settings(tmp_path)) == set()
    found = load_destinations(configured)
    pacs, orthanc = found["pacs"], found["orthanc"]
    assert isinstance(pacs, DicomDestination) and pacs.calling_ae_title == "NODE1" and pacs.port == 104
    assert isinstance(orthanc, OrthancDestination)
    assert (orthanc.ae_title, orthanc.dicom_port, orthanc.calling_ae_title) == ("ARCHIVE", 4343, "NODE1")
    assert orthanc.dicom_host == "192.0.2.1"


# --------------------------------------------------------------------------------------- start-up checks


def rules_file(tmp_path: Path, archive: str = '["pacs"]') -> Path:
    path = tmp_path / "rules.toml"
    path.write_text(f'[[rules]]\nname = "knee"\nmodel = "default"\narchive = {archive}\n')
    return path


def test_check_routing_names_the_rule_and_the_missing_destination(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = rules_file(tmp_path)
    rules = RoutingRules.load(path, "nnunet_fullres")
    with_orthanc = node_settings(tmp_path, orthanc_url="http://127.0.0.1:8042")
    assert check_routing(rules, with_orthanc) == [
        f"routing rules {path}: rule 'knee' names destination 'pacs', which is not configured "
        "(configured: orthanc)"
    ]
    assert check_routing(rules, with_destinations(tmp_path, PACS + "port = 104\n")) == []
    # The shipped rules name `orthanc`; a node without Orthanc still runs (results stay on it): a warning only.
    shipped = RoutingRules.load(SHIPPED, "nnunet_fullres")
    with caplog.at_level(logging.WARNING, logger="openmsk.destinations"):
        assert check_routing(shipped, node_settings(tmp_path)) == []
    assert "OPENMSK_ORTHANC_URL is unset" in caplog.text


def run_openmsk(tmp_path: Path, *argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OPENMSK_")}
    clean.update({"OPENMSK_DATA_DIR": str(tmp_path / "data"), "OPENMSK_REDIS_URL": "redis://127.0.0.1:9/0"})
    clean.update(env)
    return subprocess.run(
        [sys.executable, "-m", "openmsk", *argv],
        env=clean,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_scp_refuses_to_start_when_a_rule_names_a_missing_destination(tmp_path: Path) -> None:
    path = rules_file(tmp_path)
    result = run_openmsk(
        tmp_path, "scp", OPENMSK_ROUTING_RULES=str(path), OPENMSK_ORTHANC_URL="http://127.0.0.1:9"
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"openmsk: configuration error: routing rules {path}: rule 'knee' names destination 'pacs', "
        "which is not configured (configured: orthanc)"
    )
    assert "ready on" not in result.stdout


def test_worker_refuses_to_start_with_a_bad_destinations_file_or_a_missing_destination(
    tmp_path: Path,
) -> None:
    bad = tmp_path / "destinations.toml"
    bad.write_text(PACS + "port = 0\n")
    result = run_openmsk(tmp_path, "worker", OPENMSK_DESTINATIONS=str(bad))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"openmsk: configuration error: OPENMSK_DESTINATIONS: {bad}: destination 'pacs': "
        "'port' must be a TCP port (1-65535)"
    ]
    path = rules_file(tmp_path)
    result = run_openmsk(tmp_path, "worker", OPENMSK_ROUTING_RULES=str(path))
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"openmsk: configuration error: routing rules {path}: rule 'knee' names destination 'pacs', "
        "which is not configured (configured: none)"
    )


def test_route_test_shows_the_destination_check_and_the_archive(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    write_mr_series(tmp_path / "dicom", 3, 16, 16)
    path = rules_file(tmp_path, archive='["orthanc", "pacs"]')
    monkeypatch.setenv("OPENMSK_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("OPENMSK_ORTHANC_URL", "http://127.0.0.1:9")
    parser = argparse.ArgumentParser(prog="openmsk")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["route", "test", str(tmp_path / "dicom"), "--rules", str(path)])
    assert args.func(args) == 2
    captured = capsys.readouterr()
    assert (
        f"openmsk route test: the SCP would not start: routing rules {path}: rule 'knee' names destination "
        "'pacs', which is not configured (configured: orthanc)"
    ) in captured.err
    assert "=> rule 'knee': models" in captured.out and "; archive → orthanc, pacs" in captured.out
