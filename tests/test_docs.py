"""The documentation: the site builds with no warnings, the README stays short and its links resolve, and the
pipeline reference covers every key."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from fwsvd_deploy.config import PIPELINE_TASKS, PipelineConfig
from fwsvd_deploy.reference import attribute_docs, pipeline_reference, undocumented_keys

ROOT = Path(__file__).resolve().parents[1]


def test_the_site_builds_with_warnings_as_errors(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                             str(ROOT / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "WARNING" not in result.stderr, result.stderr[-3000:]
    reference = (tmp_path / "site" / "pipeline-yaml" / "index.html").read_text()
    assert "<!-- pipeline-reference -->" not in reference and "max_perplexity_ratio" in reference
    examples = (tmp_path / "site" / "examples" / "index.html").read_text()
    assert "<!-- example:" not in examples  # the files themselves, highlighted
    assert "summarise" in examples and "upload-artifact" in examples and "encoder_csv.py" in examples
    api = (tmp_path / "site" / "python" / "index.html").read_text()
    assert "run_pipeline" in api and "Checks everything it can first" in api  # from the docstring


def test_the_readme_is_short_and_its_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    assert links and all((ROOT / link).exists() for link in links if "://" not in link), links
    assert "bash scripts/quickstart.sh" in readme and "bash scripts/test.sh" in readme


def test_the_pipeline_reference_covers_every_key_of_both_tasks():
    assert undocumented_keys() == []
    reference = pipeline_reference()
    for task in PIPELINE_TASKS:
        for section, keys in PipelineConfig.for_task(task).to_dict().items():
            if isinstance(keys, dict):
                assert f"## `{section}`" in reference
                assert all(f"| `{key}` |" in reference for key in keys), section


def test_attribute_docs_read_grouped_and_continued_lines():
    class Example:
        """One line.

        Attributes:
            low / high: the range,
                continued here.
            steps: how many.

        Raises:
            ValueError: never read as a field.
        """

    assert attribute_docs(Example) == {"low": "the range, continued here.", "high": "the range, continued here.",
                                       "steps": "how many."}
