"""One char-LM run of a SOAP4bit configuration: the levers that chose SOAP4bit's defaults.

``python benchmarks/soap_levers.py NAME LR '{"bits": 4, ...}' [SEED]`` trains ``quality.py``'s
char-level transformer with its charlm settings (400 steps, batch 32, warm-up + cosine schedule,
clipping at norm 1, weight decay 0.01) and ``SOAP4bit(lr=LR, **json)``, and appends the record
(final validation loss, run time, loss curve) to ``<out>/soap_levers.json``. One thread. Runs of
the same NAME are kept side by side (a rerun after a code change is a new record; ``note`` says
which). The table ``docs/soap.md`` shows comes from that file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as Q  # noqa: E402
from _common import RESULTS_DIR, machine_info  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    name, lr, kw = argv[0], float(argv[1]), json.loads(argv[2])
    seed = int(argv[3]) if len(argv) > 3 else 0
    out = Path(argv[4]) if len(argv) > 4 else RESULTS_DIR
    torch.set_num_threads(1)
    Q.SOAP_KW[name] = kw
    cfg = dict(Q.FULL["charlm"])
    data, _ = Q.load_char_data(cfg["chars"])
    rec = Q.train_run("charlm", name, lr, seed, data, cfg)
    record = {"name": name, "lr": lr, "kw": kw, "seed": seed, "val_loss": rec["val_loss"], "time_s": rec["time_s"],
              "counters": rec.get("counters"), "curve": rec["curve"],
              "command": " ".join(["python benchmarks/soap_levers.py", *argv]),
              "machine": machine_info()}
    path = out / "soap_levers.json"
    runs = json.loads(path.read_text())["runs"] if path.exists() else []
    runs.append(record)
    path.write_text(json.dumps({"benchmark": "soap_levers", "task": "charlm", "config": cfg, "runs": runs},
                               indent=1) + "\n")
    print(json.dumps({k: record[k] for k in ("name", "lr", "kw", "seed", "val_loss", "time_s")}), flush=True)
    return record


if __name__ == "__main__":
    main()
