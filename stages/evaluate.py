"""Stage evaluate: score every split with the trained adapter (LoRA merged)."""

import mlflow
import numpy as np
import pandas as pd

from spamlora import stage, tracking
from spamlora.config import Params
from spamlora.data import read_labelled_csv, seen_in, write_csv
from spamlora.evaluate import classification_metrics, precision_recall_curve, roc_curve
from spamlora.fileio import write_json
from spamlora.inference import softmax
from spamlora.paths import SPLITS, Paths
from spamlora.precision import run_facts
from spamlora.predictor import Predictor

LABEL_NAMES = np.array(["ham", "spam"])


def main(params: Params) -> None:
    paths = Paths()
    run_id = tracking.continue_or_create_run(
        "evaluate", paths.metrics("train"), params.flat(), params.model.name,
        tracking.run_inputs("evaluate", params.data, paths), [paths.metrics("train")])
    with tracking.active_run(run_id, "evaluate"):
        predictor = Predictor(paths.base_model, paths.adapter, params.train.device,
                              params.evaluate.precision, params.evaluate.batch_size)
        splits = {name: read_labelled_csv(paths.split(name)) for name in SPLITS}
        results = {}
        for name, df in splits.items():
            logits, _ = predictor.logits(df["text"].tolist())
            results[name] = classification_metrics(df["label"].to_numpy(), logits)
            if name == "test":
                test_df, test_logits = df, logits
        # Test messages with a copy in train measure memory: every test metric again on
        # the rest.
        unseen = ~seen_in(test_df, splits["train"]).to_numpy()
        results["test_unseen"] = classification_metrics(test_df["label"].to_numpy()[unseen],
                                                        test_logits[unseen])
        for name, metrics in results.items():
            mlflow.log_metrics({f"{name}.{k}": v for k, v in metrics.items()
                                if isinstance(v, float)})
        labels = test_df["label"].to_numpy()
        spam_prob = softmax(test_logits.astype(np.float64))[:, 1]
        predicted = (spam_prob >= 0.5).astype(int)
        write_csv(pd.DataFrame({"id": test_df["id"], "label": labels, "predicted": predicted,
                                "spam_probability": spam_prob}), paths.test_predictions)
        write_csv(pd.DataFrame({"actual": LABEL_NAMES[labels],
                                "predicted": LABEL_NAMES[predicted]}),
                  paths.plot_data("confusion"))
        write_csv(roc_curve(labels, spam_prob), paths.plot_data("roc"))
        write_csv(precision_recall_curve(labels, spam_prob),
                  paths.plot_data("precision_recall"))
        write_json(paths.metrics("eval"), {
            **results, "run": run_facts(predictor.device, predictor.dtype),
            tracking.RUN_ID_KEY: run_id})
        mlflow.log_artifact(str(paths.metrics("eval")))
        mlflow.log_artifact(str(paths.test_predictions))
        test, fresh = results["test"], results["test_unseen"]
        print(f"test accuracy {test['accuracy']:.4f}, F1 {test['f1']:.4f}, "
              f"ROC AUC {test['roc_auc']}; on the {fresh['examples']} test messages not in "
              f"train: accuracy {fresh['accuracy']:.4f}, F1 {fresh['f1']:.4f}")


if __name__ == "__main__":
    stage.run(main)
