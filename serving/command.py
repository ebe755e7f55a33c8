"""``widedeep serve``: the real ``tensorflow_model_server`` when it is on PATH, else the built-in
server, both with TF Serving's flags (:mod:`serving.flags`).

``python -m serving.command ARGS`` is the same command without the rest of the CLI: the release
gate's server process (:mod:`serving.release.server_process`) runs it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from serving import tfserving
from serving.flags import BUILTIN_FLAG


def serve(argv: Sequence[str]) -> int:
    """``widedeep serve``: the real server when it is on PATH (and ``--builtin`` is not given),
    else the built-in one; returns the exit status (the real binary replaces this process)."""
    binary = None if BUILTIN_FLAG in argv else tfserving.find_binary()
    if binary:
        ignored = tfserving.builtin_only_flags(argv)
        if ignored:
            print(
                "widedeep serve: tensorflow_model_server has no "
                + ", ".join(a.split("=", 1)[0] for a in ignored)
                + "; they apply to the built-in server only (--builtin)",
                file=sys.stderr,
            )
        logged = tfserving.models_with_logging_config(argv)
        if logged:
            print(
                "widedeep serve: the model config gives " + ", ".join(logged) + " a "
                "logging_config; tensorflow_model_server writes request logs only when built "
                "with a log collector (the stock binary refuses to start); the built-in server "
                "writes them (--builtin)",
                file=sys.stderr,
            )
        args = tfserving.binary_argv(binary, argv)
        print("widedeep serve: running " + " ".join(args), flush=True)
        os.execv(binary, args)
    # Imported only here: running the real binary needs no TensorFlow in this process.
    from serving.server import main as server_main

    return server_main([a for a in argv if a != BUILTIN_FLAG])


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1:]))
