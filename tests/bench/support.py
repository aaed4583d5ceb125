"""Running the benchmark tools as a user does, for the smoke tests of ``bench``."""

import json
import os
import subprocess
import sys

REPOSITORY_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_tool(module, *arguments, timeout):
    """Run ``python -m module arguments`` from the repository root, at most ``timeout``
    seconds, and return its JSON records and its stderr."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPOSITORY_ROOT, env.get("PYTHONPATH")]))
    completed = subprocess.run(
        [sys.executable, "-m", module, *arguments],
        cwd=REPOSITORY_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if completed.returncode != 0:
        raise AssertionError(
            f"python -m {module} exited with status {completed.returncode}. Its stderr:\n"
            f"{completed.stderr[-3000:]}"
        )
    records = [json.loads(line) for line in completed.stdout.splitlines() if line.strip()]
    return records, completed.stderr
