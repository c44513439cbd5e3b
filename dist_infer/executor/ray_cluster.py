"""The Ray cluster that the Ray executor and named services run on: joined when named, else private.

- **Join** an existing cluster only when told to: an explicit address (``--ray-address`` /
  ``ray_address=``) or ``RAY_ADDRESS`` in the environment (Ray jobs set it for their drivers). Nothing probes
  ``address="auto"``: on a shared machine that would hand our work to whatever cluster someone else runs.
- **Start** a private local instance otherwise: every Ray process (GCS, raylet, dashboard agent, workers)
  listens on 127.0.0.1 only, and Ray's token authentication is on, so no other host can reach it and no
  client without the token can use it.

The token is Ray's own (``RAY_AUTH_TOKEN``, else the file ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``);
when none exists a fresh one (256 random bits, like ``ray get-auth-token --generate``) is written where Ray
will look, readable by its owner only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from pathlib import Path

logger = logging.getLogger("dist_infer.ray")

AUTH_MODE_ENV, TOKEN_ENV, TOKEN_PATH_ENV = "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"
# Ray reads this at import and at node start: with clusters "disabled" it takes loopback as the node address,
# and its servers then bind 127.0.0.1 instead of every interface.
_CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def token_path() -> Path:
    """Where Ray reads its token file: ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``."""
    return Path(os.environ.get(TOKEN_PATH_ENV) or Path.home() / ".ray" / "auth_token").expanduser()


def ensure_auth_token() -> Path | None:
    """Makes sure Ray finds a token; writes a new one when none exists. Returns the file (None: from the env)."""
    if os.environ.get(TOKEN_ENV):
        return None
    path = token_path()
    if not (path.is_file() and path.read_text().strip()):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        logger.info("wrote a new Ray authentication token to %s", path)
    return path


def enable_token_auth() -> None:
    """Token authentication for this process and the Ray processes it starts."""
    from ray._raylet import AuthenticationTokenLoader, Config

    ensure_auth_token()
    os.environ[AUTH_MODE_ENV] = "token"
    # Ray caches its config and token at first use; refresh both so a Ray already imported sees token mode.
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@contextlib.contextmanager
def _loopback_only():
    from ray._private import ray_constants

    saved_env, saved_flag = os.environ.get(_CLUSTER_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_CLUSTER_ENV] = "0"  # for the GCS, raylet and agents this driver starts
    ray_constants.ENABLE_RAY_CLUSTER = False  # for this driver, whose Ray was imported before
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(_CLUSTER_ENV, None)
        else:
            os.environ[_CLUSTER_ENV] = saved_env


def start_private(num_cpus: int | None = None, **init_kwargs) -> None:
    """A local Ray instance on 127.0.0.1 with token authentication (``ray.shutdown()`` stops it)."""
    import ray

    enable_token_auth()
    with _loopback_only():
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, **init_kwargs)
    gcs = ray.get_runtime_context().gcs_address
    if not gcs.startswith(("127.", "[::1]", "localhost")):  # never hand a reachable cluster to the user silently
        ray.shutdown()
        raise RuntimeError(f"the private Ray instance came up on {gcs}, not on loopback; refusing to use it")


def connect(address: str | None = None, *, num_cpus: int | None = None, start_local: bool = True) -> bool:
    """Joins the cluster at ``address`` or ``$RAY_ADDRESS``; else starts a private one (``start_local``).

    Returns True when it started the instance, which the caller then stops with ``ray.shutdown()``."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        # Without a token a token-protected cluster would refuse us with a less helpful message.
        if os.environ.get(AUTH_MODE_ENV, "").lower() == "token" and not os.environ.get(TOKEN_ENV) \
                and not token_path().is_file():
            raise RuntimeError(f"RAY_AUTH_MODE=token but no Ray token is here: copy the cluster's token to "
                               f"{token_path()} (or set {TOKEN_ENV} / {TOKEN_PATH_ENV})")
        ray.init(address=address, log_to_driver=False)
        return False
    if not start_local:
        raise RuntimeError("no Ray cluster was named: pass --ray-address (ray_address=...) or set RAY_ADDRESS to "
                           "the cluster to use")
    start_private(num_cpus)
    return True
