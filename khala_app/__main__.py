import os
import signal

if "KHALA_PARENT_PID" in os.environ:
    # A stage child of import-chat, which stops it: a Ctrl-C meant for the parent must not end
    # it with a traceback while it is still importing (the CLI handles SIGINT once it runs).
    signal.signal(signal.SIGINT, signal.SIG_IGN)

from khala_app.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
