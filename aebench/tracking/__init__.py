"""MLflow: where runs go, and how training and evaluation are recorded.

The store defaults to `sqlite:///<working copy>/mlflow.db`, an absolute URI. `dvc exp run --temp`
and `--queue` execute in a copy under `<working copy>/.dvc/tmp/exps/`; the root is taken from
above that folder so those runs land in the user's own store too. MLFLOW_TRACKING_URI overrides.
The store of the last run is named in `.mlflow-last-store` (last_store): `make ui` and the reuse
snippet open it.

What the store holds, in one experiment (`aebench`):

- training: one run per model, named NAME (its params and tags; once its replicas finish, the
  mean and std over them of test_mse and train_loss per epoch), with one child run per
  replica, NAME-r{i} (seed, per-epoch metrics at step = epoch, and the logged model NAME-r{i}).
  The logged model is the replica's weights and config, no pickle (load_model reads them with
  torch.load(weights_only=True) and returns the autoencoder with `encode`, `decode` and
  `latent_dim`; see models), tagged with the sha256 of the weights
  file that DVC tracks: evaluation finds it from the checkpoint alone, so no run id ever has to
  be written into a DVC output (it would make re-runs non-reproducible). Each logged model is a
  version of the registered model aebench-NAME (aliases @r{i}, @best: see registry).
- evaluation: a separate run per invocation, with one child run per evaluated replica; the test
  metrics are attached to the replica's logged model (`model_id`) and to the test dataset. The
  run itself holds the headline per model, the headline table, the metrics files, details.json
  and the report. A training run is never written to after it ends; figures go to a `figures`
  run.

Every run ends FINISHED, FAILED (an exception) or KILLED (Ctrl-C, or SIGTERM and the death of
`dvc repro`, which aebench.cli turns into KeyboardInterrupt). A run left RUNNING by SIGKILL is
marked KILLED when that model's training starts again.
"""

from __future__ import annotations

from .evaluation import (
    attach_report,
    eval_dataset,
    evaluation_run,
    log_artifacts,
    log_evaluation,
    log_results,
)
from .models import (
    PIXEL_SCALES,
    find_logged_model,
    load_model,
    log_replica_model,
    sha256_file,
)
from .registry import register_training, registered_name
from .runs import (
    end_stale_runs,
    log_epochs,
    log_training_curve,
    model_color,
    replica_run,
    training_run,
)
from .store import (
    EXPERIMENT,
    TrackingError,
    common_tags,
    git_commit,
    last_store,
    open_store,
    tracking_uri,
    working_copy_root,
)

__all__ = ["EXPERIMENT", "PIXEL_SCALES", "TrackingError", "attach_report", "common_tags",
           "end_stale_runs", "eval_dataset", "evaluation_run", "find_logged_model", "git_commit",
           "last_store", "load_model", "log_artifacts", "log_epochs", "log_evaluation",
           "log_replica_model", "log_results", "log_training_curve", "model_color", "open_store",
           "register_training", "registered_name", "replica_run", "sha256_file", "tracking_uri",
           "training_run", "working_copy_root"]
