"""Stage pca: the optimal linear baseline for every number of components at once.

Fits PCA on all 60,000 training images and writes CURVE_CSV: the test MSE on [0,1] pixels for
k = 0..784 components. One eigendecomposition serves every latent size a model may name, so the
stage reads no params and never re-runs for a model change; evaluate picks the sizes in use.
"""

import sys

import torch

from aebench import cli, constants, data, files, pca

USAGE = "python -m stages.pca CSV_DIR CURVE_CSV"


def main(args) -> None:
    _, train_x = data.read_mnist_csv(f"{args.csv_dir}/{constants.CSV_NAMES['train']}")
    _, test_x = data.read_mnist_csv(f"{args.csv_dir}/{constants.CSV_NAMES['test']}")
    mean, components = pca.fit_pca(torch.from_numpy(train_x).double() / 255)
    curve = pca.mse_by_components(torch.from_numpy(test_x).double() / 255, mean, components)
    files.write_csv_rows(args.curve_csv, [{"components": k, "test_mse": float(v)}
                                          for k, v in enumerate(curve)])
    for k in (30, 128):
        print(f"pca: k={k}: test mse {float(curve[k]):.5f}", file=sys.stderr)


if __name__ == "__main__":
    cli.run(main, USAGE, __doc__)
