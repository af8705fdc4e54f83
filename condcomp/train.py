"""The training loop: AdamW, warm-up + cosine, clipping, accumulation, checkpoints, resume.

The loop knows nothing of any family's internals: it adds the model's summed ``aux_loss`` to
the LM loss and logs whatever statistics the layers report.

Resuming is exact. The batch of step ``s`` is a pure function of ``(seed, s)``, and a
checkpoint carries the weights, the optimizer and scheduler states and the RNG states, so a run
stopped at any checkpoint (even by SIGKILL) and resumed reproduces the uninterrupted run's
losses bit for bit on the CPU.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from condcomp import checkpoint as ckpt_lib
from condcomp.config import RunConfig
from condcomp.data import PreparedData, TrainBatches, load_tokenizer, prepare_data
from condcomp.errors import CondcompError, ConfigError, TrainingError, storage_error
from condcomp.evaluate import EvalResult, evaluate
from condcomp.machine_load import LoadMeter
from condcomp.master_weights import check_param_dtype, master_weights_for
from condcomp.model import TransformerLM
from condcomp.run_changes import check_resume
from condcomp.run_changes import describe as describe_changes
from condcomp.run_lock import RunLock
from condcomp.runs import (
    CONFIG_FILE,
    METRICS_FILE,
    TB_DIR,
    TOKENIZER_DIR,
    load_weights,
    parse_metrics,
    read_config,
    remove_leftovers,
    run_dir_of,
    save_config,
    write_atomically,
)
from condcomp.runtime import autocast, autocast_dtype, flush_denormals, resolve_device
from condcomp.tb_events import EventWriter


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_eval: EvalResult | None
    train_tokens_per_s: float


def lr_multiplier(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up, then cosine decay to ``min_ratio`` (Loshchilov & Hutter 2017)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(parameters: Iterable[torch.nn.Parameter], cfg: RunConfig,
                   device: torch.device) -> torch.optim.AdamW:
    """AdamW over ``parameters`` (the model's, or with master weights the masters in their
    place)."""
    # Weight decay on matrices only: norms' gains and biases are not decayed (nanoGPT, GPT-3),
    # nor parameters a layer marks ``no_weight_decay`` (AltUp's mixing coefficients).
    def decays(p: torch.nn.Parameter) -> bool:
        return p.dim() >= 2 and not getattr(p, "no_weight_decay", False)

    params = [p for p in parameters if p.requires_grad]
    decay = [p for p in params if decays(p)]
    no_decay = [p for p in params if not decays(p)]
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2),
                             fused=device.type == "cuda")


class MetricsLog:
    """JSONL rows plus TensorBoard scalars. On resume, rows after the checkpoint (written by
    the interrupted process) are dropped, and TensorBoard purges them too, so no step is logged
    twice; a line cut short by a crash is dropped with them."""

    def __init__(self, run_dir: Path, resume_step: int | None,
                 log: Callable[[str], None] = print) -> None:
        self.path = run_dir / METRICS_FILE
        if resume_step is not None:
            rows = parse_metrics(self.path, warn=lambda m: log(f"warning: {m}"))
            write_atomically(self.path, "".join(json.dumps(row) + "\n" for row in rows
                                                if row["step"] <= resume_step))
        else:
            self.path.unlink(missing_ok=True)
        try:
            self._file = open(self.path, "a")  # noqa: SIM115 - closed in close()
            # Events after the checkpoint's step, logged by the interrupted process, are hidden.
            self._tb = EventWriter(run_dir / TB_DIR,
                                   purge_step=None if resume_step is None else resume_step + 1)
        except OSError as exc:
            raise storage_error(exc, f"cannot write the metrics of {run_dir}") from None

    def record(self, row: dict[str, Any]) -> None:
        """Append ``row`` to metrics.jsonl only (a note such as a config change, no scalars)."""
        try:
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()
        except OSError as exc:
            raise storage_error(exc, f"cannot write {self.path}") from None

    def write(self, row: dict[str, Any]) -> None:
        self.record(row)
        try:
            for key, value in row.items():
                if key in ("step", "kind"):
                    continue
                if isinstance(value, (int, float)):
                    self._tb.scalar(key, value, row["step"])
                elif isinstance(value, list):  # e.g. tokens per expert: one bar per expert
                    self._tb.histogram_raw(key, row["step"], value)
        except OSError as exc:
            where = self.path.parent / TB_DIR
            raise storage_error(exc, f"cannot write the TensorBoard events in {where}") from None

    def close(self) -> None:
        # Every row was flushed when written, and write() reported any failure then: a failure
        # to close loses nothing, and must not hide the error that ended the run.
        with contextlib.suppress(OSError):
            self._file.close()
        with contextlib.suppress(OSError):
            self._tb.close()


def _loggable_stats(stats: dict[str, Any]) -> dict[str, float | list[float]]:
    """Layer statistics as JSON values: scalars as floats, vectors (tokens per expert) as
    lists, so the report can draw them over training."""
    out: dict[str, float | list[float]] = {}
    for key, value in stats.items():
        if isinstance(value, torch.Tensor):
            value = value.item() if value.numel() == 1 else value.detach().float().cpu().tolist()
        out[key] = value if isinstance(value, list) else float(value)
    return out


def train(cfg: RunConfig, resume: bool | str | Path = False,
          log: Callable[[str], None] = print, allow_changes: Collection[str] = ()
          ) -> TrainResult:
    """Train ``cfg`` into its run folder; ``resume`` continues from the newest checkpoint
    (``True``) or from a named one. A resume refuses a config that changes what the run trains
    unless ``allow_changes`` names the keys (or sections) it may change
    (:mod:`condcomp.run_changes`)."""
    run_dir = run_dir_of(cfg)
    if resume and not (run_dir / CONFIG_FILE).is_file():
        raise CondcompError(f"--resume: {run_dir} holds no run to resume; drop --resume to "
                            "start one")
    if allow_changes and not resume:
        raise ConfigError("--allow-change accepts changes to a resumed run; add --resume, or "
                          "drop --allow-change for a new run")
    # Held for the whole run and taken before anything in the folder is written, so that no
    # other train, resume or compare can interleave its files with this run's.
    with RunLock(run_dir, log=log):
        return _train(cfg, run_dir, resume, log, allow_changes)


def _check_own_checkpoint(run_dir: Path, path: Path) -> None:
    """A resumed run continues its own record (config.json, metrics.jsonl), so the checkpoint
    it resumes from must be one of its own: another run's weights would make the record lie
    about what was trained before the resumed step."""
    own = ckpt_lib.checkpoint_dir(run_dir).resolve()
    if path.resolve().parent != own:
        raise CondcompError(
            f"--resume {path}: not a checkpoint of {run_dir} (its checkpoints are in {own}); "
            f"name one of those, or start a new run from that checkpoint's weights with "
            f"--set train.init_from='\"{path}\"'")


def _train(cfg: RunConfig, run_dir: Path, resume: bool | str | Path,
           log: Callable[[str], None], allow_changes: Collection[str]) -> TrainResult:
    tc = cfg.train
    device = resolve_device(tc.device)
    flush_denormals()
    amp_dtype = autocast_dtype(device, tc.dtype)
    check_param_dtype(tc.param_dtype, amp_dtype, f"set train.dtype = {tc.param_dtype!r}")
    leftovers = remove_leftovers(run_dir)
    if leftovers:
        log(f"removed {len(leftovers)} unfinished write(s) of an earlier process in {run_dir}: "
            f"{', '.join(path.name for path in leftovers)}")

    ckpt = None
    changes: dict[str, tuple[Any, Any]] = {}
    if resume:
        saved = read_config(run_dir)
        if cfg.model.vocab_size == 0:  # automatic: the vocabulary the run was trained with
            cfg.model.vocab_size = saved.model.vocab_size
        changes = check_resume(run_dir, saved, cfg, allow_changes)
        if resume is not True:
            _check_own_checkpoint(run_dir, Path(resume))
        ckpt = ckpt_lib.resolve_checkpoint(run_dir, None if resume is True else resume)
        tokenizer = load_tokenizer(run_dir / TOKENIZER_DIR)
    else:
        if ckpt_lib.list_checkpoints(run_dir):
            raise CondcompError(f"{run_dir} already holds checkpoints; pass --resume to continue "
                                "that run, or choose another run name / out_dir")
        tokenizer = None

    data: PreparedData = prepare_data(cfg.data, tokenizer=tokenizer, log=log)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = data.tokenizer.vocab_size
    elif cfg.model.vocab_size < data.tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size = {cfg.model.vocab_size} is smaller than the "
                          f"tokenizer's {data.tokenizer.vocab_size}; set it to 0 (automatic)")
    if not resume:
        save_config(cfg, run_dir)
        try:
            data.tokenizer.save(run_dir / TOKENIZER_DIR)
        except OSError as exc:
            raise storage_error(exc, f"cannot write the tokenizer into {run_dir / TOKENIZER_DIR}"
                                ) from None

    torch.manual_seed(tc.seed)
    model = TransformerLM(cfg.model).to(device)
    if tc.init_from and ckpt is None:
        # A new run from trained weights (e.g. the Mixture-of-Tokens transition to sparse):
        # the weights only; optimizer, schedule and data start afresh.
        source = Path(tc.init_from)
        init = ckpt_lib.resolve_checkpoint(source, None) if (source / "checkpoints").is_dir() \
            else ckpt_lib.resolve_checkpoint(source.parent.parent, source)
        load_weights(init, model, map_location=device)
        log(f"initialised the weights from {init.path}")
    state = None if ckpt is None else ckpt_lib.load_checkpoint(ckpt, model, run_dir,
                                                                 map_location=device)
    # Master weights take the loaded fp32 weights; the optimizer is built over them.
    masters = master_weights_for(model, tc.param_dtype)
    # In the model's order: the gradient norm sums in this order, and the figures recorded
    # before master weights existed must reproduce bit for bit.
    opt_params = list(model.parameters()) if masters is None else masters.optimizer_params()
    optimizer = make_optimizer(opt_params, cfg, device)
    total = tc.total_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, tc.warmup_steps, total, tc.min_lr_ratio))

    step, elapsed, nonfinite = 0, 0.0, 0
    if state is not None:
        assert ckpt is not None
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng_cpu"].cpu())
        if device.type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"].cpu(), device)
        step, elapsed, nonfinite = state["step"], state["elapsed_s"], state["nonfinite"]
        log(f"resumed {run_dir} from {ckpt.path} at step {step}")

    metrics = MetricsLog(run_dir, resume_step=step if ckpt is not None else None, log=log)
    # Tokens are counted from the checkpoint's count, so a batch size changed on resume (with
    # --allow-change) does not rewrite the count of the steps before it.
    tokens_at_start = state.get("tokens", step * tc.tokens_per_step) if state else 0
    start_step = step

    def tokens_at(at_step: int) -> int:
        return tokens_at_start + (at_step - start_step) * tc.tokens_per_step

    if changes:
        # The record says what is trained from here on: config.json takes the new values, and
        # metrics.jsonl says which changed, from which step.
        save_config(cfg, run_dir)
        metrics.record({"kind": "config_change", "step": step, "tokens": tokens_at(step),
                        "elapsed_s": elapsed,
                        "changes": {key: list(change) for key, change in changes.items()}})
        log(f"resuming with a changed config: {describe_changes(changes)}")
    batches = TrainBatches(data.train, tc.batch_size, tc.seq_len, tc.seed)
    forward = torch.compile(model) if tc.compile else model
    n_params, n_active = model.num_params(), model.num_params(active_only=True)
    flops_per_token = model.flops_per_token(tc.seq_len)
    log(f"model: {n_params / 1e6:.2f}M params ({n_active / 1e6:.2f}M active), "
        f"{flops_per_token / 1e6:.2f} MFLOPs/token forward; {total} steps of "
        f"{tc.tokens_per_step} tokens on {device}")

    def evaluate_now() -> EvalResult:
        return evaluate(model, data.val, batch_size=tc.batch_size, seq_len=tc.seq_len,
                        max_tokens=tc.eval_tokens, bytes_per_token=data.val_bytes_per_token,
                        device=device, dtype=amp_dtype)

    def save(at_step: int) -> Path:
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "rng_cpu": torch.get_rng_state(), "step": at_step, "elapsed_s": elapsed,
                 "nonfinite": nonfinite, "tokens": tokens_at(at_step)}
        if device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(device)
        with masters.full_precision() if masters else contextlib.nullcontext():
            return ckpt_lib.save_checkpoint(run_dir, at_step, model, state, tc.keep_last)

    progress = _progress_bar(tc.progress, total, step)
    final_eval: EvalResult | None = None
    window_tokens, window_time = 0, 0.0
    tokens_per_s = 0.0
    # Other processes' share of the CPUs since the last train row, logged beside tokens_per_s so
    # that a throughput taken on a busy machine says so (condcomp compare marks it).
    load = LoadMeter()
    model.train()
    try:
        while step < total:
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), device=device)
            aux_sum = torch.zeros((), device=device)
            for micro in range(tc.grad_accum):
                x, y = batches.get(step * tc.grad_accum + micro)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with autocast(device, amp_dtype):
                    out = forward(x, y)
                    loss = out.total_loss / tc.grad_accum
                loss.backward()
                loss_sum += out.loss.detach() / tc.grad_accum
                aux_sum += out.aux_loss.detach() / tc.grad_accum
            grad_norm = torch.nn.utils.clip_grad_norm_(
                opt_params, tc.grad_clip if tc.grad_clip > 0 else float("inf"))
            train_loss, grad_norm_f = loss_sum.item(), grad_norm.item()
            skipped = not (math.isfinite(train_loss) and math.isfinite(grad_norm_f))
            if skipped:
                nonfinite += 1
            else:
                nonfinite = 0
                optimizer.step()
                if masters is not None:
                    masters.copy_to_model()
                model.after_optimizer_step()
            optimizer.zero_grad(set_to_none=True)
            lr = scheduler.get_last_lr()[0]
            with warnings.catch_warnings():
                # A skipped update before the first real one would make torch warn that the
                # schedule steps before the optimizer; the schedule follows the step count.
                warnings.simplefilter("ignore", UserWarning)
                scheduler.step()
            step += 1
            dt = time.perf_counter() - t0
            elapsed += dt
            window_tokens += tc.tokens_per_step
            window_time += dt
            progress.update(1)

            if skipped or step % tc.log_every == 0 or step == total:
                tokens_per_s = window_tokens / max(window_time, 1e-9)
                window_tokens, window_time = 0, 0.0
                row = {"kind": "train", "step": step, "tokens": tokens_at(step),
                       "elapsed_s": elapsed, "train_loss": train_loss, "aux_loss": aux_sum.item(),
                       "lr": lr, "grad_norm": grad_norm_f, "tokens_per_s": tokens_per_s,
                       "other_cpu_share": load.lap().other_cpu_share}
                mfu = model.estimate_mfu(tokens_per_s, tc.seq_len, device)
                if mfu is not None:
                    row["mfu"] = mfu
                if skipped:
                    row["skipped_nonfinite"] = nonfinite
                row.update(_loggable_stats(out.stats))
                metrics.write(row)
                progress.set_postfix(loss=f"{train_loss:.4f}", tok_s=f"{tokens_per_s:,.0f}")
            if skipped:
                log(f"step {step}: non-finite loss ({train_loss}) or gradient norm "
                    f"({grad_norm_f}); update skipped ({nonfinite} in a row)")
                if nonfinite >= tc.max_nonfinite:
                    path = save(step)
                    raise TrainingError(
                        f"{nonfinite} non-finite steps in a row (limit train.max_nonfinite = "
                        f"{tc.max_nonfinite}); stopped at step {step} with checkpoint {path}. "
                        "Lower train.lr, raise train.warmup_steps, or check the data")
            if step % tc.eval_every == 0 or step == total:
                final_eval = evaluate_now()
                metrics.write({"kind": "eval", "step": step, "tokens": tokens_at(step),
                               "elapsed_s": elapsed, **final_eval.as_dict()})
                progress.write(f"step {step}: val loss {final_eval.loss:.4f}, "
                               f"bits/byte {final_eval.bits_per_byte:.4f}")
            if step % tc.ckpt_every == 0 or step == total:
                save(step)
    finally:
        progress.close()
        metrics.close()
    if final_eval is None:  # resumed at the end: nothing left to train
        final_eval = evaluate_now()
    return TrainResult(run_dir, step, final_eval, tokens_per_s)


def _progress_bar(enabled: bool, total: int, initial: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step",
                dynamic_ncols=True, desc="train")
