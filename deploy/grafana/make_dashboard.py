"""Writes dashboards/sparsecomm.json, the Grafana dashboard; the panel list below is its source.

    python deploy/grafana/make_dashboard.py        # after editing PANELS

Every expression reads series sparsecomm exports or the recording rules in
deploy/prometheus/rules/sparsecomm.rules.yml; tests/integration/test_prometheus.py runs each one
against a real Prometheus scraping a real run and fails on any that returns nothing.
"""
import json
from pathlib import Path

# (title, unit, [(PromQL, legend)], description)
PANELS = [
    ("Bytes sent vs dense all-reduce equivalent", "Bps",
     [("sparsecomm:sent_bytes:rate1m", "sent {{run}}"), ("sparsecomm:dense_equivalent_bytes:rate1m", "dense equivalent {{run}}")],
     "Encoded bytes each run's workers put on the wire per second (headers included) vs what a ring all-reduce of the same tensors would send."),
    ("Compression ratio", "x",
     [("sparsecomm:compression:ratio1m", "{{run}}")], "Dense-equivalent bytes / bytes sent."),
    ("Update sparsity by definition", "percentunit",
     [('avg by (run, definition) (sparsecomm_update_sparsity_ratio{layer_kind="all"})', "{{definition}} {{run}}")],
     "Fraction of weights unchanged by the last step: fp32_exact, bf16_view, rel_threshold, abs_threshold."),
    ("Update sparsity by layer kind", "percentunit",
     [('avg by (definition, layer_kind) (sparsecomm_update_sparsity_ratio{layer_kind!="all"})', "{{layer_kind}} ({{definition}})")],
     "Per layer kind (attention, mlp, norm, embedding, other)."),
    ("Accumulated sparsity over K steps", "percentunit",
     [("avg by (definition, k_steps) (sparsecomm_update_sparsity_k_steps_ratio)", "K={{k_steps}} {{definition}}")],
     "Fraction unchanged between weights K steps apart."),
    ("Phase timings (mean per call)", "s",
     [("sum by (phase) (rate(sparsecomm_phase_seconds_sum[1m])) / sum by (phase) (rate(sparsecomm_phase_seconds_count[1m]))", "{{phase}}")],
     "select, encode, transfer, decode, apply, exchange, step, dense_allreduce (the measured dense baseline)."),
    ("Sparse exchange vs measured dense all-reduce", "s",
     [("sparsecomm:exchange_seconds:mean5m", "sparse exchange {{run}}"), ("sparsecomm:dense_allreduce_seconds:mean5m", "dense all-reduce {{run}}")],
     "Both measured in the same run on the same process group."),
    ("Reward", "none", [("avg by (run) (sparsecomm_reward)", "{{run}}")], "Mean sampled reward of the last RL step."),
    ("Density sent", "percentunit", [("avg by (run) (sparsecomm_density_ratio)", "{{run}}")], "Fraction of entries sent in the last exchange."),
    ("Exchange path", "ops", [("sum by (path) (rate(sparsecomm_exchange_path_total[1m]))", "{{path}}")],
     "sparse all-gather, dense all-reduce (automatic switch) or local."),
    ("Workers alive", "none",
     [('sum by (job) (up{job=~"sparsecomm-.*"})', "{{job}} targets up"),
      ("sum by (role) (sparsecomm_coordinator_workers_alive)", "coordinator: {{role}}s alive")],
     "Scrape targets up, and the workers the coordinator has heard from within its heartbeat timeout."),
    ("Coordinator rounds", "ops",
     [("sparsecomm:coordinator_rounds:rate5m", "rounds/s"),
      ("histogram_quantile(0.9, sum by (le) (rate(sparsecomm_coordinator_round_seconds_bucket[5m])))", "p90 round latency (s)")],
     "Rounds closed per second; first push to aggregate sent."),
    ("Coordinator traffic", "Bps",
     [("rate(sparsecomm_coordinator_received_bytes_total[1m])", "in"), ("rate(sparsecomm_coordinator_sent_bytes_total[1m])", "out")],
     "All frames, both directions."),
]


def dashboard() -> dict:
    panels = []
    for i, (title, unit, targets, desc) in enumerate(PANELS):
        panels.append({
            "id": i + 1, "type": "timeseries", "title": title, "description": desc,
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "targets": [{"refId": chr(65 + j), "expr": expr, "legendFormat": legend,
                         "datasource": {"type": "prometheus", "uid": "${datasource}"}} for j, (expr, legend) in enumerate(targets)],
        })
    return {
        "uid": "sparsecomm", "title": "sparsecomm: communication, sparsity, reward", "schemaVersion": 39, "version": 1,
        "editable": True, "refresh": "10s", "time": {"from": "now-30m", "to": "now"}, "tags": ["sparsecomm"],
        "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus",
                                 "current": {"text": "Prometheus", "value": "prometheus"}}]},
        "panels": panels,
    }


if __name__ == "__main__":
    out = Path(__file__).resolve().parent / "dashboards" / "sparsecomm.json"
    out.write_text(json.dumps(dashboard(), indent=2) + "\n")
    print(out)
