"""Run a check script that spawns its own process group, and read the JSON results it writes."""

import json
import subprocess
import sys


def run_checks(script: str, folder, *args: str, timeout: int = 600) -> dict:
    """``python script folder/results.json *args``; fails the calling fixture with the script's output tail."""
    path = folder / "results.json"
    p = subprocess.run([sys.executable, script, str(path), *args], capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    return json.loads(path.read_text())
