"""Stage report: the Markdown summary of the evaluation, for a pull request.

Reads evaluate's MODELS_JSON and DETAILS_JSON, the PCA_CURVE and lists FIGURES_DIR; no params.
Links to the figures are relative to the report's folder, so they work in the repository
browser. In MLflow, the report is attached to the evaluation run that wrote DETAILS_JSON.
"""

from aebench import cli, files, report, tracking

USAGE = "python -m stages.report MODELS_JSON DETAILS_JSON PCA_CURVE FIGURES_DIR REPORT_MD"


def main(args) -> None:
    experiment_id = tracking.open_store()
    text = report.summary(files.read_json(args.models_json), files.read_json(args.details_json),
                          files.read_columns(args.pca_curve, ("components", "test_mse")),
                          report.figure_links(args.figures_dir, args.report_md))
    files.write_text(args.report_md, text)
    tracking.attach_report(experiment_id, args.details_json, args.report_md)


if __name__ == "__main__":
    cli.run(main, USAGE, __doc__)
