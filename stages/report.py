"""Stage report: the Markdown summary of the evaluation, for a pull request.

    python -m stages.report MODELS_JSON PCA_JSON FIGURES_DIR REPORT_MD

Reads the two metrics files and lists FIGURES_DIR; no params. Links to the figures are
relative to the report's folder, so they work in the repository browser.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from aebench import files, report


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing; run `dvc repro` for the stage that writes it") \
            from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from None


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    models_json, pca_json, figures_dir, out_path = map(Path, argv)
    text = report.summary(read_json(models_json), read_json(pca_json),
                          report.figure_links(figures_dir, out_path))
    files.write_text(out_path, text)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
