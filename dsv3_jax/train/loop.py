"""The training loop: data -> jitted step (loss, AdamW, bias update) -> metrics -> checkpoints.

`train(RunConfig(...))` is everything `python train.py` does. Each step: the LM loss (next-token
CE + MTP + sequence balance), an optax AdamW update of the Params, then the auxiliary-loss-free
routing-bias update from the step's global expert counts. The data are contiguous corpus windows
(`TokenBatcher`, DeepSeek-V3's pretraining), with `pack_documents` rows of whole documents
with segment ids (`DocumentPacker`: no attention or loss across documents), or with `sft` chat
conversations trained on the assistant tokens (dsv3_jax/train/run_data.py, which also makes the
held-out set). Each step's record counts its `trained_tokens` (the scored predictions: the
assistant tokens in fine-tuning), their running total and `trained_tokens_per_s` next to
`tokens_per_s` (all tokens). Checkpoints (orbax) hold the model, the optimizer, the data
position, the step and the trained-token total, so `resume=True` continues
exactly (and cuts metrics.jsonl back to the restored step, dsv3_jax/train/metrics.py). The
state is donated to the step (`step_fn`); a step whose loss or gradient norm is not finite
changes nothing and is logged as `skipped`, and `max_skipped` of them in a row stop the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import shutil
import signal
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from dsv3_jax import data
from dsv3_jax.checkpoint import Checkpointer, CheckpointRestoreError
from dsv3_jax.config import ModelConfig
from dsv3_jax.model import init_model
from dsv3_jax.weights import load_hf
from dsv3_jax.train.evaluate import evaluate
from dsv3_jax.train.flops import flops_per_token, mfu
from dsv3_jax.train.metrics import MetricsLog
from dsv3_jax.train.optimizer import make_optimizer
from dsv3_jax.train.plot import write_plot
from dsv3_jax.train.run_data import load_run_data
from dsv3_jax.train.step import train_step

MOMENTS_DTYPES = {"fp32": None, "bf16": jnp.bfloat16}
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny.json"


@dataclasses.dataclass
class RunConfig:
    """One training run; every field is a train.py flag of the same name."""

    config: str = str(DEFAULT_CONFIG)
    corpus: str | None = None          # None: the Python standard library's sources
    tokenizer: str | None = None       # a tokenizer.json (or folder holding one) instead of training
    steps: int = 1000                  # the default run: ~10 minutes on 2 CPU cores
    batch_size: int = 8                # sequences per optimizer step (all processes together)
    seq_len: int = 128
    lr: float = 3e-3
    warmup_steps: int = 50
    precision: str = "fp32"
    mesh: str = ""
    out: str = "runs/default"
    checkpoint_every: int = 250
    keep: int = 3
    resume: bool = False
    seed: int = 0
    init_from_hf: str | None = None    # start from a HF checkpoint folder's weights
    mtp_lambda: float = 0.3
    balance_alpha: float = 1e-4
    bias_gamma: float = 0.001
    accumulate: int = 1                # split each step's batch into this many micro-batches
    microbatches: int = 0              # pipeline micro-batches per micro-batch (0: one per stage)
    pipeline_schedule: str = "gpipe"   # gpipe, 1f1b, zb or dualpipev (sharding/schedules.py)
    print_schedule: bool = False       # print the pipeline schedule's table and exit
    remat: bool = False
    capacity_factor: float = 0.0       # expert-parallel dispatch capacity per expert (0: dropless)
    moments_dtype: str = "fp32"        # AdamW first moment: fp32 or bf16 (second moment stays fp32)
    pack_documents: bool = False       # rows of whole documents with segment ids (dsv3_jax/packing.py)
    max_skipped: int = 10              # stop after this many consecutive non-finite (skipped) steps
    eval_corpus: str | None = None     # held-out text/.jsonl/folder: mean loss and perplexity
    eval_every: int = 0                # steps between evaluations (0: at each checkpoint)
    sft: str | None = None             # chat .jsonl file/folder: fine-tune on the assistant turns
    eval_fraction: float = 0.02        # --sft without --eval-corpus: conversations held out (0: none)


class TrainingError(RuntimeError):
    """The run cannot go on (bad input, too many non-finite steps); the last good checkpoint is
    kept."""


def step_fn(run: RunConfig):
    """The jitted `train_step` of a run. The model and the optimizer are donated: the step
    writes the new parameters, AdamW moments and routing bias into the old ones' buffers, so
    the device holds one copy of the training state, as the planner (dsv3_jax/plan.py) and the
    AOT compiles assume. A donated buffer that something else still reads is not reused: on CPU
    an async orbax save holds NumPy views of the state until written, and XLA then copies
    instead (the checkpoint stays intact; tests/test_train_state.py)."""
    return nnx.jit(functools.partial(train_step, mtp_lambda=run.mtp_lambda,
                                     balance_alpha=run.balance_alpha, bias_gamma=run.bias_gamma,
                                     microbatches=run.microbatches or None,
                                     pipeline_schedule=run.pipeline_schedule),
                   donate_argnums=(0, 1))


def _pipeline_plan(run: RunConfig, cfg: ModelConfig, mesh):
    """The pipeline's StagePlan when the mesh has pipeline > 1 (None otherwise); checked up front."""
    stages = 1 if mesh is None else mesh.shape["pipeline"]
    if run.microbatches < 0:
        raise TrainingError(f"--microbatches must be >= 0 (0: one per pipeline stage), got "
                            f"{run.microbatches}")
    from sharding.schedules import SCHEDULES, ScheduleError, make_schedule
    if run.pipeline_schedule not in SCHEDULES:
        raise TrainingError(f"--pipeline-schedule {run.pipeline_schedule!r}: use one of "
                            f"{', '.join(SCHEDULES)}")
    if stages == 1:
        if run.pipeline_schedule != "gpipe":
            raise TrainingError(f"--pipeline-schedule {run.pipeline_schedule} applies to pipeline "
                                f"meshes only (--mesh pipeline=N,...); the mesh is "
                                f"{run.mesh or 'none'}")
        if run.microbatches > 1:
            raise TrainingError(f"--microbatches {run.microbatches} applies to pipeline meshes "
                                f"only (--mesh pipeline=N,...); the mesh is {run.mesh or 'none'}")
        return None
    from sharding.pipeline import PipelineError, check_microbatches, plan_stages
    try:
        sched = make_schedule(run.pipeline_schedule, stages, run.microbatches or stages)
        plan = plan_stages(cfg, stages, run.microbatches or stages, chunks=sched.chunks,
                           schedule=run.pipeline_schedule)
        check_microbatches(run.batch_size // run.accumulate, plan, mesh)
    except (PipelineError, ScheduleError) as e:
        raise TrainingError(f"--mesh {run.mesh}: {e}") from None
    return plan


def _batch_layout(run: RunConfig, mesh):
    """A function host window rows -> the step's [accumulate, micro, seq + 1] global array."""
    k, procs = run.accumulate, jax.process_count()
    if k < 1 or run.batch_size % (k * procs):
        raise TrainingError(f"--batch-size {run.batch_size} must be divisible by --accumulate {k} "
                            f"x {procs} process(es)")
    micro = run.batch_size // k
    if mesh is None:
        return lambda rows: jnp.asarray(rows.reshape(k, micro, -1))
    from sharding.rules import batch_axes
    axes = batch_axes(mesh)
    n = math.prod(mesh.shape[a] for a in axes)
    if micro % n:
        raise TrainingError(f"the batch dimension of size {micro} (--batch-size {run.batch_size} / "
                            f"--accumulate {k}) is not divisible by {n}, the product of the mesh "
                            f"axes {'x'.join(axes)} that split it")
    sharding = NamedSharding(mesh, PartitionSpec(None, axes or None, None))
    shape = (k, micro, run.seq_len + 1)
    # each process holds its contiguous slice of every micro-batch (TokenBatcher's layout)
    return lambda rows: jax.make_array_from_process_local_data(
        sharding, rows.reshape(k, micro // procs, -1), shape)


def replicate_unplaced(optimizer: nnx.Optimizer, mesh) -> None:
    """Put the optimizer's scalars (step counts, made on one device) on the mesh, replicated:
    the step returns them there, and a changed input sharding would recompile step 2."""
    replicated = NamedSharding(mesh, PartitionSpec())
    for _, var in nnx.iter_graph(optimizer):
        value = var.get_value() if isinstance(var, nnx.Variable) else None
        if isinstance(value, jax.Array) and not isinstance(value.sharding, NamedSharding):
            host = np.asarray(value)  # every process made the same value (several processes too)
            var.set_value(jax.make_array_from_callback(host.shape, replicated, lambda i: host[i]))


def _check_out_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        # one probe per process: every process of a multi-host run checks the shared folder, and
        # with one name a process could delete the file another had just written (seen as a
        # spurious "not writable" that left the other processes waiting at start-up)
        probe = out / f".write_test.{jax.process_index()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise TrainingError(f"--out {out} is not writable ({e})") from None


def train(run: RunConfig, *, log=print) -> list[dict]:
    """Run training; returns the per-step metrics (also written to OUT/metrics.jsonl)."""
    if run.print_schedule:  # the pipeline schedule's table, from the flags alone
        from sharding.schedules import ScheduleError, for_mesh
        try:
            log(for_mesh(run.mesh, run.microbatches, run.pipeline_schedule).format())
        except ScheduleError as e:
            raise TrainingError(str(e)) from None
        return []
    from sharding.distributed import initialize_from_env
    initialize_from_env()
    out = Path(run.out)
    _check_out_dir(out)
    cfg = ModelConfig.from_json(run.config)
    mesh = None
    if run.mesh or jax.process_count() > 1:
        from sharding import make_mesh  # several processes: all devices on "data" by default
        mesh = make_mesh(run.mesh)
        if cfg.n_routed_experts % mesh.shape["expert"]:
            raise TrainingError(f"--mesh {run.mesh}: n_routed_experts {cfg.n_routed_experts} is "
                                f"not divisible by the expert axis size {mesh.shape['expert']}")
    if run.moments_dtype not in MOMENTS_DTYPES:
        raise TrainingError(f"--moments-dtype {run.moments_dtype!r}: use one of "
                            f"{', '.join(MOMENTS_DTYPES)}")
    if run.capacity_factor < 0 or (run.capacity_factor and mesh is None):
        raise TrainingError(f"--capacity-factor {run.capacity_factor}: must be > 0 and applies "
                            "to expert-parallel dispatch (--mesh with an expert axis); 0 is dropless")
    if run.max_skipped < 1:
        raise TrainingError(f"--max-skipped {run.max_skipped}: must be >= 1 (the number of "
                            "consecutive non-finite steps that stops the run)")
    to_global = _batch_layout(run, mesh)
    plan = _pipeline_plan(run, cfg, mesh)
    files = data.corpus_files(run.corpus)
    tokenizer_path = run.tokenizer
    if tokenizer_path is None and run.init_from_hf and \
            (Path(run.init_from_hf) / "tokenizer.json").is_file():
        tokenizer_path = run.init_from_hf  # the checkpoint's own tokenizer
    tokenizer = data.load_or_train_tokenizer(files, cfg.vocab_size, tokenizer_path=tokenizer_path)
    bos, eos = data.document_markers(cfg.bos_token_id, cfg.eos_token_id, tokenizer)
    layout = dict(seed=run.seed, process_index=jax.process_index(),
                  process_count=jax.process_count())
    try:
        run_data = load_run_data(run, files, tokenizer, bos, eos, layout, log)
    except data.DataError as e:
        raise TrainingError(str(e)) from None
    batcher, num_tokens = run_data.batcher, run_data.num_tokens
    eval_batches = run_data.held_out and [tuple(map(to_global, b)) for b in run_data.held_out]
    model = init_model(cfg, seed=run.seed, precision=run.precision, remat=run.remat, mesh=mesh,
                       capacity_factor=run.capacity_factor or None)
    if run.init_from_hf:
        hf_cfg = ModelConfig.from_json(run.init_from_hf)
        if hf_cfg.replace(quantization_config=None) != cfg.replace(quantization_config=None):
            raise TrainingError(f"--init-from-hf {run.init_from_hf}: its config.json differs from "
                                f"--config {run.config}; pass --config {run.init_from_hf}")
        # fp32 master weights (FP8 checkpoints dequantized), placed like the model's own
        loaded = load_hf(run.init_from_hf, dtype=jnp.float32, param_dtype=jnp.float32, mesh=mesh)
        nnx.update(model, nnx.state(loaded))
        log(f"initialised from {run.init_from_hf}")
    optimizer = nnx.Optimizer(model, make_optimizer(
        model, lr=run.lr, warmup_steps=run.warmup_steps, total_steps=run.steps,
        moments_dtype=MOMENTS_DTYPES[run.moments_dtype]), wrt=nnx.Param)
    if mesh is not None:
        replicate_unplaced(optimizer, mesh)
    ckpt = Checkpointer(out / "checkpoints", keep=run.keep)
    start, trained_total = 0, 0  # trained_total: the trained tokens of all applied steps
    if not run.resume and ckpt.all_steps():
        ckpt.close()
        raise TrainingError(f"{out / 'checkpoints'} already holds checkpoints (steps "
                            f"{ckpt.all_steps()}); pass --resume to continue that run or choose "
                            "another --out (nothing was overwritten)")
    if run.resume and ckpt.latest_step() is not None:
        try:
            extra = ckpt.restore(None, model, optimizer)
        except CheckpointRestoreError as e:
            ckpt.close()
            raise TrainingError(f"--resume: {e}. Nothing was changed on disk; move that step's "
                                f"folder aside to resume from an earlier one (steps "
                                f"{ckpt.all_steps()})") from e
        batcher.restore(extra["data"])
        start = int(extra["step"])
        trained_total = int(extra.get("trained_tokens", 0))  # older checkpoints: counted from here
        log(f"resumed from step {start} ({out / 'checkpoints'})")
    if mesh is None:
        # every leaf committed to the device, as the step returns them: a mix of committed
        # (loaded by --init-from-hf or --resume) and uncommitted (made by init or optax) leaves
        # is another signature, and the step would compile again at step 2
        nnx.update((model, optimizer), jax.device_put(nnx.state((model, optimizer)),
                                                      jax.devices()[0]))
    if jax.process_index() == 0:
        tokenizer.save(str(out / "tokenizer.json"))
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        (out / "run.json").write_text(json.dumps(dataclasses.asdict(run), indent=2))
        if run.init_from_hf:  # the chat template (and its special tokens) serve.py reads
            for name in ("tokenizer_config.json", "chat_template.jinja"):
                if (Path(run.init_from_hf) / name).is_file():
                    shutil.copyfile(Path(run.init_from_hf) / name, out / name)

    stop = {"signal": None}
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))
    jitted_step = step_fn(run)
    primary = jax.process_index() == 0
    history: list[dict] = []
    tokens_per_step = run.batch_size * run.seq_len
    log(f"model FLOPs per token (fwd+bwd): {flops_per_token(cfg, run.seq_len) / 1e6:.1f}M "
        "(dsv3_jax/train/flops.py); MFU is reported where the device's peak is known")
    if plan is not None:
        log(plan.describe())
    packing = (f" packed as documents ({batcher.padding_fraction():.1%} padding)"
               if run.pack_documents else "")
    log(f"training {cfg.num_params() / 1e6:.1f}M parameters for {run.steps} steps: batch "
        f"{run.batch_size} x {run.seq_len} tokens"
        f"{f' in {run.accumulate} micro-batches' if run.accumulate > 1 else ''}, precision "
        f"{run.precision}, "
        + (f"{num_tokens:,} conversation tokens (the chat template's text, then "
           f"{tokenizer.id_to_token(eos)})" if run.sft else
           f"{num_tokens:,} corpus tokens (documents: "
           f"{'' if bos is None else f'{tokenizer.id_to_token(bos)} '}text "
           f"{tokenizer.id_to_token(eos)})")
        + f"{packing}, out {out}"
        f"{f', process {jax.process_index()} of {jax.process_count()}' if jax.process_count() > 1 else ''}")
    try:
        with (MetricsLog(out, start) if primary else contextlib.nullcontext()) as mlog, \
                (jax.set_mesh(mesh) if mesh else contextlib.nullcontext()):
            t_last = time.perf_counter()
            consecutive = 0  # skipped steps in a row
            for step in range(start, run.steps):
                rows = batcher.next()
                rows = tuple(map(to_global, rows)) if isinstance(rows, tuple) else (to_global(rows),)
                parts = jax.device_get(jitted_step(model, optimizer, *rows))
                skipped = int(parts["skipped"])
                consecutive = consecutive + 1 if skipped else 0
                if skipped:
                    log(f"step {step + 1}: loss {float(parts['loss'])}, gradient norm "
                        f"{float(parts['grad_norm'])}: not finite, step skipped (state unchanged; "
                        f"{consecutive} in a row, --max-skipped {run.max_skipped})")
                now = time.perf_counter()
                dt = max(now - t_last, 1e-9)
                trained = 0 if skipped else int(parts["trained_tokens"])
                trained_total += trained
                record = {"step": step + 1, "loss": float(parts["loss"]), "ce": float(parts["ce"]),
                          "mtp": float(parts["mtp"]), "balance": float(parts["balance"]),
                          "grad_norm": float(parts["grad_norm"]), "skipped": skipped,
                          "imbalance": [round(float(v), 3) for v in parts["imbalance"]],
                          "tokens_per_s": tokens_per_step / dt, "trained_tokens": trained,
                          "trained_tokens_total": trained_total,
                          "trained_tokens_per_s": trained / dt}
                record["mfu"] = mfu(record["tokens_per_s"], cfg, run.seq_len)
                done = step + 1
                if eval_batches and (done % (run.eval_every or run.checkpoint_every) == 0
                                     or done == run.steps):
                    record.update(evaluate(model, eval_batches))
                    now = time.perf_counter()  # the next step's time leaves the evaluation out
                t_last = now
                history.append(record)
                if primary:
                    mlog.write(record)
                    _progress(record, run.steps, log)
                if consecutive >= run.max_skipped:
                    raise TrainingError(
                        f"steps {done - consecutive + 1}..{done}: {consecutive} consecutive steps "
                        f"had a non-finite loss or gradient norm and were skipped (--max-skipped "
                        f"{run.max_skipped}); stopping. Skipped steps change nothing, so the last "
                        f"checkpoint (step {ckpt.latest_step()}) holds finite values; lower --lr "
                        "or check the data")
                if done % run.checkpoint_every == 0 or done == run.steps or stop["signal"]:
                    ckpt.save(done, model, optimizer, {"step": done, "data": batcher.state(),
                                                       "trained_tokens": trained_total})
                if stop["signal"]:
                    log(f"stopped by signal {stop['signal']} after step {done}; checkpoint saved")
                    break
    finally:
        signal.signal(signal.SIGTERM, previous)
        ckpt.close()
    if history and primary:
        all_records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        log(f"plot: {write_plot(all_records, out / 'metrics.png')}")
    return history


def _progress(record: dict, total: int, log) -> None:
    """A progress bar on a terminal; a summary line every 50 steps either way."""
    tty = sys.stderr.isatty()
    if tty:
        width = 30
        filled = int(width * record["step"] / total)
        bar = "#" * filled + "." * (width - filled)
        sys.stderr.write(f"\r[{bar}] step {record['step']}/{total} loss {record['loss']:.4f} "
                         f"{record['tokens_per_s']:.0f} tok/s ")
        sys.stderr.flush()
    if record["step"] % 50 == 0 or record["step"] == total or "eval_loss" in record:
        log(f"{chr(10) if tty else ''}step {record['step']}/{total}: loss {record['loss']:.4f} "
            f"(ce {record['ce']:.4f}, mtp {record['mtp']:.4f}), {record['tokens_per_s']:.0f} "
            f"tok/s ({record['trained_tokens_per_s']:.0f} trained), max/mean expert load {max(record['imbalance'] or [1.0]):.2f}"
            + (f", held-out loss {record['eval_loss']:.4f} (perplexity {record['eval_ppl']:.1f})"
               if "eval_loss" in record else ""))

