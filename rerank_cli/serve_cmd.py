"""``rerank serve``: run the Serve application locally with ``serve run`` as a child process.

The config (``configs/serve-cpu.yaml`` by default) is never edited: it is loaded, patched with
``--model``/``--hub``/``--cache-dir`` (first model) and ``--port``/``--host``, and written to a temporary file that ``serve run`` reads.

Before Ray starts, every model source of the config is resolved on this machine (a registry name
or hub id is downloaded, or found in the cache) and the temporary config names the local
directory: a source that cannot be resolved is one ``rerank: error:`` line and exit status 1,
within seconds. (With ``--address`` naming a running cluster, sources are left to its nodes.)
The child (:mod:`rerank_cli.serve_child`) is ``serve run`` watched: an application that fails to
deploy ends it with status 1 and one line naming the cause, instead of a service that never starts.

``serve run`` gets ``--address local`` unless ``--address`` or ``$RAY_ADDRESS`` names a cluster:
it then starts a new local Ray cluster (never joining one that ``ray start`` left running) and
shuts Serve and that cluster down when it gets SIGINT. So the child runs in its own session
(a terminal's Ctrl-C reaches only this process, which passes it on exactly once), and the first
SIGINT, SIGTERM or SIGHUP this process receives is sent to the child as SIGINT; any further one
is sent as SIGTERM. On Linux the child also gets SIGINT if this process dies. If ``serve run``
dies without shutting down (SIGTERM, SIGKILL), Ray's fate sharing still stops the processes of
the cluster it started.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from rerank_core import registry

from .errors import UsageError

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def configs_dir() -> Path:
    """The repository's ``configs/`` folder, next to the ``rerank_cli`` package."""
    import rerank_cli

    return Path(rerank_cli.__file__).resolve().parent.parent / "configs"


def default_config() -> Path:
    return configs_dir() / "serve-cpu.yaml"


def serve(args: argparse.Namespace) -> int:
    config_path = Path(args.config).expanduser() if args.config else default_config()
    if not config_path.is_file():
        where = "" if args.config else " (the default; pass a CONFIG path, e.g. configs/serve-cpu.yaml)"
        raise UsageError(f"config file {config_path} not found{where}")
    config = load_config(config_path)
    model = first_model(config, config_path)
    if args.model is not None:
        model["source"] = checked_source(args.model)
    for key in ("hub", "cache_dir"):
        if getattr(args, key, None) is not None:
            model[key] = getattr(args, key)
    http = config.get("http_options") or {}
    if not isinstance(http, dict):
        raise UsageError(f"{config_path}: http_options must be a mapping")
    config["http_options"] = http
    if args.port is not None:
        http["port"] = args.port
    if args.host is not None:
        http["host"] = args.host

    address = args.address or os.environ.get("RAY_ADDRESS") or "local"
    if address == "local":
        resolve_sources(config)
    patched = write_temp_config(config)
    try:
        url = f"http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}{_route_prefix(config)}"
        print(f"rerank: serving {config_path} with model source {model.get('source')!r} at {url} "
              f"(Ctrl-C to stop)", flush=True)
        env = local_cluster_env() if address == "local" else None
        return run_child([*serve_command(), "run", str(patched), "--address", address], env=env)
    finally:
        patched.unlink(missing_ok=True)


def resolve_sources(config: dict) -> None:
    """Replace each model's ``source`` in ``config`` by its local directory, downloading if needed.

    Models are ``applications[*].args.models[*]`` entries; their ``hub``/``cache_dir`` apply.

    Raises:
        ModelSourceError: a source cannot be resolved; the message names the model, the
            application, and what can work instead.
    """
    for application in config.get("applications") or []:
        app_args = application.get("args") if isinstance(application, dict) else None
        models = app_args.get("models") if isinstance(app_args, dict) else None
        for model in models if isinstance(models, list) else []:
            if not isinstance(model, dict) or not isinstance(model.get("source"), str):
                continue  # left to the application's own validation, which names the key
            try:
                path = registry.resolve_source(model["source"], hub=model.get("hub"), cache_dir=model.get("cache_dir"))
            except registry.ModelSourceError as e:
                raise registry.ModelSourceError(
                    f"model {model.get('name', model['source'])!r} of application "
                    f"{application.get('name', 'default')!r}: {e}"
                ) from e
            model["source"] = str(path.resolve())


def load_config(path: Path) -> dict:
    import yaml

    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise UsageError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from e
    if not isinstance(config, dict):
        raise UsageError(f"{path} is not a Serve config (expected a mapping at the top)")
    return config


def first_model(config: dict, path: Path) -> dict:
    """``applications[0].args.models[0]`` of ``config``, the entry ``--model`` patches."""
    try:
        model = config["applications"][0]["args"]["models"][0]
    except (KeyError, IndexError, TypeError):
        model = None
    if not isinstance(model, dict):
        raise UsageError(f"{path} has no applications[0].args.models[0] entry to serve")
    return model


def checked_source(source: str) -> str:
    """``source`` made absolute if it is a local directory; unknown sources are rejected now."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise registry.ModelSourceError(f"{path} is a directory but holds no config.json checkpoint")
        return str(path.resolve())
    if registry.resolve_hub_id(source) is None:
        registry.resolve_source(source)  # raises ModelSourceError naming the known sources
    return source


def write_temp_config(config: dict) -> Path:
    import yaml

    fd, name = tempfile.mkstemp(prefix="rerank-serve-", suffix=".yaml")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    return Path(name)


def serve_command() -> list[str]:
    """Ray's ``serve`` CLI, watched (:mod:`rerank_cli.serve_child`), run by this interpreter."""
    return [sys.executable, "-m", "rerank_cli.serve_child"]


# Settings of a Ray cluster that ``rerank serve`` starts itself (address "local"), unless the
# environment sets them. Serve's controller runs its control loop every 0.1 s by default; idle, it
# then used 4.3 % of a core and the GCS it talks to 2.2 % on a 2-core AMD EPYC, taken from the
# model replica's compute threads. Every 1 s: 1.5 % and 0.8 % (docs/benchmarks.md, "Serving").
# Deployments react up to a second later (start-up, health, autoscaling decisions, which are
# made on metrics pushed every 10 s anyway).
LOCAL_CLUSTER_ENV = {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "1"}


def local_cluster_env(environ=None) -> dict[str, str]:
    """``environ`` (default: this process's) with :data:`LOCAL_CLUSTER_ENV` where it sets nothing."""
    environ = dict(os.environ if environ is None else environ)
    return {**LOCAL_CLUSTER_ENV, **environ}


def run_child(command: list[str], env: dict[str, str] | None = None) -> int:
    """Run ``command``, passing signals on as described in the module docstring; its exit code."""
    child = subprocess.Popen(command, start_new_session=True, preexec_fn=_prepare_child, env=env)
    received = []

    def forward(signum, frame):
        received.append(signum)
        if child.poll() is None:
            child.send_signal(signal.SIGINT if len(received) == 1 else signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in FORWARDED_SIGNALS}
    try:
        code = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return code if code >= 0 else 128 - code


def _prepare_child() -> None:
    """In the child, before exec: make SIGINT reach ``serve run`` and, on Linux, have it sent
    when this process dies.

    SIGINT is reset to its default because an ignored SIGINT (a job started with ``&`` from a
    script, ``nohup``) would be inherited, and Python then never raises KeyboardInterrupt.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGINT, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _route_prefix(config: dict) -> str:
    try:
        prefix = config["applications"][0].get("route_prefix") or "/"
    except (KeyError, IndexError, TypeError, AttributeError):
        prefix = "/"
    return prefix
