"""Shards, manifests and encoders on object storage, against a real S3-compatible server (moto's threaded
server on 127.0.0.1, started and stopped here; the project talks to it through s3fs exactly as to AWS or
MinIO, configured by the standard `AWS_*` environment). Also: schemes the project cannot serve are refused
with one line, never taken for a local folder."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from build_helpers import BUILD, CLI_FLAGS, free_port, tar_digests
from prep.cli import app as prep_app
from train.cli import app as train_app

pytestmark = pytest.mark.slow

BUCKET = "contralateral"
REGION = "us-east-1"


@dataclass
class S3:
    endpoint: str
    env: dict  # the AWS_* variables a user would export

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"])

    def objects(self, prefix: str) -> dict[str, bytes]:
        """Key (relative to `prefix`) -> bytes of every object under `prefix`."""
        client, found = self.client(), {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix + "/"):
            for item in page.get("Contents", []):
                body = client.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read()
                found[item["Key"][len(prefix) + 1:]] = body
        return found


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server with authentication on: one IAM user with an S3 policy; its key is the credential."""
    import boto3
    import requests
    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    setup = {"endpoint_url": endpoint, "region_name": REGION, "aws_access_key_id": "setup",
             "aws_secret_access_key": "setup"}
    iam = boto3.client("iam", **setup)
    iam.create_user(UserName="builder")
    iam.put_user_policy(UserName="builder", PolicyName="s3", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    key = iam.create_access_key(UserName="builder")["AccessKey"]
    boto3.client("s3", **setup).create_bucket(Bucket=BUCKET)
    requests.post(f"{endpoint}/moto-api/reset-auth", data=b"0", timeout=10).raise_for_status()  # auth from now on
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
           "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"], "AWS_DEFAULT_REGION": REGION}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        patch.delenv("AWS_PROFILE", raising=False)
        s3fs.S3FileSystem.clear_instance_cache()
        yield S3(endpoint, env)
        s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def build_args(archive: Path, prefix: str, *extra: str) -> list[str]:
    return ["build-shards", "--root", str(archive), "--out", f"s3://{BUCKET}/{prefix}/shards",
            "--manifests", f"s3://{BUCKET}/{prefix}/manifests", *CLI_FLAGS, "--workers", "0", *extra]


def digests(objects: dict[str, bytes], suffix: str) -> dict[str, str]:
    return {k: hashlib.sha256(v).hexdigest() for k, v in objects.items() if k.endswith(suffix)}


def test_build_verify_pretrain_export_evaluate_on_s3(synth_archive, reference_build, s3, tmp_path, tiny_trainer):
    ref_out, _ = reference_build
    result = CliRunner().invoke(prep_app, build_args(synth_archive, "clean"))
    assert result.exit_code == 0, result.output
    objects = s3.objects("clean")
    # the same bytes as the local build: tars, parquet tables, wids.json (urls relative to the manifest folder)
    assert {f"shards/{k}": v for k, v in tar_digests(ref_out / "shards").items()} == digests(objects, ".tar")
    for name in ("samples.parquet", "shards.parquet", "wids.json"):  # pairs.parquet holds timings
        assert objects[f"manifests/{name}"] == (ref_out / "manifests" / name).read_bytes(), name
    assert not any(k.endswith(".tmp") for k in objects)
    build_json = objects["manifests/build.json"].decode()
    for secret in (s3.env["AWS_SECRET_ACCESS_KEY"], s3.env["AWS_ACCESS_KEY_ID"]):
        assert secret not in build_json and secret not in result.output

    shards, manifest = f"s3://{BUCKET}/clean/shards", f"s3://{BUCKET}/clean/manifests"
    result = CliRunner().invoke(prep_app, ["verify", "--shards", shards, "--manifests", manifest])
    assert result.exit_code == 0 and "verify: OK" in result.output, result.output

    run = tmp_path / "run"
    result = CliRunner().invoke(train_app, ["pretrain", "--shards", shards, "--manifest", f"{manifest}/samples.parquet",
                                            "--where", "split == 'training'", "--out", str(run),
                                            *tiny_trainer.flags(batch_size=4, steps=2, ckpt_every=2, log_every=1,
                                                                device="cpu")])
    assert result.exit_code == 0, result.output
    assert json.loads((run / "summary.json").read_text())["step"] == 2

    result = CliRunner().invoke(train_app, ["export", str(run), "--out", f"s3://{BUCKET}/enc/encoder.safetensors"])
    assert result.exit_code == 0, result.output
    exported = s3.objects("enc")
    assert set(exported) == {"encoder.safetensors", "encoder.json"}
    assert exported["encoder.safetensors"] == (run / "encoder.safetensors").read_bytes()

    evals = tmp_path / "eval"
    result = CliRunner().invoke(train_app, ["evaluate", "--encoder", str(run), "--shards", shards, "--manifest",
                                            f"{manifest}/samples.parquet", "--out", str(evals), "--detection-only",
                                            "--n-boot", "0", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((evals / "metrics.json").read_text())
    assert metrics["data"]["n_samples"] > 0 and metrics["data"]["source"].startswith("s3://")


def upload(s3: S3, folder: Path, prefix: str) -> str:
    """Every file under `folder` as an object under `prefix`; returns the prefix's URL."""
    client = s3.client()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/{path.relative_to(folder).as_posix()}", Body=path.read_bytes())
    return f"s3://{BUCKET}/{prefix}"


def test_finetune_and_detect_read_their_manifest_from_s3(synth_archive, reference_build, s3, tmp_path):
    ref_out, _ = reference_build
    build = upload(s3, ref_out, "uploaded")  # shards/ and manifests/ side by side, as a build writes them
    manifest = f"{build}/manifests/samples.parquet"
    run = tmp_path / "ft"
    result = CliRunner().invoke(train_app, ["finetune", "--manifest", manifest, "--shards", f"{build}/shards",
                                            "--init", "random", "--backbone",
                                            "test_resnet", "--crop-px", "24", "--num-workers", "0", "--steps", "2",
                                            "--batch-size", "8", "--ckpt-every", "2", "--val-fraction", "0",
                                            "--n-boot", "0", "--no-progress", "--device", "cpu", "--out", str(run)])
    assert result.exit_code == 0, result.output
    assert manifest in (run / "finetune.json").read_text() and len(pd.read_parquet(run / "test_scores.parquet")) > 0

    samples = pd.read_parquet(ref_out / "manifests" / "samples.parquet")
    out = tmp_path / "det"
    result = CliRunner().invoke(train_app, ["detect", "--root", str(synth_archive), "--manifest", manifest, "--where",
                                            "split == 'test'", "--mm-per-px", "0.8", "--patch-px", "32",
                                            "--bank-studies", "0", "--overlays", "0", "--n-boot", "0", "--out",
                                            str(out)])
    assert result.exit_code == 0, result.output
    tested = set(samples.loc[samples["split"] == "test", "study_id"])
    assert set(pd.read_parquet(out / "detections.parquet")["study_id"]) == tested


def test_kill_9_mid_build_on_s3_then_rerun_gives_a_clean_builds_objects(synth_archive, reference_build, s3):
    ref_out, _ = reference_build
    n_groups = len(list((ref_out / "manifests" / "parts").glob("*.done.json")))
    command = [sys.executable, "-m", "prep", *build_args(synth_archive, "killed")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while sum(k.endswith(".done.json") for k in s3.objects("killed")) < max(1, n_groups // 3):
        assert proc.poll() is None and time.monotonic() < deadline, "the build ended before it could be killed"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert "manifests/samples.parquet" not in s3.objects("killed")  # really mid-build
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    objects = s3.objects("killed")
    assert {f"shards/{k}": v for k, v in tar_digests(ref_out / "shards").items()} == digests(objects, ".tar")
    for name in ("samples.parquet", "shards.parquet", "wids.json"):
        assert objects[f"manifests/{name}"] == (ref_out / "manifests" / name).read_bytes(), name


def test_a_missing_bucket_is_one_line_and_writes_nothing(synth_archive, s3, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(prep_app, ["build-shards", "--root", str(synth_archive), "--out", "s3://no-such-bucket/x",
                                           "--manifests", "s3://no-such-bucket/m", "--workers", "0"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no_bucket: s3://no-such-bucket"), result.output
    assert list(tmp_path.iterdir()) == []
    result = CliRunner().invoke(prep_app, ["verify", "--shards", "s3://no-such-bucket/x", "--manifests",
                                           "s3://no-such-bucket/m"])
    assert result.exit_code == 2 and result.output.strip().startswith("prep verify: no_bucket"), result.output


def test_bad_credentials_are_one_line_and_write_nothing(synth_archive, s3, tmp_path):
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": "not-the-secret", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "prep", *build_args(synth_archive, "denied")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: access_denied: s3://contralateral"), done.stderr
    assert "not-the-secret" not in done.stderr + done.stdout
    assert s3.objects("denied") == {} and list(tmp_path.iterdir()) == []


def test_a_scheme_the_project_cannot_serve_is_refused_never_a_local_folder(synth_archive, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    result = runner.invoke(prep_app, ["build-shards", "--root", str(synth_archive), "--out", "ftp://host/shards",
                                      "--workers", "0"])
    assert result.exit_code == 2 and result.output.strip().startswith("error: unsupported_url: ftp://host/shards")
    result = runner.invoke(prep_app, ["verify", "--shards", "hdfs://nn/shards", "--manifests", "m"])
    assert result.exit_code == 2 and "unsupported_url" in result.output
    result = runner.invoke(train_app, ["pretrain", "--shards", "gopher://x/shards", "--out", "run"])
    assert result.exit_code == 2 and "unsupported_url" in result.output
    result = runner.invoke(train_app, ["pretrain", "--shards", "shards", "--out", "s3://bucket/run"])
    assert result.exit_code == 2 and "--out s3://bucket/run: must be a local folder" in result.output
    for command in (["finetune", "--manifest", "samples.parquet", "--init", "random"],
                    ["detect", "--root", str(synth_archive)]):
        result = runner.invoke(train_app, [*command, "--out", "s3://bucket/run"])
        assert result.exit_code == 2, (command, result.output)
        assert len(result.output.strip().splitlines()) == 1 and "--out s3://bucket/run: must be a local folder" in result.output
    assert list(tmp_path.iterdir()) == []  # no `ftp:`, `s3:` or `run` folder
