"""Team tracking: the pipeline against `mlflow server` on a real PostgreSQL, artifacts proxied.

The end-to-end test starts PostgreSQL from the Debian binaries (`make test` installs the package
as root: Makefile DEB_PACKAGES) and `mlflow server` on loopback, runs `tfstack run
tracking=server` in a shrunk copy of the project and reads the run, its artifacts and its model
back through the server, as a teammate on another machine would. The server serves artifacts
itself (MLflow 3's default proxied artifact access), so nothing is written beside the project.
The fast tests cover `tracking=server` composition, the SLURM launcher config, and
check_reachable's answers to a proxy whose tracking server is down.
"""

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from test_pipeline import _sh, assert_complete_run, project  # noqa: F401 (project: a fixture)

from tfstack import pipeline, tracking
from tfstack.errors import TrackingError
from tfstack.pipeline.compose import compose

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Bounded waits: PostgreSQL starts in well under a second here, `mlflow server` in about 6 s
# (creating its schema in a fresh database included).
POSTGRES_START_TIMEOUT_S = 30
MLFLOW_START_TIMEOUT_S = 90


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.is_file() else "(no log)"


def _postgres_bindir() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin holding initdb (Debian's layout)."""
    found = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")]
    if not found:
        return None
    return max(found, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)


@pytest.fixture
def postgres():
    """A PostgreSQL server on 127.0.0.1 with an empty database `mlflow`; yields its SQLAlchemy URL.

    PostgreSQL refuses to run as root, so as root it runs as the `postgres` user the Debian
    package creates. Its directory is a fresh one under the system temp dir rather than
    tmp_path: pytest makes its base temp dir private to the user running the tests (mode 0700),
    which the `postgres` user could not enter, and the socket path must stay short.
    """
    bindir = _postgres_bindir()
    if bindir is None:
        if os.geteuid() != 0:
            pytest.skip(
                "PostgreSQL is not installed and this is not root: install it with "
                "`sudo apt-get install postgresql` (or run `make test` as root, which does)"
            )
        pytest.fail(
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb). `make test` "
            "installs it as root (Makefile DEB_PACKAGES); or run: apt-get install -y postgresql"
        )
    as_user: list[str] = []
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.fail("no `postgres` user: reinstall the package (apt-get install postgresql)")
        as_user = ["runuser", "-u", "postgres", "--"]
    home = Path(tempfile.mkdtemp(prefix="tfstack-pg-"))
    if as_user:
        os.chown(home, owner.pw_uid, owner.pw_gid)
    data, log, port = home / "data", home / "postgres.log", _free_port()

    def pg(*cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*as_user, str(bindir / cmd[0]), *cmd[1:]],
            cwd=home,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    try:
        done = pg("initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync")
        assert done.returncode == 0, f"initdb failed:\n{done.stdout}\n{done.stderr}"
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {home} -c fsync=off"
        done = pg(
            "pg_ctl",
            *("-D", str(data), "-l", str(log), "-o", options),
            *("-w", "-t", str(POSTGRES_START_TIMEOUT_S), "start"),
            timeout=POSTGRES_START_TIMEOUT_S + 10,
        )
        assert done.returncode == 0, f"pg_ctl start failed:\n{done.stderr}\n{_tail(log)}"
        import psycopg2  # the driver `mlflow server` uses (postgresql+psycopg2://)

        connection = psycopg2.connect(host="127.0.0.1", port=port, user="postgres")
        connection.autocommit = True  # CREATE DATABASE cannot run in a transaction
        with connection.cursor() as cursor:
            cursor.execute("CREATE DATABASE mlflow")
        connection.close()
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/mlflow"
    finally:
        if (data / "postmaster.pid").exists():
            stopped = pg("pg_ctl", "-D", str(data), "-m", "immediate", "-t", "30", "stop")
            if stopped.returncode != 0 and (data / "postmaster.pid").exists():
                postmaster = int((data / "postmaster.pid").read_text().split()[0])
                os.kill(postmaster, signal.SIGKILL)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def mlflow_server(postgres, tmp_path):
    """`mlflow server` on 127.0.0.1 with the PostgreSQL store; yields (uri, artifacts dir)."""
    artifacts = tmp_path / "mlflow-artifacts"
    log = tmp_path / "mlflow-server.log"
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING")}
    command = [
        str(VENV_BIN / "mlflow"),
        "server",
        *("--backend-store-uri", postgres),
        *("--artifacts-destination", str(artifacts)),
        *("--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
    ]
    with open(log, "wb") as log_file:
        server = subprocess.Popen(
            command,
            cwd=tmp_path,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: teardown stops its workers too
        )
    try:
        deadline = time.monotonic() + MLFLOW_START_TIMEOUT_S
        while True:
            if server.poll() is not None:
                pytest.fail(f"mlflow server exited with {server.returncode}:\n{_tail(log)}")
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"mlflow server not up within {MLFLOW_START_TIMEOUT_S} s:\n{_tail(log)}"
                )
            time.sleep(0.2)
        yield uri, artifacts
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=15)


@pytest.mark.slow
def test_pipeline_logs_a_complete_run_to_mlflow_server_on_postgres(project, mlflow_server):  # noqa: F811
    uri, artifacts_dir = mlflow_server
    out = _sh(project, "tfstack", "run", "tracking=server", f"tracking.uri={uri}").stdout

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("tfstack")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert f"MLflow run   {run.info.run_id}  ({uri})" in out
    assert_complete_run(client, run, epochs=1, freeze="frozen")
    assert run.data.params["tracking.uri"] == uri
    assert len(run.data.tags["git_commit"]) == 40
    # Proxied artifacts: the client uploaded through the server into its destination, and
    # nothing landed beside the project.
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
    stored = artifacts_dir / experiment.experiment_id / run.info.run_id / "artifacts"
    for name in ("evaluation/confusion_matrix.png", "evaluation/learning_curve.png"):
        assert (stored / name).read_bytes()[:8] == PNG_MAGIC
    assert (stored / "shapes" / "stacked_layers.json").is_file()
    assert not [
        p.name for p in project.iterdir() if p.name.startswith(("mlflow", "mlruns", "mlart"))
    ]

    # The model (a LoggedModel, stored under the server's artifacts) loads through the server.
    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    try:
        models = mlflow.search_logged_models(
            experiment_ids=[experiment.experiment_id],
            # The TensorFlow flavor; the run's pyfunc `classifier` is tests/test_classnames.py's.
            filter_string=f"source_run_id = '{run.info.run_id}' AND name = 'model'",
            output_format="list",
        )
        assert len(models) == 1 and models[0].artifact_location.startswith("mlflow-artifacts:/")
        x = np.load(project / "outputs" / "prepare" / "target.npz")["x_test"][:4]
        keras_model = mlflow.tensorflow.load_model(f"models:/{models[0].model_id}")
        assert keras_model.predict(x, verbose=0).shape == (4, 5)
        via_run = mlflow.tensorflow.load_model(f"runs:/{run.info.run_id}/model")
        np.testing.assert_allclose(
            via_run.predict(x, verbose=0), keras_model.predict(x, verbose=0), rtol=1e-6
        )
    finally:
        mlflow.set_tracking_uri(previous)

    # Another process reopens the same run through the server (as a later DVC stage does).
    out = _sh(project, "tfstack", "evaluate", "tracking=server", f"tracking.uri={uri}").stdout
    assert run.info.run_id in out
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [run.info.run_id]
    assert runs[0].info.status == "FINISHED"
    assert len(client.get_metric_history(run.info.run_id, "stage_seconds_evaluate")) == 2


def test_tracking_server_config_points_at_a_server_uri():
    config = compose(["tracking=server"], config_dir=ROOT / "conf")
    assert config.tracking.enabled and config.tracking.log_model
    assert config.tracking.uri == "http://127.0.0.1:5000"
    assert config.tracking.experiment == "tfstack"
    config = compose(
        ["tracking=server", "tracking.uri=http://mlflow.lan:8080"], config_dir=ROOT / "conf"
    )
    # Used as given: not turned into a sqlite path under the project.
    assert pipeline.tracking_uri(config, ROOT) == "http://mlflow.lan:8080"


def test_slurm_launcher_config_composes():
    """Only the composition: no SLURM here (submitting needs `sbatch` and a cluster)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        cfg = hydra_compose(
            config_name="config",
            overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "tracking=server"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_ == (
        "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    )
    assert launcher.partition == "gpu"
    assert launcher.timeout_min > 0 and launcher.cpus_per_task >= 1
    assert launcher.submitit_folder.endswith("/.submitit/%j")  # inside the sweep directory


class _Answer(BaseHTTPRequestHandler):
    """Answers every request with the status code in the server's `status` attribute."""

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.send_response(self.server.status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_POST = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def answering_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Answer)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        # A proxy whose tracking server is down: MLflow would retry for minutes (measured 251 s).
        (503, "answered HTTP 503"),
        (502, "answered HTTP 502"),
        (429, "answered HTTP 429"),
        (404, "no MLflow tracking server is at this address"),
    ],
)
def test_server_answers_that_mlflow_would_retry_fail_fast(answering_server, status, expected):
    answering_server.status = status
    uri = f"http://127.0.0.1:{answering_server.server_address[1]}"
    start = time.monotonic()
    with pytest.raises(TrackingError) as excinfo:
        tracking.start_run(uri, "tfstack-test")
    assert time.monotonic() - start < 5
    message = str(excinfo.value)
    assert message.startswith(f"tracking.uri={uri} is unreachable: ") and expected in message


@pytest.mark.parametrize("status", [200, 401, 403])
def test_server_answers_that_fail_fast_in_mlflow_count_as_reachable(answering_server, status):
    answering_server.status = status
    tracking.check_reachable(f"http://127.0.0.1:{answering_server.server_address[1]}")
