"""Train the byte-level language model data-parallel with a gcomp hook (the README's main job).

Launch with torchrun, one process per worker::

    torchrun --standalone --nproc-per-node 2 launch/train.py --method powersgd --rank 4

Methods: every gcomp method (``gcomp.METHODS``, ``auto`` included: dense, PowerSGD or top-k by
measured step time), ``none`` (DDP without a hook) and PyTorch's own hooks for comparison
(``torch-powersgd``, ``torch-fp16``). ``--time-aware`` makes powersgd / topk / quantize send a
layer dense where compressing it does not shorten the step. Prints training and validation loss,
the time-aware decision when it is made, and, at the end, the bytes gcomp handed to the network
compared with uncompressed DDP.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel

import gcomp
from gcomp.examples.charlm import Batches, CharLM, CharLMConfig, build_model, default_corpus_path, language_model_loss, load_corpus
from gcomp.observe import TensorBoardLogger, progress, progress_write

SGD_MOMENTUM = 0.9  # --sgd-momentum's default: the momentum of SGD, or of the hook's buffer with --precondition momentum
TORCH_METHODS = ("none", "torch-powersgd", "torch-fp16")


def learning_rate(args: argparse.Namespace, step: int) -> float:
    """The learning rate of ``step`` under ``--lr-schedule``."""
    if args.lr_schedule == "constant":
        return args.lr
    if step < args.lr_warmup:
        return args.lr * (step + 1) / args.lr_warmup
    progress = (step - args.lr_warmup) / max(1, args.steps - args.lr_warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="powersgd", choices=sorted(gcomp.METHODS) + list(TORCH_METHODS))
    parser.add_argument("--rank", type=int, default=4, help="PowerSGD rank")
    parser.add_argument("--factor-dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="PowerSGD: dtype of P and Q on the wire (half precision: half the bytes); "
                             "default float32 for powersgd, bfloat16 for auto's PowerSGD")
    parser.add_argument("--density", type=float, default=0.01, help="top-k: fraction of each layer's entries sent")
    parser.add_argument("--value-dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="top-k (and auto's top-k candidate): dtype of the sent values on the wire (half precision: "
                             "half the value bytes, the rounding error is fed back); default: the method's own, float32")
    parser.add_argument("--dense-vectors", action="store_true",
                        help="top-k: send every parameter with fewer than two dimensions (biases, norm gains) uncompressed "
                             "(per-layer density 1); they are a small share of the bytes but at 1-2%% density "
                             "only 1-3 of their entries would move per step")
    parser.add_argument("--topk-exchange", default="allgather", choices=("allgather", "shared_indices"),
                        help="top-k: allgather each rank's own top-k, or shared_indices (a cyclic leader's indices, "
                             "values summed: bytes per rank independent of the world size)")
    parser.add_argument("--feedback", default=None,
                        help="top-k / quantize error feedback: ef14, ef21, ef21-sgdm or econtrol "
                             "(default: the method's own, ef14)")
    parser.add_argument("--bits", type=int, default=4, help="quantize: bits per entry (1, 2, 4, 8; 32 = raw float32)")
    parser.add_argument("--quantize-chunk", type=int, default=None, help="quantize: entries per scale (default: the method's)")
    parser.add_argument("--rounding", default="nearest", choices=("nearest", "stochastic"), help="quantize: rounding of the codes")
    parser.add_argument("--eta", type=float, default=0.1, help="EControl feedback strength")
    parser.add_argument("--feedback-momentum", type=float, default=0.9, help="EF21-SGDM momentum (beta)")
    parser.add_argument("--estimate-start", default=None, choices=("dense", "zero"),
                        help="EF21 / EF21-SGDM / EControl: estimates start from one dense average or from zero (default: the method's, topk dense, quantize zero)")
    parser.add_argument("--warmup-steps", type=int, default=20, help="sync steps of plain allreduce before compressing")
    parser.add_argument("--hierarchical", default="auto", choices=("auto", "on", "off"),
                        help="gcomp methods on several nodes with several processes each: dense inside a node, compressed "
                             "among node leaders (auto: whenever the topology allows; on: required; off: flat)")
    parser.add_argument("--adaptive", action="store_true", help="L-GreCo: re-choose per-layer rank/density/bits every --adapt-every steps")
    parser.add_argument("--adapt-every", type=int, default=100, help="sync steps between adaptive decisions")
    parser.add_argument("--adapt-accumulate", type=int, default=10, help="steps of gradients profiled before each decision")
    parser.add_argument("--adapt-alpha", type=float, default=1.0, help="error budget relative to the uniform setting")
    parser.add_argument("--adapt-error-measure", default=None, choices=("absolute", "relative"),
                        help="L-GreCo error of a layer: absolute ||x - C(x)|| or relative to ||x|| (default: AdaptiveConfig's)")
    parser.add_argument("--adapt-max-ladder-steps", type=int, default=None,
                        help="damping: a decision moves each layer at most this many places along its candidate list")
    parser.add_argument("--adapt-policy", default="lgreco", choices=("lgreco", "accordion"),
                        help="lgreco: the dynamic program; accordion: uniform setting for layers in a critical regime, "
                             "the most compressed candidate for the others")
    parser.add_argument("--adapt-critical-threshold", type=float, default=0.5,
                        help="accordion: relative change of a layer's gradient norm that marks a critical regime")
    parser.add_argument("--adapt-log", default=None, help="append every adaptive decision to this JSON-lines file")
    parser.add_argument("--adapt-rank-range", type=float, nargs=2, default=(0.5, 2.0), metavar=("LOW", "HIGH"),
                        help="PowerSGD candidate ranks: from LOW*rank to HIGH*rank")
    parser.add_argument("--adapt-density-factors", type=float, nargs="+", default=(0.25, 0.5, 1.0, 2.0, 4.0),
                        help="top-k candidate densities: these multiples of --density")
    parser.add_argument("--adapt-bit-widths", type=int, nargs="+", default=(1, 2, 4, 8),
                        help="quantize candidate bit widths (those that still compress a layer)")
    parser.add_argument("--time-aware", action="store_true",
                        help="powersgd / topk / quantize: measure the warm-up and the first compressed steps, then send "
                             "dense every layer whose compression is not predicted to shorten the step (auto always does)")
    parser.add_argument("--time-aware-trial-steps", type=int, default=3,
                        help="compressed steps measured per candidate method before the time-aware decision")
    parser.add_argument("--time-aware-tolerance", type=float, default=0.02,
                        help="prefer dense layers (auto: the earlier candidate) when predicted within this fraction of the fastest step")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per worker per step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd"), help="sgd: with --sgd-momentum")
    parser.add_argument("--sgd-momentum", type=float, default=None,
                        help=f"--optimizer sgd (default {SGD_MOMENTUM}): SGD's momentum, or the hook's buffer's with --precondition momentum; 0 with "
                             "--feedback ef21-sgdm, whose own momentum then is the only one (scale --lr by 1 / (1 - its momentum))")
    parser.add_argument("--clip-grad-norm", type=float, default=None,
                        help="clip the averaged gradients' total norm to this before each step (usual for LSTMs with SGD)")
    parser.add_argument("--precondition", nargs="?", const="adamw", default=None, choices=("adamw", "momentum", "lion"),
                        help="adamw (the default value; with --optimizer adamw): every rank sends its local AdamW direction "
                             "(gcomp precondition='adamw'), stepped by SGD with AdamW's weight decay; momentum (with --optimizer sgd): "
                             "every rank sends its SGD momentum buffer (precondition='momentum'), stepped by momentum-free SGD; lion (with --optimizer adamw): "
                             "every rank sends its Lion direction (precondition='lion', Distributed Lion), stepped by SGD with --lr and --weight-decay")
    parser.add_argument("--precondition-betas", type=float, nargs=2, default=None, metavar=("BETA1", "BETA2"),
                        help="--precondition adamw / lion: the local moments' betas (default gcomp.LocalAdamW's 0.9 0.999, gcomp.LocalLion's 0.9 0.99)")
    parser.add_argument("--weight-decay", type=float, default=0.01,
                        help="decoupled weight decay of AdamW, or of the SGD that steps --precondition adamw / lion directions")
    parser.add_argument("--lr-schedule", default="constant", choices=("constant", "cosine"),
                        help="cosine: linear warm-up over --lr-warmup steps, then cosine decay to 10%% of --lr")
    parser.add_argument("--lr-warmup", type=int, default=0, help="steps of linear learning-rate warm-up (cosine)")
    parser.add_argument("--heterogeneous", action="store_true",
                        help="each rank trains on its own contiguous 1/world of the training text (validation stays shared)")
    parser.add_argument("--model", default="small", help="model preset: tiny, small (3.3 M parameters), deep (1.7 M: 8 layers, width 128, context 64), medium, "
                        "lstm (a 2-layer LSTM of 384, 2.1 M, context 64; the non-transformer workload, meant for --optimizer sgd)")
    parser.add_argument("--data", default=default_corpus_path(), help="text file or directory (default: Python's stdlib sources)")
    parser.add_argument("--max-bytes", type=int, default=4_000_000, help="read at most this much of the corpus")
    parser.add_argument("--bucket-cap-mb", type=float, default=25.0, help="DDP bucket size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=50, help="validate every N steps (0: only at the end)")
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--json", default=None, help="append one JSON record per log line to this file (rank 0)")
    parser.add_argument("--tensorboard", default=None, metavar="DIR",
                        help="write TensorBoard scalars (loss, bytes, compression ratio, per-layer settings, "
                             "adaptive decisions) to DIR every --log-every steps (rank 0; needs tensorboard)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (there is none anyway when stderr is not a terminal)")
    parser.add_argument("--checkpoint", default=None, help="directory for per-rank checkpoints (saved at the end and every --checkpoint-every steps)")
    parser.add_argument("--checkpoint-every", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint if it holds a checkpoint")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads per worker")
    parser.add_argument("--fault-kill-at", type=int, default=None, metavar="STEP",
                        help="fault injection for restart tests: the last rank SIGKILLs itself before this step, "
                             "on the first attempt only (torchrun's TORCHELASTIC_RESTART_COUNT == 0)")
    args = parser.parse_args(argv)
    if args.sgd_momentum is not None and args.optimizer != "sgd":
        parser.error("--sgd-momentum goes with --optimizer sgd (AdamW has no SGD momentum)")
    args.sgd_momentum = SGD_MOMENTUM if args.sgd_momentum is None else args.sgd_momentum
    return args


def init_distributed() -> None:
    """Join the gloo process group torchrun describes (env://), under a store prefix per restart
    attempt: after ``torchrun --max-restarts`` restarts the workers, the store still holds the
    previous attempt's addresses, and gloo would try to connect to the dead workers' ports."""
    store, rank, world = next(dist.rendezvous("env://"))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group("gloo", store=dist.PrefixStore(f"gcomp-attempt-{attempt}/", store), rank=rank, world_size=world)


def register_method(ddp: DistributedDataParallel, args: argparse.Namespace):
    """Attach the requested hook; returns the gcomp state (None for PyTorch's hooks / no hook)."""
    if args.method == "none":
        return None
    if args.method == "torch-powersgd":
        state = powerSGD_hook.PowerSGDState(
            process_group=None, matrix_approximation_rank=args.rank, start_powerSGD_iter=max(2, args.warmup_steps)
        )
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
        return None
    if args.method == "torch-fp16":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
        return None
    options: dict = {}
    if args.method == "powersgd":
        options = {"rank": args.rank, "warmup_steps": args.warmup_steps, "seed": args.seed, "factor_dtype": args.factor_dtype or "float32"}
    elif args.method == "topk":
        options = {"density": args.density, "eta": args.eta, "momentum": args.feedback_momentum, "warmup_steps": args.warmup_steps,
                   "exchange": args.topk_exchange}
        if args.value_dtype is not None:
            options["value_dtype"] = args.value_dtype
        if args.dense_vectors:
            if args.adaptive:
                raise ValueError("--dense-vectors fixes per-layer densities, which --adaptive re-chooses; use one of them")
            options["layer_densities"] = {name: 1.0 for name, parameter in ddp.module.named_parameters() if parameter.dim() < 2}
    elif args.method == "quantize":
        options = {"bits": args.bits, "rounding": args.rounding, "eta": args.eta, "momentum": args.feedback_momentum,
                   "warmup_steps": args.warmup_steps}
        if args.quantize_chunk is not None:
            options["chunk"] = args.quantize_chunk
    elif args.method == "auto":
        options = {"rank": args.rank, "density": args.density, "warmup_steps": args.warmup_steps,
                   "powersgd_options": {"seed": args.seed}, "topk_options": {"eta": args.eta, "momentum": args.feedback_momentum}}
        if args.feedback is not None:
            options["topk_options"]["feedback"] = args.feedback
        if args.value_dtype is not None:
            options["topk_options"]["value_dtype"] = args.value_dtype
        if args.factor_dtype is not None:
            options["powersgd_options"]["factor_dtype"] = args.factor_dtype
    options["hierarchical"] = {"auto": "auto", "on": True, "off": False}[args.hierarchical]
    if args.method in ("topk", "quantize") and args.feedback is not None:
        options["feedback"] = args.feedback
    if args.estimate_start is not None:
        if args.method not in ("topk", "quantize"):
            raise ValueError("--estimate-start applies to --method topk or quantize")
        options["estimate_start"] = args.estimate_start
    if args.time_aware or args.method == "auto":
        options["time_aware"] = gcomp.TimeAwareConfig(trial_steps=args.time_aware_trial_steps, tolerance=args.time_aware_tolerance)
    if args.adaptive:
        options["adaptive"] = gcomp.AdaptiveConfig(
            every_steps=args.adapt_every,
            accumulate_steps=args.adapt_accumulate,
            alpha=args.adapt_alpha,
            rank_range=tuple(args.adapt_rank_range),
            density_factors=tuple(args.adapt_density_factors),
            bit_widths=tuple(args.adapt_bit_widths),
            log_path=args.adapt_log,
            max_ladder_steps=args.adapt_max_ladder_steps,
            policy=args.adapt_policy,
            critical_threshold=args.adapt_critical_threshold,
            **({"error_measure": args.adapt_error_measure} if args.adapt_error_measure else {}),
        )
    if args.dense_vectors and args.method != "topk":
        raise ValueError("--dense-vectors applies to --method topk only")
    if args.precondition_betas and args.precondition not in ("adamw", "lion"):
        raise ValueError("--precondition-betas needs --precondition adamw or lion")
    if args.precondition and (args.precondition == "momentum") != (args.optimizer == "sgd"):
        raise ValueError("--precondition momentum goes with --optimizer sgd, --precondition adamw / lion with --optimizer adamw")
    if args.precondition_betas and args.precondition == "adamw":
        options["precondition"] = gcomp.LocalAdamW(betas=tuple(args.precondition_betas))
    elif args.precondition_betas and args.precondition == "lion":
        options["precondition"] = gcomp.LocalLion(betas=tuple(args.precondition_betas))
    elif args.precondition == "momentum":
        options["precondition"] = gcomp.LocalMomentum(momentum=args.sgd_momentum)
    elif args.precondition:
        options["precondition"] = args.precondition
    return gcomp.register(ddp, args.method, **options)


def evaluate(model: torch.nn.Module, batches: Batches, count: int) -> float:
    """Validation loss averaged over ranks (each rank evaluates the same windows)."""
    model.eval()
    with torch.no_grad():
        losses = [float(language_model_loss(model, x, y)) for x, y in batches.validation_batches(count)]
    model.train()
    return sum(losses) / len(losses)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    torch.set_num_threads(args.threads)
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(args.seed)

    model, context = build_model(args.model)
    if args.optimizer == "sgd":  # with precondition="momentum" the momentum is the hook's
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.0 if args.precondition else args.sgd_momentum)
    elif args.precondition:  # the gradients are AdamW (or Lion) directions already: decoupled weight decay only
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    corpus = load_corpus(args.data, args.max_bytes)
    batches = Batches(corpus, context, args.batch_size, args.seed, rank, partition=(rank, world) if args.heterogeneous else None)

    parameters = sum(p.numel() for p in model.parameters())
    checkpoint_path = os.path.join(args.checkpoint, f"rank{rank}.pt") if args.checkpoint else None
    saved = None
    if args.resume and checkpoint_path and os.path.exists(checkpoint_path):
        saved = torch.load(checkpoint_path, weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        batches.generator.set_state(saved["data_generator"])

    bucket_cap_mb = args.bucket_cap_mb
    if args.method == "torch-powersgd":
        # PyTorch's hook deadlocks on gloo once the model spans two buckets: give it one.
        bucket_cap_mb = max(bucket_cap_mb, 4 * parameters * 4 / 2**20)
    # The model's only buffer is a constant causal mask: no need for DDP to re-broadcast it
    # before every forward (it would add traffic that no hook counts); it is still synced once at init.
    ddp = DistributedDataParallel(model, bucket_cap_mb=bucket_cap_mb, forward_sync_buffers=False)
    state = register_method(ddp, args)
    start = 0
    if saved is not None:
        start = int(saved["step"])
        if state is not None and saved.get("gcomp") is not None:
            state.load_state_dict(saved["gcomp"])
        if rank == 0:
            print(f"resumed from {args.checkpoint} at step {start}", flush=True)

    def save(step: int) -> None:
        os.makedirs(args.checkpoint, exist_ok=True)
        record = {
            "step": step,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "data_generator": batches.generator.get_state(),
            "gcomp": state.state_dict() if state is not None else None,
        }
        torch.save(record, checkpoint_path + ".tmp")
        os.replace(checkpoint_path + ".tmp", checkpoint_path)

    if rank == 0:
        print(f"{world} workers, method {args.method}, model {args.model} ({parameters / 1e6:.2f} M parameters), "
              f"corpus {len(corpus) / 1e6:.1f} MB from {args.data}", flush=True)
    log = open(args.json, "a", encoding="utf-8") if (args.json and rank == 0) else None
    board = None
    if args.tensorboard and rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=args.tensorboard)
        board = TensorBoardLogger(state, writer) if state is not None else None
    steps = progress(range(start, args.steps), total=args.steps - start, initial=start, desc=args.method,
                     enabled=rank == 0 and not args.no_progress, unit="step")
    started = time.perf_counter()
    decision_shown = False
    loss_value = float("nan")
    validation = None
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    for step in steps:
        if args.fault_kill_at == step and first_attempt and rank == world - 1:
            print(f"rank {rank}: killing itself (SIGKILL) before step {step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        x, y = batches.next()
        for group in optimizer.param_groups:  # a function of the step alone: resumes exactly
            group["lr"] = learning_rate(args, step)
        optimizer.zero_grad()
        loss = language_model_loss(ddp, x, y)
        loss.backward()
        if args.clip_grad_norm:  # on the averaged gradients, identical on every rank
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad_norm)
        optimizer.step()
        loss_value = loss.item()
        last = step + 1 == args.steps
        if args.eval_every and ((step + 1) % args.eval_every == 0) or last:
            validation = evaluate(model, batches, args.eval_batches)
        if rank == 0 and ((step + 1) % args.log_every == 0 or last):
            elapsed = time.perf_counter() - started
            record = {"step": step + 1, "loss": loss_value, "validation_loss": validation, "seconds": elapsed, "time": time.time(), "method": args.method}
            if state is not None:
                stats = state.stats()
                record.update({k: stats[k] for k in ("bytes_sent", "bytes_received", "bytes_uncompressed", "compression_ratio")})
                record["gcomp_seconds"] = dict(stats["seconds"])
                record["links"] = stats["links"]
                record["path"] = stats["topology"]["path"]
                decision = (stats.get("time_aware") or {}).get("decision")
                if decision is not None:
                    record["time_aware"] = {key: decision.get(key) for key in (
                        "step", "choice", "predicted_step_s", "predicted_step_s_by_option", "link", "base_step_s",
                        "backward_window_s", "compute", "compressed_layers", "dense_layer_count")}
                    if not decision_shown:
                        progress_write(steps, f"time-aware decision: {json.dumps(record['time_aware'])}")
                        decision_shown = True
            line = f"step {step + 1:5d}  loss {loss_value:.4f}"
            if validation is not None:
                line += f"  val {validation:.4f}"
            line += f"  {elapsed / (step + 1 - start):.3f} s/step"
            if state is not None:
                line += f"  sent {record['bytes_sent'] / 1e6:.1f} MB (x{record['compression_ratio']:.1f} less than uncompressed)"
            progress_write(steps, line)
            if hasattr(steps, "set_postfix_str"):
                steps.set_postfix_str(f"loss {loss_value:.3f}" + (f" x{record['compression_ratio']:.1f}" if state is not None else ""))
            if args.tensorboard:
                writer.add_scalar("train/loss", loss_value, step + 1)
                if validation is not None and (args.eval_every and (step + 1) % args.eval_every == 0 or last):
                    writer.add_scalar("train/validation_loss", validation, step + 1)
                writer.add_scalar("train/seconds_per_step", elapsed / (step + 1 - start), step + 1)
                if board is not None:
                    board.log(step + 1)
                writer.flush()
            if log is not None:
                log.write(json.dumps(record) + "\n")
                log.flush()
        if checkpoint_path and args.checkpoint_every and (step + 1) % args.checkpoint_every == 0:
            save(step + 1)
    if checkpoint_path:
        save(args.steps)
    if rank == 0 and state is not None and validation is not None:
        stats = state.stats()
        print(
            f"done: final loss {loss_value:.4f}, validation {validation:.4f}; gcomp {args.method} sent "
            f"{stats['bytes_sent'] / 1e6:.2f} MB where uncompressed DDP sends {stats['bytes_uncompressed'] / 1e6:.2f} MB "
            f"({stats['compression_ratio']:.1f}x fewer bytes, {stats['compressed_steps']} compressed steps, "
            f"{stats['topology']['path']} path)",
            flush=True,
        )
    if log is not None:
        log.close()
    if hasattr(steps, "close"):
        steps.close()
    if args.tensorboard and rank == 0:
        writer.close()
    if state is not None:
        state.close()
    del ddp, optimizer, state
    gc.collect()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
