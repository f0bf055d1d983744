"""Where every stage reads and writes, relative to the workspace root.

`dvc.yaml` lists the same paths as deps and outs; a test checks the two agree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Paths:
    root: Path = Path(".")

    # download_data
    @property
    def raw_dir(self) -> Path:
        return self.root / "data" / "raw"

    @property
    def raw_zip(self) -> Path:
        return self.raw_dir / "smsspamcollection.zip"

    @property
    def raw_messages(self) -> Path:
        return self.raw_dir / "SMSSpamCollection"

    @property
    def raw_download_record(self) -> Path:
        return self.raw_dir / "download.json"

    def raw_file(self, fmt: str) -> Path:
        """Where a labelled file of format `fmt` fetched from a URL is put (a local one
        is read where it is)."""
        return self.raw_dir / f"messages.{fmt}"

    # balance, split
    @property
    def balanced(self) -> Path:
        return self.root / "data" / "balanced.csv"

    @property
    def classes(self) -> Path:
        """The class names in index order (the split files hold indices), and the
        positive class of two."""
        return self.root / "data" / "classes.json"

    def stage_deps(self, stage: str, params: dict[str, object]) -> list[Path]:
        """The paths dvc.yaml lists as `stage`'s deps, `${section.key}` filled in from
        `params` (`Params.flat()`), each relative to the workspace root; none where
        there is no dvc.yaml."""
        import yaml

        try:
            text = (self.root / "dvc.yaml").read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        deps = (yaml.safe_load(text).get("stages", {}).get(stage) or {}).get("deps") or []
        filled = [re.sub(r"\$\{\s*([^}]+?)\s*\}", lambda m: str(params.get(m[1], m[0])), d)
                  for d in deps if isinstance(d, str)]
        return [self.root / d for d in filled]

    def split(self, name: str) -> Path:
        return self.root / "data" / f"{name}.csv"

    # download_model
    @property
    def base_model(self) -> Path:
        return self.root / "data" / "base_model"

    # train
    @property
    def train_dir(self) -> Path:
        return self.root / "data" / "train"

    @property
    def adapter(self) -> Path:
        return self.train_dir / "adapter.safetensors"

    # evaluate
    @property
    def test_predictions(self) -> Path:
        return self.root / "data" / "evaluate" / "test_predictions.csv"

    # metrics/ (small, tracked by DVC as metrics and plots)
    @property
    def metrics_dir(self) -> Path:
        return self.root / "metrics"

    def metrics(self, name: str) -> Path:
        return self.metrics_dir / f"{name}.json"

    def plot_data(self, name: str) -> Path:
        return self.metrics_dir / "plots" / f"{name}.csv"

    def figure(self, name: str) -> Path:
        return self.metrics_dir / "figures" / f"{name}.png"


SPLITS = ("train", "validation", "test")
