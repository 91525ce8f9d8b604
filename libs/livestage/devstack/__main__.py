"""`python -m livestage.devstack` (`make up`): the whole stack on loopback until Ctrl-C."""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path
from urllib.parse import urlsplit

from livestage.devstack.stack import LocalStack


def _host_port(url: str) -> str:
    """`host:port` of a URL, without the user and password it may carry."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)


def banner(stack: LocalStack) -> list[str]:
    """What `make up` prints: where everything is, and no password or key (the dev key is named
    by its file; the playground link carries a one-time ticket, not the key)."""
    lines = [f"nats:    {_host_port(stack.nats.url)}" if stack.nats else "nats:    -",
             f"redis:   {_host_port(stack.redis.url)}" if stack.redis else "redis:   -",
             f"session: {stack.session_address} (gRPC SessionService, needs an API key)"]
    creds = stack.credentials
    if creds is not None and creds.api_key_file is not None:
        lines.append(f"api key: {creds.api_key_file} (the dev tenant's key: "
                     f"`authorization: Bearer $(cat {creds.api_key_file})`)")
    else:
        lines.append("api key: the tenants file is the operator's (LIVESTAGE_TENANTS_FILE): use one of its keys")
    login_url = stack.playground_login_url
    if stack.playground and login_url:
        once = " (a one-time link that logs this browser in)" if "ticket=" in login_url else " (log in with a key)"
        lines.append(f"playground: {login_url}{once}")
    lines.append(f"logs:    {stack.workdir / 'logs'}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--generators", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=Path(".work/stack"))
    parser.add_argument("--playground-port", type=int, default=8080)
    parser.add_argument("--no-conversation", action="store_true", help="only the video pipeline")
    args = parser.parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stack = LocalStack(args.workdir, preset=args.preset, generators=args.generators,
                       conversation=not args.no_conversation, playground=True,
                       playground_port=args.playground_port).start()
    try:
        print("\n".join(banner(stack)))
        print("Ctrl-C stops everything.", flush=True)
        stop.wait()
    finally:
        stack.stop()
        print("stopped.")


if __name__ == "__main__":
    main()
