"""Stage evaluate: every replica of every model on the 10,000 test images, on one scale.

Reads params.yaml sections `models`, `train.replicas` and `evaluate`. Writes METRICS_DIR (DVC's
metrics, one file per model: the headline a reviewer diffs, mean and std over replicas and n,
and PCA's mse at its latent size from PCA_CURVE; see aebench.metric_files) and DETAILS_JSON
(every replica's metrics with its seed, per digit too, for the report, figures and compare).
In MLflow: a new evaluation run holding the headline, its table and these files; each
replica's metrics attach to its logged model; @best of each registered model is its lowest test
MSE replica. Training runs are never written to.
"""

import sys

from aebench import cli, config, constants, data, files, kinds, metrics, models, pca, tracking
from aebench.metric_files import write as write_metrics

USAGE = "python -m stages.evaluate CSV_DIR MODELS_DIR PCA_CURVE METRICS_DIR DETAILS_JSON"


def main(args) -> None:
    params = config.load_params()
    cfgs = kinds.read_models(params)
    replicas = config.section(params, "train", config.Train).replicas
    noise_seed = config.section(params, "evaluate", config.Evaluate).noise_seed
    loaded = {n: models.load_replicas(args.models_dir, n, c, c.replicas or replicas)
              for n, c in cfgs.items()}  # every checkpoint checked before any evaluation
    curve = files.read_columns(args.pca_curve, ("components", "test_mse"))
    experiment_id = tracking.open_store()
    test_csv = f"{args.csv_dir}/{constants.CSV_NAMES['test']}"
    labels, pixels = data.read_mnist_csv(test_csv)
    dataset = tracking.eval_dataset(pixels, labels, source=test_csv)
    test = metrics.TestSet.of_images(pixels, labels)

    headline, details = {}, {}
    with tracking.evaluation_run(experiment_id):
        for name, cfg in cfgs.items():
            results = []
            for r, (model, ckpt) in enumerate(loaded[name]):
                result = metrics.evaluate_model(model, cfg, test, noise_seed)
                sha = tracking.sha256_file(f"{args.models_dir}/{name}/"
                                           f"{constants.replica_file(r)}")
                tracking.log_evaluation(name, r, sha, metrics.flat(result), dataset)
                results.append({"seed": ckpt["seed"], **result})
            model = loaded[name][0][0]
            headline[name] = metrics.headline(results, cfg)
            details[name] = {"kind": cfg.kind, "latent_dim": model.latent_dim,
                             "params": sum(t.numel() for t in model.parameters()),
                             "loss": cfg.loss, "device": loaded[name][0][1]["device"],
                             "pca": pca.pca_at(curve, model.latent_dim),
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
