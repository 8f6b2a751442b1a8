"""Stage pca: the optimal linear baseline at every latent size in use.

    python -m stages.pca CSV_DIR PCA_JSON CURVE_CSV

Reads params.yaml section `models`, only for the latent sizes of its models. Fits PCA on all
60,000 training images and writes PCA_JSON ({"pca<k>": test metrics + latent_dim}, by k) and
CURVE_CSV (components,test_mse for k = 0..784). A latent size above 784 gets k = 784, full-rank
PCA, which reconstructs exactly: such a model has no linear bar to clear.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from aebench import config, data, files, metrics, models


def latent_sizes(models_cfg: dict) -> dict[int, list[str]]:
    """{k: model names} with k = min(latent_dim, 784), sorted by k."""
    sizes: dict[int, list[str]] = {}
    for name, cfg in models_cfg.items():
        k = min(models.build_model(cfg).latent_dim, metrics.N_PIXELS)
        sizes.setdefault(k, []).append(name)
    return dict(sorted(sizes.items()))


def pca_metrics(train01, test01, test_labels, ks) -> tuple[dict, torch.Tensor]:
    """({"pca<k>": metrics}, test mse for k = 0..784) of PCA fit on train01."""
    mean, components = metrics.fit_pca(train01)
    results = {}
    for k in ks:
        # Full rank reconstructs the input exactly; computing it leaves ~1e-31 of platform-
        # dependent rounding noise (and a psnr of ~300 dB) in a file that dvc diffs.
        pred = test01 if k >= len(components) else \
            metrics.pca_reconstruct(test01, mean, components, k)
        results[f"pca{k}"] = {**metrics.reconstruction_metrics(pred, test01, test_labels),
                              "latent_dim": k}
    return results, metrics.mse_by_components(test01, mean, components)


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    csv_dir, json_path, curve_path = Path(argv[0]), Path(argv[1]), Path(argv[2])
    models_cfg = config.validate_models(config.load_params("params.yaml").get("models"))
    sizes = latent_sizes(models_cfg)
    _, train_x = data.read_mnist_csv(csv_dir / "mnist_train.csv")
    test_y, test_x = data.read_mnist_csv(csv_dir / "mnist_test.csv")

    results, curve = pca_metrics(metrics.as_tensor(train_x).double() / 255,
                                 metrics.as_tensor(test_x).double() / 255,
                                 metrics.as_tensor(test_y), sizes)
    files.write_json(json_path, metrics.rounded(results))
    files.write_csv_rows(curve_path, [{"components": k, "test_mse": metrics.rounded(float(v))}
                                      for k, v in enumerate(curve)])
    for (k, names), m in zip(sizes.items(), results.values()):
        note = " (full rank: exact)" if k == metrics.N_PIXELS else ""
        print(f"pca: k={k}{note}: mse {m['mse']:.4g}, sse/image {m['sse_per_image']:.2f} "
              f"[{', '.join(names)}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (config.ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
