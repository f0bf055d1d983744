"""Promotion: one run's logged model registered in the MLflow Model Registry, an alias
moved to it. Runs are never registered automatically: a registry is for promotions.

A run is chosen by id, by DVC experiment name (the `dvc.exp_name` tag), or as the best
finished run of the experiment by a metric: a validation one (`validation.*` from the
evaluate stage, `val_*` from training's last epoch); choosing by a test metric, or among
runs evaluated on different splits, is warned about. A run that only evaluated a cached
training (tagged `spamlora.training_run`) promotes the model of the run that trained it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import SpamloraError
from .mlflow_model import MODEL_NAME, logged_models, missing_files
from .tracking import (
    EXPERIMENT,
    SPLIT_CONTEXTS,
    TRAINING_RUN_TAG,
    connect,
    redacted,
    tracking_uri,
)

REGISTERED_NAME = "spamlora-sms"
DEFAULT_ALIAS = "champion"


class PromotionError(SpamloraError):
    pass


@dataclass(frozen=True)
class Promotion:
    name: str
    version: str
    alias: str
    run_id: str  # the run whose model was registered
    chosen_run_id: str  # the run chosen (differs when it reused another's training)
    warnings: tuple[str, ...] = ()  # about how it was chosen (`selection_warnings`)

    @property
    def alias_uri(self) -> str:
        return f"models:/{self.name}@{self.alias}"

    @property
    def version_uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def _experiment_id(client) -> str:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        raise PromotionError(f"the tracking store has no experiment {EXPERIMENT!r}: run the "
                             f"pipeline first")
    return experiment.experiment_id


def _finished_runs(client, experiment_id: str, filter_string: str = "") -> list:
    """The experiment's finished runs, newest first; deleted ones (kept until `mlflow
    gc`) are not candidates."""
    from mlflow.entities import ViewType

    status = "attributes.status = 'FINISHED'"
    return client.search_runs([experiment_id], " and ".join(
        f for f in (status, filter_string) if f), run_view_type=ViewType.ACTIVE_ONLY,
        order_by=["attributes.start_time DESC"])


def _not_deleted(run, what: str):
    """`run`, unless it is deleted (in the store until `mlflow gc`): `what` names it."""
    if run.info.lifecycle_stage == "deleted":
        run_id = run.info.run_id
        raise PromotionError(f"{what} is deleted in the tracking store {redacted(tracking_uri())}: "
                             f"`MLFLOW_TRACKING_URI={redacted(tracking_uri())} mlflow runs restore "
                             f"--run-id {run_id}` brings it back")
    return run


def choose_run(client, run_id: str | None = None, exp: str | None = None,
               best: str | None = None, lowest: bool = False):
    """The run named by exactly one of `run_id`, `exp` (DVC experiment name) or `best`
    (a metric: the highest wins, the lowest with `lowest`)."""
    import mlflow

    if sum(x is not None for x in (run_id, exp, best)) != 1:
        raise PromotionError("choose the run with exactly one of --run, --exp, --best")
    if run_id is not None:
        try:
            run = client.get_run(run_id)
        except mlflow.exceptions.MlflowException:
            raise PromotionError(f"no run {run_id!r} in the tracking store "
                                 f"{redacted(tracking_uri())}") from None
        return _not_deleted(run, f"run {run_id}")
    experiment_id = _experiment_id(client)
    if exp is not None:
        runs = _finished_runs(client, experiment_id, f"tags.`dvc.exp_name` = '{exp}'")
        if not runs:
            raise PromotionError(f"no finished run of DVC experiment {exp!r} (known: "
                                 f"{_known_experiments(client, experiment_id)})")
        return runs[0]  # the newest, if the experiment was run again
    runs = _candidates(client, experiment_id, best)
    return (min if lowest else max)(runs, key=lambda r: r.data.metrics[best])


def _candidates(client, experiment_id: str, best: str) -> list:
    """The finished runs that have metric `best`, newest first (at least one)."""
    runs = [r for r in _finished_runs(client, experiment_id) if best in r.data.metrics]
    if not runs:
        seen = sorted({m for r in _finished_runs(client, experiment_id)
                       for m in r.data.metrics})
        raise PromotionError(f"no finished run of experiment {EXPERIMENT!r} has metric "
                             f"{best!r} (metrics logged: {seen})")
    return runs


TEST_METRICS = ("test.", "test_unseen.")  # the evaluate stage's test-split metrics
# The split a metric is computed on, by its prefix (as tracking logs the splits' contexts).
METRIC_SPLITS = (("test.", "testing"), ("test_unseen.", "testing"),
                 ("validation.", "validation"), ("val_", "validation"),
                 ("train.", "training"), ("train_", "training"))
NAMED_RUNS = 5  # runs named per digest; the rest are counted


def _split_digests(run) -> dict[str, str]:
    """Split context (training, validation, testing) -> the digest of the dataset the
    run logged for it."""
    digests = {}
    for item in run.inputs.dataset_inputs if run.inputs else []:
        context = {t.key: t.value for t in item.tags}.get("mlflow.data.context")
        if context:
            digests[context] = item.dataset.digest
    return digests


def selection_warnings(best: str, candidates: list, chosen) -> list[str]:
    """What the user should know about choosing `chosen` among `candidates` by `best`:
    a test metric spends the test split on the choice, and runs evaluated on different
    splits (other digests: `data.dedupe`, the seed or the fractions changed) have
    metrics that do not compare."""
    out = []
    if best.startswith(TEST_METRICS):
        out.append(f"choosing by {best}, a test-split metric, fits the choice to the test "
                   f"messages: the winner's test score then overstates how it does on new "
                   f"ones. Choose by a validation metric (e.g. --best validation.accuracy, "
                   f"or --best validation.loss --lowest) and keep the test split for "
                   f"reporting the chosen model")
    splits = [c for prefix, c in METRIC_SPLITS if best.startswith(prefix)][:1] or list(
        SPLIT_CONTEXTS.values())
    groups: dict[tuple, list[str]] = {}
    for run in candidates:
        digests = _split_digests(run)
        names = groups.setdefault(tuple(digests.get(s) for s in splits), [])
        if run.info.run_id == chosen.info.run_id:
            names.insert(0, f"{run.info.run_id} (chosen)")  # never among those cut
        else:
            names.append(run.info.run_id)
    if len(groups) > 1:
        described = []
        for digests, names in groups.items():
            shown = ", ".join(names[:NAMED_RUNS]) + (
                f" and {len(names) - NAMED_RUNS} more" if len(names) > NAMED_RUNS else "")
            what = ", ".join(f"{s} {d[:12] if d else 'not logged'}"
                             for s, d in zip(splits, digests, strict=True))
            described.append(f"{what}: run(s) {shown}")
        out.append(f"the {len(candidates)} runs with {best} were not all evaluated on the "
                   f"same {'/'.join(splits)} data (their dataset digests differ: "
                   f"data.dedupe, data.seed or the split fractions changed?), so their "
                   f"{best} values do not compare: " + "; ".join(described))
    return out


def _known_experiments(client, experiment_id: str) -> list[str]:
    return sorted({r.data.tags["dvc.exp_name"] for r in _finished_runs(client, experiment_id)
                   if "dvc.exp_name" in r.data.tags})


def _logged_model(client, run) -> object | None:
    models = logged_models(client, run.info.run_id, run.info.experiment_id)
    return models[0] if models else None


def check_model_files(model) -> None:
    """A logged model whose files are gone cannot be served: refuse it before anything
    is registered."""
    if folder := missing_files(model):
        raise PromotionError(f"the model of run {model.source_run_id} has no files any more "
                             f"({folder} holds no MLmodel): its artifacts were deleted. "
                             f"Rerun its training to log it again.")


def model_run(client, run):
    """The run holding the model of `run`'s results: itself, or the training run it
    reused (which must be in the store and not deleted)."""
    import mlflow

    if _logged_model(client, run) is not None:
        return run
    training = run.data.tags.get(TRAINING_RUN_TAG)
    if training and training != run.info.run_id:
        what = f"run {run.info.run_id} reused the training of run {training}, which"
        try:
            trained = client.get_run(training)
        except mlflow.exceptions.MlflowException:
            raise PromotionError(f"{what} is not in the tracking store {redacted(tracking_uri())} "
                                 f"(a clone that pulled the pipeline's outputs but logs to "
                                 f"another store? set MLFLOW_TRACKING_URI to the store it "
                                 f"was trained in)") from None
        return model_run(client, _not_deleted(trained, what))
    raise PromotionError(f"run {run.info.run_id} has no logged model {MODEL_NAME!r} "
                         f"(trained before models were logged? rerun its training)")


def promote(run_id: str | None = None, exp: str | None = None, best: str | None = None,
            lowest: bool = False, name: str = REGISTERED_NAME,
            alias: str = DEFAULT_ALIAS) -> Promotion:
    """Register the chosen run's model as a new version of `name` and point `alias` at
    it."""
    import mlflow

    _check_alias(alias)
    client = connect()
    chosen = choose_run(client, run_id, exp, best, lowest)
    source = model_run(client, chosen)
    warnings = selection_warnings(best, _candidates(client, chosen.info.experiment_id, best),
                                  chosen) if best else []
    tags = {"chosen_run": chosen.info.run_id}
    if best:
        tags[f"promoted_by.{best}"] = str(chosen.data.metrics[best])
    for tag in ("dvc.exp_name", "git.commit"):
        if tag in chosen.data.tags:
            tags[tag] = chosen.data.tags[tag]
    logged = _logged_model(client, source)
    check_model_files(logged)
    version = mlflow.register_model(logged.model_uri, name,
                                    tags=tags)
    client.set_registered_model_alias(name, alias, version.version)
    return Promotion(name, str(version.version), alias, source.info.run_id,
                     chosen.info.run_id, tuple(warnings))


def _check_alias(alias: str) -> None:
    """MLflow's own rules for alias names, checked before anything is registered."""
    import mlflow
    from mlflow.utils import validation

    # Private functions, renamed in MLflow 3.18 (_validate_model_alias_name before). Where
    # neither name is found, MLflow still refuses a bad alias when it is set.
    checks = [getattr(validation, new, None) or getattr(validation, old, None)
              for new, old in (("_validate_alias_name", "_validate_model_alias_name"),
                               ("_validate_alias_name_reserved",
                                "_validate_model_alias_name_reserved"))]
    try:
        for check in checks:
            if check is not None:
                check(alias)
    except mlflow.exceptions.MlflowException as e:
        raise PromotionError(f"--alias {alias!r}: {e.message}") from None
