"""A real Prometheus (Debian's `prometheus`) scrapes a short 2-worker run through the coordinator,
loads deploy/prometheus's config and rules, and answers every PromQL expression of the Grafana
dashboard and the alert rules with data: no panel or rule names a series the code does not export.
Skipped when the prometheus binary is missing (.ci/run installs it)."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="no prometheus binary (apt-get install prometheus)")
COMPARISON = re.compile(r"\s(?:==|!=|>=|<=|>|<)\s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def query(port: int, expr: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.load(r)
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


def dashboard_exprs() -> list[str]:
    d = json.loads((ROOT / "deploy/grafana/dashboards/sparsecomm.json").read_text())
    return [t["expr"] for p in d["panels"] for t in p["targets"]]


def rules() -> list[dict]:
    doc = yaml.safe_load((ROOT / "deploy/prometheus/rules/sparsecomm.rules.yml").read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def test_dashboard_file_is_generated_from_its_source():
    sys.path.insert(0, str(ROOT / "deploy/grafana"))
    try:
        import make_dashboard
    finally:
        sys.path.pop(0)
    assert json.loads((ROOT / "deploy/grafana/dashboards/sparsecomm.json").read_text()) == make_dashboard.dashboard()


@pytest.mark.timeout(400)
def test_prometheus_answers_every_dashboard_and_alert_expression(tmp_path):
    prom_port, coord_port, coord_metrics, worker_metrics, master = (free_port() for _ in range(5))
    # the shipped config, pointed at loopback targets and evaluated every second
    cfg = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    cfg["global"].update(scrape_interval="1s", evaluation_interval="1s")
    cfg["rule_files"] = [str(tmp_path / "rules.yml")]
    rules_doc = yaml.safe_load((ROOT / "deploy/prometheus/rules/sparsecomm.rules.yml").read_text())
    for g in rules_doc["groups"]:
        g["interval"] = "1s"
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules_doc))
    targets = {"sparsecomm-workers": [f"127.0.0.1:{worker_metrics}", f"127.0.0.1:{worker_metrics + 1}"],
               "sparsecomm-coordinator": [f"127.0.0.1:{coord_metrics}"]}
    for job in cfg["scrape_configs"]:
        f = tmp_path / f"{job['job_name']}.json"
        f.write_text(json.dumps([{"targets": targets[job["job_name"]]}]))
        job["file_sd_configs"] = [{"files": [str(f)], "refresh_interval": "1s"}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    check = subprocess.run(["promtool", "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    procs = []
    try:
        procs.append(subprocess.Popen([PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
                                       f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
                                      stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "w")))
        endpoint = f"tcp://127.0.0.1:{coord_port}"
        procs.append(subprocess.Popen([sys.executable, "-m", "sparsecomm.cli", "coordinator", "--bind", endpoint,
                                       "--min-trainers", "2", "--metrics-port", str(coord_metrics)], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        train = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                                  "127.0.0.1", "--master-port", str(master), "launch/train.py", "--config",
                                  "launch/recipes/demo.yaml", f"run_dir={tmp_path / 'run'}", "sft_steps=30", "rl_steps=100000",
                                  "comm=coordinator", f"coordinator={endpoint}", f"metrics_port={worker_metrics}",
                                  "console_every=100000", "dense_baseline_every=2"],
                                 env=env, cwd=str(ROOT), stdout=subprocess.DEVNULL, stderr=open(tmp_path / "train.log", "w"),
                                 start_new_session=True)
        procs.append(train)
        alerts = [r for r in rules() if "alert" in r]
        # what must return data: every dashboard query, every recording rule, and every alert's signal
        # (its expression up to the threshold comparison: a healthy run does not fire the alert itself)
        wanted = {e: None for e in dashboard_exprs()}
        wanted.update({r["record"]: None for r in rules() if "record" in r})
        wanted.update({COMPARISON.split(r["expr"])[0].strip(): None for r in alerts})
        deadline = time.monotonic() + 240
        missing = list(wanted)
        while missing and time.monotonic() < deadline:  # bounded: data appears as the run and the rules progress
            assert train.poll() is None, (tmp_path / "train.log").read_text()[-3000:]
            time.sleep(2)
            try:
                missing = [e for e in missing if not query(prom_port, e)]
            except OSError:
                continue  # prometheus still starting
        assert not missing, f"expressions without data: {missing}"
        # every rule evaluates without error
        with urllib.request.urlopen(f"http://127.0.0.1:{prom_port}/api/v1/rules", timeout=5) as r:
            loaded = [rule for g in json.load(r)["data"]["groups"] for rule in g["rules"]]
        assert len(loaded) == len(rules())
        assert all(rule["health"] == "ok" for rule in loaded), [(r["name"], r.get("lastError")) for r in loaded]
        # every sparsecomm_* series any expression names exists
        names = {n for e in [*dashboard_exprs(), *(r["expr"] for r in rules())] for n in re.findall(r"\bsparsecomm_[a-z_]+", e)}
        for n in sorted(names):
            series = n[:-len("_bucket")] + "_bucket" if n.endswith("_bucket") else n
            assert query(prom_port, f"count({series})"), f"{n} is not exported"
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                if p is procs[-1]:
                    os.killpg(p.pid, 15)
                else:
                    p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
