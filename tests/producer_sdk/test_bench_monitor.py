"""`i2v bench` and `i2v monitor`: against a real tiny-model worker, a dead URL, and fakes."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import TypeAdapter

from i2v_fleet.producer_sdk.cli.bench import TIMED_OUT, BenchSpec, percentiles, run_bench
from i2v_fleet.producer_sdk.cli.monitor import job_counters, memory_pct
from i2v_fleet.producer_sdk.devstack import free_port
from i2v_fleet.producer_sdk.testing import FakeWorker, MemoryTransport, Outcome
from i2v_fleet.schemas import ErrorInfo, TopicNames
from tests.conftest import Cluster, run_worker

PHOTO = Path(__file__).resolve().parents[2] / "examples" / "images" / "grace_hopper.jpg"
I2V = str(Path(sys.executable).parent / "i2v")
CHEAP = ["--size", "480*832", "--frames", "5", "--preset", "custom", "--steps", "2"]
REPORT: TypeAdapter[dict[str, Any]] = TypeAdapter(dict[str, Any])


def _env(cluster: Any, topics: TopicNames) -> dict[str, str]:
    return {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": cluster.kafka.bootstrap_servers,
        "COLUMNS": "160",
        **{f"I2V_TOPIC_{role.upper()}": name for role, name in topics},
    }


def _run(
    args: list[str], env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [I2V, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def bench_worker(
    cluster: Cluster,
    worker_topics: TopicNames,
    tiny_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Any]:
    """A real worker on fresh topics with the stand-in engine (each step 0.1 s, then a real
    MP4): bench and monitor measure the fleet from its events, not the model."""
    env = {"STANDIN_ENGINE": "pace:0.1", "I2V_TEST_TOOLS": "true"}
    yield from run_worker(cluster, worker_topics, tiny_model_dir, tmp_path_factory, env)


@pytest.fixture(scope="module")
def bench_run(
    bench_worker: Any,
    cluster: Any,
    worker_topics: TopicNames,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """`i2v bench` of three cheap jobs, two in flight, against this module's worker."""
    export = tmp_path_factory.mktemp("bench") / "bench.json"
    args = ["bench", "--image", str(PHOTO), "-p", "she smiles", "--requests", "3"]
    args += ["--concurrency", "2", *CHEAP, "--guidance", "2", "--timeout", "400"]
    done = _run([*args, "--export", str(export)], _env(cluster, worker_topics), timeout=480)
    assert done.returncode == 0, done.stdout + done.stderr
    return done, REPORT.validate_json(export.read_text())


@pytest.mark.timeout(600)
@pytest.mark.kafka
@pytest.mark.minio
@pytest.mark.slow
def test_bench_reports_three_succeeded_jobs(bench_run: Any) -> None:
    """Three jobs succeed; each has positive queue, run and e2e times; jobs/hour is given."""
    done, report = bench_run
    summary = report["summary"]
    assert summary["outcomes"] == {"succeeded": 3}, summary
    assert summary["error_codes"] == {}
    # A retry (an engine restart on a starved machine) still ends in one success per job.
    assert summary["attempts_gt1"] == sum(j["attempts"] > 1 for j in report["jobs"])
    assert summary["jobs_per_hour"] > 0
    assert len(report["jobs"]) == 3
    for job in report["jobs"]:
        assert job["outcome"] == "succeeded"
        assert job["node_id"] == "test-node-1"
        assert job["queue_wait_s"] > 0
        assert job["run_s"] > 0
        assert job["e2e_s"] >= job["queue_wait_s"] + job["run_s"] - 0.01
    for key in ("queue_wait_s", "run_s", "e2e_s"):
        assert summary[key]["n"] == 3
        assert 0 < summary[key]["p50"] <= summary[key]["p90"] <= summary[key]["max"]
    # One lane, two in flight: some job waited for another to finish.
    assert summary["queue_wait_s"]["max"] > summary["run_s"]["p50"] / 2
    assert "end to end" in done.stdout
    assert "succeeded jobs/hour" in done.stdout


@pytest.mark.timeout(600)
@pytest.mark.kafka
@pytest.mark.minio
@pytest.mark.slow
def test_monitor_polls_a_node_by_url_and_from_nodes(
    bench_run: Any, bench_worker: Any, cluster: Any, worker_topics: TopicNames, tmp_path: Path
) -> None:
    """Both ways of naming the node give 200 samples with the bench's jobs in the counters."""
    base = ["monitor", "--interval", "1", "--duration", "3", "--alert-on-error"]
    env = _env(cluster, worker_topics)
    runs = {
        "url": [*base, "--url", bench_worker.ops_url],
        "from_nodes": [*base, "--from-nodes"],
    }
    procs = {
        name: subprocess.Popen(
            [I2V, *args, "--export", str(tmp_path / f"{name}.json")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name, args in runs.items()
    }
    for name, proc in procs.items():
        output = proc.communicate(timeout=60)[0]
        assert proc.returncode == 0, output
        report = REPORT.validate_json((tmp_path / f"{name}.json").read_text())
        assert report["alerts"] == [], report["alerts"]
        [node] = report["nodes"]
        assert node["url"] == bench_worker.ops_url
        assert node["node_id"] == "test-node-1"
        assert node["availability_pct"] == 100.0
        assert len(node["samples"]) >= 2, output
        for sample in node["samples"]:
            assert sample["healthz"]["status"] == 200
            assert sample["readyz"]["status"] == 200
            assert sample["readyz"]["checks"]["model_loaded"] is True
            metrics = sample["metrics"]
            assert metrics["jobs"].get("succeeded", 0) >= 3, metrics
            assert metrics["engine_restarts"] >= 0
            assert metrics["in_flight"] in (0, 1)
            assert sample["info"]["engine_alive"] is True
        assert "test-node-1" in output
        assert "healthz 200" in output


def test_monitor_reports_a_dead_node_unreachable(tmp_path: Path) -> None:
    """A URL nobody answers is unreachable in every sample; --alert-on-error makes that exit 1."""
    url = f"http://127.0.0.1:{free_port()}"
    export = tmp_path / "dead.json"
    args = ["monitor", "--url", url, "--interval", "0.5", "--duration", "1"]
    alerted = _run([*args, "--alert-on-error", "--export", str(export)])
    assert alerted.returncode == 1, alerted.stdout + alerted.stderr
    report = REPORT.validate_json(export.read_text())
    [node] = report["nodes"]
    assert node["reachable_pct"] == 0.0
    assert node["availability_pct"] == 0.0
    assert all(s["healthz"]["status"] is None for s in node["samples"])
    [alert] = report["alerts"]
    assert (alert["kind"], alert["url"], alert["until"]) == ("unreachable", url, None)
    assert alert["samples"] == len(node["samples"]) == 2
    assert _run(args).returncode == 0  # recorded, but not an exit status unless asked


async def test_bench_counts_outcomes_codes_and_time_outs() -> None:
    """Against the SDK's fake worker: successes, failure codes, and jobs that never end."""
    params = {"quality_preset": "fast", "image_size": "480*832", "num_frames": 5}
    spec = BenchSpec(str(PHOTO), "p", params, 4, 2, None, 10.0)
    transport = MemoryTransport()
    async with FakeWorker(transport):
        ok = await run_bench(transport, spec)
    assert ok["summary"]["outcomes"] == {"succeeded": 4}
    assert [j["index"] for j in ok["jobs"]] == [0, 1, 2, 3]

    failing = Outcome(fail_with=ErrorInfo(code="out_of_memory", message="use fewer frames"))
    transport = MemoryTransport()
    async with FakeWorker(transport, outcome=failing):
        failed = await run_bench(transport, spec)
    assert failed["summary"]["outcomes"] == {"failed": 4}
    assert failed["summary"]["error_codes"] == {"out_of_memory": 4}
    assert failed["summary"]["jobs_per_hour"] == 0

    lost = await run_bench(MemoryTransport(), BenchSpec(str(PHOTO), "p", params, 3, 2, None, 0.2))
    assert lost["summary"]["outcomes"] == {TIMED_OUT: 3}
    assert lost["summary"]["run_s"]["n"] == 0


def test_percentiles_and_node_readings() -> None:
    """Percentiles interpolate like numpy; counters and memory are read as the node writes them."""
    assert percentiles([1.0, 2.0, 3.0, 4.0]) == {
        "n": 4,
        "p50": 2.5,
        "p90": 3.7,
        "p99": 3.97,
        "max": 4.0,
        "mean": 2.5,
    }
    assert percentiles([])["p50"] is None
    prometheus = pytest.importorskip("prometheus_client")
    from i2v_fleet.consumer.metrics import Metrics

    m = Metrics()
    m.ended("succeeded")
    m.ended("succeeded")
    m.ended("failed", "timeout")
    m.requeues.labels(reason="shutdown").inc()
    m.in_flight.set(1)
    counters = job_counters(prometheus.generate_latest(m.registry).decode())
    assert counters["jobs"] == {"failed:timeout": 1, "succeeded": 2}
    assert (counters["jobs_total"], counters["in_flight"], counters["requeues"]) == (3, 1, 1)
    assert counters["engine_restarts"] == 0
    assert memory_pct(None, {"devices": [{"memory_total_bytes": 8, "memory_free_bytes": 2}]}) == 75
    assert memory_pct({"status": "ok"}) is None
