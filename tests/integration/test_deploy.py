"""deploy/: Prometheus config and rules pass promtool; Kubernetes manifests and the SLURM script are well formed."""
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (apt-get install prometheus)")
@pytest.mark.parametrize("what,path", [("config", "prometheus/prometheus.yml"), ("rules", "prometheus/rules/sparsecomm.rules.yml")])
def test_promtool_check(what, path):
    r = subprocess.run(["promtool", "check", what, str(DEPLOY / path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_alert_rules_cover_the_operational_failures():
    doc = yaml.safe_load((DEPLOY / "prometheus/rules/sparsecomm.rules.yml").read_text())
    alerts = {r["alert"] for g in doc["groups"] for r in g["rules"] if "alert" in r}
    assert {"SparsecommWorkerDown", "SparsecommSparseSlowerThanDense", "SparsecommStalledRounds"} <= alerts


def test_kubernetes_manifests():
    docs = [d for f in sorted((DEPLOY / "k8s").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {("Service", "sparsecomm-coordinator"), ("Deployment", "sparsecomm-coordinator"), ("Service", "sparsecomm-train"),
            ("Job", "sparsecomm-train")} <= kinds
    job = next(d for d in docs if d["kind"] == "Job")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    cmd = " ".join(spec["template"]["spec"]["containers"][0]["args"])
    assert "--node-rank $JOB_COMPLETION_INDEX" in cmd and "--rdzv-backend c10d" in cmd and "launch/train.py" in cmd
    assert spec["template"]["spec"]["subdomain"] == "sparsecomm-train"  # the headless Service's per-pod DNS


def test_slurm_script_parses():
    assert subprocess.run(["bash", "-n", str(DEPLOY / "slurm/train.sbatch")]).returncode == 0
