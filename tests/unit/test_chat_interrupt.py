"""Ctrl-C in `kiln chat` stops the current answer and keeps the session alive."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time


def test_ctrl_c_stops_the_answer_not_the_session(embedded_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "kiln", "chat", "--backend", "numpy", "-n", "2000", "--ctx", "2048"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(iter(lambda: proc.stdout.read(1), "")), daemon=True)
    reader.start()
    try:
        proc.stdin.write("Write a very long story about a lighthouse keeper.\n")
        proc.stdin.flush()
        deadline = time.time() + 120
        while len("".join(out).partition(">>> ")[2]) < 40 and time.time() < deadline:
            time.sleep(0.2)  # wait until the answer is streaming
        assert proc.poll() is None, "chat exited before the interrupt"
        proc.send_signal(signal.SIGINT)
        time.sleep(1)
        proc.stdin.write("/exit\n")
        proc.stdin.flush()
        proc.wait(timeout=60)
        err = proc.stderr.read()
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "[stopped]" in err
    assert "Traceback" not in err
    assert "".join(out).count(">>> ") == 2  # the session asked for the next message after the interrupt
