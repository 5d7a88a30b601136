"""Run a command and record its host memory: the peaks of anonymous and file-backed resident memory, sampled from
/proc every 0.2 s (Linux), plus the kernel's own VmHWM. A model mapped from its GGUF shows up as RssFile (page
cache, given back under pressure); RssAnon is what the process itself allocated (copies, CUDA host buffers).

    python bench/peak_rss.py --json OUT.json [--timeout S] -- COMMAND ...
"""

from __future__ import annotations

import argparse
import ctypes
import json
import signal
import subprocess
import sys
import time


def _status(pid: int) -> dict:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def _die_with_parent() -> None:
    """In the child: SIGKILL when this script dies, however it dies (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True)
    ap.add_argument("--timeout", type=float, default=None)
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, preexec_fn=_die_with_parent)

    def stop(signum, frame) -> None:  # `timeout` around this script: the command goes too, not left on the GPUs
        proc.kill()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    peak: dict = {}
    last: dict = {}
    rc = None
    while rc is None:
        st = _status(proc.pid)
        if st:
            last = st
            for k, v in st.items():
                peak[k] = max(peak.get(k, 0), v)
        if args.timeout and time.perf_counter() - t0 > args.timeout:
            proc.kill()
            print(f"peak_rss: killed after {args.timeout} s", file=sys.stderr)
        try:
            rc = proc.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            pass
    res = {
        "command": " ".join(cmd),
        "returncode": rc,
        "seconds": round(time.perf_counter() - t0, 2),
        "peak_rss_anon_bytes": peak.get("RssAnon"),
        "peak_rss_file_bytes": peak.get("RssFile"),
        "peak_rss_bytes": peak.get("VmRSS"),
        "vm_hwm_bytes": last.get("VmHWM"),
    }
    with open(args.json, "w") as fh:
        json.dump(res, fh, indent=1)
    gb = lambda v: f"{(v or 0) / 1e9:.2f} GB"  # noqa: E731
    print(
        f"[peak host RSS: anon {gb(res['peak_rss_anon_bytes'])}, file {gb(res['peak_rss_file_bytes'])}, "
        f"VmHWM {gb(res['vm_hwm_bytes'])}]",
        file=sys.stderr,
    )
    return rc if rc >= 0 else 128 - rc


if __name__ == "__main__":
    sys.exit(main())
