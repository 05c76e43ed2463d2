"""The research note: report.md (with plots) from a finished workdir."""

import os

from research import files


def write_report(workdir: str) -> str:
  """Writes DIR/report.md; returns its path."""
  results = files.read_json(os.path.join(workdir, "results.json"))
  lines = ["# Collapse study", "", f"Seeds per scenario: {results['seeds']}", ""]
  path = os.path.join(workdir, "report.md")
  files.write_text(path, "\n".join(lines))
  return path
