"""The child process of ``rerank serve``: Ray's ``serve run CONFIG``, watched until it fails or stops.

``serve run`` with a config file submits the applications and then waits forever, even when one
of them can never start (``DEPLOY_FAILED``: its replicas' constructors failed on every attempt).
This runs the same ``serve run`` command with ``--non-blocking`` in this process, which stays the
driver of the Ray cluster it connected to or started, then polls ``serve.status()`` every second:

* an application ``DEPLOY_FAILED``: Serve is shut down and one ``rerank: error: ...`` line names
  the application, the failed deployment and the last line of its error; exit status 1;
* every application ``RUNNING``: one ``rerank: ready ...`` line on stdout, once;
* SIGINT (Ctrl-C, passed on by ``rerank serve``): Serve is shut down; exit status 0.

Run as ``python -m rerank_cli.serve_child run CONFIG --address ADDRESS``: ``serve run``'s arguments.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from .errors import one_line

POLL_S = 1.0
FAILED = "DEPLOY_FAILED"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    interrupted: list[int] = []

    def on_sigint(signum, frame):
        interrupted.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)
    from ray import serve
    from ray.serve.scripts import cli

    try:
        try:
            cli.main([*argv, "--non-blocking"], prog_name="serve", standalone_mode=False)
        except SystemExit as e:
            # `serve run` exits early only when interrupted or when the submission failed (it has
            # printed why, then exits with status 0 even so).
            return 0 if interrupted else (e.code if isinstance(e.code, int) and e.code else 1)
        except Exception as e:  # noqa: BLE001 - an invalid config, a cluster that did not start, ...
            print(f"rerank: error: serve run failed: {one_line(f'{type(e).__name__}: {e}')}",
                  file=sys.stderr, flush=True)
            _exit_after_failed_start(1)
        failure = watch(serve.status)
        serve.shutdown()
        print(f"rerank: error: {failure}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        serve.shutdown()
        return 0


def _exit_after_failed_start(code: int) -> None:
    """Stop what Ray started, then exit at once.

    A driver whose ``ray.init`` failed half-way (a node that timed out during start-up) was seen
    spinning in the interpreter's final garbage collection for minutes, its Ray processes still
    alive: so shut Ray down explicitly and skip the interpreter's finalization.
    """
    import ray

    try:
        ray.shutdown()
    except Exception:  # noqa: BLE001 - exiting anyway; the processes share this one's fate
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def watch(status, poll_s: float = POLL_S) -> str:
    """Poll ``status()`` (``serve.status``) until an application fails; return the reason, one line."""
    announced = False
    while True:
        applications = status().applications
        for name, app in applications.items():
            if app.status == FAILED:
                return failure_line(name, app)
        if not announced and applications and all(app.status == "RUNNING" for app in applications.values()):
            print(f"rerank: ready: application(s) {', '.join(applications)} RUNNING", flush=True)
            announced = True
        time.sleep(poll_s)


def failure_line(name: str, app) -> str:
    """``application NAME failed to deploy: deployment D: <the last line of its error>``."""
    for deployment_name, deployment in app.deployments.items():
        if deployment.status in ("DEPLOY_FAILED", "UNHEALTHY") and deployment.message:
            return (f"application {name!r} failed to deploy: deployment {deployment_name!r}: "
                    f"{_last_line(deployment.message)}")
    return f"application {name!r} failed to deploy: {_last_line(app.message) or 'no reason given'}"


def _last_line(message: str) -> str:
    """The last non-blank line of ``message``: for a traceback, the exception and its message."""
    lines = [line.strip() for line in (message or "").splitlines() if line.strip()]
    return one_line(lines[-1]) if lines else ""


if __name__ == "__main__":
    sys.exit(main())
