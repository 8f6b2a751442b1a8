"""Stage evaluate: every model's scores (stage score@NAME) summarised, on one scale.

Reads params.yaml sections `models` and `train.replicas`. Writes METRICS_DIR (DVC's metrics, one
file per model: the headline a reviewer diffs, mean and std over replicas and n, and PCA's mse
at its latent size from PCA_CURVE; see aebench.metric_files) and DETAILS_JSON (every replica's
metrics with its seed, per digit too, for the report, figures and compare).
In MLflow: a new evaluation run holding the headline, its table and these files; each
replica's metrics attach to its logged model (found by the sha256 of the weights scored); @best
of each registered model is its lowest test MSE replica. Training runs are never written to.
"""

import sys

from aebench import cli, config, constants, data, files, kinds, metrics, pca, scores, tracking
from aebench.metric_files import write as write_metrics

USAGE = "python -m stages.evaluate CSV_DIR SCORES_DIR PCA_CURVE METRICS_DIR DETAILS_JSON"


def main(args) -> None:
    params = config.load_params()
    cfgs = kinds.read_models(params)
    replicas = config.section(params, "train", config.Train).replicas
    scored = {n: scores.read(args.scores_dir, n, c.replicas or replicas)
              for n, c in cfgs.items()}  # every model's scores checked before anything is logged
    curve = files.read_columns(args.pca_curve, ("components", "test_mse"))
    experiment_id = tracking.open_store()
    test_csv = f"{args.csv_dir}/{constants.CSV_NAMES['test']}"
    labels, pixels = data.read_mnist_csv(test_csv)  # the dataset the runs name as their input
    dataset = tracking.eval_dataset(pixels, labels, source=test_csv)

    headline, details = {}, {}
    with tracking.evaluation_run(experiment_id):
        for name, cfg in cfgs.items():
            s, results = scored[name], []
            for r, replica in enumerate(s["replicas"]):
                sha, seed = replica.pop("weights_sha256"), replica.pop("seed")
                tracking.log_evaluation(name, r, sha, metrics.flat(replica), dataset)
                results.append({"seed": seed, **replica})
            headline[name] = metrics.headline(results, cfg)
            details[name] = {"kind": s["kind"], "latent_dim": s["latent_dim"],
                             "params": s["params"], "loss": s["loss"], "device": s["device"],
                             "pca": pca.pca_at(curve, s["latent_dim"]),
                             "replicas": results, "mean": metrics.averaged(results)}
            mse = headline[name]["mse"]
            print(f"evaluate: {name}: test mse {mse['mean']:.5f} ± {mse['std']:.5f} "
                  f"(n = {len(results)})", file=sys.stderr)
        with files.output_group():  # the metrics folder and the details change together
            write_metrics(args.metrics_dir, headline, {n: d["pca"] for n, d in details.items()})
            files.write_json(args.details_json, details)
        tracking.log_results(headline, details, [args.metrics_dir, args.details_json],
                             args.details_json)


if __name__ == "__main__":
    cli.run(main, USAGE, __doc__)
