"""The documentation stays true as the code changes.

docs/configuration.md must be exactly what scripts/gen_config_docs.py renders from
Settings; the README, the lake contract and the conformance statement must name
the commands, targets, paths, attributes and codes the code actually has.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest
import typer

from medlake.cli.main import app as cli_app
from medlake.config import Settings
from medlake.dicom.attributes import ATTRIBUTES
from medlake.errors import MedlakeError
from medlake.index.qido import DEFAULT_LIMIT, MAX_LIMIT
from medlake.storage.layout import HEALTH_CHECK_FOLDER, SERIES_METADATA_NAME, LakeLayout

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
CONFORMANCE = DOCS / "conformance-statement.md"


def _load_generator() -> ModuleType:
    path = REPO / "scripts" / "gen_config_docs.py"
    spec = importlib.util.spec_from_file_location("gen_config_docs", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen_config_docs = _load_generator()


def _all_subclasses(cls: type[MedlakeError]) -> list[type[MedlakeError]]:
    out: list[type[MedlakeError]] = []
    for sub in cls.__subclasses__():
        out += [sub, *_all_subclasses(sub)]
    return out


# --- docs/configuration.md -------------------------------------------------------------


def test_configuration_page_is_up_to_date() -> None:
    current = (DOCS / "configuration.md").read_text(encoding="utf-8")
    assert current == gen_config_docs.render(), (
        "docs/configuration.md is stale: run .venv/bin/python scripts/gen_config_docs.py"
    )


def test_every_setting_has_a_description() -> None:
    missing = [name for name, f in Settings.model_fields.items() if not f.description]
    assert not missing, f"Settings fields without a description: {missing}"


def test_notes_name_real_settings() -> None:
    names = set(gen_config_docs.NOT_USED_YET) | set(gen_config_docs.NOTES)
    assert names <= set(Settings.model_fields)


@pytest.mark.parametrize("name", sorted(gen_config_docs.NOT_USED_YET))
def test_settings_documented_as_unused_are_unused(name: str) -> None:
    uses = [
        f"{path.relative_to(REPO)}:{number}"
        for path in sorted((REPO / "src" / "medlake").rglob("*.py"))
        if path.name != "config.py"
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if re.search(rf"\.{name}\b", line)
    ]
    assert not uses, (
        f"setting {name} is now used ({', '.join(uses)}): remove it from NOT_USED_YET in "
        "scripts/gen_config_docs.py, regenerate docs/configuration.md and update the README"
    )


# --- README -------------------------------------------------------------------------------


def test_readme_starts_with_the_two_setup_commands() -> None:
    first_block = (
        "```sh\n"
        "make demo     # installs into .venv, generates/loads sample studies, serves them\n"
        "make test     # installs dev deps, runs the whole test suite\n"
        "```\n"
    )
    assert README.read_text(encoding="utf-8").startswith(first_block)


def test_make_targets_named_in_docs_exist() -> None:
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([a-z][a-z-]*):", makefile, re.MULTILINE))
    for page in [README, *DOCS.glob("*.md")]:
        named = set(re.findall(r"`make ([a-z][a-z-]*)", page.read_text(encoding="utf-8")))
        named |= set(re.findall(r"^make ([a-z][a-z-]*)", page.read_text(encoding="utf-8"), re.M))
        assert named <= targets, f"{page.name} names make targets {named - targets}"


def _commands(group: typer.Typer) -> set[str]:
    root = typer.main.get_command(group)
    context = typer.Context(root)
    names = set()
    for name in root.list_commands(context):  # type: ignore[attr-defined]
        command = root.get_command(context, name)  # type: ignore[attr-defined]
        names.add(name)
        names |= {f"{name} {sub}" for sub in getattr(command, "commands", {})}
    return names


def test_cli_commands_in_readme_exist() -> None:
    text = README.read_text(encoding="utf-8")
    block = text.split("## Command line", 1)[1].split("```", 2)[1]
    named = set()
    for line in block.splitlines():
        words = line.split()
        if len(words) < 2 or words[0] != "medlake" or words[1].startswith("-"):
            continue
        named.add(words[1] if words[1] != "lifecycle" else f"lifecycle {words[2]}")
    available = _commands(cli_app)
    assert named, "the README's command block lists no commands"
    assert named <= available, f"README names commands that do not exist: {named - available}"
    top_level = {c for c in available if " " not in c}
    assert top_level <= {n.split()[0] for n in named}, (
        f"commands missing from the README: {top_level - {n.split()[0] for n in named}}"
    )


@pytest.mark.parametrize("page", [README, *sorted(DOCS.glob("*.md"))], ids=lambda p: p.name)
def test_relative_links_resolve(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (page.parent / target.split("#", 1)[0]).resolve()
        assert path.exists(), f"{page.name} links to missing {target}"


# --- the lake contract --------------------------------------------------------------------


def test_documented_lake_paths_are_the_layout() -> None:
    layout = LakeLayout()
    assert layout.instance_key("default", "1.2", "1.3", "1.4") == (
        "medlake/default/dicom/default/default/1.2/1.3/1.4.dcm"
    )
    assert layout.series_metadata_key("p", "1.2", "1.3") == (
        f"medlake/default/dicom/default/p/1.2/1.3/{SERIES_METADATA_NAME}"
    )
    assert layout.health_check_prefix == f"medlake/default/dicom/default/{HEALTH_CHECK_FOLDER}"
    template = (
        "medlake/{workspace}/dicom/{service}/{partition}/"
        "{StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}.dcm"
    )
    for page in (README, DOCS / "lake-contract.md"):
        text = page.read_text(encoding="utf-8")
        assert template in text, page.name
        assert f"{{SeriesInstanceUID}}/{SERIES_METADATA_NAME}" in text, page.name
        assert f"dicom/{{service}}/{HEALTH_CHECK_FOLDER}/" in text, page.name


# --- the conformance statement -----------------------------------------------------------


def test_conformance_statement_lists_every_searchable_attribute() -> None:
    text = CONFORMANCE.read_text(encoding="utf-8")
    for attr in ATTRIBUTES:
        tag = f"({attr.tag >> 16:04X},{attr.tag & 0xFFFF:04X})"
        row = f"| {attr.level.value} | {attr.keyword} | {tag} | {attr.vr} |"
        assert row in text, f"conformance statement lacks the QIDO row {row}"


def test_conformance_statement_lists_every_failure_reason() -> None:
    text = CONFORMANCE.read_text(encoding="utf-8")
    classes: list[type[MedlakeError]] = [MedlakeError, *_all_subclasses(MedlakeError)]
    for cls in classes:
        code = f"0x{cls.dicom_reason:04X}"
        assert f"| {code} ({cls.dicom_reason}) |" in text, f"{cls.__name__} reason {code}"


def test_conformance_statement_gives_the_paging_limits() -> None:
    text = CONFORMANCE.read_text(encoding="utf-8")
    assert f"`limit` (default **{DEFAULT_LIMIT}**, values above **{MAX_LIMIT}**" in text
