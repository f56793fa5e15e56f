"""docker-compose.yml, the Dockerfile and the SLURM script: parsed and checked here
(no Docker engine or SLURM runs on this machine; their configs can still be read)."""

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from fmnist_sweep.config import compose
from fmnist_sweep.workers import layout

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_services_healthchecks_volumes_ports():
    services = COMPOSE["services"]
    assert {"postgres", "mlflow", "dashboard", "worker", "worker-gpu"} <= set(services)
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert "/health" in " ".join(services["mlflow"]["healthcheck"]["test"])
    assert {"pgdata", "mlartifacts", "fmnist-cache"} <= set(COMPOSE["volumes"])
    assert "pgdata:/var/lib/postgresql/data" in services["postgres"]["volumes"]
    assert "--serve-artifacts" in services["mlflow"]["command"]
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    gpu = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["count"] == 1 and gpu["capabilities"] == ["gpu"]


def test_workers_run_the_distributed_command_and_it_composes(monkeypatch):
    monkeypatch.setenv("PGPASSWORD", "unused")
    for name in ("worker", "worker-gpu"):
        command = [c.replace("${EXPERIMENT:-quickstart}", "quickstart").replace("${STORAGE:-postgres}", "postgres")
                   for c in COMPOSE["services"][name]["command"]]
        assert "storage=postgres" in command and "tracking=server" in command
        monkeypatch.setenv("FMNIST_STORAGE_URL", COMPOSE["services"][name]["environment"]["FMNIST_STORAGE_URL"])
        monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
        cfg = compose(command)
        assert cfg.storage.url == "postgresql://fmnist@postgres:5432/fmnist"
        assert cfg.tracking.uri == "http://mlflow:5000" and cfg.sweep == "quickstart"


def test_no_secret_is_inline():
    text = (ROOT / "docker-compose.yml").read_text()
    for key, value in re.findall(r"^\s*(\w*PASSWORD\w*):\s*(.+)$", text, re.M):
        assert value.startswith("${POSTGRES_PASSWORD:?"), f"{key} is not taken from .env"
    assert not re.search(r"postgres(ql)?(\+\w+)?://[^@\s]*:[^@\s]*@", text), "a password inside a URL"
    assert ".env" in (ROOT / ".gitignore").read_text().split()
    assert "POSTGRES_PASSWORD=" in (ROOT / ".env.example").read_text()


def test_docker_compose_config_parses(tmp_path):
    cli = shutil.which("docker-compose")
    if cli is None:
        pytest.skip("no docker-compose client here (.ci/run installs Debian's)")
    env = {"PATH": "/usr/bin:/bin", "POSTGRES_PASSWORD": "x"}
    ok = subprocess.run([cli, "-f", str(ROOT / "docker-compose.yml"), "config", "-q"], env=env,
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    missing = subprocess.run([cli, "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
                             env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, cwd=tmp_path)
    assert missing.returncode != 0 and "POSTGRES_PASSWORD" in missing.stderr


def test_the_storage_proxy_service_serves_the_workers_database(monkeypatch):
    proxy = COMPOSE["services"]["storage-proxy"]
    assert proxy["command"][:1] == ["storage-proxy"] and "storage=postgres" in proxy["command"]
    port = proxy["command"][proxy["command"].index("--port") + 1]
    monkeypatch.setenv("FMNIST_PROXY_HOST", COMPOSE["services"]["worker"]["environment"]["FMNIST_PROXY_HOST"])
    cfg = compose(["+experiment=quickstart", "storage=grpc"])
    assert cfg.storage.proxy.host == "storage-proxy" and str(cfg.storage.proxy.port) == port


def test_every_service_of_the_image_runs_unprivileged():
    text = (ROOT / "Dockerfile").read_text()
    user = re.search(r"^USER (\S+)$", text, re.M)
    assert user and user.group(1) not in ("root", "0") and "useradd" in text
    assert text.index("USER ") < text.index("ENTRYPOINT")  # what every service of the image runs as
    for name, svc in COMPOSE["services"].items():
        assert "user" not in svc or svc["user"] not in ("root", "0"), name


def test_dockerfile_installs_the_wheel_with_its_configs():
    text = (ROOT / "Dockerfile").read_text()
    for line in ("COPY conf conf", "COPY sweeps sweeps", 'pip install --no-cache-dir ".[postgres,dashboard]"'):
        assert line in text
    assert 'ENTRYPOINT ["python", "-m", "fmnist_sweep"]' in text


def test_slurm_script_is_valid_bash_and_runs_the_same_worker_command(monkeypatch):
    script = ROOT / "slurm" / "workers.sbatch"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert "#SBATCH --array=" in text and "#SBATCH --gres=gpu:1" in text
    line = next(l for l in text.splitlines() if l.startswith("srun "))
    args = [a.replace("${EXPERIMENT:-cnn_arch}", "cnn_arch") for a in shlex.split(line)[4:]]
    monkeypatch.setenv("FMNIST_STORAGE_URL", "postgresql+psycopg2://u@db/fmnist")
    assert compose(args).sweep == "cnn_arch"


def test_worker_layout_splits_cores_and_gpus():
    from fmnist_sweep.workers import default_workers

    assert default_workers(1, 0, [0, 1]) == 2 and default_workers(2, 4, list(range(16))) == 8
    cpu = layout(2, 1, 0, [0, 1])
    assert [s["cores"] for s in cpu] == [[0], [1]] and cpu[0]["env"]["OMP_NUM_THREADS"] == "1"
    one = layout(1, 1, 0, [0, 1])
    assert one[0]["cores"] == [0, 1] and one[0]["env"]["OMP_NUM_THREADS"] == "2"
    gpu = layout(4, 2, 2, list(range(8)))
    assert [s["env"]["CUDA_VISIBLE_DEVICES"] for s in gpu] == ["0", "0", "1", "1"]
    assert [len(s["cores"]) for s in gpu] == [2, 2, 2, 2]
    from fmnist_sweep.errors import UserError

    with pytest.raises(UserError, match="need 3 GPUs at 1 per GPU; this machine has 2"):
        layout(3, 1, 2, [0, 1])


def test_slurm_and_compose_stop_workers_with_sigterm_ahead_of_sigkill():
    text = (ROOT / "slurm" / "workers.sbatch").read_text()
    assert re.search(r"^#SBATCH --signal=TERM@\d+", text, re.M) and "#SBATCH --requeue" in text
    assert 'if [ "$code" -eq 143 ]; then' in text and "scontrol requeue" in text
    for name in ("worker", "worker-gpu"):
        assert COMPOSE["services"][name]["stop_grace_period"] == "60s"


K8S = ROOT / "deploy" / "k8s"


def _kustomize(overlay: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("no kubectl here to render deploy/k8s (kustomize)")
    out = subprocess.run([kubectl, "kustomize", str(K8S / overlay)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.mark.parametrize("overlay", ["base", "gpu"])
def test_kubernetes_manifests_render_validate_and_run_the_distributed_command(overlay, monkeypatch, capsys):
    """deploy/k8s renders (kustomize), every resource validates strictly against the newest
    Kubernetes schemas kubernetes-validate has, and the workers' Job runs our CLI's
    distributed command under a failure policy that does not count preemptions or SIGTERM."""
    import kubernetes_validate

    from fmnist_sweep.cli import main

    docs = _kustomize(overlay)
    for doc in docs:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {("StatefulSet", "postgres"), ("Service", "postgres"), ("Deployment", "mlflow"), ("Service", "mlflow"),
            ("Job", "fmnist-workers")} <= kinds
    for d in docs:
        if d["kind"] in ("StatefulSet", "Deployment", "Job"):
            pod = d["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True, d["metadata"]["name"]
            assert all(c["resources"]["requests"] for c in pod["containers"] + pod.get("initContainers", []))
    (job,) = [d for d in docs if d["kind"] == "Job"]
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["terminationGracePeriodSeconds"] >= 30
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]} in rules
    assert any(r["action"] == "Ignore" and r.get("onExitCodes", {}).get("values") == [143] for r in rules)
    (worker,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in worker["env"]}
    assert "PGPASSWORD" in env and env["PGPASSWORD"] is None  # from the Secret, never inline
    args = worker["args"]
    if overlay == "gpu":
        assert args[:3] == ["workers", "--per-gpu", "1"] and worker["resources"]["limits"]["nvidia.com/gpu"] == 1
        args = args[3:]
    for key in ("FMNIST_STORAGE_URL", "MLFLOW_TRACKING_URI"):
        monkeypatch.setenv(key, env[key])
    assert main(["--cfg", *args]) == 0
    printed = capsys.readouterr().out
    assert "url: postgresql://fmnist@postgres:5432/fmnist" in printed and "uri: http://mlflow:5000" in printed


def test_threads_auto_stay_within_a_containers_cpu_limit(tmp_path, monkeypatch):
    """A pod's CPU limit (cgroup v2 cpu.max) caps trainer.threads=auto: workers x threads = cores."""
    from fmnist_sweep import hardware

    cores = len(os.sched_getaffinity(0))
    limit = tmp_path / "cpu.max"
    monkeypatch.setattr(hardware, "CPU_MAX", str(limit))
    for text, threads in (("100000 100000\n", 1), ("150000 100000\n", 1), ("max 100000\n", cores),
                          (f"{400000 * cores} 100000\n", cores)):
        limit.write_text(text)
        assert hardware.threads_for("auto") == threads, text
    limit.unlink()
    assert hardware.threads_for("auto") == cores and hardware.threads_for("3") == 3
