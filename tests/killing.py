"""Start a command and SIGKILL it as soon as a condition holds: how the crash-safety tests interrupt runs."""

import os
import signal
import subprocess
import time


def kill_when(command: list[str], ready, *, timeout: float = 120, poll: float = 0.02) -> bool:
    """Run `command`; kill -9 it once `ready()` is true. True if it was still running when killed."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None and not ready():
        time.sleep(poll)
    running = process.poll() is None
    if running:
        os.kill(process.pid, signal.SIGKILL)
    process.wait()
    return running
