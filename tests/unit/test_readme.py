"""The README and docs/: the settings reference is generated, every link resolves, and every
``MARVIN_*`` variable they name exists."""

import re
from pathlib import Path

import pytest

from marvin_faust.settings import ENV_PREFIX, Settings, settings_markdown
from tests.fixtures import REPO as ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Read by the local broker (marvin_faust/broker), not by Settings.
BROKER_VARIABLES = {"MARVIN_KAFKA_HOME", "MARVIN_KAFKA_JARS", "MARVIN_JAVA"}

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text lower-cased, punctuation dropped,
    spaces turned into hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link renders as its text
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    for line in prose_lines(path.read_text()):
        if match := HEADING.match(line):
            base = slug(match.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[str]:
    return [
        target
        for line in prose_lines(path.read_text())
        for target in LINK.findall(INLINE_CODE.sub("", line))
    ]


def test_docs_settings_md_is_generated_from_the_settings_model():
    # Regenerate: python -c "from marvin_faust.settings import settings_markdown;
    # print(settings_markdown())" > docs/settings.md   (print adds the final newline)
    assert (ROOT / "docs" / "settings.md").read_text() == settings_markdown() + "\n"


def test_the_settings_reference_has_a_row_per_setting():
    text = settings_markdown()
    for name, field in Settings.model_fields.items():
        assert f"| `{ENV_PREFIX}{name.upper()}` |" in text
        assert field.description, f"{name} has no description"


def test_the_readme_links_to_the_settings_reference():
    assert "(docs/settings.md)" in (ROOT / "README.md").read_text()


def test_slugs_are_githubs():
    assert slug("Client families and partitioners") == "client-families-and-partitioners"
    assert slug("`make run`: the worker, step by step") == "make-run-the-worker-step-by-step"
    assert slug("Kafka security (SASL/TLS)") == "kafka-security-sasltls"
    assert slug("MARVIN_PROMPT_FORMAT") == "marvin_prompt_format"


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(path: Path):
    broken = []
    for target in links(path):
        if SCHEME.match(target):
            continue  # http(s), mailto: not checked here
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists() or not linked.is_relative_to(ROOT):
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading with that anchor")
    assert broken == []


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_marvin_variable_named_exists(path: Path):
    settings = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    named = set(re.findall(r"\bMARVIN_[A-Z0-9_]*[A-Z0-9]\b", path.read_text()))
    assert named - settings - BROKER_VARIABLES == set()


def test_there_are_docs_to_check():
    names = {p.name for p in DOCS}
    assert {"README.md", "architecture.md", "settings.md", "reliability.md"} <= names
    assert {"performance.md", "deployment.md", "security.md"} <= names
