"""Domain priors without a VLM: the metadata describer, the MiniLM text encoder, the projection and the describe job."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import damage_member, write_tiny_dataset

from datprl.priors import describe as d
from datprl.priors.encoders import EMBEDDING_DIM, MiniLMEncoder, project, projection_matrix

# --- describer --------------------------------------------------------------------------------------------------


def _grey(value: float, shape=(32, 32)) -> np.ndarray:
    return np.full(shape, round(value * 255), np.uint8)


def test_brightness_words_dark_vs_bright():
    dark, bright = d.image_stats(_grey(0.05), 255), d.image_stats(_grey(0.9), 255)
    assert d.brightness_words(dark) == "very low brightness"
    assert d.brightness_words(bright) == "very high brightness"
    assert d.brightness_words(d.image_stats(_grey(0.3), 255)) == "relatively low brightness"
    # the white level decides: 12-bit data in a 16-bit container at half of 4095 is moderate, not very dark
    assert d.brightness_words(d.image_stats(np.full((8, 8), 2048, np.uint16), 4095)) == "moderate brightness"


def test_grey_vs_colourful():
    grey_rgb = np.repeat(_grey(0.5)[..., None], 3, axis=2)
    stats = d.image_stats(grey_rgb, 255)
    assert stats.grey and d.colour_words(stats) == "black and white" and stats.colours == ()
    colourful = np.zeros((32, 32, 3), np.uint8)
    colourful[:, :16] = (230, 20, 20)  # red half
    colourful[:, 16:] = (20, 40, 220)  # blue half
    stats = d.image_stats(colourful, 255)
    assert not stats.grey and stats.colourfulness > 82
    assert d.colour_words(stats) == "highly colourful"
    assert set(stats.colours) == {"red", "blue"}
    assert d.dominant_colours(np.full((4, 4, 3), (0.1, 0.7, 0.1))) == ("green",)


def test_flat_vs_edgy():
    flat = d.image_stats(_grey(0.5), 255)
    checker = (((np.indices((32, 32)) // 4).sum(axis=0) % 2) * 255).astype(np.uint8)  # 4-pixel squares
    edgy = d.image_stats(checker, 255)
    assert flat.edge_density == 0.0 and d.detail_words(flat).startswith("smooth")
    assert edgy.edge_density > 0.5 and d.detail_words(edgy).startswith("dense edges")
    assert d.contrast_words(flat) == "low contrast" and d.contrast_words(edgy) == "high contrast"


def test_modality_from_record_task_and_domain():
    assert d.modality_words({"modality": "mr", "task": "pet_low_count", "domain": "medical"})[0] == "MRI scan"
    assert d.modality_words({"modality": None, "task": "ct_low_dose", "domain": "medical"})[0] == "CT scan"
    assert d.modality_words({"task": "pet_low_count", "domain": "medical"})[0] == "PET scan"
    assert "bird's-eye" in d.modality_words({"task": "haze", "domain": "remote_sensing"})[1]
    with pytest.raises(ValueError, match="unknown domain"):
        d.modality_words({"task": "x", "domain": "astro"})


def test_describe_composes_a_deterministic_sentence():
    record = {
        "domain": "medical",
        "task": "ct_low_dose",
        "bit_depth": 16,
        "white_level": 4095,
        "source_package": "pydicom-data==1.0.0",
    }
    image = np.full((16, 16), 200, np.uint16)
    text = d.describe(record, image)
    assert text == d.describe(record, image)
    assert text.startswith("a black and white CT scan with a cross-sectional view")
    assert "very low brightness" in text and "(16-bit grayscale, from pydicom-data)" in text and "1.0.0" not in text
    with pytest.raises(ValueError, match="expected a grey"):
        d.describe(record, np.zeros((4, 4, 2), np.uint8))


# --- encoder and projection ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoder():
    return MiniLMEncoder()


def test_encoder_vectors(encoder):
    texts = [
        "a black and white MRI scan with a cross-sectional view of the anatomy",
        "a highly colourful photo of a market, mostly red and orange",
        "a black and white MRI scan with a cross-sectional view of the anatomy",
    ]
    vectors = encoder.encode(texts)
    assert vectors.shape == (3, EMBEDDING_DIM) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(vectors[0], vectors[2], atol=1e-6)
    np.testing.assert_allclose(vectors[0], encoder.encode(texts[:1])[0], atol=1e-5)  # batch-independent
    assert float(vectors[0] @ vectors[1]) < 0.9 * float(vectors[0] @ vectors[0])
    with pytest.raises(ValueError, match="non-empty"):
        encoder.encode(["ok", " "])


def test_projection_is_seeded_and_keeps_directions():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((20, EMBEDDING_DIM))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    a, b = project(x, 64, seed=3), project(x, 64, seed=3)
    assert a.shape == (20, 64) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, project(x, 64, seed=4))
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    wide = project(x, 1024, seed=0)  # 384 -> 1024 with orthonormal rows: every cosine kept
    np.testing.assert_allclose(wide @ wide.T, x @ x.T, atol=1e-5)
    m = projection_matrix(EMBEDDING_DIM, 64, 0)
    np.testing.assert_allclose(m.T @ m, np.eye(64), atol=1e-10)  # orthonormal columns
    with pytest.raises(ValueError, match="2-D"):
        project(x[0], 64)


# --- the job -------------------------------------------------------------------------------------------------------


@pytest.mark.ray
def test_describe_job_rows_resume_and_damage(tmp_path, ray_local, encoder):
    from datprl.priors.job import DescribeConfig, run

    data = write_tiny_dataset(tmp_path / "tiny")
    config = DescribeConfig(dataset=str(data), output=str(tmp_path / "priors"))
    first = run(config, encoder=encoder)
    table = pq.read_table(first.table_url)
    assert first.added == first.rows == 4 and not first.corrupt
    assert table.column("source_id").to_pylist() == ["src0", "src1", "src2", "src3"]
    assert table.column("sample_key").to_pylist() == ["sr_x4-0", "sr_x4-1", "sr_x4-2", "sr_x4-3"]
    assert all(len(e) == EMBEDDING_DIM for e in table.column("embedding").to_pylist())
    manifest = json.loads((tmp_path / "priors" / "manifest.json").read_text())
    assert manifest["rows"] == 4 and manifest["encoder"]["dim"] == EMBEDDING_DIM
    before = (tmp_path / "priors" / "descriptions.parquet").read_bytes()

    again = run(config, encoder=encoder)  # a rerun adds nothing and leaves the table as it was
    assert again.added == 0 and again.rows == 4
    assert (tmp_path / "priors" / "descriptions.parquet").read_bytes() == before

    # a damaged clean image: reported with its key; its source is described from its next sample
    damage_member(data / "train" / "shard-00000.tar", "sr_x4-1.gt.png")
    damaged = run(config.model_copy(update={"output": str(tmp_path / "priors2")}), encoder=encoder)
    assert damaged.rows == 4 and len(damaged.corrupt) == 1 and "sr_x4-1" in damaged.corrupt[0]
    keys = dict(zip(*pq.read_table(damaged.table_url).select(["source_id", "sample_key"]).to_pydict().values()))
    assert keys["src1"] == "haze-1"

    # output made with another template is not appended to
    manifest["template_version"] = "metadata-v0"
    (tmp_path / "priors" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="overwrite=true"):
        run(config, encoder=encoder)


# --- configuration: the vllm describer and the encoder ------------------------------------------------------------


def test_describer_and_encoder_config_errors_name_the_field():
    from datprl.platform.config import ConfigError, load_config
    from datprl.priors.job import DescribeConfig

    with pytest.raises(ConfigError, match="encoder.model"):
        load_config(DescribeConfig, None, ["encoder.name=clip"])
    with pytest.raises(ConfigError, match="for encoder.name=clip"):
        load_config(DescribeConfig, None, ["encoder.model=some/clip"])
    with pytest.raises(ConfigError, match="set vllm.dtype instead"):
        load_config(DescribeConfig, None, ["describer=vllm", "vllm.engine_kwargs={dtype: half}"])
    with pytest.raises(ConfigError, match=r"\{prompt\}"):
        load_config(DescribeConfig, None, ["describer=vllm", "vllm.prompt_template='USER <image> ASSISTANT'"])
    with pytest.raises(ConfigError, match="describer"):
        load_config(DescribeConfig, None, ["describer=llava"])
    default = DescribeConfig()  # the embedded default stays the metadata describer with MiniLM
    assert default.describer == "metadata" and default.encoder.name == "minilm"


def test_local_ray_has_enough_logical_cpus_for_vllm():
    from datprl.priors.job import VLLM_LOCAL_CPUS, DescribeConfig, local_ray_settings

    assert local_ray_settings(DescribeConfig()).num_cpus is None  # metadata: the machine's CPUs, as before
    assert local_ray_settings(DescribeConfig(describer="vllm")).num_cpus >= VLLM_LOCAL_CPUS == 8
    assert local_ray_settings(DescribeConfig(describer="vllm", ray_cpus=4)).num_cpus == 4  # an explicit value wins
    assert not local_ray_settings(DescribeConfig()).dashboard


def test_describe_cluster_config_parses(repo_root):
    from datprl.platform.config import load_config
    from datprl.priors.job import DescribeConfig

    path = repo_root / "infra" / "describe-cluster.yaml"
    assert "ray job submit --working-dir . -- python jobs/describe.py infra/describe-cluster.yaml" in path.read_text()
    assert (repo_root / "jobs" / "describe.py").is_file()
    config = load_config(DescribeConfig, path)
    assert config.describer == "vllm" and config.vllm.model == "llava-hf/llava-1.5-7b-hf"
    assert config.vllm.prompt_template == "USER: <image>\n{prompt} ASSISTANT:"
    assert config.encoder.name == "clip" and config.encoder.model == "openai/clip-vit-large-patch14"
    assert config.dataset.startswith("s3://") and config.output.startswith("s3://")


def test_vlm_inputs_and_processor_config():
    from datprl.priors import vlm

    ct = vlm.rgb8(np.array([[0, 4095], [2048, 65535]], np.uint16), 4095)
    assert ct.dtype == np.uint8 and ct.shape == (2, 2, 3)
    assert ct[..., 0].tolist() == [[0, 255], [128, 255]] and (ct[..., 0] == ct[..., 2]).all()  # 12-bit scale, grey
    photo = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    np.testing.assert_array_equal(vlm.rgb8(photo, 255), photo)
    with pytest.raises(ValueError, match="grey"):
        vlm.rgb8(np.zeros((4, 4, 2), np.uint8), 255)
    config = vlm.VLLMDescriberConfig(
        model="/models/blip2",
        prompt_template="Question: {prompt} Answer:",
        tensor_parallel_size=2,
        engine_kwargs={"max_num_seqs": 8},
    )
    assert vlm.prompt_text(config) == f"Question: {vlm.PAPER_PROMPT} Answer:"
    cpu = vlm.processor_config(config, gpus=False)
    bundles = cpu.placement_group_config["bundles"]  # one CPU per tensor-parallel rank, no GPU
    assert len(bundles) == 2 and all(b["CPU"] == 1 and not b.get("GPU") for b in bundles)
    assert cpu.engine_kwargs["max_num_seqs"] == 8 and cpu.engine_kwargs["limit_mm_per_prompt"] == {"image": 1}
    assert cpu.engine_kwargs["tensor_parallel_size"] == 2 and "revision" not in cpu.engine_kwargs
    assert cpu.should_continue_on_error and cpu.model_source == "/models/blip2"
    gpu = vlm.processor_config(config.model_copy(update={"revision": "abc123"}), gpus=True)
    assert gpu.placement_group_config is None and gpu.engine_kwargs["revision"] == "abc123"


# --- CLIP text encoder ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from tiny_models import build_tiny_clip_text

    return build_tiny_clip_text(tmp_path_factory.mktemp("clip") / "clip-text", projection_dim=48)


def test_clip_encoder_vectors(tiny_clip):
    from datprl.priors.encoders import CLIPTextEncoder, EncoderConfig, encoder_identity

    encoder = CLIPTextEncoder(str(tiny_clip), batch_size=2)
    # The last is longer than CLIP's 77 tokens: truncated, not an error.
    texts = ["a satellite image of fields", "a black and white photo of the brain", "a satellite image of fields"]
    texts.append("a city " * 200)
    vectors = encoder.encode(texts)
    assert encoder.dim == 48 and vectors.shape == (4, 48) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(vectors[0], vectors[2], atol=1e-6)
    np.testing.assert_allclose(vectors[1], encoder.encode(texts[1:2])[0], atol=1e-5)  # padding does not leak in
    assert float(vectors[0] @ vectors[1]) < 0.999
    identity = encoder_identity(EncoderConfig(name="clip", model=str(tiny_clip)))
    assert identity == {"name": "clip", "model": str(tiny_clip), "revision": None, "dim": 48}


@pytest.mark.ray
def test_describe_job_with_clip(tmp_path, ray_local, tiny_clip, encoder):
    from datprl.priors.encoders import EncoderConfig
    from datprl.priors.job import DescribeConfig, run

    data = write_tiny_dataset(tmp_path / "tiny")
    clip = EncoderConfig(name="clip", model=str(tiny_clip))
    config = DescribeConfig(dataset=str(data), output=str(tmp_path / "priors"), encoder=clip)
    result = run(config)  # loads the CLIP encoder the config names
    table = pq.read_table(result.table_url)
    assert result.added == 4 and all(len(e) == 48 for e in table.column("embedding").to_pylist())
    manifest = json.loads((tmp_path / "priors" / "manifest.json").read_text())
    assert manifest["encoder"] == {"name": "clip", "model": str(tiny_clip), "revision": None, "dim": 48}
    assert manifest["projection"]["in_dim"] == 48 and manifest["projection"]["seed"] == 0
    assert project(np.array(table.column("embedding").to_pylist()), 64).shape == (4, 64)
    assert run(config).added == 0  # same encoder: resumes
    with pytest.raises(ValueError, match="different encoder"):  # MiniLM onto CLIP embeddings: refused
        run(config.model_copy(update={"encoder": EncoderConfig()}), encoder=encoder)
    with pytest.raises(ValueError, match="384-d"):  # a loaded encoder of another kind than the config names
        run(config.model_copy(update={"output": str(tmp_path / "other")}), encoder=encoder)


# --- S3 ------------------------------------------------------------------------------------------------------------


@pytest.mark.ray
def test_describe_job_on_s3(tmp_path, ray_local, s3_server, encoder):
    import boto3
    import s3fs

    from datprl.platform import storage
    from datprl.platform.storage import S3Settings
    from datprl.priors.job import DescribeConfig, main, run

    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket="priors")
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    fs.put(str(write_tiny_dataset(tmp_path / "tiny")), "priors/tiny", recursive=True)
    s3 = S3Settings(endpoint_url=s3_server)
    config = DescribeConfig(dataset="s3://priors/tiny", output="s3://priors/tiny/priors", s3=s3)
    first = run(config, encoder=encoder)
    assert first.added == first.rows == 4 and first.table_url == "s3://priors/tiny/priors/descriptions.parquet"
    table = pq.read_table(pa.BufferReader(storage.read_bytes(first.table_url, s3)))
    assert table.column("source_id").to_pylist() == ["src0", "src1", "src2", "src3"]
    manifest = json.loads(storage.read_bytes(first.manifest_url, s3))
    assert manifest["rows"] == 4 and manifest["dataset"] == "s3://priors/tiny"
    assert not (tmp_path / "priors").exists()  # nothing written locally
    before = storage.read_bytes(first.table_url, s3)
    # the CLI on the same bucket (joins the test's Ray): resumes, nothing new, the table untouched
    assert main(["dataset=s3://priors/tiny", "output=s3://priors/tiny/priors", f"s3.endpoint_url={s3_server}"]) == 0
    assert storage.read_bytes(first.table_url, s3) == before
