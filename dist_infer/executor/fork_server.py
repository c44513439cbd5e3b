"""Imported by the multiprocessing fork server alone (``multiproc._PRELOAD``), never by other code.

The fork server is the parent of every local worker, and a worker dies with it (PR_SET_PDEATHSIG). Python
protects it from Ctrl+C only; a SIGTERM to the whole process group (systemd stopping the unit) would kill it
and with it the workers of a server that is still draining its requests. It ignores SIGTERM too (and so do
the workers it forks, which ignore both anyway); it still exits as soon as the coordinator is gone.
"""

import signal

signal.signal(signal.SIGTERM, signal.SIG_IGN)
