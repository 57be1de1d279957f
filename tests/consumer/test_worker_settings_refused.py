"""A worker whose engine cannot start with its settings stops with exit 2 and a message
that says what to change, instead of restarting the engine forever."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from i2v_fleet.producer_sdk.devstack import free_port
from tests.conftest import Cluster

pytestmark = [pytest.mark.kafka, pytest.mark.minio, pytest.mark.slow]


def test_an_attention_backend_the_node_cannot_run_stops_the_worker(
    cluster: Cluster, tiny_model_dir: Path, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": cluster.kafka.bootstrap_servers,
        "MINIO_ENDPOINT": cluster.s3.endpoint,
        "MINIO_ACCESS_KEY": cluster.s3.access_key,
        "MINIO_SECRET_KEY": cluster.s3.secret_key.get_secret_value(),
        "MINIO_BUCKET": cluster.s3.bucket,
        "MODEL_CKPT_DIR": str(tiny_model_dir),
        "DEVICE": "cpu",
        "NODE_ID": "refused-node",
        "WORKERS_GROUP": f"workers-{uuid.uuid4().hex[:6]}",
        "WORK_DIR": str(tmp_path / "work"),
        "SERVER_HOST": "127.0.0.1",
        "SERVER_PORT": str(free_port()),
        "ATTENTION_BACKEND": "_flash_3",
    }
    result = subprocess.run(
        [str(Path(sys.executable).parent / "i2v"), "worker"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "the engine cannot start with these settings" in result.stderr
    assert "ATTENTION_BACKEND=_flash_3 needs" in result.stderr
    assert "Traceback" not in result.stderr
