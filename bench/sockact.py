#!/usr/bin/env python3
"""Start a server with systemd-style socket activation.

    sockact.py --unix PATH -- CMD [ARGS...]
    sockact.py --tcp HOST:PORT -- CMD [ARGS...]      (PORT 0: the kernel picks one)

Binds and listens on the socket, prints the NBD URI of that socket as one line
on stdout, then execs CMD in this same process with the socket as fd 3 and
LISTEN_FDS=1, LISTEN_PID=<this pid>.  Because the socket is listening before
the line is printed, a client may connect as soon as it reads the line: the
kernel queues the connection until the server accepts it.  Because of the exec,
the PID that started this helper is the server's PID.
"""

import argparse
import os
import socket
import sys


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--unix", metavar="PATH")
    where.add_argument("--tcp", metavar="HOST:PORT")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        ap.error("no command given after --")

    if args.unix:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if os.path.exists(args.unix):
            os.unlink(args.unix)
        sock.bind(args.unix)
        uri = f"nbd+unix:///?socket={args.unix}"
    else:
        host, _, port = args.tcp.rpartition(":")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, int(port)))
        uri = f"nbd://{host}:{sock.getsockname()[1]}/"
    sock.listen(128)

    fd = sock.detach()
    if fd != 3:
        os.dup2(fd, 3)
        os.close(fd)
    os.set_inheritable(3, True)
    os.environ["LISTEN_FDS"] = "1"
    os.environ["LISTEN_PID"] = str(os.getpid())
    os.environ.pop("LISTEN_FDNAMES", None)

    print(uri, flush=True)
    try:
        os.execvp(cmd[0], cmd)
    except OSError as e:
        sys.exit(f"sockact.py: cannot exec {cmd[0]}: {e}")


if __name__ == "__main__":
    main()
