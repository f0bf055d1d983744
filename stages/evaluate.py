"""Stage evaluate: score every split with the trained adapter (LoRA merged)."""

import mlflow
import numpy as np
import pandas as pd

from spamlora import stage, tracking
from spamlora.adapter import AdapterError
from spamlora.config import Params
from spamlora.data import Classes, read_labelled_csv, seen_in, write_csv
from spamlora.evaluate import (
    classification_metrics,
    flat_metrics,
    headline_f1,
    micro_average,
    precision_recall_curve,
    roc_curve,
)
from spamlora.fileio import write_json
from spamlora.inference import predictions, softmax
from spamlora.paths import SPLITS, Paths
from spamlora.precision import run_facts
from spamlora.predictor import Predictor


def main(params: Params) -> None:
    paths = Paths()
    classes = Classes.read(paths.classes)
    run_id = tracking.continue_or_create_run(
        "evaluate", paths.metrics("train"), params.flat(), params.model.name,
        tracking.run_inputs("evaluate", params.data, paths), [paths.metrics("train")])
    with tracking.active_run(run_id, "evaluate"):
        predictor = Predictor(paths.base_model, paths.adapter, params.train.device,
                              params.evaluate.precision, params.evaluate.batch_size)
        if predictor.spec.class_names != classes.names:
            raise AdapterError(f"{paths.adapter}: trained for the classes "
                               f"{list(predictor.spec.class_names)}, but {paths.classes} "
                               f"has {list(classes.names)}; run the train stage again")
        names, positive = classes.names, classes.positive_index

        def scores(labels: np.ndarray, logits: np.ndarray) -> dict[str, object]:
            return classification_metrics(labels, logits, classes=names,
                                          positive_index=positive)

        splits = {name: read_labelled_csv(paths.split(name)) for name in SPLITS}
        results = {}
        for name, df in splits.items():
            logits, _ = predictor.logits(df["text"].tolist())
            results[name] = scores(df["label"].to_numpy(), logits)
            if name == "test":
                test_df, test_logits = df, logits
        # Test messages with a copy in train measure memory: every test metric again on
        # the rest.
        unseen = ~seen_in(test_df, splits["train"]).to_numpy()
        results["test_unseen"] = scores(test_df["label"].to_numpy()[unseen],
                                        test_logits[unseen])
        for name, metrics in results.items():
            mlflow.log_metrics(flat_metrics(metrics, name))
        labels = test_df["label"].to_numpy()
        probs = softmax(test_logits.astype(np.float64))
        predicted = predictions(probs, positive)
        write_csv(pd.DataFrame({"id": test_df["id"], "label": labels, "predicted": predicted,
                                **{f"{name}_probability": probs[:, i]
                                   for i, name in enumerate(names)}}),
                  paths.test_predictions)
        label_names = np.array(names)
        write_csv(pd.DataFrame({"actual": label_names[labels],
                                "predicted": label_names[predicted]}),
                  paths.plot_data("confusion"))
        # Two classes: the positive one's curves (spam's, as always); more: the curves
        # pooled one-vs-rest over the classes (micro-average).
        truth, score = ((labels == positive).astype(int), probs[:, positive]) if (
            positive is not None) else micro_average(labels, probs)
        write_csv(roc_curve(truth, score), paths.plot_data("roc"))
        write_csv(precision_recall_curve(truth, score), paths.plot_data("precision_recall"))
        write_json(paths.metrics("eval"), {
            **results, "run": run_facts(predictor.device, predictor.dtype),
            tracking.RUN_ID_KEY: run_id})
        mlflow.log_artifact(str(paths.metrics("eval")))
        mlflow.log_artifact(str(paths.test_predictions))
        test, fresh = results["test"], results["test_unseen"]
        f1 = "F1" if positive is not None else "macro F1"
        print(f"test accuracy {test['accuracy']:.4f}, {f1} {headline_f1(test):.4f}, "
              f"ROC AUC {test['roc_auc']}; on the {fresh['examples']} test messages not in "
              f"train: accuracy {fresh['accuracy']:.4f}, {f1} {headline_f1(fresh):.4f}")


if __name__ == "__main__":
    stage.run(main)
