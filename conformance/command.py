"""`dsv4 conformance`: run the suite on one device and write the report (JSON Lines + markdown summary)."""
from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import sys
import time


def add_conformance_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu, cuda or ascend")
    p.add_argument("--ops", default=None, help="comma-separated op names (default: every op)")
    p.add_argument("--providers", default="chosen",
                   help="'chosen' (what dispatch picks per case), 'all' (every provider of the device and the "
                        "reference) or one provider name")
    p.add_argument("--interpret", action="store_true",
                   help="run the cuda backend's Triton kernels on CPU tensors under TRITON_INTERPRET=1 (slow; a "
                        "correctness check of the kernels, never a GPU result)")
    p.add_argument("--small", action="store_true",
                   help="leave out the few large cases (model-width mHC, long attention lists, most ratio-128 "
                        "compressor cases); every op and every adversarial kind keeps a case")
    p.add_argument("--ep", type=int, default=0, metavar="N",
                   help="also run the expert-parallel cases at world sizes 1, 2, 4, 8 up to N")
    p.add_argument("--seed", type=int, default=0, help="added to every case's seed")
    p.add_argument("--ascend-standin", choices=["A2", "A3", "950"], default=None,
                   help="with --device ascend on a machine without an NPU: run the Ascend providers through the "
                        "executable spec of the vendor ops (a stand-in torch_npu on CPU tensors; never an NPU result)")
    p.add_argument("--out", default="conformance-report.jsonl", help="JSON Lines report; the .md summary goes beside")


def conformance_main(args) -> int:
    if getattr(args, "ascend_standin", None):
        if args.device != "ascend":
            raise ValueError("--ascend-standin goes with --device ascend")
        from dsv4_portable.registry import reset_availability
        from .ascend_spec.standin import installed
        with installed(args.ascend_standin):
            reset_availability()
            try:
                return _conformance(args)
            finally:
                reset_availability()
    return _conformance(args)


def _conformance(args) -> int:
    if args.interpret:
        if args.device != "cuda":
            raise ValueError(f"--interpret runs the cuda backend's Triton kernels; it goes with --device cuda, "
                             f"not --device {args.device}")
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("--interpret must be set before triton is imported; run it in a fresh process")
        os.environ["TRITON_INTERPRET"] = "1"       # read by triton.jit when the kernel modules are first imported
    from dsv4_portable import registry
    from dsv4_portable import devices  # noqa: F401  (defines the backends)

    from .cases import all_cases
    from .records import CaseRecord
    from .report import FAILED, write_report
    from .runner import device_name, run_cases, versions

    backend = registry.get_backend(args.device)              # unknown device: error before anything runs
    cases = all_cases(small=getattr(args, "small", False))
    if args.ops:
        wanted = [o.strip() for o in args.ops.split(",") if o.strip()]
        unknown = [o for o in wanted if o not in registry.OPS]
        if unknown:
            raise ValueError(f"unknown op(s) {', '.join(unknown)} (ops: {', '.join(registry.OPS)})")
        cases = [c for c in cases if c.op in wanted]
    if args.ep < 0:
        raise ValueError(f"--ep must be >= 0, got {args.ep}")
    cases = [dataclasses.replace(c, seed=c.seed + args.seed) for c in cases]
    backend = registry.set_backend(args.device)               # unavailable device: error with the reasons
    if args.providers not in ("chosen", "all"):               # a misspelt provider fails now, not per case
        have = [c.op for c in cases if any(p.name == args.providers and p.device_type in (backend.device_type, "any")
                                           for p in registry.get_op(c.op).providers)]
        if not have:
            raise ValueError(f"no op has a provider named {args.providers!r} on --device {args.device}")

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    records = run_cases(cases, backend, args.providers, progress)
    if args.ep:
        records += _ep_records(args.device, [w for w in (1, 2, 4, 8) if w <= args.ep], progress, args.seed,
                               device_name(backend), versions(), CaseRecord)
    if backend.device_type == "npu":     # on the stand-in this checks the spec against itself (still labelled)
        records += _vendor_spec_records(progress, device_name(backend), versions(), CaseRecord)
    title = f"dsv4 conformance --device {args.device}" + (" (Triton interpreter)" if args.interpret else "") + (
        " (small cases)" if getattr(args, "small", False) else "") + (
        f" (Ascend spec stand-in {args.ascend_standin})" if getattr(args, "ascend_standin", None) else "")
    md = write_report(records, pathlib.Path(args.out), title)
    bad = sum(r.status in FAILED for r in records)
    passed = sum(r.status == "pass" for r in records)
    skipped = sum(r.status == "skip" for r in records)
    print(f"summary: {passed} passed, {bad} failed, {skipped} skipped of {len(records)} records on "
          f"{device_name(backend)} in {time.perf_counter() - t0:.1f} s; report {args.out}, summary {md}")
    return 1 if bad else 0


def _error_record(CaseRecord, section, op, case, message, device, vers):
    return CaseRecord(section, op, f"{section}/{case}", 0, "-", {}, device, vers, {}, {}, status="error",
                      message=message)


def _section(section, load, run, dev_name, vers, CaseRecord):
    """Records of another section of the suite (EP, vendor op vs spec). A section that cannot be imported or that
    raises becomes an error record, so the report is still written and the exit code says it failed."""
    try:
        fn = load()
    except ImportError as e:
        return [_error_record(CaseRecord, section, section, "unavailable", f"the {section} cases cannot run: {e}",
                              dev_name, vers)]
    try:
        return run(fn)
    except Exception as e:   # noqa: BLE001  (reported as an error record, never swallowed)
        return [_error_record(CaseRecord, section, section, "crashed", f"the {section} section raised "
                              f"{type(e).__name__}: {e}", dev_name, vers)]


def _ep_records(device, world_sizes, progress, seed, dev_name, vers, CaseRecord):
    def load():
        from dsv4_portable.ep.conformance import ep_records
        return ep_records
    return _section("ep", load, lambda fn: fn(device, world_sizes, progress, seed=seed), dev_name, vers, CaseRecord)


def _vendor_spec_records(progress, dev_name, vers, CaseRecord):
    def load():
        from .ascend_spec.vendor_check import vendor_spec_records
        return vendor_spec_records
    return _section("vendor_spec", load, lambda fn: fn(progress=progress), dev_name, vers, CaseRecord)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="dsv4 conformance")
    add_conformance_args(p)
    return conformance_main(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
