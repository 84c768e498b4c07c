"""What this GPU does at best, measured beside the benchmarks: a large bf16 matmul's TFLOP/s and a device copy's GB/s.

    python -m bench.roofline [--json FILE] [--smoke]

MFU in bench.e2e divides by the datasheet's dense bf16 peak (gpt1.runtime.PEAK_BF16_TFLOPS); this says how much of
that peak a plain cuBLAS matmul reaches on the same machine in the same run (clocks and power limits vary),
so that a fraction of the hardware can be read against both. Timed with triton.testing.do_bench (median).
--smoke: small sizes on the CPU, which only shows that it runs.
"""

import json

from . import common

SIZES = {"matmul": 8192, "copy_mib": 1024}
SMOKE_SIZES = {"matmul": 256, "copy_mib": 8}


def measure(smoke):
    import torch

    sizes, dev = (SMOKE_SIZES if smoke else SIZES), common.device()
    n = sizes["matmul"]
    a, b = (torch.randn(n, n, device=dev, dtype=torch.bfloat16) for _ in range(2))
    mm = common.measure_ms(lambda: a @ b, smoke)["ms"]
    src = torch.empty(sizes["copy_mib"] * 2**20, device=dev, dtype=torch.uint8)
    dst = torch.empty_like(src)
    copy = common.measure_ms(lambda: dst.copy_(src), smoke)["ms"]
    return dict(common.environment(smoke), matmul_n=n, matmul_ms=mm, matmul_tflops=2 * n**3 / (mm * 1e-3) / 1e12,
                copy_bytes=src.numel(), copy_ms=copy, copy_gbps=2 * src.numel() / (copy * 1e-3) / 1e9,
                datasheet_tflops=common.peak_bf16_tflops(common.gpu_name()))


def main(argv=None):
    parser = common.cli_parser(__doc__.splitlines()[0], out=False, budget=False)
    parser.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    common.use_interpreter_without_gpu(args.smoke)  # without a GPU: --smoke, or a one-line refusal
    r = measure(args.smoke)
    peak = (f" ({r['matmul_tflops'] / r['datasheet_tflops']:.0%} of the datasheet's {r['datasheet_tflops']:g})"
            if r["datasheet_tflops"] else "")
    smoke = " - SMOKE, not a measurement" if args.smoke else ""
    print(f"roofline on {r['gpu']}: bf16 matmul {r['matmul_n']}^3 {r['matmul_tflops']:.0f} TFLOP/s{peak}; "
          f"device copy {r['copy_gbps']:.0f} GB/s (read + write){smoke}")
    if args.json:
        with common.open_for_writing(args.json) as f:
            json.dump(r, f, indent=1)


if __name__ == "__main__":
    main()
