"""Every benchmark in one run: attention, cross-entropy, end to end; one JSON, one Markdown, the plots.

    python -m bench.run_all --out DIR            # on one GPU: about 8 minutes on an H100
    python -m bench.run_all --smoke --out DIR    # CPU, Triton interpreter: tests the harness, measures nothing
    python -m bench.run_all --only attention,cross_entropy --include E2E_DIR/results.json --out DIR

Writes DIR/results.json (every row, with GPU name, versions, commit and the smoke flag), DIR/results.md (a
headline table, then every table with ratios to the eager reference and to the best peer) and DIR/*.png.
Each op is timed three ways: GPU time (do_bench), host-included time (back-to-back calls, as the model makes
them) and the kernels alone replayed from a CUDA graph (as a graph-replayed step runs them); the headline shows
all three at GPT-1's shapes, attention at T=128, 256 and 512.
Each bench has a share of --budget-s; rows still to run when its share is spent are recorded as not run.
--include adds the rows of an earlier results.json (e.g. bench.e2e run on its own) to the tables.
Without --out the results go to bench/results/<gpu model>/, the committed set for that GPU.
"""

import importlib
import json
import time

from . import common

# shares of --budget-s per bench, renormalized over the benches that --only selects
BUDGET_SHARES = {"attention": 0.38, "cross_entropy": 0.21, "layer_norm": 0.07, "gelu": 0.05, "e2e": 0.29}
HEADLINE_ATTENTION = {"T": (128, 256, 512), "D": (64,), "mode": ("fwd+bwd",)}  # GPT-1's head width; T=512 its context
HEADLINE_CE = {"N": (32768,), "V": (40478,), "mode": ("fwd+bwd",)}  # GPT-1's batch: 64 sequences x 512 tokens
HEADLINE_LN = {"N": (16384,), "dropout": (0.1,), "precision": ("bf16",), "mode": ("fwd+bwd",)}  # 32 x 512 tokens
HEADLINE_GELU = {"N": (16384,), "precision": ("bf16, fp32 bias",), "mode": ("fwd+bwd",)}  # under autocast


def _at(r, shape):
    return all(r.get(k) in v for k, v in shape.items())


def headline(rows):
    """Ours against the best peer at GPT-1's shapes (GPU and host-included ms), and the end-to-end rows: the
    tables the README shows."""
    lines = ["## Headline", "", "| what | ours ms | ours host ms | best peer | peer ms | peer host ms | "
             "speed-up vs best peer | vs eager | ours graph ms | best peer by graph ms | its graph ms | "
             "graph speed-up |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    picks = [r for r in rows if common.role(r) == common.OURS and r.get("status") == "ok" and (
        (r["bench"] == "attention" and _at(r, HEADLINE_ATTENTION))
        or (r["bench"] == "cross_entropy" and _at(r, HEADLINE_CE))
        or (r["bench"] == "layer_norm" and _at(r, HEADLINE_LN))
        or (r["bench"] == "gelu" and _at(r, HEADLINE_GELU)))]
    for r in picks:
        peer = next((p for p in rows if p["provider"] == r.get("best_peer") and p["table"] == r["table"]
                     and p["x"] == r["x"] and p["mode"] == r["mode"]), {})
        graph_peer = next((p for p in rows if p["provider"] == r.get("best_peer_graph") and p["table"] == r["table"]
                           and p["x"] == r["x"] and p["mode"] == r["mode"]), {})
        lines.append(f"| {r['provider']}: {r['table']}, x={r['x']}, {r['mode']} | {_f(r.get('ms'))} | "
                     f"{_f(r.get('host_ms'))} | {r.get('best_peer') or '-'} | {_f(peer.get('ms'))} | "
                     f"{_f(peer.get('host_ms'))} | {_x(r.get('vs_best_peer'))} | {_x(r.get('vs_eager'))} | "
                     f"{_f(r.get('graph_ms'))} | {r.get('best_peer_graph') or '-'} | "
                     f"{_f(graph_peer.get('graph_ms'))} | {_x(r.get('vs_best_peer_graph'))} |")
    if not picks:
        lines.append("| (no row of ours at the headline shapes ran) |" + " |" * 11)
    e2e = [r for r in rows if r["bench"] == "e2e"]
    if e2e:
        lines += ["", "| end to end: " + e2e[0]["table"] + " | tokens/s | vs nanoGPT | MFU | GPU busy | "
                  "kernels/step | peak MiB |", "|---|---|---|---|---|---|---|"]
        for r in e2e:
            ok = r.get("status") == "ok"
            tok_s = f"{r['tokens_per_s']:.0f}" if ok else r.get("status")
            lines.append(f"| {r['provider']} | {tok_s} | {_x(r.get('vs_nanogpt'))} | {_pct(r.get('mfu'))} | "
                         f"{_pct(r.get('gpu_busy'))} | {_f(r.get('kernels_per_step'), 4)} | "
                         f"{_f(r.get('peak_mb'), 5)} |")
    return lines + [""]


def _f(v, digits=3):
    return common.fmt(v, digits) if v is not None else "-"


def _pct(v):
    return f"{v:.1%}" if v is not None else "-"


def _x(v):
    return f"{v:.2f}x" if v else "-"


def budgets(names, budget_s, smoke):
    total = sum(BUDGET_SHARES[n] for n in names)
    return {n: 0 if smoke or not budget_s else budget_s * BUDGET_SHARES[n] / total for n in names}


BENCHES = ("attention", "cross_entropy", "layer_norm", "gelu", "e2e")


def main(argv=None):
    parser = common.cli_parser(__doc__.splitlines()[0])
    parser.set_defaults(budget_s=450)
    parser.add_argument("--only", default=",".join(BENCHES),
                        help="comma-separated benches to run")
    parser.add_argument("--include", action="append", default=[], help="results.json of an earlier run whose rows "
                                                                       "join the tables (repeatable)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHES]
    if unknown or not names:
        parser.error(f"--only: unknown bench(es) {', '.join(unknown) or '(none given)'}; benches: {', '.join(BENCHES)}")
    rows = []
    for path in args.include:  # read before any bench runs: a bad file is refused first
        try:
            with open(path) as f:
                included = json.load(f)
        except (OSError, ValueError) as e:
            parser.error(f"--include {path}: {e}")
        if not isinstance(included, list) or not all(isinstance(r, dict) and r.get("bench") in BENCHES
                                                      for r in included):
            parser.error(f"--include {path}: not a results.json of these benches (a list of rows)")
        rows += included
    common.use_interpreter_without_gpu(args.smoke)  # before any module imports kernels
    out, t0, first = common.out_dir(args), time.monotonic(), len(rows)
    for name, budget in budgets(names, args.budget_s, args.smoke).items():
        t = time.monotonic()
        rows += importlib.import_module(f".{name}", __package__).run(args.smoke, common.Deadline(budget))
        env = rows[first] if len(rows) > first else None  # the header describes this run, not an included row
        print(f"{name}: {time.monotonic() - t:.0f} s", flush=True)
        # written after every bench, so that a run stopped from outside keeps what it measured; every bench with
        # rows gets its section, an included one's too
        shown = [importlib.import_module(f".{n}", __package__) for n in BENCHES if any(r["bench"] == n for r in rows)]
        common.add_ratios(rows)
        common.write_outputs(rows, out, "GPT-1 kernel benchmarks", [(b.markdown, b.plot) for b in shown],
                             headline=headline(rows), env=env)
    print(f"total: {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
