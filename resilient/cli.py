"""The ``resilient`` command: supervise training, inspect checkpoint directories, test resumes."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

from resilient.checkpoint.discovery import COMPLETE, PARTIAL, CheckpointInfo, scan, size_on_disk
from resilient.checkpoint.layout import MARKER_NAME, ManifestError, aside_name, read_manifest, read_run_id
from resilient.checkpoint.lock import read_lock_holder
from resilient.errors import EXIT_PREEMPTED
from resilient.units import human_bytes


def _run_id_or_none(root: Path) -> str | None:
    try:
        return read_run_id(root)
    except ManifestError as err:
        print(f"warning: {err}; checkpoints of other runs are not marked foreign", file=sys.stderr)
        return None


def _record(info: CheckpointInfo) -> dict[str, object]:
    manifest = info.manifest
    created = manifest.created_at if manifest else info.path.stat().st_mtime
    return {
        "step": info.step,
        "status": info.status,
        "reason": info.reason,
        "world_size": info.world_size,
        "path": str(info.path),
        "bytes": size_on_disk(info),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created)),
        "run_id": manifest.run_id if manifest else None,
        "problem": info.problem,
    }


def _require_dir(root: Path) -> int | None:
    if not root.exists():
        print(f"error: checkpoint directory {root} does not exist", file=sys.stderr)
        return 2
    if not root.is_dir():
        print(f"error: {root} is not a directory", file=sys.stderr)
        return 2
    return None


def command_ls(args: argparse.Namespace) -> int:
    root = Path(args.dir)
    failed = _require_dir(root)
    if failed is not None:
        return failed
    records = [_record(info) for info in scan(root, _run_id_or_none(root))]
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    if not records:
        print(f"no checkpoints in {root}")
        return 0
    header = f"{'STEP':>9}  {'STATUS':<8}  {'REASON':<10}  {'WORLD':>5}  {'SIZE':>9}  {'TIME (UTC)':<20}  PATH"
    print(header)
    for record in records:
        print(f"{record['step']:>9}  {record['status']:<8}  {record['reason'] or '-':<10}  "
              f"{record['world_size'] if record['world_size'] is not None else '-':>5}  "
              f"{human_bytes(int(record['bytes'])):>9}  {record['time']:<20}  {record['path']}")
        if record["problem"]:
            print(f"{'':>11}{record['problem']}")
    return 0


def command_latest(args: argparse.Namespace) -> int:
    root = Path(args.dir)
    failed = _require_dir(root)
    if failed is not None:
        return 1
    complete = [info for info in scan(root, _run_id_or_none(root)) if info.status == COMPLETE]
    if not complete:
        print(f"error: no complete checkpoint in {root}", file=sys.stderr)
        return 1
    print(complete[-1].path)
    return 0


def command_verify(args: argparse.Namespace) -> int:
    path = Path(args.checkpoint)
    failed = _require_dir(path)
    if failed is not None:
        return failed
    try:
        manifest = read_manifest(path)
    except FileNotFoundError:
        print(f"FAILED: {path} has no {MARKER_NAME}, so it is not a complete checkpoint", file=sys.stderr)
        return 1
    except (OSError, ManifestError) as err:
        print(f"FAILED: {path / MARKER_NAME} cannot be read: {err}", file=sys.stderr)
        return 1
    from resilient.checkpoint.load import verify_checksums  # imports torch, which `resilient run` must not wait for

    problems = verify_checksums(path, manifest)
    for problem in problems:
        print(problem)
    if problems:
        print(f"FAILED: {len(problems)} problem(s) in {path}", file=sys.stderr)
        return 1
    print(f"OK: {len(manifest.files)} files, {human_bytes(manifest.total_bytes)}, match the sizes and "
          f"{manifest.checksum_algorithm} checksums in {path / MARKER_NAME}")
    return 0


def command_clean(args: argparse.Namespace) -> int:
    root = Path(args.dir)
    failed = _require_dir(root)
    if failed is not None:
        return failed
    holder = read_lock_holder(root)
    if holder is not None:
        print(f"error: {root} is in use by a running job (pid {holder.get('pid', '?')} on host "
              f"{holder.get('host', '?')}); cleaning could remove the staging directory of a save in progress. "
              "Run clean when the job has stopped.", file=sys.stderr)
        return 1

    infos = scan(root, _run_id_or_none(root))
    by_name = {info.path.name: info for info in infos}
    unknown = [name for name in args.names if name not in by_name]
    if unknown:
        print(f"error: no checkpoint directory named {', '.join(unknown)} in {root}; `resilient ls {root}` lists "
              "them", file=sys.stderr)
        return 2

    victims = [info for info in infos if info.status == PARTIAL] + [by_name[name] for name in args.names
                                                                     if by_name[name].status != PARTIAL]
    if not victims:
        print(f"nothing to remove in {root}")
        return 0

    verb = "removing" if args.yes else "would remove"
    failed = 0
    for info in victims:
        link = info.path.is_symlink()
        size = "symbolic link, its target is kept" if link else human_bytes(size_on_disk(info))
        print(f"{verb} {info.path} ({info.status}, {size}): {info.problem or 'named on the command line'}")
        if not args.yes:
            continue
        try:
            if link:
                info.path.unlink()
                continue
            # Renamed first, so an interrupted removal never leaves a directory that looks complete.
            aside = info.path.with_name(aside_name(info.step, "deleting"))
            os.rename(info.path, aside)
            shutil.rmtree(aside)
        except OSError as err:
            failed += 1
            print(f"error: could not remove {info.path}: {err}", file=sys.stderr)
    if not args.yes:
        print("dry run: nothing was removed; pass --yes to remove these directories")
    if failed:
        print(f"error: {failed} of {len(victims)} directories could not be removed; fix the errors above and "
              "run the command again", file=sys.stderr)
        return 1
    return 0


def command_demo(args: argparse.Namespace) -> int:
    from resilient.demo import run_demo

    return run_demo(workdir=Path(args.workdir) if args.workdir else None, max_steps=args.max_steps,
                    keep=args.keep_files)


def command_convert(args: argparse.Namespace) -> int:
    from resilient.convert import checkpoint_to_file, checkpoint_to_safetensors, file_to_checkpoint
    from resilient.errors import ResilientError

    src, dst = Path(args.src), Path(args.dst)
    try:
        if src.is_dir():
            if args.safetensors:
                checkpoint_to_safetensors(src, dst)
            else:
                checkpoint_to_file(src, dst, model_only=args.model_only)
        elif src.is_file():
            if args.model_only or args.safetensors:
                print("error: --model-only and --safetensors apply to a checkpoint directory as SRC", file=sys.stderr)
                return 2
            file_to_checkpoint(src, dst)
        else:
            print(f"error: {src} does not exist", file=sys.stderr)
            return 2
    except (ResilientError, ManifestError, OSError) as err:
        print(f"error: converting {src} failed: {err}", file=sys.stderr)
        return 1
    return 0


def command_run(args: argparse.Namespace) -> int:
    import logging

    from resilient.errors import ConfigError
    from resilient.launcher import LaunchOptions, Launcher
    from resilient.signals import parse_signals

    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    try:
        options = LaunchOptions(
            command=tuple(command), ckpt_dir=Path(args.ckpt_dir) if args.ckpt_dir else None,
            signals=parse_signals(part for part in args.signals.split(",") if part.strip()),
            grace=args.grace, max_restarts=args.max_restarts, backoff=args.backoff, hang_timeout=args.hang_timeout,
            requeue=args.requeue,
        )
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="[resilient run] %(asctime)s %(levelname)s %(message)s")
    if options.ckpt_dir is None:
        logging.getLogger("resilient.launcher").warning(
            "No --ckpt-dir: no event journal, and the attempt counter starts at 1 on every launch.")
    try:
        launcher = Launcher(options)
    except OSError as err:
        print(f"error: cannot use --ckpt-dir {options.ckpt_dir}: {err}. Pass a writable directory.", file=sys.stderr)
        return 2
    return launcher.run()


def command_chaos(args: argparse.Namespace) -> int:
    import secrets

    from resilient.chaos import EXIT_USAGE, ChaosOptions, parse_chaos_signals, run_chaos
    from resilient.errors import ConfigError

    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    try:
        options = ChaosOptions(
            command=tuple(command), kills=args.kills,
            signals=parse_chaos_signals(part for part in args.signals.split(",") if part.strip()),
            seed=seed, workdir=Path(args.workdir) if args.workdir else None, keep=args.keep, timeout=args.timeout,
        )
        return run_chaos(options)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE


def command_status(args: argparse.Namespace) -> int:
    from resilient.journal import journal_path, read_journal
    from resilient.launcher.status import render_json, render_table

    root = Path(args.dir)
    failed = _require_dir(root)
    if failed is not None:
        return failed
    path = journal_path(root)
    if path.exists() and not path.is_file():
        print(f"error: {path} is not a regular file; move it away so that a journal can be written there",
              file=sys.stderr)
        return 1
    try:
        contents = read_journal(root)
    except OSError as err:
        print(f"error: cannot read {path}: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(render_json(contents))
        return 0
    if not contents.events:
        print(f"no events in {journal_path(root)}")
        return 0
    print(render_table(contents))
    return 0


def command_requeue(args: argparse.Namespace) -> int:
    import logging

    from resilient.slurm import SlurmJob, requeue

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="[resilient requeue] %(levelname)s %(message)s")
    job = SlurmJob.from_env()
    if job is None:
        print("error: not inside a SLURM job (SLURM_JOB_ID is not set); nothing to requeue", file=sys.stderr)
        return 2
    return 0 if requeue(job) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="resilient",
        description="Preemption-safe PyTorch training: supervise a training command, inspect checkpoints and "
                    "run the demo.",
        epilog=f"Exit statuses of training processes: 0 finished, {EXIT_PREEMPTED} preempted with a "
               "checkpoint committed (restart the same command), anything else a failure.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    ls = commands.add_parser("ls", help="list checkpoint directories and their status")
    ls.add_argument("dir", help="checkpoint directory of a run")
    ls.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    ls.set_defaults(func=command_ls)

    latest = commands.add_parser("latest", help="print the path of the latest complete checkpoint")
    latest.add_argument("dir", help="checkpoint directory of a run")
    latest.set_defaults(func=command_latest)

    verify = commands.add_parser(
        "verify", help="check every file of a checkpoint against its manifest's sizes and checksums",
        description="Read every file listed in CHECKPOINT/manifest.json and compare its size and checksum with "
                    "the manifest. Prints each mismatch and exits 1 on any, 0 when all match.")
    verify.add_argument("checkpoint", help="checkpoint directory (step_NNNNNNNNN)")
    verify.set_defaults(func=command_verify)

    clean = commands.add_parser(
        "clean", help="remove partial and staging directories (a dry run unless --yes)",
        description="List the partial directories of a run (staging directories of unfinished saves, interrupted "
                    "deletions, set-aside and unmarked checkpoints) and, with --yes, remove them. A complete "
                    "checkpoint is removed only when named. Refuses while a job holds the directory's lock.")
    clean.add_argument("dir", help="checkpoint directory of a run")
    clean.add_argument("names", nargs="*", metavar="NAME",
                       help="also remove these directories by name (step_NNNNNNNNN), even when complete")
    clean.add_argument("--yes", action="store_true", help="remove the directories instead of listing them")
    clean.set_defaults(func=command_clean)

    convert = commands.add_parser(
        "convert", help="convert a checkpoint directory to one torch.save file, or such a file back",
        description="With a checkpoint directory as SRC, write DST as one file that torch.load(weights_only=True) "
                    "reads. With such a file as SRC, write a committed checkpoint into the checkpoint directory "
                    "DST, which resilient resumes from.")
    convert.add_argument("src", help="checkpoint directory (step_NNNNNNNNN) or a file made by convert")
    convert.add_argument("dst", help="output file, or the checkpoint directory of a run")
    convert.add_argument("--model-only", action="store_true",
                         help="write only the model's state_dict (parameters and rank 0's buffers)")
    convert.add_argument("--safetensors", action="store_true",
                         help="write the model weights as safetensors (needs the safetensors package)")
    convert.set_defaults(func=command_convert)

    run = commands.add_parser(
        "run", help="run a training command: relay stop signals, enforce the grace period, restart",
        description="Start COMMAND in its own session and supervise its whole process tree: relay stop signals "
                    "to every process that handles them, SIGKILL what is left after the grace period, restart "
                    "after crashes and hangs, and record events in CKPT_DIR/journal.jsonl. Exit statuses: 0 "
                    f"finished; {EXIT_PREEMPTED} stopped with a checkpoint committed (run it again); 124 hung with "
                    "no restarts left; 137 killed after the grace period; 127 command not found; otherwise the "
                    "command's own status.")
    run.add_argument("--ckpt-dir", default=os.environ.get("RESILIENT_CKPT_DIR") or None,
                     help="the run's checkpoint directory, for the journal and the attempt counter "
                          "(default: $RESILIENT_CKPT_DIR)")
    run.add_argument("--grace", type=float, default=30.0,
                     help="seconds from the first stop signal until what is left is SIGKILLed (default 30)")
    run.add_argument("--max-restarts", type=int, default=0,
                     help="how often to start the command again after a crash or hang (default 0)")
    run.add_argument("--backoff", type=float, default=1.0,
                     help="seconds before the first restart, doubled for each further one up to 60 (default 1)")
    run.add_argument("--hang-timeout", type=float, default=None,
                     help="seconds without a completed step on any rank before stacks are dumped and the command "
                          "is killed (default: no watchdog)")
    run.add_argument("--requeue", action="store_true",
                     help="inside a SLURM job, run 'scontrol requeue' (aimed at the array task) before exiting 75; "
                          "only the launcher on the job's first node does")
    run.add_argument("--signals", default="SIGTERM,SIGINT,SIGHUP,SIGUSR1,SIGUSR2",
                     help="comma-separated stop signals to relay (default SIGTERM,SIGINT,SIGHUP,SIGUSR1,SIGUSR2)")
    run.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    run.set_defaults(func=command_run)

    requeue = commands.add_parser(
        "requeue", help="requeue the current SLURM job or array task with scontrol",
        description="Run 'scontrol requeue' for the job in SLURM_JOB_ID, or for the array task "
                    "SLURM_ARRAY_JOB_ID_SLURM_ARRAY_TASK_ID. Exit status: 0 accepted, 1 failed (the error names the "
                    "command and its output), 2 outside a SLURM job.")
    requeue.set_defaults(func=command_requeue)

    status = commands.add_parser("status", help="show the event journal of a run as a timeline")
    status.add_argument("dir", help="checkpoint directory of a run")
    status.add_argument("--json", action="store_true", help="print the events as JSON")
    status.set_defaults(func=command_status)

    chaos = commands.add_parser(
        "chaos", help="kill a training command at random moments and compare its final state with an "
                      "uninterrupted run",
        description="Run COMMAND twice, each time with a fresh directory in place of {ckpt_dir}: once without "
                    "interruption, and once killed --kills times at random moments (some during a save) and "
                    "restarted after each kill until it finishes. Both runs must print final_state_digest=<hex>. "
                    "Exit statuses: 0 the final digests are equal; 1 they differ, or a run failed, hung or printed "
                    "no digest; 2 invalid arguments. See docs/chaos.md.")
    chaos.add_argument("--kills", type=int, required=True, help="how many times to kill the chaos run (at least 1)")
    chaos.add_argument("--signals", default="SIGTERM,SIGUSR1,SIGKILL",
                       help="comma-separated signals to kill with, each used at least once when --kills allows "
                            "(default SIGTERM,SIGUSR1,SIGKILL)")
    chaos.add_argument("--seed", type=int, default=None,
                       help="seed of the kill plan; the report prints it so that a failure can be replayed "
                            "(default: random)")
    chaos.add_argument("--timeout", type=float, default=600.0,
                       help="seconds each run of the command may take before it is SIGKILLed and the check "
                            "fails (default 600)")
    chaos.add_argument("--workdir", default=None,
                       help="new or empty directory for both runs' checkpoints and logs (default: a new temporary "
                            "directory)")
    chaos.add_argument("--keep", action="store_true",
                       help="keep the work directory after a pass; after a failure it is always kept")
    chaos.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --, containing {ckpt_dir}")
    chaos.set_defaults(func=command_chaos)

    demo = commands.add_parser("demo", help="preempt a 2-rank training job, resume it and compare with an "
                                            "uninterrupted run")
    demo.add_argument("--workdir", help="directory for the demo's checkpoints (default: a new temporary one)")
    demo.add_argument("--max-steps", type=int, default=60, help="training steps of each run (default 60)")
    demo.add_argument("--keep-files", action="store_true", help="keep the demo's checkpoints afterwards")
    demo.set_defaults(func=command_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
