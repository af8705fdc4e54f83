"""The training loop: AdamW, warm-up + cosine, clipping, accumulation, checkpoints, resume.

One loop serves a single process and every rank of a ``torchrun`` job (:class:`Trainer`). It
knows nothing of any family's internals: it adds the model's summed ``aux_loss`` to the LM
loss and logs whatever statistics the layers report. With a teacher (``[distill]``), the LM
loss is the distillation objective a :class:`~condcomp.surgery.distill.Distiller` computes.

Resuming is exact. The batch of step ``s`` is a pure function of ``(seed, s)``, and a
checkpoint carries the weights, the optimizer and scheduler states and the RNG states, so a run
stopped at any checkpoint (even by SIGKILL) and resumed reproduces the uninterrupted run's
losses bit for bit on the CPU. Under ``torchrun`` a rank's slice of step ``s`` is a pure
function of ``(seed, s, rank, world size)``, so a job restarted from its newest checkpoint sees
every global batch exactly once.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from condcomp import checkpoint as ckpt_lib
from condcomp.config import RunConfig
from condcomp.data import PreparedData, TrainBatches, load_tokenizer, prepare_data
from condcomp.distributed.batching import rank_batch
from condcomp.distributed.checkpoint import save_sharded
from condcomp.distributed.context import (
    SINGLE,
    DistContext,
    init_distributed,
    rank_device,
    shutdown,
)
from condcomp.distributed.data_parallel import (
    check_precision,
    clip_grad_norm,
    finish_gradients,
    reshard,
    wrap_model,
)
from condcomp.distributed.expert_parallel import shard_experts
from condcomp.errors import CondcompError, ConfigError, TrainingError, storage_error
from condcomp.evaluate import EvalResult, evaluate
from condcomp.machine_load import LoadMeter, MachineLoad, own_cpu_s
from condcomp.master_weights import (
    PARAM_DTYPES,
    MasterWeights,
    check_param_dtype,
    master_weights_for,
)
from condcomp.metrics_log import MetricsLog, loggable_stats
from condcomp.model import TransformerLM
from condcomp.router_health import RouterHealth
from condcomp.router_health import describe as describe_router_warning
from condcomp.run_changes import check_resume
from condcomp.run_changes import describe as describe_changes
from condcomp.run_lock import RunLock
from condcomp.runs import (
    CONFIG_FILE,
    TOKENIZER_DIR,
    read_config,
    remove_leftovers,
    run_dir_of,
    save_config,
)
from condcomp.runtime import autocast, autocast_dtype, flush_denormals, resolve_device
from condcomp.surgery.distill import check_teacher, load_distiller
from condcomp.training_state import load_training_state, load_weights

AUTO = "auto"  # resume: continue if the run has a checkpoint, else start it


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
                   device: torch.device, plain_tensors: bool = True) -> torch.optim.AdamW:
    """AdamW over ``parameters`` (the model's, or with master weights the masters in their
    place). ``plain_tensors=False``: some are DTensors (sharded), possibly over different
    meshes (experts, the rest), which the multi-tensor kernels cannot take in one call."""
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
                             fused=device.type == "cuda" and plain_tensors,
                             foreach=None if plain_tensors else False)


def train(cfg: RunConfig, resume: bool | str | Path = False,
          log: Callable[[str], None] = print, allow_changes: Collection[str] = ()
          ) -> TrainResult:
    """Train ``cfg`` into its run folder; ``resume`` continues from the newest checkpoint
    (``True``) or from a named one. A resume refuses a config that changes what the run trains
    unless ``allow_changes`` names the keys (or sections) it may change
    (:mod:`condcomp.run_changes`). ``resume="auto"``: the newest checkpoint if the run has one,
    else a new run: how a job launched with ``torchrun --max-restarts`` comes back.

    Launched by ``torchrun``, every process calls this: they form one data-parallel job
    (``[dist]``, :mod:`condcomp.distributed`), rank 0 writes the run folder's record, and
    every rank writes its shards of each checkpoint."""
    run_dir = run_dir_of(cfg)
    if resume == AUTO:
        resume = bool(ckpt_lib.list_checkpoints(run_dir))
    if resume and not (run_dir / CONFIG_FILE).is_file():
        raise CondcompError(f"--resume: {run_dir} holds no run to resume; drop --resume to "
                            "start one")
    if allow_changes and not resume:
        raise ConfigError("--allow-change accepts changes to a resumed run; add --resume, or "
                          "drop --allow-change for a new run")
    ctx = init_distributed(cfg.dist, resolve_device(cfg.train.device).type)
    try:
        with contextlib.ExitStack() as held:
            # Held for the whole run and taken before anything in the folder is written, so
            # that no other train, resume or compare can interleave its files with this run's.
            def lock() -> None:
                held.enter_context(RunLock(run_dir, log=log))

            ctx.on_main(lock)
            return Trainer(cfg, run_dir, ctx, log).run(resume, allow_changes)
    finally:
        shutdown(ctx)


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


@dataclass
class _Start:
    """What rank 0 found in the run folder, for every rank."""

    checkpoint: ckpt_lib.Checkpoint | None
    changes: dict[str, tuple[Any, Any]]
    vocab_size: int


class Trainer:
    """One run, on one process or on one rank of a ``torchrun`` job: the same loop either way.

    A single process is a world of one (:data:`condcomp.distributed.SINGLE`): it reads the
    whole global batch, runs no collective and writes single-file checkpoints. Under
    ``torchrun`` each rank reads its slice of every global batch, the model is wrapped for data
    parallelism (and its experts sharded), and checkpoints are sharded.
    """

    def __init__(self, cfg: RunConfig, run_dir: Path, ctx: DistContext,
                 log: Callable[[str], None]) -> None:
        tc = cfg.train
        self.cfg, self.tc, self.run_dir, self.ctx = cfg, tc, run_dir, ctx
        self.log = log if ctx.is_main else _silent
        self.device = rank_device(resolve_device(tc.device), ctx)
        flush_denormals()
        self.amp_dtype = autocast_dtype(self.device, tc.dtype)
        check_param_dtype(tc.param_dtype, self.amp_dtype, f"set train.dtype = {tc.param_dtype!r}")
        check_precision(ctx, tc.param_dtype)
        # This rank's slice of every global batch of batch_size * grad_accum sequences.
        self.micro_batch, self.accum = rank_batch(tc.batch_size, tc.grad_accum, ctx.world_size)
        self.rows_per_rank = self.micro_batch * self.accum
        self.masters: MasterWeights | None = None
        self.elapsed, self.nonfinite = 0.0, 0
        self.health = RouterHealth(cfg.health)

    # ------------------------------------------------------------------ the run folder

    def _start_folder(self, resume: bool | str | Path, allow_changes: Collection[str]
                      ) -> tuple[_Start, PreparedData | None]:
        """Rank 0: check the folder, prepare the data, write config and tokenizer."""
        cfg, run_dir, log = self.cfg, self.run_dir, self.log
        leftovers = remove_leftovers(run_dir)
        if leftovers:
            log(f"removed {len(leftovers)} unfinished write(s) of an earlier process in "
                f"{run_dir}: {', '.join(path.name for path in leftovers)}")
        ckpt, changes, tokenizer = None, {}, None
        if resume:
            saved = read_config(run_dir)
            if cfg.model.vocab_size == 0:  # automatic: the vocabulary the run was trained with
                cfg.model.vocab_size = saved.model.vocab_size
            changes = check_resume(run_dir, saved, cfg, allow_changes)
            if resume is not True:
                _check_own_checkpoint(run_dir, Path(resume))
            ckpt = ckpt_lib.resolve_checkpoint(run_dir, None if resume is True else resume)
            tokenizer = load_tokenizer(run_dir / TOKENIZER_DIR)
        elif ckpt_lib.list_checkpoints(run_dir):
            raise CondcompError(f"{run_dir} already holds checkpoints; pass --resume to continue "
                                "that run, or choose another run name / out_dir")
        data = prepare_data(cfg.data, tokenizer=tokenizer, log=log)
        if cfg.model.vocab_size == 0:
            cfg.model.vocab_size = data.tokenizer.vocab_size
        elif cfg.model.vocab_size < data.tokenizer.vocab_size:
            raise ConfigError(f"model.vocab_size = {cfg.model.vocab_size} is smaller than the "
                              f"tokenizer's {data.tokenizer.vocab_size}; set it to 0 (automatic)")
        if cfg.distill.teacher:
            check_teacher(cfg, data.tokenizer)
        if not resume:
            save_config(cfg, run_dir)
            try:
                data.tokenizer.save(run_dir / TOKENIZER_DIR)
            except OSError as exc:
                raise storage_error(exc, "cannot write the tokenizer into "
                                    f"{run_dir / TOKENIZER_DIR}") from None
        return _Start(ckpt, changes, cfg.model.vocab_size), data

    def _prepare(self, resume: bool | str | Path, allow_changes: Collection[str]
                 ) -> tuple[_Start, PreparedData]:
        main_data: list[PreparedData] = []

        def on_main() -> _Start:
            start, data = self._start_folder(resume, allow_changes)
            main_data.append(data)
            return start

        start = self.ctx.on_main(on_main)
        # The other ranks read the tokenizer rank 0 saved and the token cache it built: first
        # one rank per machine (the cache may be local to it), then the others.
        self.cfg.model.vocab_size = start.vocab_size
        data = main_data[0] if main_data else None
        for first_on_machine in (True, False):
            if data is None and (self.ctx.local_rank == 0) == first_on_machine:
                tokenizer = load_tokenizer(self.run_dir / TOKENIZER_DIR)
                data = prepare_data(self.cfg.data, tokenizer=tokenizer, log=_silent)
            self.ctx.barrier()
        assert data is not None
        return start, data

    # ------------------------------------------------------------------ model and optimizer

    def _build(self, start: _Start) -> None:
        cfg, tc, ctx, device = self.cfg, self.tc, self.ctx, self.device
        torch.manual_seed(tc.seed)  # the same initial weights on every rank
        model = TransformerLM(cfg.model).to(device)
        self.n_params, self.n_active = model.num_params(), model.num_params(active_only=True)
        self.flops_per_token = model.flops_per_token(tc.seq_len)
        ckpt = start.checkpoint
        if tc.init_from and ckpt is None:
            # A new run from trained weights (e.g. the Mixture-of-Tokens transition to
            # sparse): the weights only; optimizer, schedule and data start afresh.
            source = Path(tc.init_from)
            init = ckpt_lib.resolve_checkpoint(source, None) if (source / "checkpoints").is_dir() \
                else ckpt_lib.resolve_checkpoint(source.parent.parent, source)
            load_weights(init, model, SINGLE, map_location=device)
            self.log(f"initialised the weights from {init.path}")
        # The whole teacher on every rank, frozen and outside the model: in no optimizer and
        # no checkpoint.
        self.distiller = load_distiller(cfg, device)
        if self.distiller is not None and cfg.distill.init_from_teacher == "shared" \
                and ckpt is None:
            self.distiller.init_student(model, self.log)
        # The whole weights, loaded before they are sharded or copied into master weights.
        self.state = None if ckpt is None else load_weights(ckpt, model, ctx, self.run_dir,
                                                            device)
        if ctx.distributed:
            # Each rank its own stream for dropout and router noise from here on.
            torch.manual_seed((tc.seed * 1_000_003 + ctx.rank) % 2**64)
            shard_experts(model, ctx)
        self.model = model
        # One process keeps fp32 master weights by hand; FSDP's mixed precision does it itself.
        self.masters = None if ctx.distributed else master_weights_for(model, tc.param_dtype)
        self.wrapped = wrap_model(model, ctx, PARAM_DTYPES[tc.param_dtype])
        # In the model's order: the gradient norm sums in this order, and the figures recorded
        # before master weights existed must reproduce bit for bit.
        self.params = (list(model.parameters()) if self.masters is None
                       else self.masters.optimizer_params())
        self.optimizer = make_optimizer(self.params, cfg, device,
                                        plain_tensors=not ctx.distributed)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_multiplier(s, tc.warmup_steps, tc.total_steps, tc.min_lr_ratio))
        self.forward = torch.compile(self.wrapped) if tc.compile else self.wrapped

    def _restore(self, ckpt: ckpt_lib.Checkpoint) -> int:
        """The optimizer, schedule, RNG and counters of ``ckpt``; returns its step."""
        state = load_training_state(ckpt, self.model, self.optimizer, self.masters, self.state,
                                    self.ctx, self.run_dir)
        self.scheduler.load_state_dict(state["scheduler"])
        if not self.ctx.distributed and not state["rng_restored"] and "rng_cpu" in state:
            torch.set_rng_state(state["rng_cpu"].cpu())
            if self.device.type == "cuda" and state.get("rng_cuda") is not None:
                torch.cuda.set_rng_state(state["rng_cuda"].cpu(), self.device)
        self.elapsed, self.nonfinite = state["elapsed_s"], state["nonfinite"]
        self.tokens_at_start = state.get("tokens", state["step"] * self.tc.tokens_per_step)
        self.log(f"resumed {self.run_dir} from {ckpt.path} at step {state['step']}")
        return state["step"]

    def build_for_timing(self, batches: TrainBatches) -> None:
        """The model, its sharding and wrapping and the optimizer, as :meth:`run` builds them,
        fed ``batches`` instead of a prepared corpus and writing no run folder: what
        ``condcomp bench dist`` times with :meth:`train_step`."""
        if self.tc.init_from:
            raise ConfigError("train.init_from loads trained weights; timing needs none, so "
                              "leave it unset")
        self._build(_Start(checkpoint=None, changes={}, vocab_size=self.cfg.model.vocab_size))
        self.batches = batches
        self.wrapped.train()

    def train_step(self, step: int) -> _StepOutcome:
        """One optimizer step on the global batch of ``step``: every micro-batch's forward and
        backward, the gradient fixes and norm, the update (the loop's step, nothing logged)."""
        return self._step(step)

    # ------------------------------------------------------------------ one step

    def _micro_batches(self, step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        first = self.ctx.rank * self.rows_per_rank
        for micro in range(self.accum):
            lo = first + micro * self.micro_batch
            x, y = self.batches.rows(step, self.tc.grad_accum, lo, lo + self.micro_batch)
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def _sync_gradients(self, last: bool) -> contextlib.AbstractContextManager:
        """DDP reduces gradients on the last micro-batch only; FSDP reduce-scatters each
        micro-batch's gradients, so no rank holds the whole gradient."""
        if last or not hasattr(self.wrapped, "no_sync"):
            return contextlib.nullcontext()
        return self.wrapped.no_sync()

    def _step(self, step: int) -> _StepOutcome:
        # LM loss, aux loss; with a teacher, the distillation's CE and KL after them.
        losses = torch.zeros(2 if self.distiller is None else 4, device=self.device)
        out = None
        for micro, (x, y) in enumerate(self._micro_batches(step)):
            with self._sync_gradients(micro == self.accum - 1):
                with autocast(self.device, self.amp_dtype):
                    out = self.forward(x, y)
                    lm_loss, logged = out.loss, [out.loss.detach(), out.aux_loss.detach()]
                    if self.distiller is not None:  # in the student's autocast
                        distilled = self.distiller.loss(x, y, out.logits, out.loss)
                        lm_loss = distilled.objective
                        logged = [lm_loss.detach(), logged[1], distilled.ce, distilled.kl]
                    loss = (lm_loss + out.aux_loss) / self.accum
                loss.backward()
            losses += torch.stack(logged) / self.accum
        finish_gradients(self.params, self.ctx)
        clip = self.tc.grad_clip if self.tc.grad_clip > 0 else float("inf")
        grad_norm = clip_grad_norm(self.params, clip, self.ctx)
        self.ctx.all_reduce(losses, "mean")
        train_loss, aux_loss, *distill = losses.tolist()
        grad_norm_f = grad_norm.item()
        skipped = not (math.isfinite(train_loss) and math.isfinite(grad_norm_f))
        if skipped:
            self.nonfinite += 1
        else:
            self.nonfinite = 0
            self.optimizer.step()
            if self.masters is not None:
                self.masters.copy_to_model()
            self.model.after_optimizer_step()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.scheduler.get_last_lr()[0]
        with warnings.catch_warnings():
            # A skipped update before the first real one would make torch warn that the
            # schedule steps before the optimizer; the schedule follows the step count.
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()
        assert out is not None
        return _StepOutcome(train_loss, aux_loss, grad_norm_f, lr, skipped, out.stats,
                            dict(zip(("distill_ce", "distill_kl"), distill)))

    # ------------------------------------------------------------------ evaluation, saving

    def evaluate(self) -> EvalResult:
        tc = self.tc
        result = evaluate(self.wrapped, self.data.val, batch_size=tc.batch_size,
                          seq_len=tc.seq_len, max_tokens=tc.eval_tokens,
                          bytes_per_token=self.data.val_bytes_per_token, device=self.device,
                          dtype=self.amp_dtype, ctx=self.ctx)
        reshard(self.model)
        return result

    def save(self, at_step: int) -> Path:
        state = {"scheduler": self.scheduler.state_dict(), "step": at_step,
                 "elapsed_s": self.elapsed, "nonfinite": self.nonfinite,
                 "tokens": self.tokens_at(at_step)}
        if self.ctx.distributed:  # each rank's RNG states go into its own file
            return save_sharded(self.run_dir, at_step, self.model, self.optimizer, state,
                                self.ctx, self.tc.keep_last)
        state["rng_cpu"] = torch.get_rng_state()
        if self.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        state["optimizer"] = self.optimizer.state_dict()
        with self.masters.full_precision() if self.masters else contextlib.nullcontext():
            return ckpt_lib.save_checkpoint(self.run_dir, at_step, self.model, state,
                                            self.tc.keep_last)

    def tokens_at(self, at_step: int) -> int:
        # Counted from the checkpoint's count, so a batch size changed on resume (with
        # --allow-change) does not rewrite the count of the steps before it.
        return self.tokens_at_start + (at_step - self.start_step) * self.tc.tokens_per_step

    def _global_stats(self, stats: dict[str, Any]) -> dict[str, float | list[float]]:
        """The layers' statistics averaged over the ranks (each rank routed its own tokens),
        in one all-reduce."""
        values = loggable_stats(stats)
        if not self.ctx.distributed or not values:
            return values
        flat = torch.tensor([v for value in values.values()
                             for v in (value if isinstance(value, list) else [value])],
                            dtype=torch.float64)
        self.ctx.all_reduce(flat, "mean")
        out, at = {}, 0
        for key, value in values.items():
            n = len(value) if isinstance(value, list) else 1
            chunk = flat[at:at + n].tolist()
            out[key] = chunk if isinstance(value, list) else chunk[0]
            at += n
        return out

    # ------------------------------------------------------------------ the loop

    def run(self, resume: bool | str | Path, allow_changes: Collection[str]) -> TrainResult:
        tc, ctx, log = self.tc, self.ctx, self.log
        start, self.data = self._prepare(resume, allow_changes)
        self._build(start)
        step, self.tokens_at_start = 0, 0
        if start.checkpoint is not None:
            step = self._restore(start.checkpoint)
        self.start_step = step
        metrics = (MetricsLog(self.run_dir, resume_step=step if start.checkpoint else None,
                              log=log) if ctx.is_main else None)
        if start.changes and metrics is not None:
            # The record says what is trained from here on: config.json takes the new values,
            # and metrics.jsonl says which changed, from which step.
            save_config(self.cfg, self.run_dir)
            metrics.record({"kind": "config_change", "step": step, "tokens": self.tokens_at(step),
                            "elapsed_s": self.elapsed,
                            "changes": {key: list(change)
                                        for key, change in start.changes.items()}})
            log(f"resuming with a changed config: {describe_changes(start.changes)}")
        if metrics is not None and ctx.distributed:
            # Where the layout matters (an MoE's routing groups are per rank), the record
            # says which layout trained from this step on.
            metrics.record({"kind": "layout", "step": step, **ctx.describe(),
                            "micro_batch_per_rank": self.micro_batch,
                            "grad_accum_per_rank": self.accum})
        self.batches = TrainBatches(self.data.train, tc.batch_size, tc.seq_len, tc.seed)
        total = tc.total_steps
        where = f"{self.device}" if not ctx.distributed else (
            f"{ctx.world_size} processes ({ctx.describe()['data_parallel']}"
            + (f", expert-parallel degree {ctx.ep}" if ctx.ep > 1 else "") + f") on {self.device.type}")
        log(f"model: {self.n_params / 1e6:.2f}M params ({self.n_active / 1e6:.2f}M active), "
            f"{self.flops_per_token / 1e6:.2f} MFLOPs/token forward; {total} steps of "
            f"{tc.tokens_per_step} tokens on {where}")
        try:
            step, final_eval = self._loop(step, total, metrics)
        finally:
            if metrics is not None:
                metrics.close()
        return TrainResult(self.run_dir, step, final_eval, self.tokens_per_s)

    def _loop(self, step: int, total: int, metrics: MetricsLog | None
              ) -> tuple[int, EvalResult]:
        tc, log = self.tc, self.log
        progress = _progress_bar(tc.progress and self.ctx.is_main, total, step)
        final_eval: EvalResult | None = None
        window_tokens, window_time = 0, 0.0
        self.tokens_per_s = 0.0
        # Other processes' share of the CPUs since the last train row, logged beside
        # tokens_per_s so that a throughput taken on a busy machine says so.
        load, self._own_cpu_at_lap = LoadMeter(), own_cpu_s()
        self.wrapped.train()
        try:
            while step < total:
                t0 = time.perf_counter()
                outcome = self._step(step)
                step += 1
                dt = time.perf_counter() - t0
                self.elapsed += dt
                window_tokens += tc.tokens_per_step
                window_time += dt
                progress.update(1)
                if outcome.skipped or step % tc.log_every == 0 or step == total:
                    self.tokens_per_s = window_tokens / max(window_time, 1e-9)
                    window_tokens, window_time = 0, 0.0
                    row = self._train_row(step, outcome, load)
                    alerts = self.health.review(row)  # alike on every rank, from averaged stats
                    if metrics is not None:
                        metrics.write(row)
                        for alert in alerts:
                            metrics.record(alert)
                            progress.write(describe_router_warning(alert))
                    progress.set_postfix(loss=f"{outcome.train_loss:.4f}",
                                         tok_s=f"{self.tokens_per_s:,.0f}")
                if outcome.skipped:
                    log(f"step {step}: non-finite loss ({outcome.train_loss}) or gradient norm "
                        f"({outcome.grad_norm}); update skipped ({self.nonfinite} in a row)")
                    if self.nonfinite >= tc.max_nonfinite:
                        path = self.save(step)
                        raise TrainingError(
                            f"{self.nonfinite} non-finite steps in a row (limit "
                            f"train.max_nonfinite = {tc.max_nonfinite}); stopped at step {step} "
                            f"with checkpoint {path}. Lower train.lr, raise train.warmup_steps, "
                            "or check the data")
                if step % tc.eval_every == 0 or step == total:
                    final_eval = self.evaluate()
                    if metrics is not None:
                        metrics.write({"kind": "eval", "step": step,
                                       "tokens": self.tokens_at(step),
                                       "elapsed_s": self.elapsed, **final_eval.as_dict()})
                    if self.ctx.is_main:
                        progress.write(f"step {step}: val loss {final_eval.loss:.4f}, "
                                       f"bits/byte {final_eval.bits_per_byte:.4f}")
                if step % tc.ckpt_every == 0 or step == total:
                    self.save(step)
        finally:
            progress.close()
        if final_eval is None:  # resumed at the end: nothing left to train
            final_eval = self.evaluate()
        return step, final_eval

    def _machine_load(self, load: LoadMeter) -> MachineLoad:
        """Other processes' share of the CPUs since the last row, less this job's other ranks
        on the machine (their work is part of the step, not load on it)."""
        measured = load.lap()
        if not self.ctx.distributed:
            return measured
        own_s = own_cpu_s()
        siblings_s = self.ctx.other_ranks_cpu_s(own_s - self._own_cpu_at_lap)
        self._own_cpu_at_lap = own_s
        return measured.excluding(siblings_s)

    def _train_row(self, step: int, outcome: _StepOutcome, load: LoadMeter) -> dict[str, Any]:
        row: dict[str, Any] = {
            "kind": "train", "step": step, "tokens": self.tokens_at(step),
            "elapsed_s": self.elapsed, "train_loss": outcome.train_loss,
            "aux_loss": outcome.aux_loss, "lr": outcome.lr, "grad_norm": outcome.grad_norm,
            "tokens_per_s": self.tokens_per_s,
            "other_cpu_share": self._machine_load(load).other_cpu_share}
        mfu = self.model.estimate_mfu(self.tokens_per_s / self.ctx.world_size, self.tc.seq_len,
                                      self.device)
        if mfu is not None:
            row["mfu"] = mfu
        if outcome.skipped:
            row["skipped_nonfinite"] = self.nonfinite
        row.update(outcome.distill)
        row.update(self._global_stats(self.health.rank_stats(outcome.stats, self.model)))
        return row


@dataclass
class _StepOutcome:
    train_loss: float
    aux_loss: float
    grad_norm: float
    lr: float
    skipped: bool
    stats: dict[str, Any]
    # With a teacher: distill_ce, the student's CE on the data; distill_kl, the KL to the
    # teacher. train_loss is then alpha * distill_ce + (1 - alpha) * T^2 * distill_kl.
    distill: dict[str, float] = field(default_factory=dict)


def _silent(_message: str) -> None:
    """The log of ranks other than 0: one voice per job."""


def _progress_bar(enabled: bool, total: int, initial: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step",
                dynamic_ncols=True, desc="train")
