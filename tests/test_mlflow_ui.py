"""The MLflow UI as a researcher opens it, checked in a real browser: headless Chromium (Debian's ``chromium``,
which ``.ci/run`` installs) renders a real ``mlflow server`` on loopback holding two lvzoo runs. The page the runner
prints (``MLflow UI: ...``) shows the runs table with each run's dataset, not MLflow 3's empty GenAI overview; the
compare view of the two runs shows their params and metrics."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote

import pytest
from mlflow.tracking import MlflowClient

from lvzoo.runners import train
from lvzoo.runners.callbacks import ML_VIEW
from tests.datasets import write_random_datasets

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
OVERRIDES = {"train_limit": 48, "eval_limit": 24, "is_samples": 2, "final_is_samples": 2, "bits": 8}


class _Text(HTMLParser):
    """The visible text of a DOM dump (no style, script or svg contents)."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = 0
        self.parts: list[str] = []

    def handle_starttag(self, tag: str, attrs: object) -> None:
        self.hidden += tag in ("style", "script", "svg")

    def handle_endtag(self, tag: str) -> None:
        self.hidden -= tag in ("style", "script", "svg")

    def handle_data(self, data: str) -> None:
        if not self.hidden and data.strip():
            self.parts.append(data.strip())


def rendered_text(url: str) -> str:
    """What the page at ``url`` shows once its scripts have run (10 s of virtual time)."""
    assert CHROMIUM is not None, "the browser test needs Debian's chromium (apt-get install chromium), as .ci/run does"
    done = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000", "--dump-dom", url],
        capture_output=True, text=True, timeout=120,
    )
    parser = _Text()
    parser.feed(done.stdout)
    return " | ".join(parser.parts)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("mlflow_server")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")],
        cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.read().strip() == b"OK":
                        break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(process.pid, 9)
        process.wait(timeout=30)


def test_experiment_page_and_compare_view(server: str, workdir: Path) -> None:
    data = workdir / "data"
    write_random_datasets(data, {"FashionMNIST": (5100, 40)})
    results = [
        train("bitvec", name, overrides=OVERRIDES, epochs=1, data_dir=data, tracking_uri=server)
        for name in ("sfe", "sfe+")
    ]
    client = MlflowClient(server)
    experiment_id = client.get_run(results[0].run_id).info.experiment_id
    assert results[0].ui_url == f"{server}/#/experiments/{experiment_id}/runs/{results[0].run_id}?{ML_VIEW}"

    page = rendered_text(f"{server}/#/experiments/{experiment_id}/runs?{ML_VIEW}")
    assert "Runs - Experiment" in page and "Bit-vector VAE on Fashion-MNIST" in page  # the experiment description
    assert "sfe-0" in page and "sfe+-0" in page
    assert "FashionMNIST (" in page and "training" in page  # each run's dataset input, with its digest
    assert "No data" not in page

    run_page = rendered_text(results[0].ui_url or "")
    assert "runner (lvzoo)" in run_page and "val_neg_elbo" in run_page  # the run's Source and its metrics

    runs = quote(json.dumps([result.run_id for result in results]))
    compare = rendered_text(f"{server}/#/compare-runs?runs={runs}&experiments={quote(json.dumps([experiment_id]))}")
    assert "sfe-0" in compare and "sfe+-0" in compare
    assert "task.lr" in compare and "estimator.baseline" in compare and "test_neg_elbo" in compare
