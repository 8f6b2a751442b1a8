"""Stage figures: every PNG of aebench.figures.FIGURES, for every model in params.yaml.

Reads params.yaml sections `models` (replica 0 of each is drawn) and `evaluate` (noise_seed).
Writes OUT_DIR/<name>.png for each registered figure and OVERLAY_CSV (every model's curve in one
table, for DVC's overlay plot), and logs the PNGs to a new MLflow run named `figures`.
"""

import sys
from pathlib import Path

from aebench import cli, config, constants, data, figures, files, kinds, models, parallel, tracking
from aebench.metric_files import read as read_metrics

USAGE = ("python -m stages.figures CSV_DIR MODELS_DIR METRICS_DIR DETAILS_JSON CURVES_DIR "
         "PCA_CURVE OUT_DIR OVERLAY_CSV")
CURVE = ("epoch", "test_mse", "train_loss")


def main(args) -> None:
    params = config.load_params()
    cfgs = kinds.read_models(params)
    noise_seed = config.section(params, "evaluate", config.Evaluate).noise_seed
    nets = {n: models.load_replicas(args.models_dir, n, c, 1)[0][0] for n, c in cfgs.items()}
    details = files.read_json(args.details_json)
    missing = [n for n in cfgs if n not in details]
    if missing:
        raise ValueError(f"{args.details_json}: no metrics for {', '.join(missing)}; rerun "
                         "`dvc repro evaluate`")
    headline = read_metrics(args.metrics_dir, cfgs)
    experiment_id = tracking.open_store()
    inputs = figures.Inputs(
        cfgs=cfgs, nets=nets, headline=headline, details=details,
        pca_curve=files.read_columns(args.pca_curve, ("components", "test_mse")),
        curves={n: files.read_columns(f"{args.curves_dir}/{n}.csv", CURVE) for n in cfgs},
        test=data.read_mnist_csv(f"{args.csv_dir}/{constants.CSV_NAMES['test']}"),
        train=data.read_mnist_csv(f"{args.csv_dir}/{constants.CSV_NAMES['train']}",
                                  limit=figures.TRAIN_IMAGE + 1, short_ok=True),
        noise_seed=noise_seed)
    # Every PNG and the table change, or none; the folder is replaced whole, so that the
    # figures, drawn side by side (one per core), land in it together.
    with files.output_group(), files.atomic_dir(args.out_dir) as folder:
        drawn = figures.draw_all(inputs, folder, workers=parallel.cores())
        files.write_csv_rows(args.overlay_csv, figures.overlay_rows(inputs.curves))
    paths = [Path(args.out_dir) / p.name for p in drawn]  # where the folder is now
    with tracking.evaluation_run(experiment_id, name="figures"):
        tracking.log_artifacts(paths)
    for path in paths:
        print(f"figures: {path}", file=sys.stderr)


if __name__ == "__main__":
    cli.run(main, USAGE, __doc__)
