"""Plots a serviceless-bench results.json: cost vs N on log axes, one PNG per scenario."""
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

out = Path(sys.argv[1])
doc = json.loads((out / "results.json").read_text())
rows = doc["rows"]
kernel = doc["machine"].get("kernel", "")

PLOTS = {
    "per_packet": ("per-packet", "ns per packet (BPF_PROG_TEST_RUN)"),
    "programming": ("programming", "latency (unit in legend)"),
    "traffic": ("traffic", "conn/s or us (unit in legend)"),
    "memory": ("memory", "B/app or MiB"),
    "packet_rate": ("packet-rate", "pkt/s or ns/pkt (unit in legend)"),
    "http": ("http", "conn/s, req/s or us (unit in legend)"),
}
STYLE = {"ours": "-o", "iptables": "--s", "nftables": ":^"}

for fname, (scenario, ylabel) in PLOTS.items():
    sel = [r for r in rows if r["scenario"] == scenario]
    if not sel:
        continue
    fig, ax = plt.subplots(figsize=(10, 6))
    series = {}
    for r in sel:
        for dp in ("ours", "iptables", "nftables"):
            s = r[dp]
            if s and s["median"] and s["median"] > 0:
                key = (dp, r["path"], r["unit"])
                series.setdefault(key, []).append((r["n"], s["median"]))
    for (dp, path, unit), pts in sorted(series.items()):
        pts.sort()
        xs, ys = zip(*pts)
        name = "serviceless" if dp == "ours" else dp
        ax.plot(xs, ys, STYLE[dp], label=f"{name}: {path} [{unit}]")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("apps (N)")
    ax.set_ylabel(ylabel + " (median)")
    ax.set_title(f"{scenario} vs N — {kernel}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(out / f"{fname}.png", dpi=110)
    plt.close(fig)
    print(f"wrote {out / (fname + '.png')}")
