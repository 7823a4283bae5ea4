"""Training, behind train.py: a run's wiring from settings to the loop (train, fit): the data and the model,
the feature path (transfer mode), the sampler, the precision, and the summary at the end."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from imgcls import machine, runfolder
from imgcls.cli import typed
from imgcls.data import datasets, folders, imagecache
from imgcls.data import split as data_split
from imgcls.data.loaders import ResumableSampler, make_loader, shard, to_model_input
from imgcls.errors import UsageError, WeightsUnavailable
from imgcls.interrupts import sigterm_as_ctrl_c
from imgcls.machine import (
    auto_workers,
    cpu_has_bf16,
    pick_device,
    precision,
    precision_name,
    seed_everything,
    tune_cpu_allocator,
)
from imgcls.networks import build as networks_build
from imgcls.networks import heads
from imgcls.networks import weights as networks_weights
from imgcls.preprocess import Preprocess
from imgcls.recipes import describe_recipe, progressive_size
from imgcls.settings import TrainConfig, cache_path
from imgcls.training import features, logs, lrfind, optim, resume
from imgcls.training import loop as training_loop
from imgcls.training import losses as training_losses
from imgcls.training.batchnorm import precise_bn_images, trained_batchnorms
from imgcls.training.distributed import (
    Stopped,
    barrier,
    broadcast,
    from_lead,
    init_distributed,
)
from imgcls.training.ema import Ema
from imgcls.training.runstate import Inputs, Run
from imgcls.training.step import Learner, check_batch_size


def report_split(split: data_split.DataSplit, run_dir: Path) -> None:
    left = f" and left out {len(split.left_out)} other file(s)" if split.left_out else ""
    test = f" / {len(split.test)} test (held out; python eval.py --checkpoint {typed(run_dir)})" if split.test else ""
    kind = "labels" if split.multilabel else "classes"
    print(f"data: {len(split.classes)} {kind}, {len(split.train)} train / {len(split.val)} val{test} images from "
          f"{folders.shown(split.root)}" + (f"; skipped {len(split.skipped)} unreadable file(s){left}, see "
                                            f"{run_dir / runfolder.SKIPPED}" if split.not_used() else ""))
    if split.ignored:
        print(folders.ignored_line(split.ignored))
    if split.multilabel:
        untrained = [c for c, n, m in zip(split.classes, split.counts(split.train), split.counts(split.val))
                     if not n and m >= 2]
        if untrained:  # k folds: images whose labels pair them off cannot always be spread over the folds
            imagecache.warn(f"label(s) with no training image: {', '.join(map(folders.shown, untrained[:10]))}"
                         + (" ..." if len(untrained) > 10 else "") + ": every image of them is validated on, so "
                         "the model cannot learn them (with --folds: their images could not be spread over the folds)")
    unseen = [c for c, n in zip(split.classes, split.counts(split.val)) if not n] if split.multilabel else []
    if unseen:
        imagecache.warn(f"label(s) with no validation image: {', '.join(map(folders.shown, unseen[:10]))}"
                     + (" ..." if len(unseen) > 10 else "") + ": their thresholds stay 0.5, and the mAP that picks "
                     "best.pt leaves them out")
    if split.leaks:
        b, a, d = split.leaks[0][1], split.leaks[0][0], split.leaks[0][2]
        imagecache.warn(f"{len({held for _, held, _ in split.leaks})} val/test image(s) look like train images "
                     f"(leakage), e.g. "
                     f"{folders.shown(b)} ~ {folders.shown(a)} ({d} bits apart); see `python dataset.py check`")


def build(cfg: TrainConfig, start: runfolder.Start, num_classes: int, img_size: int) -> tuple[nn.Module, list]:
    """The network and the identity of its starting weights. A resume loads last.pt and needs neither
    the weights file nor the network: they mattered only at the start."""
    seed_everything(cfg.seed)  # same seed, same initial weights
    if start.ckpt is None:
        model = networks_build.build_model(cfg.model, num_classes, cfg.mode, cfg.weights, img_size)
        used = cfg.mode != "scratch" or cfg.weights
        return model, networks_weights.weights_identity(cfg.model, cfg.weights) if used else ["none"]
    model = networks_build.network(cfg.model, num_classes, options=start.ckpt.net_options)
    networks_weights.load_weights(model, start.ckpt.model)
    if cfg.mode == "transfer":
        heads.freeze_backbone(model)
    known = start.ckpt.weights_id
    return model, known if known is not None else ["unknown", cfg.weights]


# ----------------------------------------------------------------------------- main

def main(given: dict[str, Any]) -> int:
    """Train with the settings train.py read; the process group (torchrun) is closed however it ends."""
    try:
        return train(given)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train(given: dict[str, Any]) -> int:
    """Settings -> run folder -> data and model -> fit. Under torchrun rank 0 makes the run folder and
    checks the data; the other ranks take what it decided."""
    rank, world, local_rank = init_distributed(given.get("device", "auto"))
    lead = rank == 0
    cfg, start = resume.resolve_config(given, world)
    preprocess = resume.run_preprocess(cfg, start)  # once: everything below is given it
    resume.check_start(cfg, start, world)
    if lead and start.ckpt is None and start.in_place:
        print(f"{start.run_dir} was stopped before its first checkpoint: starting it again there")
    if lead and start.ckpt is None and not cfg.lr_find:
        print(describe_recipe(cfg, given, networks_build.family(cfg.model)))
    if resume.finished(start, cfg):
        if lead:
            print(resume.nothing_to_do(start))
        return 0
    device = pick_device(cfg.device, local_rank)
    with contextlib.ExitStack() as held:
        held.enter_context(sigterm_as_ctrl_c())  # so temp files are removed on the way out
        # the run folder is made (or taken) and locked first, so a run stopped in any way from here on
        # is resumable by its folder; a start that fails on bad input removes what it made
        claimed: list[runfolder.RunFolder] = []

        def claim() -> str:
            claimed.append(runfolder.claim_run_dir(start, cfg, held))
            return str(claimed[0].path)

        run_dir = Path(from_lead(claim, lead))
        made = claimed[0] if claimed else None
        try:
            if start.ckpt is None and cfg.mode != "scratch" and not cfg.weights:
                networks_weights.fetch_weights(cfg.model)  # before the data check: offline, said at once
            split = resume.load_split(cfg, start, preprocess, lead)
            model, weights_id = build(cfg, start, len(split.classes), preprocess.img_size)
            heads.set_train_mode(model, True, cfg.mode)  # as it trains: is BatchNorm trained (batches of one)?
            check_batch_size(model, cfg.batch_size)
            if lead:
                runfolder.write_run_files(run_dir, cfg, start, split)
                report_split(split, run_dir)
        except KeyboardInterrupt:  # stopped while checking the data: resumable from its folder (config.json)
            return resume.interrupted_early(run_dir, lead, not cfg.lr_find)
        except (Exception, Stopped) as e:  # (Stopped: another process met bad input, or failed)
            if made is not None and (isinstance(e, UsageError) or (isinstance(e, Stopped) and e.code == 2)):
                made.undo()  # bad input: nothing was started; anything else leaves a folder to resume
            if isinstance(e, WeightsUnavailable) and not given.get("resume"):
                raise UsageError(e.offline(resume.offline_command(given))) from None
            raise
        try:
            return fit(Run(cfg, start, run_dir, split, preprocess, weights_id, device, rank, world, local_rank), model)
        except KeyboardInterrupt:
            return resume.interrupted_early(run_dir, lead, not cfg.lr_find)


def fit(run: Run, model: nn.Module) -> int:
    cfg, device = run.cfg, run.device
    describe(run, model)
    # the cache's kind, decided once, by rank 0, for every process (auto looks at the free disk, which
    # the caches change)
    kind = broadcast(imagecache.cache_kind(cfg.image_cache, run.split.files(), run.preprocess.resize_size,
                                           cfg.cache_dir,
                                        int(cfg.max_file_mb * 2**20), run.preprocess.resample)
                     if run.lead else None)
    # workers sized for this machine (compact JPEGs need decoding); left unresolved in the config so a
    # resume elsewhere sizes them again
    workers = auto_workers(device, kind == "raw") if cfg.workers is None else cfg.workers
    image_input, autocast, scaler = place(model, cfg, run.preprocess, device)
    if cfg.amp is None:  # not given: decided now, on the model as it will train, and saved with the run
        cfg = settle_precision(run, model)
        autocast, scaler = precision(device, cfg.amp)
    inputs = image_datasets(run, model, image_input, kind)
    if cfg.mode == "transfer" and cfg.feature_cache and isinstance(heads.head_of(model)[1], nn.Linear):
        inputs = features.feature_inputs(run, model, inputs, image_input, autocast, workers, kind)

    train_counts = run.split.counts(run.split.train)
    sampler = make_sampler(run, inputs.train, train_counts)
    train_loader = make_loader(inputs.train, cfg.batch_size, workers, device, sampler)
    val_loader = make_loader(shard(inputs.val, run.rank, run.world), 2 * cfg.batch_size, workers, device)
    net = inputs.net
    if cfg.sync_bn and run.world > 1 and not inputs.use_features:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    optimizer = optim.make_optimizer(cfg, model)
    if run.start.ckpt is not None:
        optim.restore_optimizer(optimizer, scaler, run.start.ckpt, cfg, run.say)
    criterion = training_losses.make_criterion(cfg, train_counts, len(run.split.train), run.split.multilabel).to(device)
    weights = criterion.pos_weight if run.split.multilabel else criterion.weight
    if weights is not None:
        what = "positive-label weights" if run.split.multilabel else "class weights"
        run.note(f"{what}: " + ", ".join(f"{c}={w:.2f}" for c, w in zip(run.split.classes, weights.tolist())))
    inner = net  # unwrapped: evaluated on each rank's shard, saved in checkpoints
    net = parallel(net, run)
    if cfg.lr_find:
        return lrfind.lr_find(run, model, net, train_loader, optimizer, criterion, inputs.to_input, autocast, scaler)

    schedule = optim.Schedule(cfg, run.start.ckpt.history if run.start.ckpt else [])
    learner = Learner(net, optimizer, scaler, criterion, inputs.to_input, autocast, device, schedule,
                      training_losses.make_mix(cfg, len(run.split.classes)), make_ema(cfg, inner, len(train_loader),
                                                                                      run.start),
                      run.split.multilabel, precision_name(device, cfg.amp))
    validation = training_loop.Validation(inner, learner, run, val_loader, *statistics_images(run, model, inputs,
                                                                                             workers))
    loop = training_loop.Loop(run, model, learner, schedule, validation)
    if run.lead:
        loop.log.open(loop.progress, sampler.per_rank)
    return loop.run(train_loader, sampler, inputs.use_features)


def settle_precision(run: Run, model: nn.Module) -> TrainConfig:
    """--amp when neither it nor --no-amp was given: on a CPU with native bf16, the faster of bf16 and fp32 for
    this network (machine.measure: measured once per machine and network, so runs agree); elsewhere on, as
    before (CUDA: bf16 or fp16; a CPU without native bf16 trains in fp32 either way). One process decides
    nothing for the others, so runs under torchrun and transfer runs (whose backbone only runs forward) keep
    the old default."""
    cfg = run.cfg
    amp = True
    if run.device.type == "cpu" and run.world == 1 and cfg.mode != "transfer" and cpu_has_bf16():
        size, batch = run.preprocess.img_size, min(cfg.batch_size, 32)
        fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
        figures = machine.measured(
            cache_path(cfg.cache_dir) / "precision.json",
            machine.key(cfg.model, cfg.mode, size, batch, cfg.channels_last),
            lambda: machine.measure(model, size, batch, fmt))
        amp = machine.faster_is_bf16(figures)
        run.say(f"precision: {'bf16' if amp else 'fp32'}, the faster for {cfg.model} on this CPU (bf16 "
                f"{figures['bf16'] * 1000 / batch:.1f} ms/image, fp32 {figures['fp32'] * 1000 / batch:.1f}; "
                "--amp or --no-amp to choose)")
    run.cfg = dataclasses.replace(cfg, amp=amp)
    if run.lead:
        runfolder.write_config(run.run_dir, run.cfg)
    return run.cfg


def statistics_images(run: Run, model: nn.Module, inputs: Inputs, workers: int) -> tuple[list[str], DataLoader | None]:
    """Precise BN: the BatchNorm layers that train, and a fixed sample of the training images seen as
    validation sees them (centre crops), each process its share; none where no BatchNorm trains
    (transfer mode, a VGG) or it is off."""
    heads.set_train_mode(model, True, run.cfg.mode)
    layers = trained_batchnorms(inputs.net)
    if not run.cfg.precise_bn or inputs.use_features or not layers:
        return layers, None
    plain = copy.copy(inputs.train)
    plain.transform = inputs.val.transform
    count = precise_bn_images(len(plain))
    count -= count % run.world  # the same number of batches in every process (SyncBatchNorm waits on them)
    order = torch.randperm(len(plain), generator=torch.Generator().manual_seed(run.cfg.seed))[:count]
    run.say(f"BatchNorm statistics: recomputed from {count} training images before each validation (precise BN; "
            "--no-precise-bn keeps the running averages)")
    return layers, make_loader(Subset(plain, order[run.rank::run.world].tolist()), run.cfg.batch_size, workers,
                               run.device)


def make_ema(cfg: TrainConfig, inner: nn.Module, steps_per_epoch: int, start: runfolder.Start) -> Ema | None:
    """--ema: the average of what trains (the network; on the feature path, its head), resumed from
    last.pt when it holds one (a run that turns --ema on when resumed starts it there)."""
    if not cfg.ema:
        return None
    ema = Ema(inner, cfg.ema_decay, cfg.epochs * steps_per_epoch)
    if start.ckpt is not None and start.ckpt.ema is not None:
        ema.load_state_dict(start.ckpt.ema)
    return ema


def describe(run: Run, model: nn.Module) -> None:
    """The parameter count on the screen; torchsummary's layer table in the run folder."""
    trainable, frozen = heads.count_parameters(model)
    pre = run.preprocess
    if run.lead and run.cfg.summary:
        logs.write_summary(model, pre.img_size, run.run_dir / runfolder.MODEL_SUMMARY, run.cfg.model)
    run.say(f"model: {run.cfg.model}, mode {run.cfg.mode}: {trainable:,} trainable and {frozen:,} frozen parameters; "
            f"{pre.img_size} px crops of {pre.resize_size} px images")


def place(model: nn.Module, cfg: TrainConfig, preprocess: Preprocess, device: torch.device
          ) -> tuple[Callable, Callable, torch.amp.GradScaler]:
    """The model on its device in its memory format; (image batch -> model input, autocast, scaler)."""
    model.to(device)
    if device.type == "cpu":
        tune_cpu_allocator()
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.to(memory_format=memory_format)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return (to_model_input(preprocess, device, memory_format), *precision(device, cfg.amp))


def image_datasets(run: Run, model: nn.Module, image_input: Callable, kind: str) -> Inputs:
    """Train and val images, through the decoded-image cache: built once per machine by its first process
    (on a resume it may have been deleted), shared with its other processes through the file system. A
    cache folder shared by the machines is built by the first to get there."""
    cfg, split, pre = run.cfg, run.split, run.preprocess
    max_bytes = int(cfg.max_file_mb * 2**20)
    cache = imagecache.make_cache(kind, split.files(), pre.resize_size, cfg.cache_dir, max_bytes, pre.resample)
    if cache is not None:
        run.say(imagecache.cache_chosen(kind, cfg.image_cache))
        if run.local_lead:  # one per machine: the cache folder is on each machine's own disk (or shared)
            cache.build(progress=run.lead, skip={p for p, _ in split.skipped})
        barrier(preparation=True)
    augment = datasets.train_transform(pre.img_size, cfg.augment, cfg.min_scale, cfg.hflip)
    if cfg.progressive:
        augment = datasets.BySize(lambda epoch: progressive_size(epoch, cfg.epochs, pre.img_size, cfg.progressive),
                                 lambda size: datasets.train_transform(size, cfg.augment, cfg.min_scale, cfg.hflip))
    n = len(split.classes)
    train_ds = datasets.ImageDataset(split.train, pre.resize_size, augment, cache, cfg.seed, max_bytes, n,
                                    pre.resample)
    val_ds = datasets.ImageDataset(split.val, pre.resize_size, pre.crop(), cache, max_bytes=max_bytes, num_classes=n,
                                  interpolation=pre.resample)
    return Inputs(train_ds, val_ds, model, image_input)


def make_sampler(run: Run, train_ds: Dataset, train_counts: list[int]) -> ResumableSampler:
    """Every image once per epoch in a seeded order; with --balanced-sampler, each class equally often."""
    weights = None
    if run.cfg.balanced_sampler:
        # per item of what is sampled: cached features leave out images that could not be read
        weights = torch.tensor([1.0 / train_counts[y] for y in train_ds.labels], dtype=torch.double)
        n = len(run.split.classes)
        run.note("balanced sampler, chance of drawing an image per class: " + ", ".join(
            f"{c}={1 / max(1, k) / n:.4f}" for c, k in zip(run.split.classes, train_counts)))
    return ResumableSampler(len(train_ds), run.cfg.seed, run.rank, run.world, weights)


def parallel(net: nn.Module, run: Run) -> nn.Module:
    """DistributedDataParallel under torchrun, torch.compile when asked."""
    cfg = run.cfg
    if run.world > 1:
        device = run.device
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
        run.say(f"distributed: {run.world} processes x {cfg.batch_size} = {run.world * cfg.batch_size} images "
                "per step")
    return torch.compile(net) if cfg.compile else net
