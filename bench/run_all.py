"""Every benchmark in one run: attention, cross-entropy, end to end; one JSON, one Markdown, the plots.

    python -m bench.run_all --out DIR            # on one GPU: about 8 minutes on an H100
    python -m bench.run_all --smoke --out DIR    # CPU, Triton interpreter: tests the harness, measures nothing

Writes DIR/results.json (every row, with GPU name, versions, commit and the smoke flag), DIR/results.md (a
headline table, then every table with ratios to the eager reference and to the best peer) and DIR/*.png.
Each bench has a share of --budget-s; rows still to run when its share is spent are recorded as skipped.
Without --out the results go to bench/results/<gpu model>/, the committed set for that GPU.
"""

import time

from . import common

# seconds per bench on the GPU, out of the 8 minutes the whole run may take (imports and startup aside)
BUDGET_SHARES = {"attention": 0.45, "cross_entropy": 0.25, "e2e": 0.30}
HEADLINE_ATTENTION = {"T": 512, "D": 64, "mode": "fwd+bwd"}  # GPT-1's context and head width
HEADLINE_CE = {"N": 32768, "V": 40478, "mode": "fwd+bwd"}  # GPT-1's batch: 64 sequences x 512 tokens


def headline(rows):
    """Ours against the best peer at GPT-1's shapes, and the end-to-end rows: the table the README shows."""
    lines = ["## Headline", "", "| what | ours ms | best peer | peer ms | speed-up vs best peer | vs eager |",
             "|---|---|---|---|---|---|"]
    picks = [r for r in rows if common.role(r) == common.OURS and r.get("status") == "ok" and (
        (r["bench"] == "attention" and all(r[k] == v for k, v in HEADLINE_ATTENTION.items()))
        or (r["bench"] == "cross_entropy" and all(r[k] == v for k, v in HEADLINE_CE.items())))]
    for r in picks:
        peer = next((p for p in rows if p["provider"] == r.get("best_peer") and p["table"] == r["table"]
                     and p["x"] == r["x"] and p["mode"] == r["mode"]), {})
        lines.append(f"| {r['provider']}: {r['table']}, x={r['x']}, {r['mode']} | {r['ms']:.3g} | "
                     f"{r.get('best_peer') or '-'} | {peer.get('ms', float('nan')):.3g} | "
                     f"{_x(r.get('vs_best_peer'))} | {_x(r.get('vs_eager'))} |")
    if not picks:
        lines.append("| (no row of ours at the headline shapes ran) | | | | | |")
    e2e = [r for r in rows if r["bench"] == "e2e"]
    if e2e:
        lines += ["", "| end to end: " + e2e[0]["table"] + " | tokens/s | MFU | peak MiB |", "|---|---|---|---|"]
        for r in e2e:
            ok = r.get("status") == "ok"
            tok_s = f"{r['tokens_per_s']:.0f}" if ok else r.get("status")
            mfu = f"{r['mfu']:.1%}" if ok and r.get("mfu") else "-"
            peak = f"{r['peak_mb']:.0f}" if ok and r.get("peak_mb") else "-"
            lines.append(f"| {r['provider']} | {tok_s} | {mfu} | {peak} |")
    return lines + [""]


def _x(v):
    return f"{v:.2f}x" if v else "-"


def main(argv=None):
    parser = common.cli_parser(__doc__.splitlines()[0])
    parser.set_defaults(budget_s=450)
    parser.add_argument("--only", default="attention,cross_entropy,e2e", help="comma-separated benches to run")
    args = parser.parse_args(argv)
    common.use_interpreter_without_gpu(args.smoke)  # before any module imports kernels
    from . import attention, cross_entropy, e2e

    out, benches = common.out_dir(args), {"attention": attention, "cross_entropy": cross_entropy, "e2e": e2e}
    rows, t0 = [], time.monotonic()
    for name in args.only.split(","):
        t = time.monotonic()
        budget = 0 if args.smoke or not args.budget_s else args.budget_s * BUDGET_SHARES[name]
        rows += benches[name].run(args.smoke, common.Deadline(budget))
        print(f"{name}: {time.monotonic() - t:.0f} s", flush=True)
    common.add_ratios(rows)
    common.write_outputs(rows, out, "GPT-1 kernel benchmarks", [(benches[n].markdown, benches[n].plot)
                                                                 for n in args.only.split(",")],
                         headline=headline(rows))
    print(f"total: {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
