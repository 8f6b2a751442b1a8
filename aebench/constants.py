"""Facts the whole pipeline shares, each stated once.

No imports: any module (and any stage, whatever it depends on) can read these for free.
"""

SIDE = 28                  # MNIST images are 28 x 28 grey pixels
N_PIXELS = SIDE * SIDE     # 784: a flat image, the width of every model's input and output

CSV_NAMES = {"train": "mnist_train.csv", "test": "mnist_test.csv"}


def replica_file(replica: int) -> str:
    """The checkpoint of one replica inside data/models/<name>/."""
    return f"r{replica}.pt"


# Published reference points on the metric scale of the whole pipeline (per-pixel MSE on [0,1]
# pixels of the 10,000 MNIST test images; SSE/image = 784 x MSE): (label, latent, sse, mse).
PCA_REFERENCES = (
    ("PCA (fit on the 60k training images)", 30, 13.87, 0.01769),
    ("PCA", 128, 3.30, 0.00421),
)
HINTON_2006 = ("Hinton & Salakhutdinov 2006, deep autoencoder 784-1000-500-250-30", 30, 3.00,
               0.00383)
REFERENCES = (*PCA_REFERENCES, HINTON_2006)

# Numbers in committed files (metrics, curves) keep this many significant digits: enough for
# any comparison, and past the float noise that thread counts or summation order leave.
DIGITS = 6
