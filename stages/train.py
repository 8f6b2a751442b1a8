"""Stage train@NAME: train the replicas of one model of params.yaml, recorded in MLflow.

Reads params.yaml `train` and `models.NAME`. Writes MODEL_DIR/r<i>.pt for replica i (seed
train.seed + i) and CURVE_CSV (per epoch, mean and std over replicas), only when all finish.
"""

import contextlib
import os
import sys

from aebench import cli, config, constants, data, files, kinds, models, tracking, training, workers

USAGE = "python -m stages.train NAME CSV_DIR MODEL_DIR CURVE_CSV"


def main(args) -> None:
    params = config.load_params()
    train = config.section(params, "train", config.Train)
    cfg = kinds.read_model(params, args.name)
    # Everything that can fail fails here, before any training.
    device = training.pick_device(train.device)
    files.check_writable(args.model_dir, args.curve_csv)
    experiment_id = tracking.open_store()
    train_csv, test_csv = (f"{args.csv_dir}/{constants.CSV_NAMES[s]}" for s in ("train", "test"))
    try:
        _, train_x = data.read_mnist_csv(train_csv, train.limit or None)
    except ValueError as err:  # name the key when it is the limit that does not fit
        raise (ValueError(f"params.yaml: train.limit: {err}") if "limit" in str(err) else err) \
            from None
    _, test_x = data.read_mnist_csv(test_csv)
    seeds = [train.seed + r for r in range(cfg.replicas or train.replicas)]
    n_workers = workers.count(train.workers, len(seeds), device, cfg.epochs * len(train_x))
    print(f"train@{args.name}: {len(seeds)} replica(s) on {len(train_x)} images, device "
          f"{device}, {n_workers} worker process(es)", file=sys.stderr)
    if warning := training.batch_warning(args.name, cfg.batch_size, len(train_x), train.limit):
        print(warning, file=sys.stderr)
    probe = cfg.build()
    run_params = {**config.flatten(cfg.model_dump()), "train.path": train.path,
                  "train.limit": train.limit, "n_train": len(train_x), "device": str(device),
                  "replicas": len(seeds), "workers": n_workers, "latent_dim": probe.latent_dim,
                  "n_params": sum(t.numel() for t in probe.parameters()),
                  "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "")}
    histories, model_ids = [], []
    color = tracking.model_color(list(params["models"]).index(args.name))  # as in the PNGs
    # The weights and the curve move into place together, inside the run (a failure fails it).
    with tracking.training_run(experiment_id, args.name, run_params, color=color), \
            files.output_group(), files.atomic_dir(args.model_dir) as out, \
            workers.Replicas(cfg, train_x, test_x, name=args.name, seeds=seeds, device=device,
                             path=train.path, workers=n_workers) as replicas:
        for r, seed in enumerate(seeds):
            # Stopped (another replica failed): this run ends KILLED, the failed one's FAILED
            with contextlib.suppress(workers.Stopped), tracking.replica_run(args.name, r, seed):
                model, history = replicas.result(r)
                path = out / constants.replica_file(r)
                models.save_checkpoint(path, model, name=args.name, cfg=cfg, replica=r,
                                       seed=seed, device=device.type)
                tracking.log_epochs(history.epochs, {"train_seconds": history.seconds})
                model_ids.append(tracking.log_replica_model(
                    model, name=args.name, index=r, pixels=cfg.pixels,
                    weights_sha256=tracking.sha256_file(path)))
                histories.append(history)
        curve = training.curve_rows(histories)
        files.write_csv_rows(args.curve_csv, curve)
        tracking.log_training_curve(curve)  # the model's row and curve in the UI
        tracking.register_training(args.name, model_ids)  # aliases move once all replicas are in


if __name__ == "__main__":
    cli.run(main, USAGE, __doc__)
