"""tools/paper_experiments.py --quick on real daemons: local, offloading (accelerate's
cpu_offload, here on the CPU: the code path only), loopback and an emulated 100 ms WAN link,
every generation equal to the local model's (no timing asserted). The churn and loss
settings differ only in SWARMD_NETEM and tools/localswarm.Churn, which test_emulated_network.py
checks; they are left out here to keep the suite short."""

import json
import os
import subprocess
import sys

TOOL = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "tools",
                    "paper_experiments.py")


def test_quick_run_covers_every_setting_with_the_local_models_tokens(model_dirs, tmp_path):
    out = tmp_path / "results.json"
    r = subprocess.run([sys.executable, TOOL, "--model", model_dirs("llama"), "--quick", "--no-progress",
                        "--settings", "local", "offload", "loopback", "100 ms", "--offload", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = json.loads(out.read_text())
    names = list(results["settings"])
    assert len(names) == 4 and names[0].startswith("local") and names[1].startswith("offloading")
    assert all(s["same"] for s in results["settings"].values())
    wan = results["settings"]["100 Mbit/s, 100 ms RTT"]
    assert 0 < wan["vs_ideal_short"] and wan["ideal_steps_per_s_short"] < 10  # the ideal counts the 100 ms
    assert "| setting |" in r.stdout and "tokens equal" in r.stdout and "over offloading's" in r.stdout
