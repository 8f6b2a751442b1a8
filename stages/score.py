"""Stage score@NAME: every replica of one model on the 10,000 test images, on one common scale.

Reads params.yaml `models.NAME`, `train.replicas` and `evaluate` (noise_seed). Writes SCORES_JSON:
the model's facts (kind, latent_dim, params, loss, device) and each replica's metrics
(aebench.metrics.evaluate_model) with its seed and the sha256 of the weights file scored, at full
float precision, for stage evaluate, which summarises every model and records them in MLflow.
One stage per model, so that a change to one model re-scores that model alone.
"""

import hashlib
import sys
from pathlib import Path

from aebench import cli, config, constants, data, files, kinds, metrics, models, scores

USAGE = "python -m stages.score NAME CSV_DIR MODEL_DIR SCORES_JSON"


def main(args) -> None:
    params = config.load_params()
    cfg = kinds.read_model(params, args.name)
    replicas = cfg.replicas or config.section(params, "train", config.Train).replicas
    noise_seed = config.section(params, "evaluate", config.Evaluate).noise_seed
    folder = Path(args.model_dir)
    if folder.name != args.name:  # load_replicas finds a model's folder by its name
        raise ValueError(f"{folder}: not the folder of model {args.name!r} (data/models/"
                         f"{args.name} in dvc.yaml)")
    loaded = models.load_replicas(folder.parent, args.name, cfg, replicas)  # all checked first
    files.check_writable(args.scores_json)
    labels, pixels = data.read_mnist_csv(f"{args.csv_dir}/{constants.CSV_NAMES['test']}")
    test = metrics.TestSet.of_images(pixels, labels)
    scored = []
    for r, (model, ckpt) in enumerate(loaded):
        with open(folder / constants.replica_file(r), "rb") as f:
            sha = hashlib.file_digest(f, "sha256").hexdigest()
        scored.append({"seed": ckpt["seed"], "weights_sha256": sha,
                       **metrics.evaluate_model(model, cfg, test, noise_seed)})
    model = loaded[0][0]
    scores.write(args.scores_json, {
        "name": args.name, "kind": cfg.kind, "latent_dim": model.latent_dim,
        "params": sum(t.numel() for t in model.parameters()), "loss": cfg.loss,
        "device": loaded[0][1]["device"], "replicas": scored})
    mse = metrics.mean_std([s["mse"] for s in scored])
    print(f"score@{args.name}: test mse {mse['mean']:.5f} ± {mse['std']:.5f} "
          f"(n = {len(scored)})", file=sys.stderr)


if __name__ == "__main__":
    cli.run(main, USAGE, __doc__)
