"""`python -m livestage.devstack` (`make up`): the whole stack on loopback until Ctrl-C."""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

from livestage.devstack.stack import LocalStack


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
        print(f"nats:    {stack.nats.url}")
        print(f"redis:   {stack.redis.url}")
        print(f"session: {stack.session_address} (gRPC SessionService)")
        print(f"playground: http://127.0.0.1:{stack.playground_port}/ (open a session, talk to it)")
        print(f"logs:    {args.workdir / 'logs'}")
        print("Ctrl-C stops everything.", flush=True)
        stop.wait()
    finally:
        stack.stop()
        print("stopped.")


if __name__ == "__main__":
    main()
