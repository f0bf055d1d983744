"""Stage plot: the training history, confusion matrix and ROC curve(s) as PNGs."""

import mlflow
import pandas as pd

from spamlora import stage, tracking
from spamlora.config import Params
from spamlora.data import Classes
from spamlora.fileio import read_json
from spamlora.paths import Paths
from spamlora.plots import (
    one_vs_rest_curves,
    plot_confusion,
    plot_history,
    plot_roc,
    plot_roc_per_class,
)


def main(params: Params) -> None:
    paths = Paths()
    classes = Classes.read(paths.classes)
    run_id = tracking.continue_or_create_run(
        "plot", paths.metrics("eval"), params.flat(), params.model.name,
        tracking.run_inputs("plot", params.data, paths),
        [paths.metrics("train"), paths.metrics("eval")])
    with tracking.active_run(run_id, "plot"):
        test = read_json(paths.metrics("eval"))["test"]
        names = classes.names
        if classes.positive is not None:  # negative first, as the matrix has it
            names = (names[1 - classes.positive_index], classes.positive)
        figures = {
            "history": lambda p: plot_history(pd.read_csv(paths.plot_data("history")),
                                              pd.read_csv(paths.plot_data("steps")), p),
            "confusion": lambda p: plot_confusion(test["confusion"], p, names),
            "roc": lambda p: draw_roc(paths, classes, test, p),
        }
        for name, draw in figures.items():
            draw(paths.figure(name))
            mlflow.log_artifact(str(paths.figure(name)), "figures")
            print(f"wrote {paths.figure(name)}")


def draw_roc(paths: Paths, classes: Classes, test: dict, path) -> None:
    """Two classes: the positive one's curve; more: one per class, from each test
    message's probabilities."""
    if classes.positive is not None:
        plot_roc(pd.read_csv(paths.plot_data("roc")), test["roc_auc"], path,
                 classes.positive)
        return
    curves = one_vs_rest_curves(pd.read_csv(paths.test_predictions), classes.names)
    plot_roc_per_class(curves, {n: c["roc_auc"] for n, c in test["per_class"].items()},
                       path)


if __name__ == "__main__":
    stage.run(main)
