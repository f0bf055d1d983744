"""Stage plot: the training history, confusion matrix and ROC curve as PNGs."""

import mlflow
import pandas as pd

from spamlora import stage, tracking
from spamlora.config import Params
from spamlora.fileio import read_json
from spamlora.paths import Paths
from spamlora.plots import plot_confusion, plot_history, plot_roc


def main(params: Params) -> None:
    paths = Paths()
    run_id = tracking.continue_or_create_run(
        "plot", paths.metrics("eval"), params.flat(), params.model.name,
        tracking.run_inputs("plot", params.data, paths),
        [paths.metrics("train"), paths.metrics("eval")])
    with tracking.active_run(run_id, "plot"):
        test = read_json(paths.metrics("eval"))["test"]
        figures = {
            "history": lambda p: plot_history(pd.read_csv(paths.plot_data("history")),
                                              pd.read_csv(paths.plot_data("steps")), p),
            "confusion": lambda p: plot_confusion(test["confusion"], p),
            "roc": lambda p: plot_roc(pd.read_csv(paths.plot_data("roc")), test["roc_auc"],
                                      p),
        }
        for name, draw in figures.items():
            draw(paths.figure(name))
            mlflow.log_artifact(str(paths.figure(name)), "figures")
            print(f"wrote {paths.figure(name)}")


if __name__ == "__main__":
    stage.run(main)
