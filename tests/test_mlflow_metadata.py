"""What a researcher sees in the MLflow UI: the experiment is marked as model training (MLflow 3 otherwise opens it
on an empty GenAI traces page) and described; each run has its Source and its dataset as a training input."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

from lvzoo.runners import train
from lvzoo.tasks.base import tensor_digest
from lvzoo.tasks.bitvec import BitVectorVAETask
from tests.conftest import MlflowStore
from tests.datasets import write_random_datasets

OVERRIDES = {"train_limit": 48, "eval_limit": 24, "is_samples": 2, "final_is_samples": 2, "bits": 8}


def test_experiment_kind_description_source_and_dataset_input(mlflow_store: MlflowStore, workdir: Path) -> None:
    data = workdir / "data"
    write_random_datasets(data, {"FashionMNIST": (5100, 40)})
    result = train("bitvec", "sfe", overrides=OVERRIDES, epochs=1, data_dir=data, tracking_uri=mlflow_store.uri)

    client = MlflowClient(mlflow_store.uri)
    run = client.get_run(result.run_id)
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "Selection metric: val_neg_elbo (min)" in experiment.tags["mlflow.note.content"]
    assert run.data.tags["mlflow.source.name"] == "runner (lvzoo)"

    (dataset_input,) = run.inputs.dataset_inputs
    dataset = dataset_input.dataset
    assert dataset.name == "FashionMNIST"
    assert {tag.key: tag.value for tag in dataset_input.tags}["mlflow.data.context"] == "training"
    profile = json.loads(dataset.profile)
    assert profile["splits"] == {"train": 48, "val": 24, "test": 24} and profile["num_rows"] == 96
    # the digest is of the images the run trained on: recomputed from the files with the same limits
    task = BitVectorVAETask(BitVectorVAETask.config_class(**OVERRIDES), data, torch.device("cpu"))
    splits = task.dataset_description()["splits"]
    assert splits == profile["splits"]
    images = task._data()
    assert dataset.digest == tensor_digest(images["train"], images["val"], images["test"])[:36]
