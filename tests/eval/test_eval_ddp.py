import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("ddp_knn_script.py")
ROOT = Path(__file__).parents[2]


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.tier2  # two ranks: the second tier (make test-tier2)
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_knn_monitor_under_two_process_ddp(tmp_path):
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path)], cwd=ROOT, env=env, check=True, timeout=110
    )
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert results[0] == results[1]
    assert results[0]["got"] == pytest.approx(results[0]["expected"])
    assert 0 < results[0]["expected"][0] < 1
