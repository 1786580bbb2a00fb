"""The semi-supervised VAE task and model (real MNIST of ``<repo>/../shared/data`` when present, generated IDX files
otherwise)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from entmax import sparsemax, sparsemax_loss
from torch import Tensor

from lvzoo import registry
from lvzoo.estimators.base import (
    Estimator,
    EstimatorConfig,
    MarginalizingEstimator,
    SparseDistribution,
    dense_to_sparse,
)
from lvzoo.estimators.marginal import SoftmaxMarginal, SparsemaxMarginal
from lvzoo.estimators.spaces import Categorical
from lvzoo.models.ssvae import SSVAEModel
from lvzoo.tasks.base import latent_terms, resolve_config
from lvzoo.tasks.data import load_images, load_ssvae_splits
from lvzoo.tasks.ssvae import SSVAEBatch, SSVAEConfig, SSVAETask
from lvzoo.tasks.ssvae_data import split_indices
from tests.datasets import shared_or_random_root, write_random_datasets

#: One intra-op thread: the small matrices gain nothing from more, and the test machine is shared.
pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
SMALL = {"train_limit": 400, "eval_limit": 120, "batch_size": 32}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared root holding the real MNIST files, or a directory of generated ones."""
    return shared_or_random_root(tmp_path_factory, {"MNIST": (1200, 200)})


def make_task(data_dir: Path, estimator_name: str = "softmax", **overrides: Any) -> SSVAETask:
    """The task configured for ``estimator_name`` as the runner resolves it (paper settings, then ``overrides``)."""
    config, _ = resolve_config(SSVAETask, estimator_name, {**SMALL, **overrides})
    return SSVAETask(config, data_dir, CPU)


def load_estimator(task: SSVAETask, name: str) -> Estimator[Any]:
    """The registered estimator ``name`` with the task's paper estimator config."""
    cls = registry.estimators.load(name)
    config = cls.config_class(**SSVAETask.paper_settings(name, task.config).estimator)
    estimator: Estimator[Any] = cls(task.latent_space(), config)
    return estimator


def first_batch(task: SSVAETask, seed: int = 0) -> SSVAEBatch:
    return next(iter(task.train_batches(torch.Generator().manual_seed(seed))))


def sharpened_model(task: SSVAETask, seed: int, factor: float) -> SSVAEModel:
    """``task.build_model()`` under ``torch.manual_seed(seed)``, its classifier's last weights scaled by ``factor``
    (sharper class scores)."""
    torch.manual_seed(seed)
    model = task.build_model()
    last = model.classifier[-1]
    assert isinstance(last, torch.nn.Linear)
    with torch.no_grad():
        last.weight.mul_(factor)
    return model


def test_interface_shapes_and_batches(data_dir: Path) -> None:
    task = make_task(data_dir)
    assert task.latent_space() == Categorical(10)
    data = task.data
    num_labelled, num_unlabelled = data.labelled_labels.shape[0], data.unlabelled_images.shape[0]
    assert num_labelled + num_unlabelled == SMALL["train_limit"]
    assert data.val_labels.shape == (SMALL["eval_limit"],) and data.test_images.shape == (SMALL["eval_limit"], 784)
    assert task.unlabelled_weight() == num_unlabelled / num_labelled
    batches = list(task.train_batches(torch.Generator().manual_seed(0)))
    assert len(batches) == task.steps_per_epoch() == math.ceil(num_unlabelled / 32)
    assert sum(b.unlabelled_x.shape[0] for b in batches if b.unlabelled_x is not None) == num_unlabelled
    batch = batches[0]
    assert batch.labelled_x.shape == (32, 784) and batch.labels.shape == (32,)
    assert batch.labelled_x.dtype == torch.float32
    assert bool(((batch.labelled_x == 0) | (batch.labelled_x == 1)).all())
    model = task.build_model()
    x = batch.labelled_x
    z = F.one_hot(batch.labels, 10).float()
    assert model.classify(x).shape == (32, 10)
    mu, logvar = model.encode(x, z)
    assert mu.shape == logvar.shape == (32, 8)
    assert model.decode(mu, z).shape == (32, 784)
    assert model.neg_elbo_given_class(x, z).shape == (32,)


def test_vae_layers_follow_the_config() -> None:
    code, paper = SSVAEModel(vae_layers=2), SSVAEModel(vae_layers=1)
    linear = torch.nn.Linear
    assert [m.out_features for m in code.encoder if isinstance(m, linear)] == [128, 128, 16]
    assert [m.out_features for m in paper.decoder if isinstance(m, linear)] == [128, 784]
    assert [m.out_features for m in code.classifier if isinstance(m, linear)] == [256, 256, 256, 10]


def test_fallback_split_has_the_paper_sizes(tmp_path: Path) -> None:
    labelled, unlabelled, validation = split_indices(60_000, tmp_path, split_seed=3)
    assert (labelled.numel(), unlabelled.numel(), validation.numel()) == (5_000, 45_000, 10_000)
    assert torch.equal(torch.cat([labelled, unlabelled, validation]).sort().values, torch.arange(60_000))
    again = split_indices(60_000, tmp_path, split_seed=3)
    other = split_indices(60_000, tmp_path, split_seed=4)
    assert torch.equal(labelled, again[0]) and not torch.equal(labelled, other[0])


def write_split_files(root: Path, labelled: np.ndarray, unlabelled: np.ndarray, validation: np.ndarray) -> None:
    """The paper's split file layout, ``root/ssvae-splits/*.npy``."""
    folder = root / "ssvae-splits"
    folder.mkdir()
    for stem, indices in (
        ("labeled_train_indx", labelled),
        ("unlabeled_train_indx", unlabelled),
        ("validation_indx", validation),
    ):
        np.save(folder / f"{stem}.npy", indices)


def test_split_files_are_used_when_present(data_dir: Path, tmp_path: Path) -> None:
    # the shared paper split when the data root has it, otherwise small split files in a generated data dir
    if (data_dir / "ssvae-splits").is_dir():
        root, num_train, sizes = data_dir, 60_000, (5_000, 45_000, 10_000)
    else:
        root, num_train, sizes = tmp_path, 120, (10, 90, 20)
        write_random_datasets(root, {"MNIST": (num_train, 20)})
        order = np.random.default_rng(5).permutation(num_train)
        write_split_files(root, order[:10].astype(np.int32), order[10:100], order[100:])  # any integer dtype
    splits = load_ssvae_splits(root)
    assert splits is not None
    assert tuple(s.numel() for s in splits) == sizes and all(s.dtype == torch.int64 for s in splits)
    assert torch.equal(torch.cat(splits).sort().values, torch.arange(num_train))  # a partition of train
    for got, expected in zip(split_indices(num_train, root, split_seed=0), splits, strict=True):
        assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="indexes image"):
        split_indices(num_train - 1, root, split_seed=0)
    # the task takes its images and labels at exactly those indices
    task = SSVAETask(SSVAEConfig(eval_limit=20), root, CPU)
    train_images, train_labels = load_images("MNIST", "train", root)
    flat = train_images.reshape(num_train, -1)
    labelled, unlabelled, validation = splits
    assert torch.equal(task.data.labelled_images, flat[labelled])
    assert torch.equal(task.data.labelled_labels, train_labels[labelled])
    assert torch.equal(task.data.unlabelled_images, flat[unlabelled])
    assert torch.equal(task.data.val_labels, train_labels[validation[:20]])


def test_generated_data_uses_a_seeded_split(tmp_path: Path) -> None:
    write_random_datasets(tmp_path, {"MNIST": (240, 30)})
    task = SSVAETask(SSVAEConfig(), tmp_path, CPU)
    data = task.data
    assert (data.labelled_labels.numel(), data.unlabelled_images.shape[0], data.val_labels.numel()) == (20, 180, 40)
    assert data.test_labels.numel() == 30


def test_sparsemax_calls_the_loss_once_on_the_support_only(data_dir: Path) -> None:
    task = make_task(data_dir, "sparsemax")
    model = sharpened_model(task, seed=0, factor=40.0)  # peaked scores so that sparsemax drops classes
    calls: list[tuple[Tensor, Tensor]] = []
    original = model.neg_elbo_given_class

    def recording(x: Tensor, z: Tensor, **kwargs: Any) -> Tensor:
        calls.append((x, z))
        return original(x, z, **kwargs)

    model.neg_elbo_given_class = recording  # type: ignore[method-assign]
    x = first_batch(task).unlabelled_x
    assert x is not None
    terms = latent_terms(task.unlabelled_problem(model, x), SparsemaxMarginal(task.latent_space()), 1.0)
    probs = sparsemax(model.classify(x), dim=-1)
    assert len(calls) == 1
    rows_x, rows_z = calls[0]
    support = (probs > 0).sum(-1)
    assert support.min() < 10, "the test needs examples with a partial support"
    assert rows_z.shape[0] == int(support.sum())
    assert torch.equal(terms.result.support, support)
    example_of_row = torch.repeat_interleave(torch.arange(x.shape[0]), support)
    assert torch.equal(rows_x, x[example_of_row])
    assert bool((probs[example_of_row, rows_z.argmax(-1)] > 0).all())


def test_softmax_neg_elbo_matches_brute_force(data_dir: Path) -> None:
    task = make_task(data_dir, "softmax")
    torch.manual_seed(1)
    model = task.build_model().double()
    x = first_batch(task).unlabelled_x
    assert x is not None
    x = x[:16].double()
    problem = task.unlabelled_problem(model, x, sample_h=False)
    terms = latent_terms(problem, SoftmaxMarginal(task.latent_space()), task.config.entropy_coef)
    probs = torch.softmax(model.classify(x), -1)
    per_class = torch.stack(
        [
            model.neg_elbo_given_class(x, F.one_hot(torch.full((16,), k), 10).double(), sample_h=False)
            for k in range(10)
        ],
        dim=1,
    )
    expected = (probs * per_class).sum(-1) + math.log(10) + (probs * probs.log()).sum(-1)
    torch.testing.assert_close(terms.bound, expected.detach(), rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(terms.loss, expected, rtol=1e-10, atol=1e-9)  # entropy_coef = 1: the -ELBO


def test_entropy_coefficient_scales_the_entropy_term(data_dir: Path) -> None:
    base, scaled = make_task(data_dir), make_task(data_dir, entropy_coef=0.25)
    torch.manual_seed(2)
    model = base.build_model().double()
    x = first_batch(base).unlabelled_x
    assert x is not None
    x = x[:8].double()
    estimator = SoftmaxMarginal(base.latent_space())
    full = latent_terms(base.unlabelled_problem(model, x, sample_h=False), estimator, base.config.entropy_coef)
    partial = latent_terms(scaled.unlabelled_problem(model, x, sample_h=False), estimator, scaled.config.entropy_coef)
    torch.testing.assert_close(partial.loss - full.loss, 0.75 * full.result.entropy)
    torch.testing.assert_close(partial.bound, full.bound)


def test_classification_loss_follows_the_estimator(data_dir: Path) -> None:
    torch.manual_seed(3)
    model = SSVAEModel()
    x = torch.bernoulli(torch.full((6, 784), 0.3))
    labels = torch.arange(6)
    scores = model.classify(x)
    sparse = make_task(data_dir, "sparsemax").labelled_terms(model, x, labels).classification
    dense = make_task(data_dir, "sfe").labelled_terms(model, x, labels).classification
    forced = make_task(data_dir, "softmax", classification_loss="sparsemax").labelled_terms(model, x, labels)
    torch.testing.assert_close(sparse, sparsemax_loss(scores, labels))
    torch.testing.assert_close(dense, F.cross_entropy(scores, labels, reduction="none"))
    torch.testing.assert_close(forced.classification, sparse)


def _total_loss(task: SSVAETask, model: SSVAEModel, estimator: Estimator[Any], batch: SSVAEBatch) -> Tensor:
    return task.train_step(model, estimator, batch).loss


def test_training_steps_reduce_the_loss_of_a_fixed_batch(data_dir: Path) -> None:
    task = make_task(data_dir, "sparsemax")
    torch.manual_seed(4)
    model = task.build_model()
    estimator = SparsemaxMarginal(task.latent_space())
    batch = first_batch(task)
    with torch.no_grad():
        before = torch.stack([_total_loss(task, model, estimator, batch) for _ in range(8)])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(25):
        optimizer.zero_grad()
        torch.autograd.backward(_total_loss(task, model, estimator, batch))
        optimizer.step()
    with torch.no_grad():
        after = torch.stack([_total_loss(task, model, estimator, batch) for _ in range(8)])
    standard_error = math.sqrt((before.var() / 8 + after.var() / 8).item())
    assert after.mean() < before.mean() - 5 * standard_error


@pytest.mark.parametrize(
    "estimator_name", ["softmax", "sparsemax", "entmax15", "sfe", "sfe+", "nvil", "sumsample", "gumbel", "stgumbel"]
)
def test_every_parameter_gets_a_finite_gradient(data_dir: Path, estimator_name: str) -> None:
    task = make_task(data_dir, estimator_name)
    estimator = load_estimator(task, estimator_name)
    torch.manual_seed(5)
    model = task.build_model()
    output = task.train_step(model, estimator, first_batch(task))
    torch.autograd.backward(output.loss)
    assert output.loss.dim() == 0 and bool(torch.isfinite(output.loss))
    assert output.support.shape == (32,) and int(output.support.max()) <= 10
    for name in ("neg_elbo", "labelled_loss", "accuracy", "entropy"):
        assert output.metrics[name].dim() == 0 and not output.metrics[name].requires_grad
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert bool(torch.isfinite(parameter.grad).all()), name


def test_warm_start_checkpoint_round_trip(data_dir: Path, tmp_path: Path) -> None:
    warm = make_task(data_dir, "sfe", labelled_only=True)
    assert warm.config.lr == 1e-3
    assert warm.steps_per_epoch() == math.ceil(warm.data.labelled_labels.shape[0] / 32)
    torch.manual_seed(6)
    model = warm.build_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for batch in warm.train_batches(torch.Generator().manual_seed(0)):
        assert batch.unlabelled_x is None
        output = warm.train_step(model, SoftmaxMarginal(warm.latent_space()), batch)
        assert torch.equal(output.support, torch.ones_like(batch.labels))
        optimizer.zero_grad()
        torch.autograd.backward(output.loss)
        optimizer.step()
    runner_checkpoint, bare = tmp_path / "checkpoint.pt", tmp_path / "bare.pt"
    torch.save({"model": model.state_dict(), "epoch": 1}, runner_checkpoint)
    torch.save(model.state_dict(), bare)
    for path in (runner_checkpoint, bare):
        loaded = make_task(data_dir, "sfe", init_checkpoint=str(path)).build_model()
        for (name, expected), (_, got) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
            assert torch.equal(expected, got), name
    with pytest.raises(ValueError, match="does not fit"):
        make_task(data_dir, init_checkpoint=str(bare), latent_dim=4).build_model()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_task(data_dir, init_checkpoint=str(tmp_path / "missing.pt")).build_model()


@pytest.mark.parametrize("estimator_name", ["softmax", "sparsemax"])
def test_evaluate_metrics(data_dir: Path, estimator_name: str) -> None:
    task = make_task(data_dir, estimator_name, eval_batch_size=50)
    estimator = load_estimator(task, estimator_name)
    torch.manual_seed(7)
    model = task.build_model()
    metrics = task.evaluate(model, estimator, "val")
    assert set(metrics) == {"accuracy", "neg_elbo", "decoder_calls"}
    assert 0.0 <= metrics["accuracy"] <= 1.0 and math.isfinite(metrics["neg_elbo"])
    assert 1.0 <= metrics["decoder_calls"] <= 10.0
    if estimator_name == "softmax":
        assert metrics["decoder_calls"] == 10.0
    assert task.evaluate(model, estimator, "val") == metrics  # seeded binarization and h noise
    assert model.training and estimator.training
    test_metrics = task.evaluate(model, estimator, "test", final=True)
    assert 0.0 <= test_metrics["accuracy"] <= 1.0 and math.isfinite(test_metrics["neg_elbo"])


def test_monte_carlo_estimators_are_evaluated_under_the_dense_softmax(data_dir: Path) -> None:
    task = make_task(data_dir, "sfe")  # one evaluation batch: the seeded noise matches the softmax run
    estimator = load_estimator(task, "sfe")
    torch.manual_seed(8)
    model = task.build_model()
    state = {name: value.clone() for name, value in estimator.state_dict().items()}
    metrics = task.evaluate(model, estimator, "val")
    reference = task.evaluate(model, SoftmaxMarginal(task.latent_space()), "val")
    assert metrics["neg_elbo"] == reference["neg_elbo"] and metrics["accuracy"] == reference["accuracy"]
    assert metrics["decoder_calls"] == 1.0
    for name, value in estimator.state_dict().items():
        assert torch.equal(value, state[name]), name


class _PluginSparsemax(MarginalizingEstimator[EstimatorConfig]):
    """A third-party-style exact estimator: sparsemax of the scores, defined outside the package."""

    supported_spaces = (Categorical,)

    def distribution(self, scores: Tensor) -> SparseDistribution:
        return dense_to_sparse(sparsemax(scores, dim=-1), self.space)


def test_a_plugin_marginalizing_estimator_is_evaluated_under_its_own_distribution(data_dir: Path) -> None:
    task = make_task(data_dir, "sparsemax")
    # a sharper classifier: sparsemax then differs clearly from the softmax fallback
    model = sharpened_model(task, seed=9, factor=20.0)
    metrics = task.evaluate(model, _PluginSparsemax(task.latent_space()), "val")
    assert metrics == task.evaluate(model, SparsemaxMarginal(task.latent_space()), "val")
    assert metrics["decoder_calls"] < 10.0
    softmax = task.evaluate(model, SoftmaxMarginal(task.latent_space()), "val")
    assert metrics["neg_elbo"] != pytest.approx(softmax["neg_elbo"], rel=1e-3)


def test_paper_settings_follow_the_paper() -> None:
    expected = {"sfe": 1e-4, "sfe+": 1e-4, "nvil": 1e-3, "sumsample": 1e-3, "gumbel": 1e-3, "stgumbel": 1e-3}
    expected |= {"softmax": 1e-3, "sparsemax": 5e-4, "entmax15": 1e-3, "rloo": 1e-3}
    for name, lr in expected.items():
        config, _ = resolve_config(SSVAETask, name)
        assert (config.lr, config.batch_size, config.entropy_coef) == (lr, 64, 1.0), name
        assert config.classification_loss == ("sparsemax" if name == "sparsemax" else "nll"), name
        warm, _ = resolve_config(SSVAETask, name, {"labelled_only": True})
        assert warm.lr == 1e-3, name  # the warm start's lr for every estimator
    assert resolve_config(SSVAETask, "stgumbel")[1] == {"decay_rate": 1e-4, "update_every": 1000}
    assert resolve_config(SSVAETask, "sfe")[1] == {}
    assert SSVAETask.default_epochs == 200
    unset = SSVAEConfig()
    assert (unset.batch_size, unset.entropy_coef, unset.classification_loss) == (64, 1.0, "nll")
    assert resolve_config(SSVAETask, "softmax", {"entropy_coef": 0.0})[0].entropy_coef == 0.0
    assert resolve_config(SSVAETask, "sparsemax", {"classification_loss": "nll"})[0].classification_loss == "nll"


def test_save_artifacts_writes_a_png(data_dir: Path, tmp_path: Path) -> None:
    task = make_task(data_dir)
    paths = task.save_artifacts(task.build_model(), SoftmaxMarginal(task.latent_space()), tmp_path / "out")
    assert len(paths) == 1 and paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("latent_dim", 0, "latent_dim must be an int >= 1"),
        ("vae_layers", 1.5, "vae_layers must be an int >= 1"),
        ("classifier_hidden", True, "classifier_hidden must be an int >= 1"),
        ("labelled_only", "yes", "labelled_only must be True or False"),
        ("init_checkpoint", "", "init_checkpoint must be a non-empty path"),
        ("classification_loss", "hinge", "classification_loss must be one of nll, sparsemax"),
        ("split_seed", -1, "split_seed must be an int >= 0"),
        ("eval_batch_size", 0, "eval_batch_size must be an int >= 1"),
        ("batch_size", 0, "batch_size must be an int >= 1"),
    ],
)
def test_config_validators(field: str, value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message) as error:
        SSVAEConfig(**{field: value})
    assert repr(value) in str(error.value)


def test_model_type_is_checked(data_dir: Path) -> None:
    task = make_task(data_dir)
    with pytest.raises(TypeError, match="needs an SSVAEModel"):
        task.train_step(torch.nn.Linear(2, 2), SoftmaxMarginal(task.latent_space()), first_batch(task))
