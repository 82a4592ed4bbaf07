"""Training on Ray Train (datprl.platform.train): a run survives the death of a worker process by resuming from its
last checkpoint, its loss goes down, the same run name launched again continues where it stopped, checkpoints are
complete and loadable, and two DDP workers on halves of a batch take the steps one process takes on the whole batch.

Ray Train runs cost tens of seconds each on 2 cores (actor start-up dominates), so one run, with an injected crash,
serves the crash, loss and resume tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from datprl.models import create_model, load_model
from datprl.models.losses import LossWeights
from datprl.platform.compute import ComputeConfig
from datprl.platform.config import config_to_dict
from datprl.platform.data.pipeline import DataConfig
from conftest import small_corpus
from datprl.platform.train.config import OptimConfig, TrainConfig
from datprl.platform.train.fit import fit

pytestmark = pytest.mark.ray

CHECKPOINT_FILES = {"model.safetensors", "model.json", "state.pt", "config.json"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return small_corpus(tmp_path_factory.mktemp("train-corpus") / "default")


def _config(dataset: Path, root: Path, **overrides) -> TrainConfig:
    """A small CPU run: paper_tiny on 32x32 crops of the haze task (8 training tiles; haze is a global, smooth
    degradation, so a few dozen steps visibly lower the pixel loss), one worker with half a CPU (Ray Data keeps the
    rest), no evaluation, storage and outputs under ``root``. The plain L1 (not the default input-relative one): its
    value is the absolute error the loss test follows."""
    fields = dict(
        name="run",
        storage=str(root / "storage"),
        output_dir=str(root / "out"),
        data=DataConfig(dataset=str(dataset), crop_size=32, tasks=["haze"], per_task_batch=4, shuffle_buffer=8),
        build_dataset_if_missing=False,
        model={"variant": "paper_tiny"},
        loss=LossWeights(input_relative=False),
        optim=OptimConfig(lr=2e-3),
        cpus_per_worker=0.5,
        torch_threads=1,  # half a CPU: the default's 2 threads would compete with the Ray Data read
        evaluate_split=None,
        log_every=4,
        checkpoint_every=10,
    )
    return TrainConfig(**{**fields, **overrides})


def _metrics(config: TrainConfig) -> list[dict]:
    """Rank 0's metrics of every report, in order (``<output_dir>/metrics.jsonl``, written by ``fit``)."""
    path = Path(config.output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _state(result) -> dict:
    with result.checkpoint.as_directory() as folder:
        return torch.load(Path(folder) / "state.pt", map_location="cpu", weights_only=True)


CRASH_AT = 13  # after the checkpoint of step 10 and the report of step 12


@pytest.fixture(scope="module")
def first_run(dataset, tmp_path_factory):
    """Run "run": 20 steps, reports every 4 steps, checkpoints at 10 and 20; rank 0's process dies (``os._exit``)
    once, after step 13, through the fault-injection hook of ``datprl.platform.train`` (``DATPRL_TEST_CRASH_AT_STEP``
    / ``DATPRL_TEST_CRASH_MARKER``), and Ray Train (``max_failures=1``) restarts the worker group.

    Train workers are started by the raylet, which does not see environment variables set in this process after
    ray.init, so Ray is (re)started with the hook in the job's runtime environment and the session's Ray is given
    back afterwards (not requesting ``ray_local``: run alone, this module starts one Ray fewer)."""
    import ray

    from conftest import start_local_ray

    root = tmp_path_factory.mktemp("train-run")
    marker = root / "crashed"
    config = _config(dataset, root, steps=20, output_dir=str(root / "out1"), max_failures=1)
    env = {"DATPRL_TEST_CRASH_AT_STEP": str(CRASH_AT), "DATPRL_TEST_CRASH_MARKER": str(marker)}
    was_running = ray.is_initialized()
    ray.shutdown()
    start_local_ray(runtime_env={"env_vars": env})
    try:
        result = fit(config)
    finally:
        ray.shutdown()
        if was_running:
            start_local_ray()
    assert result.error is None
    return config, result, root, marker


@pytest.mark.e2e
def test_worker_crash_restarts_from_last_checkpoint(first_run):
    config, result, _, marker = first_run
    assert marker.read_text().strip() == f"crashed at step {CRASH_AT}"  # the worker really died
    assert _state(result)["step"] == 20
    rows = _metrics(config)
    before = [r["step"] for r in rows if r["resumed_from_step"] == 0]
    after = [r["step"] for r in rows if r["resumed_from_step"] == 10]
    assert len(before) + len(after) == len(rows)  # exactly two attempts: from 0, then from the checkpoint of step 10
    # A worker's report blocks until the controller has taken its previous one, so the checkpoint of step 10 was
    # registered once the report of step 12 returned; that last report may or may not have been taken before the
    # crash. The second attempt repeats step 12 and goes on: it did not start again from step 0.
    assert before in ([4, 8, 10], [4, 8, 10, 12])
    assert after == [12, 16, 20]


@pytest.mark.e2e
def test_pixel_loss_decreases(first_run):
    config, result, _, _ = first_run
    rows = _metrics(config)
    # Every report carries the mean of each loss term over the steps since the previous report. The network starts
    # as the identity, so the first window's (steps 1-4) pixel loss is about the input's own L1 error.
    first, last = rows[0], rows[-1]
    assert (first["step"], last["step"]) == (4, 20)
    # A 4-step window of 4 crops is noisy (+-25 % between windows): the best later window must be clearly lower.
    best_later = min(r["loss_pixel"] for r in rows[1:])
    assert best_later < 0.8 * first["loss_pixel"], [(r["step"], r["loss_pixel"]) for r in rows]
    assert result.metrics["step"] == 20 and result.metrics["loss_pixel"] == pytest.approx(last["loss_pixel"])
    assert all(r["corrupt_samples"] == 0 for r in rows)


@pytest.mark.e2e
def test_priors_are_described_when_missing_and_align_is_logged(first_run, dataset):
    """text_embeddings=auto (the default) on a dataset without priors: the driver described its training images
    first, into <dataset>/priors, and every report carries the alignment loss L_align = 1 - cos in [0, 2]."""
    import pyarrow.parquet as pq

    config, _, _, _ = first_run
    table = pq.read_table(dataset / "priors" / "descriptions.parquet")
    assert table.num_rows > 0 and len(set(table.column("source_id").to_pylist())) == table.num_rows
    rows = _metrics(config)
    assert all(0.0 <= r["loss_align"] <= 2.0 for r in rows), [r.get("loss_align") for r in rows]


@pytest.mark.e2e
def test_same_name_resumes_from_its_checkpoint(first_run, ray_local, dataset):
    _, first_result, root, _ = first_run
    assert _state(first_result)["step"] == 20

    config = _config(dataset, root, steps=30, output_dir=str(root / "out2"))  # same name and storage, more steps
    result = fit(config)
    assert result.error is None
    rows = _metrics(config)
    # resumed at step 20: its first report is step 24, not 4
    assert [(r["step"], r["resumed_from_step"]) for r in rows] == [(24, 20), (28, 20), (30, 20)]
    state = _state(result)
    assert state["step"] == 30
    assert state["scheduler"]["last_epoch"] == 30  # the learning-rate schedule continued too

    with result.checkpoint.as_directory() as folder:
        folder = Path(folder)
        assert CHECKPOINT_FILES <= {p.name for p in folder.iterdir()}
        assert json.loads((folder / "config.json").read_text())["steps"] == 30
        model = load_model(folder / "model.safetensors")
    saved = model.state_dict()
    assert saved.keys() == state["model"].keys()
    assert all(torch.equal(saved[k], state["model"][k]) for k in saved)  # exported weights = trained weights
    restored = model.eval()(torch.rand(1, 3, 24, 24))
    assert restored.shape == (1, 3, 24, 24) and torch.isfinite(restored).all()


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(
                torch.cuda.device_count() < 2,
                reason="the GPU flavour needs 2 GPUs (infra/gpu-check.sh runs it when lent)",
            ),
        ),
    ],
)
def test_two_ddp_workers_match_one_process_on_the_whole_batch(ray_local, tmp_path, device):
    """The same 3 Adam steps on a fixed global batch of 4: two DDP workers (Ray Train, 2 x 0.5 CPU, or one GPU each
    over NCCL) on 2 images each vs one plain process (this one, no DDP) on all 4, both through ``train_step``, in
    fp32 (on GPU without TF32, so that only summation order differs). DDP runs without ``find_unused_parameters``.

    Without batch statistics every loss term used is a mean over samples (or depends on the parameters only), so
    the DDP average of the two half-batch gradients is the full-batch gradient and the weights must agree up to float
    rounding. So two batch statistics are off here: the balance loss (the entropy of the batch-mean selection
    distribution, a nonlinear function of the whole batch: DDP would average two half-batch entropies) and query
    centring (each worker centres with its own batch mean, as BatchNorm without synchronisation does). Top-k selection
    noise is off so both runs select the same prompts."""
    import ray.train
    from ray.train.torch import TorchTrainer

    config = TrainConfig(
        loss=LossWeights(balance=0.0), optim=OptimConfig(lr=1e-3), compute=ComputeConfig(precision="fp32")
    )
    global_batch, steps = 4, 3

    def train(config: TrainConfig, rank: int, world: int, wrap, device: torch.device) -> tuple[dict, dict]:
        from datprl.models.losses import DATPRLLoss
        from datprl.platform.train.loop import train_step

        if device.type == "cuda":  # a local import: cloudpickle cannot ship the torch.backends.cudnn module object
            from torch.backends import cuda as cuda_backend, cudnn

            cudnn.allow_tf32 = cuda_backend.matmul.allow_tf32 = False
        torch.manual_seed(0)
        model = create_model("paper_tiny", selection_noise_std=0.0, query_centering=False).to(device)
        initial = {k: v.clone().cpu() for k, v in model.state_dict().items()}
        net = wrap(model)
        if world > 1:
            assert isinstance(net, torch.nn.parallel.DistributedDataParallel) and not net.find_unused_parameters
        params = [p for p in net.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=config.optim.lr, betas=config.optim.betas)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        criterion = DATPRLLoss(config.loss)
        data = torch.Generator().manual_seed(1)  # the same global batches on every worker
        part = slice(rank * global_batch // world, (rank + 1) * global_batch // world)
        for _ in range(steps):
            lq = torch.rand(global_batch, 3, 32, 32, generator=data)
            gt = (lq + 0.2 * torch.rand(global_batch, 3, 32, 32, generator=data)).clamp(0, 1)
            train_step(
                net,
                model,
                {"lq": lq[part], "gt": gt[part]},
                criterion,
                optimizer,
                scheduler,
                params,
                config,
                device,
                None,
            )
        return initial, {k: v.cpu() for k, v in model.state_dict().items()}

    def loop(loop_config):
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        rank, world = context.get_world_rank(), context.get_world_size()
        config = TrainConfig.model_validate(loop_config["config"])
        _, final = train(
            config,
            rank,
            world,
            ray.train.torch.prepare_model,  # DDP for world > 1
            ray.train.torch.get_device(),
        )
        torch.save(final, Path(loop_config["out"]) / f"rank{rank}.pt")
        ray.train.report({"done": 1})

    trainer = TorchTrainer(
        loop,
        train_loop_config={"config": config_to_dict(config), "out": str(tmp_path)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=2, resources_per_worker={"CPU": 0.5}, use_gpu=device == "cuda"
        ),
        run_config=ray.train.RunConfig(name="ddp", storage_path=str(tmp_path / "storage")),
    )
    assert trainer.fit().error is None
    initial, one = train(config, 0, 1, lambda model: model, torch.device(device))
    two = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]

    keys = [k for k, v in one.items() if v.is_floating_point()]
    assert all(torch.equal(two[0][k], two[1][k]) for k in keys)  # DDP keeps the replicas identical
    moved = max((one[k] - initial[k]).abs().max().item() for k in keys)
    diff = max((one[k] - two[0][k]).abs().max().item() for k in keys)
    print(f"largest weight change {moved:.3e}; largest 1-vs-2-worker difference {diff:.3e}")
    assert moved > 1e-3  # the steps really trained (Adam moves a weight by up to lr per step)
    assert diff < (1e-5 if device == "cpu" else 1e-4)  # cuDNN may pick other algorithms for half the batch


@pytest.mark.e2e
def test_two_workers_on_unbalanced_data_with_validation_and_a_held_out_task(ray_local, dataset, tmp_path):
    """Two DDP workers on a split where one task has very few samples (a worker may receive none of them) finish the
    same number of steps without hanging; periodic validation reports PSNR per task, including the task held out of
    training for zero-shot evaluation, which the training batches never contain. The run also takes the non-default
    compute options through Ray Train and DDP (fp16 autocast with a GradScaler whose state is checkpointed,
    channels-last, fused Adam, the learning rate scaled linearly with the 2 workers)."""
    from datprl.platform.data.format import read_manifest
    from datprl.platform.train.fit import training_tasks

    config = _config(
        dataset,
        tmp_path,
        name="two-workers",
        steps=12,
        num_workers=2,
        cpus_per_worker=0.5,
        data=DataConfig(
            dataset=str(dataset),
            crop_size=16,
            tasks=["haze", "ct_low_dose", "cloud"],
            per_task_batch=2,
            shuffle_buffer=4,
            eval_crop=32,
        ),
        zero_shot_tasks=["cloud"],
        evaluate_split="val",
        validate_every=6,
        log_every=6,
        checkpoint_every=12,
        compute=ComputeConfig(precision="fp16", channels_last=True, adam_impl="fused"),
        optim=OptimConfig(lr=1e-3, lr_scaling="linear", min_lr=1e-3),
        loss=LossWeights(input_relative="task"),
    )
    counts = {c.task: c.samples for c in read_manifest(str(dataset)).counts if c.split == "train"}
    assert counts["ct_low_dose"] < counts["haze"]  # the unbalanced case this test is about
    assert training_tasks(config) == (["haze", "ct_low_dose"], ["cloud"])
    result = fit(config)
    state = _state(result)
    assert result.error is None and state["step"] == 12
    assert state["scaler"]["scale"] > 0  # the fp16 loss scale is resumed with the run
    # the per-task divisors of the default loss are checkpointed: one running mean per training task, 12 steps each
    seen = {task: values[2] for task, values in state["input_error"]["tasks"].items()}
    assert seen == {"haze": 12, "ct_low_dose": 12}
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(2e-3)  # 1e-3 x 2 workers
    assert all(m["loss"] == m["loss"] for m in _metrics(config))  # no NaN loss reached a report
    validated = [m for m in _metrics(config) if "val_psnr" in m]
    assert [m["step"] for m in validated] == [6, 12]
    for m in validated:
        assert {"val_delta_psnr/haze", "val_delta_psnr/ct_low_dose", "val_delta_psnr/cloud"} <= set(m)
        assert m["val_psnr"] > 0 and m["val_input_psnr"] > 0


def test_bad_zero_shot_names_are_rejected(dataset, tmp_path):
    from datprl.platform.train.fit import training_tasks

    with pytest.raises(ValueError, match="zero_shot_tasks.*nope"):
        training_tasks(_config(dataset, tmp_path, zero_shot_tasks=["nope"]))
    with pytest.raises(ValueError, match="zero_shot_domains.*astro"):
        training_tasks(_config(dataset, tmp_path, zero_shot_domains=["astro"]))
    with pytest.raises(ValueError, match="every training task"):
        training_tasks(_config(dataset, tmp_path, zero_shot_tasks=["haze"]))


def test_relative_local_paths_are_resolved_for_the_workers(tmp_path, monkeypatch):
    """Workers run in a directory of their own: the driver hands them absolute local paths (s3:// kept as is)."""
    from datprl.platform.train.fit import _absolute_local_paths

    monkeypatch.chdir(tmp_path)
    config = TrainConfig(
        data=DataConfig(dataset="data/default"),
        text_embeddings="s3://bucket/emb.parquet",
        storage="runs",
        output_dir="outputs/train",
    )
    resolved = _absolute_local_paths(config)
    assert resolved.data.dataset == str(tmp_path / "data/default")
    assert resolved.storage == str(tmp_path / "runs") and resolved.output_dir == str(tmp_path / "outputs/train")
    assert resolved.text_embeddings == "s3://bucket/emb.parquet"
    assert resolved.data.crop_size == config.data.crop_size
    default = _absolute_local_paths(TrainConfig(data=DataConfig(dataset="data/default")))  # text_embeddings=auto
    assert default.text_embeddings == "auto"  # resolved against the (absolute) dataset where it is read
    named = _absolute_local_paths(TrainConfig(text_embeddings="e.parquet"))
    assert named.text_embeddings == str(tmp_path / "e.parquet")
    assert _absolute_local_paths(TrainConfig(text_embeddings=None)).text_embeddings is None


@pytest.mark.ray
def test_session_ray_serves_its_own_dashboard_on_loopback(ray_local):
    """Ray Train's placement-group cleaner polls the dashboard's state API; the test Ray must answer it itself, on
    127.0.0.1, not leave 127.0.0.1:8265 to whatever else runs there."""
    import urllib.error
    import urllib.request

    url = ray_local._private.worker.get_dashboard_url()
    host, port = url.rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) != 8265
    try:
        status = urllib.request.urlopen(f"http://{url}/api/version", timeout=30).status
    except urllib.error.HTTPError as exc:  # token authentication answers 401: the dashboard is up
        status = exc.code
    assert status in (200, 401)
