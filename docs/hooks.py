"""MkDocs hook: pages that are generated from the code when the site is built, so that they cannot drift."""

from __future__ import annotations

from pathlib import Path

_MARKER = "<!-- pipeline-reference -->"
_EXAMPLE = "<!-- example: "


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 (the hook's signature)
    if _MARKER in markdown:
        from fwsvd_deploy.reference import pipeline_reference

        markdown = markdown.replace(_MARKER, pipeline_reference())
    while _EXAMPLE in markdown:  # <!-- example: examples/NAME --> becomes the file, as a code block
        start = markdown.index(_EXAMPLE)
        end = markdown.index("-->", start)
        name = markdown[start + len(_EXAMPLE):end].strip()
        path = Path(config["config_file_path"]).parent / name
        language = {".py": "python", ".yaml": "yaml", ".yml": "yaml"}.get(path.suffix, "")
        block = f"`{name}`:\n\n```{language}\n{path.read_text().rstrip()}\n```"
        markdown = markdown[:start] + block + markdown[end + 3:]
    return markdown
