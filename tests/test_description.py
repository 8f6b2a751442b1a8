"""The evaluate run's description (aebench.tracking.description): the verdict first, then the
models best first in units a reader knows, then the figures in a reader's order."""

from __future__ import annotations

from aebench.tracking import description

HEADLINE = {"deep3": {"mse": {"mean": 0.030763, "std": 0.000279},
                      "sse_per_image": {"mean": 24.1182, "std": 0.218929}, "n": 3},
            "over500": {"mse": {"mean": 0.0040772, "std": 7.02e-05}, "n": 3},
            "conv16": {"mse": {"mean": 0.000902159, "std": 0.000185},
                       "sse_per_image": {"mean": 0.707293, "std": 0.145}, "n": 3}}
DETAILS = {"deep3": {"latent_dim": 3, "pca": {"k": 3, "mse": 0.051609}},
           "over500": {"latent_dim": 500, "pca": {"k": 500, "mse": 4.94e-05}},
           "conv16": {"latent_dim": 2304, "pca": {"k": 784, "mse": 0.0}}}


def test_the_verdict_names_the_best_and_by_how_much():
    assert description.verdict(HEADLINE) == (
        "**Best: conv16**, test MSE 0.000902 ± 0.000185 (SSE/image 0.71 ± 0.14, n = 3), "
        "4.52× better than the next, over500 (0.00408 ± 7.02e-05).")
    one = {"deep3": {**HEADLINE["deep3"], "n": 1}}  # one replica: no spread to show
    assert description.verdict(one) == ("**Best: deep3**, test MSE 0.0308 (SSE/image 24.12, "
                                         "n = 1), the only model evaluated.")
    assert description.verdict({}) == ""


def test_the_table_is_best_first_in_units_a_reader_knows():
    rows = description.table(HEADLINE, DETAILS).splitlines()
    assert rows[0] == ("| # | model | test MSE (mean ± std) | SSE/image | × the best | "
                       "× PCA, same k | latent | n |")
    assert rows[2:] == [
        "| 1 | conv16 | 0.000902 ± 0.000185 | 0.71 ± 0.14 | best | n/a: PCA exact "
        "(k = 784 ≥ 784) | 2304 | 3 |",
        # no SSE/image in the headline: 784 × the MSE
        "| 2 | over500 | 0.00408 ± 7.02e-05 | 3.20 ± 0.06 | 4.52× | 82.5× (PCA is better) "
        "| 500 | 3 |",
        "| 3 | deep3 | 0.0308 ± 0.000279 | 24.12 ± 0.22 | 34.1× | 0.596× (beats PCA) | 3 | 3 |"]
    assert description.times(1302.4) == "1,302×"  # not 1.3e+03×


def test_the_figures_are_images_headline_first_and_the_report_follows_where_it_fits():
    paths = ["figures/denoising.png", "figures/extra.png", "figures/test_mse.png",
             "figures/training_curves.png", "figures/notes.txt"]
    images = description.figures("abc123", paths).split("\n\n")
    assert images == [
        "![test_mse.png](get-artifact?path=figures%2Ftest_mse.png&run_uuid=abc123)",
        "![training_curves.png](get-artifact?path=figures%2Ftraining_curves.png&run_uuid=abc123)",
        "![denoising.png](get-artifact?path=figures%2Fdenoising.png&run_uuid=abc123)",
        "![extra.png](get-artifact?path=figures%2Fextra.png&run_uuid=abc123)"]
    text = description.description(HEADLINE, DETAILS, figures_md=images[0], report="# report\n")
    assert text.startswith("**Best: conv16**") and text.endswith("# report\n")
    assert text.index("| 1 | conv16") < text.index("![test_mse.png]") < text.index("# report")
    short = description.description(HEADLINE, DETAILS, report="x" * 9000, limit=8000)
    assert short.endswith("The full report: reports/summary.md, under Artifacts.")
    assert len(short) <= 8000
