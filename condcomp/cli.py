"""``condcomp <command>``: train, distill, eval, generate, export, import-hf, export-hf, upcycle,
compare, analyze, bench, plan, presets.

Each command is a small function over argparse arguments. A :class:`CondcompError` (bad config,
bad data, corrupt checkpoint, ...) is printed as one line, without a traceback, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import NoReturn

from condcomp import flags
from condcomp.errors import CondcompError, StoppedOnMain
from condcomp.ranges import MAX_SIZE


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line, as every other user error is (exit code 2):
    ``condcomp generate: error: argument --top-p: 2.0 must be in (0, 1]; see ...``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="a preset name (condcomp presets lists them) or a TOML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.lr=1e-3 (repeatable)")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="continue the run from its newest checkpoint, or from CHECKPOINT; "
                   "'--resume auto' continues if the run has a checkpoint and starts it "
                   "otherwise (for jobs torchrun restarts: torchrun --max-restarts)")
    p.add_argument("--allow-change", action="append", default=[], metavar="KEY[,KEY...]",
                   help="with --resume: accept new values of these config keys (or sections, "
                   "e.g. data), which change what the run trains; the change is recorded")


def cmd_train(args: argparse.Namespace) -> int:
    from condcomp.config import load_config
    from condcomp.train import train

    cfg = load_config(args.config, args.overrides)
    # --resume alone means the newest checkpoint; --resume PATH a named one; --resume auto
    # the newest if there is one, else a new run (a job that torchrun may restart).
    resume: bool | str = {None: False, "latest": True}.get(args.resume, args.resume)
    allowed = [key.strip() for item in args.allow_change for key in item.split(",") if key.strip()]
    result = train(cfg, resume=resume, allow_changes=allowed)
    if result.final_eval is not None and _rank() == 0:
        e = result.final_eval
        print(f"done: {result.steps} steps in {result.run_dir}; val loss {e.loss:.4f}, "
              f"perplexity {e.perplexity:.2f}, bits/byte {e.bits_per_byte:.4f}")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    """``condcomp train`` with ``distill.teacher`` set to ``--teacher`` (which wins over a
    ``--set distill.teacher``)."""
    args.overrides = [*args.overrides, f"distill.teacher={json.dumps(args.teacher)}"]
    return cmd_train(args)


def cmd_eval(args: argparse.Namespace) -> int:
    from condcomp.data import prepare_data
    from condcomp.evaluate import evaluate
    from condcomp.runs import load_run
    from condcomp.runtime import autocast_dtype, resolve_device

    device = resolve_device(args.device)
    run = load_run(args.run_dir, args.checkpoint, device)
    data = prepare_data(run.cfg.data, tokenizer=run.tokenizer, log=lambda s: print(s, file=sys.stderr))
    tc = run.cfg.train
    result = evaluate(run.model, data.val, batch_size=tc.batch_size, seq_len=tc.seq_len,
                      max_tokens=args.max_tokens or len(data.val),
                      bytes_per_token=data.val_bytes_per_token, device=device,
                      dtype=autocast_dtype(device, tc.dtype))
    summary = {"run_dir": str(args.run_dir), "checkpoint": str(run.checkpoint.path),
               "step": run.checkpoint.step, **result.as_dict()}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{run.checkpoint.path} (step {run.checkpoint.step}): val loss {result.loss:.4f}, "
              f"perplexity {result.perplexity:.2f}, bits/byte {result.bits_per_byte:.4f} "
              f"over {result.tokens:,} tokens")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from condcomp.data import StreamDecoder
    from condcomp.generate import Sampling, encode_prompt, generate
    from condcomp.runs import load_run
    from condcomp.runtime import resolve_device

    run = load_run(args.run_dir, args.checkpoint, resolve_device(args.device))
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    prompt_ids = encode_prompt(run.tokenizer, args.prompt)
    stream = StreamDecoder(run.tokenizer)
    # The prompt as its tokens read back: bytes that are not UTF-8 show as U+FFFD, where
    # printing them as given would fail.
    sys.stdout.write(run.tokenizer.decode(prompt_ids))

    def emit(token_id: int) -> None:
        sys.stdout.write(stream.push(token_id))
        sys.stdout.flush()

    decode_step = None
    if args.compile:
        from condcomp.generate import compile_decode_step

        decode_step = compile_decode_step(run.model)
    generate(run.model, prompt_ids, args.max_new_tokens, sampling, on_token=emit, seed=args.seed,
             stop_id=run.tokenizer.eos_id, decode_step=decode_step)
    sys.stdout.write(stream.flush() + "\n")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from condcomp.export import export_safetensors

    out, ckpt = export_safetensors(args.run_dir, args.checkpoint, args.out)
    print(f"wrote {out}: the weights of {ckpt.path} (step {ckpt.step})")
    return 0


def cmd_import_hf(args: argparse.Namespace) -> int:
    from condcomp.hf.folders import import_hf

    arch, ckpt = import_hf(args.hf_dir, args.run_dir, args.tokenizer, args.overrides)
    print(f"wrote {args.run_dir}: the {arch.class_name} of {args.hf_dir} as checkpoint "
          f"{ckpt}")
    return 0


def cmd_export_hf(args: argparse.Namespace) -> int:
    from condcomp.hf.folders import export_hf

    arch, ckpt = export_hf(args.run_dir, args.hf_dir, args.checkpoint)
    print(f"wrote {args.hf_dir}: {ckpt.path} (step {ckpt.step}) as {arch.class_name}")
    return 0


def cmd_upcycle(args: argparse.Namespace) -> int:
    from condcomp.errors import ConfigError
    from condcomp.surgery.upcycle import format_report, upcycle

    if args.config is None:
        raise ConfigError("upcycle needs --config: the target model, a preset (condcomp presets "
                          "lists them) or a TOML file, e.g. --config top2")
    result = upcycle(args.source, args.config, args.out_run, args.overrides, args.checkpoint,
                     args.noise, args.eval_tokens)
    print(format_report(result))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from condcomp.compare import run_suite

    report = run_suite(args.suite, out_dir=args.out, overrides=args.overrides)
    print(f"report: {report}")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from condcomp.analyze.write import analyze_run
    from condcomp.runtime import resolve_device

    report = analyze_run(args.run_dir, args.checkpoint, args.tokens, args.out,
                         resolve_device(args.device), log=lambda s: print(s, file=sys.stderr))
    print(f"report: {report} (and report.html, analysis.json and the figures beside it)")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from condcomp.config import load_config
    from condcomp.plan import make_plan
    from condcomp.plan.table import format_plan

    plan = make_plan(load_config(args.config, args.overrides), args.world_size)
    print(json.dumps(plan.as_dict(), indent=2) if args.json else format_plan(plan))
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from condcomp import presets

    if args.name:
        sys.stdout.write(presets.builtin_text(args.name))
        return 0
    for title, entries in (("presets", presets.list_presets()), ("suites", presets.list_suites())):
        print(f"{title}:")
        width = max(len(name) for name, _ in entries)
        for name, description in entries:
            print(f"  {name:<{width}}  {description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from condcomp import __version__, bench
    from condcomp.analyze import DEFAULT_TOKENS
    from condcomp.generate import GREEDY_BELOW, Sampling

    parser = _Parser(
        prog="condcomp", description="Conditional computation for transformer language models.")
    parser.add_argument("--version", action="version", version=f"condcomp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from a config")
    _add_train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("distill", help="train a student model from a config on the data and "
                       "a trained teacher run's probabilities (the [distill] keys)")
    p.add_argument("--teacher", required=True, metavar="RUN_DIR",
                   help="the teacher: a run folder (its newest checkpoint) or one of its "
                   "checkpoints; sets distill.teacher")
    _add_train_args(p)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("eval", help="validation loss, perplexity and bits/byte of a run")
    p.add_argument("run_dir")
    p.add_argument("--checkpoint", help="a checkpoint directory (default: the newest)")
    p.add_argument("--max-tokens", type=flags.number(int, ge=0), default=0,
                   help="0: the whole validation split")
    p.add_argument("--device", type=flags.device, default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="sample text from a trained run")
    p.add_argument("run_dir")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=flags.number(int, gt=0), default=200)
    p.add_argument("--temperature", type=flags.like(Sampling, "temperature"), default=0.8,
                   help=f"0 (or below {GREEDY_BELOW:g}): greedy")
    p.add_argument("--top-k", type=flags.like(Sampling, "top_k"), default=0, help="0: off")
    p.add_argument("--top-p", type=flags.like(Sampling, "top_p"), default=1.0,
                   help="nucleus sampling, in (0, 1]; 1: off")
    p.add_argument("--seed", type=flags.seed, default=None)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (pays off after a few hundred tokens)")
    p.add_argument("--checkpoint")
    p.add_argument("--device", type=flags.device, default="auto", help="auto | cpu | cuda | cuda:N")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("export", help="write a checkpoint's weights (single-process or "
                       "sharded) as one safetensors file")
    p.add_argument("run_dir")
    p.add_argument("--checkpoint", help="a checkpoint directory (default: the newest)")
    p.add_argument("--out", required=True, metavar="FILE.safetensors",
                   help="the file to write, with the tensor names of a single-process "
                   "checkpoint's model.safetensors")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import-hf", help="an HF save_pretrained folder (Llama, Mixtral, "
                       "Qwen3-MoE, OLMoE) as a run folder that eval, generate and train read")
    p.add_argument("hf_dir")
    p.add_argument("run_dir", help="the run folder to write (new or empty)")
    p.add_argument("--tokenizer", choices=["auto", "byte"], default="auto",
                   help="auto: the folder's tokenizer.json if it has one, else the byte "
                   "tokenizer; byte: the byte tokenizer")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a data.* or train.* key of the run config, e.g. --set "
                   "data.corpus=text.txt (repeatable)")
    p.set_defaults(func=cmd_import_hf)

    p = sub.add_parser("export-hf", help="a run's checkpoint as a folder HF "
                       "AutoModelForCausalLM.from_pretrained loads (Llama for dense runs, "
                       "Mixtral / Qwen3-MoE / OLMoE for MoE runs)")
    p.add_argument("run_dir")
    p.add_argument("hf_dir", help="the folder to write (new or empty)")
    p.add_argument("--checkpoint", help="a checkpoint directory (default: the newest)")
    p.set_defaults(func=cmd_export_hf)

    p = sub.add_parser("upcycle", help="a dense run (or HF Llama folder) as the first "
                       "checkpoint of a conditional model: MoE experts copied from the FFN, "
                       "MoD, AltUp, MoT, Sparse FF")
    p.add_argument("source", help="a dense run folder or an HF save_pretrained Llama folder")
    _add_config_args(p)
    p.add_argument("out_run", help="the run folder to write (new or empty)")
    p.add_argument("--checkpoint", help="a checkpoint of the source run (default: the newest)")
    p.add_argument("--noise", type=flags.number(float, ge=0.0, le=1.0), default=0.0,
                   metavar="STD", help="Gaussian noise added to each expert's weights, in "
                   "units of the weight's std (default 0: exact copies)")
    p.add_argument("--eval-tokens", type=flags.number(int, ge=0, le=MAX_SIZE), default=8192,
                   help="validation tokens to score the source and the upcycled model on "
                   "(0: skip)")
    p.set_defaults(func=cmd_upcycle)

    p = sub.add_parser("compare", help="train a suite of models at equal budget and report")
    p.add_argument("suite", help="a suite name, e.g. demo (condcomp presets lists them), or a "
                   "suite TOML file")
    p.add_argument("--out", help="output folder (default: runs/<suite name>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of every model's config, e.g. --set train.max_steps=50")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("analyze", help="a report of what a run's routing learned: expert "
                       "load, co-activation, preferred tokens, MoD, Sparse FF and AltUp")
    p.add_argument("run_dir")
    p.add_argument("--checkpoint", help="a checkpoint directory (default: the newest)")
    p.add_argument("--tokens", type=flags.number(int, gt=0, le=MAX_SIZE), default=DEFAULT_TOKENS,
                   help="validation tokens to route (default: %(default)s)")
    p.add_argument("--out", help="the report folder (default: RUN_DIR/analysis)")
    p.add_argument("--device", type=flags.device, default="auto", help="auto | cpu | cuda | cuda:N")
    p.set_defaults(func=cmd_analyze)

    bench.add_parser(sub)

    p = sub.add_parser("plan", help="what each rank of a run would hold (parameters, gradients, "
                       "optimizer state, activations), send (MoE all-to-all) and compute, "
                       "without allocating the model")
    _add_config_args(p)
    p.add_argument("--world-size", type=flags.number(int, gt=0, le=MAX_SIZE), default=1,
                   help="processes torchrun would start (1: a plain single-process run); "
                   "the layout is the config's [dist] table, e.g. --set dist.ep=8")
    p.add_argument("--json", action="store_true", help="print every number as JSON")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("presets", help="list the built-in presets and suites, or print one")
    p.add_argument("name", nargs="?",
                   help="a preset or suite whose TOML to print, to copy and edit")
    p.set_defaults(func=cmd_presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help or --version (0), or a bad flag (2, its line printed)
        return 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 2
    from condcomp.runtime import flush_denormals

    flush_denormals()
    try:
        return int(args.func(args) or 0)
    except StoppedOnMain:  # rank 0 printed why
        return 2
    except CondcompError as exc:
        where = f" (rank {_rank()})" if _rank() else ""
        print(f"condcomp: error{where}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("condcomp: interrupted", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as exc:
        # Sizes within their ranges can still exceed a machine's memory (d_model = 500000 is a
        # valid width and a 1 TB matrix); that is the user's to fix, so it gets one line too.
        if not _out_of_memory(exc):
            raise
        print(f"condcomp: error: out of memory ({_first_line(exc)}); the model, batch or "
              "context is too large for this device: make it smaller, or use a device with "
              "more memory", file=sys.stderr)
        return 2


def console() -> NoReturn:
    """The ``condcomp`` console script and ``python -m condcomp``: :func:`main`, then exit.

    A ``torchrun`` worker leaves by ``os._exit`` once its output is flushed: with torch 2.13 a
    gloo job whose ranks built a device mesh aborts in about a third of its exits while the
    interpreter tears down ("terminate called without an active exception", status -6), after
    all the work is done and the process group destroyed; torchrun would report the finished
    job as failed, and restart it under --max-restarts. Skipping the teardown is safe there:
    files are closed and the process group is gone by then."""
    code = main()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _rank() -> int:
    """This process's rank in a torchrun job (0 alone): one voice per job."""
    return int(os.environ.get("RANK", "0") or 0)


def _out_of_memory(exc: BaseException) -> bool:
    """torch's allocation failures: ``torch.OutOfMemoryError`` (a ``RuntimeError``) on CUDA,
    a ``RuntimeError`` from the CPU allocator, Python's ``MemoryError``."""
    text = str(exc)
    return (isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"
            or "can't allocate memory" in text or "out of memory" in text.lower())


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


if __name__ == "__main__":
    sys.exit(main())
