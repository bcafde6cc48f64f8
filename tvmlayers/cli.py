"""The ``tvmlayers`` command line: ``targets``, ``cache ls|clear``, ``tune``, ``logs ls|adopt|merge``, ``bench``
(layers of workload files, or whole models with ``--model``), ``compile`` (a bundle for a device),
``runtime-pack`` (TVM's runtime for a device without apache-tvm)."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

from .cache import KernelCache
from .targets import PRESETS, resolve_target, runs_here, target_arch, target_json, target_key, toolchains


def _targets(args: argparse.Namespace) -> int:
    for name, (description, _) in PRESETS.items():
        try:
            target = resolve_target(name)
        except ValueError as err:  # "cuda" without a GPU: it names the GPU presets instead
            print(f"{name:11} (not here: {err})")
            print(f"            {description}")
            continue
        tools = []
        for tool in toolchains(target):
            missing = f"missing: apt-get install {' '.join(tool.packages)}"
            tools.append(f"{tool.compiler} ({'installed' if tool.installed() else missing})")
        if runs_here(target):
            where = "runs here"
        elif target.kind.name == "cuda":
            where = f"no {target.attrs['arch']} GPU here: tvmlayers compile, run.py on the GPU machine"
        else:
            where = f"{target_arch(target)}: tvmlayers compile, run.py on the device"
        print(f"{name:11} {target_key(target)}")
        print(f"            {description}")
        print(f"            toolchain {' + '.join(tools)}; {where}")
        if args.verbose:
            print(f"            {json.dumps(target_json(target))}")
    print("\nAlso accepted: any TVM target tag (e.g. raspberry-pi/4b-aarch64), a target dict, or a tvm.target.Target.")
    return 0


def _cache_ls(args: argparse.Namespace) -> int:
    cache = KernelCache(args.cache_dir)
    entries = cache.entries()
    print(f"{cache.kernels_dir}: {len(entries)} kernel(s)")
    for entry in entries:
        m = entry.manifest
        spec, provenance = m["spec"], m["provenance"]
        shape = "x".join(str(d) for d in spec["input_shape"])
        source = provenance.get("rule", "") if provenance["source"] == "default" else provenance["source"]
        print(
            f"{entry.key[:12]}  {spec['op']:10} {shape:18} {spec['dtype']:8} {source:22} {m['so_size'] / 1024:7.1f} KiB"
        )
    return 0


def _cache_clear(args: argparse.Namespace) -> int:
    cache = KernelCache(args.cache_dir)
    print(f"removed {cache.clear()} kernel(s) from {cache.kernels_dir}")
    return 0


def _shape(text: str | None) -> tuple[int, ...] | None:
    return tuple(int(d) for d in text.split(",")) if text else None


def _model_workloads(path: str, input_shape: str | None) -> list:
    """Workloads of a model file that defines ``model()`` (and optionally ``INPUT_SHAPE``)."""
    import torch  # noqa: PLC0415 - only this command needs it before tuning starts

    from .extract import extract_workloads  # noqa: PLC0415
    from .model_bench import load_model_file  # noqa: PLC0415

    model, shape = load_model_file(path, _shape(input_shape))
    return extract_workloads(model, torch.randn(shape))


def _target_argument(value: str | None, settings: dict) -> object:
    """--target, else the workload file's target; JSON text is a target dict."""
    value = value or settings.get("target") or "host"
    return json.loads(value) if value.lstrip().startswith("{") else value


def _tune(args: argparse.Namespace) -> int:
    from .tuning.interrupt import SIGINT_EXIT  # noqa: PLC0415 - MetaSchedule is heavy; only tuning loads it
    from .tuning.tuner import tune  # noqa: PLC0415
    from .workloads import load_workloads  # noqa: PLC0415

    if bool(args.workloads) == bool(args.model):
        raise ValueError("give a workload file or --model, not both")
    settings: dict = {}
    if args.model:
        workloads = _model_workloads(args.model, args.input_shape)
    else:
        workloads, settings = load_workloads(args.workloads)
    if args.export_candidates:
        return _export_candidates(args, workloads, _target_argument(args.target, settings))
    try:
        results = tune(
            workloads,
            _target_argument(args.target, settings),
            args.trials,
            args.log_dir,
            space=args.space or "generic",
            trials_per_iter=args.trials_per_iter,
            rpc_tracker=args.rpc_tracker,
            rpc_key=args.rpc_key,
            timeout=args.timeout,
        )
    except KeyboardInterrupt:
        print(
            "tvmlayers tune: interrupted; every trial measured so far is in the tuning log, "
            "and the same command resumes from there",
            file=sys.stderr,
        )
        return SIGINT_EXIT
    print(f"{'workload':70} {'trials':>6} {'best us':>10}  record")
    for result in results:
        best = f"{result.best.seconds * 1e6:10.1f}  {result.best.id}" if result.best else f"{'-':>10}  none verified"
        print(f"{result.spec.describe()[:70]:70} {result.trials:6d} {best}")
    return 0


def _export_candidates(args: argparse.Namespace, workloads: list, target: object) -> int:
    """``tune --export-candidates``: candidates built here for measure.py on the device (tvmlayers.tuning.offline)."""
    from .tuning.offline import export_candidates  # noqa: PLC0415

    if args.rpc_tracker or args.rpc_key:
        raise ValueError("--export-candidates measures nothing here, over RPC or not: leave --rpc-tracker out")
    report = export_candidates(
        workloads,
        target,
        args.export_candidates,
        count=args.candidates,
        space=args.space or "ours",
        log_dir=args.log_dir,
        references=not args.no_references,
    )
    total = sum(map(len, report.candidates.values()))
    size = sum(p.stat().st_size for p in report.folder.rglob("*") if p.is_file()) / 2**20
    print(f"{report.folder}: {total} candidates of {len(report.candidates)} workloads for {report.target_key}")
    print(f"  {size:.1f} MiB, built in {report.seconds:.0f} s (export {report.export})")
    for spec, group in report.candidates.items():
        print(f"  {len(group):3d} candidates (the default and {len(group) - 1} sampled)  {spec.describe()[:90]}")
    print(f"On the device: python3 {report.folder.name}/measure.py --out measured.json")
    print("Then here:     tvmlayers logs import measured.json")
    return 0


def _logs_import(args: argparse.Namespace) -> int:
    """``logs import``: a device's measured.json becomes records of the target's log (tvmlayers.tuning.offline)."""
    from .tuning.offline import import_measurements  # noqa: PLC0415

    report = import_measurements(args.measured, args.log_dir)
    for line in report.skipped:
        print(line, file=sys.stderr)
    print(f"{report.log}: measured on {report.device}")
    for counts in report.workloads.values():
        speedup = f"{counts.speedup:.2f}x over the default" if counts.speedup is not None else "default not timed"
        best = f"best {counts.best_us:.4g} us, {speedup}" if counts.best_us is not None else "none correct"
        if counts.torch_us:
            best += f", {counts.best_us / counts.torch_us:.2f}x torch's time ({counts.torch_us:.4g} us)"
        print(
            f"  {counts.imported} new record(s), {counts.already} already in the log, {counts.wrong} wrong, "
            f"{counts.failed} failed; {best}  {counts.spec.describe()[:80]}"
        )
    return 0


def _logs_ls(args: argparse.Namespace) -> int:
    from .records.database import RECORD_FILE, TuningLog, log_roots  # noqa: PLC0415
    from .records.family import family_key, log_family  # noqa: PLC0415
    from .records.verdicts import Verdicts  # noqa: PLC0415

    host = resolve_target("host")
    here, family = target_key(host), family_key(host)
    verdicts = Verdicts.for_target(host, args.log_dir)
    print(f"this machine: {here} (family {family}); its verdicts on other records: {verdicts.path}")
    for root in log_roots(args.log_dir):
        directories = sorted(d for d in root.iterdir() if (d / RECORD_FILE).exists()) if root.is_dir() else []
        print(f"{root}: {len(directories)} target(s)")
        for directory in directories:
            log = TuningLog(directory)
            specs = log.workloads()
            exact, adoptable = log.key == here, family is not None and log_family(log) == family
            if exact:
                print(f"  {log.key}: this machine's own records, used as they are (exact)")
            elif adoptable:
                print(f"  {log.key}: same family, a record serves here once adopted (checked, faster than the default)")
            else:
                print(f"  {log.key}: another family ({log_family(log) or 'unknown'}), not used here")
            for shash in sorted(log.all_records(), key=lambda h: str(specs.get(h))):
                spec = specs.get(shash)
                name = _describe_spec(spec) if spec else f"workload {shash}"
                best = log.best(shash)
                if best is None:
                    best_text, how = "all rejected", "none"
                else:
                    best_text = f"best {best.seconds * 1e6:.1f} us"
                    how = "exact" if exact else _adoption(verdicts.get(shash, f"adopt:{log.key}:{best.id}"))
                    how = how if exact or adoptable else "none"
                print(f"    {name}  {log.trials(shash)} trials, {best_text}; here: {how}")
    neighbours = [v for vs in verdicts.all().values() for v in vs.values() if v.kind == "neighbour"]
    print(f"re-fitted neighbours tried on this machine: {sum(v.adopted for v in neighbours)} of {len(neighbours)} won")
    for verdict in sorted(neighbours, key=lambda v: v.workload):
        outcome = f"neighbour, {verdict.speedup:.2f}x" if verdict.adopted else f"declined: {verdict.reason}"
        print(f"    {verdict.workload}  [from {verdict.neighbour} ({verdict.source_cpu}); {outcome}]")
    return 0


def _adoption(verdict: object) -> str:
    """What a same-family record's verdict says, in a few words."""
    if verdict is None:
        return "not tried yet (tvmlayers logs adopt)"
    return f"adopted, {verdict.speedup:.2f}x" if verdict.adopted else f"declined: {verdict.reason}"


def _logs_adopt(args: argparse.Namespace) -> int:
    """``logs adopt``: every record of the family's logs (or of ``--from``) tried on this machine."""
    from .aot import BuildProgress  # noqa: PLC0415
    from .records.travel import adopt_logs  # noqa: PLC0415
    from .records.verdicts import Verdicts  # noqa: PLC0415

    host = resolve_target("host")
    progress: list[BuildProgress] = []
    results = adopt_logs(
        host,
        args.source,
        args.log_dir,
        on_start=lambda total: progress.append(BuildProgress(total)),
        on_done=lambda spec, verdict: progress[0].update(spec),
        again=args.again,
    )
    if progress:
        progress[0].close()
    for spec, verdict in results:
        kind = "adopted" if verdict.kind == "adopt" else "re-fitted"
        outcome = f"{kind}, {verdict.speedup:.2f}x" if verdict.adopted else f"declined: {verdict.reason}"
        print(f"  {spec.describe()}  [{outcome}]")
    won = [v.speedup for _, v in results if v.adopted]
    geomean = f" (geomean {statistics.geometric_mean(won):.2f}x over the default)" if won else ""
    print(
        f"{len(won)} of {len(results)} record(s) serve {target_key(host)}{geomean}; "
        f"remembered in {Verdicts.for_target(host, args.log_dir).path}"
    )
    return 0


def _describe_spec(spec_json: dict) -> str:
    from .spec import KernelSpec  # noqa: PLC0415

    try:
        params = dict(spec_json["params"])
        frozen = KernelSpec.make(
            spec_json["op"], tuple(spec_json["input_shape"]), spec_json["dtype"], resolve_target("host"), **params
        )
    except (KeyError, TypeError, ValueError):  # a malformed tvmlayers.json entry: listing goes on
        return f"malformed workload entry {str(spec_json)[:40]}"
    return frozen.describe()


def _logs_merge(args: argparse.Namespace) -> int:
    from .records.database import merge_logs  # noqa: PLC0415

    _check_folders(args.sources)
    for key, count in merge_logs(args.sources, args.into).items():
        print(f"{args.into}/{key}: {count} workload(s), best record of each kept")
    return 0


def _check_folders(paths: Sequence[str]) -> None:
    """Log roots to read must exist: a mistyped one would otherwise merge nothing and report success."""
    for path in paths:
        if not Path(path).exists():
            raise FileNotFoundError(f"no such log folder: {path}")
        if not Path(path).is_dir():
            raise NotADirectoryError(f"not a folder: {path}")


def _bench(args: argparse.Namespace) -> int:
    if args.model:
        if args.workloads or args.suite:
            raise ValueError("give workload files or --model, not both")
        return _bench_models(args)
    from .benchmark import bench  # noqa: PLC0415

    files = list(args.workloads)
    if args.suite:
        suite = Path(__file__).resolve().parent.parent / "examples" / "workloads"
        if not suite.is_dir():
            raise FileNotFoundError(f"--suite standard needs the source tree's {suite}")
        files += sorted(suite.glob("*.toml"))
    if not files:
        raise ValueError("give workload files, --suite standard or --model")
    report = bench(files, args.target, repeat=args.repeat, threads=args.threads)
    print(report.to_text())
    for path, write in ((args.json, report.to_json), (args.markdown, report.to_markdown)):
        if path:
            Path(path).write_text(write())
    if args.plot:
        report.plot(args.plot)
    return 0 if all(row.correct for row in report.rows) else 1


def _bench_models(args: argparse.Namespace) -> int:
    """``bench --model``: whole models against torch eager, torch.compile and ONNX Runtime."""
    from . import model_bench  # noqa: PLC0415

    if args.target != "host":
        raise ValueError("bench --model runs on this machine's CPU: leave --target out")
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    models = model_bench.CLASSIFIERS if args.model == "all" else [args.model]
    reports = []
    for model in models:
        report = model_bench.bench_model(
            model, _shape(args.input_shape), args.threads, args.repeat, peers=peers, layers=not args.no_layers
        )
        print(report.render(), flush=True)
        reports.append(report)
    summary = model_bench.summary(reports)
    print(summary)
    if args.json:
        Path(args.json).write_text(model_bench.to_json(reports))
    if args.markdown:
        text = "\n".join(r.render(markdown=True) for r in reports)
        Path(args.markdown).write_text(f"{model_bench.summary(reports, markdown=True)}\n\n{text}")
    if args.plot:
        model_bench.plot(reports, args.plot)
    return 0 if all(r.correct for r in reports) else 1


def _compile_bundle(args: argparse.Namespace) -> int:
    """``compile``: a bundle of a workload file's or a model file's kernels for a target (tvmlayers.bundle)."""
    from .bundle import compile_bundle  # noqa: PLC0415 - torch and the model loader only for this command

    if bool(args.workloads) == bool(args.model):
        raise ValueError("give a workload file or --model, not both")
    layers, shape = args.workloads, None
    if args.model:
        from .model_bench import load_model_file  # noqa: PLC0415

        layers, shape = load_model_file(args.model, _shape(args.input_shape))
    target = _target_argument(args.target, {})
    manifest_path = compile_bundle(
        layers, target, args.output, input_shape=shape, seed=args.seed, references=not args.no_references
    )
    manifest = json.loads(manifest_path.read_text())
    out = manifest_path.parent
    device = f"{manifest['cuda_arch']}, {manifest['arch']} host" if manifest.get("cuda_arch") else manifest["arch"]
    print(f"{out}: {len(manifest['kernels'])} kernels for {manifest['target_key']} ({device})")
    print(f"  {'library':24} {'KiB':>7} {'refs KiB':>9}  {'schedule':22} layer")
    for kernel in manifest["kernels"]:
        library, references = (
            (out / kernel[f]).stat().st_size / 1024 if kernel[f] else 0.0 for f in ("library", "references")
        )
        schedule = kernel["schedule"].get("rule") or f"tuned {kernel['schedule'].get('record', '')[:8]}"
        print(f"  {kernel['library']:24} {library:7.1f} {references:9.1f}  {schedule:22} {kernel['describe'][:60]}")
    total = sum((out / name).stat().st_size for name in manifest["files"]) / 2**20
    print(f"  {len(manifest['files'])} files besides manifest.json, {total:.1f} MiB")
    if manifest["arch"] == "arm":  # no TVM wheel for 32-bit ARM
        print("On the device: run.py needs TVM's runtime, which has no armv7 wheel (build it there from source); ")
        print("here, tvmlayers.bundle_harness.check_bundle checks the kernels with tvmlayers' C harness under qemu-arm")
    else:
        print(
            f"On the device: python3 {out.name}/run.py  (needs numpy and TVM's runtime: pip install apache-tvm numpy)"
        )
    return 0


def _runtime_pack(args: argparse.Namespace) -> int:
    """``runtime-pack``: TVM's runtime and tvm_ffi for a machine without apache-tvm (tvmlayers.runtime_pack)."""
    from .runtime_pack import make_runtime_pack  # noqa: PLC0415

    manifest_path = make_runtime_pack(args.output, python=args.python, arch=args.arch, cuda=args.cuda)
    pack = json.loads(manifest_path.read_text())
    out = manifest_path.parent
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**20
    cuda = " with its CUDA runtime" if pack["cuda"] else ""
    print(
        f"{out}: TVM {pack['tvm_version']} runtime{cuda} for {pack['arch']}, tvm_ffi {pack['tvm_ffi_version']} for "
        f"CPython {pack['python']}, {size:.1f} MiB"
    )
    print(f"On the device: PYTHONPATH={out.name} python3 <bundle>/run.py  (needs numpy; torch for CUDA bundles)")
    return 0


# What a user's mistake raises (a bad argument, a bad file, a missing path): exit status 2, argparse's.
USAGE_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, IsADirectoryError)
# What fails while a command runs and is not a bug of ours: a permission, a full disk, TVM's own errors
# (RuntimeError), a tuner lock that is held, a missing optional package: exit status 1.
FAILURES = (OSError, RuntimeError, ImportError)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tvmlayers",
        description="torch layers compiled by Apache TVM",
        epilog="Errors are printed as one line (exit status 2 for bad arguments or files, 1 for failures); "
        "--debug prints the full traceback instead.",
    )
    parser.add_argument("--debug", action="store_true", help="on an error, raise it with its full traceback")
    # --debug is accepted after the command too; SUPPRESS keeps an absent one from resetting the global one
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True)
    targets = commands.add_parser("targets", parents=[debug], help="list the named target presets")
    targets.add_argument("-v", "--verbose", action="store_true", help="print each target's full JSON")
    targets.set_defaults(run=_targets)
    cache = commands.add_parser("cache", help="inspect or clear the compiled-kernel cache")
    cache.add_argument("--cache-dir", default=None, help="default: $TVMLAYERS_CACHE_DIR or ~/.cache/tvmlayers")
    cache_commands = cache.add_subparsers(dest="cache_command", required=True)
    cache_commands.add_parser("ls", parents=[debug], help="list cached kernels").set_defaults(run=_cache_ls)
    cache_commands.add_parser("clear", parents=[debug], help="remove every cached kernel").set_defaults(
        run=_cache_clear
    )
    tune = commands.add_parser(
        "tune", parents=[debug], help="auto-tune layer workloads with MetaSchedule (XGBoost cost model)"
    )
    tune.add_argument("workloads", nargs="?", help="a workload TOML file (see examples/workloads)")
    tune.add_argument("--model", help="a Python file defining model() (and INPUT_SHAPE): tune every layer it calls")
    tune.add_argument("--input-shape", help="example input shape for --model, e.g. 1,3,224,224")
    tune.add_argument("--target", help="preset, TVM tag or target JSON (default: the file's target, else host)")
    tune.add_argument("--trials", type=int, default=200, help="measured candidates per workload, existing ones count")
    tune.add_argument("--log-dir", help="tuning-log root (default: $TVMLAYERS_TUNING_LOGS or ~/.local/share/...)")
    tune.add_argument(
        "--space",
        choices=("generic", "ours"),
        help="MetaSchedule's generic rules, or tvmlayers' schedule rules with sampled tile sizes (default: generic "
        "when tuning, ours with --export-candidates)",
    )
    tune.add_argument("--trials-per-iter", type=int, default=64)
    tune.add_argument(
        "--rpc-tracker",
        help="HOST:PORT of a TVM RPC tracker: measure candidates and check records on the device behind it "
        "(needed for a target of another architecture, e.g. rasp4b; python -m tvmlayers.tuning.qemu_board "
        "serves an emulated one)",
    )
    tune.add_argument("--rpc-key", help="the key the device registered with at the tracker, e.g. rasp4b")
    tune.add_argument("--timeout", type=float, default=60.0, help="seconds per build and per run")
    tune.add_argument(
        "--export-candidates",
        metavar="DIR",
        help="measure nothing here: build candidate schedules of each workload (the default one and --candidates "
        "sampled from --space) into DIR, for DIR/measure.py on the device and then `tvmlayers logs import`",
    )
    tune.add_argument("--candidates", type=int, default=16, help="--export-candidates: sampled ones per workload")
    tune.add_argument(
        "--no-references",
        action="store_true",
        help="--export-candidates: write no .npz references (torch computes them on the device, e.g. a GPU machine)",
    )
    tune.set_defaults(run=_tune)
    logs = commands.add_parser("logs", help="inspect, adopt or merge tuning logs")
    logs_commands = logs.add_subparsers(dest="logs_command", required=True)
    ls = logs_commands.add_parser("ls", parents=[debug], help="what is tuned, for which target")
    ls.add_argument("--log-dir", help="user log root to list before the shipped logs")
    ls.set_defaults(run=_logs_ls)
    adopt = logs_commands.add_parser(
        "adopt",
        parents=[debug],
        help="try the records of other CPUs of this machine's family here, and keep the winners",
    )
    adopt.add_argument("--from", dest="source", help="only the log of this target key (see `tvmlayers logs ls`)")
    adopt.add_argument("--log-dir", help="user log root (default: $TVMLAYERS_TUNING_LOGS or ~/.local/share/...)")
    adopt.add_argument("--again", action="store_true", help="try records already judged here too (a quieter machine)")
    adopt.set_defaults(run=_logs_adopt)
    import_ = logs_commands.add_parser(
        "import",
        parents=[debug],
        help="turn the measured.json of a device (measure.py of tune --export-candidates) into tuning records",
    )
    import_.add_argument("measured", help="the measured.json that measure.py wrote on the device")
    import_.add_argument("--log-dir", help="user log root (default: $TVMLAYERS_TUNING_LOGS or ~/.local/share/...)")
    import_.set_defaults(run=_logs_import)
    merge = logs_commands.add_parser(
        "merge", parents=[debug], help="merge log roots, keeping the best record per workload"
    )
    merge.add_argument("sources", nargs="+", help="log roots to merge")
    merge.add_argument("--into", required=True, help="the log root to write (its own records take part)")
    merge.set_defaults(run=_logs_merge)
    compile_ = commands.add_parser(
        "compile", parents=[debug], help="cross-compile kernels for a device into a bundle that checks itself there"
    )
    compile_.add_argument("workloads", nargs="?", help="a workload TOML file (see examples/workloads)")
    compile_.add_argument("--model", help="a Python file defining model() (and INPUT_SHAPE): compile its layers")
    compile_.add_argument("--input-shape", help="the model's input shape, e.g. 1,3,224,224")
    compile_.add_argument("--target", required=True, help="preset (see `tvmlayers targets`), TVM tag or target JSON")
    compile_.add_argument("-o", "--output", required=True, help="the bundle folder to write (replaced if a bundle)")
    compile_.add_argument("--seed", type=int, default=0, help="seed of the reference inputs")
    compile_.add_argument(
        "--no-references",
        action="store_true",
        help="write no .npz references (a small bundle: run.py computes torch's on the device, e.g. a GPU machine)",
    )
    compile_.set_defaults(run=_compile_bundle)
    pack = commands.add_parser(
        "runtime-pack",
        parents=[debug],
        help="TVM's runtime libraries and tvm_ffi for running bundles where apache-tvm is not installed",
    )
    pack.add_argument("-o", "--output", required=True, help="the pack folder to write (replaced if a pack)")
    pack.add_argument("--python", help="the device's CPython version, e.g. 3.12 (default: this one's)")
    pack.add_argument("--arch", choices=("x86_64", "aarch64"), help="the device's architecture (default: this one)")
    pack.add_argument("--cuda", action="store_true", help="include TVM's CUDA runtime (for CUDA bundles)")
    pack.set_defaults(run=_runtime_pack)
    bench = commands.add_parser(
        "bench", parents=[debug], help="time layers of workload files, or whole models, against torch"
    )
    bench.add_argument("workloads", nargs="*", help="workload TOML files")
    bench.add_argument("--suite", choices=("standard",), help="every file in examples/workloads")
    bench.add_argument(
        "--model",
        help="time a whole model instead: a torchvision classifier name (random weights), a Python file "
        "defining model() (and INPUT_SHAPE), or 'all' for the 12 classifiers",
    )
    bench.add_argument("--input-shape", help="the model's input shape, e.g. 1,3,224,224")
    bench.add_argument(
        "--peers", default="eager,compile,onnxruntime", help="--model's peers besides tvmlayers (eager always runs)"
    )
    bench.add_argument("--no-layers", action="store_true", help="--model without the per-layer breakdown")
    bench.add_argument("--target", default="host")
    bench.add_argument("--repeat", type=int, default=50, help="timed repeats per layer or model")
    bench.add_argument("--threads", type=int, default=None, help="threads of every candidate (default: torch's)")
    bench.add_argument("--json", help="write the report as JSON")
    bench.add_argument("--markdown", help="write the report as Markdown tables")
    bench.add_argument("--plot", help="write a PNG bar chart of the speedups")
    bench.set_defaults(run=_bench)
    return parser


def _report(command: str, err: Exception) -> None:
    """``tvmlayers <command>: error: <first line of the message>`` and a hint, on stderr."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    message = lines[0] if lines else type(err).__name__
    if isinstance(err, PermissionError):
        hint = "check the owner and permissions of that path; "
    elif isinstance(err, USAGE_ERRORS):
        hint = f"see 'tvmlayers {command} --help'; "
    else:
        hint = ""
    print(f"tvmlayers {command}: error: {message}", file=sys.stderr)
    print(f"hint: {hint}run 'tvmlayers --debug {command} ...' for the full traceback", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; an expected error is reported in two lines (see :func:`_report`), not a traceback."""
    args = _parser().parse_args(argv)
    command = " ".join(
        filter(None, (args.command, getattr(args, "cache_command", None), getattr(args, "logs_command", None)))
    )
    try:
        return args.run(args)
    except (*USAGE_ERRORS, *FAILURES) as err:
        if args.debug:
            raise
        _report(command, err)
        return 2 if isinstance(err, USAGE_ERRORS) else 1


if __name__ == "__main__":
    sys.exit(main())
